"""The `onnx-gbp` command line, through click's runner and through the installed console script.

Most runs use the bundled MNIST CNN (models/mnist_cnn.onnx, 28x28, milliseconds per image) and its bundled
digits; one subprocess runs the real demo on EfficientNet-Lite0.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnx_gbp import Explainer
from onnx_gbp.cli import cli, resolve_preprocess

MODELS = Path(__file__).resolve().parent.parent / "models"
MNIST = MODELS / "mnist_cnn.onnx"
DIGITS = MODELS / "digits"


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_model(path: Path, layout="NHWC", op="Relu", classes=5) -> Path:
    """x -> [Transpose to NCHW] -> Conv(3->4, 3x3) -> op -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(0)
    shape = ["N", 8, 8, 3] if layout == "NHWC" else ["N", 3, 8, 8]
    nodes, first = [], "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        first = "x_nchw"
    nodes += [helper.make_node("Conv", [first, "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node(op, ["conv"], ["act"], name="act"),
              helper.make_node("GlobalAveragePool", ["act"], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc")]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w", rng.standard_normal((4, 3, 3, 3))), ("b", rng.standard_normal(4)),
        ("fc_w", rng.standard_normal((classes, 4))), ("fc_b", rng.standard_normal(classes))]]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def assert_clean_failure(result, out: Path, *needles: str):
    """Exit status 1, one 'Error: ...' line naming the problem, no traceback, and nothing written."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.output, result.output
    assert not out.exists(), list(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


# -- explain ----------------------------------------------------------------------------------------------
def test_explain_writes_pictures_maps_and_summary(tmp_path):
    out = tmp_path / "maps"
    result = run("explain", MNIST, DIGITS, "-o", out, "-m", "guided", "-m", "vanilla", "--grid")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["guided", "vanilla"] and summary["layout"] == "NCHW"
    assert summary["preprocess"]["mean"] == [0.1307] and summary["preprocess"]["fit"] == "stretch"  # model card
    assert set(summary["timing"]) >= {"explain_s", "ms_per_image"} and summary["grid"] == "grid.png"
    records = summary["images"]
    assert [r["name"] for r in records] == [str(d) for d in range(10)]
    for digit, r in enumerate(records):  # the bundled digits are all recognised
        assert r["predicted"] == r["target"] == digit and r["predicted_name"] == str(digit)
        assert 0 < r["probability"] <= 1 and isinstance(r["score"], float)
        for name in r["files"]:
            assert (out / name).is_file(), name
    assert np.load(out / "3.guided.npy").shape == (1, 28, 28)
    with Image.open(out / "3.vanilla.png") as im:
        assert im.mode == "RGB" and min(im.size) >= 112  # 28 px maps are enlarged to be readable
    with Image.open(out / "grid.png") as im:
        assert im.width > 500
    assert "3.png  →  3 3" in result.output and "wrote" in result.output


def test_npy_input_maps_equal_the_python_api(tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "batch.npy", x)
    run("explain", MNIST, tmp_path / "batch.npy", "-o", tmp_path / "out", "-m", "deconvnet", "--target", "4", "-q")
    want = Explainer(MNIST, method="deconvnet").attribute(x, 4)
    for i in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"batch-{i:04d}.deconvnet.npy"), want[i])


def test_target_and_neuron_options(tmp_path):
    run("explain", MNIST, DIGITS / "7.png", "-o", tmp_path / "a", "--target", "1", "-q")
    record = json.loads((tmp_path / "a" / "summary.json").read_text())["images"][0]
    assert record["predicted"] == 7 and record["target"] == 1 and "target_probability" in record
    run("explain", MNIST, DIGITS / "7.png", "-o", tmp_path / "b", "--layer", "relu_2", "--neuron", "3,5,6", "-q")
    record = json.loads((tmp_path / "b" / "summary.json").read_text())["images"][0]
    assert record["target_layer"] == "relu_2" and record["target_neuron"] == 3 * 49 + 5 * 7 + 6
    run("explain", MNIST, DIGITS / "7.png", "-o", tmp_path / "c", "--layer", "relu_2", "--neuron", "9", "-q")
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["images"][0]["target_neuron"] == 9


def test_nhwc_model_and_default_preprocessing(tmp_path):
    model = tiny_model(tmp_path / "tiny.onnx", "NHWC")
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 50, 3), np.uint8)).save(tmp_path / "p.png")
    result = run("explain", model, tmp_path / "p.png", "-o", tmp_path / "out", "-m", "vanilla")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["layout"] == "NHWC" and summary["input_shape"] == [8, 8, 3]
    assert summary["preprocess"]["preset"] == "imagenet" and "note: no preprocessing given" in result.output
    assert np.load(tmp_path / "out" / "p.vanilla.npy").shape == (8, 8, 3)


def test_preprocessing_precedence():
    card = {"preset": "tf", "resize": 256, "fit": "crop"}
    assert resolve_preprocess(card, {}, 3).name == "tf"
    chosen = resolve_preprocess(card, {"preset": "imagenet", "mean": None}, 3)
    assert chosen.name == "imagenet" and chosen.resize == 256  # new normalisation, the card's geometry
    assert resolve_preprocess(card, {"mean": (0.1,), "std": (0.2,)}, 3).mean == (0.1,)
    assert resolve_preprocess({}, {}, 1, quiet=True).name == "unit"


def test_existing_output_folder_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run("explain", MNIST, DIGITS / "1.png", "-o", out, "-q", "--no-overlay")
    assert (out / "keep.txt").read_text() == "mine" and (out / "1.guided.png").is_file()
    assert not (out / "1.guided.overlay.png").exists()


@pytest.mark.parametrize("case", ["missing model", "not onnx", "corrupt image", "fails mid-run", "unknown layer",
                                  "target out of range", "unknown class", "wrong preprocessing", "npy shape",
                                  "out is an input folder"])
def test_bad_inputs_fail_cleanly(tmp_path, case):
    out = tmp_path / "out"
    good = DIGITS / "1.png"
    (tmp_path / "text.onnx").write_text("this is not a model")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(whole)
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[:1500])  # header fine, pixels missing
    np.save(tmp_path / "hwc.npy", np.zeros((28, 28, 1), np.float32))
    folder = tmp_path / "digits"
    shutil.copytree(DIGITS, folder)
    args, needles = {
        "missing model": ([tmp_path / "none.onnx", good], ["No such model file"]),
        "not onnx": ([tmp_path / "text.onnx", good], ["not a readable ONNX model"]),
        "corrupt image": ([MNIST, tmp_path / "junk.png"], ["junk.png is not a readable image"]),
        "fails mid-run": ([MNIST, good, tmp_path / "cut.jpg", "--batch-size", "1"], ["cut.jpg is not a readable"]),
        "unknown layer": ([MNIST, good, "--layer", "relu9"], ["No layer named 'relu9'", "relu"]),
        "target out of range": ([MNIST, good, "--target", "10"], ["out of range", "10 classes"]),
        "unknown class": ([MNIST, good, "--target", "seven"], ["No class named 'seven'"]),
        "wrong preprocessing": ([MNIST, good, "--preset", "imagenet"], ["3 mean values", "1 channel"]),
        "npy shape": ([MNIST, tmp_path / "hwc.npy"], ["(28, 28, 1)", "looks transposed"]),
        "out is an input folder": ([MNIST, folder], ["also an input folder"]),
    }[case]
    if case == "out is an input folder":
        out = folder
        before = sorted(p.name for p in folder.iterdir())
        result = run("explain", *args, "-o", out, ok=False)
        assert result.exit_code == 1 and needles[0] in result.output
        assert sorted(p.name for p in folder.iterdir()) == before
        return
    assert_clean_failure(run("explain", *args, "-o", out, ok=False), out, *needles)


def test_never_writes_over_an_input_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(DIGITS / "2.png", out / "x.png")
    shutil.copy(DIGITS / "5.png", out / "x.guided.png")  # would be x.png's guided map
    before = sha(out / "x.guided.png")
    result = run("explain", MNIST, out / "x.png", out / "x.guided.png", "-o", out, ok=False)
    assert result.exit_code == 1 and "Refusing to write over input file" in result.output
    assert sha(out / "x.guided.png") == before and sorted(p.name for p in out.iterdir()) == ["x.guided.png", "x.png"]


# -- export, layers, check, demo --------------------------------------------------------------------------
def test_export_writes_a_runnable_model_and_never_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(MNIST, model)
    before = sha(model)
    result = run("export", model, "-o", tmp_path / "m.gbp.onnx", "-m", "guided", "-m", "vanilla")
    assert "saliency_guided" in result.output and "saliency_vanilla" in result.output
    session = ort.InferenceSession(str(tmp_path / "m.gbp.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    got = session.run(["saliency_vanilla"], {"image": x, "target": np.array([3, 3])})[0]
    np.testing.assert_allclose(got, Explainer(MNIST, method="vanilla").attribute(x, 3), rtol=1e-5, atol=1e-6)
    refused = run("export", model, "-o", tmp_path / "." / "m.onnx", ok=False)
    assert refused.exit_code == 1 and "Refusing to write over the input model" in refused.output
    failed = run("export", model, "-o", tmp_path / "bad.onnx", "--layer", "nope", ok=False)
    assert failed.exit_code == 1 and "No layer named 'nope'" in failed.output and not (tmp_path / "bad.onnx").exists()
    assert sha(model) == before


def test_layers_lists_tensors_ops_shapes_and_relus():
    lines = run("layers", MNIST).stdout.splitlines()
    assert lines[0].split()[:5] == ["tensor", "node", "op", "shape", "ReLU"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "Relu" in rows["relu_2"].split() and "(N, 128, 7, 7)" in rows["relu_2"]
    assert "after Relu" in rows["max_pool2d_2"] and "Relu" not in rows["conv2d"]
    relu_only = run("layers", MNIST, "--relu-only").stdout
    assert "relu_2" in relu_only and "conv2d " not in relu_only


def test_check_reports_coverage_and_gradient_agreement(tmp_path):
    result = run("check", MNIST)
    assert "every operator on the path has a gradient rule" in result.output
    assert "float64 central differences" in result.output and ": OK" in result.output
    bad = run("check", tiny_model(tmp_path / "sin.onnx", "NCHW", op="Sin"), ok=False)
    assert bad.exit_code == 1 and "Sin (1): act" in bad.output and "Traceback" not in bad.output


def test_demo_mnist(tmp_path):
    out = tmp_path / "demo"
    run("demo", "--model", "mnist", "-o", out, "-q")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["guided", "vanilla", "deconvnet"] and (out / "grid.png").is_file()
    assert [r["predicted"] for r in summary["images"]] == list(range(10))


# -- the installed console script -------------------------------------------------------------------------
def console_script() -> str:
    found = shutil.which("onnx-gbp", path=str(Path(sys.executable).parent))
    assert found, "the onnx-gbp console script is not installed next to this Python: pip install -e ."
    return found


def test_console_script_demo(tmp_path):
    """The README's demo, as a user runs it: the real EfficientNet-Lite0 on the bundled photos."""
    proc = subprocess.run([console_script(), "demo", "-o", str(tmp_path / "gbp-demo")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "gbp-demo" / "summary.json").read_text())
    predicted = {r["name"]: r["predicted"] for r in summary["images"]}
    assert predicted["chelsea"] in (281, 282, 283, 284, 285) and predicted["coffee"] == 967
    assert {r["predicted_name"] for r in summary["images"]} >= {"espresso"}
    assert (tmp_path / "gbp-demo" / "grid.png").stat().st_size > 10_000
    assert "coffee.jpg  →  967 espresso" in proc.stdout


def test_console_script_errors_are_one_line(tmp_path):
    proc = subprocess.run([console_script(), "explain", str(MNIST), str(tmp_path / "missing.png"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"Error: No such file or folder: {tmp_path / 'missing.png'}"]
    assert not (tmp_path / "out").exists()
    version = subprocess.run([console_script(), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "onnx-gbp" in version.stdout
