"""What the framework-side scripts (tf_side, jax_side, paddle_side) share. Each runs in its framework's own
environment, so this module needs nothing beyond numpy and the standard library."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

METHODS = ("guided", "deconvnet", "vanilla")
TARGETS = ("class", "neuron", "channel")

#: (model, the model's manifest entry, its saved reference.npz, method, target, gates) -> (map, chosen, ReLU calls)
GatedRun = Callable[[object, dict, dict, str, str, list], tuple]


def write_gated_references(out: Path, framework: str, build: Callable[[str, Path], object], run: GatedRun) -> None:
    """Rerun each exported model's reference with the ReLU gates ONNX Runtime's forward pass took (the float32
    envelope of DESIGN.md), checking that the reference met exactly one gate per ReLU call."""
    manifest = json.loads((out / "manifest.json").read_text())
    for name, info in manifest["models"].items():
        d = out / name
        model = build(name, d)
        with np.load(d / "reference.npz") as z:
            saved = dict(z)
        arrays = {}
        for target in TARGETS:
            with np.load(d / f"gates_{target}.npz") as z:
                gates = [z[f"g{i}"] for i in range(len(z.files))]
            for method in METHODS:
                grad, chosen, calls = run(model, info, saved, method, target, gates)
                if calls != len(gates):
                    raise RuntimeError(f"{name}: {calls} ReLU calls, {len(gates)} gates")
                arrays[f"gated_{target}_{method}"] = grad
                arrays[f"gated_chosen_{target}"] = chosen
        np.savez(d / "reference_gated.npz", **arrays)
        print(f"[{framework}] {name}: reference with ONNX Runtime's gates", flush=True)


def main(doc: str, export: Callable[[Path, list[str]], None], reference: Callable[[Path], None],
         models: list[str]) -> None:
    """`SIDE.py export DIR [MODEL...]` or `SIDE.py reference DIR`."""
    if len(sys.argv) < 3 or sys.argv[1] not in ("export", "reference"):
        raise SystemExit(doc)
    directory = Path(sys.argv[2])
    if sys.argv[1] == "export":
        export(directory, sys.argv[3:] or models)
    else:
        reference(directory)
