"""Assemble the exported model: the original forward graph, the target's seed, one backward graph per method,
and metadata that makes the file self-describing.

Contract of the exported model (documented in the README):
  inputs   the model's own inputs, plus `target` (int64 [N], default [-1]: -1 = the predicted class) for class
           targets
  outputs  the model's own outputs, `saliency_<method>` (same shape and layout as the image input) for each
           method, and `target_used` (int64 [N]: the class, or the flat neuron index, that was explained)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from . import __version__
from .backward import backward, check_supported, path_nodes
from .builder import GraphBuilder
from .errors import GbpError
from .methods import check_methods
from .model import ForwardGraph, ModelLike, normalise
from .targets import TargetSpec, build_seed, seed_tensor

SALIENCY_PREFIX = "saliency_"
TARGET_USED = "target_used"


def saliency_name(method: str) -> str:
    return SALIENCY_PREFIX + method


def build(fwd: ForwardGraph, methods: Sequence[str], target: TargetSpec) -> onnx.ModelProto:
    """The augmented model, in memory. `fwd` is consumed: its model gains the backward graph."""
    methods = check_methods(methods)
    taken = {n for node in fwd.graph.node for n in (*node.input, *node.output, node.name)}
    taken |= {t.name for t in fwd.graph.initializer} | {i.name for i in fwd.graph.input}
    b = GraphBuilder(taken)
    check_supported(path_nodes(fwd, fwd.input_name, {seed_tensor(fwd, target)})[0])  # before any shape is needed
    seed = build_seed(fwd, b, target)
    outputs = []
    for method in methods:
        b.scope = f"{method}/"
        grad = backward(fwd, b, {seed.tensor: seed.grad}, method)
        b.nodes.append(helper.make_node("Identity", [grad], [saliency_name(method)], name=f"gbp/{method}/output"))
        outputs.append(helper.make_tensor_value_info(saliency_name(method), fwd.dtypes[fwd.input_name],
                                                     _shape_param(fwd.input_shape)))
    b.nodes.append(helper.make_node("Identity", [seed.chosen], [TARGET_USED], name="gbp/target_used"))
    outputs.append(helper.make_tensor_value_info(TARGET_USED, onnx.TensorProto.INT64, ["N"]))

    model = fwd.model
    graph = model.graph
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    if seed.target_input:
        graph.input.append(helper.make_tensor_value_info(seed.target_input, onnx.TensorProto.INT64, ["N"]))
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), seed.target_input))
    graph.output.extend(outputs)
    relus = sorted(b.notes.get("relu", ()))
    meta = {
        "onnx_gbp.version": __version__,
        "onnx_gbp.methods": json.dumps(list(methods)),
        "onnx_gbp.outputs": json.dumps({m: saliency_name(m) for m in methods}),
        "onnx_gbp.target": json.dumps({"output": target.output, "probability": target.probability,
                                       "layer": target.layer, "neuron": _jsonable(target.neuron),
                                       "tensor": seed.scores, "choice": seed.note,
                                       "target_input": seed.target_input, "target_used_output": TARGET_USED}),
        "onnx_gbp.input": json.dumps({"name": fwd.input_name, "shape": list(fwd.input_shape),
                                      "layout": fwd.layout, "fixed_batch": fwd.fixed_batch}),
        "onnx_gbp.relu_nodes": json.dumps(relus),
    }
    keep = [p for p in model.metadata_props if not p.key.startswith("onnx_gbp.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


def build_model(model: ModelLike, methods: Sequence[str] = ("guided",), target: TargetSpec | None = None,
                input_name: str | None = None, input_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    fwd = normalise(model, input_name, tuple(input_shape) if input_shape is not None else None)
    return build(fwd, methods, target or TargetSpec())


def export(src: ModelLike, dst: str | os.PathLike, method: str = "guided", methods: Sequence[str] | None = None,
           layer: str | None = None, neuron=None, output: str | None = None, probability: bool = False,
           input_name: str | None = None, input_shape: Sequence[int] | None = None,
           check: bool = True) -> onnx.ModelProto:
    """Write a copy of `src` that also outputs saliency maps to `dst` (never over `src`). Returns the model.

    Large models (over 2 GB) are written with their weights as external data beside `dst`.
    """
    dst = Path(dst)
    if not isinstance(src, onnx.ModelProto) and Path(src).exists() and dst.exists() and \
            dst.resolve() == Path(src).resolve():
        raise GbpError(f"Refusing to write over the input model {src}: choose another output path.")
    target = TargetSpec(output=output, probability=probability, layer=layer, neuron=neuron)
    model = build_model(src, methods or (method,), target, input_name, input_shape)
    if check:
        onnx.checker.check_model(model, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    large = model.ByteSize() > 1_900_000_000
    onnx.save(model, str(tmp), save_as_external_data=large, location=dst.name + ".data" if large else None)
    os.replace(tmp, dst)
    return model


def read_metadata(model: onnx.ModelProto) -> dict:
    """The `onnx_gbp.*` metadata of an exported model, decoded (keys without the prefix)."""
    meta = {p.key[len("onnx_gbp."):]: p.value for p in model.metadata_props if p.key.startswith("onnx_gbp.")}
    return {k: (v if k == "version" else json.loads(v)) for k, v in meta.items()}


def _shape_param(dims) -> list:
    return ["N" if d is None else d for d in dims]


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value
