"""Look inside a model before explaining it: the layers one can target, which operators have gradient rules,
and a self-check of the vanilla gradient against finite differences."""
from __future__ import annotations

import ast
import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from .backward import path_nodes
from .export import read_metadata
from .model import ForwardGraph, ModelLike, normalise
from .rules import RULES
from .runtime import Explainer, make_session

#: Finite-difference step in float64, and the steps tried in float32 (per pixel; inputs have unit scale).
STEP64 = 1e-6
STEPS = np.logspace(-1, -5, 9)
#: Agreement the self-check asks for, by precision of the differences (see `gradient_check`).
TOLERANCE = {"float64": 1e-3, "float32": 5e-2}
#: Ops that keep "this came out of a ReLU" true: the value is still a (rearranged or pooled) ReLU output.
_KEEPS_RELU = {"MaxPool", "GlobalMaxPool", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


@dataclass
class Layer:
    tensor: str
    node: str
    op: str
    shape: tuple
    relu: str  # "" | "Relu" | "Clip[0,6]" | "Max(x,0)" | "after Relu" ...
    scope: str = ""  # the PyTorch module, where the exporter recorded it


def relu_kind(fwd: ForwardGraph, node: onnx.NodeProto) -> str:
    """How `node` is a ReLU (the methods' rule applies to it), or "" if it is not: Relu, Clip with min 0
    (ReLU6 and friends), Max(x, 0)."""
    if node.op_type == "Relu":
        return "Relu"
    if node.op_type == "Clip" and len(node.input) > 1:
        low = fwd.const_value(node.input[1])
        high = fwd.const_value(node.input[2]) if len(node.input) > 2 else None
        if low is not None and np.all(low == 0):
            return f"Clip[0,{float(high):g}]" if high is not None and np.size(high) == 1 else "Clip[0,)"
    if node.op_type == "Max" and len(node.input) == 2:
        values = [fwd.const_value(i) for i in node.input]
        if any(v is not None and np.all(v == 0) for v in values):
            return "Max(x,0)"
    return ""


def layers(model: ModelLike, input_name: str | None = None, input_shape: Sequence[int] | None = None) -> list[Layer]:
    """Every float tensor a node produces, in graph order, with its shape and whether it is (or directly
    carries) a ReLU output."""
    fwd = normalise(model, input_name, tuple(input_shape) if input_shape is not None else None)
    after: dict[str, str] = {}
    out = []
    for node in fwd.graph.node:
        kind = relu_kind(fwd, node)
        if not kind and node.op_type in _KEEPS_RELU and node.input and node.input[0] in after:
            kind = "after " + after[node.input[0]].removeprefix("after ")
        for name in node.output:
            if not name or not fwd.is_float(name):
                continue
            if kind:
                after[name] = kind
            out.append(Layer(name, node.name, node.op_type, fwd.shapes.get(name, ()), kind, _scope(node)))
    return out


def _scope(node: onnx.NodeProto) -> str:
    """The module path the PyTorch exporter stored (`pkg.torch.onnx.name_scopes`), e.g. 'layer1.0.conv2'."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) > 1 else ""
    return ""


# -- coverage -------------------------------------------------------------------------------------------------
@dataclass
class Coverage:
    fwd: ForwardGraph
    sinks: list[str]
    counts: Counter = field(default_factory=Counter)  # op type -> nodes on the path
    missing: dict[str, list[str]] = field(default_factory=dict)  # op type -> node names without a rule
    relu_nodes: int = 0


def coverage(model: ModelLike, input_name: str | None = None, input_shape: Sequence[int] | None = None,
             outputs: Sequence[str] | None = None) -> Coverage:
    """Which operators lie between the image input and the outputs, and which of them have no gradient rule."""
    fwd = normalise(model, input_name, tuple(input_shape) if input_shape is not None else None)
    sinks = list(outputs or [o.name for o in fwd.graph.output])
    nodes, _ = path_nodes(fwd, fwd.input_name, set(sinks))
    cov = Coverage(fwd, sinks)
    for node in nodes:
        standard = node.domain in ("", "ai.onnx")
        label = node.op_type if standard else f"{node.domain}.{node.op_type}"
        cov.counts[label] += 1
        cov.relu_nodes += bool(relu_kind(fwd, node))
        if not standard or node.op_type not in RULES:
            cov.missing.setdefault(label, []).append(node.name)
    return cov


# -- gradient self-check --------------------------------------------------------------------------------------
@dataclass
class GradientCheck:
    target: int
    tensor: str
    analytic: np.ndarray  # grad . v per direction
    numeric: np.ndarray  # central differences per direction
    steps: np.ndarray  # the step each difference used
    precision: str  # of the finite differences: "float64" (reference evaluator) or "float32" (ONNX Runtime)

    @property
    def errors(self) -> np.ndarray:
        """|numeric - analytic| per direction, relative to the RMS of the analytic values (one direction can
        be nearly orthogonal to the gradient, so its own value is no scale)."""
        return np.abs(self.numeric - self.analytic) / (np.sqrt((self.analytic ** 2).mean()) + 1e-30)

    @property
    def cosine(self) -> float:
        a, n = self.analytic, self.numeric
        return float(a @ n / (np.linalg.norm(a) * np.linalg.norm(n) + 1e-30))

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.precision]

    def passed(self) -> bool:
        return bool(self.errors.max() <= self.tolerance)


def gradient_check(model: ModelLike, directions: int = 6, seed: int = 0, input_name: str | None = None,
                   input_shape: Sequence[int] | None = None, output: str | None = None) -> GradientCheck:
    """The vanilla map g of one random input x (ONNX Runtime, float32), projected on random directions v,
    against central differences (f(x + e v) - f(x - e v)) / 2e of the explained score f.

    The differences run in float64 on ONNX's reference evaluator where it can run the model: with e = 1e-6
    no ReLU kink is crossed and rounding is ~1e-9, so what remains is the float32 rounding of g itself. Where
    it cannot, they run in float32 on ONNX Runtime over steps 1e-1..1e-5, keeping per direction the two
    neighbouring steps that agree best with each other (never looking at g); those figures reach ~1e-2.
    Random normal inputs have no exact ties, so no MaxPool tie is measured instead of the gradient.
    """
    explainer = Explainer(model, method="vanilla", output=output, input_name=input_name,
                          input_shape=input_shape, optimization="disable")
    shape = (1, *explainer.input_shape[1:])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    result = explainer.explain(x)
    target = int(result.targets[0])
    grad = result.maps["vanilla"][0].astype(np.float64)
    tensor = read_metadata(explainer.model)["target"]["tensor"]
    vs = rng.standard_normal((directions, *shape[1:]))
    vs /= np.sqrt((vs ** 2).mean(axis=tuple(range(1, vs.ndim)), keepdims=True))  # unit RMS per pixel
    analytic = np.array([(grad * v).sum() for v in vs])
    numeric, steps = np.empty(directions), np.empty(directions)
    score64 = _score_float64(model, tensor, target, input_name, shape)
    score32 = None if score64 else _score_function(model, tensor, target, input_name, shape)
    if score64:  # all directions in one call
        e = STEP64
        values = score64(np.concatenate([x + e * vs, x - e * vs]))
        numeric[:], steps[:] = (values[:directions] - values[directions:]) / (2 * e), e
    for d, v in enumerate(vs):
        if not score64:
            fd = np.array([(score32((x + e * v).astype(np.float32)) - score32((x - e * v).astype(np.float32)))
                           / (2 * e) for e in STEPS])
            k = int(np.argmin(np.abs(np.diff(fd))))
            numeric[d], steps[d] = (fd[k] + fd[k + 1]) / 2, STEPS[k + 1]
    return GradientCheck(target, tensor, analytic, numeric, steps, "float64" if score64 else "float32")


def _score_float64(model: ModelLike, tensor: str, target: int, input_name: str | None, shape: tuple):
    """f in float64 on onnx.reference, or None when the reference evaluator cannot run this model."""
    from onnx.reference import ReferenceEvaluator

    try:
        fwd = normalise(model, input_name, shape)
        if fwd.fixed_batch:
            return None
        forward = _as_float64(_with_output(fwd, tensor))
        evaluator = ReferenceEvaluator(forward, new_ops=[_conv_op()])
        x = np.zeros(shape, np.float64)
        evaluator.run([tensor], {fwd.input_name: x})
    except Exception:  # any op or dtype the reference evaluator lacks: fall back to float32 differences
        return None

    def score(batch: np.ndarray) -> np.ndarray:
        out = np.asarray(evaluator.run([tensor], {fwd.input_name: batch.astype(np.float64)})[0])
        return out.reshape(len(batch), -1)[:, target]
    return score


def _conv_op():
    """Conv for onnx.reference as one einsum over strided windows per sample: the evaluator's own Conv loops
    over batch and groups, and takes seconds per float64 pass of a depthwise network like EfficientNet."""
    from numpy.lib.stride_tricks import sliding_window_view
    from onnx.reference.op_run import OpRun

    class Conv(OpRun):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            n = X.ndim - 2
            kernel, d = W.shape[2:], list(dilations or [1] * n)
            s, g = list(strides or [1] * n), int(group or 1)
            span = [(k - 1) * di + 1 for k, di in zip(kernel, d)]
            mode = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
            if mode in ("SAME_UPPER", "SAME_LOWER"):
                total = [max(0, (-(-size // si) - 1) * si + sp - size) for size, si, sp in zip(X.shape[2:], s, span)]
                small = [t // 2 for t in total]
                before = small if mode == "SAME_UPPER" else [t - m for t, m in zip(total, small)]
                p = before + [t - b for t, b in zip(total, before)]
            else:
                p = list(pads or [0] * 2 * n) if mode == "NOTSET" else [0] * 2 * n
            xp = np.pad(X, [(0, 0), (0, 0)] + [(p[i], p[i + n]) for i in range(n)])
            axes = tuple(range(2, 2 + n))
            win = sliding_window_view(xp, span, axis=axes)
            win = win[(Ellipsis, *[slice(None, None, di) for di in d])]  # dilation inside each window
            win = win[(slice(None), slice(None), *[slice(None, None, si) for si in s])]  # strides between windows
            out_shape = win.shape[2:2 + n]
            m, c = W.shape[0], X.shape[1]
            w = W.reshape(g, m // g, c // g, *kernel)
            o, k = "xyzuvw"[:n], "abcdef"[:n]
            y = np.stack([np.einsum(f"gc{o}{k},gmc{k}->gm{o}", win[i].reshape(g, c // g, *win.shape[2:]), w,
                                    optimize=True).reshape(m, *out_shape) for i in range(len(X))])
            if B is not None:
                y = y + B.reshape(1, m, *[1] * n)
            return (y.astype(X.dtype),)

    return Conv


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64: float initializers, constants, casts and declared types."""
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type in floats:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    for init in model.graph.initializer:
        widen(init)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in floats:
                attr.i = TensorProto.DOUBLE
    del model.graph.value_info[:]
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type in floats:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    return model


def _with_output(fwd: ForwardGraph, tensor: str) -> onnx.ModelProto:
    forward = copy.deepcopy(fwd.model)
    if tensor not in {o.name for o in forward.graph.output}:
        forward.graph.output.append(onnx.helper.make_tensor_value_info(tensor, fwd.dtypes[tensor], None))
    return forward


def _score_function(model: ModelLike, tensor: str, target: int, input_name: str | None, shape: tuple):
    """f(x) = the explained tensor's entry `target`, per sample, from the unmodified forward graph."""
    fwd = normalise(model, input_name, shape)
    session = make_session(_with_output(fwd, tensor), "cpu", optimization="disable")

    def score(sample: np.ndarray) -> float:  # one sample at a time: some graphs fix their batch size
        return float(session.run([tensor], {fwd.input_name: sample})[0].reshape(-1)[target])

    return score
