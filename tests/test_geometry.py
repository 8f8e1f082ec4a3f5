"""Geometry of a paste: TPS and its numerical inverse, dense maps, the official transform draws."""
import math

import numpy as np
import pytest

from segswap.core.tps import ThinPlateSpline, random_tps
from segswap.pipeline.geometry import (
    GeometryConfig,
    PasteWarp,
    border_crop_box,
    dense_maps,
    dilate,
    dilation_px,
    draw_affine,
    draw_fit_ratio,
    lattice_points,
    layout_cells,
    resize_mask,
)


@pytest.mark.parametrize("per_side", [4, 6])
def test_tps_inverse_is_accurate(per_side):
    rng = np.random.default_rng(per_side)
    box = (40.0, 60.0, 420.0, 400.0)
    tps, params = random_tps(rng, *box, points_per_side=(per_side,))
    assert params["points_per_side"] == per_side
    inner = rng.uniform(box[:2], box[2:], size=(4000, 2))
    q = tps(inner)
    back = tps.inverse(q)
    assert np.isfinite(back).all()
    assert np.abs(back - inner).max() < 1e-3  # pixels
    assert np.abs(tps(tps.inverse(inner)) - inner).max() < 1e-3
    # The inverse is not a TPS fitted backwards: that shortcut (official loader) is visibly off.
    naive = ThinPlateSpline(tps.targets, tps.controls)
    assert np.abs(naive(q) - inner).max() > 10 * np.abs(back - inner).max()


def test_tps_interpolates_controls_and_jacobian_matches():
    rng = np.random.default_rng(1)
    tps, _ = random_tps(rng, 0, 0, 128, 96)
    assert np.abs(tps(tps.controls) - tps.targets).max() < 1e-8
    p = rng.uniform([5, 5], [120, 90], size=(6, 2))
    e = 1e-4
    num = np.stack([(tps(p + [e, 0]) - tps(p - [e, 0])) / (2 * e), (tps(p + [0, e]) - tps(p - [0, e])) / (2 * e)], -1)
    assert np.abs(tps.jacobian(p) - num).max() < 1e-5


def _pixel_centres(size):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return np.stack([xx, yy], -1)


def test_dense_maps_exact_for_affine_and_consistent_with_tps():
    size, g = 96, 4
    affine = np.array([[0.8, 0.3, 12.0], [-0.2, 0.9, 5.0], [0, 0, 1]])
    warp = PasteWarp(affine)
    maps = dense_maps(warp, size, g)
    pts = _pixel_centres(size)
    assert np.abs(maps["fwd"] - warp.forward(pts)).max() < 1e-3
    assert np.abs(maps["bwd"] - warp.backward(pts)).max() < 1e-3
    # With a TPS: the lattice values are exact, and the two directions invert each other there.
    tps, _ = random_tps(np.random.default_rng(5), 20, 20, 80, 80)
    warp = PasteWarp(affine, tps)
    maps = dense_maps(warp, size, g, region=(0, 0, size, size))
    lat = lattice_points(size, size, g)
    ok = np.isfinite(maps["bwd_lattice"]).all(-1)
    assert ok[1:-1, 1:-1].all()  # everywhere in the region asked for (the ring is outside it)
    assert np.abs(warp.forward(maps["bwd_lattice"][ok]) - lat[ok]).max() < 1e-3
    # Per-pixel maps interpolate the smooth TPS: a fraction of a pixel off at worst.
    err = np.abs(maps["fwd"] - warp.forward(pts)).max(-1)
    assert np.nanmax(err) < 0.5 and np.nanmean(err) < 0.05


def _disc(size, cx, cy, r):
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2


def test_affine_draw_matches_its_parameters():
    cfg = GeometryConfig()
    rng = np.random.default_rng(0)
    ctx = _disc(128, 50, 70, 20)
    for _ in range(20):
        affine, params, box = draw_affine(rng, ctx, (0, 0, 128, 128), cfg, two_object=False)
        assert 0.7 <= params["scale_x"] <= 1 and 0.7 <= params["scale_y"] <= 1
        assert -15 <= params["rotation_deg"] <= 15
        lin = affine[:2, :2] / params["fit_scale"]
        # lin = R(theta) @ diag(sx, sy): the first column's angle is the rotation, converted once.
        angle = math.degrees(math.atan2(-lin[1, 0], lin[0, 0]))
        assert angle == pytest.approx(params["rotation_deg"], abs=1e-6)
        assert np.hypot(lin[0, 0], lin[1, 0]) == pytest.approx(params["scale_x"])
        ys, xs = np.nonzero(ctx)
        corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
        warped = corners @ affine[:2, :2].T + affine[:2, 2]
        assert warped.min() >= -1e-6 and warped.max() <= 128 + 1e-6
        assert np.allclose(warped.min(0), box[:2]) and np.allclose(warped.max(0), box[2:])


def test_fit_ratio_distribution():
    rng = np.random.default_rng(1)
    ratios = np.linspace(0.2, 1, 10)
    seen = np.array([draw_fit_ratio(rng, 0.2) for _ in range(4000)])
    idx = np.abs(seen[:, None] - ratios[None]).argmin(1)
    freq = np.bincount(idx, minlength=10) / len(idx)
    want = np.exp(-np.arange(10) / 10)
    want /= want.sum()
    assert np.abs(freq - want).max() < 0.025
    # draw_affine uses it with r_min 0.2 for one object and 0.5 for two
    cfg, ctx = GeometryConfig(), _disc(64, 32, 32, 10)
    two = [draw_affine(rng, ctx, (0, 0, 64, 64), cfg, True)[1]["fit_ratio"] for _ in range(40)]
    assert min(two) >= 0.5 and len(set(two)) > 3


def test_max_fit_scale_caps_enlargement_only():
    ctx = _disc(128, 64, 64, 12)  # a small source: the uncapped fit enlarges it up to ~5x
    free = [draw_affine(np.random.default_rng(s), ctx, (0, 0, 128, 128), GeometryConfig(), False)[1]
            for s in range(30)]
    capped = [draw_affine(np.random.default_rng(s), ctx, (0, 0, 128, 128), GeometryConfig(max_fit_scale=1.0), False)[1]
              for s in range(30)]
    assert max(p["fit_scale"] for p in free) > 2
    assert all(c["fit_scale"] == pytest.approx(min(f["fit_scale"], 1.0)) for f, c in zip(free, capped))


def test_layout_cells_are_disjoint_and_inside():
    rng = np.random.default_rng(2)
    size = 480
    for _ in range(200):
        a, b = layout_cells(rng, size)
        for c in (a, b):
            assert 0 <= c[0] < c[2] <= size and 0 <= c[1] < c[3] <= size
        gap_x = max(b[0] - a[2], a[0] - b[2])
        gap_y = max(b[1] - a[3], a[1] - b[3])
        assert max(gap_x, gap_y) >= 16 - 1e-9


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_border_crop_makes_the_context_touch_the_border(side):
    ow, oh, size = 300, 200, 128
    bbox = {"left": (40, 80, 60, 40), "right": (200, 80, 60, 40), "top": (120, 30, 60, 40),
            "bottom": (120, 130, 60, 40)}[side]
    mask = np.zeros((oh, ow), bool)
    x, y, w, h = bbox
    mask[y:y + h, x:x + w] = True
    r = dilation_px(size)
    got_side, (x0, y0, x1, y1) = border_crop_box(bbox, ow, oh, size, r)
    assert got_side == side
    ctx = dilate(resize_mask(mask[y0:y1, x0:x1], size, size), r)
    edge = {"left": ctx[:, 0], "right": ctx[:, -1], "top": ctx[0], "bottom": ctx[-1]}[side]
    assert edge.any()
    # ... but only just: the raw segment itself stays about r pixels away.
    raw = resize_mask(mask[y0:y1, x0:x1], size, size)
    strip = {"left": raw[:, :r - 1], "right": raw[:, -(r - 1):], "top": raw[:r - 1], "bottom": raw[-(r - 1):]}[side]
    assert not strip.any()


def test_dilation_scales_with_size():
    assert dilation_px(480) == 20 and dilation_px(240) == 10 and dilation_px(16) == 1
