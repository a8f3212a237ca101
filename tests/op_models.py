"""Tiny one-operator ONNX models for the gradient-rule tests, each with the equivalent PyTorch function.

A case builds the part of a graph from the image input "x" (shape [N, *x_shape], dynamic batch) to one float
tensor whose batch axis comes first; `forward_model` appends a fixed random projection, so each sample's
scalar is f(x) = sum(w * op(x)), and the class-0 gradient of the model is the gradient of f.

Each case also gives, where PyTorch has the operator, the same function in PyTorch (float64, same constants)
and an input sampler that keeps the inputs away from the op's kinks and ties: finite differences must measure
the gradient, not a kink.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

INT_MAX = 2 ** 63 - 1
TorchFn = Callable[[torch.Tensor], torch.Tensor]


def T(a: Any) -> torch.Tensor:
    """A float64 torch tensor holding exactly the float32 constant `a` that the ONNX graph holds."""
    return torch.from_numpy(np.array(a, np.float64))


# ---------------------------------------------------------------------------------------------------------
# Input samplers: (rng, shape) -> float32 array
# ---------------------------------------------------------------------------------------------------------

Sampler = Callable[[np.random.Generator, tuple], np.ndarray]

#: How far every input stays from a kink. The finite-difference stencil moves an input by at most 2h < 0.02.
MARGIN = 0.05


def normal(scale: float = 1.0, avoid: Sequence[float] = ()) -> Sampler:
    """Gaussian inputs, pushed at least MARGIN away from each kink in `avoid`."""
    def sample(rng: np.random.Generator, shape: tuple) -> np.ndarray:
        x = rng.standard_normal(shape) * scale
        for k in avoid:
            d = x - k
            close = np.abs(d) < MARGIN
            x[close] = k + np.where(d[close] >= 0, 1.0, -1.0) * (MARGIN + np.abs(d[close]))
        return x.astype(np.float32)
    return sample


def uniform(lo: float, hi: float, signed: bool = False) -> Sampler:
    """Uniform magnitudes in [lo, hi] (random signs if `signed`): for Sqrt, Log, Reciprocal, denominators."""
    def sample(rng: np.random.Generator, shape: tuple) -> np.ndarray:
        x = rng.uniform(lo, hi, shape)
        if signed:
            x *= rng.choice([-1.0, 1.0], shape)
        return x.astype(np.float32)
    return sample


def distinct(spacing: float = 0.1) -> Sampler:
    """Per sample, a random permutation of values `spacing` apart: no ties, and no perturbation of at most
    2h < spacing / 2 per value changes which value is a window's maximum."""
    def sample(rng: np.random.Generator, shape: tuple) -> np.ndarray:
        size = int(np.prod(shape[1:]))
        values = (np.arange(size) - size / 2) * spacing
        return np.stack([rng.permutation(values).reshape(shape[1:]) for _ in range(shape[0])]).astype(np.float32)
    return sample


# ---------------------------------------------------------------------------------------------------------
# Building graphs
# ---------------------------------------------------------------------------------------------------------

class G:
    """Collects the nodes and constants of the op under test. `g.op(...)` returns the new tensor's name."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def randn(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def uniform(self, lo: float, hi: float, *shape: int) -> np.ndarray:
        return self.rng.uniform(lo, hi, shape).astype(np.float32)

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits[name] = np.array(value, dtype)
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, domain: str | None = None,
           **attrs: Any) -> Any:
        k = len(self.nodes)
        names = [f"t{k}_{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        attrs = {key: v for key, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{op_type.lower()}_{k}",
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


Build = Callable[[G], "tuple[str, TorchFn | None]"]


@dataclass
class Case:
    id: str
    x_shape: tuple  # without the batch axis
    build: Build
    opset: int = 17
    sample: Sampler = normal()

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


CASES: list[Case] = []


def case(id: str, x_shape: tuple, opset: int = 17, sample: Sampler | None = None):
    def register(build: Build) -> Build:
        CASES.append(Case(id, tuple(x_shape), build, opset, sample or normal()))
        return build
    return register


def _reduce_sum(g_nodes: list, inits: dict, source: str, out: str, opset: int) -> None:
    if opset >= 13:
        inits["proj_axes"] = np.array([1], np.int64)
        g_nodes.append(helper.make_node("ReduceSum", [source, "proj_axes"], [out], name="proj_sum", keepdims=1))
    else:
        g_nodes.append(helper.make_node("ReduceSum", [source], [out], name="proj_sum", axes=[1], keepdims=1))


def make_model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: tuple, outputs: list[str],
               opset: int, extra_domains: Sequence[str] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "op_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    model = helper.make_model(graph, opset_imports=imports, ir_version=8)
    return model


@dataclass
class Built:
    case: Case
    model: onnx.ModelProto  # x -> op -> projection -> "out" (N, 1): what the Explainer gets
    probe: onnx.ModelProto  # the same graph with the op's output "y" exposed too
    w: np.ndarray  # the projection weights, shape (1, *y.shape[1:])
    torch_fn: TorchFn | None
    y_name: str


def forward_model(c: Case) -> Built:
    """The case's graph followed by Mul(w) -> Flatten -> ReduceSum(axis 1, keepdims) -> "out" (N, 1)."""
    import onnxruntime as ort

    g = G(c.seed)
    y, torch_fn = c.build(g)
    # Find the shape of y (batch first) by running the op alone.
    bare = make_model(list(g.nodes), dict(g.inits), c.x_shape, [y], c.opset)
    session = ort.InferenceSession(bare.SerializeToString(), providers=["CPUExecutionProvider"])
    y_shape = session.run([y], {"x": np.zeros((2, *c.x_shape), np.float32)})[0].shape
    w = g.randn(1, *y_shape[1:])
    nodes, inits = list(g.nodes), dict(g.inits)
    inits["proj_w"] = w
    nodes.append(helper.make_node("Mul", [y, "proj_w"], ["proj_y"], name="proj_mul"))
    nodes.append(helper.make_node("Flatten", ["proj_y"], ["proj_flat"], name="proj_flatten", axis=1))
    _reduce_sum(nodes, inits, "proj_flat", "out", c.opset)
    model = make_model(nodes, inits, c.x_shape, ["out"], c.opset)
    probe = make_model(nodes, inits, c.x_shape, ["out", y], c.opset)
    return Built(c, model, probe, w, torch_fn, y)


# ---------------------------------------------------------------------------------------------------------
# Shared reference formulas (written from the ONNX operator documentation, independently of onnx_gbp)
# ---------------------------------------------------------------------------------------------------------

def same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              upper: bool) -> list[int]:
    """ONNX auto_pad SAME_*: output = ceil(in / stride); the odd cell of padding goes at the end (UPPER) or
    at the beginning (LOWER). Returns ONNX order [begins..., ends...]."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def torch_pad(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the spatial axes of an (N, C, ...) tensor from ONNX-order pads [begins..., ends...]."""
    n = len(pads) // 2
    spec: list[int] = []
    for i in reversed(range(n)):  # torch lists the last axis first
        spec += [pads[i], pads[n + i]]
    return F.pad(x, spec, value=value)


def torch_crop(y: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Remove ONNX-order pads [begins..., ends...] from the spatial axes (as ConvTranspose's pads do)."""
    n = len(pads) // 2
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[n + i]) for i in range(n)]
    return y[tuple(index)]


# ---------------------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------------------

def _conv(g: G, x_channels: int, out_channels: int, kernel: Sequence[int], group: int = 1, bias: bool = True,
          strides=None, dilations=None, pads=None, auto_pad=None, x_spatial=None):
    W = g.randn(out_channels, x_channels // group, *kernel, scale=0.5)
    B = g.randn(out_channels) if bias else None
    inputs = ["x", g.const(W)] + ([g.const(B)] if bias else [])
    y = g.op("Conv", *inputs, group=group, strides=strides, dilations=dilations, pads=pads, auto_pad=auto_pad)
    n = len(kernel)
    strides_, dilations_ = strides or [1] * n, dilations or [1] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        explicit = same_pads(x_spatial, kernel, strides_, dilations_, auto_pad == "SAME_UPPER")
    else:
        explicit = pads or [0] * 2 * n
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]

    def fn(x):
        return conv(torch_pad(x, explicit), T(W), None if B is None else T(B), stride=strides_,
                    dilation=dilations_, groups=group)
    return y, fn


