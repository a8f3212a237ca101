#!/usr/bin/env python3
"""Time several .onnx files side by side on one random batch: an A/B test of graph variants.

    python tools/ab.py model.onnx guided_a.onnx guided_b.onnx --batch 8 --repeats 15 --threads 2

The first file is the baseline (usually the plain model); each line gives the median wall time and its ratio to the
baseline. The files take turns, the order rotating each round, so a load spike from other processes on a shared
machine hits all of them alike. Sessions get onnx-gbp's own options (runtime.session_options, Pad_Fusion disabled).
Files with saliency outputs fetch only those, and their maps are compared with the first such file's
(max|a-b| / max|b|), so a variant that changes the result says so.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_gbp.export import SALIENCY_PREFIX  # noqa: E402
from onnx_gbp.runtime import UNSAFE_OPTIMIZERS, session_options  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image height and width (NCHW, 3 channels)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(f), session_options(args.threads), providers=["CPUExecutionProvider"],
                                     disabled_optimizers=UNSAFE_OPTIMIZERS) for f in args.files]
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    fetch = [[o.name for o in s.get_outputs() if o.name.startswith(SALIENCY_PREFIX)] or None for s in sessions]
    results = [s.run(names, feed) for s, names, feed in zip(sessions, fetch, feeds)]  # warm-up, and the maps
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(args.repeats):
        for i in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            sessions[i].run(fetch[i], feeds[i])
            times[i].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    reference = next((res[0] for res, names in zip(results, fetch) if names), None)
    for path, t, res, names in zip(args.files, times, results, fetch):
        agreement = ""
        if names and reference is not None:
            agreement = f"  map vs first: {np.abs(res[0] - reference).max() / np.abs(reference).max():.1e}"
        print(f"{statistics.median(t) * 1e3:9.1f} ms  x{statistics.median(t) / base:5.2f}  {path}{agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
