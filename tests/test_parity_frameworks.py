"""Cross-framework parity (issue 5): onnx-gbp's maps for models exported by tf2onnx (Keras 3), jax2onnx
(Flax NNX) and paddle2onnx against guided backprop, deconvnet and the vanilla gradient written in TensorFlow
(`tf.custom_gradient` on every ReLU), JAX (`jax.custom_vjp` in place of `jax.nn.relu`) and Paddle
(`paddle.autograd.PyLayer` in place of `F.relu`). Targets: the class logit, the most activated neuron of an
intermediate layer, and the sum of one of its channels.

Each framework lives in its own environment (.venv-tf, .venv-jax, .venv-paddle) made by
tools/framework_envs.sh, which
tools/run_tests.sh runs first; a missing one is built here. A framework that cannot be installed fails.
The reference is evaluated with the ReLU gates our forward pass took (see tests/frameworks/parity_harness.py),
so that the 1e-4 bar measures rounding, not the float32 envelope.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "frameworks"))
import parity_harness as harness  # noqa: E402

pytestmark = pytest.mark.slow

MODELS = {
    "tensorflow": ("custom_cnn", "resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0"),
    "jax": ("residual_cnn",),
    "paddle": ("residual_cnn",),
}
CASES = [(fw, model, method, target) for fw, models in MODELS.items() for model in models
         for target in harness.TARGETS for method in harness.METHODS]
_RUNS: dict[str, harness.FrameworkRun | Exception] = {}


def framework_run(framework: str, tmp_path_factory) -> harness.FrameworkRun:
    """One export + reference + onnx-gbp run per framework and test session, shared by its tests."""
    if framework not in _RUNS:
        try:
            _RUNS[framework] = harness.run_framework(framework, tmp_path_factory.mktemp(framework),
                                                     list(MODELS[framework]))
        except Exception as exc:  # every test of this framework fails with the same cause, none is skipped
            _RUNS[framework] = exc
    run = _RUNS[framework]
    if isinstance(run, Exception):
        raise run
    return run


@pytest.mark.parametrize("framework,model,method,target", CASES,
                         ids=[f"{fw}-{m}-{me}-{t}" for fw, m, me, t in CASES])
def test_maps_match_framework_reference(framework, model, method, target, tmp_path_factory):
    run = framework_run(framework, tmp_path_factory)
    [row] = [r for r in run.rows if (r.model, r.method, r.target) == (model, method, target)]
    assert row.rel <= harness.MAX_REL_ERROR and row.cos >= harness.MIN_COSINE, (
        f"{framework} {model} {method} {target}: rel {row.rel:.3e}, cosine {row.cos:.8f} "
        f"(with the framework's own gates: rel {row.native_rel:.3e}; {row.flips} gates flipped)")


@pytest.mark.parametrize("framework,model", [(fw, m) for fw, ms in MODELS.items() for m in ms])
def test_every_relu_is_overridden_and_matched(framework, model, tmp_path_factory):
    """The reference's ReLU ran once per ReLU op of the model (all spellings caught), and each of its calls
    matched a distinct ONNX ReLU node that onnx-gbp treated as ReLU."""
    check = framework_run(framework, tmp_path_factory).checks[model]
    assert check["relu_calls"] == check["relu_ops"], check
    assert check["onnx_relu_nodes"] == check["relu_ops"], check
    assert check["matched_nodes_class"] == check["onnx_relu_nodes"], check


@pytest.mark.parametrize("framework,model", [(fw, m) for fw, ms in MODELS.items() for m in ms])
def test_default_targets_match(framework, model, tmp_path_factory):
    """Our default class (the logit feeding the softmax, predicted class), our 'max' neuron of the
    intermediate layer and our channel are the ones the framework picks (the neuron and channel in the
    framework's NHWC terms, though the ONNX graph may hold that layer as NCHW)."""
    check = framework_run(framework, tmp_path_factory).checks[model]
    for target in harness.TARGETS:
        ours, theirs = check[f"targets_{target}"]
        assert ours == theirs == check[f"gated_chosen_{target}"], (target, check)


def test_keras_relu_forms_all_present(tmp_path_factory):
    """The custom Keras CNN has nine ReLUs in four spellings (activation="relu", layers.ReLU,
    layers.Activation("relu"), tf.nn.relu in a layer); MobileNetV2's ReLU6 arrives as Clip(0, 6)."""
    checks = framework_run("tensorflow", tmp_path_factory).checks
    assert checks["custom_cnn"]["relu_ops"] == 9
    assert checks["mobilenet_v2"]["ops"].get("Clip", 0) == checks["mobilenet_v2"]["relu_ops"] > 0
    assert checks["efficientnet_b0"]["relu_ops"] == 0  # swish only: every method is the true gradient


def test_tf2onnx_merging_twin_relus_changes_guided_maps(tmp_path_factory):
    """tf2onnx's merge_duplication optimiser folds the custom CNN's two ReLUs of one tensor into one node.
    TensorFlow applies the rule per call, so guided and deconvnet maps of the merged graph differ from the
    framework's (vanilla does not): that is why the parity exports run with that optimiser off."""
    run = framework_run("tensorflow", tmp_path_factory)
    traps = {r.method: r for r in run.traps}
    assert traps["vanilla"].relus == run.checks["custom_cnn"]["relu_ops"] - 1
    assert traps["vanilla"].rel <= harness.MAX_REL_ERROR
    assert traps["guided"].rel > 1e-3 and traps["deconvnet"].rel > 1e-3
