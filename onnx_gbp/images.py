"""Turn image files, folders of them and preprocessed .npy tensors into the batch a model takes.

Images: any size and mode; resized and centre-cropped to the model's input size, scaled and normalised by a
preset or a custom mean/std, put in the model's channel order and layout. `.npy` files hold tensors already
preprocessed, one sample (C, H, W) / (H, W, C) or a batch (N, ...), exactly as the model takes them.
Every check that can fail runs in `collect` and `Preprocess.check`, before any map is computed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}
#: torchvision's habit: resize the short side to size / 0.875 (256 for 224), then crop the centre.
CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Preprocess:
    """x = (pixel * scale - mean) / std per channel, pixels 0..255 in RGB order (BGR when `bgr`).

    mean, std: one value, or one per channel, in units of `pixel * scale`.
    resize: short side before the centre crop (None: input size / 0.875); fit="stretch" resizes straight to
        the input size instead, ignoring the aspect ratio (what MNIST-style models expect).
    """

    name: str = "custom"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False
    resize: int | None = None
    fit: str = "crop"
    interpolation: str = "bicubic"

    def check(self, channels: int) -> None:
        """Fail early, and in words, when this preprocessing cannot produce the model's channels."""
        if channels not in (1, 3):
            raise InputError(f"The model takes {channels} channels; images give 1 (grey) or 3 (colour). "
                             f"Pass preprocessed tensors as .npy files instead.")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise InputError(f"Preprocessing {self.name!r} has {len(values)} {what} values, but the model "
                                 f"takes {channels} channel(s): give one value or {channels} "
                                 f"(--mean/--std), or another --preset.")
        if any(s == 0 for s in self.std):
            raise InputError("A std of 0 divides by zero: every --std value must be non-zero.")
        if self.bgr and channels != 3:
            raise InputError(f"Preprocessing {self.name!r} swaps colour channels to BGR, but the model takes "
                             f"{channels} channel: choose --preset unit, or --mean/--std with one value.")
        if self.fit not in ("crop", "stretch"):
            raise InputError(f"fit must be 'crop' or 'stretch', not {self.fit!r}.")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {self.interpolation!r}.")

    def describe(self) -> dict:
        return {"preset": self.name, "scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                "bgr": self.bgr, "resize": self.resize, "fit": self.fit, "interpolation": self.interpolation}


PRESETS = {
    # torchvision / timm ImageNet models
    "imagenet": Preprocess("imagenet", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Inception, MobileNet, EfficientNet-Lite (TF): x / 127.5 - 1
    "tf": Preprocess("tf", 1 / 255, (0.5,), (0.5,)),
    "unit": Preprocess("unit", 1 / 255, (0.0,), (1.0,)),
    # Caffe / Keras "caffe" mode (VGG16, ResNet50): BGR, 0..255, ImageNet mean in B, G, R order
    "caffe": Preprocess("caffe", 1.0, (103.939, 116.779, 123.68), (1.0,), bgr=True),
    # models that normalise inside the graph (Keras EfficientNet, ...): plain 0..255
    "raw": Preprocess("raw", 1.0, (0.0,), (1.0,)),
}


def preset(name: str, **changes) -> Preprocess:
    if name not in PRESETS:
        raise InputError(f"Unknown preprocessing preset {name!r}; choose from {', '.join(PRESETS)}.")
    changes = {k: v for k, v in changes.items() if v is not None}
    if "mean" in changes or "std" in changes:
        changes["name"] = f"{name}+custom"
    return replace(PRESETS[name], **{k: tuple(v) if k in ("mean", "std") else v for k, v in changes.items()})


@dataclass(frozen=True)
class ModelInput:
    """Where the image goes: the per-sample shape (no batch axis) and its layout."""

    shape: tuple[int, ...]
    layout: str  # "NCHW" or "NHWC"

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.layout == "NHWC" else self.shape[0]

    @property
    def size(self) -> tuple[int, int]:  # (height, width)
        return tuple(self.shape[0:2]) if self.layout == "NHWC" else tuple(self.shape[1:3])


@dataclass(frozen=True)
class Source:
    """One sample: an image file, or one entry of a .npy file (index None: the file is one sample)."""

    path: Path
    index: int | None = None
    npy: bool = False

    def __str__(self) -> str:
        return f"{self.path}[{self.index}]" if self.index is not None else str(self.path)


def collect(paths: Sequence[str | Path], model: ModelInput) -> list[Source]:
    """Expand folders (their images and .npy files, sorted, not recursive) and .npy batches into samples, checking that
    every file exists, every image's header reads, and every .npy tensor fits the model."""
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"} and
                           not p.name.startswith(".") and p.is_file())
            if not found:
                raise InputError(f"Folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                 f"and no .npy tensors.")
            for p in found:
                sources += _npy_sources(p, model) if p.suffix.lower() == ".npy" else [_image_source(p)]
        elif not path.exists():
            raise InputError(f"No such file or folder: {path}")
        elif path.suffix.lower() == ".npy":
            sources += _npy_sources(path, model)
        else:
            sources.append(_image_source(path))
    if not sources:
        raise InputError("No inputs given.")
    return sources


def _image_source(path: Path) -> Source:
    try:
        with Image.open(path) as im:
            im.verify()  # reads the header and, for PNG, checks chunk CRCs; the full decode comes later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} is not a readable image ({_reason(exc)}).") from exc
    return Source(path)


def _npy_sources(path: Path, model: ModelInput) -> list[Source]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npy array ({_reason(exc)}).") from exc
    if array.dtype.kind != "f":
        raise InputError(f"{path} holds {array.dtype} values; .npy inputs must be preprocessed float tensors "
                         f"(save images as PNG/JPEG to have them preprocessed here).")
    want = model.shape
    if array.shape == want:
        return [Source(path, None, True)]
    if array.ndim == len(want) + 1 and array.shape[1:] == want:
        return [Source(path, i, True) for i in range(len(array))]
    sample = array.shape[1:] if array.ndim == len(want) + 1 else array.shape
    hint = ""
    if len(sample) == 3 == len(want) and sorted(sample) == sorted(want) and sample != want:
        hint = f" It looks transposed: the model's layout is {model.layout}."
    raise InputError(f"{path} has shape {array.shape}; the model takes {want} per sample ({model.layout}), "
                     f"or a batch (N, {', '.join(map(str, want))}).{hint}")


def load_image(path: Path) -> Image.Image:
    """Decode fully, honour EXIF rotation, and bring any mode (16-bit, palette, alpha, CMYK) to 8-bit RGB."""
    try:
        with Image.open(path) as im:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "palette images with transparency" notes
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    a = np.asarray(im, np.float64)
                    if a.max() > 255:  # 16-bit
                        a = a * (255 / 65535)
                    elif im.mode == "F" and a.max() <= 1:  # float images in 0..1
                        a = a * 255
                    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
                if im.mode == "P":
                    im = im.convert("RGBA")
                if im.mode in ("RGBA", "LA", "PA"):  # flatten transparency onto white, as viewers show it
                    rgba = im.convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path} is not a readable image ({_reason(exc)}).") from exc


def fit(image: Image.Image, size: tuple[int, int], pre: Preprocess) -> Image.Image:
    """Resize and centre-crop (or stretch) an RGB image to (height, width)."""
    height, width = size
    method = INTERPOLATIONS[pre.interpolation]
    if pre.fit == "stretch":
        return image.resize((width, height), method)
    fraction = min(height, width) / pre.resize if pre.resize else CROP_FRACTION
    scale = max(height / image.height, width / image.width) / min(fraction, 1.0)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), method)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image, model: ModelInput, pre: Preprocess) -> np.ndarray:
    """A fitted RGB image as one preprocessed sample (no batch axis) in the model's layout."""
    pixels = np.asarray(image.convert("L") if model.channels == 1 else image, np.float32)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels[..., ::-1] if pre.bgr else pixels
    x = (pixels * np.float32(pre.scale) - np.float32(pre.mean)) / np.float32(pre.std)
    return np.ascontiguousarray(x if model.layout == "NHWC" else x.transpose(2, 0, 1), np.float32)


