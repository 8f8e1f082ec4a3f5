"""Eq. 2 loss: a hand-computed example, zero terms for perfect predictions, negatives' construction."""
import math

import torch

from segswap.train.loss import SegSwapLoss, transport_mask
from segswap.train.trainer import lr_factor, negative_indices


def _bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_hand_computed_example():
    # One positive pair and one negative, 1x2 grids.
    out = {
        "mask0": torch.tensor([[[0.8, 0.3]], [[0.4, 0.1]]]),
        "mask1": torch.tensor([[[0.6, 0.2]], [[0.5, 0.5]]]),
        # Every cell of image 0 points at the centre of image 1's cell 0, (0.25, 0.5), and vice versa.
        "flow01": torch.tensor([[0.25, 0.5]]).expand(2, 1, 2, 2).clone(),
        "flow10": torch.tensor([[0.25, 0.5]]).expand(2, 1, 2, 2).clone(),
    }
    target = {
        "mask0": torch.tensor([[[1.0, 0.0]]]), "mask1": torch.tensor([[[1.0, 0.5]]]),
        "flow01": torch.tensor([[[[0.25, 0.5], [0.0, 0.0]]]]), "flow10": torch.tensor([[[[0.75, 0.5], [0.0, 0.0]]]]),
        "flow01_weight": torch.tensor([[[1.0, 0.0]]]), "flow10_weight": torch.tensor([[[1.0, 0.0]]]),
    }
    terms = SegSwapLoss(eta=8.0)(out, target, n_pos=1)
    # mask: mean of 4 cells of image 0 maps and 4 of image 1 maps
    m0 = (_bce(0.8, 1) + _bce(0.3, 0) + _bce(0.4, 0) + _bce(0.1, 0)) / 4
    m1 = (_bce(0.6, 1) + _bce(0.2, 0.5) + _bce(0.5, 0) + _bce(0.5, 0)) / 4
    assert math.isclose(terms["mask"].item(), (m0 + m1) / 2, rel_tol=1e-5)
    # transported: grid_sample at a cell centre returns that cell's value exactly
    t0 = (_bce(0.6, 1) + _bce(0.6, 0) + _bce(0.5, 0) + _bce(0.5, 0)) / 4
    t1 = (_bce(0.8, 1) + _bce(0.8, 0.5) + _bce(0.4, 0) + _bce(0.4, 0)) / 4
    assert math.isclose(terms["transported_mask"].item(), (t0 + t1) / 2, rel_tol=1e-5)
    # corr: weighted mean over x, y of |error|: image 0 cell 0 is exact, image 1 cell 0 is off by 0.5 in x
    corr = 8.0 * (0.0 + (0.5 + 0.0) / 2) / 2
    assert math.isclose(terms["corr"].item(), corr, rel_tol=1e-5)
    assert math.isclose(terms["total"].item(), terms["mask"].item() + terms["transported_mask"].item() + corr, rel_tol=1e-6)


def test_perfect_prediction_has_zero_transport_and_corr_terms():
    # A 4x4 square region translated by exactly one cell: masks and flows known exactly.
    h = w = 8
    m0 = torch.zeros(1, h, w)
    m1 = torch.zeros(1, h, w)
    m0[0, 1:5, 1:5] = 1
    m1[0, 2:6, 3:7] = 1
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    centre = torch.stack([xs, ys], -1)[None]
    shift = torch.tensor([2 / w, 1 / h])
    flow01_gt = centre + shift
    flow10_gt = centre - shift
    # Outside the masks, point at a background corner cell of the other image, which has mask 0.
    corner = torch.tensor([0.5 / w, (h - 0.5) / h])
    f01 = torch.where(m0[..., None] > 0, flow01_gt, corner)
    f10 = torch.where(m1[..., None] > 0, flow10_gt, corner)
    eps = 1e-7
    out = {"mask0": m0.clamp(eps, 1 - eps), "mask1": m1.clamp(eps, 1 - eps), "flow01": f01, "flow10": f10}
    target = {"mask0": m0, "mask1": m1, "flow01": flow01_gt, "flow10": flow10_gt, "flow01_weight": m0, "flow10_weight": m1}
    terms = SegSwapLoss()(out, target, n_pos=1)
    assert terms["transported_mask"].item() < 1e-5
    assert terms["corr"].item() < 1e-5
    assert terms["mask"].item() < 1e-5
    # and a wrong flow is penalised by both
    bad = SegSwapLoss()({**out, "flow01": f01.flip(1)}, target, n_pos=1)
    assert bad["transported_mask"].item() > 0.1 and bad["corr"].item() > 0.1


def test_transport_samples_cell_centres_exactly():
    m = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) / 12
    ys, xs = torch.meshgrid((torch.arange(3) + 0.5) / 3, (torch.arange(4) + 0.5) / 4, indexing="ij")
    got = transport_mask(m, torch.stack([xs, ys], -1)[None])
    assert torch.allclose(got, m.clamp(1e-7, 1 - 1e-7), atol=1e-6)


def test_negative_pairs_follow_the_paper():
    i, j = negative_indices(5, 15)
    assert len(i) == 15
    assert (i != j).all()
    assert [(a, b) for a, b in zip(i.tolist()[:5], j.tolist()[:5])] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
    assert len(set(zip(i.tolist(), j.tolist()))) == 15


def test_lr_schedule():
    assert lr_factor(0, 4, [], 0.1) == 0.25
    assert lr_factor(3, 4, [], 0.1) == 1.0
    assert math.isclose(lr_factor(10, 0, [5, 8], 0.1), 0.01)
