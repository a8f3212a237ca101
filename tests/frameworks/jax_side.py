"""The JAX/Flax side of the parity tests. Runs in its own environment (.venv-jax, see tools/framework_envs.sh),
never imports onnx-gbp, and talks to the main test process through files only.

    python jax_side.py export DIR      build the Flax NNX CNN (fixed seed), export it with jax2onnx, and compute
                                       JAX's own guided / deconvnet / vanilla maps with JAX's gates
    python jax_side.py reference DIR   recompute them with the ReLU gates ONNX Runtime's forward pass took
                                       (DIR/<model>/gates_<target>.npz, written by the main process)

The reference: `jax.nn.relu` (and its alias `flax.nnx.relu`) replaced by a `jax.custom_vjp` ReLU that applies
the method's rule (guided dy*[x>0]*[dy>0], deconvnet dy*[dy>0], vanilla dy*[x>0]); gradients from `jax.grad`.
The number of patched calls must equal the number of ReLUs in the model's jaxpr.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from side_common import METHODS, TARGETS, main, write_gated_references  # noqa: E402

SEED = 1234
BATCH = 2
SIZE = 32
OPSET = 21
NEURON_CALL = 2  # the intermediate target: the output of the third ReLU (after the residual add)


class ResidualCNN(nnx.Module):
    """conv+BN+ReLU, max pool, a residual block, average pool, strided conv, dense head. Pooling windows and
    strides go by keyword (jax2onnx misreads positional ones)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 24, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(24, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(24, 24, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.conv3 = nnx.Conv(24, 24, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.bn3 = nnx.BatchNorm(24, use_running_average=True, rngs=rngs)
        self.conv4 = nnx.Conv(24, 32, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        r = nnx.relu(self.conv2(x))
        r = self.bn3(self.conv3(r))
        x = jax.nn.relu(x + r)
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = jax.nn.relu(self.conv4(x))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        return self.fc2(x)


MODELS = {"residual_cnn": ResidualCNN}


def build(name: str) -> nnx.Module:
    model = MODELS[name](nnx.Rngs(SEED))
    rng = np.random.default_rng(SEED)
    for _, bn in nnx.iter_modules(model):
        if isinstance(bn, nnx.BatchNorm):  # fresh statistics make BN the identity: give it real ones
            c = bn.mean.get_value().shape[0]
            bn.mean.set_value(jnp.asarray(rng.normal(0.0, 0.2, c), jnp.float32))
            bn.var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32))
            bn.scale.set_value(jnp.asarray(rng.uniform(0.6, 1.4, c), jnp.float32))
            bn.bias.set_value(jnp.asarray(rng.normal(0.0, 0.2, c), jnp.float32))
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (nnx.Conv, nnx.Linear)) and m.bias is not None:  # fresh biases are zero
            m.bias.set_value(jnp.asarray(rng.normal(0.0, 0.1, m.bias.get_value().shape), jnp.float32))
    model.eval()
    return model


def sample_input() -> np.ndarray:
    return np.random.default_rng(SEED + 1).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


class ReluPatch:
    """Replaces jax.nn.relu and flax.nnx.relu with the method's rule; `gates` (ReLU inputs in call order) are the
    values whose signs the rule uses instead of JAX's own."""

    def __init__(self, method: str, gates: list[np.ndarray] | None = None, record: bool = False):
        self.method, self.gates, self.record = method, gates, record
        self.calls = 0
        self.inputs: list[np.ndarray] = []
        self.outputs: list = []
        method_ = method

        @jax.custom_vjp
        def relu(x, g):
            return jnp.maximum(x, 0)

        def fwd(x, g):
            return jnp.maximum(x, 0), g

        def bwd(g, dy):
            if method_ == "vanilla":
                dx = jnp.where(g > 0, dy, 0)
            elif method_ == "deconvnet":
                dx = jnp.maximum(dy, 0)
            else:
                dx = jnp.where(g > 0, jnp.maximum(dy, 0), 0)
            return dx, jnp.zeros_like(g)

        relu.defvjp(fwd, bwd)
        self._relu = relu

    def __call__(self, x):
        i = self.calls
        self.calls += 1
        if self.record:
            self.inputs.append(np.asarray(x))
        g = jax.lax.stop_gradient(x) if self.gates is None else jnp.asarray(self.gates[i])
        y = self._relu(x, g)
        self.outputs.append(y)
        return y

    @contextlib.contextmanager
    def installed(self):
        saved = jax.nn.relu, nnx.relu
        jax.nn.relu = nnx.relu = self
        try:
            yield self
        finally:
            jax.nn.relu, nnx.relu = saved


def count_relus(model: nnx.Module, x: np.ndarray) -> int:
    """ReLUs in the unpatched model's jaxpr (jax.nn.relu is a custom_jvp function named relu)."""
    def walk(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name.startswith("custom_jvp_call") and "relu" in str(eqn.params.get("call_jaxpr", "")) \
                    or eqn.primitive.name.startswith("custom_jvp_call") and eqn.params.get("name") == "relu":
                n += 1
                continue
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        n += walk(inner)
        return n
    return walk(jax.make_jaxpr(lambda t: model(t))(x).jaxpr)


def reference_maps(model, x: np.ndarray, method: str, target: str, gates=None, record: bool = False,
                   channel: int = 0):
    """The method's map of the predicted class's logit, of the most activated neuron after ReLU number
    NEURON_CALL ("neuron"), or of the sum of its channel `channel` ("channel")."""
    probe = ReluPatch(method, gates, record)
    with probe.installed():
        logits = np.asarray(model(jnp.asarray(x)))
    act = np.asarray(probe.outputs[NEURON_CALL]).reshape(len(x), -1)
    chosen = (logits if target == "class" else act).argmax(axis=1)
    if target == "channel":
        chosen = np.full(len(x), channel)

    patch = ReluPatch(method, gates)

    def objective(xx):
        patch.calls, patch.outputs = 0, []
        out = model(xx)
        if target == "channel":  # NHWC: one channel's map, summed
            return jnp.sum(patch.outputs[NEURON_CALL][..., channel])
        scores = out if target == "class" else patch.outputs[NEURON_CALL].reshape(len(x), -1)
        return jnp.sum(scores[jnp.arange(len(x)), chosen])

    with patch.installed():
        grad = jax.grad(objective)(jnp.asarray(x))
    return np.asarray(grad), chosen, logits, probe


def export_onnx(model, path: Path) -> dict:
    import jax2onnx
    import onnx

    proto = jax2onnx.to_onnx(model, [("B", SIZE, SIZE, 3)], model_name="residual_cnn", opset=OPSET)
    onnx.save(proto, str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    relus = [n for n in proto.graph.node if n.op_type == "Relu"]
    return {"exporter": f"jax2onnx {_version('jax2onnx')}", "opset": OPSET, "ops": ops,
            "relu_outputs": [n.output[0] for n in relus]}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def cmd_export(out: Path, names: list[str]) -> None:
    import flax

    manifest = {"framework": "jax", "versions": {"jax": jax.__version__, "flax": flax.__version__,
                                                 "jax2onnx": _version("jax2onnx")}, "models": {}}
    for name in names:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        model = build(name)
        x = sample_input()
        info = export_onnx(model, d / "model.onnx")
        info["relu_ops"] = count_relus(model, x)
        arrays = {"x": x}
        probe = ReluPatch("vanilla")
        with probe.installed():
            model(jnp.asarray(x))
        # the channel target: the channel with the largest summed activation on the first image
        info["channel"] = int(np.argmax(np.asarray(probe.outputs[NEURON_CALL])[0].sum(axis=(0, 1))))
        for target in TARGETS:
            for method in METHODS:
                grad, chosen, logits, probe = reference_maps(model, x, method, target, record=method == "vanilla",
                                                             channel=info["channel"])
                arrays[f"native_{target}_{method}"] = grad
                arrays[f"chosen_{target}"] = chosen
                arrays["logits"] = logits
                info[f"relu_calls_{target}"] = probe.calls
                if probe.record:
                    for i, a in enumerate(probe.inputs):
                        arrays[f"relu_in_{target}_{i}"] = a
                    layer_shape = probe.inputs[NEURON_CALL].shape[1:]
        # the intermediate target in ONNX: the output of the Relu node that computes ReLU call NEURON_CALL
        # (jax2onnx emits nodes in trace order; the harness checks the choice by value through the targets)
        info.update(layer=f"relu #{NEURON_CALL}", onnx_layer=info["relu_outputs"][NEURON_CALL],
                    layer_shape=list(layer_shape))
        np.savez(d / "reference.npz", **arrays)
        manifest["models"][name] = info
        print(f"[jax] {name}: exported, {info['relu_ops']} ReLUs in the jaxpr, {info['relu_calls_class']} calls",
              flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def cmd_reference(out: Path) -> None:
    def run(model, info, saved, method, target, gates):
        grad, chosen, logits, probe = reference_maps(model, saved["x"], method, target, gates, channel=info["channel"])
        if not np.array_equal(logits, saved["logits"]):
            raise RuntimeError("the rebuilt model's logits differ from the exported one's")
        return grad, chosen, probe.calls

    write_gated_references(out, "jax", lambda name, d: build(name), run)

if __name__ == "__main__":
    main(__doc__, cmd_export, cmd_reference, list(MODELS))