case("Conv/basic_pads1", (3, 7, 7))(lambda g: _conv(g, 3, 4, [3, 3], pads=[1, 1, 1, 1]))
case("Conv/no_bias_no_pads", (3, 7, 7))(lambda g: _conv(g, 3, 4, [3, 3], bias=False))
case("Conv/strides2_pads1_even", (3, 8, 8))(lambda g: _conv(g, 3, 4, [3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
case("Conv/strides_2x3_kernel_3x2", (3, 8, 9))(lambda g: _conv(g, 3, 4, [3, 2], strides=[2, 3]))
case("Conv/dilations2_pads2", (3, 9, 9))(lambda g: _conv(g, 3, 4, [3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]))
case("Conv/dilations_strides_asym_pads", (3, 9, 8))(
    lambda g: _conv(g, 3, 4, [3, 3], strides=[2, 2], dilations=[2, 1], pads=[1, 0, 2, 1]))
case("Conv/groups2", (4, 6, 6))(lambda g: _conv(g, 4, 6, [3, 3], group=2, pads=[1, 1, 1, 1]))
case("Conv/depthwise_stride2", (4, 7, 7))(
    lambda g: _conv(g, 4, 4, [3, 3], group=4, strides=[2, 2], pads=[1, 1, 1, 1]))
case("Conv/depthwise_multiplier2", (4, 6, 6))(lambda g: _conv(g, 4, 8, [3, 3], group=4, pads=[1, 1, 1, 1]))
case("Conv/asym_pads", (3, 6, 7))(lambda g: _conv(g, 3, 4, [3, 3], pads=[0, 1, 2, 1]))
case("Conv/same_upper_k4_s1", (3, 7, 7))(
    lambda g: _conv(g, 3, 4, [4, 4], auto_pad="SAME_UPPER", x_spatial=[7, 7]))
case("Conv/same_upper_s2_even", (3, 8, 8))(
    lambda g: _conv(g, 3, 4, [3, 3], strides=[2, 2], auto_pad="SAME_UPPER", x_spatial=[8, 8]))
case("Conv/same_lower_s2_even", (3, 8, 8))(
    lambda g: _conv(g, 3, 4, [3, 3], strides=[2, 2], auto_pad="SAME_LOWER", x_spatial=[8, 8]))
case("Conv/same_lower_k4_s1", (3, 7, 6))(
    lambda g: _conv(g, 3, 4, [4, 4], auto_pad="SAME_LOWER", x_spatial=[7, 6]))
case("Conv/valid_s2_drops_last_row", (3, 8, 8))(
    lambda g: _conv(g, 3, 4, [3, 3], strides=[2, 2], auto_pad="VALID"))
case("Conv/1x1_stride2", (3, 8, 8))(lambda g: _conv(g, 3, 5, [1, 1], strides=[2, 2]))
case("Conv/1d_stride2_asym_pads", (3, 10))(lambda g: _conv(g, 3, 4, [3], strides=[2], pads=[1, 0]))


# ---------------------------------------------------------------------------------------------------------
# ConvTranspose
# ---------------------------------------------------------------------------------------------------------

def _conv_transpose(g: G, x_channels: int, out_per_group: int, kernel: Sequence[int], group: int = 1,
                    strides=None, dilations=None, pads=None, output_padding=None, output_shape=None,
                    auto_pad=None, x_spatial=None):
    W = g.randn(x_channels, out_per_group, *kernel, scale=0.5)
    B = g.randn(out_per_group * group)
    y = g.op("ConvTranspose", "x", g.const(W), g.const(B), group=group, strides=strides, dilations=dilations,
             pads=pads, output_padding=output_padding, output_shape=output_shape, auto_pad=auto_pad)
    n = len(kernel)
    strides_, dilations_ = strides or [1] * n, dilations or [1] * n
    opad = output_padding or [0] * n
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # ONNX ConvTranspose doc: total_padding = stride * (in - 1) + output_padding + ((k - 1) * d + 1) - out;
        # SAME_UPPER puts total // 2 first, otherwise total - total // 2 goes first.
        outs = output_shape or [s * i for s, i in zip(strides_, x_spatial)]
        begins, ends = [], []
        for i in range(n):
            total = strides_[i] * (x_spatial[i] - 1) + opad[i] + (kernel[i] - 1) * dilations_[i] + 1 - outs[i]
            first = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begins.append(first)
            ends.append(total - first)
        explicit = begins + ends
    else:
        explicit = pads or [0] * 2 * n
    convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[n]

    def fn(x):
        full = convt(x, T(W), T(B), stride=strides_, output_padding=opad, groups=group, dilation=dilations_)
        return torch_crop(full, explicit)
    return y, fn


case("ConvTranspose/basic", (4, 4, 4))(lambda g: _conv_transpose(g, 4, 3, [3, 3]))
case("ConvTranspose/strides2_pads1_output_padding1", (4, 4, 4))(
    lambda g: _conv_transpose(g, 4, 3, [3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]))
case("ConvTranspose/strides2_kernel2_unet", (4, 4, 5))(lambda g: _conv_transpose(g, 4, 3, [2, 2], strides=[2, 2]))
case("ConvTranspose/output_shape", (4, 4, 4))(
    lambda g: _conv_transpose(g, 4, 3, [3, 3], strides=[2, 2], output_shape=[8, 7], x_spatial=[4, 4]))
case("ConvTranspose/output_shape_output_padding", (4, 4, 4))(
    lambda g: _conv_transpose(g, 4, 3, [3, 3], strides=[2, 3], output_padding=[1, 2], output_shape=[9, 11],
                              x_spatial=[4, 4]))
case("ConvTranspose/same_upper_stride2", (4, 4, 5))(
    lambda g: _conv_transpose(g, 4, 3, [3, 3], strides=[2, 2], auto_pad="SAME_UPPER", x_spatial=[4, 5]))
case("ConvTranspose/same_lower_stride2", (4, 5, 4))(
    lambda g: _conv_transpose(g, 4, 3, [4, 3], strides=[2, 2], auto_pad="SAME_LOWER", x_spatial=[5, 4]))
case("ConvTranspose/groups2", (4, 4, 4))(
    lambda g: _conv_transpose(g, 4, 2, [3, 3], group=2, strides=[2, 2], pads=[1, 1, 1, 1]))
case("ConvTranspose/depthwise", (4, 4, 4))(lambda g: _conv_transpose(g, 4, 1, [3, 3], group=4, strides=[2, 2]))
case("ConvTranspose/dilations2_pads1", (4, 4, 4))(
    lambda g: _conv_transpose(g, 4, 3, [3, 3], dilations=[2, 2], pads=[1, 1, 1, 1]))
case("ConvTranspose/asym_pads", (4, 4, 4))(lambda g: _conv_transpose(g, 4, 3, [3, 3], pads=[0, 1, 1, 0]))
case("ConvTranspose/strides_3x2_output_padding", (4, 3, 4))(
    lambda g: _conv_transpose(g, 4, 3, [3, 2], strides=[3, 2], pads=[1, 0, 0, 1], output_padding=[2, 1]))
case("ConvTranspose/1d_stride2", (4, 5))(
    lambda g: _conv_transpose(g, 4, 3, [3], strides=[2], pads=[1, 1], output_padding=[1]))


# ---------------------------------------------------------------------------------------------------------
# Gemm and MatMul
# ---------------------------------------------------------------------------------------------------------

@case("Gemm/transB_alpha_beta_bias_vector", (5,))
def _gemm_linear(g: G):
    B, C = g.randn(6, 5), g.randn(6)
    y = g.op("Gemm", "x", g.const(B), g.const(C), transB=1, alpha=0.7, beta=1.3)
    return y, lambda x: 0.7 * x @ T(B).T + 1.3 * T(C)


@case("Gemm/plain_no_C", (5,))
def _gemm_plain(g: G):
    B = g.randn(5, 6)
    return g.op("Gemm", "x", g.const(B)), lambda x: x @ T(B)


@case("Gemm/transA_on_path", (5,))
def _gemm_trans_a(g: G):
    B, C = g.randn(5, 6), g.randn(1, 6)
    y = g.op("Gemm", g.op("Transpose", "x", perm=[1, 0]), g.const(B), g.const(C), transA=1, alpha=-0.6)
    return y, lambda x: -0.6 * x @ T(B) + T(C)


@case("Gemm/x_as_B_transB_alpha", (5,))
def _gemm_x_second(g: G):
    A = g.randn(6, 5)
    y = g.op("Transpose", g.op("Gemm", g.const(A), "x", transB=1, alpha=1.5), perm=[1, 0])
    return y, lambda x: (1.5 * T(A) @ x.T).T


@case("Gemm/x_as_B_transA_transB", (5,))
def _gemm_x_second_both(g: G):
    A = g.randn(5, 6)
    y = g.op("Transpose", g.op("Gemm", g.const(A), "x", transA=1, transB=1), perm=[1, 0])
    return y, lambda x: (T(A).T @ x.T).T


@case("Gemm/x_as_B_no_trans", (5,))
def _gemm_x_second_plain(g: G):
    A = g.randn(6, 5)
    y = g.op("Transpose", g.op("Gemm", g.const(A), g.op("Transpose", "x", perm=[1, 0]), alpha=0.8), perm=[1, 0])
    return y, lambda x: (0.8 * T(A) @ x.T).T


@case("Gemm/C_is_x", (6,))
def _gemm_c_on_path(g: G):
    B = g.randn(6, 6)
    y = g.op("Gemm", "x", g.const(B), "x", alpha=0.5, beta=2.0)
    return y, lambda x: 0.5 * x @ T(B) + 2.0 * x


@case("Gemm/C_broadcast_column_from_x", (5,))
def _gemm_c_broadcast(g: G):
    B = g.randn(5, 6)
    c = g.op("ReduceSum", "x", g.ints([1]), keepdims=1)  # (N, 1), broadcast along the columns
    y = g.op("Gemm", "x", g.const(B), c, beta=-0.7)
    return y, lambda x: x @ T(B) - 0.7 * x.sum(1, keepdim=True)


@case("MatMul/2d", (5,))
def _matmul_2d(g: G):
    W = g.randn(5, 4)
    return g.op("MatMul", "x", g.const(W)), lambda x: x @ T(W)


@case("MatMul/3d_times_const", (4, 5))
def _matmul_3d(g: G):
    W = g.randn(5, 3)
    return g.op("MatMul", "x", g.const(W)), lambda x: x @ T(W)


@case("MatMul/const_times_x", (4, 5))
def _matmul_left(g: G):
    W = g.randn(3, 4)
    return g.op("MatMul", g.const(W), "x"), lambda x: T(W) @ x


@case("MatMul/x_broadcast_over_batch_axes", (1, 4, 5))
def _matmul_broadcast(g: G):
    W = g.randn(3, 5, 2)
    return g.op("MatMul", "x", g.const(W)), lambda x: x @ T(W)


@case("MatMul/x_times_x_transposed", (4, 5))
def _matmul_both(g: G):
    return g.op("MatMul", "x", g.op("Transpose", "x", perm=[0, 2, 1])), lambda x: x @ x.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Elementwise arithmetic with broadcasting
# ---------------------------------------------------------------------------------------------------------

@case("Add/const_broadcast", (3, 4, 5))
def _add_const(g: G):
    c = g.randn(3, 1, 1)
    return g.op("Add", "x", g.const(c)), lambda x: x + T(c)


@case("Add/lower_rank_const_first", (3, 4, 5))
def _add_lower_rank(g: G):
    c = g.randn(5)
    return g.op("Add", g.const(c), "x"), lambda x: T(c) + x


@case("Add/x_broadcast", (3, 1, 5))
def _add_x_broadcast(g: G):
    c = g.randn(1, 3, 4, 5)
    return g.op("Add", "x", g.const(c)), lambda x: x + T(c)


@case("Add/both_x_and_broadcast_mean", (3, 4, 5))
def _add_both(g: G):
    m = g.op("ReduceMean", "x", axes=[2], keepdims=1)
    return g.op("Add", "x", m), lambda x: x + x.mean(2, keepdim=True)


@case("Add/x_plus_x", (3, 4))
def _add_same(g: G):
    return g.op("Add", "x", "x"), lambda x: x + x


@case("Sub/const_minus_x", (3, 4, 5))
def _sub_const_first(g: G):
    c = g.randn(1, 3, 1, 1)
    return g.op("Sub", g.const(c), "x"), lambda x: T(c) - x


@case("Sub/x_minus_broadcast_mean", (3, 4, 5))
def _sub_both(g: G):
    m = g.op("ReduceMean", "x", axes=[3], keepdims=1)
    return g.op("Sub", "x", m), lambda x: x - x.mean(3, keepdim=True)


@case("Sub/broadcast_mean_minus_x", (3, 4, 5))
def _sub_both_reversed(g: G):
    m = g.op("ReduceSum", "x", g.ints([1, 2]), keepdims=1)
    return g.op("Sub", m, "x"), lambda x: x.sum((1, 2), keepdim=True) - x


@case("Sub/x_broadcast_minus_const", (3, 1, 5))
def _sub_x_broadcast(g: G):
    c = g.randn(3, 4, 1)
    return g.op("Sub", "x", g.const(c)), lambda x: x - T(c)


@case("Mul/x_times_x", (3, 4, 5))
def _mul_square(g: G):
    return g.op("Mul", "x", "x"), lambda x: x * x


@case("Mul/const_broadcast", (3, 4, 5))
def _mul_const(g: G):
    c = g.randn(1, 3, 1, 5)
    return g.op("Mul", "x", g.const(c)), lambda x: x * T(c)


@case("Mul/x_broadcast", (1, 4, 1))
def _mul_x_broadcast(g: G):
    c = g.randn(3, 1, 5)
    return g.op("Mul", g.const(c), "x"), lambda x: T(c) * x


@case("Mul/x_times_broadcast_sum", (3, 4, 5))
def _mul_both(g: G):
    s = g.op("ReduceSum", "x", g.ints([1]), keepdims=1)
    return g.op("Mul", "x", s), lambda x: x * x.sum(1, keepdim=True)


@case("Mul/scalar", (3, 4))
def _mul_scalar(g: G):
    return g.op("Mul", "x", g.const(-1.7)), lambda x: x * -1.7


@case("Mul/silu", (3, 4, 5))
def _silu(g: G):
    return g.op("Mul", "x", g.op("Sigmoid", "x")), lambda x: F.silu(x)


@case("Div/x_by_const", (3, 4, 5))
def _div_by_const(g: G):
    c = g.uniform(0.5, 2.0, 3, 1, 1)
    return g.op("Div", "x", g.const(c)), lambda x: x / T(c)


@case("Div/x_broadcast_by_const", (3, 1, 5))
def _div_x_broadcast(g: G):
    c = g.uniform(0.5, 2.0, 3, 4, 1)
    return g.op("Div", "x", g.const(c)), lambda x: x / T(c)


@case("Div/const_by_x", (3, 4, 5), sample=uniform(0.5, 2.0, signed=True))
def _div_const_by_x(g: G):
    c = g.randn(1, 3, 1, 5)
    return g.op("Div", g.const(c), "x"), lambda x: T(c) / x


@case("Div/const_by_x_broadcast", (3, 1, 5), sample=uniform(0.5, 2.0, signed=True))
def _div_const_by_x_broadcast(g: G):
    c = g.randn(1, 3, 4, 5)
    return g.op("Div", g.const(c), "x"), lambda x: T(c) / x


@case("Div/x_by_broadcast_norm_of_x", (3, 4, 5))
def _div_both(g: G):
    ms = g.op("ReduceMean", g.op("Mul", "x", "x"), axes=[2, 3], keepdims=1)
    d = g.op("Add", ms, g.const(1.0))
    return g.op("Div", "x", d), lambda x: x / ((x * x).mean((2, 3), keepdim=True) + 1.0)


@case("Sum/three_inputs_broadcast", (3, 4, 5))
def _sum_three(g: G):
    c, d = g.randn(3, 1, 1), g.randn(5)
    return g.op("Sum", "x", g.op("Mul", "x", g.const(c)), g.const(d)), lambda x: x + x * T(c) + T(d)


@case("Neg/basic", (3, 4, 5))
def _neg(g: G):
    return g.op("Neg", "x"), lambda x: -x


# ---------------------------------------------------------------------------------------------------------
# ReLU family (vanilla here; guided and deconvnet are tested against methods.py's formulas in test_rules.py)
# ---------------------------------------------------------------------------------------------------------

@case("Relu/basic", (3, 4, 5), sample=normal(avoid=[0.0]))
def _relu(g: G):
    return g.op("Relu", "x"), F.relu


@case("Clip/relu6", (3, 4, 5), sample=normal(4.0, avoid=[0.0, 6.0]))
def _relu6(g: G):
    return g.op("Clip", "x", g.const(0.0), g.const(6.0)), lambda x: F.hardtanh(x, 0.0, 6.0)


@case("Clip/min0_only", (3, 4, 5), sample=normal(avoid=[0.0]))
def _clip_min0(g: G):
    return g.op("Clip", "x", g.const(0.0)), lambda x: torch.clamp(x, min=0.0)


@case("Clip/min0_empty_max", (3, 4, 5), sample=normal(avoid=[0.0]))
def _clip_min0_empty(g: G):
    return g.op("Clip", "x", g.const(0.0), ""), lambda x: torch.clamp(x, min=0.0)


@case("Clip/bounds_-1_1.5", (3, 4, 5), sample=normal(1.5, avoid=[-1.0, 1.5]))
def _clip_bounds(g: G):
    return g.op("Clip", "x", g.const(-1.0), g.const(1.5)), lambda x: torch.clamp(x, -1.0, 1.5)


@case("Clip/max_only", (3, 4, 5), sample=normal(avoid=[0.5]))
def _clip_max(g: G):
    return g.op("Clip", "x", "", g.const(0.5)), lambda x: torch.clamp(x, max=0.5)


@case("Clip/min_only_nonzero", (3, 4, 5), sample=normal(avoid=[-0.5]))
def _clip_min(g: G):
    return g.op("Clip", "x", g.const(-0.5)), lambda x: torch.clamp(x, min=-0.5)


@case("Clip/no_bounds", (3, 4, 5))
def _clip_none(g: G):
    return g.op("Clip", "x"), lambda x: x


@case("Clip/opset10_attributes_relu6", (3, 4, 5), opset=10, sample=normal(4.0, avoid=[0.0, 6.0]))
def _clip_opset10(g: G):
    return g.op("Clip", "x", min=0.0, max=6.0), lambda x: F.hardtanh(x, 0.0, 6.0)


@case("Max/x_and_0", (3, 4, 5), sample=normal(avoid=[0.0]))
def _max_relu(g: G):
    return g.op("Max", "x", g.const(0.0)), lambda x: torch.clamp(x, min=0.0)


@case("Max/0_and_x", (3, 4, 5), sample=normal(avoid=[0.0]))
def _max_relu_first(g: G):
    return g.op("Max", g.const([0.0]), "x"), lambda x: torch.clamp(x, min=0.0)


@case("Max/x_and_neg_x_both_on_path", (3, 4, 5), sample=normal(avoid=[0.0]))
def _max_abs(g: G):
    return g.op("Max", "x", g.op("Neg", "x")), lambda x: torch.maximum(x, -x)


@case("Max/x_and_broadcast_const", (3, 4, 5), sample=normal(avoid=[0.5, -0.45, 1.3]))
def _max_const(g: G):
    c = np.array([0.5, -0.45, 1.3], np.float32).reshape(3, 1, 1)
    return g.op("Max", "x", g.const(c)), lambda x: torch.maximum(x, T(c))


@case("Max/three_inputs", (3, 4, 5), sample=normal(avoid=[0.0, 0.5, -0.45, 1.3, -1.0, 0.9, -2.6]))
def _max_three(g: G):
    c = np.array([0.5, -0.45, 1.3], np.float32).reshape(3, 1, 1)
    y = g.op("Max", "x", g.op("Mul", "x", g.const(-0.5)), g.const(c))
    return y, lambda x: torch.maximum(torch.maximum(x, -0.5 * x), T(c))


@case("Max/single_input", (3, 4))
def _max_one(g: G):
    return g.op("Max", "x"), lambda x: x


@case("Min/x_and_half_x", (3, 4, 5), sample=normal(avoid=[0.0]))
def _min_two(g: G):
    return g.op("Min", "x", g.op("Mul", "x", g.const(0.5))), lambda x: torch.minimum(x, 0.5 * x)


@case("Min/x_and_broadcast_const", (3, 4, 5), sample=normal(avoid=[0.5, -0.45, 1.3]))
def _min_const(g: G):
    c = np.array([0.5, -0.45, 1.3], np.float32).reshape(3, 1, 1)
    return g.op("Min", g.const(c), "x"), lambda x: torch.minimum(T(c), x)


# ---------------------------------------------------------------------------------------------------------
# Other activations: the true derivative
# ---------------------------------------------------------------------------------------------------------

@case("LeakyRelu/alpha0.1", (3, 4, 5), sample=normal(avoid=[0.0]))
def _leaky(g: G):
    return g.op("LeakyRelu", "x", alpha=0.1), lambda x: F.leaky_relu(x, 0.1)


@case("LeakyRelu/default_alpha", (3, 4, 5), sample=normal(avoid=[0.0]))
def _leaky_default(g: G):
    return g.op("LeakyRelu", "x"), lambda x: F.leaky_relu(x, 0.01)


@case("PRelu/per_channel", (3, 4, 5), sample=normal(avoid=[0.0]))
def _prelu(g: G):
    slope = g.uniform(-0.5, 0.5, 3, 1, 1)
    return g.op("PRelu", "x", g.const(slope)), lambda x: torch.where(x > 0, x, x * T(slope))


@case("PRelu/single_slope", (3, 4, 5), sample=normal(avoid=[0.0]))
def _prelu_one(g: G):
    slope = np.array([0.25], np.float32)
    return g.op("PRelu", "x", g.const(slope)), lambda x: F.prelu(x, T(slope))


@case("Sigmoid/basic", (3, 4, 5), sample=normal(2.0))
def _sigmoid(g: G):
    return g.op("Sigmoid", "x"), torch.sigmoid


@case("Tanh/basic", (3, 4, 5), sample=normal(1.5))
def _tanh(g: G):
    return g.op("Tanh", "x"), torch.tanh


@case("HardSigmoid/alpha0.3_beta0.4", (3, 4, 5), sample=normal(2.0, avoid=[-4 / 3, 2.0]))
def _hard_sigmoid(g: G):
    return g.op("HardSigmoid", "x", alpha=0.3, beta=0.4), lambda x: torch.clamp(0.3 * x + 0.4, 0.0, 1.0)


@case("HardSigmoid/pytorch_1_6", (3, 4, 5), sample=normal(3.0, avoid=[-3.0, 3.0]))
def _hard_sigmoid_torch(g: G):
    return g.op("HardSigmoid", "x", alpha=1 / 6, beta=0.5), F.hardsigmoid


@case("HardSwish/basic", (3, 4, 5), sample=normal(3.0, avoid=[-3.0, 3.0]))
def _hard_swish(g: G):
    return g.op("HardSwish", "x"), F.hardswish


@case("Erf/basic", (3, 4, 5))
def _erf(g: G):
    return g.op("Erf", "x"), torch.erf


@case("Gelu/none_opset20", (3, 4, 5), opset=20, sample=normal(1.5))
def _gelu(g: G):
    return g.op("Gelu", "x"), lambda x: F.gelu(x)


@case("Gelu/tanh_opset20", (3, 4, 5), opset=20, sample=normal(1.5))
def _gelu_tanh(g: G):
    return g.op("Gelu", "x", approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")


@case("Gelu/erf_decomposition", (3, 4, 5), sample=normal(1.5))
def _gelu_erf(g: G):  # how exporters before opset 20 write GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
    e = g.op("Erf", g.op("Div", "x", g.const(math.sqrt(2.0))))
    y = g.op("Mul", g.op("Mul", "x", g.const(0.5)), g.op("Add", e, g.const(1.0)))
    return y, lambda x: F.gelu(x)


@case("Softmax/axis1", (4, 3, 5), sample=normal(2.0))
def _softmax_1(g: G):
    return g.op("Softmax", "x", axis=1), lambda x: torch.softmax(x, 1)


@case("Softmax/axis_last_default", (4, 3, 5), sample=normal(2.0))
def _softmax_last(g: G):
    return g.op("Softmax", "x"), lambda x: torch.softmax(x, -1)


@case("Softmax/opset11_axis1_coerced_to_2d", (4, 3, 5), opset=11, sample=normal(2.0))
def _softmax_opset11(g: G):  # before opset 13, Softmax normalises over all axes from `axis` on
    y = g.op("Softmax", "x", axis=1)
    return y, lambda x: torch.softmax(x.reshape(len(x), -1), 1).reshape(x.shape)


@case("LogSoftmax/axis_last", (4, 6), sample=normal(2.0))
def _log_softmax(g: G):
    return g.op("LogSoftmax", "x", axis=-1), lambda x: torch.log_softmax(x, -1)


@case("LogSoftmax/axis1", (4, 3, 5), sample=normal(2.0))
def _log_softmax_1(g: G):
    return g.op("LogSoftmax", "x", axis=1), lambda x: torch.log_softmax(x, 1)


@case("Exp/basic", (3, 4, 5))
def _exp(g: G):
    return g.op("Exp", "x"), torch.exp


@case("Sqrt/basic", (3, 4, 5), sample=uniform(0.5, 2.0))
def _sqrt(g: G):
    return g.op("Sqrt", "x"), torch.sqrt


@case("Pow/square", (3, 4, 5))
def _pow2(g: G):
    return g.op("Pow", "x", g.const(2.0)), lambda x: x ** 2


@case("Pow/cube_exponent_shape_1", (3, 4, 5))
def _pow3(g: G):
    return g.op("Pow", "x", g.const([3.0])), lambda x: x ** 3


@case("Pow/half", (3, 4, 5), sample=uniform(0.5, 2.0))
def _pow_half(g: G):
    return g.op("Pow", "x", g.const(0.5)), lambda x: x ** 0.5


@case("Pow/minus_1.5", (3, 4, 5), sample=uniform(0.5, 2.0))
def _pow_neg(g: G):
    return g.op("Pow", "x", g.const(-1.5)), lambda x: x ** -1.5


@case("Pow/int64_exponent", (3, 4, 5))
def _pow_int(g: G):
    return g.op("Pow", "x", g.const(3, np.int64)), lambda x: x ** 3


@case("Reciprocal/basic", (3, 4, 5), sample=uniform(0.5, 2.0, signed=True))
def _reciprocal(g: G):
    return g.op("Reciprocal", "x"), torch.reciprocal


@case("Abs/basic", (3, 4, 5), sample=normal(avoid=[0.0]))
def _abs(g: G):
    return g.op("Abs", "x"), torch.abs


@case("Log/basic", (3, 4, 5), sample=uniform(0.5, 2.0))
def _log(g: G):
    return g.op("Log", "x"), torch.log


@case("Softplus/basic", (3, 4, 5), sample=normal(2.0))
def _softplus(g: G):
    return g.op("Softplus", "x"), F.softplus


# ---------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------

def _max_pool(g: G, kernel, strides=None, pads=None, dilations=None, ceil_mode=0, auto_pad=None, x_spatial=None):
    y = g.op("MaxPool", "x", kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
             ceil_mode=ceil_mode or None, auto_pad=auto_pad)
    n = len(kernel)
    strides_, dilations_ = strides or [1] * n, dilations or [1] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        explicit = same_pads(x_spatial, kernel, strides_, dilations_, auto_pad == "SAME_UPPER")
    else:
        explicit = pads or [0] * 2 * n
    pool = {1: F.max_pool1d, 2: F.max_pool2d}[n]
    begins, ends = explicit[:n], explicit[n:]
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        return y, lambda x: pool(x, kernel, strides_, begins, dilations_, ceil_mode=bool(ceil_mode))
    return y, lambda x: pool(torch_pad(x, explicit, -math.inf), kernel, strides_, 0, dilations_,
                             ceil_mode=bool(ceil_mode))


DISTINCT = distinct()
case("MaxPool/3x3_s2_p1_overlapping", (3, 8, 8), sample=DISTINCT)(
    lambda g: _max_pool(g, [3, 3], [2, 2], [1, 1, 1, 1]))
case("MaxPool/3x3_s2_ceil_mode", (3, 8, 8), sample=DISTINCT)(lambda g: _max_pool(g, [3, 3], [2, 2], ceil_mode=1))
case("MaxPool/3x3_s2_ceil_mode_pads1", (3, 8, 7), sample=DISTINCT)(
    lambda g: _max_pool(g, [3, 3], [2, 2], [1, 1, 1, 1], ceil_mode=1))
case("MaxPool/2x2_s2", (3, 6, 6), sample=DISTINCT)(lambda g: _max_pool(g, [2, 2], [2, 2]))
case("MaxPool/2x2_s3_pads1", (3, 8, 7), sample=DISTINCT)(  # windows apart: the MaxUnpool form
    lambda g: _max_pool(g, [2, 2], [3, 3], [1, 1, 1, 1]))
case("MaxPool/3x3_s1_p1_inception", (3, 6, 6), sample=DISTINCT)(lambda g: _max_pool(g, [3, 3], None, [1, 1, 1, 1]))
case("MaxPool/dilations2", (3, 7, 7), sample=DISTINCT)(lambda g: _max_pool(g, [2, 2], [1, 1], dilations=[2, 2]))
case("MaxPool/dilations2_s2_pads1", (3, 8, 8), sample=DISTINCT)(
    lambda g: _max_pool(g, [3, 3], [2, 2], [1, 1, 1, 1], dilations=[2, 2]))
case("MaxPool/asym_pads", (3, 7, 7), sample=DISTINCT)(lambda g: _max_pool(g, [3, 3], [2, 2], [0, 1, 1, 0]))
case("MaxPool/same_upper_s2", (3, 8, 8), sample=DISTINCT)(
    lambda g: _max_pool(g, [3, 3], [2, 2], auto_pad="SAME_UPPER", x_spatial=[8, 8]))
case("MaxPool/1d_k3_s2", (3, 11), sample=DISTINCT)(lambda g: _max_pool(g, [3], [2]))


def _avg_pool(g: G, kernel, strides=None, pads=None, ceil_mode=0, include=0, auto_pad=None, x_spatial=None):
    y = g.op("AveragePool", "x", kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=ceil_mode or None,
             count_include_pad=include, auto_pad=auto_pad)
    n = len(kernel)
    strides_ = strides or [1] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        explicit = same_pads(x_spatial, kernel, strides_, [1] * n, auto_pad == "SAME_UPPER")
    else:
        explicit = pads or [0] * 2 * n
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d}[n]
    begins, ends = explicit[:n], explicit[n:]
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        return y, lambda x: pool(x, kernel, strides_, begins, ceil_mode=bool(ceil_mode),
                                 count_include_pad=bool(include))
    if ceil_mode:
        return y, None
    area = float(np.prod(kernel))

    def fn(x):  # asymmetric padding: window sums of the zero-padded input over the count of cells averaged
        sums = pool(torch_pad(x, explicit), kernel, strides_) * area
        ones = torch.ones_like(x[:1, :1])
        counts = pool(torch_pad(ones, explicit, 1.0 if include else 0.0), kernel, strides_) * area
        return sums / counts
    return y, fn


case("AveragePool/3x3_s1_p1_exclude_pad", (3, 6, 6))(lambda g: _avg_pool(g, [3, 3], None, [1, 1, 1, 1]))
case("AveragePool/3x3_s1_p1_include_pad", (3, 6, 6))(lambda g: _avg_pool(g, [3, 3], None, [1, 1, 1, 1], include=1))
case("AveragePool/2x2_s2", (3, 6, 6))(lambda g: _avg_pool(g, [2, 2], [2, 2]))
case("AveragePool/3x3_s2_ceil_exclude", (3, 8, 8))(lambda g: _avg_pool(g, [3, 3], [2, 2], ceil_mode=1))
case("AveragePool/3x3_s2_ceil_include", (3, 8, 8))(lambda g: _avg_pool(g, [3, 3], [2, 2], ceil_mode=1, include=1))
case("AveragePool/3x3_s2_p1_ceil_exclude", (3, 8, 7))(
    lambda g: _avg_pool(g, [3, 3], [2, 2], [1, 1, 1, 1], ceil_mode=1))
case("AveragePool/3x3_s2_p1_ceil_include", (3, 8, 7))(
    lambda g: _avg_pool(g, [3, 3], [2, 2], [1, 1, 1, 1], ceil_mode=1, include=1))
case("AveragePool/asym_pads_exclude", (3, 7, 7))(lambda g: _avg_pool(g, [3, 3], [2, 2], [0, 1, 1, 0]))
case("AveragePool/asym_pads_include", (3, 7, 7))(lambda g: _avg_pool(g, [3, 3], [2, 2], [0, 1, 1, 0], include=1))
case("AveragePool/same_upper_s2_exclude", (3, 8, 8))(
    lambda g: _avg_pool(g, [3, 3], [2, 2], auto_pad="SAME_UPPER", x_spatial=[8, 8]))
case("AveragePool/1d_k3_s2_p1_include", (3, 10))(lambda g: _avg_pool(g, [3], [2], [1, 1], include=1))


@case("GlobalAveragePool/basic", (3, 4, 5))
def _gap(g: G):
    return g.op("GlobalAveragePool", "x"), lambda x: x.mean((2, 3), keepdim=True)


@case("GlobalMaxPool/basic", (3, 4, 5), sample=DISTINCT)
def _gmp(g: G):
    return g.op("GlobalMaxPool", "x"), lambda x: x.amax((2, 3), keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# Normalisation (inference)
# ---------------------------------------------------------------------------------------------------------

@case("BatchNormalization/inference", (3, 4, 5))
def _batch_norm(g: G):
    scale, bias, mean, var = g.randn(3), g.randn(3), g.randn(3), g.uniform(0.3, 2.0, 3)
    y = g.op("BatchNormalization", "x", g.const(scale), g.const(bias), g.const(mean), g.const(var), epsilon=1e-3)
    return y, lambda x: F.batch_norm(x, T(mean), T(var), T(scale), T(bias), training=False, eps=1e-3)


@case("InstanceNormalization/basic", (3, 4, 5))
def _instance_norm(g: G):
    scale, bias = g.randn(3), g.randn(3)
    y = g.op("InstanceNormalization", "x", g.const(scale), g.const(bias), epsilon=1e-4)
    return y, lambda x: F.instance_norm(x, weight=T(scale), bias=T(bias), eps=1e-4)


@case("LayerNormalization/last_axis", (4, 6))
def _layer_norm(g: G):
    scale, bias = g.randn(6), g.randn(6)
    y = g.op("LayerNormalization", "x", g.const(scale), g.const(bias), axis=-1, epsilon=1e-5)
    return y, lambda x: F.layer_norm(x, (6,), T(scale), T(bias), eps=1e-5)


@case("LayerNormalization/axis1_no_bias", (3, 4, 5))
def _layer_norm_axis1(g: G):
    scale = g.randn(3, 4, 5)
    y = g.op("LayerNormalization", "x", g.const(scale), axis=1, epsilon=1e-3)
    return y, lambda x: F.layer_norm(x, (3, 4, 5), T(scale), None, eps=1e-3)


@case("LayerNormalization/channels_convnext", (4, 3, 3))
def _layer_norm_channels(g: G):
    scale, bias = g.randn(4), g.randn(4)
    t = g.op("Transpose", "x", perm=[0, 2, 3, 1])
    y = g.op("Transpose", g.op("LayerNormalization", t, g.const(scale), g.const(bias), epsilon=1e-6),
             perm=[0, 3, 1, 2])
    return y, lambda x: F.layer_norm(x.permute(0, 2, 3, 1), (4,), T(scale), T(bias), eps=1e-6).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# Reductions: axes as attribute (opset 17 ReduceMean / ReduceMax) or as input (ReduceSum since 13, all since 18)
# ---------------------------------------------------------------------------------------------------------

def _reduce(g: G, op: str, axes: list[int], keepdims: int, as_input: bool):
    if as_input:
        y = g.op(op, "x", g.ints(axes), keepdims=keepdims)
    else:
        y = g.op(op, "x", axes=axes, keepdims=keepdims)
    keep = bool(keepdims)
    fn = {"ReduceMean": lambda x: x.mean(axes, keepdim=keep), "ReduceSum": lambda x: x.sum(axes, keepdim=keep),
          "ReduceMax": lambda x: x.amax(axes, keepdim=keep), "ReduceMin": lambda x: x.amin(axes, keepdim=keep)}[op]
    return y, fn


for _op, _sample in (("ReduceMean", None), ("ReduceMax", DISTINCT), ("ReduceSum", None), ("ReduceMin", DISTINCT)):
    if _op != "ReduceSum":  # at opset 17 only ReduceSum takes its axes as an input
        case(f"{_op}/opset17_attr_axes23_keepdims1", (3, 4, 5), sample=_sample)(
            lambda g, op=_op: _reduce(g, op, [2, 3], 1, False))
        case(f"{_op}/opset17_attr_axis1_keepdims0", (3, 4, 5), sample=_sample)(
            lambda g, op=_op: _reduce(g, op, [1], 0, False))
    else:
        case(f"{_op}/opset17_input_axes23_keepdims1", (3, 4, 5), sample=_sample)(
            lambda g, op=_op: _reduce(g, op, [2, 3], 1, True))
        case(f"{_op}/opset17_input_axis1_keepdims0", (3, 4, 5), sample=_sample)(
            lambda g, op=_op: _reduce(g, op, [1], 0, True))
    case(f"{_op}/opset18_input_axes_neg1_1_keepdims0", (3, 4, 5), opset=18, sample=_sample)(
        lambda g, op=_op: _reduce(g, op, [-1, 1], 0, True))
    case(f"{_op}/opset18_input_axis2_keepdims1", (3, 4, 5), opset=18, sample=_sample)(
        lambda g, op=_op: _reduce(g, op, [2], 1, True))
case("ReduceSum/opset11_attr_axes_converted", (3, 4, 5), opset=11)(
    lambda g: _reduce(g, "ReduceSum", [1, 3], 0, False))


# ---------------------------------------------------------------------------------------------------------
# Shape and data movement
# ---------------------------------------------------------------------------------------------------------

@case("Flatten/axis1", (3, 4, 5))
def _flatten(g: G):
    return g.op("Flatten", "x", axis=1), lambda x: x.reshape(len(x), -1)


@case("Flatten/default_axis_rank3", (3, 4))
def _flatten_default(g: G):
    return g.op("Flatten", "x"), lambda x: x.reshape(len(x), -1)


@case("Reshape/minus1_batch", (3, 4, 5))
def _reshape(g: G):
    return g.op("Reshape", "x", g.ints([-1, 12, 5])), lambda x: x.reshape(-1, 12, 5)


@case("Reshape/zero_copies_batch", (3, 4, 5))
def _reshape_zero(g: G):
    return g.op("Reshape", "x", g.ints([0, 5, -1])), lambda x: x.reshape(len(x), 5, -1)


@case("Reshape/runtime_shape_from_Shape", (3, 4, 5))
def _reshape_runtime(g: G):  # the shape is computed in the graph (Shape -> Slice -> Concat), as exporters do
    batch = g.op("Slice", g.op("Shape", "x"), g.ints([0]), g.ints([1]))
    shape = g.op("Concat", batch, g.ints([20, 3]), axis=0)
    return g.op("Reshape", "x", shape), lambda x: x.reshape(len(x), 20, 3)


@case("Transpose/nhwc", (3, 4, 5))
def _transpose(g: G):
    return g.op("Transpose", "x", perm=[0, 2, 3, 1]), lambda x: x.permute(0, 2, 3, 1)


@case("Transpose/to_nchw", (3, 4, 5))
def _transpose_back(g: G):
    return g.op("Transpose", "x", perm=[0, 3, 1, 2]), lambda x: x.permute(0, 3, 1, 2)


@case("Squeeze/axis2", (3, 1, 5))
def _squeeze(g: G):
    return g.op("Squeeze", "x", g.ints([2])), lambda x: x.squeeze(2)


@case("Squeeze/negative_axes", (1, 3, 1))
def _squeeze_neg(g: G):
    return g.op("Squeeze", "x", g.ints([-1, 1])), lambda x: x[:, 0, :, 0]


@case("Unsqueeze/axes_1_and_last", (3, 4))
def _unsqueeze(g: G):
    return g.op("Unsqueeze", "x", g.ints([1, -1])), lambda x: x[:, None, :, :, None]


@case("Concat/axis1_three_uses_of_x", (3, 4, 5))
def _concat(g: G):
    c = g.randn(1, 3, 1, 1)
    part = g.op("Slice", "x", g.ints([1]), g.ints([3]), g.ints([1]))
    y = g.op("Concat", "x", g.op("Mul", "x", g.const(c)), part, axis=1)
    return y, lambda x: torch.cat([x, x * T(c), x[:, 1:3]], 1)


@case("Concat/last_axis_with_constant_of_shape", (3, 4, 5))
def _concat_const(g: G):  # a batch-sized constant from Shape -> ConstantOfShape: off the float path
    batch = g.op("Slice", g.op("Shape", "x"), g.ints([0]), g.ints([1]))
    filler = g.op("ConstantOfShape", g.op("Concat", batch, g.ints([3, 4, 2]), axis=0),
                  value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]))
    y = g.op("Concat", filler, "x", axis=-1)
    return y, lambda x: torch.cat([torch.full((len(x), 3, 4, 2), 0.5, dtype=x.dtype), x], -1)


@case("Split/uneven_all_outputs_reordered", (6, 4))
def _split(g: G):
    a, b, c = g.op("Split", "x", g.ints([1, 3, 2]), axis=1, outputs=3)
    y = g.op("Concat", c, g.op("Mul", a, g.const(2.0)), b, axis=1)
    return y, lambda x: torch.cat([x[:, 4:], 2 * x[:, :1], x[:, 1:4]], 1)


@case("Split/uneven_some_outputs_unused", (6, 4))
def _split_some(g: G):
    a, _, c = g.op("Split", "x", g.ints([2, 3, 1]), axis=1, outputs=3)
    return g.op("Concat", a, c, axis=1), lambda x: torch.cat([x[:, :2], x[:, 5:]], 1)


@case("Split/only_last_output_used", (3, 7))
def _split_last(g: G):
    _, b = g.op("Split", "x", g.ints([4, 3]), axis=-1, outputs=2)
    return b, lambda x: x[:, :, 4:]


@case("Split/equal_no_split_input", (6, 4))
def _split_equal(g: G):
    a, b, c = g.op("Split", "x", axis=1, outputs=3)
    y = g.op("Add", g.op("Sub", a, b), g.op("Mul", c, c))
    return y, lambda x: x[:, 0:2] - x[:, 2:4] + x[:, 4:6] ** 2


@case("Split/opset18_num_outputs_uneven", (3, 7), opset=18)
def _split_num_outputs(g: G):
    a, b, c = g.op("Split", "x", axis=2, num_outputs=3, outputs=3)
    return g.op("Concat", c, a, axis=2), lambda x: torch.cat([x[:, :, 6:], x[:, :, :3]], 2)


def _slice(g: G, starts, ends, axes=None, steps=None, index=None):
    inputs = ["x", g.ints(starts), g.ints(ends)]
    if axes is not None:
        inputs.append(g.ints(axes))
    if steps is not None:
        inputs.append(g.ints(steps))
    return g.op("Slice", *inputs), index


def _flip_slice(x: torch.Tensor, axis: int, start: int, stop: int | None, step: int) -> torch.Tensor:
    """Python slicing with a negative step (torch tensors refuse negative steps)."""
    keep = list(range(x.shape[axis]))[slice(start, stop, step)]
    return x.index_select(axis, torch.tensor(keep, dtype=torch.long))


case("Slice/step1", (3, 6, 5))(lambda g: _slice(g, [1], [4], [2], index=lambda x: x[:, :, 1:4]))
case("Slice/negative_start_end_past_size", (3, 6, 5))(
    lambda g: _slice(g, [-3], [INT_MAX], [3], index=lambda x: x[:, :, :, -3:]))
case("Slice/step2", (3, 6, 5))(lambda g: _slice(g, [0], [5], [2], [2], index=lambda x: x[:, :, 0:5:2]))
case("Slice/step3_clamped_end", (3, 7, 5))(lambda g: _slice(g, [1], [100], [2], [3], index=lambda x: x[:, :, 1::3]))
case("Slice/reverse_step_minus1", (3, 6, 5))(
    lambda g: _slice(g, [-1], [-INT_MAX], [3], [-1], index=lambda x: _flip_slice(x, 3, -1, None, -1)))
case("Slice/step_minus2", (3, 6, 5))(
    lambda g: _slice(g, [4], [0], [2], [-2], index=lambda x: _flip_slice(x, 2, 4, 0, -2)))
case("Slice/several_axes_mixed_steps", (3, 6, 5))(
    lambda g: _slice(g, [1, 0, 3], [3, 6, 0], [1, 2, -1], [1, 2, -1],
                     index=lambda x: _flip_slice(x[:, 1:3, 0:6:2], 3, 3, 0, -1)))
case("Slice/axes_omitted_full_batch_range", (3, 6, 5))(
    lambda g: _slice(g, [0, 1], [INT_MAX, 3], index=lambda x: x[:, 1:3]))
case("Slice/batch_axis_full_range_explicit", (3, 6, 5))(
    lambda g: _slice(g, [0, 2], [INT_MAX, -1], [0, 2], index=lambda x: x[:, :, 2:-1]))


def _pad(g: G, pads, mode="constant", value=None, axes=None):
    inputs = ["x", g.ints(pads)]
    if value is not None or axes is not None:
        inputs.append(g.const(value) if value is not None else "")
    if axes is not None:
        inputs.append(g.ints(axes))
    y = g.op("Pad", *inputs, mode=mode)
    n = len(pads) // 2
    rank = 4
    full = [0] * 2 * rank
    for k, a in enumerate(axes if axes is not None else range(n)):
        full[a % rank], full[rank + a % rank] = pads[k], pads[n + k]
    spatial = full[2:rank] + full[rank + 2:]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]

    def fn(x):
        spec: list[int] = []
        for i in reversed(range(2)):
            spec += [spatial[i], spatial[2 + i]]
        if torch_mode == "constant":
            return F.pad(x, spec, value=0.0 if value is None else value)
        return F.pad(x, spec, mode=torch_mode)
    return y, fn


case("Pad/constant_zero", (3, 4, 5))(lambda g: _pad(g, [0, 0, 1, 2, 0, 0, 2, 1]))
case("Pad/constant_value", (3, 4, 5))(lambda g: _pad(g, [0, 0, 2, 0, 0, 0, 1, 3], value=0.7))
case("Pad/constant_negative_crops", (3, 4, 5))(lambda g: _pad(g, [0, 0, -1, 2, 0, 0, 1, -2]))
case("Pad/reflect", (3, 4, 5))(lambda g: _pad(g, [0, 0, 2, 1, 0, 0, 1, 3], mode="reflect"))
case("Pad/edge", (3, 4, 5))(lambda g: _pad(g, [0, 0, 1, 3, 0, 0, 2, 1], mode="edge"))
case("Pad/opset18_axes_input_reflect", (3, 4, 5), opset=18)(
    lambda g: _pad(g, [1, 2, 2, 1], mode="reflect", axes=[2, -1]))
case("Pad/opset19_wrap", (3, 4, 5), opset=19)(lambda g: _pad(g, [0, 0, 1, 2, 0, 0, 2, 1], mode="wrap"))


@case("Identity/basic", (3, 4))
def _identity(g: G):
    return g.op("Identity", "x"), lambda x: x


@case("Dropout/inference", (3, 4))
def _dropout(g: G):
    return g.op("Dropout", "x", g.const(0.3)), lambda x: x


@case("Dropout/with_mask_output", (3, 4))
def _dropout_mask(g: G):
    y, _ = g.op("Dropout", "x", outputs=2)
    return y, lambda x: x


@case("Cast/through_double", (3, 4, 5))
def _cast(g: G):
    d = g.op("Cast", "x", to=TensorProto.DOUBLE)
    y = g.op("Cast", g.op("Mul", d, g.const(1.5, np.float64)), to=TensorProto.FLOAT)
    return y, lambda x: 1.5 * x


@case("Cast/float_to_float", (3, 4))
def _cast_same(g: G):
    return g.op("Cast", "x", to=TensorProto.FLOAT), lambda x: x


# ---------------------------------------------------------------------------------------------------------
# Resize
# ---------------------------------------------------------------------------------------------------------

def _resize(g: G, mode: str, scales=None, sizes=None, coord="half_pixel", nearest=None, axes=None, torch_fn=None,
            **extra):
    inputs = ["x", "", g.const(scales) if scales is not None else ""]
    if sizes is not None and axes is None:  # sizes for every axis: the batch size comes from Shape at run time
        batch_channels = g.op("Slice", g.op("Shape", "x"), g.ints([0]), g.ints([2]))
        inputs.append(g.op("Concat", batch_channels, g.ints(sizes), axis=0))
    elif sizes is not None:
        inputs.append(g.ints(sizes))
    y = g.op("Resize", *inputs, mode=mode, coordinate_transformation_mode=coord, nearest_mode=nearest, axes=axes,
             **extra)
    return y, torch_fn


X_RESIZE = (2, 4, 5)
case("Resize/nearest_scales2_asymmetric_floor", X_RESIZE)(
    lambda g: _resize(g, "nearest", scales=[1, 1, 2, 2], coord="asymmetric", nearest="floor",
                      torch_fn=lambda x: F.interpolate(x, scale_factor=2, mode="nearest")))
case("Resize/nearest_sizes_asymmetric_floor", X_RESIZE)(
    lambda g: _resize(g, "nearest", sizes=[7, 9], coord="asymmetric", nearest="floor",
                      torch_fn=lambda x: F.interpolate(x, size=(7, 9), mode="nearest")))
case("Resize/nearest_sizes_half_pixel_round_prefer_floor", X_RESIZE)(
    lambda g: _resize(g, "nearest", sizes=[7, 9], coord="half_pixel", nearest="round_prefer_floor"))
case("Resize/nearest_scales2_half_pixel_round_prefer_ceil", X_RESIZE)(
    lambda g: _resize(g, "nearest", scales=[1, 1, 2, 2], coord="half_pixel", nearest="round_prefer_ceil",
                      torch_fn=lambda x: F.interpolate(x, scale_factor=2, mode="nearest-exact")))
case("Resize/nearest_sizes_align_corners_ceil", X_RESIZE)(
    lambda g: _resize(g, "nearest", sizes=[7, 9], coord="align_corners", nearest="ceil"))
case("Resize/nearest_scales3_pytorch_half_pixel_floor", X_RESIZE)(
    lambda g: _resize(g, "nearest", scales=[1, 1, 3, 3], coord="pytorch_half_pixel", nearest="floor"))
case("Resize/nearest_downsample_scales0.5", (2, 6, 8))(
    lambda g: _resize(g, "nearest", scales=[1, 1, 0.5, 0.5], coord="asymmetric", nearest="floor",
                      torch_fn=lambda x: F.interpolate(x, scale_factor=0.5, mode="nearest")))
case("Resize/linear_scales2_half_pixel", X_RESIZE)(
    lambda g: _resize(g, "linear", scales=[1, 1, 2, 2],
                      torch_fn=lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)))
