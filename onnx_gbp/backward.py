"""The reverse walk: from gradient seeds back to the image input, one rule per node.

Only nodes on a path from the input to a seed are differentiated, in reverse topological order; gradients
that meet at a tensor are summed before its producer's rule sees them.
"""
from __future__ import annotations

import onnx

from .builder import GraphBuilder
from .errors import UnsupportedModelError
from .model import ForwardGraph
from .rules import RULES, Step, UnsupportedVariant

#: Ops whose outputs carry no gradient: their float outputs are shapes, indices or comparisons.
NON_DIFFERENTIABLE = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual",
                      "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero", "ConstantOfShape",
                      "Constant", "RandomNormalLike", "RandomUniformLike", "Sign", "Floor", "Ceil", "Round"}


def depends_on(fwd: ForwardGraph, source: str) -> set[str]:
    """Float tensors whose value depends differentiably on `source`."""
    reached = {source}
    for node in fwd.graph.node:  # graph order is topological
        if node.op_type in NON_DIFFERENTIABLE or not any(i in reached for i in node.input):
            continue
        # An output of unknown type (an op shape inference does not know) might be float: keep it, so that
        # op is reported as unsupported rather than silently cut off.
        reached.update(o for o in node.output if o and (fwd.is_float(o) or not fwd.dtypes.get(o)))
    return reached


def feeds_into(fwd: ForwardGraph, sinks: set[str]) -> set[str]:
    """Tensors that some tensor in `sinks` depends on."""
    reached = set(sinks)
    for node in reversed(fwd.graph.node):
        if any(o in reached for o in node.output):
            reached.update(i for i in node.input if i)
    return reached


def path_nodes(fwd: ForwardGraph, source: str, sinks: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes on a path from `source` to any of `sinks`, in topological order, and the tensors that need
    gradients."""
    forward = depends_on(fwd, source)
    backward = feeds_into(fwd, sinks)
    on_path = forward & backward
    nodes = [n for n in fwd.graph.node
             if any(o in on_path for o in n.output) and any(i in on_path for i in n.input)
             and n.op_type not in NON_DIFFERENTIABLE]
    return nodes, on_path


def check_supported(nodes: list[onnx.NodeProto]) -> None:
    missing: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type not in RULES or node.domain not in ("", "ai.onnx"):
            label = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing.setdefault(label, []).append(f"node {node.name!r}")
    if missing:
        raise UnsupportedModelError(missing)


def backward(fwd: ForwardGraph, b: GraphBuilder, seeds: dict[str, str], method: str) -> str:
    """Emit the gradient of sum(seed * tensor) over `seeds` with respect to the image input; returns its name."""
    nodes, on_path = path_nodes(fwd, fwd.input_name, set(seeds))
    check_supported(nodes)
    grads: dict[str, list[str]] = {name: [g] for name, g in seeds.items()}
    problems: dict[str, list[str]] = {}
    for node in reversed(nodes):
        dys = [_total(b, grads.pop(o, [])) if o else None for o in node.output]
        if not any(dys):
            continue
        needs = [bool(i) and i in on_path for i in node.input]
        try:
            dxs = RULES[node.op_type](Step(fwd, b, node, dys, needs, method))
        except UnsupportedVariant as why:
            problems.setdefault(node.op_type, []).append(f"node {node.name!r} ({why})")
            continue
        for name, need, dx in zip(node.input, needs, dxs):
            if need and dx is not None:
                grads.setdefault(name, []).append(dx)
    if problems:
        raise UnsupportedModelError(problems)
    total = _total(b, grads.get(fwd.input_name, []))
    if total is None:  # the target does not depend on the input at all
        return b.op("ConstantOfShape", b.op("Shape", fwd.input_name),
                    value=onnx.helper.make_tensor("zero", fwd.dtypes[fwd.input_name], [1], [0]))
    return total


def _total(b: GraphBuilder, parts: list[str]) -> str | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b.op("Sum", *parts)
