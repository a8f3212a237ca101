"""Every gradient rule, tested on a tiny model built around its operator (see op_models.py).

For each case the exported model's `vanilla` map (class 0 of an (N, 1) output, f(x) = sum(w * op(x))) must:
  (a) match finite differences of f computed with ONNX Runtime on the original model (no backward graph):
      fourth-order central differences with step h = 2**-7, along every coordinate (the full gradient) and
      along random directions. Inputs lie on a 2**-12 grid and directions on a 2**-10 grid, so x + k h v is
      exact in float32; f's differences are formed in float64 from ORT's float32 op outputs, so what remains
      is the op's own float32 rounding (about 1e-7 / h relative) and the stencil's O(h^4) truncation;
  (b) match PyTorch autograd (float64, the same constants) of the same function, after checking that the
      PyTorch function computes the same forward values as ONNX Runtime;
  (c) be per-sample (a sample's map in the batch equals its map alone), come from a model that passes the
      ONNX full check, and use only ai.onnx operators.
The guided and deconvnet rules of the ReLU family are checked against methods.py's formulas in numpy.

Set RULE_REPORT=path to write every case's measured agreement as JSON lines.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnx_gbp import Explainer, UnsupportedModelError, read_metadata
from onnx_gbp.rules import RULES
from op_models import CASES, Built, G, forward_model, make_model, two_layer_model

BATCH = 3
DIRECTIONS = 6
H = 2.0 ** -7  # finite-difference step: an exact binary fraction (the inputs sit on a 2**-12 grid)
STENCIL = ((-2, 1 / 12), (-1, -8 / 12), (1, 8 / 12), (2, -1 / 12))  # f'(x) h = sum c f(x + k h)
#: Finite differences vs our gradient, relative to max|grad| (coordinates) or to |grad| |v| (directions).
#: The float32 envelope: each op output carries a rounding error of a few 2**-24 |y|, and the stencil divides
#: it by h, so 1.5 * 2**-24 / h ~ 1e-5 per unit of |y|, times the accumulation in sums (Conv, MatMul, norms).
#: Measured worst cases: 4.5e-5 (coordinates, ConvTranspose), 1.7e-5 (directions, LogSoftmax). A wrong rule
#: misses by 1e-2 or more.
FD_TOL = 2e-4
#: PyTorch (float64) vs ours (float32): max|ours - torch| / max|torch|.
TORCH_TOL = 1e-5
#: A sample's map alone vs in the batch.
BATCH_TOL = 1e-6

REPORT: list[dict] = []


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _grid(a: np.ndarray, step: float) -> np.ndarray:
    return (np.round(a / step) * step).astype(np.float32)


def _run_chunks(session, name: str, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    return np.concatenate([session.run([name], {"x": x[i:i + chunk]})[0] for i in range(0, len(x), chunk)])


def finite_differences(built: Built, session, x: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Directional derivatives of f(x) = sum(w * y(x)) along dirs (B, K, *s), per sample: (B, K)."""
    B, K = dirs.shape[:2]
    points = np.stack([x[:, None] + np.float32(k * H) * dirs for k, _ in STENCIL], axis=2)  # (B, K, 4, *s)
    y = _run_chunks(session, built.y_name, points.reshape(-1, *x.shape[1:])).astype(np.float64)
    y = y.reshape(B, K, len(STENCIL), -1)
    dy = sum(c * y[:, :, j] for j, (_, c) in enumerate(STENCIL)) / H  # (B, K, size of y)
    return dy @ built.w.reshape(-1).astype(np.float64)


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    path = os.environ.get("RULE_REPORT")
    if path and REPORT:
        with open(path, "w") as f:
            for row in REPORT:
                f.write(json.dumps(row) + "\n")


