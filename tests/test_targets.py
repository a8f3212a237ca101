"""Targets (issue 3): class logits and probabilities, outputs by name, neurons of any layer, several methods in
one graph, and the exported model's contract. Vanilla maps are checked against PyTorch autograd in float64."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import onnx_gbp
from onnx_gbp import InputError, LayerNotFoundError
from small_models import SmallNet, autograd_map, cosine, export, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    example = torch.zeros(2, 3, 16, 16)
    made = {}
    for name, net in {"plain": SmallNet(), "softmax": SmallNet(softmax=True), "two_heads": SmallNet(two_heads=True)}.items():
        out_names = ["probs" if name == "softmax" else "logits"] + (["aux"] if name == "two_heads" else [])
        path = root / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=out_names,
                              dynamic_axes={"image": {0: "N"}}, dynamo=False)
        made[name] = (net.double(), path)
    return made


def _relu_outputs(path) -> list[str]:
    return [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]


def test_default_target_is_the_predicted_logit_even_behind_softmax(nets, images):
    net, path = nets["softmax"]
    explainer = onnx_gbp.Explainer(path, method="vanilla")
    result = explainer.explain(images)
    with torch.no_grad():
        logits = net.fc(net.features(torch.tensor(images, dtype=torch.float64))[1].mean(dim=(2, 3)))
    predicted = logits.argmax(1).numpy()
    np.testing.assert_array_equal(result.targets, predicted)
    ref = autograd_map(lambda x: net.fc(net.features(x)[1].mean(dim=(2, 3)))[range(3), predicted], images)
    assert rel_err(result.maps["vanilla"], ref) <= TOL
    assert "logits" in explainer.target_choice and "Softmax" in explainer.target_choice


def test_probability_target_differentiates_the_softmax(nets, images):
    net, path = nets["softmax"]
    maps = onnx_gbp.Explainer(path, method="vanilla", probability=True).attribute(images, target=[1, 2, 3])
    ref = autograd_map(lambda x: net(x)[range(3), [1, 2, 3]], images)
    assert rel_err(maps, ref) <= TOL


def test_output_chosen_by_name(nets, images):
    net, path = nets["two_heads"]
    explainer = onnx_gbp.Explainer(path, method="vanilla", output="aux")
    result = explainer.explain(images, target=4)
    ref = autograd_map(lambda x: net(x)[1][:, 4], images)
    assert rel_err(result.maps["vanilla"], ref) <= TOL
    np.testing.assert_array_equal(result.targets, [4, 4, 4])
    with pytest.raises(LayerNotFoundError, match="aux"):
        onnx_gbp.Explainer(path, output="auxx")


def test_explicit_targets_per_sample_and_out_of_range(nets, images):
    net, path = nets["plain"]
    explainer = onnx_gbp.Explainer(path, method="vanilla")
    maps = explainer.attribute(images, target=[0, 5, 9])
    assert rel_err(maps, autograd_map(lambda x: net(x)[range(3), [0, 5, 9]], images)) <= TOL
    for bad in (10, -2, [1, 2]):
        with pytest.raises(InputError):
            explainer.attribute(images, target=bad)


@pytest.mark.parametrize("neuron", ["max", 5, (3, 4, 7), "node-name"])
def test_neuron_targets_match_autograd(nets, images, neuron):
    net, path = nets["plain"]
    first_relu = _relu_outputs(path)[0]  # F.relu(bn1(conv1(x))): the a1 of SmallNet.features
    layer = first_relu
    if neuron == "node-name":
        layer = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Relu")
        neuron = 2
    explainer = onnx_gbp.Explainer(path, method="vanilla", layer=layer, neuron=neuron)
    result = explainer.explain(images)

    def picked(x):
        a1 = net.features(x)[0]
        if neuron == "max":
            flat = a1.flatten(1)
            return flat[range(len(x)), flat.detach().argmax(1)]
        if isinstance(neuron, int):
            return a1[:, neuron].sum(dim=(1, 2))
        return a1[(slice(None), *neuron)]

    assert rel_err(result.maps["vanilla"], autograd_map(picked, images)) <= TOL
    if neuron == "max":
        with torch.no_grad():
            expected = net.features(torch.tensor(images, dtype=torch.float64))[0].flatten(1).argmax(1).numpy()
        np.testing.assert_array_equal(result.targets, expected)


def test_neuron_given_as_full_index_equals_position(nets, images):
    _, path = nets["plain"]
    layer = _relu_outputs(path)[1]
    by_position = onnx_gbp.Explainer(path, layer=layer, neuron=(7, 2, 3)).explain(images)
    assert by_position.targets.tolist() == [7 * 8 * 8 + 2 * 8 + 3] * 3


def test_wrong_layer_and_neuron_errors(nets):
    _, path = nets["plain"]
    relu = _relu_outputs(path)[0]
    with pytest.raises(LayerNotFoundError) as info:
        onnx_gbp.Explainer(path, layer=relu + "x")
    assert relu in str(info.value)
    with pytest.raises(InputError, match="out of range"):
        onnx_gbp.Explainer(path, layer=relu, neuron=8)
    with pytest.raises(InputError, match="outside"):
        onnx_gbp.Explainer(path, layer=relu, neuron=(0, 16, 0))
    with pytest.raises(InputError, match="class targets do not apply"):
        onnx_gbp.Explainer(path, layer=relu).attribute(np.zeros((1, 3, 16, 16), np.float32), target=1)


def test_several_methods_share_one_graph_and_equal_single_method_graphs(nets, images):
    _, path = nets["plain"]
    together = onnx_gbp.Explainer(path, methods=("guided", "deconvnet", "vanilla")).explain(images)
    for method in onnx_gbp.METHODS:
        alone = onnx_gbp.Explainer(path, method=method).attribute(images)
        np.testing.assert_array_equal(together.maps[method], alone)
    assert "logits" in together.outputs and together.outputs["logits"].shape == (3, 10)


def test_exported_model_contract(nets, tmp_path, images):
    _, path = nets["plain"]
    dst = tmp_path / "out.onnx"
    before = path.read_bytes()
    onnx_gbp.export(path, dst, methods=("guided", "vanilla"))
    assert path.read_bytes() == before
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["logits", "saliency_guided", "saliency_vanilla", "target_used"]
    inputs = [i.name for i in model.graph.input]
    assert inputs == ["image", "target"]
    new_domains = {n.domain for n in model.graph.node} - {""}
    assert not new_domains
    meta = onnx_gbp.read_metadata(model)
    assert meta["methods"] == ["guided", "vanilla"]
    assert meta["input"] == {"name": "image", "shape": [None, 3, 16, 16], "layout": "NCHW", "fixed_batch": None}
    assert len(meta["relu_nodes"]) == 2 and meta["version"] == onnx_gbp.__version__
    json.dumps(meta)
    # Plain ONNX Runtime, no onnx-gbp: the `target` input is optional (defaults to -1 = predicted class).
    import onnxruntime as ort

    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    default = session.run(["saliency_guided", "target_used"], {"image": images})
    chosen = session.run(["saliency_guided", "target_used"], {"image": images, "target": np.array([2, 2, 2])})
    assert default[1].tolist() == onnx_gbp.Explainer(path).explain(images).targets.tolist()
    assert chosen[1].tolist() == [2, 2, 2]
    with pytest.raises(onnx_gbp.GbpError, match="over the input"):
        onnx_gbp.export(path, path)


def test_batch_independence(nets, images):
    _, path = nets["plain"]
    explainer = onnx_gbp.Explainer(path, methods=onnx_gbp.METHODS)
    together = explainer.explain(images)
    for i in range(len(images)):
        alone = explainer.explain(images[i:i + 1])
        for method in onnx_gbp.METHODS:
            assert cosine(alone.maps[method], together.maps[method][i:i + 1]) > 0.999999
            np.testing.assert_allclose(alone.maps[method], together.maps[method][i:i + 1], rtol=0, atol=1e-6)
