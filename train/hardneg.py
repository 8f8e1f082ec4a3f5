"""Hard-negative mining (paper §3.3, the phase after the main training).

Every ``iters_per_pool`` steps: draw ``pool_size`` images, each from a different synthetic pair (image 0
or image 1 of the pair, stylised or not as in training), compute their features once, predict masks
for every unordered pair of pool images, and keep the pairs whose ``mean(mask0) + mean(mask1)``
exceeds ``threshold`` (tau). These pairs show no common object, so a high predicted mask is a
mistake; each training step then adds ``batch_hard`` of them, drawn with probability proportional to
their score, as extra negatives (all-zero targets).

Differences from the official script, on purpose: the pool is refreshed in the same process without
rebuilding loaders (the official one crashes on its first refresh), a pool with no hard pair is
reported and training goes on with ordinary negatives (instead of re-drawing forever), and sampling
uses the run's seeded generator.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

HARDNEG_DEFAULTS = {"pool_size": 500, "threshold": 0.04, "iters_per_pool": 1000, "batch_hard": 5, "pool_batch": 32}


class HardNegativeMiner:
    def __init__(self, pool_size: int = 500, threshold: float = 0.04, iters_per_pool: int = 1000,
                 batch_hard: int = 5, pool_batch: int = 32):
        if pool_size < 2:
            raise ValueError(f"hardneg pool_size must be >= 2, got {pool_size}")
        self.pool_size, self.threshold = int(pool_size), float(threshold)
        self.iters_per_pool, self.batch_hard, self.pool_batch = int(iters_per_pool), int(batch_hard), int(pool_batch)
        self.feats = None
        self.pairs = None
        self.prob = None

    def due(self, step_in_phase: int) -> bool:
        return self.feats is None or step_in_phase % self.iters_per_pool == 0

    @torch.no_grad()
    def refresh(self, model, items, device, amp_dtype=None) -> dict:
        """``items``: iterator of un-batched training items (one image per pair is used: ``img0``)."""
        head_was_training = model.head.training
        model.head.eval()
        imgs = [next(items)["img0"] for _ in range(self.pool_size)]
        feats = []
        for k in range(0, len(imgs), self.pool_batch):
            batch = torch.as_tensor(np.stack(imgs[k:k + self.pool_batch])).to(device)
            feats.append(model.features(batch))
        self.feats = torch.cat(feats)
        idx = torch.tensor(list(itertools.combinations(range(self.pool_size), 2)), dtype=torch.long)
        scores = []
        dev_type = torch.device(device).type
        for k in range(0, len(idx), self.pool_batch):
            ij = idx[k:k + self.pool_batch].to(self.feats.device)
            with torch.autocast(device_type=dev_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out = model.head(self.feats[ij[:, 0]], self.feats[ij[:, 1]])
            scores.append((out["mask0"].float().flatten(1).mean(1) + out["mask1"].float().flatten(1).mean(1)).cpu())
        scores = torch.cat(scores)
        keep = scores > self.threshold
        self.pairs = idx[keep]
        kept = scores[keep].double().numpy()
        self.prob = kept / kept.sum() if len(kept) else None
        model.head.train(head_was_training)
        stats = {"pool_pairs": len(idx), "hard_pairs": int(keep.sum()), "score_mean": float(scores.mean()),
                 "score_max": float(scores.max())}
        if not len(kept):
            log.warning("hard-negative pool: no pair scores above %.3f (max %.3f); this pool adds no hard "
                        "negatives", self.threshold, stats["score_max"])
        else:
            log.info("hard-negative pool: %d of %d pairs above %.3f (score mean %.4f, max %.4f)",
                     stats["hard_pairs"], stats["pool_pairs"], self.threshold, stats["score_mean"], stats["score_max"])
        return stats

    def sample(self, rng: np.random.Generator):
        """(feat0, feat1) of ``batch_hard`` hard pairs [n,C,h,w], or None when the pool has none."""
        if self.prob is None or self.batch_hard == 0:
            return None
        n = len(self.prob)
        pick = rng.choice(n, size=self.batch_hard, replace=n < self.batch_hard, p=self.prob)
        ij = self.pairs[torch.as_tensor(pick)].to(self.feats.device)
        return self.feats[ij[:, 0]], self.feats[ij[:, 1]]
