"""``segswap-eval retrieval DIR``: rank every image's neighbours; P@1 and mAP per scoring method.

Layout: ``DIR/<class>/<image>`` (images directly inside each class folder). Each image in turn is the
query; the database is every other image; the relevant images are the others of its class (a class of
one image gives a database distractor but no query). Scores (docs/evaluation.md explains each):

- ``gem``: cosine of GeM-pooled (p = 3) L2-normalised backbone features, the global-descriptor baseline;
- ``raw32``: cosine of the 32x32 RGB thumbnails (mean removed), a baseline that knows no features;
- ``mnn``: training-free: sum of cosine similarities over mutual-nearest-neighbour cells;
- with a checkpoint, Eq. 3 (official evaluation: whole image as the query region, refined by the
  query's self pair) and its variants ``SCORES``: ``eq3`` (as published), ``eq3-mean`` (divided by the
  joint-mask mass: the mask-weighted mean cosine), ``eq3-norm`` (divided by sqrt(S(q,q) S(t,t)), the
  self-pair scores), ``eq3-sym`` ((S(q,t) + S(t,q)) / 2), ``eq3-csls`` (minus the target's mean score
  from its 10 best queries, a hub penalty), ``eq3-gem`` (sum of the per-query z-scores of eq3-norm and gem).

Ties are broken by a seeded random order (scores of an uninformative model are often all equal).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from segswap.apps.eval_pairs import mutual_nearest
from segswap.apps.features_cache import FeatureCache
from segswap.apps.images import BadImage, list_images, read_rgb, resize_rgb
from segswap.apps.metrics import average_precision
from segswap.apps.pairs import run_head
from segswap.apps.score import joint_mask, refine_query_mask, retrieval_scores

log = logging.getLogger(__name__)

GEM_P = 3.0
RAW_SIZE = 32
CSLS_K = 10
SCORES = ("eq3", "eq3-mean", "eq3-norm", "eq3-sym", "eq3-csls", "eq3-gem")
DEFAULT_SCORE = "eq3-mean"  # the best Eq. 3 variant for every model measured: docs/evaluation.md
SEED = 0


def find_classes(root: str) -> tuple[list[str], list[str], list[str]]:
    """(image paths, class label per image, skipped 'path: reason'); classes are the sub-folders of root."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    paths, labels, skipped = [], [], []
    for cls in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        for name in list_images(os.path.join(root, cls)):
            paths.append(os.path.join(root, cls, name))
            labels.append(cls)
    if len(set(labels)) < 2:
        raise ValueError(f"{root}: needs at least two class folders with images (found {len(set(labels))})")
    return paths, labels, skipped