case("Resize/linear_sizes_align_corners", X_RESIZE)(
    lambda g: _resize(g, "linear", sizes=[7, 9], coord="align_corners",
                      torch_fn=lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True)))
case("Resize/linear_sizes_pytorch_half_pixel", X_RESIZE)(
    lambda g: _resize(g, "linear", sizes=[7, 9], coord="pytorch_half_pixel",
                      torch_fn=lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False)))
case("Resize/linear_scales2_asymmetric", X_RESIZE)(
    lambda g: _resize(g, "linear", scales=[1, 1, 2, 2], coord="asymmetric"))
case("Resize/linear_downsample_half_pixel", (2, 6, 8))(
    lambda g: _resize(g, "linear", scales=[1, 1, 0.5, 0.5],
                      torch_fn=lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)))
case("Resize/opset18_axes_sizes_nearest", X_RESIZE, opset=18)(
    lambda g: _resize(g, "nearest", sizes=[7, 9], axes=[2, 3], coord="asymmetric", nearest="floor",
                      torch_fn=lambda x: F.interpolate(x, size=(7, 9), mode="nearest")))
case("Resize/cubic_scales2", X_RESIZE)(
    lambda g: _resize(g, "cubic", scales=[1, 1, 2, 2],
                      torch_fn=lambda x: F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)))
case("Resize/opset18_axes_scales", X_RESIZE, opset=18)(
    lambda g: _resize(g, "linear", scales=[2, 3], axes=[2, 3], coord="align_corners",
                      torch_fn=lambda x: F.interpolate(x, scale_factor=(2, 3), mode="bilinear",
                                                       align_corners=True)))
case("Resize/opset18_linear_antialias_downsample", (2, 6, 8), opset=18)(
    lambda g: _resize(g, "linear", scales=[1, 1, 0.5, 0.5], antialias=1))  # torch's antialias filter differs


# ---------------------------------------------------------------------------------------------------------
# Expand, Gather, Where
# ---------------------------------------------------------------------------------------------------------

@case("Expand/middle_axis", (1, 5))
def _expand(g: G):
    return g.op("Expand", "x", g.ints([1, 3, 5])), lambda x: x.expand(-1, 3, 5)


@case("Expand/last_axis_lower_rank_shape", (3, 1))
def _expand_last(g: G):
    return g.op("Expand", "x", g.ints([3, 4])), lambda x: x.expand(-1, 3, 4)


@case("Expand/two_axes", (1, 1, 5))
def _expand_two(g: G):
    return g.op("Expand", "x", g.ints([1, 2, 3, 1])), lambda x: x.expand(-1, 2, 3, 5)


