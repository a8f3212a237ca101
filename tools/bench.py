#!/usr/bin/env python3
"""Benchmark onnx-gbp against plain inference and against Captum, side by side in one run.

    pip install -e ".[bench]" && pip install --no-deps onnx2torch==1.5.15   # see pyproject.toml
    python tools/bench.py                                     # every model, batch 1 and 8, CPU
    python tools/bench.py --models resnet18 --batches 8 --repeats 7 --markdown docs/bench.md
    python tools/bench.py --provider cuda --batches 1 8 64    # onnxruntime-gpu and a CUDA torch

Contenders, all on the same network with the same weights and the same thread count:
  forward     ONNX Runtime, the original model, same session options as onnx-gbp: the baseline
  guided      onnx-gbp, one method (guided backpropagation): Explainer.explain
  three       onnx-gbp, guided + deconvnet + vanilla in one graph
  captum      Captum GuidedBackprop on the PyTorch module, eager mode (torch.set_num_threads)
  onnx2torch  what a user with only the .onnx file has today: onnx2torch.convert, then Captum GuidedBackprop
and, when asked for with --contenders, two ways to run the guided graph that may pay on a GPU:
  guided-iobinding  the same graph through ONNX Runtime's IO binding: the batch bound from host memory, only the
                    map bound as an output (in device memory) and copied back
  guided-fp16       the guided graph converted to float16 (onnxruntime.transformers.float16, float32 inputs and
                    outputs kept); its cosine with the float32 map is reported
and the time to build the augmented model (onnx_gbp.build_model, from the .onnx file, in memory).

Timing: every contender runs once to warm up, then the contenders take turns (round-robin, the order rotating each
round) for --repeats rounds, so a load spike from other processes hits all of them alike. Each cell reports the
median and the interquartile range of the wall-clock times; the ratios are ratios of medians.

Memory: each contender runs again in a fresh subprocess, which resets the kernel's resident-set high-water mark
(/proc/self/clear_refs) after its imports and input batch, then builds the contender (loading weights, creating the
session, converting) and runs it twice. The cell is VmHWM minus the resident size at that reset: native memory
included (ONNX Runtime's arena, PyTorch's allocator), the interpreter and libraries excluded. Host memory only.

The same targets (each sample's predicted class) are given to every contender, and the cosine similarity of each
PyTorch contender's map with onnx-gbp's guided map is reported: Captum overrides only nn.ReLU modules, so where a
network's ReLUs are spelled otherwise (ReLU6, functional) it computes a different map, and the speed comparison
should be read with that in mind.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# PyTorch's OpenMP threads spin-wait between parallel regions. On a CPU shared with other work that made its times
# erratic: MobileNetV2's forward pass took 20 ms to 2 s at 2 threads. Sleeping threads give PyTorch the same
# treatment onnx-gbp's sessions get (ONNX Runtime's allow_spinning=0). Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench_models  # noqa: E402

CONTENDERS = ("forward", "guided", "three", "captum", "onnx2torch")
VARIANTS = ("guided-iobinding", "guided-fp16")  # opt-in: --contenders ... guided-iobinding guided-fp16
#: Ops ONNX Runtime's CPU provider has no float16 kernel for (in the form the guided graph uses them): left in float32.
CPU_FP32_OPS = ["ScatterElements"]
THREE = ("guided", "deconvnet", "vanilla")
BUNDLED = {"efficientnet_lite0": ROOT / "models" / "efficientnet_lite0.onnx"}
SIZE = 224


# -- the contenders -------------------------------------------------------------------------------------------

@dataclass
class Setup:
    name: str
    onnx_path: Path
    torch_path: Path  # torch.save of the module with the same weights
    provider: str
    threads: int


def _stub_torchvision() -> None:
    """onnx2torch imports torchvision at import time, for its NMS and RoIAlign converters only. The torchvision
    wheel that matches a CPU torch build is not installable offline here, and no CNN benchmarked uses those ops,
    so a stand-in whose functions raise is enough. A real torchvision, when installed, is used instead."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    import types

    def missing(*args, **kwargs):
        raise NotImplementedError("torchvision is not installed")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = missing
    tv.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops


def torch_device(provider: str) -> str:
    return "cuda" if provider == "cuda" else "cpu"


