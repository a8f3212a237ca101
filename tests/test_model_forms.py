"""Input models as users have them (issue 3): old and new opsets, external data, several inputs, NHWC layout,
symbolic spatial sizes, fixed batch sizes, unnamed nodes, corrupt files; and the runtime options."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import onnx_gbp
from onnx_gbp import InputError, ModelLoadError, ProviderError
from onnx_gbp.model import MIN_OPSET, opset_of
from small_models import SmallNet, autograd_map, export, rel_err

TOL = 1e-4
RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def net():
    return SmallNet()


def _vanilla_ref(net: nn.Module, x: np.ndarray) -> np.ndarray:
    net = net.double()
    with torch.no_grad():
        predicted = net(torch.tensor(x, dtype=torch.float64)).argmax(1)
    ref = autograd_map(lambda t: net(t)[range(len(x)), predicted], x)
    net.float()
    return ref


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_legacy_opsets_are_converted(net, tmp_path, opset):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16), opset=opset)
    assert opset_of(onnx.load(str(path))) == opset
    explainer = onnx_gbp.Explainer(path, method="vanilla")
    assert opset_of(explainer.model) == max(opset, MIN_OPSET)
    assert rel_err(explainer.attribute(X), _vanilla_ref(net, X)) <= TOL


def test_newest_opset_the_runtime_runs(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16), dynamo=True)
    model = onnx.load(str(path))
    newest = _newest_runnable_opset(model)
    upgraded = onnx.version_converter.convert_version(model, newest)
    explainer = onnx_gbp.Explainer(upgraded, method="vanilla")
    assert opset_of(explainer.model) == newest >= 21
    assert rel_err(explainer.attribute(X), _vanilla_ref(net, X)) <= TOL


def _newest_runnable_opset(model: onnx.ModelProto) -> int:
    for opset in range(onnx.defs.onnx_opset_version(), MIN_OPSET, -1):
        try:
            candidate = onnx.version_converter.convert_version(model, opset)
            ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    raise AssertionError("no opset above the minimum runs")


def test_external_data(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    model = onnx.load(str(path))
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="m.weights",
              size_threshold=0)
    assert (ext.parent / "m.weights").stat().st_size > 1000
    maps = onnx_gbp.Explainer(ext, method="vanilla").attribute(X)
    assert rel_err(maps, _vanilla_ref(net, X)) <= TOL
    onnx_gbp.export(ext, tmp_path / "out.onnx")
    assert onnx.load(str(tmp_path / "out.onnx")).graph.initializer


class TwoInputs(nn.Module):
    """A scale vector input first, the image second: the image must be found by rank (or named)."""

    def __init__(self):
        super().__init__()
        self.net = SmallNet()

    def forward(self, scale, image):
        return self.net(image * scale[:, :, None, None])


def test_several_inputs(tmp_path):
    model = TwoInputs().eval()
    path = tmp_path / "two.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.ones(2, 3), torch.zeros(2, 3, 16, 16)), str(path), dynamo=False,
                          input_names=["scale", "image"], dynamic_axes={"scale": {0: "N"}, "image": {0: "N"}})
    scale = RNG.uniform(0.5, 2, (3, 3)).astype(np.float32)
    for name in (None, "image"):
        explainer = onnx_gbp.Explainer(path, method="vanilla", input_name=name)
        maps = explainer.attribute(X, inputs={"scale": scale})
        st = torch.tensor(scale, dtype=torch.float64)
        model.double()
        with torch.no_grad():
            predicted = model(st, torch.tensor(X, dtype=torch.float64)).argmax(1)
        ref = autograd_map(lambda t: model(st, t)[range(3), predicted], X)
        model.float()
        assert rel_err(maps, ref) <= TOL
    with pytest.raises(InputError, match="no input named"):
        onnx_gbp.Explainer(path, input_name="img")


def test_nhwc_model_gives_nhwc_maps(tmp_path):
    net = SmallNet(nhwc=True)
    x = np.ascontiguousarray(X.transpose(0, 2, 3, 1))
    path = export(net, tmp_path / "nhwc.onnx", torch.zeros(1, 16, 16, 3))
    explainer = onnx_gbp.Explainer(path, method="vanilla")
    assert explainer.layout == "NHWC"
    maps = explainer.attribute(x)
    assert maps.shape == x.shape
    assert rel_err(maps, _vanilla_ref(net, x)) <= TOL
    with pytest.raises(InputError, match="channels-first"):
        explainer.attribute(X)


def test_symbolic_spatial_dims_fixed_from_the_first_batch(net, tmp_path):
    path = export(net, tmp_path / "dyn.onnx", torch.zeros(1, 3, 16, 16), dynamic_spatial=True)
    explainer = onnx_gbp.Explainer(path, method="vanilla")
    for size in (16, 24):
        x = RNG.standard_normal((2, 3, size, size)).astype(np.float32)
        assert rel_err(explainer.attribute(x), _vanilla_ref(net, x)) <= TOL
    with pytest.raises(InputError, match="symbolic"):
        onnx_gbp.export(path, tmp_path / "out.onnx")
    onnx_gbp.export(path, tmp_path / "out.onnx", input_shape=(1, 3, 20, 20))


def test_fixed_batch_becomes_dynamic(net, tmp_path):
    path = export(net, tmp_path / "b1.onnx", torch.zeros(1, 3, 16, 16), dynamic_batch=False)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    explainer = onnx_gbp.Explainer(path, method="vanilla")
    assert explainer.input_shape[0] is None
    assert rel_err(explainer.attribute(X), _vanilla_ref(net, X)) <= TOL


class HardBatch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 14 * 14, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).reshape(1, -1))


def test_hard_coded_batch_runs_in_chunks(tmp_path):
    net = HardBatch().eval()
    path = export(net, tmp_path / "hard.onnx", torch.zeros(1, 3, 16, 16), dynamic_batch=False)
    explainer = onnx_gbp.Explainer(path, method="vanilla", progress=True)
    assert explainer.input_shape[0] == 1
    ref = np.concatenate([_vanilla_ref(net, X[i:i + 1]) for i in range(len(X))])  # the net itself takes batch 1
    assert rel_err(explainer.attribute(X), ref) <= TOL


def test_unnamed_nodes_get_stable_names(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.name = ""
    first = onnx_gbp.Explainer(model, methods=("guided",)).model
    second = onnx_gbp.Explainer(model, methods=("guided",)).model
    names = [n.name for n in first.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in second.graph.node]


def test_bad_files(tmp_path):
    with pytest.raises(ModelLoadError, match="No such model"):
        onnx_gbp.Explainer(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a model at all" * 10)
    with pytest.raises(ModelLoadError):
        onnx_gbp.Explainer(junk)
    text = tmp_path / "text.onnx"
    text.write_text("hello")
    with pytest.raises(ModelLoadError):
        onnx_gbp.Explainer(text)


def test_input_shape_mismatch_is_explained(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    explainer = onnx_gbp.Explainer(path)
    with pytest.raises(InputError, match="batch axis"):
        explainer.attribute(X[0])
    with pytest.raises(InputError, match="float"):
        explainer.attribute((X * 100).astype(np.uint8))


def test_runtime_options(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    reference = onnx_gbp.Explainer(path, optimization="disable", threads=1).attribute(X)
    chunked = onnx_gbp.Explainer(path, batch_size=2, progress=True, threads=2).attribute(X)
    np.testing.assert_allclose(chunked, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    with pytest.raises(ValueError, match="optimization"):
        onnx_gbp.Explainer(path, optimization="max")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="checks the error on a CPU-only onnxruntime; this one has the CUDA provider")
def test_cuda_request_without_cuda_is_one_clear_error(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        onnx_gbp.Explainer(path, providers="cuda")
    assert onnx_gbp.Explainer(path, providers="auto").provider == "CPUExecutionProvider"


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with the CUDA provider (not installed here)")
def test_cuda_matches_cpu(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    cuda = onnx_gbp.Explainer(path, methods=onnx_gbp.METHODS, providers="cuda")
    assert cuda.provider == "CUDAExecutionProvider"
    cpu = onnx_gbp.Explainer(path, methods=onnx_gbp.METHODS, providers="cpu")
    on_gpu, on_cpu = cuda.explain(X), cpu.explain(X)
    for method in onnx_gbp.METHODS:
        assert rel_err(on_gpu.maps[method], on_cpu.maps[method]) <= TOL


def test_unsorted_graph_is_sorted_first(net, tmp_path):
    path = export(net, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # ONNX Runtime still runs this; our walks need order
    maps = onnx_gbp.Explainer(model, method="vanilla").attribute(X)
    assert rel_err(maps, _vanilla_ref(net, X)) <= TOL
