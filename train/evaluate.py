"""Validation on held-out shards: mask IoU and correspondence error at the feature grid.

For every held-out pair (plain images, no augmentation) the model predicts both masks and both
correspondence fields, and we report:

``iou``
    intersection over union of the predicted mask (> 0.5) with the ground-truth grid mask (> 0.5),
    per image, averaged over both images of every pair;
``corr_err_px``
    the mean distance, in pixels of the input images, between predicted and ground-truth
    correspondences over the cells whose correspondence weight (soft mask x defined) is > 0.5;
``fg_mask`` / ``bg_mask``
    the mean predicted mask over ground-truth foreground (> 0.5) / background cells of positive pairs:
    threshold-free, so they show progress early in training, before masks cross 0.5;
``neg_mask``
    the mean predicted mask on negative pairs (image 0 of pair i with image 1 of pair i+1), which
    should be near 0.

:func:`write_validation_sheet` draws the first few held-out pairs (always the same ones) with their
ground truth beside the model's prediction into ``RUN/val/step-NNNNNN.png`` and, when the trainer has
a TensorBoard writer, as the image ``val/sheet`` at that step.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from segswap.core import viz
from segswap.train.augment import no_augment
from segswap.train.stream import ShardStream, make_loader

SHEET_PAIRS = 4   # rows of a validation sheet
SHEET_LINES = 10  # correspondences drawn per pair
SHEET_TILE = 160  # px per image panel


def batch_metrics(out: dict, batch: dict, image_size: int) -> dict:
    """Sums (not means) so batches can be accumulated: iou_sum, n_masks, err_sum, n_cells, fg_sum, fg_n,
    bg_sum, bg_n."""
    iou_sum, n = 0.0, 0
    err_sum, cells = 0.0, 0
    fg_sum = bg_sum = fg_n = bg_n = 0.0
    scale = torch.tensor([image_size, image_size], dtype=torch.float32, device=out["mask0"].device)
    for i, j in (("0", "1"), ("1", "0")):
        prob = out["mask" + i].float()
        pred = prob > 0.5
        gt = batch["mask" + i] > 0.5
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float()
        fg_sum += prob[gt].sum().item()
        bg_sum += prob[~gt].sum().item()
        fg_n += int(gt.sum())
        bg_n += int((~gt).sum())
        iou_sum += torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).sum().item()
        n += pred.shape[0]
        sel = batch[f"flow{i}{j}_weight"] > 0.5
        d = ((out[f"flow{i}{j}"].float() - batch[f"flow{i}{j}"]) * scale).norm(dim=-1)
        err_sum += d[sel].sum().item()
        cells += int(sel.sum().item())
    return {"iou_sum": iou_sum, "n_masks": n, "err_sum": err_sum, "n_cells": cells,
            "fg_sum": fg_sum, "fg_n": fg_n, "bg_sum": bg_sum, "bg_n": bg_n}


@torch.no_grad()
def validate(model, urls, image_size: int, max_pairs: int, device, batch_size: int = 8,
             workers: int = 0, amp_dtype=None) -> dict:
    """Metrics of ``model`` (a CoSegModel) on the first ``max_pairs`` pairs of ``urls``."""
    stream = ShardStream(urls, no_augment(image_size), resampled=False, max_items=max_pairs)
    loader = make_loader(stream, batch_size=batch_size, workers=workers, drop_last=False)
    was_training = model.training
    model.eval()
    acc = Counter()  # the sums of batch_metrics
    neg_sum, neg_n, pairs, skipped = 0.0, 0, 0, 0
    for batch in loader:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            f0, f1 = model.features(batch["img0"]), model.features(batch["img1"])
            out = model.head(f0, f1)
            if f0.shape[0] > 1:
                neg = model.head(f0, f1.roll(1, dims=0))
                neg_sum += 0.5 * (neg["mask0"].float().mean() + neg["mask1"].float().mean()).item() * f0.shape[0]
                neg_n += f0.shape[0]
        acc.update(batch_metrics(out, batch, image_size))
        pairs += f0.shape[0]
        skipped += int(batch["skipped"].sum())
    model.train(was_training)
    return {
        "pairs": pairs,
        "iou": acc["iou_sum"] / max(acc["n_masks"], 1),
        "corr_err_px": acc["err_sum"] / max(acc["n_cells"], 1),
        "fg_mask": acc["fg_sum"] / max(acc["fg_n"], 1),
        "bg_mask": acc["bg_sum"] / max(acc["bg_n"], 1),
        "neg_mask": neg_sum / max(neg_n, 1),
        "skipped": skipped,
    }


@torch.no_grad()
def validation_sheet(model, urls, image_size: int, device, n_pairs: int = SHEET_PAIRS, tile: int = SHEET_TILE,
                     n_lines: int = SHEET_LINES, amp_dtype=None) -> np.ndarray:
    """RGB picture of the model on the first ``n_pairs`` held-out pairs (plain images, no augmentation).

    One row per pair: left, both images with the ground-truth masks (green / magenta) and the true
    correspondences of ``n_lines`` cells; right, the same images tinted red by the predicted masks
    and the predicted correspondences of the same cells (same colours). The cells are drawn from a
    fixed seed, so sheets of successive steps are directly comparable.
    """
    stream = ShardStream(urls, no_augment(image_size), resampled=False, max_items=n_pairs)
    batch = next(iter(make_loader(stream, batch_size=n_pairs, workers=0, drop_last=False)), None)
    if batch is None:
        raise ValueError(f"no held-out pair could be read from {urls}")
    was_training = model.training
    model.eval()
    with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype or torch.bfloat16,
                        enabled=amp_dtype is not None):
        out = model(batch["img0"].to(device), batch["img1"].to(device))
    model.train(was_training)
    rng = np.random.default_rng(0)
    rows = []
    for b in range(batch["img0"].shape[0]):
        gt = {k: batch[k][b].numpy() for k in ("mask0", "mask1", "flow01")}
        gt["weight01"] = batch["flow01_weight"][b].numpy()
        pred = {k: out[k][b].float().cpu().numpy() for k in ("mask0", "mask1", "flow01")}
        rows.append(viz.pair_sheet_row(batch["img0"][b].numpy(), batch["img1"][b].numpy(), gt, pred, tile,
                                       n_lines, rng, title=str(batch["key"][b])))
    return viz.vstack(rows)


def write_validation_sheet(model, urls, image_size: int, device, run_dir: str, step: int, tb=None,
                           amp_dtype=None) -> str:
    """Write ``run_dir/val/step-NNNNNN.png`` (and the TensorBoard image ``val/sheet``); returns the path."""
    sheet = validation_sheet(model, urls, image_size, device, amp_dtype=amp_dtype)
    path = viz.write_png(os.path.join(run_dir, "val", f"step-{step:06d}.png"), sheet)
    if tb is not None:
        tb.add_image("val/sheet", sheet, step, dataformats="HWC")
    return path