@case("Gather/scalar_index_axis1", (4, 5))
def _gather_scalar(g: G):
    return g.op("Gather", "x", g.const(2, np.int64), axis=1), lambda x: x[:, 2]


@case("Gather/vector_with_repeats_axis1", (4, 5))
def _gather_vector(g: G):
    return g.op("Gather", "x", g.ints([2, 0, 2]), axis=1), lambda x: x[:, [2, 0, 2]]


@case("Gather/negative_indices_axis2", (4, 5))
def _gather_negative(g: G):
    return g.op("Gather", "x", g.ints([-1, 0]), axis=2), lambda x: x[:, :, [4, 0]]


@case("Gather/scalar_negative_last_axis", (4, 5))
def _gather_negative_scalar(g: G):
    return g.op("Gather", "x", g.const(-2, np.int64), axis=-1), lambda x: x[:, :, 3]


@case("Gather/matrix_indices", (3, 5))
def _gather_matrix(g: G):
    idx = np.array([[0, 1], [3, -2]], np.int64)
    return g.op("Gather", "x", g.const(idx, np.int64), axis=2), lambda x: x[:, :, torch.from_numpy(idx % 5)]


@case("Gather/int32_indices", (4, 5))
def _gather_int32(g: G):
    return g.op("Gather", "x", g.const([3, 1], np.int32), axis=1), lambda x: x[:, [3, 1]]


