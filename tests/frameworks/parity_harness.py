"""Cross-framework parity, the main-environment half: runs a framework's side script in that framework's own
environment (.venv-tf, .venv-jax: created by tools/framework_envs.sh), runs onnx-gbp on the ONNX files it
exported, and compares our maps with the framework's own guided / deconvnet / vanilla maps.

The comparison is made sound against the float32 envelope: ONNX Runtime and the framework compute every ReLU
input in float32 with different summation orders, so a unit within rounding of its kink can take a different
gate on each side, and the maps then differ locally by far more than rounding. So the framework recomputes its
reference with the gates our forward pass took: we read every ReLU input from the very session that produced
our maps, match each to the framework's ReLU call by value, and hand them back. What remains is rounding.
The reference with the framework's own gates is kept too ("native"), and the gate flips are counted.

Used by tests/test_parity_frameworks.py and tools/parity.py.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
SIDES = Path(__file__).resolve().parent
FRAMEWORKS = {"tensorflow": ("tf", "tf_side.py"), "jax": ("jax", "jax_side.py"),
              "paddle": ("paddle", "paddle_side.py")}
METHODS = ("guided", "deconvnet", "vanilla")
TARGETS = ("class", "neuron", "channel")
#: The acceptance bar of issue 5, for every framework x model x method x target.
MAX_REL_ERROR = 1e-4
MIN_COSINE = 0.9999


class FrameworkUnavailable(RuntimeError):
    """A framework's environment could not be created: a failure, never a skip."""


