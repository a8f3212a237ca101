"""onnx-gbp against an independent PyTorch reference on the architecture zoo (tests/zoo_torch.py).

For every zoo model, each of torch.onnx.export's exporters (TorchScript, dynamo=False; dynamo, dynamo=True;
dynamic batch) and each method, on a batch of two different images with each sample's predicted class as
target:

- ours vs the float64 reference that overrides every ReLU (tests/torch_reference.py), evaluated with the gates
  ONNX Runtime's forward pass took: max|ours - ref| / max|ref| <= 1e-4 and cosine >= 0.9999 (float32 maps);
- every ReLU the reference overrode has an ONNX counterpart whose float32 input equals the reference's to
  1e-4, and onnx-gbp treated exactly that many nodes as ReLU; a flipped gate is therefore within rounding;
- vanilla vs plain torch autograd; guided and deconvnet vs Captum where every ReLU is an nn.ReLU module;
- a "max" neuron of an intermediate ReLU output as target, for several models.

- the first image alone (batch of one) gets the map it gets in the batch: the batch axis is dynamic.

Each model exports once per exporter per session; the float64 reference pass is shared by every exporter,
method and target. The dynamo exporter is most of this file's time, so the dynamo cases of all but four models
(FAST_DYNAMO) are marked slow: `-m "not slow"` still runs every model with the TorchScript exporter.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import zoo_torch as zoo
from torch_reference import one_torch_thread  # noqa: F401 (autouse fixture)
from torch_reference import (
    COS_TOL,
    FORWARD_TOL,
    METHODS,
    REL_TOL,
    MethodReLU,
    ReluOverride,
    Rule,
    cosine,
    rel_err,
    run_ours,
)

#: Models whose dynamo export also runs without -m slow: one per ReLU form (Relu, Clip, Max) and the
#: model with a channel split.
FAST_DYNAMO = {"resnet18", "mobilenet_v2", "unet", "shufflenet_v2"}


@pytest.fixture(scope="session")
def zoo_cases(tmp_path_factory):
    """Parity cases by model name, built on first use and kept for the session (one export per exporter)."""
    workdir = tmp_path_factory.mktemp("zoo")

    class Cases(dict):
        def __missing__(self, name):
            self[name] = zoo.case(name, workdir)
            return self[name]

    return Cases()


def exporter_params(names):
    return [pytest.param(name, exporter, id=f"{name}-{exporter}",
                         marks=[pytest.mark.slow] if exporter == "dynamo" and name not in FAST_DYNAMO else [])
            for name in names for exporter in zoo.EXPORTERS]


ALL = exporter_params(zoo.ZOO)
WITH_RELU = exporter_params([n for n, e in zoo.ZOO.items() if n not in ("efficientnet_b0", "convnext")])
CAPTUM = exporter_params([n for n, e in zoo.ZOO.items() if e.captum])
NEURON = exporter_params([n for n, e in zoo.ZOO.items() if e.neuron_call is not None])


def check_sound(parity) -> None:
    """The comparison is sound: every ReLU the reference overrode is a node onnx-gbp treated as ReLU, its ONNX
    Runtime input equals the reference's to float32 rounding (so any gate that flipped sat within rounding of
    its kink), and the target onnx-gbp chose is the reference's maximum up to rounding."""
    assert not parity.unmatched, f"reference ReLU calls with no ONNX counterpart: {parity.unmatched}"
    assert parity.calls == len(parity.ours.relu_nodes), \
        f"the reference overrode {parity.calls} ReLUs, onnx-gbp treated {len(parity.ours.relu_nodes)} nodes as ReLU"
    assert parity.forward_err <= FORWARD_TOL, f"ReLU inputs differ from the reference by {parity.forward_err:.2e}"
    assert parity.choice_gap <= 1e-6, f"our target is {parity.choice_gap:.2e} below the reference's maximum"


def check_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    rel, cos = rel_err(ours, ref), cosine(ours, ref)
    assert rel <= REL_TOL and cos >= COS_TOL, f"{what}: max rel. error {rel:.2e}, cosine {cos:.8f}"


# ---------------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------------