def load(source: Source, model: ModelInput, pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (tensor in the model's layout, the picture of it as uint8 RGB H x W x 3)."""
    if source.npy:
        array = np.load(source.path, allow_pickle=False)
        x = np.asarray(array if source.index is None else array[source.index], np.float32)
        return x, tensor_picture(x, model.layout, pre.bgr)
    fitted = fit(load_image(source.path), model.size, pre)
    view = fitted.convert("L").convert("RGB") if model.channels == 1 else fitted
    return to_tensor(fitted, model, pre), np.asarray(view)


def tensor_picture(x: np.ndarray, layout: str, bgr: bool = False) -> np.ndarray:
    """A preprocessed tensor shown as a picture: its own min..max stretched to 0..255 (its preprocessing is
    unknown, so this is the honest inverse)."""
    hwc = x if layout == "NHWC" else np.moveaxis(x, 0, -1)
    hwc = hwc[..., ::-1] if bgr and hwc.shape[-1] == 3 else hwc
    lo, hi = float(hwc.min()), float(hwc.max())
    pic = ((hwc - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(hwc)).astype(np.uint8)
    return np.repeat(pic, 3, -1) if pic.shape[-1] == 1 else pic[..., :3]


def names(sources: Sequence[Source]) -> list[str]:
    """A unique, file-system-safe stem per sample (cat.jpg and cat.png become cat and cat-2)."""
    taken: set[str] = set()
    out = []
    for s in sources:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.path.stem) or "input"
        stem = name = f"{stem}-{s.index:04d}" if s.index is not None else stem
        count = 1
        while name in taken:
            count += 1
            name = f"{stem}-{count}"
        taken.add(name)
        out.append(name)
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