def make_contender(kind: str, setup: Setup):
    """A callable (x: np.ndarray, targets: np.ndarray) -> map or outputs, with everything heavy built up front."""
    if kind in VARIANTS:
        return _guided_variant(kind, setup)
    if kind in ("forward", "guided", "three"):
        import onnx

        from onnx_gbp import Explainer
        from onnx_gbp.runtime import make_session

        if kind == "forward":
            session = make_session(onnx.load(str(setup.onnx_path)), setup.provider, setup.threads)
            name = session.get_inputs()[0].name
            return lambda x, targets: session.run(None, {name: x})[0]
        methods = ("guided",) if kind == "guided" else THREE
        explainer = Explainer(str(setup.onnx_path), methods=methods, providers=setup.provider, threads=setup.threads,
                              batch_size=1 << 20)
        return lambda x, targets: explainer.explain(x, target=targets).maps["guided"]

    import torch
    from captum.attr import GuidedBackprop

    torch.set_num_threads(setup.threads)
    device = torch_device(setup.provider)
    if kind == "captum":
        module = torch.load(setup.torch_path, weights_only=False)
    elif kind == "onnx2torch":
        _stub_torchvision()
        import onnx2torch

        module = onnx2torch.convert(str(setup.onnx_path))
    else:
        raise ValueError(kind)
    module = module.eval().to(device)
    gbp = GuidedBackprop(module)

    def run(x, targets):
        xt = torch.from_numpy(x).to(device)
        out = gbp.attribute(xt, target=torch.from_numpy(targets).to(device))
        return out.detach().cpu().numpy()

    return run


def _guided_variant(kind: str, setup: Setup):
    import onnxruntime as ort

    from onnx_gbp.export import build_model, read_metadata, saliency_name
    from onnx_gbp.runtime import make_session

    model = build_model(str(setup.onnx_path), methods=("guided",))
    target_input = read_metadata(model)["target"]["target_input"]
    if kind == "guided-fp16":
        from onnxruntime.transformers import float16

        blocked = list(float16.DEFAULT_OP_BLOCK_LIST) + (CPU_FP32_OPS if setup.provider == "cpu" else [])
        model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    session = make_session(model, setup.provider, setup.threads)
    name = session.get_inputs()[0].name
    if kind == "guided-fp16":
        return lambda x, targets: session.run([saliency_name("guided")], {name: x, target_input: targets})[0]

    device = torch_device(setup.provider)
    binding = session.io_binding()

    def run(x, targets):
        binding.bind_cpu_input(name, x)  # host arrays: ONNX Runtime copies them to the device itself
        # the target input has a default (an initializer), so the runtime takes it only as an OrtValue
        binding.bind_ortvalue_input(target_input, ort.OrtValue.ortvalue_from_numpy(targets, device, 0))
        binding.bind_output(saliency_name("guided"), device)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run


# -- measuring ------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    error: str | None = None
    cosine: float | None = None
    memory_mb: dict | None = None  # {"peak_mb": while running, "build_peak_mb": while building}
    memory_error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def quartiles(self) -> tuple[float, float] | None:
        if not self.times:
            return None
        q1, q3 = np.percentile(self.times, [25, 75])
        return float(q1), float(q3)


def inputs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def sync(provider: str) -> None:
    if provider == "cuda":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def time_round_robin(runs: dict, x: np.ndarray, targets: np.ndarray, repeats: int, provider: str,
                     cells: dict[str, Cell], log) -> None:
    names = list(runs)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(provider)
            start = time.perf_counter()
            runs[name](x, targets)
            sync(provider)
            cells[name].times.append(time.perf_counter() - start)
        log(f"    round {r + 1}/{repeats}: " + "  ".join(f"{n} {cells[n].times[-1] * 1e3:.0f}ms" for n in names))