SPELLINGS = {
    "nn.ReLU": lambda x: torch.nn.ReLU()(x),
    "nn.ReLU(inplace=True)": lambda x: torch.nn.ReLU(inplace=True)(x * 1),
    "F.relu": F.relu,
    "F.relu(inplace=True)": lambda x: F.relu(x * 1, inplace=True),
    "torch.relu": torch.relu,
    "Tensor.relu": lambda x: x.relu(),
    "Tensor.relu_": lambda x: (x * 1).relu_(),
    "torch.relu_": lambda x: torch.relu_(x * 1),
    "F.relu_": lambda x: F.relu_(x * 1),
    "F.threshold(0, 0)": lambda x: F.threshold(x, 0.0, 0.0),
    "clamp(min=0)": lambda x: x.clamp(min=0),
    "torch.clamp(x, 0)": lambda x: torch.clamp(x, 0),
    "clamp_(min=0)": lambda x: (x * 1).clamp_(min=0),
    "clip(min=0)": lambda x: x.clip(min=0.0),
    "clamp_min(0)": lambda x: x.clamp_min(0),
    "torch.clamp_min": lambda x: torch.clamp_min(x, 0.0),
    "clamp_min_(0)": lambda x: (x * 1).clamp_min_(0.0),
    "nn.ReLU6": lambda x: torch.nn.ReLU6()(x),
    "nn.ReLU6(inplace=True)": lambda x: torch.nn.ReLU6(inplace=True)(x * 1),
    "F.relu6": F.relu6,
    "F.hardtanh(0, 6)": lambda x: F.hardtanh(x, 0.0, 6.0),
    "F.hardtanh_(0, 6)": lambda x: F.hardtanh_(x * 1, 0.0, 6.0),
    "nn.Hardtanh(0, 6)": lambda x: torch.nn.Hardtanh(0.0, 6.0)(x),
    "clamp(0, 6)": lambda x: x.clamp(0, 6),
}
BOUNDED = {"nn.ReLU6", "nn.ReLU6(inplace=True)", "F.relu6", "F.hardtanh(0, 6)", "F.hardtanh_(0, 6)",
           "nn.Hardtanh(0, 6)", "clamp(0, 6)"}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("method", METHODS)
