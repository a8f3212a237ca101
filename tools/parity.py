"""Compute the cross-framework parity table and write docs/parity.md.

For every framework x model x method x target it states max|ours - ref| / max|ref| and the cosine similarity
between onnx-gbp's map (ONNX Runtime, float32) and the map of an independent reference written in the framework
that made the model, with the exporter and opset of the ONNX file:

    TensorFlow/Keras   tf2onnx          tests/frameworks/tf_side.py    (tf.custom_gradient on every ReLU)
    JAX/Flax           jax2onnx         tests/frameworks/jax_side.py   (jax.custom_vjp for jax.nn.relu)
    PaddlePaddle       paddle2onnx      tests/frameworks/paddle_side.py (paddle.autograd.PyLayer for F.relu)
    PyTorch            torch.onnx x2    tests/zoo_torch.py + tests/torch_reference.py (float64 reference), rows
                                        built by tools/parity_pytorch.py's own functions

TensorFlow, JAX and Paddle run in their own environments (.venv-tf, .venv-jax, .venv-paddle; built by
tools/framework_envs.sh when missing). Run it with the test environment's Python (it needs onnx-gbp, and torch
for the PyTorch rows):

    .venv-test/bin/python tools/parity.py                     # everything -> docs/parity.md
    .venv-test/bin/python tools/parity.py --only tensorflow jax paddle

Exit status 1 when any row misses the bar (rel <= 1e-4 and cosine >= 0.9999).
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "frameworks")]

import parity_harness as harness  # noqa: E402

FRAMEWORK_MODELS = {
    "tensorflow": ["custom_cnn", "resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0"],
    "jax": ["residual_cnn"],
    "paddle": ["residual_cnn"],
}


@dataclass
class Line:
    """One row of the table, whatever framework it comes from."""

    framework: str
    exporter: str
    opset: object
    model: str
    target: str
    method: str
    rel: float
    cos: float
    native_rel: float = math.nan  # against the reference with its own gates
    flips: object = ""
    near: object = ""

    @property
    def ok(self) -> bool:
        return self.rel <= harness.MAX_REL_ERROR and self.cos >= harness.MIN_COSINE


def tf_jax_lines(framework: str, workdir: Path) -> tuple[list[Line], list[Line], dict, dict]:
    run = harness.run_framework(framework, workdir / framework, FRAMEWORK_MODELS[framework])
    lines = [Line(framework, r.exporter, r.opset, r.model, r.target, r.method, r.rel, r.cos, r.native_rel, r.flips,
                  r.near) for r in run.rows]
    traps = [Line(framework, r.exporter + " (default optimisers)", r.opset, r.model, r.target, r.method, r.rel, r.cos,
                  flips=f"{r.relus} Relu nodes") for r in run.traps]
    return lines, traps, run.versions, run.checks


def torch_lines(workdir: Path, models: list[str] | None) -> tuple[list[Line], dict]:
    """The PyTorch rows, from the engine suite's own zoo, float64 reference and row builders
    (tests/zoo_torch.py, tests/torch_reference.py, tools/parity_pytorch.py), plus the trained
    EfficientNet-Lite0."""
    import onnx
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import parity_pytorch
    import zoo_torch

    torch.set_num_threads(1)  # as tools/parity_pytorch.py: float64 kernels stall with two threads under load
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cases = [zoo_torch.case(name, workdir) for name in (models or list(zoo_torch.ZOO))]
    cases.append(zoo_torch.lite0_case(workdir))
    lines = []
    for case in cases:
        rows = [("class", r) for r in parity_pytorch.class_rows(case, zoo_torch.EXPORTERS, log)]
        if getattr(case, "neuron_call", None) is not None:
            rows += [("neuron", r) for r in parity_pytorch.neuron_rows(case, zoo_torch.EXPORTERS, log)]
        opsets = {e: next(i.version for i in onnx.load(str(case.onnx_path(e)), load_external_data=False).opset_import
                          if i.domain in ("", "ai.onnx")) for e in zoo_torch.EXPORTERS}
        for target, r in rows:
            lines.append(Line("pytorch", f"torch.onnx {r['exporter']}", opsets[r["exporter"]], r["model"], target,
                              r["method"], r["rel"], r["cos"], r.get("rel_plain", math.nan), r["flipped"], r["near"]))
    return lines, {"torch": torch.__version__}


def fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2e}"


def write_markdown(path: Path, lines: list[Line], traps: list[Line], versions: dict, notes: list[str],
                   seconds: float) -> None:
    worst_rel = max(lines, key=lambda l: l.rel)
    worst_cos = min(lines, key=lambda l: l.cos)
    failing = [l for l in lines if not l.ok]
    out = [
        "# Cross-framework parity",
        "",
        "onnx-gbp's maps (ONNX Runtime, float32) against guided backpropagation, deconvnet and the vanilla gradient",
        "written in the framework that made each model. Written by `tools/parity.py`; do not edit by hand.",
        "",
        f"**Worst relative error {worst_rel.rel:.2e}** ({worst_rel.framework} {worst_rel.model}, "
        f"{worst_rel.method}, {worst_rel.target} target); **worst cosine 1 − {1 - worst_cos.cos:.1e}** "
        f"({worst_cos.framework} {worst_cos.model}, {worst_cos.method}, {worst_cos.target} target). "
        f"{len(lines)} rows, {len(failing)} outside the bar `max|ours - ref| / max|ref| <= 1e-4` and cosine "
        "`>= 0.9999` (worst sample of a batch of two).",
        "",
    ]
    native = [l for l in lines if not math.isnan(l.native_rel)]
    if native:
        w = max(native, key=lambda l: l.native_rel)
        flipped = sorted({f"{l.framework} {l.model} ({l.exporter})" for l in lines if l.flips not in ("", 0)})
        out += [f"Against the references with their own gates the worst relative error is {w.native_rel:.2e} "
                f"({w.framework} {w.model}, {w.exporter}, {w.method}, {w.target} target); ReLU gates flipped "
                f"between our forward pass and the reference's only in: {', '.join(flipped) or 'none'}.", ""]
    out += [
        "## How the references are made",
        "",
        "- **TensorFlow / Keras** (`tests/frameworks/tf_side.py`): `keras.applications` models with `weights=None`,",
        "  a fixed seed, random biases and BatchNormalization statistics, plus a functional CNN that spells ReLU",
        "  four ways (`activation=\"relu\"`, `layers.ReLU`, `layers.Activation(\"relu\")`, `tf.nn.relu` in a layer).",
        "  The reference replaces `tf.nn.relu` and `tf.nn.relu6` (which every Keras form calls) with a",
        "  `tf.custom_gradient` function applying the method's rule; the number of calls is checked against the",
        "  ReLU ops of the traced graph. Gradients from `tf.GradientTape`; class targets are the logit feeding the",
        "  softmax. Exported with `tf2onnx.convert.from_keras`, with its `merge_duplication` optimiser off (below).",
        "- **JAX / Flax** (`tests/frameworks/jax_side.py`): a Flax NNX CNN (conv + BatchNorm in inference mode +",
        "  ReLU, max pool, residual block, average pool, strided conv, dense head); `jax.nn.relu` / `nnx.relu`",
        "  replaced by a `jax.custom_vjp` ReLU, gradients from `jax.grad`; exported with `jax2onnx.to_onnx`.",
        "- **PaddlePaddle** (`tests/frameworks/paddle_side.py`): the same architecture in `paddle.nn` (NCHW; `nn.ReLU`",
        "  and `F.relu`), `F.relu` replaced by a `paddle.autograd.PyLayer` ReLU, gradients from `paddle.grad`;",
        "  exported with `paddle.jit.save` + `paddle2onnx.export`, in an environment of its own (onnx<=1.17).",
        "- **PyTorch** (`tests/zoo_torch.py`, `tests/torch_reference.py`, rows as in `tools/parity_pytorch.py`):",
        "  the engine suite's 13-architecture zoo and the trained EfficientNet-Lite0, both `torch.onnx` exporters,",
        "  a float64 reference overriding every ReLU spelling. Details and more columns: `docs/parity-pytorch.md`.",
        "- Targets: `class` = the predicted class's logit (the input of the softmax where there is one); `neuron` =",
        "  the most activated unit (`neuron=\"max\"`) of a mid-network layer; `channel` = the sum of one channel of",
        "  that layer (`neuron=<int>`; TensorFlow, JAX and Paddle only). Our choice is checked to be the framework's.",
        "",
        "**The float32 envelope.** A ReLU input within rounding of 0 can take the other gate in ONNX Runtime than in",
        "the framework, and then the map moves locally by far more than rounding. So every reference is evaluated",
        "a second time with the gates our forward pass took: every ReLU input is read from the very ONNX Runtime",
        "session that produced our maps, matched to the framework's ReLU call by value, and handed back to the",
        "framework's rule. `rel. error` and `1 − cosine` are against that reference (the bar: 1 − cosine <= 1e-4);",
        "`own gates` is the relative error against the reference",
        "with the framework's own gates. `flips / near` counts units whose gate differed between the two forward",
        "passes, and units within the measured float32 disagreement of their kink (whole batch, all ReLUs).",
        "",
        "## Table",
        "",
        "| framework | exporter | opset | model | target | method | rel. error | 1 − cosine | own gates "
        "| flips / near |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for l in lines:
        mark = "" if l.ok else " **FAIL**"
        out.append(f"| {l.framework} | {l.exporter} | {l.opset} | {l.model} | {l.target} | {l.method} | "
                   f"{fmt(l.rel)}{mark} | {fmt(max(0.0, 1.0 - l.cos))} | {fmt(l.native_rel)} | {l.flips} / {l.near} |")
    if traps:
        out += [
            "",
            "## Why tf2onnx's `merge_duplication` is off",
            "",
            "The custom Keras CNN applies two ReLUs (`layers.ReLU` and `tf.nn.relu`) to one tensor. tf2onnx's default",
            "optimisers merge them into one `Relu` node. TensorFlow applies the guided / deconvnet rule once per",
            "call, `[x>0]*(relu(dy1) + relu(dy2))`; the merged graph can only apply it once to the summed gradient,",
            "`[x>0]*relu(dy1 + dy2)`, so those maps differ while the vanilla gradient does not. The parity exports",
            "therefore pass `optimizers=` without `merge_duplication`. With the defaults:",
            "",
            "| framework | exporter | model | target | method | rel. error | 1 − cosine | ReLU nodes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for l in traps:
            out.append(f"| {l.framework} | {l.exporter} | {l.model} | {l.target} | {l.method} | {fmt(l.rel)} | "
                       f"{fmt(max(0.0, 1.0 - l.cos))} | {l.flips} |")
    out += ["", "## Versions", ""]
    out += [f"- {k}: {v}" for k, v in versions.items()]
    out += [f"- python: {platform.python_version()}, {platform.machine()}", f"- computed in {seconds:.0f} s"]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "parity.md")
    ap.add_argument("--only", nargs="+", choices=["tensorflow", "jax", "paddle", "pytorch"],
                    default=["tensorflow", "jax", "paddle", "pytorch"])
    ap.add_argument("--torch-models", nargs="+", help="PyTorch zoo models (default: all)")
    ap.add_argument("--workdir", type=Path, help="keep the exported models and references here")
    args = ap.parse_args(argv)

    start = time.time()
    import onnx
    import onnxruntime

    import onnx_gbp

    versions = {"onnx-gbp": onnx_gbp.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    lines, traps, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for framework in ("tensorflow", "jax", "paddle"):
            if framework in args.only:
                fl, ft, fv, _ = tf_jax_lines(framework, workdir)
                lines += fl
                traps += ft
                versions.update(fv)
                print(f"[{framework}] {len(fl)} rows", flush=True)
        if "pytorch" in args.only:
            (workdir / "torch").mkdir(parents=True, exist_ok=True)
            tl, tv = torch_lines(workdir / "torch", args.torch_models)
            versions.update(tv)
            lines += tl
    if not lines:
        print("no rows", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out, lines, traps, versions, notes, time.time() - start)
    failing = [l for l in lines if not l.ok]
    worst = max(lines, key=lambda l: l.rel)
    print(f"wrote {args.out}: {len(lines)} rows, worst rel {worst.rel:.2e} ({worst.framework} {worst.model} "
          f"{worst.method} {worst.target}), worst cosine {min(l.cos for l in lines):.8f}, {len(failing)} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())
