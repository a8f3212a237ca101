"""What to explain: a class score, or one neuron of any layer. Builds the gradient seed inside the graph, so one
exported model serves every input without a round-trip to the host."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx

from .builder import GraphBuilder
from .errors import InputError, LayerNotFoundError
from .model import ForwardGraph

Neuron = Union[str, int, tuple, list, None]

#: Ops that pass a class vector through unchanged in meaning (looked through to find the logits).
_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class TargetSpec:
    """A class target (`layer` is None) or a neuron target.

    output: which model output holds the class scores (default: the first).
    probability: target the softmax probability rather than the logit feeding it.
    layer: a tensor name, or the name of the node that produces it.
    neuron: "max" (per sample, the most activated neuron), a channel index, or a position: (c, y, x) or the
        layer's full index without the batch axis.
    """

    output: str | None = None
    probability: bool = False
    layer: str | None = None
    neuron: Neuron = None

    def describe(self) -> str:
        if self.layer is None:
            return f"class of output {self.output!r}" + (" (probability)" if self.probability else "")
        return f"neuron {self.neuron!r} of layer {self.layer!r}"


@dataclass
class Seed:
    tensor: str  # where the backward walk starts
    grad: str  # d(target)/d(tensor), same shape as tensor
    chosen: str  # int64 [N]: the class or flat neuron index actually used per sample
    target_input: str | None  # name of the graph input that takes per-sample class targets, if any
    scores: str  # the tensor the class index refers to
    note: str  # human-readable description of the choice made


def resolve_layer(fwd: ForwardGraph, layer: str) -> str:
    """A tensor name from a tensor or node name; a wrong name suggests the closest ones."""
    if layer in fwd.producer or layer == fwd.input_name:
        return layer
    by_node = {n.name: n.output[0] for n in fwd.graph.node if n.output}
    if layer in by_node:
        return by_node[layer]
    raise LayerNotFoundError(layer, list(fwd.producer) + list(by_node))


def class_scores(fwd: ForwardGraph, output: str | None, probability: bool) -> tuple[str, str]:
    """The tensor holding the class scores for `output`: the logits feeding a final Softmax unless
    `probability` is asked for."""
    names = [o.name for o in fwd.graph.output]
    if output is None:
        output = names[0]
    elif output not in names:
        raise LayerNotFoundError(output, names)
    if probability:
        return output, f"probability output {output!r}"
    tensor = output
    while tensor in fwd.producer and fwd.producer[tensor].op_type in _PASS_THROUGH:
        tensor = fwd.producer[tensor].input[0]
    node = fwd.producer.get(tensor)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return node.input[0], f"logits {node.input[0]!r} feeding the {node.op_type} of output {output!r}"
    return output, f"output {output!r}"


def _per_sample(fwd: ForwardGraph, b: GraphBuilder, tensor: str) -> tuple[str, int, list[int]]:
    dims = list(fwd.shape(tensor))
    if not dims or any(d is None for d in dims[1:]):
        raise InputError(f"Tensor {tensor!r} has shape {dims}: a target needs a batch axis and static sizes.")
    size = int(np.prod(dims[1:]))
    return b.op("Reshape", tensor, b.ints([-1, size])), size, [-1 if d is None else d for d in dims]


def seed_tensor(fwd: ForwardGraph, spec: TargetSpec) -> str:
    """The tensor the backward walk starts from (known before any shape is needed)."""
    if spec.layer is None:
        return class_scores(fwd, spec.output, spec.probability)[0]
    return resolve_layer(fwd, spec.layer)


def build_seed(fwd: ForwardGraph, b: GraphBuilder, spec: TargetSpec) -> Seed:
    dtype = fwd.dtypes[fwd.input_name]
    if spec.layer is None:
        scores, note = class_scores(fwd, spec.output, spec.probability)
        flat, classes, dims = _per_sample(fwd, b, scores)
        target_input = "target" if "target" not in fwd.producer else "gbp_target"
        predicted = b.op("ArgMax", flat, axis=1, keepdims=0, hint="predicted")
        chosen = b.op("Where", b.op("Less", target_input, b.ints([0])), predicted, target_input, hint="chosen")
        one_hot = b.op("OneHot", chosen, b.ints([classes]), b.const([0, 1], np.float32), axis=-1)
        grad = b.op("Reshape", b.op("Cast", one_hot, to=dtype), b.ints(dims), hint="seed")
        return Seed(scores, grad, chosen, target_input, scores, note)

    tensor = resolve_layer(fwd, spec.layer)
    if not fwd.is_float(tensor):
        raise InputError(f"Layer {spec.layer!r} is not a float tensor and cannot be a target.")
    flat, size, dims = _per_sample(fwd, b, tensor)
    neuron = "max" if spec.neuron is None else spec.neuron
    if neuron == "max":
        chosen = b.op("ArgMax", flat, axis=1, keepdims=0, hint="max_neuron")
        one_hot = b.op("OneHot", chosen, b.ints([size]), b.const([0, 1], np.float32), axis=-1)
        grad = b.op("Reshape", b.op("Cast", one_hot, to=dtype), b.ints(dims), hint="seed")
        return Seed(tensor, grad, chosen, None, tensor, f"most activated neuron of {tensor!r}")
    mask, index, note = _neuron_mask(fwd, tensor, neuron)
    grad = b.op("Expand", b.const(mask, onnx.helper.tensor_dtype_to_np_dtype(dtype)), b.op("Shape", tensor),
                hint="seed")
    batch = b.op("Slice", b.op("Shape", tensor), b.ints([0]), b.ints([1]))
    chosen = b.op("Expand", b.ints([index]), batch, hint="chosen")
    return Seed(tensor, grad, chosen, None, tensor, note)


#: ONNX ops whose output is channels-first whatever the model's input layout.
_CHANNELS_FIRST = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "BatchNormalization",
                   "InstanceNormalization", "GlobalAveragePool", "GlobalMaxPool", "Resize", "DepthToSpace",
                   "SpaceToDepth"}
#: Ops that keep the layout of their (first non-constant) input.
_SAME_LAYOUT = {"Relu", "Clip", "Max", "Min", "Add", "Sub", "Mul", "Div", "Sum", "Sigmoid", "Tanh", "LeakyRelu",
                "PRelu", "HardSigmoid", "HardSwish", "Softplus", "Erf", "Gelu", "Neg", "Abs", "Exp", "Sqrt", "Pow",
                "Identity", "Dropout", "Cast", "Where", "Concat", "Pad", "Slice"}


def channel_axis_of(fwd: ForwardGraph, tensor: str) -> int:
    """The channel axis of a rank-4 tensor. ONNX's conv and pooling ops are channels-first, so inside an NHWC
    model's graph (tf2onnx, jax2onnx) most feature maps are NCHW: follow the tensor back through layout-keeping
    ops and Transposes to a channels-first op (axis 1) or to the image input (the input's layout)."""
    if tensor == fwd.input_name:
        return 3 if fwd.layout == "NHWC" else 1
    node = fwd.producer.get(tensor)
    if node is not None and node.op_type in _CHANNELS_FIRST:
        return 1
    if node is not None and (node.op_type == "Transpose" or node.op_type in _SAME_LAYOUT):
        source = next((i for i in node.input if i and fwd.const_value(i) is None and len(fwd.shapes.get(i, ())) == 4),
                      None)
        if source is not None:
            axis = channel_axis_of(fwd, source)
            if node.op_type != "Transpose":
                return axis
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [3, 2, 1, 0])
            return perm.index(axis)
    return 3 if fwd.layout == "NHWC" else 1