def probe_memory(kind: str, setup: Setup, batch: int) -> tuple[dict | None, str | None]:
    """Peak resident memory added by running one contender ("peak_mb"), and by building it ("build_peak_mb"),
    measured in a fresh process (MB)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", kind, "--probe-onnx", str(setup.onnx_path),
           "--probe-torch", str(setup.torch_path), "--batches", str(batch), "--threads", str(setup.threads),
           "--provider", setup.provider]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            return (None, result["error"]) if "error" in result else (result, None)
    return None, (done.stderr.strip().splitlines() or ["probe failed"])[-1][:200]


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def run_probe(args) -> None:
    """The --probe subprocess: print {"peak_mb": ...} for one contender."""
    setup = Setup("probe", Path(args.probe_onnx), Path(args.probe_torch), args.provider, args.threads)
    x = inputs(args.batches[0])
    if args.probe in ("captum", "onnx2torch"):
        import torch  # noqa: F401  (imported before the reset: the library is not the contender's memory)
        if args.probe == "onnx2torch":
            _stub_torchvision()
            import onnx2torch  # noqa: F401
        import captum.attr  # noqa: F401
    else:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        import onnx_gbp  # noqa: F401
    targets = np.zeros(len(x), np.int64)
    clear_refs = Path("/proc/self/clear_refs")
    clear_refs.write_text("5")  # reset VmHWM to the current resident size
    base = _status_kb("VmRSS")
    try:
        run = make_contender(args.probe, setup)
        build_peak = _status_kb("VmHWM") - base
        clear_refs.write_text("5")
        run(x, targets)
        run(x, targets)
    except Exception as exc:  # report, do not hide
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}))
        return
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024, "build_peak_mb": build_peak / 1024}))


# -- one model ------------------------------------------------------------------------------------------------

def prepare(name: str, workdir: Path, provider: str, threads: int, log) -> Setup:
    """The torch module (saved) and its ONNX file: exported here, or the bundled one for EfficientNet-Lite0."""
    import torch

    torch_path = workdir / f"{name}.pt"
    onnx_path = BUNDLED.get(name)
    if onnx_path is None or not onnx_path.exists():
        onnx_path = workdir / f"{name}.onnx"
    if not torch_path.exists() or not onnx_path.exists():
        log(f"  building {name} and exporting it to ONNX")
        module = bench_models.build(name)
        torch.save(module, torch_path)
        if not onnx_path.exists():
            bench_models.export_onnx(module, onnx_path)
    return Setup(name, onnx_path, torch_path, provider, threads)


def measure_export(setup: Setup, repeats: int) -> list[float]:
    from onnx_gbp.export import build_model

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build_model(str(setup.onnx_path), methods=("guided",))
        times.append(time.perf_counter() - start)
    return times


def bench_model(name: str, args, workdir: Path, log) -> dict:
    setup = prepare(name, workdir, args.provider, args.threads, log)
    result: dict = {"model": name, "onnx": str(setup.onnx_path), "batches": {}}
    log(f"  export (build_model) x{args.export_repeats}")
    result["export_s"] = measure_export(setup, args.export_repeats)

    runs, errors = {}, {}
    for kind in args.contenders:
        try:
            runs[kind] = make_contender(kind, setup)
        except Exception as exc:
            errors[kind] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            log(f"  {kind} could not be built: {errors[kind]}")
    for batch in args.batches:
        log(f"  {name} batch {batch}")
        x = inputs(batch)
        cells = {kind: Cell(error=errors.get(kind)) for kind in args.contenders}
        live = dict(runs)
        targets = np.asarray(live["forward"](x, None)).reshape(batch, -1).argmax(1) if "forward" in live \
            else np.zeros(batch, np.int64)
        maps = {}
        for kind in list(live):  # warm-up, agreement, and a failure here is reported, not hidden
            try:
                maps[kind] = live[kind](x, targets)
            except Exception as exc:
                cells[kind].error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                log(f"  {kind} failed: {cells[kind].error}")
                if args.verbose:
                    traceback.print_exc()
                del live[kind]
        if "guided" in maps:
            for kind in ("three", "captum", "onnx2torch", *VARIANTS):
                if kind in maps:
                    cells[kind].cosine = cosine(maps[kind], maps["guided"])
        del maps
        time_round_robin(live, x, targets, args.repeats, args.provider, cells, log)
        if args.memory:
            for kind in live:
                log(f"    memory probe: {kind}")
                cells[kind].memory_mb, cells[kind].memory_error = probe_memory(kind, setup, batch)
        result["batches"][batch] = {"targets": targets.tolist(), "cells": {k: vars(c) for k, c in cells.items()}}
    del runs
    gc.collect()
    return result


# -- reporting ------------------------------------------------------------------------------------------------

def _ms(cell: dict) -> str:
    if cell.get("error"):
        return "failed"
    times = cell.get("times") or []
    if not times:
        return "–"
    q1, q3 = np.percentile(times, [25, 75])
    return f"{statistics.median(times) * 1e3:.0f} ({q1 * 1e3:.0f}–{q3 * 1e3:.0f})"


def _median(cell: dict) -> float | None:
    times = cell.get("times") or []
    return statistics.median(times) if times and not cell.get("error") else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def tables(results: list[dict], args) -> str:
    lines = ["Times in ms: median (interquartile range) over "
             f"{args.repeats} interleaved rounds, {args.threads} thread(s), provider {args.provider}.", ""]
    lines += ["| model | batch | forward | guided | three methods | Captum | onnx2torch + Captum | "
              "guided / forward | three / forward | Captum / guided | onnx2torch / guided |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for res in results:
        for batch, data in res["batches"].items():
            c = data["cells"]
            m = {k: _median(c[k]) if k in c else None for k in CONTENDERS}
            cols = [_ms(c[k]) if k in c else "–" for k in CONTENDERS]
            lines.append(f"| {res['model']} | {batch} | " + " | ".join(cols) + " | "
                         f"{_ratio(m['guided'], m['forward'])} | {_ratio(m['three'], m['forward'])} | "
                         f"{_ratio(m['captum'], m['guided'])} | {_ratio(m['onnx2torch'], m['guided'])} |")
            for k in CONTENDERS:
                if k in c and c[k].get("error"):
                    notes.append(f"- {res['model']} batch {batch}, {k}: {c[k]['error']}")
    lines += ["", "Export: build_model from the .onnx file, one method, median of "
              f"{args.export_repeats}. Memory: resident-set high-water mark added by each contender in a fresh "
              "process, in MB, while running (while building: loading weights, creating the session, exporting or "
              "converting). Cosine similarity of each PyTorch contender's map with onnx-gbp's guided map:", ""]
    lines += ["| model | batch | export s | mem forward | mem guided | mem three | mem Captum | mem onnx2torch | "
              "cos Captum | cos onnx2torch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        export = statistics.median(res["export_s"]) if res.get("export_s") else None
        for batch, data in res["batches"].items():
            c = data["cells"]

            def mem(k):
                if k not in c or c[k].get("memory_mb") is None:
                    return "failed" if k in c and c[k].get("memory_error") else "–"
                m = c[k]["memory_mb"]
                return f"{m['peak_mb']:.0f} ({m['build_peak_mb']:.0f})"

            def cos(k):
                return f"{c[k]['cosine']:.4f}" if k in c and c[k].get("cosine") is not None else "–"

            lines.append(f"| {res['model']} | {batch} | {export:.2f} | " + " | ".join(mem(k) for k in CONTENDERS)
                         + f" | {cos('captum')} | {cos('onnx2torch')} |")
            for k in CONTENDERS:
                if k in c and c[k].get("memory_error"):
                    notes.append(f"- {res['model']} batch {batch}, memory of {k}: {c[k]['memory_error']}")
    lines += _variant_table(results, notes)
    if notes:
        lines += ["", "Failures:", ""] + notes
    return "\n".join(lines) + "\n"


def _variant_table(results: list[dict], notes: list[str]) -> list[str]:
    """IO binding and float16 against the plain guided run, where they were measured."""
    rows = []
    for res in results:
        for batch, data in res["batches"].items():
            c = data["cells"]
            if not any(k in c for k in VARIANTS):
                continue
            m = {k: _median(c[k]) if k in c else None for k in ("guided", *VARIANTS)}
            cos = [c.get(k, {}).get("cosine") for k in VARIANTS]
            rows.append(f"| {res['model']} | {batch} | " + " | ".join(_ms(c[k]) if k in c else "–" for k in
                                                                     ("guided", *VARIANTS))
                        + f" | {_ratio(m['guided-iobinding'], m['guided'])} | {_ratio(m['guided-fp16'], m['guided'])}"
                        + "".join(f" | {'–' if v is None else f'{v:.6f}'}" for v in cos) + " |")
            notes += [f"- {res['model']} batch {batch}, {k}: {c[k]['error']}" for k in VARIANTS
                      if k in c and c[k].get("error")]
    if not rows:
        return []
    return ["", "The guided graph run through IO binding and in float16, against the plain guided run:", "",
            "| model | batch | guided | guided, IO binding | guided, float16 | IO binding / guided | "
            "float16 / guided | cos IO binding | cos float16 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows]


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                            if ln.startswith("Model name")), "?")
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        info["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    for module in ("onnxruntime", "onnx", "torch", "captum", "onnx2torch", "numpy"):
        try:
            from importlib.metadata import version

            info[module] = version(module)
        except Exception:
            info[module] = "not installed"
    return info


# -- command line ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", nargs="+", default=list(bench_models.MODELS), choices=bench_models.MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--export-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime and torch threads")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS + VARIANTS)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory probes")
    parser.add_argument("--workdir", type=Path, help="where exported models are kept (reused between runs)")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown to this file")
    parser.add_argument("--json", type=Path, help="write every sample and the machine description as JSON")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--probe", choices=CONTENDERS + VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--probe-onnx", help=argparse.SUPPRESS)
    parser.add_argument("--probe-torch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        run_probe(args)
        return 0
    if "forward" not in args.contenders:
        args.contenders.insert(0, "forward")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onnx-gbp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    for name in args.models:
        log(f"{name}")
        results.append(bench_model(name, args, workdir, log))
    text = tables(results, args)
    command = "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(text)
    took = (datetime.datetime.now(datetime.timezone.utc) - started).seconds
    header = f"Measured {started:%Y-%m-%d %H:%M} UTC in {took} s with `{command}`.\n\n"
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "started": started.isoformat(), "machine": machine(),
                                         "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
