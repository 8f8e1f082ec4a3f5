"""The retrieval score of the paper (Eq. 3), as the official evaluation computes it.

For a query image q (with a region of interest given as a grid mask) and a target image t, the model
predicts, on the feature grids, the repeated-region masks ``mask0`` (on q) and ``mask1`` (on t) and the
correspondences ``flow01`` (for each cell of q, the normalised (x, y) of its match in t). Then

1. the query mask is *refined* by running the model on the query with itself (``refine_query_mask``):
   the box mask is multiplied by the self-pair mask, carried to the other copy and back, and multiplied
   again, so only cells the model considers a coherent region survive;
2. for each query cell i, with c(i) the target cell containing its predicted match,
   ``weight_i = refined_i * mask0_i * mask1[c(i)]`` (the *joint mask*: source mask times the target mask
   transported through the correspondences);
3. ``s_i = weight_i * cos(F_q[i], F_t[c(i)])`` with L2-normalised conv4 features;
4. query cells landing on the same target cell are grouped and only the best one counts (``max``, with
   0 as floor so a negative similarity never lowers a score), and the score is the sum over target cells.

Grid lookups use the cell that *contains* a predicted point (cell centres are at ``(j + 0.5) / w``, the
contract of the co-segmentation heads), so the score needs no interpolation and is exact on toy inputs.
Everything is vectorised over a batch of targets.
"""
from __future__ import annotations

import torch


def cell_index(flow: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Normalised (x, y) positions [..., 2] -> flat index (row * w + col) of the grid cell containing them.

    Points outside [0, 1] are clamped to the border cells.
    """
    col = torch.clamp((flow[..., 0] * w).floor().long(), 0, w - 1)
    row = torch.clamp((flow[..., 1] * h).floor().long(), 0, h - 1)
    return row * w + col


def sample_at(grid: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Values of ``grid`` [B, h, w] at the cells containing ``flow`` [B, h0, w0, 2] -> [B, h0, w0]."""
    b, h, w = grid.shape
    idx = cell_index(flow, h, w).reshape(b, -1)
    return torch.gather(grid.reshape(b, -1), 1, idx).reshape(flow.shape[:-1])


def refine_query_mask(query_mask: torch.Tensor, self_pred: dict) -> torch.Tensor:
    """Refine a query region mask [h, w] with the model's prediction on the pair (query, query).

    ``self_pred`` holds the head outputs for the self pair with batch size 1 (``mask0``, ``mask1``
    [1, h, w], ``flow01``, ``flow10`` [1, h, w, 2]). As in the official evaluation: a = box * mask0;
    carry a to the second copy through flow10 and multiply by mask1; carry that back through flow01;
    the refined mask is a times what came back.
    """
    a = query_mask[None].float() * self_pred["mask0"].float()
    there = sample_at(a, self_pred["flow10"].float()) * self_pred["mask1"].float()
    back = sample_at(there, self_pred["flow01"].float())
    return (a * back)[0]


def joint_mask(query_mask: torch.Tensor, pred: dict) -> torch.Tensor:
    """Per query cell weight [B, h, w] = query mask x predicted mask0 x mask1 at the matched target cell."""
    transported = sample_at(pred["mask1"].float(), pred["flow01"].float())
    return query_mask[None].float() * pred["mask0"].float() * transported


def retrieval_scores(query_feat: torch.Tensor, query_mask: torch.Tensor, target_feats: torch.Tensor,
                     pred: dict) -> torch.Tensor:
    """Eq. 3 for one query against a batch of targets.

    query_feat:   [C, h, w]     L2-normalised conv4 features of the query
    query_mask:   [h, w]        refined query mask (``refine_query_mask``); zero outside the region
    target_feats: [B, C, ht, wt] L2-normalised features of the targets
    pred:         head outputs for the B pairs (query, target_b): mask0 [B,h,w], mask1 [B,ht,wt],
                  flow01 [B,h,w,2]
    returns:      [B] scores
    """
    b, c, ht, wt = target_feats.shape
    h, w = query_mask.shape
    weight = joint_mask(query_mask, pred).reshape(b, h * w)                       # [B, hw]
    cells = cell_index(pred["flow01"].float(), ht, wt).reshape(b, h * w)          # [B, hw]
    tf = target_feats.float().reshape(b, c, ht * wt)
    matched = torch.gather(tf, 2, cells[:, None, :].expand(b, c, h * w))          # [B, C, hw]
    cos = (query_feat.float().reshape(1, c, h * w) * matched).sum(1)              # [B, hw]
    contrib = weight * cos
    # max per (target, target cell), floor 0, then sum: scatter into a zero-initialised table.
    best = torch.zeros(b, ht * wt, dtype=contrib.dtype, device=contrib.device)
    best.scatter_reduce_(1, cells, contrib, reduce="amax", include_self=True)
    return best.sum(1)
