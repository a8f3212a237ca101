"""The bundled models and photos (models/ in the source tree), found without a network."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import GbpError

#: demo name -> (model file, folder of inputs, title)
DEMOS = {
    "efficientnet": ("efficientnet_lite0.onnx", "photos", "EfficientNet-Lite0 (ImageNet)"),
    "mnist": ("mnist_cnn.onnx", "digits", "MNIST CNN"),
}


def models_dir() -> Path:
    """models/ beside the package in a source checkout (`pip install -e .`), or $ONNX_GBP_MODELS."""
    folder = Path(os.environ.get("ONNX_GBP_MODELS") or Path(__file__).resolve().parent.parent / "models")
    if not (folder / DEMOS["efficientnet"][0]).is_file():
        raise GbpError(f"The bundled models are not in {folder}. They ship in the source tree: clone the "
                       f"repository and `pip install -e .` there, or point ONNX_GBP_MODELS at its models/ folder.")
    return folder


def demo_files(name: str) -> tuple[Path, Path, str]:
    model, inputs, title = DEMOS[name]
    folder = models_dir()
    return folder / model, folder / inputs, title
