"""The attribution methods: what each does at a ReLU, in one formula each.

x is the ReLU's input, dy the gradient arriving at its output:

    vanilla    dx = dy * [x > 0]               (Simonyan et al. 2013: the true gradient)
    deconvnet  dx = dy * [dy > 0]              (Zeiler & Fergus 2013)
    guided     dx = dy * [x > 0] * [dy > 0]    (Springenberg et al. 2015)

A bounded ReLU such as ReLU6 = min(ReLU(x), 6) is that ReLU followed by a min: the min keeps its true
derivative [x < 6] and the method's rule applies to the ReLU, so guided gives dy * [x < 6] * [x > 0] * [dy > 0].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rules import Step

METHODS = ("guided", "deconvnet", "vanilla")


def relu_rule(s: "Step", y: str, dy: str, upper: str | None = None) -> str:
    """The method's gradient through y = ReLU(x), optionally capped at `upper` (a tensor name).

    The gates read the output: [y > 0] is [x > 0] and [y < upper] is [x < upper], and leaving x unread lets the
    runtime fuse the ReLU into the Conv that produces x. Each gate is a float 0/1 mask, built once per ReLU and
    shared by every method, applied with Mul: on ONNX Runtime's CPU kernels Mul costs a third of Where(gate, dy, 0).
    """
    s.b.notes.setdefault("relu", set()).add(s.node.name)
    positive, below = ("Greater", s.zero(y)), ("Less", upper)
    inside = (positive,) if upper is None else (positive, below)
    if s.method == "vanilla":
        return s.op("Mul", dy, _gate(s, y, *inside))
    if s.method == "deconvnet":
        return s.op("Relu", dy) if upper is None else s.op("Mul", s.op("Relu", dy), _gate(s, y, below))
    if s.method == "guided":
        return s.op("Mul", s.op("Relu", dy), _gate(s, y, *inside))
    raise ValueError(f"Unknown method {s.method!r}; choose from {', '.join(METHODS)}.")


def _gate(s: "Step", y: str, *conditions: tuple[str, str]) -> str:
    """The float 0/1 mask of `y op bound` for every (op, bound) in `conditions`, all true; built once."""
    def make() -> str:
        tests = [s.memo(("test", y, op, bound), lambda: s.op(op, y, bound)) for op, bound in conditions]
        return s.op("Cast", tests[0] if len(tests) == 1 else s.op("And", *tests), to=s.fwd.dtypes[y])
    return s.memo(("gate", y, conditions), make)


def check_methods(methods: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"Method listed twice in {methods}.")
    return methods
