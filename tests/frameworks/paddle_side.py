"""The PaddlePaddle side of the parity tests. Runs in its own environment (.venv-paddle, see
tools/framework_envs.sh: paddle2onnx pins onnx<=1.17, so it cannot share one with jax2onnx), never imports
onnx-gbp, and talks to the main test process through files only.

    python paddle_side.py export DIR      build the CNN (fixed seed), export it with paddle.jit.save +
                                          paddle2onnx, and compute Paddle's own maps with Paddle's gates
    python paddle_side.py reference DIR   recompute them with the ReLU gates ONNX Runtime's forward pass took

The reference: `paddle.nn.functional.relu` (which `nn.ReLU` calls) replaced by a `paddle.autograd.PyLayer`
that applies the method's rule; gradients from `paddle.grad`. The model is NCHW, like Paddle's layers.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GLOG_minloglevel", "3")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
from side_common import METHODS, TARGETS, main, write_gated_references  # noqa: E402

SEED = 1234
BATCH = 2
SIZE = 32
OPSET = 17
NEURON_CALL = 2  # the intermediate target: the output of the third ReLU (after the residual add)


class ResidualCNN(nn.Layer):
    """conv+BN+ReLU (nn.ReLU), max pool, a residual block (F.relu), average pool, strided conv, dense head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2D(3, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2D(24)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2D(24, 24, 3, padding=1)
        self.conv3 = nn.Conv2D(24, 24, 3, padding=1)
        self.bn3 = nn.BatchNorm2D(24)
        self.conv4 = nn.Conv2D(24, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=2, stride=2)
        r = F.relu(self.conv2(x))
        r = self.bn3(self.conv3(r))
        x = F.relu(x + r)
        x = F.avg_pool2d(x, kernel_size=2, stride=2)
        x = nn.functional.relu(self.conv4(x))
        x = paddle.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


MODELS = {"residual_cnn": ResidualCNN}


def build(name: str) -> nn.Layer:
    paddle.seed(SEED)
    model = MODELS[name]()
    rng = np.random.default_rng(SEED)
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):  # fresh statistics make BN the identity: give it real ones
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0.0, 0.2, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.weight.set_value(rng.uniform(0.6, 1.4, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0.0, 0.2, c).astype(np.float32))
        elif isinstance(layer, (nn.Conv2D, nn.Linear)) and layer.bias is not None:
            layer.bias.set_value(rng.normal(0.0, 0.1, layer.bias.shape).astype(np.float32))
    model.eval()
    return model


def sample_input() -> np.ndarray:
    return np.random.default_rng(SEED + 1).normal(size=(BATCH, 3, SIZE, SIZE)).astype(np.float32)


class ReluPatch:
    """Replaces paddle.nn.functional.relu with the method's rule; `gates` (ReLU inputs in call order) are the
    values whose signs the rule uses instead of Paddle's own."""

    def __init__(self, method: str, gates: list[np.ndarray] | None = None, record: bool = False):
        self.method, self.gates, self.record = method, gates, record
        self.calls = 0
        self.inputs: list[np.ndarray] = []
        self.outputs: list = []
        original = F.relu
        method_ = method

        class MethodReLU(paddle.autograd.PyLayer):
            @staticmethod
            def forward(ctx, x, g):
                ctx.save_for_backward(g)
                return original(x)

            @staticmethod
            def backward(ctx, dy):
                (g,) = ctx.saved_tensor()
                zero = paddle.zeros_like(dy)
                if method_ == "vanilla":
                    return paddle.where(g > 0, dy, zero)
                if method_ == "deconvnet":
                    return paddle.maximum(dy, zero)
                return paddle.where(g > 0, paddle.maximum(dy, zero), zero)

        self._apply = MethodReLU.apply
        self._original = original

    def __call__(self, x, name=None):
        i = self.calls
        self.calls += 1
        if self.record:
            self.inputs.append(x.numpy())
        g = x.detach() if self.gates is None else paddle.to_tensor(self.gates[i])
        if tuple(g.shape) != tuple(x.shape):
            raise RuntimeError(f"gate {i} has shape {g.shape}, the ReLU input {x.shape}")
        y = self._apply(x, g)
        self.outputs.append(y)
        return y

    @contextlib.contextmanager
    def installed(self):
        F.relu = self
        try:
            yield self
        finally:
            F.relu = self._original


