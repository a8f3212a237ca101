"""Loading and preprocessing images and .npy tensors (onnx_gbp.images)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnx_gbp import images
from onnx_gbp.errors import InputError

NCHW = images.ModelInput((3, 8, 8), "NCHW")
NHWC = images.ModelInput((8, 8, 3), "NHWC")
GREY = images.ModelInput((1, 8, 8), "NCHW")


def solid(colour, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def test_presets_normalise_as_their_frameworks_do():
    red = solid((255, 0, 0))
    x = images.to_tensor(red, NCHW, images.preset("imagenet"))
    np.testing.assert_allclose(x[:, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(images.to_tensor(red, NCHW, images.preset("tf"))[:, 0, 0], [1, -1, -1])
    np.testing.assert_allclose(images.to_tensor(red, NCHW, images.preset("unit"))[:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(images.to_tensor(red, NCHW, images.preset("raw"))[:, 0, 0], [255, 0, 0])
    # Caffe: channels reversed to B, G, R, then the BGR mean subtracted, 0..255 scale
    np.testing.assert_allclose(images.to_tensor(red, NCHW, images.preset("caffe"))[:, 0, 0],
                               [-103.939, -116.779, 255 - 123.68], rtol=1e-6)


def test_custom_mean_std_and_layouts():
    pixel = solid((51, 102, 153))
    pre = images.preset("unit", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    chw = images.to_tensor(pixel, NCHW, pre)
    hwc = images.to_tensor(pixel, NHWC, pre)
    assert chw.shape == (3, 8, 8) and hwc.shape == (8, 8, 3) and chw.dtype == np.float32
    np.testing.assert_allclose(chw[:, 0, 0], [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.5, (0.6 - 0.3) / 0.5], rtol=1e-5)
    np.testing.assert_array_equal(chw.transpose(1, 2, 0), hwc)
    assert images.to_tensor(pixel, GREY, images.preset("unit")).shape == (1, 8, 8)


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (224, 224), (50, 20)])
def test_fit_resizes_short_side_then_crops_centre(size):
    image = solid((10, 20, 30), size)
    out = images.fit(image, (224, 224), images.preset("imagenet", resize=256))
    assert out.size == (224, 224)
    assert images.fit(image, (28, 40), images.preset("unit", fit="stretch")).size == (40, 28)


def test_fit_keeps_the_centre():
    # a 300 x 100 image, left third black, middle white, right third black: the centre crop is all white
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255
    out = np.asarray(images.fit(Image.fromarray(a), (64, 64), images.preset("unit")))
    assert out.min() > 200


def test_any_mode_becomes_rgb(tmp_path):
    cases = {
        "rgba.png": Image.new("RGBA", (6, 6), (255, 0, 0, 0)),  # fully transparent -> white
        "grey.png": Image.new("L", (6, 6), 77),
        "palette.gif": Image.new("P", (6, 6), 3),
        "cmyk.jpg": Image.new("CMYK", (6, 6), (0, 0, 0, 0)),
        "sixteen.png": Image.fromarray(np.full((6, 6), 65535, np.uint16)),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        loaded = images.load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (6, 6), name
    assert np.asarray(images.load_image(tmp_path / "rgba.png")).min() == 255
    assert np.asarray(images.load_image(tmp_path / "grey.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(images.load_image(tmp_path / "sixteen.png")).min() == 255


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rotated.jpg", exif=exif)
    assert images.load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_collect_folders_files_and_npy(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        solid((1, 2, 3)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    np.save(tmp_path / "batch.npy", np.zeros((3, 3, 8, 8), np.float32))
    np.save(tmp_path / "one.npy", np.zeros((3, 8, 8), np.float32))
    sources = images.collect([folder, tmp_path / "batch.npy", tmp_path / "one.npy"], NCHW)
    assert [s.path.name for s in sources] == ["a.jpg", "b.png", "batch.npy", "batch.npy", "batch.npy", "one.npy"]
    assert [s.index for s in sources[2:]] == [0, 1, 2, None]
    x, picture = images.load(sources[3], NCHW, images.preset("imagenet"))
    assert x.shape == (3, 8, 8) and picture.shape == (8, 8, 3) and picture.dtype == np.uint8


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.png", "No such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no images"),
    (lambda p: (p / "junk.png").write_bytes(b"not a picture") and p / "junk.png", "not a readable image"),
    (lambda p: np.save(p / "hwc.npy", np.zeros((8, 8, 3), np.float32)) or p / "hwc.npy", "looks transposed"),
    (lambda p: np.save(p / "int.npy", np.zeros((3, 8, 8), np.uint8)) or p / "int.npy", "float tensors"),
])
def test_collect_rejects_bad_inputs(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        images.collect([make(tmp_path)], NCHW)


def test_truncated_image_fails_on_decode(tmp_path):
    buffer = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buffer.read_bytes()[:1500])
    with pytest.raises(InputError, match="cut.jpg is not a readable image"):
        images.load_image(cut)


@pytest.mark.parametrize("pre, channels, message", [
    (images.preset("imagenet"), 1, "3 mean values"),
    (images.preset("caffe", mean=(100.0,)), 1, "BGR"),
    (images.preset("unit", std=(0.0,)), 3, "divides by zero"),
    (images.preset("unit", mean=(0.1, 0.2)), 3, "2 mean values"),
    (images.preset("unit"), 4, "Pass preprocessed tensors"),
])
def test_preprocessing_must_fit_the_channels(pre, channels, message):
    with pytest.raises(InputError, match=message):
        pre.check(channels)


def test_unknown_preset():
    with pytest.raises(InputError, match="Unknown preprocessing preset"):
        images.preset("vgg")


def test_names_are_unique_and_safe(tmp_path):
    sources = [images.Source(tmp_path / "a" / "cat.png"), images.Source(tmp_path / "b" / "cat.jpg"),
               images.Source(tmp_path / "cat-2.png"), images.Source(tmp_path / "x y.npy", 3, True)]
    assert images.names(sources) == ["cat", "cat-2", "cat-2-2", "x_y-0003"]


def test_tensor_picture_stretches_min_to_max():
    x = np.stack([np.linspace(-2, 2, 64).reshape(8, 8)] * 3)
    pic = images.tensor_picture(x.astype(np.float32), "NCHW")
    assert pic.shape == (8, 8, 3) and pic.min() == 0 and pic.max() == 255
