"""One vector-Jacobian rule per ONNX operator type.

A rule reads like a formula over a small vocabulary (after ONNX Runtime's gradient builder):
`s.x(i)` is the node's i-th input, `s.y(i)` its i-th output, `s.dy(i)` the gradient arriving at output i,
and the rule returns the gradient of each input (None where no gradient is needed or defined).
`s.op("Mul", a, b)` emits a node and names its output. Only inputs on the path from the image get gradients
(`s.needs(i)`); weights never do.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from . import methods
from .builder import GraphBuilder
from .model import ForwardGraph

Grads = Sequence[str | None]
Rule = Callable[["Step"], Grads]
RULES: dict[str, Rule] = {}


class UnsupportedVariant(Exception):
    """This node uses an attribute or input combination that its op's rule does not handle."""


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
        return fn
    return register


class Step:
    """The view of one forward node that its rule works with."""

    def __init__(self, fwd: ForwardGraph, b: GraphBuilder, node: onnx.NodeProto, dys: list[str | None],
                 needs: list[bool], method: str):
        self.fwd, self.b, self.node, self.method = fwd, b, node, method
        self._dys, self._needs = dys, needs
        self.op, self.memo = b.op, b.memo

    # -- the node ---------------------------------------------------------------------------------------
    def x(self, i: int = 0) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def y(self, i: int = 0) -> str:
        return self.node.output[i] if i < len(self.node.output) else ""

    def dy(self, i: int = 0) -> str | None:
        return self._dys[i] if i < len(self._dys) else None

    def needs(self, i: int) -> bool:
        return i < len(self._needs) and self._needs[i]

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def shape(self, name: str) -> tuple:
        return self.fwd.shape(name)

    def rank(self, name: str) -> int:
        return self.fwd.rank(name)

    def value(self, name: str) -> np.ndarray | None:
        return self.fwd.const_value(name)

    def ints(self, i: int, attr: str | None = None, default: Sequence[int] | None = None) -> list[int] | None:
        """An integer list given as attribute `attr` (older opsets) or as constant input i (newer ones)."""
        if attr is not None and self.attr(attr) is not None:
            return [int(v) for v in self.attr(attr)]
        if self.x(i):
            value = self.value(self.x(i))
            if value is None:
                self.fail(f"input {i} ({self.x(i)!r}) must be a constant")
            return [int(v) for v in np.asarray(value).reshape(-1)]
        return None if default is None else list(default)

    def fail(self, why: str) -> None:
        raise UnsupportedVariant(why)

    # -- emitting ---------------------------------------------------------------------------------------
    def dtype(self, like: str) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.fwd.dtypes.get(like, onnx.TensorProto.FLOAT))

    def const(self, value: Any, like: str) -> str:
        """A constant in the float type of tensor `like`."""
        return self.b.const(value, self.dtype(like))

    def zero(self, like: str) -> str:
        return self.const(0.0, like)

    def zeros_like(self, name: str) -> str:
        return self.op("ConstantOfShape", self.shape_of(name),
                       value=helper.make_tensor("zero", self.fwd.dtypes[name], [1], [0]))

    def shape_of(self, name: str) -> str:
        return self.memo(("shape", name), lambda: self.op("Shape", name))

    def static_dims(self, name: str) -> list[int]:
        """The shape of `name` for Reshape: static sizes, -1 for its one dynamic (batch) dimension."""
        dims = self.shape(name)
        if sum(d is None for d in dims) > 1:
            return []
        return [-1 if d is None else d for d in dims]

    def reshape_to(self, g: str, like: str) -> str:
        dims = self.static_dims(like)
        return self.op("Reshape", g, self.b.ints(dims) if dims else self.shape_of(like))

    def unbroadcast(self, g: str, like: str) -> str:
        """Sum the gradient `g` (shaped like this node's output) over the axes along which `like` was broadcast."""
        target, out = self.shape(like), self.shape(self.y())
        lead = len(out) - len(target)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(target) if d == 1 and out[lead + i] != 1]
        if axes:
            g = self.op("ReduceSum", g, self.b.ints(axes), keepdims=1)
        if lead or len(self.shape(like)) != len(out):
            g = self.reshape_to(g, like)
        return g

    def expand_to(self, g: str, like: str) -> str:
        """Broadcast `g` up to the shape of `like` (a dynamic batch broadcasts from 1)."""
        return self.op("Expand", g, self.b.ints([1 if d is None else d for d in self.shape(like)]))

    def reduce_mean(self, t: str, axes: Sequence[int], like: str) -> str:
        count = int(np.prod([self.shape(like)[a] for a in axes]))
        return self.op("Mul", self.op("ReduceSum", t, self.b.ints(axes), keepdims=1), self.const(1.0 / count, like))

    def along_axis(self, g: str, matrix: np.ndarray, axis: int, like: str) -> str:
        """out[..., i, ...] = sum_k g[..., k, ...] * matrix[k, i] along `axis` (the transpose of a linear map)."""
        rank = len(self.shape(like))
        axis %= rank
        if axis == rank - 1:
            return self.op("MatMul", g, self.const(matrix, like))
        if axis == rank - 2:
            return self.op("MatMul", self.const(np.ascontiguousarray(matrix.T), like), g)
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        moved = self.op("MatMul", self.op("Transpose", g, perm=perm), self.const(matrix, like))
        return self.op("Transpose", moved, perm=perm)

    def relu(self, y: str, dy: str, upper: str | None = None) -> str:
        """The method's rule at a ReLU-family node with output `y` (see methods.relu_rule)."""
        return methods.relu_rule(self, y, dy, upper)


