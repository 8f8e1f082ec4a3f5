"""Evaluation metrics of the paper's benchmarks: AP (Brueghel), Recall@N (place recognition), P and J
(co-segmentation)."""
from __future__ import annotations

import numpy as np


def average_precision(ranked_relevant, n_relevant: int) -> float:
    """AP of one ranking, as the ArtMiner/SegSwap Brueghel evaluation computes it.

    ranked_relevant: booleans in ranked order (True = the item at this rank is a ground-truth match)
    n_relevant:      number of ground-truth matches (relevant items never ranked count as misses)
    AP = (1 / n_relevant) * sum over relevant ranks r of precision@r.
    """
    rel = np.asarray(ranked_relevant, dtype=bool)
    if n_relevant <= 0:
        raise ValueError("average_precision needs at least one relevant item")
    if rel.sum() > n_relevant:
        raise ValueError(f"{int(rel.sum())} relevant items ranked but n_relevant={n_relevant}")
    hits = np.cumsum(rel)
    ranks = np.flatnonzero(rel) + 1
    return float(np.sum(hits[rel] / ranks) / n_relevant)


def recall_at_n(ranked_dists: list[np.ndarray], threshold: float, ns=(1, 5, 10)) -> dict[int, float]:
    """Fraction of queries with at least one of their top-N candidates within ``threshold``.

    ranked_dists: per query, distances (e.g. metres between UTM positions) of its ranked candidates
    """
    out = {}
    for n in ns:
        hit = [bool(np.any(np.asarray(d[:n]) <= threshold)) for d in ranked_dists]
        out[n] = float(np.mean(hit)) if hit else float("nan")
    return out


def precision_jaccard(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float | None]:
    """Pixel precision P (fraction of pixels labelled correctly) and Jaccard J (IoU of the foreground).

    The standard Internet-dataset protocol: J is undefined (None) when the ground truth is empty, and
    such images are left out of the mean J.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    p = float(np.mean(pred == gt))
    if not gt.any():
        return p, None
    j = float(np.logical_and(pred, gt).sum() / np.logical_or(pred, gt).sum())
    return p, j
