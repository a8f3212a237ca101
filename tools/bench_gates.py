#!/usr/bin/env python3
"""Time the ways a ReLU gate can be spelled in standard ONNX ops, on one large activation, side by side.

    python tools/bench_gates.py                      # 8 x 96 x 112 x 112: MobileNetV2's largest activation, batch 8
    python tools/bench_gates.py --shape 8 64 56 56 --threads 1

Each form computes dx = dy * [0 < y] (ReLU) or dy * [0 < y < 6] (ReLU6) from the ReLU's output y, as
onnx_gbp.methods does. Every form is checked to give the same array as the first of its kind before it is timed;
the forms take turns for --repeats rounds and each line gives the median time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_gbp.runtime import session_options  # noqa: E402


def node(op: str, inputs: list[str], output: str, **attrs) -> "helper.NodeProto":
    return helper.make_node(op, inputs, [output], **attrs)


FORMS = {
    "ReLU: Greater, Cast, Mul (onnx-gbp)": [
        node("Greater", ["y", "zero"], "b"), node("Cast", ["b"], "g", to=TensorProto.FLOAT),
        node("Mul", ["dy", "g"], "dx")],
    "ReLU: Clip(y, 0, 1), Ceil, Mul": [
        node("Clip", ["y", "zero", "one"], "c"), node("Ceil", ["c"], "g"), node("Mul", ["dy", "g"], "dx")],
    "ReLU: Greater, Where": [node("Greater", ["y", "zero"], "b"), node("Where", ["b", "dy", "zero"], "dx")],
    "ReLU: Sign, Mul": [node("Sign", ["y"], "g"), node("Mul", ["dy", "g"], "dx")],
    "ReLU6: Greater, Less, And, Cast, Mul (onnx-gbp)": [
        node("Greater", ["y", "zero"], "b1"), node("Less", ["y", "six"], "b2"), node("And", ["b1", "b2"], "b"),
        node("Cast", ["b"], "g", to=TensorProto.FLOAT), node("Mul", ["dy", "g"], "dx")],
    "ReLU6: Sub, Mul, Ceil, Min, Mul": [
        node("Sub", ["six", "y"], "r"), node("Mul", ["y", "r"], "p"), node("Ceil", ["p"], "q"),
        node("Min", ["q", "one"], "g"), node("Mul", ["dy", "g"], "dx")],
    "ReLU6: two gated Muls": [
        node("Greater", ["y", "zero"], "b1"), node("Cast", ["b1"], "g1", to=TensorProto.FLOAT),
        node("Less", ["y", "six"], "b2"), node("Cast", ["b2"], "g2", to=TensorProto.FLOAT),
        node("Mul", ["dy", "g1"], "d1"), node("Mul", ["d1", "g2"], "dx")],
}


def model(nodes: list, shape: list[int]) -> bytes:
    used = {i for n in nodes for i in n.input}
    consts = [numpy_helper.from_array(np.array(v, np.float32), name)
              for name, v in (("zero", 0.0), ("one", 1.0), ("six", 6.0)) if name in used]
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                                              for n in ("y", "dy")],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, shape)], consts)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=4, type=int, default=[8, 96, 112, 112])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    y = np.clip(3 * rng.standard_normal(args.shape), 0, 6).astype(np.float32)  # a ReLU6 output: 0s, 6s, between
    feeds = {"y": y, "dy": rng.standard_normal(args.shape).astype(np.float32)}
    sessions = {name: ort.InferenceSession(model(nodes, args.shape), session_options(args.threads),
                                           providers=["CPUExecutionProvider"]) for name, nodes in FORMS.items()}
    first: dict[str, np.ndarray] = {}
    for name, session in sessions.items():
        kind = name.split(":")[0]
        out = session.run(None, feeds)[0]
        if not np.array_equal(out, first.setdefault(kind, out)):
            raise SystemExit(f"{name!r} disagrees with the first {kind} form")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    print(f"shape {args.shape}, {args.threads} thread(s), median of {args.repeats}:")
    for name, t in times.items():
        print(f"{statistics.median(t) * 1e3:8.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
