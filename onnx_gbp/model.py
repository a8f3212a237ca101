"""Load and normalise an ONNX model, and answer questions about its forward graph.

Everything downstream (targets, backward rules, export) reads the forward graph through `ForwardGraph`:
which node produces a tensor, its static shape and dtype, and the value of constant tensors.
Normalising means: a private copy of the model, an opset our rules understand, every node named, the image
input's spatial dimensions fixed, a dynamic batch dimension, and shapes inferred for every tensor.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter

from .errors import GbpError, InputError, ModelLoadError, SymbolicShapeError

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

#: Oldest opset the gradient rules are written for; older models are converted up to it.
#: 17 gives ScatterElements(reduction="add"), LayerNormalization and axes-as-input for ReduceSum.
MIN_OPSET = 17
#: Newest IR version the pinned ONNX Runtime (1.31) accepts; onnx 1.23 writes 14, which it refuses.
MAX_IR_VERSION = 13

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
BATCH_DIM = "N"

Shape = tuple  # of int (static) or None (dynamic: the batch dimension, or unknown)


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Read a model from a path (with its external data) or copy a ModelProto. Never modifies the source."""
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"No such model file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises DecodeError, external data raises FileNotFoundError/ValidationError
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from exc
    if not proto.graph.node:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph nodes found).")
    return proto


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelLoadError("The model imports no ai.onnx opset.")


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if opset_of(model) >= MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        raise ModelLoadError(f"Could not convert the model from opset {opset_of(model)} to {MIN_OPSET}: {exc}") from exc
    return converted


def _topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph walks assume node order is topological, as the ONNX spec asks; ONNX Runtime also runs
    hand-edited graphs that are not, so sort those (with onnx-graphsurgeon)."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        if not all(i in known for i in node.input):
            break
        known.update(node.output)
    else:
        return model
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.toposort()
    sorted_model = gs.export_onnx(graph)
    sorted_model.ir_version = model.ir_version
    del sorted_model.opset_import[:]
    sorted_model.opset_import.extend(model.opset_import)
    sorted_model.metadata_props.extend(model.metadata_props)
    return sorted_model


def _name_everything(graph: onnx.GraphProto) -> None:
    """Give every node a unique name, so error messages and metadata can point at nodes."""
    taken: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in taken:
            name = f"{name}_{i}"
        node.name = name
        taken.add(name)


def dims_of(value_info: onnx.ValueInfoProto) -> Shape | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _set_dims(value_info: onnx.ValueInfoProto, dims: Shape) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if d is None:
            dim.dim_param = BATCH_DIM
        else:
            dim.dim_value = int(d)