def gem(feats: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """GeM pooling [N, C, h, w] -> L2-normalised [N, C] (features clamped at 1e-6, as GeM assumes x >= 0)."""
    g = feats.float().clamp(min=1e-6).pow(p).mean((2, 3)).pow(1.0 / p)
    return torch.nn.functional.normalize(g, dim=1)


def raw_descriptor(img: np.ndarray, size: int = RAW_SIZE) -> np.ndarray:
    v = resize_rgb(img, (size, size)).astype(np.float64).ravel()
    v -= v.mean()
    return v / max(np.linalg.norm(v), 1e-9)


def mnn_scores(feats: torch.Tensor) -> np.ndarray:
    """[N, N]: sum of the cosine similarities of the mutual-nearest-neighbour cell pairs of images i and j.

    Mutual pairs are the same set seen from either image, so the matrix is symmetric: only j > i is computed.
    """
    n, c = feats.shape[:2]
    f = feats.float().reshape(n, c, -1)
    out = np.zeros((n, n))
    for i in range(n - 1):
        m = mutual_nearest(f[i], f[i + 1:])
        out[i, i + 1:] = (m["best01"].clamp(min=0) * m["mutual0"]).sum(1).numpy()
    return out + out.T


def eq3_matrices(model, feats: torch.Tensor, batch_size: int = 16, progress=None) -> dict[str, np.ndarray]:
    """Eq. 3 for every ordered pair (i, j), plus what the normalisations and diagnostics need.

    S[i, j]: Eq. 3 of query i (whole image, refined by its self pair) against target j (S[i, i] is the
    self-pair score); W[i, j]: joint-mask mass; M0/M1[i, j]: mean predicted mask on the query / target.
    """
    n, _, h, w = feats.shape
    out = {k: np.zeros((n, n)) for k in ("S", "W", "M0", "M1")}
    for i in range(n):
        q = feats[i:i + 1]
        pred = run_head(model, q, feats, batch_size)
        refined = refine_query_mask(torch.ones(h, w, device=feats.device), {k: v[i:i + 1] for k, v in pred.items()})
        out["S"][i] = retrieval_scores(feats[i], refined, feats, pred).cpu().numpy()
        out["W"][i] = joint_mask(refined, pred).sum((1, 2)).cpu().numpy()
        out["M0"][i] = pred["mask0"].mean((1, 2)).cpu().numpy()
        out["M1"][i] = pred["mask1"].mean((1, 2)).cpu().numpy()
        if progress:
            progress(i + 1, n)
    return out


def _zscore_rows(s: np.ndarray) -> np.ndarray:
    """Per-query z-score over the database (the diagonal, the query itself, left out of the statistics)."""
    off = ~np.eye(len(s), dtype=bool)
    vals = np.where(off, s, np.nan)
    return (s - np.nanmean(vals, 1, keepdims=True)) / (np.nanstd(vals, 1, keepdims=True) + 1e-12)


def normalised_scores(m: dict[str, np.ndarray], gem_cos: np.ndarray) -> dict[str, np.ndarray]:
    """Every variant of ``SCORES`` from the Eq. 3 matrices."""
    s = m["S"]
    self_s = np.diag(s)
    out = {"eq3": s, "eq3-mean": s / np.maximum(m["W"], 1e-9),
           "eq3-norm": s / np.sqrt(np.maximum(np.outer(self_s, self_s), 1e-18)),
           "eq3-sym": (s + s.T) / 2}
    off = np.where(~np.eye(len(s), dtype=bool), s, -np.inf)
    k = min(CSLS_K, len(s) - 1)
    hubness = np.sort(off, 0)[-k:].mean(0)  # each target's mean score over its k best queries
    out["eq3-csls"] = s - hubness[None]
    out["eq3-gem"] = _zscore_rows(out["eq3-norm"]) + _zscore_rows(gem_cos)
    return out


def rank_metrics(scores: np.ndarray, labels: list[str], seed: int = SEED) -> dict:
    """P@1, mAP and the biggest hub (most frequent top-1 image) of an [N, N] score matrix."""
    lab = np.asarray(labels)
    n = len(lab)
    tiebreak = np.random.default_rng(np.random.SeedSequence(seed)).random((n, n))
    p1, aps, top1 = [], [], []
    for i in range(n):
        rel = lab == lab[i]
        rel[i] = False
        if not rel.any():
            continue  # a class of one: a distractor, not a query
        others = np.flatnonzero(np.arange(n) != i)
        order = others[np.lexsort((tiebreak[i, others], -scores[i, others]))]
        p1.append(float(rel[order[0]]))
        aps.append(average_precision(rel[order], int(rel.sum())))
        top1.append(int(order[0]))
    counts = np.bincount(top1, minlength=n) if top1 else np.zeros(n, int)
    return {"P@1": float(np.mean(p1)), "mAP": float(np.mean(aps)), "n_queries": len(p1),
            "hub_top1": int(counts.max()), "hub_image": int(counts.argmax())}


def chance_metrics(labels: list[str]) -> dict:
    """Expected P@1 of a random ranking (mean over queries of (class size - 1) / (N - 1))."""
    lab = np.asarray(labels)
    n = len(lab)
    sizes = np.array([(lab == v).sum() - 1 for v in lab])
    q = sizes > 0
    return {"P@1": float(np.mean(sizes[q] / (n - 1))), "n_queries": int(q.sum())}


def calibration(m: dict[str, np.ndarray], labels: list[str]) -> dict:
    """How the model's masks behave on real images: same-class vs other-class pairs, and self pairs."""
    from sklearn.metrics import roc_auc_score

    lab = np.asarray(labels)
    same = lab[:, None] == lab[None]
    off = ~np.eye(len(lab), dtype=bool)
    pos, neg = same & off, ~same
    out = {"self_mask_mean": float(np.mean(np.diag(m["M0"]))), "self_eq3_mean": float(np.mean(np.diag(m["S"])))}
    for k in ("M1", "W", "S"):
        out[f"{k}_same_class"] = float(m[k][pos].mean())
        out[f"{k}_other_class"] = float(m[k][neg].mean())
        y = np.concatenate([np.ones(pos.sum()), np.zeros(neg.sum())])
        out[f"{k}_auc_same_vs_other"] = float(roc_auc_score(y, np.concatenate([m[k][pos], m[k][neg]])))
    return out


@torch.no_grad()
def evaluate(networks, root: str, size: int, *, score: str = DEFAULT_SCORE, batch_size: int = 16,
             feature_cache: str | None = None, progress=None) -> dict:
    if score not in SCORES:
        raise ValueError(f"--score {score!r}: choose from {', '.join(SCORES)}")
    paths, labels, skipped = find_classes(root)
    cache = FeatureCache(networks.model, cache_dir=feature_cache, batch_size=batch_size,
                         device=next(networks.model.backbone.parameters()).device, tag=networks.name)
    feats, raws, keep, kept_labels = [], [], [], []
    for p, lab in zip(paths, labels):
        try:
            img = read_rgb(p)
            feats.append(cache.get(p, (size, size)))
        except BadImage as e:
            skipped.append(str(e))
            log.warning("skipping %s", e)
            continue
        raws.append(raw_descriptor(img))
        keep.append(p)
        kept_labels.append(lab)
    labels = kept_labels
    if len(set(labels)) < 2:
        raise ValueError(f"{root}: fewer than two classes of readable images ({len(skipped)} skipped)")
    feats_t = torch.stack(feats)
    g = gem(feats_t)
    gem_cos = (g @ g.T).cpu().numpy()
    raw = np.stack(raws)
    scores = {"gem": gem_cos, "raw32": raw @ raw.T, "mnn": mnn_scores(feats_t.cpu())}
    res = {"protocol": "retrieval", "root": os.path.abspath(root), "size": size, "backbone": networks.name,
           "n_images": len(keep), "n_classes": len(set(labels)), "skipped": skipped,
           "images": [os.path.relpath(p, root) for p in keep], "chance": chance_metrics(labels)}
    if networks.has_head:
        m = eq3_matrices(networks.model, feats_t, batch_size, progress)
        variants = normalised_scores(m, gem_cos)
        scores = {**variants, **scores}
        res["score"] = score
        res["calibration"] = calibration(m, labels)
    res["methods"] = {k: rank_metrics(v, labels) for k, v in scores.items()}
    for v in res["methods"].values():
        v["hub_image"] = res["images"][v["hub_image"]]
    return res


RETRIEVAL_HEADER = ["score", "P@1", "mAP", "queries", "top-1 hub"]


def summary_rows(res: dict) -> list[list]:
    rows = [[("* " if k == res.get("score") else "") + k, v["P@1"], v["mAP"], v["n_queries"],
             f"{v['hub_top1']} ({v['hub_image']})"] for k, v in res["methods"].items()]
    rows.append(["chance", res["chance"]["P@1"], "-", res["chance"]["n_queries"], "-"])
    return rows