def _check_exported(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard domains in the exported graph: {domains - {'', 'ai.onnx'}}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_vanilla_rule(case, record_property):
    built = forward_model(case)
    rng = np.random.default_rng(case.seed + 1)
    x = _grid(case.sample(rng, (BATCH, *case.x_shape)), 2.0 ** -12)

    explainer = Explainer(built.model, method="vanilla", providers="cpu", threads=1)
    result = explainer.explain(x, target=0)
    grad = result.maps["vanilla"].astype(np.float64)
    assert grad.shape == x.shape and result.maps["vanilla"].dtype == np.float32
    _check_exported(explainer.model)

    # The exported model's own output is the original model's.
    original = _session(built.probe)
    out, y = original.run(["out", built.y_name], {"x": x})
    np.testing.assert_allclose(result.outputs["out"], out, rtol=1e-5, atol=1e-5 * np.abs(out).max())

    # (c) each sample's map is its own
    for i in range(BATCH):
        alone = explainer.attribute(x[i:i + 1], target=0)[0]
        assert np.abs(alone - grad[i]).max() <= BATCH_TOL * np.abs(grad[i]).max()

    scale = np.abs(grad).max()
    assert scale > 0, "the test model's gradient is zero: it tests nothing"
    row = {"case": case.id}

    # (a) finite differences: every coordinate, then random directions
    size = int(np.prod(case.x_shape))
    eye = np.eye(size, dtype=np.float32).reshape(size, *case.x_shape)
    fd = finite_differences(built, original, x, np.broadcast_to(eye, (BATCH, *eye.shape))).reshape(x.shape)
    row["fd_coord"] = float(np.abs(fd - grad).max() / scale)
    v = rng.standard_normal((BATCH, DIRECTIONS, size))
    v = _grid(v / np.abs(v).max(-1, keepdims=True), 2.0 ** -10).reshape(BATCH, DIRECTIONS, *case.x_shape)
    fd_v = finite_differences(built, original, x, v)
    g_flat, v_flat = grad.reshape(BATCH, 1, -1), v.reshape(BATCH, DIRECTIONS, -1).astype(np.float64)
    exact = (g_flat * v_flat).sum(-1)
    norms = np.linalg.norm(g_flat, axis=-1) * np.linalg.norm(v_flat, axis=-1)
    row["fd_dir"] = float((np.abs(fd_v - exact) / norms).max())

    # (b) PyTorch autograd of the same function
    if built.torch_fn is not None:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        yt = built.torch_fn(xt)
        assert tuple(yt.shape) == y.shape, f"torch output {tuple(yt.shape)} vs ONNX {y.shape}"
        row["torch_forward"] = float(np.abs(yt.detach().numpy() - y).max() / np.abs(y).max())
        assert row["torch_forward"] <= TORCH_TOL, f"the PyTorch reference is not the same function: {row}"
        (yt * torch.from_numpy(built.w.astype(np.float64))).sum().backward()
        ref = xt.grad.numpy()
        row["torch"] = float(np.abs(grad - ref).max() / np.abs(ref).max())
    REPORT.append(row)
    record_property("agreement", row)

    assert row["fd_coord"] <= FD_TOL, row
    assert row["fd_dir"] <= FD_TOL, row
    if "torch" in row:
        assert row["torch"] <= TORCH_TOL, row


# ---------------------------------------------------------------------------------------------------------
# Guided and deconvnet: the ReLU family against methods.py's formulas
# ---------------------------------------------------------------------------------------------------------

RELU_KINDS = ["Relu", "Clip(0,6)", "Clip(0)", "Max(x,0)", "Max(0,x)", "LeakyRelu"]


def _relu_rule(method: str, a: np.ndarray, dy: np.ndarray, upper: float | None) -> np.ndarray:
    """methods.py: vanilla dy [a > 0]; deconvnet dy [dy > 0]; guided dy [a > 0] [dy > 0]; a bounded ReLU's
    min keeps its true derivative [a < upper] before the method's rule."""
    if upper is not None:
        dy = dy * (a < upper)
    if method == "vanilla":
        return dy * (a > 0)
    if method == "deconvnet":
        return np.maximum(dy, 0)
    return (a > 0) * np.maximum(dy, 0)


@pytest.mark.parametrize("kind", RELU_KINDS)
def test_relu_family_methods(kind):
    model, (W1, W2, w), upper, acts = two_layer_model(kind)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, W1.shape[0])) * 2).astype(np.float32)
    methods = ("guided", "deconvnet", "vanilla")
    explainer = Explainer(model, methods=methods, providers="cpu", threads=1)
    result = explainer.explain(x, target=0)
    _check_exported(explainer.model)

    x64, W1, W2, w = (a.astype(np.float64) for a in (x, W1, W2, w))
    leaky = kind == "LeakyRelu"
    act = (lambda a: np.where(a > 0, a, 0.2 * a)) if leaky else (lambda a: np.clip(a, 0, upper))
    a1 = x64 @ W1
    a2 = act(a1) @ W2
    for a in (a1, a2):  # the gates must not sit within float32 rounding of a kink, and every gate must occur
        kinks = [0.0] + ([upper] if upper else [])
        assert min(np.abs(a - k).min() for k in kinks) > 1e-3
        assert (a < 0).any() and (a > 0).any()
    if upper:
        assert (a1 > upper).any() or (a2 > upper).any()
    dy2 = np.broadcast_to(w, a2.shape)
    for method in methods:
        if leaky:  # not ReLU family: every method keeps the true derivative
            rule = lambda a, dy: dy * np.where(a > 0, 1.0, 0.2)  # noqa: E731
        else:
            rule = lambda a, dy: _relu_rule(method, a, dy, upper)  # noqa: E731
        expected = rule(a1, rule(a2, dy2) @ W2.T) @ W1.T
        got = result.maps[method]
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err <= 1e-5, (method, err)
        if method != "vanilla" and not leaky:
            assert np.abs(got - result.maps["vanilla"]).max() > 1e-3, "the method's rule made no difference"
    relu_nodes = read_metadata(explainer.model)["relu_nodes"]
    assert sorted(relu_nodes) == ([] if leaky else sorted(acts))


