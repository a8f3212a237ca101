"""Saliency maps as pictures a person can read: the map itself, a heat-map overlay on the photo, and a contact
sheet of many images with captions.

Gradients span orders of magnitude and a few pixels dominate the maximum, so every picture is scaled per image
by a robust range, the `PERCENTILE`-th percentile of the magnitudes, and clipped beyond it. The .npy files keep
the raw values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .colormaps import apply as colormap

PERCENTILE = 99.5
#: Pictures smaller than this (MNIST's 28 px) are enlarged by an integer factor, pixels kept square.
MIN_SIDE = 168
#: Heat maps are smoothed by a Gaussian whose sigma is this fraction of the image side (2.2 px at 224).
SMOOTH = 0.01
BACKGROUND, INK, MUTED = (255, 255, 255), (20, 20, 20), (90, 90, 90)


def to_hwc(saliency: np.ndarray, layout: str, bgr: bool = False) -> np.ndarray:
    """One sample's map (C, H, W) or (H, W, C) as float (H, W, C), colour channels in RGB order."""
    hwc = np.asarray(saliency, np.float32)
    hwc = hwc if layout == "NHWC" else np.moveaxis(hwc, 0, -1)
    return hwc[..., ::-1] if bgr and hwc.shape[-1] == 3 else hwc


def robust_scale(values: np.ndarray) -> float:
    """The PERCENTILE-th percentile of the non-negative `values`, falling back to their maximum when most are 0
    (a map that is zero but for a few pixels), and to 1 for an all-zero map."""
    values = values[values > 0]
    if values.size == 0:
        return 1.0
    return float(np.percentile(values, PERCENTILE)) or float(values.max())


def signed_picture(g: np.ndarray, grey: bool = False) -> np.ndarray:
    """Zero is mid-grey, positive brighter, negative darker (the vanilla gradient as lecture slides show it).
    Colour: per channel, so the hue says which channel the gradient pushes; grey: the sum over channels."""
    g = g.sum(-1, keepdims=True) if grey else g
    shown = 0.5 + 0.5 * g / robust_scale(np.abs(g))
    return _rgb(shown)


def positive_picture(g: np.ndarray, grey: bool = False) -> np.ndarray:
    """Guided backprop and deconvnet: their positive part on black, per channel in colour; grey: the magnitude
    max_c |g| (Simonyan et al.'s saliency reduction)."""
    shown = np.abs(g).max(-1, keepdims=True) if grey else np.maximum(g, 0)
    return _rgb(shown / robust_scale(shown))


def map_picture(g: np.ndarray, method: str, grey: bool = False) -> np.ndarray:
    return signed_picture(g, grey) if method == "vanilla" else positive_picture(g, grey)


def heat(g: np.ndarray, method: str, smooth: float = SMOOTH) -> np.ndarray:
    """Per-pixel importance in [0, 1]: max_c |g| for vanilla, max_c of the positive part for the others,
    smoothed by a Gaussian of `smooth` times the image side. Raw gradients are speckle at pixel scale (and
    checkerboard where strided convolutions run backwards); the smoothing turns them into regions a reader can
    match to the photo."""
    m = (np.abs(g) if method == "vanilla" else np.maximum(g, 0)).max(-1)
    m = gaussian_blur(m, smooth * max(m.shape))
    return np.clip(m / robust_scale(m), 0, 1)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter with reflected edges (scipy.ndimage.gaussian_filter's default)."""
    if sigma < 0.3:
        return a
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(a, [(radius, radius) if ax == axis else (0, 0) for ax in range(a.ndim)], mode="symmetric")
        a = np.apply_along_axis(np.convolve, axis, padded, kernel, mode="valid")
    return a


def overlay(photo: np.ndarray, importance: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """The heat map over a dimmed grey copy of the photo: opacity grows with importance, so unimportant regions
    show the photo and important ones the colour map's bright end."""
    grey = np.asarray(Image.fromarray(photo).convert("L"), np.float32)[..., None] * 0.6
    alpha = np.sqrt(importance)[..., None]  # sqrt: gradients are heavy-tailed; lift the mid-range into view
    mixed = grey * (1 - alpha) + colormap(importance, cmap).astype(np.float32) * alpha
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def enlarge(picture: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    factor = math.ceil(min_side / min(picture.shape[:2]))
    return picture if factor <= 1 else picture.repeat(factor, 0).repeat(factor, 1)


def save_png(picture: np.ndarray, path: str | Path) -> None:
    Image.fromarray(enlarge(picture)).save(path, optimize=False, compress_level=6)


def _rgb(values: np.ndarray) -> np.ndarray:
    pic = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    return np.repeat(pic, 3, -1) if pic.shape[-1] == 1 else pic[..., :3]


# -- contact sheet --------------------------------------------------------------------------------------------
@dataclass
class Tile:
    """One image's row of panels (input, then one map per method) and its caption."""

    panels: list[np.ndarray]
    caption: str
    detail: str = ""


def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans where the system has it (it covers accents in file and class names), else Pillow's own
    scalable font (Pillow >= 10.1 with FreeType; ASCII only), else its bitmap font."""
    for attempt in (lambda: ImageFont.truetype("DejaVuSans.ttf", size), lambda: ImageFont.load_default(size=size)):
        try:
            return attempt()
        except (TypeError, OSError, AttributeError):
            continue
    return ImageFont.load_default()


def contact_sheet(tiles: Sequence[Tile], headers: Sequence[str], panel: int = 160, columns: int | None = None,
                  title: str = "") -> Image.Image:
    """Tiles in a grid that comes out roughly square, each tile its panels side by side with a caption below,
    and the panel names above each column of tiles."""
    n_panels = len(headers)
    gap, pad = 4, 14
    caption_font, detail_font, header_font = font(13), font(11), font(13)
    tile_w = n_panels * panel + (n_panels - 1) * gap
    tile_h = panel + 36
    if columns is None:  # aim for a sheet about as wide as tall
        columns = max(1, min(len(tiles), round(math.sqrt(len(tiles) * tile_h / tile_w))))
    rows = math.ceil(len(tiles) / columns)
    title_h = 28 if title else 0
    width = columns * tile_w + (columns - 1) * pad * 2 + 2 * pad
    height = title_h + 22 + rows * (tile_h + pad) + pad
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad // 2), title, fill=INK, font=font(16))
    for col in range(columns):
        x0 = pad + col * (tile_w + 2 * pad)
        for i, name in enumerate(headers):
            cx = x0 + i * (panel + gap) + panel // 2
            draw.text((cx, title_h + 12), name, fill=MUTED, font=header_font, anchor="mm")
    for k, tile in enumerate(tiles):
        row, col = divmod(k, columns)
        x0 = pad + col * (tile_w + 2 * pad)
        y0 = title_h + 22 + row * (tile_h + pad)
        for i, picture in enumerate(tile.panels):
            im = Image.fromarray(picture)
            im = im.resize((panel, panel), Image.NEAREST if im.width < panel / 2 else Image.LANCZOS)
            sheet.paste(im, (x0 + i * (panel + gap), y0))
        draw.text((x0, y0 + panel + 3), _fit(draw, tile.caption, caption_font, tile_w), fill=INK, font=caption_font)
        if tile.detail:
            draw.text((x0, y0 + panel + 19), _fit(draw, tile.detail, detail_font, tile_w), fill=MUTED,
                      font=detail_font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text + "…"


def pick(count: int, k: int, seed: int = 0) -> list[int]:
    """k of count indices, chosen at random (reproducibly), in input order: the "25 picks out of 100" figure."""
    if k >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, size=k, replace=False).tolist())
