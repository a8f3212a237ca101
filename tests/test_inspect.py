"""Layer listing, operator coverage and the gradient self-check behind `onnx-gbp layers` and `check`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gbp import inspect

MNIST = Path(__file__).resolve().parent.parent / "models" / "mnist_cnn.onnx"


def one_node_model(op, inputs, attrs=None, consts=None, dtype=TensorProto.FLOAT):
    node = helper.make_node(op, [n for n, _ in inputs] + list(consts or {}), ["y"], name="n", **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", dtype, None)],
                              [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], group=4, strides=[2, 2], pads=[0, 1, 1, 0]),
    dict(kernel_shape=[3, 3], group=2, strides=[1, 2], dilations=[2, 1], pads=[2, 0, 1, 1]),
    dict(kernel_shape=[4, 4], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[4, 4], auto_pad="SAME_LOWER", strides=[3, 2]),
    dict(kernel_shape=[3, 3], auto_pad="VALID", group=8),
])
def test_fast_reference_conv_matches_onnx_runtime(attrs):
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    g = attrs.get("group", 1)
    w = rng.standard_normal((8, 8 // g, *attrs["kernel_shape"])).astype(np.float32)
    model = one_node_model("Conv", [("x", ["N", 8, 9, 10])], attrs, {"w": w, "b": rng.standard_normal(8)
                                                                       .astype(np.float32)})
    x = rng.standard_normal((2, 8, 9, 10)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ReferenceEvaluator(model, new_ops=[inspect._conv_op()]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_relu_family_is_recognised():
    zero, six = np.array(0, np.float32), np.array(6, np.float32)
    cases = {
        ("Relu", ()): "Relu",
        ("Clip", ("lo", "hi")): "Clip[0,6]",
        ("Max", ("lo",)): "Max(x,0)",
        ("Clip", ("hi", "hi")): "",
    }
    for (op, consts), want in cases.items():
        values = {"lo": zero, "hi": six}
        model = one_node_model(op, [("x", ["N", 4])], consts={f"{c}{i}": values[c] for i, c in enumerate(consts)})
        rows = inspect.layers(model)
        assert rows[0].relu == want, (op, consts)


def test_layers_mark_pooled_relu_outputs():
    rows = {r.tensor: r for r in inspect.layers(MNIST)}
    assert rows["relu"].relu == "Relu" and rows["max_pool2d"].relu == "after Relu"
    assert rows["conv2d"].relu == "" and rows["conv2d"].shape == (None, 32, 28, 28)
    assert rows["conv2d"].scope == "conv_layers.0"  # the PyTorch module, from the exporter's metadata


def test_coverage_names_every_unsupported_node():
    model = one_node_model("Sin", [("x", ["N", 3, 4, 4])])
    cov = inspect.coverage(model)
    assert cov.missing == {"Sin": ["n"]} and cov.counts["Sin"] == 1
    assert not inspect.coverage(MNIST).missing


def test_gradient_check_is_float64_sharp_on_a_relu_net():
    result = inspect.gradient_check(MNIST, directions=4)
    assert result.precision == "float64" and result.passed()
    assert result.errors.max() < 1e-5 and result.cosine > 0.999999
    assert result.tensor == "logits" and 0 <= result.target < 10


def test_gradient_check_falls_back_to_float32_differences(monkeypatch):
    """Where onnx.reference cannot run a model, the differences run on ONNX Runtime in float32."""
    monkeypatch.setattr(inspect, "_score_float64", lambda *args: None)
    result = inspect.gradient_check(MNIST, directions=3)
    assert result.precision == "float32" and result.passed() and result.cosine > 0.999