# ---------------------------------------------------------------------------------------------------------
# Unsupported operators
# ---------------------------------------------------------------------------------------------------------

#: Shape-preserving unary ops that have no gradient rule (today); the tests take the first ones still missing.
NO_RULE_CANDIDATES = [("LpNormalization", {"axis": 1}), ("Selu", {}), ("Celu", {}), ("Softsign", {}), ("Sin", {}),
                      ("Cos", {})]


def _without_rule(count: int) -> list[tuple[str, dict]]:
    found = [(op, attrs) for op, attrs in NO_RULE_CANDIDATES if op not in RULES]
    if len(found) < count:
        pytest.fail(f"NO_RULE_CANDIDATES has only {len(found)} op(s) still without a rule: add ops that have none")
    return found[:count]


def _projected(g: G, y: str, x_shape: tuple, extra_outputs=(), domains=()) -> onnx.ModelProto:
    nodes = list(g.nodes) + [helper.make_node("Flatten", [y], ["flat"], name="flatten_out", axis=1),
                             helper.make_node("ReduceSum", ["flat", "axes1"], ["out"], name="sum_out", keepdims=1)]
    inits = dict(g.inits, axes1=np.array([1], np.int64))
    return make_model(nodes, inits, x_shape, ["out", *extra_outputs], 17, domains)


def test_unsupported_ops_on_path_are_all_named():
    (op_a, attrs_a), (op_b, attrs_b) = _without_rule(2)
    g = G(0)
    t = g.op("Relu", "x")
    t = g.op(op_a, t, outputs=["a1"], **attrs_a)
    t = g.op("Mul", t, g.const(g.randn(3, 1, 1)))
    t = g.op(op_b, t, outputs=["b1"], **attrs_b)
    t = g.op(op_a, t, outputs=["a2"], **attrs_a)
    model = _projected(g, t, (3, 4, 4))
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(model, method="vanilla", providers="cpu")
    message = str(info.value)
    names = {n.output[0]: n.name for n in g.nodes}
    for op in (op_a, op_b):
        assert op in message
    for out in ("a1", "b1", "a2"):
        assert repr(names[out]) in message, message
    assert set(info.value.problems) == {op_a, op_b}
    assert "Relu" not in message and "Mul" not in message  # supported ops are not blamed


def test_unsupported_custom_domain_op_is_named():
    g = G(0)
    t = g.op("Relu", "x")
    t = g.op("FancyActivation", t, outputs=["fancy"], domain="com.example")
    model = _projected(g, g.op("Mul", t, g.const(2.0)), (3, 4, 4), domains=["com.example"])
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(model, method="vanilla", providers="cpu")
    assert "FancyActivation" in str(info.value) and repr(g.nodes[1].name) in str(info.value)


def test_unsupported_variants_are_all_named():
    g = G(0)
    column = g.op("ArgMax", g.op("ReduceSum", "x", g.ints([0, 1]), keepdims=0), axis=0, keepdims=1)
    gathered = g.op("Gather", "x", column, axis=2)  # indices known only at run time
    powered = g.op("Pow", g.op("Sigmoid", "x"), g.op("Sigmoid", "x"))  # exponent depends on the image
    model = _projected(g, g.op("Add", gathered, powered), (3, 4))
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(model, method="vanilla", providers="cpu")
    message = str(info.value)
    gather, pow_ = (n.name for n in g.nodes if n.op_type in ("Gather", "Pow"))
    assert f"Gather: node {gather!r}" in message and f"Pow: node {pow_!r}" in message, message
    assert "run time" in message and "exponent" in message, message


def test_unsupported_ops_off_the_path_are_ignored():
    (op_a, attrs_a), (op_b, attrs_b) = _without_rule(2)
    g = G(0)
    weight = g.randn(1, 3, 4, 4)
    scaled = g.op(op_a, g.const(weight), **attrs_a)  # a weight computed by an op without a rule
    y = g.op("Mul", g.op("Relu", "x"), scaled)
    side = g.op(op_b, "x", outputs=["side"], **attrs_b)  # depends on the image but feeds no target
    shape = g.op("Shape", "x")  # integer shape arithmetic on the image: not on the float path
    y = g.op("Reshape", y, shape)
    model = _projected(g, y, (3, 4, 4), extra_outputs=[side])
    explainer = Explainer(model, method="vanilla", providers="cpu", threads=1)
    _check_exported(explainer.model)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    scaled_value = _session(make_model([g.nodes[0]], g.inits, (3, 4, 4), [scaled], 17)).run(
        [scaled], {"x": x})[0]
    expected = np.broadcast_to(scaled_value, x.shape) * (x > 0)
    got = explainer.attribute(x, target=0)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
