"""Running the co-segmentation head on many pairs, and scoring one query against many targets.

The head contract (docs/CONTRACTS.md): ``head(feat0, feat1) -> {mask0 [B,h,w], mask1, flow01
[B,h,w,2], flow10}`` on L2-normalised backbone features, so every function here takes cached features
and never touches the backbone.
"""
from __future__ import annotations

import torch

from segswap.apps.score import refine_query_mask, retrieval_scores

HEAD_KEYS = ("mask0", "mask1", "flow01", "flow10")


@torch.no_grad()
def run_head(model, feat0: torch.Tensor, feat1: torch.Tensor, batch_size: int = 16) -> dict:
    """Head outputs for the pairs (feat0[b], feat1[b]); feat0 may be [1, C, h, w] (broadcast).

    Returns the four contract fields as float32 tensors on the features' device.
    """
    n = feat1.shape[0]
    parts: dict[str, list] = {k: [] for k in HEAD_KEYS}
    for start in range(0, n, batch_size):
        f1 = feat1[start:start + batch_size]
        f0 = feat0.expand(f1.shape[0], *feat0.shape[1:]) if feat0.shape[0] == 1 else feat0[start:start + batch_size]
        out = model.head(f0, f1)
        for k in HEAD_KEYS:
            parts[k].append(out[k].float())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def score_query(model, query_feat: torch.Tensor, query_box: torch.Tensor, target_feats: torch.Tensor,
                batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 scores of one query (features [C,h,w], region mask [h,w]) against targets [N,C,ht,wt].

    Returns (scores [N], refined query mask [h, w]).
    """
    q = query_feat[None]
    refined = refine_query_mask(query_box.to(query_feat.device), run_head(model, q, q))
    scores = []
    for start in range(0, target_feats.shape[0], batch_size):
        tf = target_feats[start:start + batch_size]
        pred = run_head(model, q, tf, batch_size)
        scores.append(retrieval_scores(query_feat, refined, tf, pred))
    if not scores:
        return torch.zeros(0), refined
    return torch.cat(scores), refined