def test_reference_overrides_every_relu_spelling(spelling, method):
    """Each spelling is seen once and gets the method's rule: d/dx sum(w * relu(x)) with w of both signs."""
    x = torch.tensor([-2.0, -0.5, 0.5, 3.0, 7.0, -1.0, 2.0, 8.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    with ReluOverride(Rule(method)) as mode:
        y = SPELLINGS[spelling](x)
    assert len(mode.calls) == 1
    upper = 6.0 if spelling in BOUNDED else np.inf
    assert torch.equal(y.detach(), x.detach().clamp(0, upper))
    (y * w).sum().backward()
    xv, wv = x.detach().numpy(), w.numpy() * (x.detach().numpy() < upper)
    expected = {"vanilla": wv * (xv > 0), "deconvnet": np.maximum(wv, 0), "guided": np.maximum(wv, 0) * (xv > 0)}
    np.testing.assert_array_equal(x.grad.numpy(), expected[method])


def test_reference_leaves_other_clamps_alone():
    """clamp with a min other than 0, and hardtanh(-1, 1), keep their true derivative."""
    x = torch.tensor([-2.0, -0.5, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    with ReluOverride(Rule("deconvnet")) as mode:
        y = x.clamp(min=-1.0) + F.hardtanh(x) + x.clamp(max=1.0)
    assert not mode.calls
    (-y.sum()).backward()
    np.testing.assert_array_equal(x.grad.numpy(), -np.array([1.0, 3.0, 3.0, 1.0]))


def test_reference_gates_replace_the_forward_sign():
    """Given gates replace [x > 0] (and [x < upper]) in the backward pass; nothing else changes."""
    x = torch.tensor([-1e-9, 1e-9, 2.0, 5.9999999], dtype=torch.float64, requires_grad=True)
    gate = (torch.tensor([True, False, True, True]), torch.tensor([True, True, True, False]))
    for method, expected in (("vanilla", [1, 0, 1, 0]), ("guided", [1, 0, 1, 0]), ("deconvnet", [1, 1, 1, 0])):
        rule = Rule(method, lambda k, upper: gate)
        (grad,) = torch.autograd.grad(MethodReLU.apply(x, rule, 0, 6.0).sum(), x)
        np.testing.assert_array_equal(grad.numpy(), expected)


# ---------------------------------------------------------------------------------------------------------
# The zoo: class targets
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, exporter", ALL)
def test_class_target_matches_reference(zoo_cases, name, exporter, method):
    parity = zoo_cases[name].class_parity(exporter)
    check_sound(parity)
    check_close(parity.ours.maps[method], parity.reference[method], f"{name}/{exporter}/{method} vs reference")


@pytest.mark.parametrize("name, exporter", ALL)
def test_vanilla_is_torch_autograd(zoo_cases, name, exporter):
    """The vanilla map is the true gradient; so is the reference's vanilla map with its own gates."""
    parity = zoo_cases[name].class_parity(exporter)
    np.testing.assert_allclose(parity.plain["vanilla"], parity.autograd, rtol=0,
                               atol=1e-12 * np.abs(parity.autograd).max())
    if parity.flipped == 0:
        check_close(parity.ours.maps["vanilla"], parity.autograd, f"{name}/{exporter} vanilla vs autograd")


@pytest.mark.parametrize("name, exporter", ALL)
def test_sample_alone_equals_sample_in_batch(zoo_cases, name, exporter):
    """The exported batch axis is dynamic: the first image alone gets the map it gets in the batch of two."""
    ours = zoo_cases[name].class_parity(exporter).ours
    for method in METHODS:
        check_close(ours.alone[method][0], ours.maps[method][0], f"{name}/{exporter}/{method} alone vs in batch")


@pytest.mark.parametrize("name, exporter", WITH_RELU)
def test_methods_are_told_apart(zoo_cases, name, exporter):
    """Guided, deconvnet and vanilla maps differ on every zoo model with ReLUs by far more than the
    tolerance, so agreeing with the reference is a statement about the method, not only about the network."""
    ref = zoo_cases[name].class_parity(exporter).reference
    for a, b in (("guided", "vanilla"), ("deconvnet", "vanilla"), ("guided", "deconvnet")):
        assert rel_err(ref[a], ref[b]) > 100 * REL_TOL, f"{a} and {b} maps coincide on {name}"


@pytest.mark.parametrize("name, exporter", exporter_params(["efficientnet_b0", "convnext"]))
def test_no_relu_means_every_method_is_the_gradient(zoo_cases, name, exporter):
    """SiLU, sigmoid, GELU and LayerNorm keep their true derivative in every method."""
    parity = zoo_cases[name].class_parity(exporter)
    assert parity.calls == 0 and not parity.ours.relu_nodes
    for method in ("guided", "deconvnet"):
        check_close(parity.ours.maps[method], parity.autograd, f"{name}/{exporter}/{method} vs autograd")


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
@pytest.mark.parametrize("name, exporter", CAPTUM)
def test_captum_agrees(zoo_cases, name, exporter, method):
    """Captum's GuidedBackprop / Deconvolution hook nn.ReLU modules; where those are all the ReLUs, Captum is
    a second witness."""
    parity = zoo_cases[name].class_parity(exporter)
    captum = parity.captum[method]
    np.testing.assert_allclose(parity.plain[method], captum, rtol=0, atol=1e-12 * np.abs(captum).max())
    if parity.flipped == 0:
        check_close(parity.ours.maps[method], captum, f"{name}/{exporter}/{method} vs Captum")


# ---------------------------------------------------------------------------------------------------------
# The zoo: neuron targets
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, exporter", NEURON)
def test_neuron_target_matches_reference(zoo_cases, name, exporter, method):
    """The most activated neuron of an intermediate ReLU's output (the layer named by its ONNX tensor)."""
    case = zoo_cases[name]
    parity = case.neuron_parity(exporter)
    assert parity.choice_gap <= 1e-6, f"our neuron is {parity.choice_gap:.2e} below the reference's maximum"
    assert not parity.unmatched, f"reference ReLU calls with no ONNX counterpart: {parity.unmatched}"
    assert parity.forward_err <= FORWARD_TOL
    assert np.abs(parity.reference[method]).max() > 0, "the neuron's map is zero: a vacuous comparison"
    check_close(parity.ours.maps[method], parity.reference[method],
                f"{name}/{exporter}/{method} neuron of {case.neuron_layer(exporter)}")


def test_neuron_layer_by_node_name(zoo_cases):
    """A layer named by the node that produces it gives the same maps as the layer named by its tensor."""
    case = zoo_cases["resnet18"]
    path, tensor = case.onnx_path("torchscript"), case.neuron_layer("torchscript")
    node = next(n.name for n in onnx.load(str(path)).graph.node if n.output and n.output[0] == tensor)
    assert node != tensor
    by_tensor = case.neuron_parity("torchscript").ours
    by_node = run_ours(path, case.x, layer=node)
    np.testing.assert_array_equal(by_node.targets, by_tensor.targets)
    for method in METHODS:
        np.testing.assert_array_equal(by_node.maps[method], by_tensor.maps[method])
