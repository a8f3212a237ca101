"""A tiny vocabulary for emitting ONNX nodes: `b.op("Mul", a, c)` returns the name of the new tensor.

The builder owns the nodes and initializers added after the forward graph. Constants are deduplicated, and
`memo` shares values (masks, shapes) between the backward graphs of several methods.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    def __init__(self, taken: set[str], prefix: str = "gbp"):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken)
        self._prefix = prefix
        self._consts: dict[tuple, str] = {}
        self._memo: dict[Any, Any] = {}
        self.notes: dict[str, set[str]] = {}  # facts for the metadata, e.g. "relu": names of ReLU-rule nodes
        self.scope = ""

    def fresh(self, hint: str) -> str:
        base = f"{self._prefix}/{self.scope}{hint}" if self.scope else f"{self._prefix}/{hint}"
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def op(self, op_type: str, *inputs: str | None, outputs: int = 1, hint: str | None = None,
           **attrs: Any) -> Any:
        """Append one node; returns its output name (or a list of names when outputs > 1)."""
        out = [self.fresh(f"{hint or op_type}") for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], out,
                                           name=self.fresh(f"{hint or op_type}_node"), **attrs))
        return out[0] if outputs == 1 else out

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """An initializer holding `value` (deduplicated by dtype, shape and bytes)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """Build a value once and reuse it (e.g. a ReLU's forward mask, shared by every method)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]
