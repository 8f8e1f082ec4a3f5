"""Saliency = mean cosine distance to the neighbours; box scores; upsampling to pixels."""
import cv2
import numpy as np
import pytest
from unsupervised_scenes import planted_scene

from segswap.nets.dense_features import build_feature_extractor
from segswap.segments.saliency import BoxScorer, feature_saliency, upsample_saliency


def _unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force(feat, radius):
    h, w, _ = feat.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            dists = [1.0 - float(feat[i, j] @ feat[a, b]) for a in range(h) for b in range(w)
                     if (a, b) != (i, j) and (radius == 0 or max(abs(a - i), abs(b - j)) <= radius)]
            out[i, j] = np.mean(dists)
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_matches_brute_force(radius, rng):
    feat = _unit(rng, (6, 7, 5))
    np.testing.assert_allclose(feature_saliency(feat, radius=radius), _brute_force(feat, radius), atol=1e-5)


def test_uniform_features_have_zero_saliency(rng):
    feat = np.broadcast_to(_unit(rng, (1, 1, 8)), (5, 6, 8)).copy()
    np.testing.assert_allclose(feature_saliency(feat), 0.0, atol=1e-6)
    np.testing.assert_allclose(feature_saliency(feat, radius=1), 0.0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saliency_peaks_on_the_planted_object(seed):
    image, mask = planted_scene(seed)
    sal = feature_saliency(build_feature_extractor("colour")(image))  # the algorithm, not the machine-dependent default
    h, w = sal.shape
    cover = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)  # object share per cell
    peak = np.unravel_index(np.argmax(sal), sal.shape)
    assert cover[peak] > 0.5
    assert sal[cover > 0.5].mean() > 2 * sal[cover == 0].mean()  # scale-free: distances depend on the features


def test_upsampled_map_keeps_cell_values_at_cell_centres(rng):
    sal = rng.random((4, 5)).astype(np.float32)
    full = upsample_saliency(sal, 60, 75)  # 60 x 75 is not a multiple of 16: the grid is ceil()
    assert full.shape == (60, 75)
    # Pixel (16 i + 8, 16 j + 8) is 1/32 of a cell from the centre along each axis, so it may differ from
    # the cell's value by at most 2/32 of the largest step between neighbouring cells (values in [0, 1)).
    for i in range(3):  # rows whose centre is inside the 60-px image
        for j in range(4):
            assert abs(full[16 * i + 8, 16 * j + 8] - sal[i, j]) <= 2 / 32 + 1e-6
    # A single peak cell stays where it was, also when the grid is cut at the image's edge.
    peak = np.zeros((4, 5), np.float32)
    peak[2, 3] = 1.0
    y, x = np.unravel_index(np.argmax(upsample_saliency(peak, 60, 75)), (60, 75))
    assert (y // 16, x // 16) == (2, 3)


def test_box_means_match_numpy(rng):
    pixel_map = rng.random((40, 50))
    boxes = np.array([[0, 0, 50, 40], [3, 4, 10, 7], [49, 39, 1, 1], [10, 0, 5, 40]])
    expected = [pixel_map[y:y + h, x:x + w].mean() for x, y, w, h in boxes]
    np.testing.assert_allclose(BoxScorer(pixel_map).mean(boxes), expected)


def test_bad_arguments(rng):
    with pytest.raises(ValueError, match="radius"):
        feature_saliency(_unit(rng, (3, 3, 4)), radius=-1)
    with pytest.raises(ValueError, match="features"):
        feature_saliency(np.zeros((3, 4)))
