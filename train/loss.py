"""The training loss of the paper (Eq. 2), as a named dict of terms.

For a pair with ground-truth grid masks ``M0, M1`` (soft, in [0, 1]) and correspondences ``C01, C10``
(normalised (x, y) in the other image), and predictions ``m0, m1, c01, c10``:

``mask``
    binary cross-entropy of ``m0`` vs ``M0`` and ``m1`` vs ``M1``, averaged over the cells of every map
    (positives and negatives; negatives have all-zero targets).
``transported_mask``
    the same cross-entropy for the *transported* masks ``m1(c01)`` vs ``M0`` and ``m0(c10)`` vs ``M1``:
    the other image's predicted mask sampled (bilinear, ``grid_sample``) at the predicted matches. It
    ties the mask to the correspondences. Negatives take part with zero targets, as Eq. 2 says the loss
    is computed for them with ``M = 0``.
``corr``
    ``eta`` times the L1 distance ``|c01 - C01|`` (mean over x and y) averaged over the cells with
    weights ``W0 = M0 * [C01 is defined]`` (and the same from image 1); zero for negatives.
``total``
    the sum of the above.

:class:`TrainingCriterion` is what the trainer calls: these terms (without ``total``) plus, when pixel
contrast is on, ``contrast`` = its weight x the pixel-contrast loss (``train/pixel_contrast.py``), zero
during its warm-up. Each term is already weighted; the trainer sums them and logs each by name.

The normalisation of each term (means over cells and maps, L1 averaged over the two coordinates) is the
official code's, for which ``eta = 8`` was tuned. Terms are computed in float32 outside autocast: BCE
is not autocast-safe and the clamp at 1e-7 would vanish in bfloat16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_DEFAULTS = {"eta": 8.0, "transported_mask": True}
EPS = 1e-7


def bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross-entropy of probabilities (clamped to [EPS, 1-EPS])."""
    pred = pred.clamp(EPS, 1 - EPS)
    return -(target * torch.log(pred) + (1 - target) * torch.log1p(-pred))


def transport_mask(mask_other: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample the other image's mask [B,h',w'] at normalised positions flow [B,h,w,2] -> [B,h,w].

    ``align_corners=False``: normalised 0 and 1 are the image borders, so cell centres (j+0.5)/w land
    exactly on the other grid's cell centres.
    """
    grid = flow * 2 - 1
    out = F.grid_sample(mask_other[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].clamp(EPS, 1 - EPS)


class SegSwapLoss(nn.Module):
    def __init__(self, eta: float = LOSS_DEFAULTS["eta"], transported_mask: bool = LOSS_DEFAULTS["transported_mask"]):
        super().__init__()
        self.eta = float(eta)
        self.transported_mask = bool(transported_mask)

    def forward(self, out: dict, target: dict, n_pos: int) -> dict:
        """``out``: the head's dict for a batch whose first ``n_pos`` pairs are positives, the rest negatives.

        ``target`` (positives only, [P,...]): ``mask0, mask1`` [P,h,w] soft masks; ``flow01, flow10``
        [P,h,w,2] (any value where undefined); ``flow01_weight, flow10_weight`` [P,h,w] (0 where undefined).
        """
        with torch.autocast(device_type=out["mask0"].device.type, enabled=False):
            o = {k: out[k].float() for k in ("mask0", "mask1", "flow01", "flow10")}
            m0, m1 = o["mask0"], o["mask1"]
            b = m0.shape[0]
            t0 = torch.zeros_like(m0)
            t1 = torch.zeros_like(m1)
            if n_pos:
                t0[:n_pos] = target["mask0"].float()
                t1[:n_pos] = target["mask1"].float()
            terms = {"mask": 0.5 * (bce(m0, t0).mean() + bce(m1, t1).mean())}
            if self.transported_mask:
                tm0 = transport_mask(m1, o["flow01"])
                tm1 = transport_mask(m0, o["flow10"])
                terms["transported_mask"] = 0.5 * (bce(tm0, t0).mean() + bce(tm1, t1).mean())
            else:
                terms["transported_mask"] = m0.new_zeros(())
            if n_pos:
                w0, w1 = target["flow01_weight"].float(), target["flow10_weight"].float()
                e0 = (o["flow01"][:n_pos] - target["flow01"].float()).abs().mean(-1)
                e1 = (o["flow10"][:n_pos] - target["flow10"].float()).abs().mean(-1)
                wsum = (w0.sum() + w1.sum()).clamp_min(EPS)
                terms["corr"] = self.eta * ((e0 * w0).sum() + (e1 * w1).sum()) / wsum
            else:
                terms["corr"] = m0.new_zeros(())
            assert b >= n_pos
            terms["total"] = terms["mask"] + terms["transported_mask"] + terms["corr"]
        return terms


def build_loss(cfg: dict) -> SegSwapLoss:
    return SegSwapLoss(**cfg)


class TrainingCriterion(nn.Module):
    """Every training term by name, each already weighted: Eq. 2's three, and ``contrast`` when given.

    ``forward(out, target, n_pos, step, generator)``: ``out`` is the head's dict for all pairs of the
    step (the first ``n_pos`` positives; with contrast also ``emb0, emb1`` [B,D,h,w] from the projection
    head); ``target`` the positives' ground truth (see :meth:`SegSwapLoss.forward`); ``step`` the
    optimiser step (for the contrast warm-up); ``generator`` the contrast loss's anchor sampler.
    """

    def __init__(self, segswap: SegSwapLoss, contrast: nn.Module | None = None, contrast_weight: float = 0.0,
                 contrast_warmup: int = 0):
        super().__init__()
        self.segswap = segswap
        self.contrast = contrast
        self.contrast_weight = float(contrast_weight)
        self.contrast_warmup = int(contrast_warmup)

    def forward(self, out: dict, target: dict, n_pos: int, step: int, generator=None) -> dict:
        terms = self.segswap(out, target, n_pos)
        del terms["total"]
        if self.contrast is None:
            return terms
        if step >= self.contrast_warmup:
            # Every pair of the step takes part: negatives (in-batch and hard) are all background, and
            # their false positives are exactly the hard background anchors the loss wants.
            gt0 = torch.zeros_like(out["mask0"], dtype=torch.float32)
            gt1 = torch.zeros_like(out["mask1"], dtype=torch.float32)
            gt0[:n_pos], gt1[:n_pos] = target["mask0"], target["mask1"]
            closs = self.contrast(out["emb0"].float(), out["emb1"].float(), gt0, gt1,
                                  out["mask0"].detach().float(), out["mask1"].detach().float(), generator)
            terms["contrast"] = self.contrast_weight * closs
        else:  # keep the projection in the graph so DDP sees its (zero) gradients
            terms["contrast"] = 0.0 * (out["emb0"].float().sum() + out["emb1"].float().sum())
        return terms

