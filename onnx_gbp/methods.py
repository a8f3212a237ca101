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


def relu_rule(s: "Step", x: str, dy: str, upper: str | None = None) -> str:
    """The method's gradient through ReLU(x), optionally capped at `upper` (a tensor name)."""
    s.b.notes.setdefault("relu", set()).add(s.node.name)
    if upper is not None:
        below = s.memo(("below", x, upper), lambda: s.op("Less", x, upper))
        dy = s.op("Where", below, dy, s.zero(x))
    positive = s.memo(("positive", x), lambda: s.op("Greater", x, s.zero(x)))
    if s.method == "vanilla":
        return s.op("Where", positive, dy, s.zero(x))
    if s.method == "deconvnet":
        return s.op("Relu", dy)
    if s.method == "guided":
        return s.op("Where", positive, s.op("Relu", dy), s.zero(x))
    raise ValueError(f"Unknown method {s.method!r}; choose from {', '.join(METHODS)}.")


def check_methods(methods: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"Method listed twice in {methods}.")
    return methods
