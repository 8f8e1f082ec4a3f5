"""A tiny non-learned matcher with the CoSegModel interface, for tests and smoke runs without a checkpoint.

features: each 16x16 cell is described by its 4x4 grid of mean colours (48 numbers, centred per cell)
and L2-normalised, so only identical content (aligned to the 16-px grid) has cosine ~1.
head: every cell of one image is matched to its most similar cell of the other (flow = that cell's
centre); its mask is a steep sigmoid of that best cosine similarity around ``threshold``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ToyMatcher(torch.nn.Module):
    def __init__(self, threshold: float = 0.9, steepness: float = 60.0):
        super().__init__()
        self.threshold, self.steepness = threshold, steepness
        self.calls = {"features": 0, "head": 0}

    @torch.no_grad()
    def features(self, img: torch.Tensor) -> torch.Tensor:
        self.calls["features"] += img.shape[0]
        if img.dtype == torch.uint8:  # CoSegModel.features' interface: uint8 [B,H,W,3] RGB
            from segswap.nets.resnet import normalise_image
            img = normalise_image(img, device=img.device)
        x = F.avg_pool2d(img.float(), 4)                    # [B,3,H/4,W/4]
        x = F.pixel_unshuffle(x, 4)                         # [B,48,H/16,W/16]
        x = x - x.mean(1, keepdim=True)
        return F.normalize(x, dim=1, eps=1e-6)

    def _match(self, fa: torch.Tensor, fb: torch.Tensor):
        b, c, h, w = fa.shape
        hb, wb = fb.shape[2:]
        cos = torch.einsum("bci,bcj->bij", fa.reshape(b, c, -1), fb.reshape(b, c, -1))
        best, idx = cos.max(2)
        flow = torch.stack([(idx % wb + 0.5) / wb, (idx // wb + 0.5) / hb], -1).reshape(b, h, w, 2)
        mask = torch.sigmoid((best - self.threshold) * self.steepness).clamp(1e-7, 1 - 1e-7).reshape(b, h, w)
        return mask, flow

    @torch.no_grad()
    def head(self, feat0: torch.Tensor, feat1: torch.Tensor, pad1=None) -> dict:
        self.calls["head"] += feat0.shape[0]
        mask0, flow01 = self._match(feat0, feat1)
        mask1, flow10 = self._match(feat1, feat0)
        return {"mask0": mask0, "mask1": mask1, "flow01": flow01, "flow10": flow10}


def toy_scene(rng, size: tuple[int, int], patch=None, at: tuple[int, int] | None = None):
    """uint8 [H, W, 3] of random 4-px colour blocks, with ``patch`` (uint8, sides multiples of 16) pasted
    at pixel (row, col) ``at`` (multiples of 16), so the toy matcher finds it exactly."""
    import numpy as np

    w, h = size
    img = np.repeat(np.repeat(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), 4, 0), 4, 1)
    if patch is not None:
        r, c = at
        img[r:r + patch.shape[0], c:c + patch.shape[1]] = patch
    return np.ascontiguousarray(img)
