"""The errors onnx-gbp raises. Each one carries a message a user can act on."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class GbpError(Exception):
    """Base class: something about the user's model, input or request is wrong."""


class ModelLoadError(GbpError):
    """The file is missing, is not an ONNX model, or is an ONNX model we cannot read."""


class UnsupportedModelError(GbpError):
    """The graph has operators (or operator variants) on the input-to-target path that have no rule."""

    def __init__(self, problems: dict[str, list[str]]):
        self.problems = problems  # op type -> ["node 'name': why", ...]
        lines = [f"{len(problems)} operator type(s) on the path from input to target have no gradient rule:"]
        for op_type in sorted(problems):
            nodes = problems[op_type]
            shown = "; ".join(nodes[:5]) + (f"; ... and {len(nodes) - 5} more" if len(nodes) > 5 else "")
            lines.append(f"  {op_type}: {shown}")
        super().__init__("\n".join(lines))


class LayerNotFoundError(GbpError):
    """A layer name matches no tensor and no node of the graph."""

    def __init__(self, name: str, candidates: Iterable[str]):
        candidates = list(candidates)
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        super().__init__(f"No layer named {name!r} in the model.{hint} `onnx-gbp layers MODEL` lists them all.")
        self.close_matches = close


class InputError(GbpError):
    """An input array or image does not fit the model (shape, layout, dtype) or a target is out of range."""


class SymbolicShapeError(InputError):
    """The image input has symbolic non-batch dimensions and no shape was given to fix them."""


class ProviderError(GbpError):
    """The requested ONNX Runtime execution provider cannot be used."""


def suggest(name: str, candidates: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.4)
