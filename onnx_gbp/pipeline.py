"""Files in, pictures out: run an `Explainer` over images and tensors in batches and write, per input, its
PNGs and raw .npy maps, then a contact sheet and one JSON summary of the run (used by `explain` and `demo`).

Everything is written into a hidden staging folder beside the output folder and moved into place only when the
whole run has succeeded, so a failure leaves no half-done output behind.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__, images, render
from .errors import InputError
from .export import read_metadata
from .runtime import Explainer


@dataclass
class ModelCard:
    """Defaults that travel with a model as MODEL.json beside MODEL.onnx: how to preprocess images, and the
    class names. Command-line options override them."""

    name: str | None = None
    preprocess: dict = field(default_factory=dict)
    labels: list[str] | None = None
    labels_file: str | None = None

    @classmethod
    def beside(cls, model: str | Path) -> "ModelCard":
        path = Path(model).with_suffix(".json")
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"Model card {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not {"preprocess", "labels"} & set(data):
            return cls()  # some other JSON file that happens to share the model's name
        labels_file = data.get("labels")
        labels = load_labels(path.parent / labels_file) if labels_file else None
        return cls(data.get("name"), dict(data.get("preprocess") or {}), labels, labels_file)


def load_labels(path: str | Path) -> list[str]:
    """Class names: a text file with one name a line, or JSON (a list, or {"0": name} / {"0": [id, name]} as in
    Keras's imagenet_class_index.json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"Cannot read the labels file {path}: {exc.strerror or exc}") from exc
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"Labels file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        try:
            data = [data[k] for k in sorted(data, key=int)]
        except ValueError as exc:
            raise InputError(f"Labels file {path}: keys must be class indices (0, 1, ...).") from exc
    return [str(v[-1]) if isinstance(v, list) else str(v) for v in data]


def label_of(labels: Sequence[str] | None, index: int | None) -> str | None:
    return labels[index] if labels and index is not None and 0 <= index < len(labels) else None


@dataclass
class RenderOptions:
    grey: bool = False
    overlay: bool = True
    grid: bool = False
    grid_picks: int = 25
    seed: int = 0
    title: str = ""


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A scratch folder next to `out_dir` whose files move into `out_dir` only if the block succeeds."""
    out_dir = out_dir.resolve()
    anchor = out_dir.parent
    while not anchor.exists():
        anchor = anchor.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=anchor))
    try:
        yield tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir()):
            shutil.move(str(item), str(out_dir / item.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_destination(out_dir: Path, inputs: Sequence[str | Path], planned: Sequence[str]) -> None:
    """Refuse an output folder that is an input folder, or any planned file that is an input file."""
    out = out_dir.resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"Output path {out_dir} exists and is not a folder.")
    given = [Path(p).resolve() for p in inputs]
    if any(p == out for p in given if p.is_dir()):
        raise InputError(f"The output folder {out_dir} is also an input folder: choose another -o, or the next "
                         f"run would read this run's pictures as inputs.")
    clash = sorted({str(out / name) for name in planned} & {str(p) for p in given})
    if clash:
        raise InputError(f"Refusing to write over input file {clash[0]}: choose another -o folder.")


def output_files(stem: str, methods: Sequence[str], overlay: bool) -> list[str]:
    files = [f"{stem}.input.png"]
    for m in methods:
        files += [f"{stem}.{m}.png", f"{stem}.{m}.npy"] + ([f"{stem}.{m}.overlay.png"] if overlay else [])
    return files


def class_scores(outputs: dict[str, np.ndarray], output: str | None) -> tuple[str, np.ndarray] | None:
    """(name, per-sample class scores) from the model's outputs, or None when the output is not (N, classes)."""
    if not outputs:
        return None
    name = output if output in outputs else next(iter(outputs))
    scores = outputs[name]
    if scores.ndim < 2 or scores.dtype.kind != "f":
        return None
    return name, scores.reshape(len(scores), -1)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """The scores themselves when they already are probabilities (a softmax output), else their softmax."""
    if scores.min() >= 0 and scores.max() <= 1 and np.allclose(scores.sum(1), 1, atol=1e-3):
        return scores
    e = np.exp(scores - scores.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def explain_files(explainer: Explainer, sources: Sequence[images.Source], model_input: images.ModelInput,
                  pre: images.Preprocess, out_dir: Path, *, target: int | None = None,
                  labels: Sequence[str] | None = None, output: str | None = None, batch_size: int = 8,
                  options: RenderOptions | None = None, progress: bool = True, run_info: dict | None = None) -> dict:
    """Explain every source and write its files; returns the summary (also written as summary.json)."""
    options = options or RenderOptions()
    methods = list(explainer.methods)
    stems = images.names(sources)
    meta = read_metadata(explainer.model)["target"]
    records, tiles = [], []
    grid_keep = set(render.pick(len(sources), options.grid_picks, options.seed)) if options.grid else set()
    started = time.perf_counter()
    explain_s = 0.0
    with staged(out_dir) as tmp, _bar(len(sources), progress) as bar:
        for start in range(0, len(sources), max(1, batch_size)):
            batch = list(range(start, min(start + max(1, batch_size), len(sources))))
            loaded = [images.load(sources[i], model_input, pre) for i in batch]
            x = np.stack([t for t, _ in loaded])
            t0 = time.perf_counter()
            result = explainer.explain(x, target)
            took = time.perf_counter() - t0
            explain_s += took
            scored = class_scores(result.outputs, output)
            probs = probabilities(scored[1]) if scored else None
            for j, i in enumerate(batch):
                photo = loaded[j][1]
                record = _record(sources[i], stems[i], result, j, scored, probs, labels, meta, took / len(batch))
                panels = [photo]
                render.save_png(photo, tmp / f"{stems[i]}.input.png")
                for k, m in enumerate(methods):
                    raw = result.maps[m][j]
                    np.save(tmp / f"{stems[i]}.{m}.npy", raw)
                    g = render.to_hwc(raw, model_input.layout, pre.bgr)  # pictures in RGB order
                    picture = render.map_picture(g, m, options.grey)
                    render.save_png(picture, tmp / f"{stems[i]}.{m}.png")
                    on_sheet = k == 0 and i in grid_keep  # the sheet shows the first method's heat map
                    heat = render.overlay(photo, render.heat(g, m)) if options.overlay or on_sheet else None
                    if options.overlay:
                        render.save_png(heat, tmp / f"{stems[i]}.{m}.overlay.png")
                    panels += [heat, picture] if k == 0 else [picture]
                record["files"] = output_files(stems[i], methods, options.overlay)
                records.append(record)
                if i in grid_keep:
                    tiles.append(render.Tile(panels, *_caption(record)))
            bar.update(len(batch))
        summary = {
            "onnx_gbp": __version__, **(run_info or {}), "methods": methods, "layout": model_input.layout,
            "input_shape": list(model_input.shape), "provider": explainer.provider,
            "target": {k: meta.get(k) for k in ("choice", "layer", "neuron", "output", "probability")},
            "preprocess": pre.describe(),
            "timing": {"explain_s": round(explain_s, 4), "total_s": round(time.perf_counter() - started, 4),
                       "images": len(records), "ms_per_image": round(1000 * explain_s / max(1, len(records)), 2)},
            "images": records,
        }
        if tiles:
            headers = ["input", f"{methods[0]} heat map", *methods]
            title = options.title or " / ".join(methods)
            if len(tiles) < len(records):
                title += f"  ·  {len(tiles)} of {len(records)} images, picked at random"
            sheet = render.contact_sheet(tiles, headers, title=title)
            sheet.save(tmp / "grid.png")
            summary["grid"] = "grid.png"
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _record(source, stem, result, j, scored, probs, labels, meta, seconds) -> dict:
    record: dict = {"input": str(source), "name": stem}
    if scored is not None:
        name, scores = scored
        predicted = int(scores[j].argmax())
        record.update(output=name, predicted=predicted, predicted_name=label_of(labels, predicted),
                      score=float(scores[j, predicted]), probability=float(probs[j, predicted]))
    chosen = int(result.targets[j])
    if meta.get("layer") is None:
        record.update(target=chosen, target_name=label_of(labels, chosen))
        if scored is not None and chosen != record["predicted"]:
            record["target_probability"] = float(probs[j, chosen])
    else:
        record.update(target_layer=meta.get("layer"), target_neuron=chosen)
    record["explain_ms"] = round(1000 * seconds, 2)
    return {k: v for k, v in record.items() if v is not None}


def _caption(record: dict) -> tuple[str, str]:
    name = record.get("predicted_name") or (str(record["predicted"]) if "predicted" in record else "")
    head = f"{record['name']}: {name} {record['probability']:.2f}" if name else record["name"]
    if "target_neuron" in record:
        return head, f"target: neuron {record['target_neuron']} of {record['target_layer']}"
    if record.get("target") != record.get("predicted"):
        label = record.get("target_name") or str(record["target"])
        return head, f"target: {label} {record.get('target_probability', 0):.2f}"
    return head, ""


@contextlib.contextmanager
def _bar(total: int, show: bool):
    """A progress bar on stderr when it is a terminal (in a log, click would print only its label)."""
    if not show or total < 2 or not sys.stderr.isatty():
        yield _NoBar()
        return
    import click

    with click.progressbar(length=total, label="explaining", show_pos=True, file=sys.stderr) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass
