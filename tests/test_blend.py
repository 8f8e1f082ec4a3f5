"""Poisson blending: pyamg against the sparse direct solve, and the basic promises of every method."""
import numpy as np
import pytest

from segswap.pipeline.blend import BLEND_METHODS, blend, poisson_system


def _scene(h=96, w=112, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    dst = np.stack([xx * 2, yy * 2, 80 + 40 * np.sin(xx / 7.0)], 2).clip(0, 255).astype(np.uint8)
    src = np.stack([200 - yy, 60 + 30 * np.cos(yy / 5.0) + xx / 3, xx + yy], 2).clip(0, 255).astype(np.uint8)
    src = (src.astype(int) + rng.integers(-6, 7, src.shape)).clip(0, 255).astype(np.uint8)
    mask = ((yy - 50) ** 2 / 30 ** 2 + (xx - 60) ** 2 / 38 ** 2) < 1
    mask[:, :4] = mask[:, :4] | (np.abs(yy - 40) < 10)[:, :4]  # a part touching the left border
    return src, dst, mask


@pytest.mark.parametrize("gradients", ["normal", "mixed"])
def test_pyamg_matches_direct_solve(gradients):
    src, dst, mask = _scene()
    amg = blend("pyamg", src, dst, mask, gradients=gradients)
    ref = blend("direct", src, dst, mask, gradients=gradients)
    # Same system, tol 1e-8: rounding to uint8 may differ by one level on a handful of pixels.
    diff = np.abs(amg.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_solution_satisfies_the_poisson_equation():
    src, dst, mask = _scene()
    A, b, idx = poisson_system(src, dst, mask)
    out = blend("direct", src, dst, mask).reshape(-1, 3)[idx].astype(np.float64)
    # Residual of the rounded solution: at most the rounding, 0.5 per pixel times the 4 + 4 stencil,
    # on rows where no value was clipped to [0, 255].
    unclipped = ((out > 0) & (out < 255)).all(1)
    rows = np.asarray((A != 0).astype(int) @ (~unclipped).astype(int)) == 0
    resid = np.abs(A @ out - b)[rows]
    assert rows.mean() > 0.5 and resid.max() <= 4.0
    assert resid.mean() < 1.0


def test_constant_offset_is_absorbed():
    # Pasting dst + 40 into dst with normal gradients must give dst back: the guidance field equals
    # dst's own gradient and the boundary values are dst's.
    _, dst, mask = _scene()
    dst_safe = (dst.astype(int).clip(0, 215)).astype(np.uint8)
    src = dst_safe + 40
    out = blend("pyamg", src, dst_safe, mask)
    assert np.abs(out.astype(int) - dst_safe.astype(int)).max() <= 1


@pytest.mark.parametrize("method", BLEND_METHODS)
def test_outside_the_mask_is_untouched(method):
    src, dst, mask = _scene()
    out = blend(method, src, dst, mask)
    assert out.dtype == np.uint8 and out.shape == dst.shape
    assert np.array_equal(out[~mask], dst[~mask])
    if method == "none":
        assert np.array_equal(out[mask], src[mask])
    else:  # blended interior follows src's gradients, not dst's values
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        gy_out = np.diff(out.astype(int), axis=0)[inner[1:] & inner[:-1]]
        gy_src = np.diff(src.astype(int), axis=0)[inner[1:] & inner[:-1]]
        assert np.abs(gy_out - gy_src).mean() < 3


def test_bad_arguments():
    src, dst, mask = _scene()
    with pytest.raises(ValueError, match="unknown blend method 'magic'"):
        blend("magic", src, dst, mask)
    with pytest.raises(ValueError, match="one size"):
        blend("pyamg", src[:10], dst, mask)
    assert np.array_equal(blend("pyamg", src, dst, np.zeros_like(mask)), dst)