def _neuron_mask(fwd: ForwardGraph, tensor: str, neuron: Neuron) -> tuple[np.ndarray, int, str]:
    """A (1, ...) mask selecting a channel (summing its map) or one position of `tensor`."""
    dims = fwd.shape(tensor)[1:]
    mask = np.zeros((1, *dims), np.float64)
    channel_axis = channel_axis_of(fwd, tensor) - 1 if len(dims) == 3 else 0
    if isinstance(neuron, (int, np.integer)):
        channels = dims[channel_axis]
        if not 0 <= neuron < channels:
            raise InputError(f"Channel {neuron} is out of range: layer {tensor!r} has {channels} channels "
                             f"(shape {tuple(fwd.shape(tensor))}).")
        index = [slice(None)] * len(dims)
        index[channel_axis] = int(neuron)
        mask[(0, *index)] = 1.0
        return mask, int(neuron), f"channel {neuron} of {tensor!r} (sum of its map)"
    position = tuple(int(i) for i in neuron)
    if len(position) != len(dims) or not all(0 <= p < d for p, d in zip(position, dims)):
        raise InputError(f"Neuron {tuple(position)} is outside layer {tensor!r}, whose shape without the batch "
                         f"axis is {tuple(dims)}.")
    mask[(0, *position)] = 1.0
    return mask, int(np.ravel_multi_index(position, dims)), f"neuron {position} of {tensor!r}"