def pick_image_input(model: onnx.ModelProto, name: str | None = None) -> onnx.ValueInfoProto:
    """The graph input to explain: by name, else the first float input of rank 4, else the first float input."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if name is not None:
        for i in inputs:
            if i.name == name:
                return i
        raise InputError(f"The model has no input named {name!r}; its inputs are {[i.name for i in inputs]}.")
    floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOAT_TYPES]
    rank4 = [i for i in floats if (dims_of(i) is not None and len(dims_of(i)) == 4)]
    if rank4 or floats:
        return (rank4 or floats)[0]
    raise InputError(f"The model has no float input to explain; its inputs are {[i.name for i in inputs]}.")


def detect_layout(dims: Shape, consumers: list[onnx.NodeProto]) -> str:
    """NCHW or NHWC for a rank-4 image input. A Transpose to NCHW right after the input settles it;
    otherwise the axis holding 1, 3 or 4 channels does."""
    if len(dims) != 4:
        return "NC..."
    for node in consumers:
        if node.op_type == "Transpose":
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            if perm and list(perm[0]) == [0, 3, 1, 2]:
                return "NHWC"
    c_first, c_last = dims[1], dims[3]
    if c_last in (1, 3, 4) and c_first not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


@dataclass
class ForwardGraph:
    """A normalised private copy of the user's model and the facts the gradient rules need."""

    model: onnx.ModelProto
    input_name: str
    input_shape: Shape  # batch is None, the rest static
    layout: str
    fixed_batch: int | None  # the model's batch size when it could not be made dynamic
    shapes: dict[str, Shape] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    probe_error: str | None = None  # why running the model to measure shapes failed, if it did

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @property
    def opset(self) -> int:
        return opset_of(self.model)

    @cached_property
    def producer(self) -> dict[str, onnx.NodeProto]:
        return {out: node for node in self.graph.node for out in node.output if out}

    @cached_property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node)
        return users

    @cached_property
    def _initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    @cached_property
    def _constant_cache(self) -> dict[str, np.ndarray | None]:
        return {}

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of a tensor fixed at export time (initializer, Constant node, or a chain of
        shape-free ops on those), else None. Graph inputs that shadow initializers are not constant."""
        if not name:
            return None
        cache = self._constant_cache
        if name in cache:
            return cache[name]
        value = None
        graph_inputs = {i.name for i in self.graph.input}
        if name in self._initializers and name not in graph_inputs:
            value = numpy_helper.to_array(self._initializers[name])
        elif name in self.producer:
            node = self.producer[name]
            if node.op_type == "Constant":
                value = _constant_node_value(node)
            elif node.op_type == "Gather" and self.producer.get(node.input[0], node).op_type == "Shape":
                value = _static_sizes(self, self.producer[node.input[0]], self.const_value(node.input[1]))
            elif node.op_type == "Shape":
                value = _static_sizes(self, node, None)
            elif node.op_type in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Neg",
                                  "Add", "Sub", "Mul", "Div", "Gather", "Slice", "Transpose", "ConstantOfShape"):
                value = _fold(self, node)  # TorchScript computes F.pad's pads with the last five, for one
        cache[name] = value
        return value

    def shape(self, name: str) -> Shape:
        if name not in self.shapes:
            why = f" and ONNX Runtime could not run the model to measure it ({self.probe_error})" \
                if self.probe_error else ""
            raise GbpError(f"The shape of tensor {name!r} is unknown after shape inference{why}.")
        return self.shapes[name]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def is_float(self, name: str) -> bool:
        return self.dtypes.get(name) in FLOAT_TYPES

    @cached_property
    def tensor_names(self) -> list[str]:
        """Every tensor produced by a node, in graph order (candidates for layer targets)."""
        return [out for node in self.graph.node for out in node.output if out]


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(attr.floats, dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(attr.ints, dtype=np.int64)
    return None


def _static_sizes(fwd: ForwardGraph, shape_node: onnx.NodeProto, indices: np.ndarray | None) -> np.ndarray | None:
    """Sizes read by Shape (optionally picked by a Gather's constant `indices`) when all of them are static:
    the spatial sizes are fixed at normalisation, so `x.size(1) // 2` in a TorchScript export is a constant
    (a channel split's Slice bounds), while anything reading the dynamic batch size is not."""
    dims = fwd.shapes.get(shape_node.input[0])
    if dims is None:
        return None
    attrs = {a.name: a.i for a in shape_node.attribute}
    dims = list(dims)[attrs.get("start", 0):attrs.get("end", len(dims)) or None]
    if indices is not None:
        picked = np.asarray(indices)
        if picked.dtype.kind not in "iu" or np.any(picked >= len(dims)) or np.any(picked < -len(dims)):
            return None
        sizes = np.array([dims[int(i)] for i in picked.reshape(-1)], dtype=object).reshape(picked.shape)
    else:
        sizes = np.array(dims, dtype=object)
    if any(d is None for d in sizes.reshape(-1)):
        return None
    return sizes.astype(np.int64)


def _fold(fwd: ForwardGraph, node: onnx.NodeProto) -> np.ndarray | None:
    """Evaluate a small op on constant inputs with ONNX's reference implementation."""
    feeds = {name: fwd.const_value(name) for name in node.input if name}
    if any(v is None for v in feeds.values()):
        return None
    from onnx.reference import ReferenceEvaluator

    graph = onnx.helper.make_graph(
        [node], "fold",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for name, v in feeds.items()],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UNDEFINED, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", fwd.opset)])
    try:
        return ReferenceEvaluator(model).run([node.output[0]], feeds)[0]
    except Exception:  # an op the reference cannot run on these values: not a constant we can use
        return None


def _infer(model: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    inferred = shape_inference.infer_shapes(_without_weights(model), data_prop=True)
    shapes: dict[str, Shape] = {}
    dtypes: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dtypes[vi.name] = vi.type.tensor_type.elem_type
        dims = dims_of(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in model.graph.initializer:
        dtypes[init.name] = init.data_type
        shapes[init.name] = tuple(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            value = _constant_node_value(node)
            if value is not None:
                shapes[node.output[0]] = value.shape
                dtypes[node.output[0]] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    return shapes, dtypes


#: Initializers larger than this are only declared (type and shape) to shape inference.
_SHAPE_ONLY_ELEMENTS = 4096


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for shape inference, its large initializers declared as typed inputs instead: inference
    reads only their types and shapes (data propagation needs the small integer ones, which stay), and serialising
    the weights to and from onnx's C++ side was most of the time `normalise` took on ResNet-50."""
    skeleton = copy.deepcopy(model)  # a memory copy: cheap next to serialising
    graph, declared = skeleton.graph, {i.name for i in skeleton.graph.input}
    large = [k for k, init in enumerate(graph.initializer) if int(np.prod(init.dims)) > _SHAPE_ONLY_ELEMENTS]
    graph.input.extend(onnx.helper.make_tensor_value_info(graph.initializer[k].name, graph.initializer[k].data_type,
                                                          list(graph.initializer[k].dims))
                       for k in large if graph.initializer[k].name not in declared)
    for k in reversed(large):
        del graph.initializer[k]
    return skeleton


_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class _CannotRun(Exception):
    """ONNX Runtime cannot run the forward model at all (an operator it lacks, say)."""


class _BatchIsFixed(Exception):
    """The model runs on one sample but not on two: the graph hard-codes its batch size."""


def _probe_shapes(model: onnx.ModelProto, input_name: str, input_shape: Shape, names: list[str],
                  dtypes: dict[str, int]) -> dict[str, Shape]:
    """Fill shapes that static inference left open by running the model: with a dynamic batch at batch 1 and 2
    (a dim that changes with the batch is dynamic, None), else at its fixed batch."""
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, dtypes.get(name, 0), None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    rng = np.random.default_rng(0)
    runs = []
    for batch in ((1, 2) if input_shape[0] is None else (input_shape[0],)):
        try:
            if not runs:
                session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            feeds = {input_name: rng.standard_normal((batch, *input_shape[1:])).astype(np.float32)}
            for arg in session.get_inputs():  # other inputs: zeros, batch-sized where their first dim is symbolic
                if arg.name != input_name:
                    dims = [batch if not isinstance(d, int) else d for d in arg.shape]
                    feeds[arg.name] = np.zeros(dims, _NP_TYPES.get(arg.type, np.float32))
            runs.append([a.shape for a in session.run(names, feeds)])
        except Exception as exc:
            raise (_BatchIsFixed if runs else _CannotRun)(str(exc).strip()) from exc
    found = {}
    for name, *shapes in zip(names, *runs):
        if len({len(shape) for shape in shapes}) == 1:
            found[name] = tuple(None if len(set(ds)) > 1 else ds[0] for ds in zip(*shapes))
    return found


def normalise(model: ModelLike, input_name: str | None = None, input_shape: tuple[int, ...] | None = None
              ) -> ForwardGraph:
    """Load `model` and bring it into the form the gradient rules expect.

    `input_shape` fixes the image input's dimensions where the model leaves them symbolic. The batch dimension
    is made dynamic, unless the graph hard-codes its batch size (a Reshape to [1, -1], say): then it stays fixed
    and the runtime feeds the model in chunks of that size.
    """
    proto = _topologically_sorted(_upgrade_opset(load_model(model)))
    _name_everything(proto.graph)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    image = pick_image_input(proto, input_name)
    dims = _fixed_dims(image, input_shape)
    try:
        return _prepare(copy.deepcopy(proto) if dims[0] is not None else proto, image.name, (None,) + dims[1:])
    except _BatchIsFixed as failure:
        if dims[0] is None:
            raise GbpError(f"The model declares a dynamic batch but does not run on 2 samples: {failure}") \
                from failure
        return _prepare(proto, image.name, dims)


def _fixed_dims(image: onnx.ValueInfoProto, input_shape: tuple[int, ...] | None) -> Shape:
    """The image input's dims with every non-batch dim static, from the model or from `input_shape`."""
    dims = dims_of(image)
    if dims is None:
        raise InputError(f"Input {image.name!r} has no declared rank; pass input_shape=(N, C, H, W).")
    if input_shape is not None:
        if len(input_shape) != len(dims):
            raise InputError(f"Input {image.name!r} has rank {len(dims)}, but the given shape {tuple(input_shape)} "
                             f"has rank {len(input_shape)}.")
        for axis, (have, want) in enumerate(zip(dims, input_shape)):
            if axis > 0 and have is not None and have != want:
                raise InputError(f"Input {image.name!r} expects size {have} on axis {axis}, got {want} "
                                 f"(model input shape {_show(dims)}, given {tuple(input_shape)}).")
        dims = (dims[0],) + tuple(int(d) for d in input_shape[1:])
    missing = [axis for axis, d in enumerate(dims) if axis > 0 and d is None]
    if missing:
        raise SymbolicShapeError(f"Input {image.name!r} has symbolic dimensions on axes {missing} "
                                 f"(shape {_show(dims)}); pass an input shape to fix them.")
    return dims


def _prepare(proto: onnx.ModelProto, image_name: str, dims: Shape) -> ForwardGraph:
    """Set the image input's dims, infer every tensor's shape and dtype, and probe what inference missed.
    Raises _BatchIsFixed when a dynamic batch (dims[0] None) does not run because the graph hard-codes it."""
    image = next(i for i in proto.graph.input if i.name == image_name)
    _set_dims(image, dims)
    del proto.graph.value_info[:]  # stale shapes may carry the old batch size or symbolic spatial sizes
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    consumers = [n for n in proto.graph.node if image_name in n.input]
    fwd = ForwardGraph(proto, image_name, dims, detect_layout(dims, consumers),
                       None if dims[0] is None else int(dims[0]))
    fwd.shapes, fwd.dtypes = _infer(proto)
    floats = [n for n in fwd.tensor_names if fwd.dtypes.get(n) in FLOAT_TYPES]
    # Open means no shape, or a symbolic size beyond the batch axis (a view to runtime Shape values, as a
    # TorchScript-exported channel shuffle has): the rules need every non-batch size.
    unknown = [n for n in floats if n not in fwd.shapes or None in fwd.shapes[n][1:]]
    # A dynamic batch must also be seen to run at batch 2, unless inference carried it symbolically through every
    # float tensor computed from the image: a hard-coded batch (a Reshape to [1, -1]) leaves a static size there.
    if unknown or (dims[0] is None and floats and not _carries_batch(fwd, floats)):
        try:
            fwd.shapes.update(_probe_shapes(proto, image_name, dims, unknown or floats[-1:], fwd.dtypes))
        except _CannotRun as why:  # not fatal here: an unsupported operator is reported by name later
            fwd.probe_error = str(why)
    for out in proto.graph.output:
        if out.name in fwd.shapes:
            _set_dims(out, fwd.shapes[out.name])
    return fwd


def _carries_batch(fwd: ForwardGraph, floats: list[str]) -> bool:
    """Whether every float tensor computed from the image has a symbolic (dynamic) first dimension."""
    reached = {fwd.input_name}
    for node in fwd.graph.node:  # graph order is topological
        if any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
    return all(len(fwd.shapes[n]) > 0 and fwd.shapes[n][0] is None for n in floats if n in reached)


def _show(dims: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
