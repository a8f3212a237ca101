"""Pictures of saliency maps (onnx_gbp.render) and the colour-map tables (onnx_gbp.colormaps)."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_gbp import colormaps, render


@pytest.mark.parametrize("name", ["inferno", "viridis"])
def test_colormap_tables_are_matplotlibs(name):
    """The tables are matplotlib's CC0 data rounded to 8 bits, not an invented palette."""
    listed = pytest.importorskip("matplotlib._cm_listed")
    want = np.round(np.array(getattr(listed, f"_{name}_data")) * 255).astype(np.uint8)
    np.testing.assert_array_equal(colormaps.COLORMAPS[name], want)


def test_colormap_apply_clips_and_maps_ends():
    out = colormaps.apply(np.array([-1.0, 0.0, 1.0, 2.0, np.nan]))
    assert out.dtype == np.uint8 and out.shape == (5, 3)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[2], colormaps.COLORMAPS["inferno"][255])
    np.testing.assert_array_equal(out[3], out[2])


def test_signed_picture_zero_is_mid_grey():
    g = np.zeros((4, 4, 3), np.float32)
    g[0, 0] = 1.0
    g[1, 1] = -1.0
    pic = render.signed_picture(g)
    assert pic.dtype == np.uint8 and pic.shape == (4, 4, 3)
    assert (pic[2, 2] == 128).all()  # zero
    assert (pic[0, 0] > 128).all() and (pic[1, 1] < 128).all()  # positive brighter, negative darker
    grey = render.signed_picture(g, grey=True)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_positive_picture_drops_negatives_and_uses_a_robust_range():
    rng = np.random.default_rng(0)
    g = rng.random((50, 50, 3)).astype(np.float32)
    g[0, 0] = 1e6  # one outlier must not turn everything else black
    g[1, 1] = -5.0
    pic = render.positive_picture(g)
    assert (pic[1, 1] == 0).all()
    assert np.median(pic) > 60
    assert (pic[0, 0] == 255).all()
    mag = render.positive_picture(g, grey=True)
    assert mag[1, 1, 0] == 255  # grey-scale magnitude counts |g|


def test_all_zero_map_renders():
    zero = np.zeros((5, 5, 1), np.float32)
    assert (render.map_picture(zero, "guided") == 0).all()
    assert (render.map_picture(zero, "vanilla") == 128).all()
    assert (render.heat(zero, "vanilla") == 0).all()


def test_to_hwc_reorders_layout_and_bgr():
    chw = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    hwc = render.to_hwc(chw, "NCHW")
    np.testing.assert_array_equal(hwc[..., 0], chw[0])
    np.testing.assert_array_equal(render.to_hwc(chw, "NCHW", bgr=True)[..., 0], chw[2])
    np.testing.assert_array_equal(render.to_hwc(hwc, "NHWC"), hwc)


def test_heat_and_overlay():
    photo = np.full((100, 100, 3), 200, np.uint8)
    g = np.zeros((100, 100, 3), np.float32)
    g[50, 50] = 1.0
    importance = render.heat(g, "guided")
    assert importance.shape == (100, 100) and 0 <= importance.min() and importance.max() <= 1
    assert importance[50, 50] == importance.max() and importance[48, 50] > 0  # smoothed, centred
    out = render.overlay(photo, importance)
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert (out[0, 0] == 120).all()  # unimportant: the dimmed grey photo (0.6 x 200)
    assert out[50, 50].tolist() != out[0, 0].tolist()


def test_gaussian_blur_keeps_constants_and_mass():
    a = np.full((20, 30), 3.0)
    np.testing.assert_allclose(render.gaussian_blur(a, 2.0), a)
    spike = np.zeros((41, 41))
    spike[20, 20] = 1
    blurred = render.gaussian_blur(spike, 2.0)
    assert abs(blurred.sum() - 1) < 1e-9 and blurred[20, 20] == blurred.max()


def test_small_pictures_are_enlarged_with_square_pixels():
    pic = np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3)
    big = render.enlarge(pic)
    assert big.shape[0] >= render.MIN_SIDE and big.shape[0] % 28 == 0
    np.testing.assert_array_equal(big[::big.shape[0] // 28, ::big.shape[0] // 28], pic)
    assert render.enlarge(np.zeros((224, 224, 3), np.uint8)).shape == (224, 224, 3)


def test_contact_sheet_layout_and_captions():
    panel = np.zeros((28, 28, 3), np.uint8)
    tiles = [render.Tile([panel] * 3, f"image {i}: a very long class name " * 5, "target: x") for i in range(10)]
    sheet = render.contact_sheet(tiles, ["input", "guided", "vanilla"], panel=64, title="title")
    one = render.contact_sheet(tiles[:1], ["input", "guided", "vanilla"], panel=64)
    assert sheet.mode == "RGB"
    assert sheet.width * sheet.height > 5 * one.width * one.height
    assert 0.4 < sheet.width / sheet.height < 2.5  # roughly square


def test_picks_are_reproducible_and_in_order():
    picks = render.pick(100, 25, seed=3)
    assert len(picks) == 25 == len(set(picks)) and picks == sorted(picks)
    assert picks == render.pick(100, 25, seed=3) != render.pick(100, 25, seed=4)
    assert render.pick(5, 25) == [0, 1, 2, 3, 4]