def _normalize_axes(axes: Sequence[int], rank: int) -> list[int]:
    return sorted(a % rank for a in axes)


def _explicit_pads(s: Step, in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                   dilations: Sequence[int]) -> list[int]:
    """Explicit [begins..., ends...] pads of a Conv/Pool node, resolving auto_pad from the static input shape."""
    n = len(in_spatial)
    auto_pad = s.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return list(s.attr("pads", [0] * 2 * n))
    if auto_pad == "VALID":
        return [0] * 2 * n
    begins, ends = [], []
    for size, k, st, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // st)
        total = max(0, (out - 1) * st + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _conv_geometry(s: Step, weight: str) -> tuple[list[int], list[int], list[int], list[int]]:
    in_spatial = s.shape(s.x())[2:]
    kernel = list(s.attr("kernel_shape", s.shape(weight)[2:]))
    n = len(kernel)
    strides = list(s.attr("strides", [1] * n))
    dilations = list(s.attr("dilations", [1] * n))
    return kernel, strides, dilations, _explicit_pads(s, in_spatial, kernel, strides, dilations)


# ---------------------------------------------------------------------------------------------------------
# ReLU family: the method's rule replaces the derivative
# ---------------------------------------------------------------------------------------------------------

def _is_zero(s: Step, name: str) -> bool:
    v = s.value(name)
    return v is not None and v.size > 0 and bool(np.all(v == 0))


@rule("Relu")
def _relu(s: Step) -> Grads:
    return [s.relu(s.y(), s.dy())]


@rule("Clip")
def _clip(s: Step) -> Grads:
    lo = s.x(1) if s.x(1) else None
    hi = s.x(2) if s.x(2) else None
    if s.attr("min") is not None or s.attr("max") is not None:  # opset < 11 form, normally converted away
        s.fail("Clip with min/max attributes (opset < 11)")
    if lo is not None and _is_zero(s, lo):  # ReLU, or ReLU6 = min(ReLU(x), 6)
        return [s.relu(s.y(), s.dy(), upper=hi)]
    inside = None
    if lo is not None:
        inside = s.op("GreaterOrEqual", s.x(), lo)
    if hi is not None:
        upper = s.op("LessOrEqual", s.x(), hi)
        inside = upper if inside is None else s.op("And", inside, upper)
    return [s.dy() if inside is None else s.op("Where", inside, s.dy(), s.zero(s.x()))]


@rule("Max", "Min")
def _max_min(s: Step) -> Grads:
    inputs = list(s.node.input)
    if s.node.op_type == "Max" and len(inputs) == 2:
        for i, other in ((0, 1), (1, 0)):
            if _is_zero(s, inputs[other]) and s.shape(inputs[i]) == s.shape(s.y()):
                return [s.relu(s.y(), s.dy()) if k == i else None for k in range(2)]
    if len(inputs) == 1:
        return [s.dy()]
    # Ties share the gradient equally, as torch.maximum / torch.minimum do.
    hits = [s.op("Cast", s.op("Equal", name, s.y()), to=s.fwd.dtypes[s.y()]) for name in inputs]
    share = s.op("Div", s.dy(), s.op("Sum", *hits))
    return [s.unbroadcast(s.op("Mul", share, hit), name) if s.needs(i) else None
            for i, (name, hit) in enumerate(zip(inputs, hits))]


# ---------------------------------------------------------------------------------------------------------
# Other activations keep their true derivative
# ---------------------------------------------------------------------------------------------------------

@rule("LeakyRelu")
def _leaky_relu(s: Step) -> Grads:
    positive = s.op("Greater", s.x(), s.zero(s.x()))
    return [s.op("Where", positive, s.dy(), s.op("Mul", s.dy(), s.const(s.attr("alpha", 0.01), s.x())))]


@rule("PRelu")
def _prelu(s: Step) -> Grads:
    if s.needs(1):
        s.fail("PRelu slope computed from the input")
    positive = s.op("Greater", s.x(), s.zero(s.x()))
    return [s.op("Where", positive, s.dy(), s.op("Mul", s.dy(), s.x(1)))]


@rule("Sigmoid")
def _sigmoid(s: Step) -> Grads:  # dy * y * (1 - y)
    return [s.op("Mul", s.dy(), s.op("Mul", s.y(), s.op("Sub", s.const(1.0, s.y()), s.y())))]


@rule("Tanh")
def _tanh(s: Step) -> Grads:  # dy * (1 - y^2)
    return [s.op("Mul", s.dy(), s.op("Sub", s.const(1.0, s.y()), s.op("Mul", s.y(), s.y())))]


@rule("HardSigmoid")
def _hard_sigmoid(s: Step) -> Grads:  # dy * alpha * [0 < alpha x + beta < 1]
    alpha, beta = s.attr("alpha", 0.2), s.attr("beta", 0.5)
    t = s.op("Add", s.op("Mul", s.x(), s.const(alpha, s.x())), s.const(beta, s.x()))
    inside = s.op("And", s.op("Greater", t, s.zero(s.x())), s.op("Less", t, s.const(1.0, s.x())))
    return [s.op("Where", inside, s.op("Mul", s.dy(), s.const(alpha, s.x())), s.zero(s.x()))]


@rule("HardSwish")
def _hard_swish(s: Step) -> Grads:  # y = x * hs(x): dy * (hs(x) + x/6 * [-3 < x < 3])
    x = s.x()
    hs = s.op("HardSigmoid", x, alpha=1.0 / 6, beta=0.5)
    inside = s.op("And", s.op("Greater", x, s.const(-3.0, x)), s.op("Less", x, s.const(3.0, x)))
    slope = s.op("Where", inside, s.op("Mul", x, s.const(1.0 / 6, x)), s.zero(x))
    return [s.op("Mul", s.dy(), s.op("Add", hs, slope))]


@rule("Softplus")
def _softplus(s: Step) -> Grads:  # dy * sigmoid(x)
    return [s.op("Mul", s.dy(), s.op("Sigmoid", s.x()))]


@rule("Erf")
def _erf(s: Step) -> Grads:  # dy * 2/sqrt(pi) * exp(-x^2)
    x = s.x()
    g = s.op("Exp", s.op("Neg", s.op("Mul", x, x)))
    return [s.op("Mul", s.dy(), s.op("Mul", g, s.const(2.0 / math.sqrt(math.pi), x)))]


@rule("Gelu")
def _gelu(s: Step) -> Grads:
    x = s.x()
    c = lambda v: s.const(v, x)  # noqa: E731
    approximate = s.attr("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate == "tanh":  # y = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        k = math.sqrt(2.0 / math.pi)
        x2 = s.op("Mul", x, x)
        u = s.op("Mul", c(k), s.op("Mul", x, s.op("Add", c(1.0), s.op("Mul", c(0.044715), x2))))
        t = s.op("Tanh", u)
        du = s.op("Mul", c(k), s.op("Add", c(1.0), s.op("Mul", c(3 * 0.044715), x2)))
        sech2 = s.op("Sub", c(1.0), s.op("Mul", t, t))
        d = s.op("Add", s.op("Mul", c(0.5), s.op("Add", c(1.0), t)),
                 s.op("Mul", s.op("Mul", c(0.5), x), s.op("Mul", sech2, du)))
    else:  # y = x Phi(x): Phi(x) + x phi(x)
        cdf = s.op("Mul", c(0.5), s.op("Add", c(1.0), s.op("Erf", s.op("Mul", x, c(1 / math.sqrt(2.0))))))
        pdf = s.op("Mul", c(1 / math.sqrt(2 * math.pi)), s.op("Exp", s.op("Mul", c(-0.5), s.op("Mul", x, x))))
        d = s.op("Add", cdf, s.op("Mul", x, pdf))
    return [s.op("Mul", s.dy(), d)]


@rule("Softmax")
def _softmax(s: Step) -> Grads:  # y * (dy - sum(dy * y))
    axis = s.attr("axis", -1) % s.rank(s.y())
    inner = s.op("ReduceSum", s.op("Mul", s.dy(), s.y()), s.b.ints([axis]), keepdims=1)
    return [s.op("Mul", s.y(), s.op("Sub", s.dy(), inner))]


@rule("LogSoftmax")
def _log_softmax(s: Step) -> Grads:  # dy - exp(y) * sum(dy)
    axis = s.attr("axis", -1) % s.rank(s.y())
    total = s.op("ReduceSum", s.dy(), s.b.ints([axis]), keepdims=1)
    return [s.op("Sub", s.dy(), s.op("Mul", s.op("Exp", s.y()), total))]


# ---------------------------------------------------------------------------------------------------------
# Elementwise arithmetic (with broadcasting)
# ---------------------------------------------------------------------------------------------------------

@rule("Add")
def _add(s: Step) -> Grads:
    return [s.unbroadcast(s.dy(), s.x(i)) if s.needs(i) else None for i in range(2)]


@rule("Sum")
def _sum(s: Step) -> Grads:
    return [s.unbroadcast(s.dy(), name) if s.needs(i) else None for i, name in enumerate(s.node.input)]


@rule("Sub")
def _sub(s: Step) -> Grads:
    return [s.unbroadcast(s.dy(), s.x(0)) if s.needs(0) else None,
            s.unbroadcast(s.op("Neg", s.dy()), s.x(1)) if s.needs(1) else None]


@rule("Mul")
def _mul(s: Step) -> Grads:
    return [s.unbroadcast(s.op("Mul", s.dy(), s.x(1)), s.x(0)) if s.needs(0) else None,
            s.unbroadcast(s.op("Mul", s.dy(), s.x(0)), s.x(1)) if s.needs(1) else None]


@rule("Div")
def _div(s: Step) -> Grads:  # y = a / b: da = dy / b, db = -dy * y / b
    a, b = s.x(0), s.x(1)
    return [s.unbroadcast(s.op("Div", s.dy(), b), a) if s.needs(0) else None,
            s.unbroadcast(s.op("Neg", s.op("Div", s.op("Mul", s.dy(), s.y()), b)), b) if s.needs(1) else None]


@rule("Neg")
def _neg(s: Step) -> Grads:
    return [s.op("Neg", s.dy())]


@rule("Abs")
def _abs(s: Step) -> Grads:
    return [s.op("Mul", s.dy(), s.op("Sign", s.x()))]


@rule("Exp")
def _exp(s: Step) -> Grads:
    return [s.op("Mul", s.dy(), s.y())]


@rule("Log")
def _log(s: Step) -> Grads:
    return [s.op("Div", s.dy(), s.x())]


@rule("Sqrt")
def _sqrt(s: Step) -> Grads:  # dy / (2 y)
    return [s.op("Div", s.op("Mul", s.dy(), s.const(0.5, s.y())), s.y())]


@rule("Reciprocal")
def _reciprocal(s: Step) -> Grads:  # -dy * y^2
    return [s.op("Neg", s.op("Mul", s.dy(), s.op("Mul", s.y(), s.y())))]


@rule("Pow")
def _pow(s: Step) -> Grads:  # dy * p * x^(p-1), p constant
    if s.needs(1):
        s.fail("Pow with an exponent computed from the input")
    p = s.value(s.x(1))
    if p is None:
        s.fail("Pow with a non-constant exponent")
    p = float(np.asarray(p).reshape(-1)[0]) if np.asarray(p).size == 1 else None
    if p is None:
        s.fail("Pow with a non-scalar exponent")
    x = s.x()
    power = x if p == 2.0 else s.op("Pow", x, s.const(p - 1.0, x))
    return [s.op("Mul", s.dy(), s.op("Mul", power, s.const(p, x)))]


@rule("Where")
def _where(s: Step) -> Grads:
    cond, a, b = s.x(0), s.x(1), s.x(2)
    zero = s.zero(s.y())
    return [None,
            s.unbroadcast(s.op("Where", cond, s.dy(), zero), a) if s.needs(1) else None,
            s.unbroadcast(s.op("Where", cond, zero, s.dy()), b) if s.needs(2) else None]


# ---------------------------------------------------------------------------------------------------------
# Shape and data movement: the gradient moves back the way the data came
# ---------------------------------------------------------------------------------------------------------

@rule("Identity", "Dropout")
def _identity(s: Step) -> Grads:
    return [s.dy()]


@rule("Cast")
def _cast(s: Step) -> Grads:
    return [s.op("Cast", s.dy(), to=s.fwd.dtypes[s.x()])]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(s: Step) -> Grads:
    return [s.reshape_to(s.dy(), s.x())]


@rule("Transpose")
def _transpose(s: Step) -> Grads:
    perm = s.attr("perm", list(reversed(range(s.rank(s.x())))))
    return [s.op("Transpose", s.dy(), perm=[int(i) for i in np.argsort(perm)])]


@rule("Expand")
def _expand(s: Step) -> Grads:
    return [s.unbroadcast(s.dy(), s.x())]


@rule("Concat")
def _concat(s: Step) -> Grads:
    axis = s.attr("axis") % s.rank(s.y())
    sizes = [s.shape(name)[axis] for name in s.node.input]
    if None in sizes:
        s.fail("Concat along the batch axis")
    parts = s.op("Split", s.dy(), s.b.ints(sizes), axis=axis, outputs=len(sizes))
    parts = parts if isinstance(parts, list) else [parts]
    return [part if s.needs(i) else None for i, part in enumerate(parts)]


@rule("Split")
def _split(s: Step) -> Grads:
    axis = s.attr("axis", 0) % s.rank(s.x())
    pieces = [s.dy(i) if s.dy(i) else s.zeros_like(s.y(i)) for i in range(len(s.node.output))]
    return [s.op("Concat", *pieces, axis=axis)]


#: Exporters write INT32_MAX or INT64_MAX for "to the end" of an axis whose size they do not know.
_TO_THE_END = 2 ** 31 - 1


def _slice_positions(start: int, end: int, step: int, size: int) -> list[int]:
    return list(range(size))[slice(start, end, step)]


@rule("Slice")
def _slice(s: Step) -> Grads:
    x_shape = s.shape(s.x())
    rank = len(x_shape)
    starts, ends = s.ints(1), s.ints(2)
    axes = s.ints(3, default=range(len(starts)))
    steps = s.ints(4, default=[1] * len(starts))
    g = s.dy()
    begins, finals = [0] * rank, [0] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= rank
        size = x_shape[axis]
        if size is None:
            if step == 1 and (start == 0 or start <= -_TO_THE_END) and end >= _TO_THE_END:
                continue  # the whole (dynamic) batch axis, as exporters slice every axis: nothing to undo
            s.fail("Slice along the batch axis")
        kept = _slice_positions(start, end, step, size)
        if step == 1 and kept:
            begins[axis], finals[axis] = kept[0], size - 1 - kept[-1]
        else:  # any stride or direction: scatter back through a 0/1 matrix
            matrix = np.zeros((len(kept), size), np.float32)
            matrix[np.arange(len(kept)), kept] = 1.0
            g = s.along_axis(g, matrix, axis, s.x())
    if any(begins) or any(finals):
        g = s.op("Pad", g, s.b.ints(begins + finals))
    return [g]


@rule("Pad")
def _pad(s: Step) -> Grads:
    x_shape = s.shape(s.x())
    rank = len(x_shape)
    mode = s.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = s.ints(1, attr="pads")
    axes = [a % rank for a in (s.ints(3) or range(rank))]
    g = s.dy()
    for k, axis in enumerate(axes):
        before, after = pads[k], pads[k + len(axes)]
        if before == 0 and after == 0:
            continue
        size = x_shape[axis]
        if size is None:
            s.fail("Pad along the batch axis")
        positions = np.arange(-before, size + after)  # padded position -> source position (or none)
        if mode == "constant":
            source = np.where((positions >= 0) & (positions < size), positions, -1)
        elif mode == "edge":
            source = np.clip(positions, 0, size - 1)
        elif mode == "reflect":
            period = 2 * (size - 1)
            folded = np.abs(positions) % period if size > 1 else np.zeros_like(positions)
            source = np.where(folded < size, folded, period - folded)
        elif mode == "wrap":
            source = positions % size
        else:
            s.fail(f"Pad mode {mode!r}")
        matrix = np.zeros((len(positions), size), np.float32)
        valid = source >= 0
        np.add.at(matrix, (np.arange(len(positions))[valid], source[valid]), 1.0)
        g = s.along_axis(g, matrix, axis, s.x())
    return [g]


@rule("Gather")
def _gather(s: Step) -> Grads:
    indices = s.value(s.x(1))
    if indices is None:
        s.fail("Gather with indices computed at run time")
    x_shape = s.shape(s.x())
    axis = s.attr("axis", 0) % len(x_shape)
    size = x_shape[axis]
    if size is None:
        s.fail("Gather along the batch axis")
    flat = np.asarray(indices).reshape(-1) % size
    g = s.dy()
    if indices.ndim != 1:  # fold the indices' own axes into one
        dims = list(x_shape[:axis]) + [flat.size] + list(x_shape[axis + 1:])
        g = s.op("Reshape", g, s.b.ints([-1 if d is None else d for d in dims]))
    matrix = np.zeros((flat.size, size), np.float32)
    np.add.at(matrix, (np.arange(flat.size), flat), 1.0)
    return [s.along_axis(g, matrix, axis, s.x())]


# ---------------------------------------------------------------------------------------------------------
# Reductions and pooling
# ---------------------------------------------------------------------------------------------------------

def _reduce_axes(s: Step) -> tuple[list[int], bool]:
    rank = s.rank(s.x())
    axes = s.ints(1, attr="axes")
    if not axes:
        if s.attr("noop_with_empty_axes", 0):
            return [], bool(s.attr("keepdims", 1))
        axes = list(range(rank))
    return _normalize_axes(axes, rank), bool(s.attr("keepdims", 1))


def _kept(s: Step, g: str, axes: list[int], keepdims: bool) -> str:
    return g if keepdims or not axes else s.op("Unsqueeze", g, s.b.ints(axes))


@rule("ReduceSum", "ReduceMean")
def _reduce_sum_mean(s: Step) -> Grads:
    axes, keepdims = _reduce_axes(s)
    if not axes:
        return [s.dy()]
    g = _kept(s, s.dy(), axes, keepdims)
    if s.node.op_type == "ReduceMean":
        g = s.op("Mul", g, s.const(1.0 / np.prod([s.shape(s.x())[a] for a in axes]), s.x()))
    return [s.expand_to(g, s.x())]


def _argmax_share(s: Step, g: str, y: str, axes: list[int]) -> str:
    """Spread g over the positions that hold the extreme value y (reduced over `axes`, kept as size 1), ties
    sharing equally (as torch.amax). The axes are passed in: y may be a backward tensor with no known shape."""
    hit = s.op("Cast", s.op("Equal", s.x(), y), to=s.fwd.dtypes[s.x()])
    count = s.op("ReduceSum", hit, s.b.ints(axes), keepdims=1)
    return s.op("Mul", hit, s.op("Div", g, count))


@rule("ReduceMax", "ReduceMin")
def _reduce_max(s: Step) -> Grads:
    axes, keepdims = _reduce_axes(s)
    if not axes:
        return [s.dy()]
    return [_argmax_share(s, _kept(s, s.dy(), axes, keepdims), _kept(s, s.y(), axes, keepdims), axes)]


@rule("GlobalMaxPool")
def _global_max_pool(s: Step) -> Grads:
    return [_argmax_share(s, s.dy(), s.y(), list(range(2, s.rank(s.x()))))]


@rule("GlobalAveragePool")
def _global_average_pool(s: Step) -> Grads:
    count = int(np.prod(s.shape(s.x())[2:]))
    return [s.expand_to(s.op("Mul", s.dy(), s.const(1.0 / count, s.x())), s.x())]


@rule("MaxPool")
def _max_pool(s: Step) -> Grads:
    """Scatter dy back to the argmax of each window, from the forward MaxPool's own Indices output.
    ScatterElements adds where windows overlap (MaxUnpool would overwrite and lose gradient); where they cannot
    overlap (VGG's 2x2/2), every input cell feeds one window at most, and MaxUnpool does the same at an eighth of
    the cost on ONNX Runtime."""
    if s.attr("storage_order", 0):
        s.fail("MaxPool with storage_order=1")
    indices = s.b.memo(("maxpool_indices", s.node.name), lambda: _add_indices_output(s))
    kernel, strides, dilations, pads = _conv_geometry(s, s.x())
    n, x_size, y_size = len(kernel), s.shape(s.x())[2:], s.shape(s.y())[2:]
    apart = all(d * (k - 1) + 1 <= st for k, st, d in zip(kernel, strides, dilations))
    # MaxUnpool checks output_shape against the size its attributes imply (which ceil_mode can exceed)
    fits = all((y_size[i] - 1) * strides[i] + kernel[i] - pads[i] - pads[n + i] <= x_size[i] for i in range(n))
    if apart and fits:
        return [s.op("MaxUnpool", s.dy(), indices, s.shape_of(s.x()), kernel_shape=kernel, strides=strides,
                     pads=pads)]
    flat_zeros = s.memo(("flat_zeros", s.x()), lambda: s.op("Reshape", s.zeros_like(s.x()), s.b.ints([-1])))
    flat_indices = s.memo(("flat_indices", indices), lambda: s.op("Reshape", indices, s.b.ints([-1])))
    flat = s.op("ScatterElements", flat_zeros, flat_indices, s.op("Reshape", s.dy(), s.b.ints([-1])),
                axis=0, reduction="add")
    return [s.reshape_to(flat, s.x())]


def _add_indices_output(s: Step) -> str:
    if len(s.node.output) > 1 and s.node.output[1]:
        return s.node.output[1]
    name = s.b.fresh(f"{s.node.name}/indices")
    if len(s.node.output) > 1:
        s.node.output[1] = name
    else:
        s.node.output.append(name)
    s.fwd.dtypes[name] = onnx.TensorProto.INT64
    s.fwd.shapes[name] = s.shape(s.y())
    return name


def pool_matrix(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int, ceil_mode: bool,
                count_include_pad: bool) -> np.ndarray:
    """The (out, in) matrix of 1-D average pooling, following PyTorch's and ONNX Runtime's divisor rules:
    with count_include_pad the divisor counts padded cells but not cells past the padding (ceil_mode)."""
    span = dilation * (kernel - 1) + 1
    numerator = size + begin + end - span
    out = (-(-numerator // stride) if ceil_mode else numerator // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + begin:  # a window may not start in the end padding
        out -= 1
    matrix = np.zeros((out, size), np.float64)
    for o in range(out):
        cells = o * stride - begin + dilation * np.arange(kernel)
        inside = cells[(cells >= 0) & (cells < size)]
        padded = cells[(cells >= -begin) & (cells < size + end)]
        divisor = len(padded) if count_include_pad else len(inside)
        if divisor:
            np.add.at(matrix[o], inside, 1.0 / divisor)
    return matrix


@rule("AveragePool")
def _average_pool(s: Step) -> Grads:
    """Average pooling is separable: one (out, in) matrix per spatial axis, applied transposed."""
    x_shape = s.shape(s.x())
    kernel = list(s.attr("kernel_shape"))
    n = len(kernel)
    strides = list(s.attr("strides", [1] * n))
    dilations = list(s.attr("dilations", [1] * n))
    pads = _explicit_pads(s, x_shape[2:], kernel, strides, dilations)
    ceil_mode, include = bool(s.attr("ceil_mode", 0)), bool(s.attr("count_include_pad", 0))
    g = s.dy()
    for i in range(n):
        matrix = pool_matrix(x_shape[2 + i], kernel[i], strides[i], dilations[i], pads[i], pads[n + i],
                             ceil_mode, include)
        if matrix.shape[0] != s.shape(s.y())[2 + i]:
            s.fail(f"AveragePool output size on axis {2 + i} disagrees with the pooling rule")
        g = s.along_axis(g, matrix.astype(np.float32), 2 + i, s.x())
    return [g]


# ---------------------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------------------

@rule("Conv")
def _conv(s: Step) -> Grads:
    """dx = ConvTranspose(dy, W) with the forward geometry; output_padding restores the exact input size.
    At stride 1 the same map is a plain Conv with flipped, channel-swapped weights, which runtimes optimise far
    better than ConvTranspose (ONNX Runtime's blocked NCHWc kernels take only Conv)."""
    if s.needs(1) or s.needs(2):
        s.fail("Conv whose weight or bias depends on the input")
    kernel, strides, dilations, pads = _conv_geometry(s, s.x(1))
    n = len(kernel)
    reach = [d * (k - 1) for k, d in zip(kernel, dilations)]  # a window's span minus one
    full = [reach[i % n] - p for i, p in enumerate(pads)]  # "full" correlation, cropped by the forward pads
    if all(st == 1 for st in strides) and min(full) >= 0:
        group = s.attr("group", 1)
        return [s.op("Conv", s.dy(), _flipped_weights(s, s.x(1), group), group=group, kernel_shape=kernel,
                     dilations=dilations, pads=full)]
    in_spatial = s.shape(s.x())[2:]
    out_spatial = s.shape(s.y())[2:]
    output_padding = []
    for i in range(n):
        natural = strides[i] * (out_spatial[i] - 1) + dilations[i] * (kernel[i] - 1) + 1 - pads[i] - pads[n + i]
        output_padding.append(in_spatial[i] - natural)
    if any(p < 0 or p >= max(strides[i], dilations[i]) for i, p in enumerate(output_padding)):
        s.fail(f"Conv geometry (output padding {output_padding})")
    return [s.op("ConvTranspose", s.dy(), s.x(1), group=s.attr("group", 1), kernel_shape=kernel, strides=strides,
                 dilations=dilations, pads=pads, output_padding=output_padding if any(output_padding) else None)]


def _flipped_weights(s: Step, w: str, group: int) -> str:
    """W[o, i, k...] of a grouped Conv as the weights of its transpose: W'[i, o, k...] = W[o, i, -k...] within each
    group. Built in the graph from W, so the file keeps one copy of the weights; runtimes fold it at load time."""
    def make() -> str:
        c_out, c_in, *kernel = s.shape(w)
        n = len(kernel)
        t = s.op("Reshape", w, s.b.ints([group, c_out // group, c_in, *kernel]))
        t = s.op("Transpose", t, perm=[0, 2, 1, *range(3, 3 + n)])
        t = s.op("Reshape", t, s.b.ints([group * c_in, c_out // group, *kernel]))
        last = np.iinfo(np.int64).min  # a reversed Slice runs to the start of the axis
        return s.op("Slice", t, s.b.ints([-1] * n), s.b.ints([last] * n), s.b.ints(range(2, 2 + n)), s.b.ints([-1] * n))
    return s.memo(("flipped_weights", w, group), make)


@rule("ConvTranspose")
def _conv_transpose(s: Step) -> Grads:
    """dx = Conv(dy, W) with the same geometry: convolution is the transpose of transposed convolution."""
    if s.needs(1) or s.needs(2):
        s.fail("ConvTranspose whose weight or bias depends on the input")
    w_shape = s.shape(s.x(1))
    kernel = list(s.attr("kernel_shape", w_shape[2:]))
    n = len(kernel)
    strides = list(s.attr("strides", [1] * n))
    dilations = list(s.attr("dilations", [1] * n))
    in_spatial, out_spatial = s.shape(s.x())[2:], s.shape(s.y())[2:]
    output_padding = list(s.attr("output_padding", [0] * n))
    auto_pad = s.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if s.attr("output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            total = strides[i] * (in_spatial[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 \
                - out_spatial[i]
            first = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begins.append(first)
            ends.append(total - first)
        pads = begins + ends
    elif auto_pad == "VALID":
        pads = [0] * 2 * n
    else:
        pads = list(s.attr("pads", [0] * 2 * n))
    # The output is the transposed span cropped by pads, plus output_padding cells at the end: those first
    # take back cells the end pad cropped (they carry x), and only the rest lie past the span (no gradient).
    g = s.dy()
    ends = [pads[n + i] - output_padding[i] for i in range(n)]
    reach = [out_spatial[i] + min(0, ends[i]) for i in range(n)]
    if any(r < o for r, o in zip(reach, out_spatial)):
        g = s.op("Slice", g, s.b.ints([0] * n), s.b.ints(reach), s.b.ints(range(2, 2 + n)))
    return [s.op("Conv", g, s.x(1), group=s.attr("group", 1), kernel_shape=kernel, strides=strides,
                 dilations=dilations, pads=pads[:n] + [max(0, e) for e in ends])]


@rule("Gemm")
def _gemm(s: Step) -> Grads:
    """Y = alpha op(A) op(B) + beta C."""
    alpha, beta = s.attr("alpha", 1.0), s.attr("beta", 1.0)
    trans_a, trans_b = s.attr("transA", 0), s.attr("transB", 0)
    a, b, dy = s.x(0), s.x(1), s.dy()
    grads: list[str | None] = [None, None, None]
    if s.needs(0):
        grads[0] = (s.op("Gemm", b, dy, alpha=alpha, transA=trans_b, transB=1) if trans_a
                    else s.op("Gemm", dy, b, alpha=alpha, transB=1 - trans_b))
    if s.needs(1):
        grads[1] = (s.op("Gemm", dy, a, alpha=alpha, transA=1, transB=trans_a) if trans_b
                    else s.op("Gemm", a, dy, alpha=alpha, transA=1 - trans_a))
    if s.needs(2):
        grads[2] = s.unbroadcast(s.op("Mul", dy, s.const(beta, s.y())), s.x(2))
    return grads


@rule("MatMul")
def _matmul(s: Step) -> Grads:
    """dA = dY B^T, dB = A^T dY (last two axes), summed over broadcast batch axes."""
    a, b, dy = s.x(0), s.x(1), s.dy()
    if s.rank(a) < 2 or s.rank(b) < 2:
        s.fail("MatMul with a 1-D operand")

    def swap_last(name: str) -> str:
        rank = s.rank(name)
        return s.op("Transpose", name, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    return [s.unbroadcast(s.op("MatMul", dy, swap_last(b)), a) if s.needs(0) else None,
            s.unbroadcast(s.op("MatMul", swap_last(a), dy), b) if s.needs(1) else None]


# ---------------------------------------------------------------------------------------------------------
# Normalisation (inference mode)
# ---------------------------------------------------------------------------------------------------------

def _channel_view(s: Step, t: str, rank: int) -> str:
    """A per-channel vector (C,) reshaped to broadcast over (N, C, spatial...)."""
    return s.op("Reshape", t, s.b.ints([-1] + [1] * (rank - 2)))


@rule("BatchNormalization")
def _batch_norm(s: Step) -> Grads:  # inference: an affine map per channel, dx = dy * scale / sqrt(var + eps)
    if s.attr("training_mode", 0) or (len(s.node.output) > 1 and any(s.node.output[1:])):
        s.fail("BatchNormalization in training mode")
    if any(s.needs(i) for i in range(1, 5)):
        s.fail("BatchNormalization whose statistics depend on the input")
    x = s.x()
    gain = s.memo(("bn_gain", s.node.name), lambda: _channel_view(
        s, s.op("Div", s.x(1), s.op("Sqrt", s.op("Add", s.x(4), s.const(s.attr("epsilon", 1e-5), x)))),
        s.rank(x)))
    return [s.op("Mul", s.dy(), gain)]


def _normalise_backward(s: Step, axes: list[int], gamma: str) -> str:
    """y = gamma * xhat + beta, xhat = (x - mean) / sigma over `axes`:
    dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma, with g = dy * gamma."""
    x = s.x()
    eps = s.const(s.attr("epsilon", 1e-5), x)

    def stats() -> tuple[str, str]:
        centred = s.op("Sub", x, s.reduce_mean(x, axes, x))
        sigma = s.op("Sqrt", s.op("Add", s.reduce_mean(s.op("Mul", centred, centred), axes, x), eps))
        return s.op("Div", centred, sigma), sigma

    xhat, sigma = s.memo(("norm_stats", s.node.name), stats)
    g = s.op("Mul", s.dy(), gamma)
    inner = s.op("Sub", s.op("Sub", g, s.reduce_mean(g, axes, x)),
                 s.op("Mul", xhat, s.reduce_mean(s.op("Mul", g, xhat), axes, x)))
    return s.op("Div", inner, sigma)


@rule("InstanceNormalization")
def _instance_norm(s: Step) -> Grads:
    rank = s.rank(s.x())
    return [_normalise_backward(s, list(range(2, rank)), _channel_view(s, s.x(1), rank))]


@rule("LayerNormalization")
def _layer_norm(s: Step) -> Grads:
    rank = s.rank(s.x())
    axis = s.attr("axis", -1) % rank
    if s.needs(1) or s.needs(2):
        s.fail("LayerNormalization whose scale or bias depends on the input")
    return [_normalise_backward(s, list(range(axis, rank)), s.x(1))]


# ---------------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------------

@rule("Resize")
def _resize(s: Step) -> Grads:
    """Resize is separable: probe ONNX Runtime for each resized axis's (in, out) interpolation matrix on a
    one-hot basis, so the transpose matches the runtime's own coordinate and rounding rules exactly."""
    mode = s.attr("coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "tf_crop_and_resize":
        s.fail("Resize with tf_crop_and_resize")
    policy = s.attr("keep_aspect_ratio_policy", b"stretch")
    if (policy.decode() if isinstance(policy, bytes) else policy) != "stretch":
        s.fail("Resize with keep_aspect_ratio_policy")
    x_shape, y_shape = s.shape(s.x()), s.shape(s.y())
    rank = len(x_shape)
    scales = s.value(s.x(2)) if s.x(2) else None
    scales = None if scales is None or scales.size == 0 else [float(v) for v in scales]
    axes = [a % rank for a in s.attr("axes", list(range(rank)))]
    full_scales = [1.0] * rank
    if scales is not None:
        for a, v in zip(axes, scales):
            full_scales[a] = v
    g = s.dy()
    for axis in range(rank):
        if x_shape[axis] == y_shape[axis] and full_scales[axis] == 1.0:
            continue
        if x_shape[axis] is None:
            s.fail("Resize along the batch axis")
        forward = _probe_resize(s.node, axis, rank, x_shape[axis], y_shape[axis],
                                full_scales[axis] if scales is not None else None, s.fwd.opset)
        g = s.along_axis(g, np.ascontiguousarray(forward.T), axis, s.x())
    return [g]


def _probe_resize(node: onnx.NodeProto, axis: int, rank: int, size: int, out_size: int,
                  scale: float | None, opset: int) -> np.ndarray:
    """The (in, out) matrix of `node`'s resampling along one axis, measured on ONNX Runtime."""
    import onnxruntime as ort

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "axes"}
    shape = [1] * rank
    shape[0], shape[axis] = size, size
    basis = np.zeros(shape, np.float32)
    index = [np.arange(size)] + [0] * (rank - 1)
    index[axis] = np.arange(size)
    basis[tuple(index)] = 1.0
    if scale is not None:
        scales = [1.0] * rank
        scales[axis] = scale
        extra = [helper.make_tensor("roi", onnx.TensorProto.FLOAT, [0], []),
                 helper.make_tensor("scales", onnx.TensorProto.FLOAT, [rank], scales)]
        inputs = ["x", "roi", "scales"]
    else:
        sizes = [size] + [1] * (rank - 1)
        sizes[axis] = out_size
        extra = [helper.make_tensor("roi", onnx.TensorProto.FLOAT, [0], []),
                 helper.make_tensor("scales", onnx.TensorProto.FLOAT, [0], []),
                 helper.make_tensor("sizes", onnx.TensorProto.INT64, [rank], sizes)]
        inputs = ["x", "roi", "scales", "sizes"]
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["y"], **attrs)], "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=extra)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 13))])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": basis})[0]
    out = np.moveaxis(out, axis, 1).reshape(size, -1)
    if out.shape[1] != out_size:
        raise UnsupportedVariant(f"Resize probe gave {out.shape[1]} cells on axis {axis}, expected {out_size}")
    return out.astype(np.float32)