def reference_maps(model, x: np.ndarray, method: str, target: str, gates=None, record: bool = False,
                   channel: int = 0):
    """The method's map of the predicted class's logit, of the most activated neuron after ReLU number
    NEURON_CALL ("neuron"), or of the sum of its channel `channel` ("channel")."""
    patch = ReluPatch(method, gates, record)
    xt = paddle.to_tensor(x, stop_gradient=False)
    with patch.installed():
        logits = model(xt)
    act = patch.outputs[NEURON_CALL]
    if target == "class":
        scores = logits.reshape([len(x), -1])
    elif target == "neuron":
        scores = act.reshape([len(x), -1])
    else:  # NCHW: one channel's map, summed
        scores = act.sum(axis=[2, 3])
    chosen = scores.numpy().argmax(axis=1) if target != "channel" else np.full(len(x), channel)
    picked = (scores * F.one_hot(paddle.to_tensor(chosen), scores.shape[1]).astype(scores.dtype)).sum()
    (grad,) = paddle.grad([picked], [xt])
    return grad.numpy(), chosen, logits.numpy(), patch


def count_relus(model, x: np.ndarray) -> int:
    """ReLU ops in the static program paddle.jit traces from the unpatched model."""
    static = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, *x.shape[1:]], "float32", "x")],
                                  full_graph=True)
    program = static.forward.concrete_program.main_program
    return sum(op.name().split(".")[-1] in ("relu", "relu_") for op in program.global_block().ops)


def export_onnx(model, path: Path) -> dict:
    import onnx
    import paddle2onnx

    prefix = path.parent / "static" / "model"
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]  # the name of forward's argument
    paddle.jit.save(model, str(prefix), input_spec=spec)
    program = next(p for p in prefix.parent.iterdir() if p.suffix in (".json", ".pdmodel"))
    paddle2onnx.export(str(program), str(prefix) + ".pdiparams", str(path), opset_version=OPSET)
    proto = onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    relus = [n for n in proto.graph.node if n.op_type == "Relu"]
    return {"exporter": f"paddle2onnx {paddle2onnx.__version__}", "opset": OPSET, "ops": ops,
            "relu_outputs": [n.output[0] for n in relus]}


def cmd_export(out: Path, names: list[str]) -> None:
    import paddle2onnx

    manifest = {"framework": "paddle", "versions": {"paddlepaddle": paddle.__version__,
                                                    "paddle2onnx": paddle2onnx.__version__}, "models": {}}
    for name in names:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        model = build(name)
        x = sample_input()
        info = export_onnx(model, d / "model.onnx")
        model = build(name)  # a fresh copy: jit.save leaves the layer converted to static
        info["relu_ops"] = count_relus(build(name), x)
        arrays = {"x": x}
        probe = ReluPatch("vanilla")
        with probe.installed():
            model(paddle.to_tensor(x))
        act = probe.outputs[NEURON_CALL].numpy()
        info["channel"] = int(np.argmax(act[0].sum(axis=(1, 2))))
        for target in TARGETS:
            for method in METHODS:
                grad, chosen, logits, patch = reference_maps(model, x, method, target, record=method == "vanilla",
                                                             channel=info["channel"])
                arrays[f"native_{target}_{method}"] = grad
                arrays[f"chosen_{target}"] = chosen
                arrays["logits"] = logits
                info[f"relu_calls_{target}"] = patch.calls
                if patch.record:
                    for i, a in enumerate(patch.inputs):
                        arrays[f"relu_in_{target}_{i}"] = a
        # jax2onnx-like: paddle2onnx emits nodes in trace order, so Relu node k computes ReLU call k (the
        # harness checks the choice through the targets and every gate by value)
        info.update(layer=f"relu #{NEURON_CALL}", onnx_layer=info["relu_outputs"][NEURON_CALL],
                    layer_shape=list(act.shape[1:]), layout="NCHW")
        np.savez(d / "reference.npz", **arrays)
        manifest["models"][name] = info
        print(f"[paddle] {name}: exported, {info['relu_ops']} ReLU ops, {info['relu_calls_class']} calls", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def cmd_reference(out: Path) -> None:
    def run(model, info, saved, method, target, gates):
        grad, chosen, logits, patch = reference_maps(model, saved["x"], method, target, gates, channel=info["channel"])
        if not np.array_equal(logits, saved["logits"]):
            raise RuntimeError("the rebuilt model's logits differ from the exported one's")
        return grad, chosen, patch.calls

    write_gated_references(out, "paddle", lambda name, d: build(name), run)

if __name__ == "__main__":
    main(__doc__, cmd_export, cmd_reference, list(MODELS))