def _cond(g: G, *shape: int) -> tuple[str, np.ndarray]:
    mask = g.rng.random(shape) < 0.5
    return g.const(mask, np.bool_), mask


@case("Where/x_where_true", (3, 4, 5))
def _where(g: G):
    name, mask = _cond(g, 3, 4, 5)
    c = g.randn(3, 4, 5)
    return g.op("Where", name, "x", g.const(c)), lambda x: torch.where(torch.from_numpy(mask), x, T(c))


@case("Where/x_where_false", (3, 4, 5))
def _where_false(g: G):
    name, mask = _cond(g, 4, 5)
    c = g.randn(1)
    return g.op("Where", name, g.const(c), "x"), lambda x: torch.where(torch.from_numpy(mask), T(c), x)


@case("Where/both_branches_on_path", (3, 4, 5))
def _where_both(g: G):
    name, mask = _cond(g, 1, 1, 5)
    y = g.op("Where", name, "x", g.op("Mul", "x", g.const(-2.0)))
    return y, lambda x: torch.where(torch.from_numpy(mask), x, -2.0 * x)


@case("Where/x_broadcast", (3, 1, 5))
def _where_broadcast(g: G):
    name, mask = _cond(g, 3, 4, 5)
    c = g.randn(3, 4, 1)
    return g.op("Where", name, "x", g.const(c)), lambda x: torch.where(torch.from_numpy(mask), x, T(c))