def framework_python(framework: str) -> Path:
    """The framework venv's interpreter, built by tools/framework_envs.sh when missing."""
    short = FRAMEWORKS[framework][0]
    python = ROOT / f".venv-{short}" / "bin" / "python"
    if not python.exists():
        run = subprocess.run(["bash", str(ROOT / "tools" / "framework_envs.sh"), short], capture_output=True,
                             text=True)
        if run.returncode != 0 or not python.exists():
            raise FrameworkUnavailable(f"Could not create the {framework} environment .venv-{short}:\n"
                                       f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return python


def run_side(framework: str, command: str, out: Path, *args: str) -> None:
    script = SIDES / FRAMEWORKS[framework][1]
    env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
               JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([str(framework_python(framework)), str(script), command, str(out), *args],
                         capture_output=True, text=True, env=env, cwd=str(ROOT))
    if run.returncode != 0:
        raise RuntimeError(f"{script.name} {command} failed (exit {run.returncode}):\n{run.stdout[-4000:]}\n"
                           f"{run.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------------

def to_layout(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    if a.ndim != 4 or src == dst:
        return a
    return a.transpose(0, 2, 3, 1) if src == "NCHW" else a.transpose(0, 3, 1, 2)


def run_ours(path: Path, x: np.ndarray, layer: str | None = None, neuron=None):
    """Our maps, the targets used, and every ReLU-family node's input from the same ONNX Runtime session.
    The session is the Explainer's own exported model with those inputs added as outputs; its maps must equal
    `Explainer.explain`'s."""
    import onnx_gbp
    from onnx_gbp.runtime import make_session

    explainer = onnx_gbp.Explainer(str(path), methods=METHODS, layer=layer, neuron=neuron, providers="cpu")
    result = explainer.explain(x)
    model = onnx.ModelProto()
    model.CopyFrom(explainer.model)
    meta = onnx_gbp.read_metadata(model)
    relu_nodes = set(meta["relu_nodes"])
    relu_inputs = {n.name: n.input[0] for n in model.graph.node if n.name in relu_nodes}
    known = {o.name for o in model.graph.output}
    for tensor in dict.fromkeys(relu_inputs.values()):
        if tensor not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = make_session(model, "cpu")
    names = [f"saliency_{m}" for m in METHODS] + list(dict.fromkeys(relu_inputs.values()))
    feeds = {meta["input"]["name"]: x}
    if meta["target"]["target_input"]:
        feeds[meta["target"]["target_input"]] = np.full(len(x), -1, np.int64)
    values = dict(zip(names, session.run(names, feeds)))
    for m in METHODS:
        drift = float(np.max(np.abs(values[f"saliency_{m}"] - result.maps[m])))
        if drift != 0.0:
            raise AssertionError(f"{path.name}: the session with ReLU inputs as outputs moved the {m} map by {drift}")
    return result, {node: values[t] for node, t in relu_inputs.items()}, meta


def match_gates(framework_inputs: list[np.ndarray], onnx_inputs: dict[str, np.ndarray], every: bool = True,
                layout: str = "NHWC"):
    """For each ReLU call of the framework (in call order), the ONNX ReLU node computing the same tensor, by
    value, and its input in the framework's `layout`. Returns (gates, node names, flips, near-kink units).
    With `every` False, a call that matches nothing keeps the framework's own input: its ReLU lies off the
    target's path (after an intermediate target), where our backward graph has no node and the gate is moot."""
    gates, nodes, flips, near = [], [], 0, 0
    for i, a in enumerate(framework_inputs):
        best = (np.inf, True, None, None)
        scale = float(np.max(np.abs(a))) or 1.0
        for name, b in onnx_inputs.items():
            for held in ("NCHW", "NHWC"):
                c = to_layout(b, held, layout) if b.ndim == 4 else b
                if c.shape != a.shape:
                    continue
                err = float(np.max(np.abs(c - a))) / scale
                if (err, name in nodes) < best[:2]:  # twins (two ReLUs of one tensor) each take their own node
                    best = (err, name in nodes, name, c)
        best = (best[0], *best[2:])
        if (best[1] is None or best[0] > 1e-3) and not every:
            gates.append(a)
            nodes.append(None)
            continue
        if best[1] is None or best[0] > 1e-3:
            raise AssertionError(f"ReLU call {i} (shape {a.shape}) matches no ONNX ReLU input (best {best[0]:.2e})")
        err, name, c = best
        gates.append(np.ascontiguousarray(c, dtype=np.float32))
        nodes.append(name)
        flips += int(np.sum((a > 0) != (c > 0)))
        # within rounding of the kink: closer to 0 than the two float32 forward passes are to each other
        near += int(np.sum(np.abs(c) <= 4 * err * scale))
    return gates, nodes, flips, near


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Worst sample's max|ours - ref| / max|ref| and cosine similarity."""
    rel, cos = 0.0, 1.0
    for a, b in zip(ours.astype(np.float64), ref.astype(np.float64)):
        denom = np.max(np.abs(b))
        rel = max(rel, float(np.max(np.abs(a - b)) / denom) if denom > 0 else float(np.max(np.abs(a))))
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos = min(cos, float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else float(na == nb))
    return rel, cos


@dataclass
class Row:
    framework: str
    model: str
    method: str
    target: str
    rel: float
    cos: float
    native_rel: float
    native_cos: float
    exporter: str
    opset: int
    flips: int
    near: int
    relus: int
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.rel <= MAX_REL_ERROR and self.cos >= MIN_COSINE


@dataclass
class FrameworkRun:
    framework: str
    versions: dict
    rows: list[Row] = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # model -> facts checked along the way (targets, coverage, ...)
    traps: list[Row] = field(default_factory=list)  # known-bad variants kept for the report


def run_framework(framework: str, out: Path, models: list[str] | None = None) -> FrameworkRun:
    """Export, reference, ours, gated reference, compare: the whole parity run for one framework."""
    out.mkdir(parents=True, exist_ok=True)
    run_side(framework, "export", out, *(models or []))
    manifest = json.loads((out / "manifest.json").read_text())
    ours_all = {}
    for name, info in manifest["models"].items():
        d = out / name
        ref = np.load(d / "reference.npz")
        x = ref["x"]
        per_target = {}
        for target in TARGETS:
            layer = info["onnx_layer"] if target != "class" else None
            neuron = {"class": None, "neuron": "max", "channel": info["channel"]}[target]
            result, onnx_inputs, meta = run_ours(d / "model.onnx", x, layer, neuron)
            calls = [ref[f"relu_in_{target}_{i}"] for i in range(info[f"relu_calls_{target}"])]
            gates, nodes, flips, near = match_gates(calls, onnx_inputs, every=target == "class",
                                                    layout=info.get("layout", "NHWC"))
            np.savez(d / f"gates_{target}.npz", **{f"g{i}": g for i, g in enumerate(gates)})
            per_target[target] = (result, nodes, flips, near, meta)
        ours_all[name] = per_target
    run_side(framework, "reference", out)

    fr = FrameworkRun(framework, manifest["versions"])
    for name, info in manifest["models"].items():
        d = out / name
        ref, gated = np.load(d / "reference.npz"), np.load(d / "reference_gated.npz")
        relu_nodes = len(ours_all[name]["class"][4]["relu_nodes"])
        check = {"relu_ops": info["relu_ops"], "relu_calls": info["relu_calls_class"], "onnx_relu_nodes": relu_nodes,
                 "onnx_layer": info["onnx_layer"], "layer": info["layer"], "ops": info["ops"],
                 "onnx_layer_layout": onnx_layer_layout(d / "model.onnx", info)[0], "channel": info["channel"]}
        for target in TARGETS:
            result, nodes, flips, near, meta = ours_all[name][target]
            want = ref[f"chosen_{target}"]
            got = result.targets
            if target == "neuron":
                got = _flat_index_in(got, d / "model.onnx", info)
            check[f"targets_{target}"] = (got.tolist(), want.tolist())
            check[f"matched_nodes_{target}"] = len(set(nodes) - {None})
            check[f"gated_chosen_{target}"] = gated[f"gated_chosen_{target}"].tolist()
            for method in METHODS:
                ours = to_layout(result.maps[method], meta["input"]["layout"], info.get("layout", "NHWC"))
                rel, cos = compare(ours, gated[f"gated_{target}_{method}"])
                nrel, ncos = compare(ours, ref[f"native_{target}_{method}"])
                fr.rows.append(Row(framework, name, method, target, rel, cos, nrel, ncos, info["exporter"],
                                   info["opset"], flips, near, info["relu_calls_class"]))
        fr.checks[name] = check
        if "merged" in info:  # the exporter's default optimisers: twin ReLUs merged into one node
            result, _, _ = run_ours(d / "model_merged.onnx", ref["x"])
            for method in METHODS:
                rel, cos = compare(result.maps[method], gated[f"gated_class_{method}"])
                fr.traps.append(Row(framework, name, method, "class", rel, cos, np.nan, np.nan,
                                    info["merged"]["exporter"], info["merged"]["opset"], 0, 0,
                                    info["merged"]["ops"].get("Relu", 0),
                                    note="tf2onnx default optimisers (merge_duplication on)"))
    return fr


def onnx_layer_layout(path: Path, info: dict) -> tuple[str, tuple]:
    """The layout in which the ONNX graph holds the framework's target layer, and its ONNX shape."""
    from onnx_gbp.model import normalise

    dims = tuple(normalise(str(path)).shape(info["onnx_layer"])[1:])
    shape = tuple(info["layer_shape"])
    if info.get("layout", "NHWC") == "NCHW":
        nchw = shape
        nhwc = (*shape[1:], shape[0]) if len(shape) == 3 else shape
    else:
        nhwc = shape
        nchw = (nhwc[-1], *nhwc[:-1]) if len(nhwc) == 3 else nhwc
    if nhwc == nchw or dims not in (nhwc, nchw):
        if dims == nhwc:
            return "NHWC", dims
        raise AssertionError(f"ONNX tensor {info['onnx_layer']!r} {dims} cannot be told apart from or matched "
                             f"to the framework's layer {nhwc}")
    return ("NHWC" if dims == nhwc else "NCHW"), dims


def _flat_index_in(flat: np.ndarray, path: Path, info: dict) -> np.ndarray:
    """Our flat neuron index (in the ONNX tensor's layout) as a flat index in the framework's layout."""
    layout, shape = onnx_layer_layout(path, info)
    if layout == info.get("layout", "NHWC") or len(shape) != 3:
        return flat
    perm = [1, 2, 0] if layout == "NCHW" else [2, 0, 1]
    pos = np.stack(np.unravel_index(flat, shape), axis=1)[:, perm]
    return np.ravel_multi_index(tuple(pos.T), tuple(shape[i] for i in perm))