# ---------------------------------------------------------------------------------------------------------
# Models for the ReLU-rule and unsupported-op tests
# ---------------------------------------------------------------------------------------------------------

def two_layer_model(kind: str, seed: int = 0, features: int = 8, hidden: int = 10, outputs: int = 6):
    """x (N, features) -> MatMul W1 -> act -> MatMul W2 -> act -> Mul w -> Flatten -> ReduceSum: the ReLU rule
    is applied twice, so guided's and deconvnet's [dy > 0] gate sees gradients of both signs.
    Returns the model, (W1, W2, w), the ReLU upper bound (None or 6) and the activation node names."""
    g = G(seed)
    W1, W2 = g.randn(features, hidden), g.randn(hidden, outputs, scale=0.5)
    acts, upper = [], None

    def act(t: str) -> str:
        nonlocal upper
        k = len(g.nodes)
        if kind == "Relu":
            out = g.op("Relu", t)
        elif kind == "Clip(0,6)":
            out, upper = g.op("Clip", t, g.const(0.0), g.const(6.0)), 6.0
        elif kind == "Clip(0)":
            out = g.op("Clip", t, g.const(0.0))
        elif kind == "Max(x,0)":
            out = g.op("Max", t, g.const(0.0))
        elif kind == "Max(0,x)":
            out = g.op("Max", g.const(0.0), t)
        elif kind == "LeakyRelu":
            out = g.op("LeakyRelu", t, alpha=0.2)
        else:
            raise ValueError(kind)
        acts.append(g.nodes[k].name)
        return out

    h = act(g.op("MatMul", "x", g.const(W1)))
    y = act(g.op("MatMul", h, g.const(W2)))
    w = g.randn(1, outputs)
    g.inits["proj_w"] = w
    nodes = g.nodes + [helper.make_node("Mul", [y, "proj_w"], ["proj_y"], name="proj_mul"),
                       helper.make_node("Flatten", ["proj_y"], ["proj_flat"], name="proj_flatten", axis=1)]
    _reduce_sum(nodes, g.inits, "proj_flat", "out", 17)
    return make_model(nodes, g.inits, (features,), ["out"], 17), (W1, W2, w), upper, acts
