"""Place recognition on Pitts30k and Tokyo 24/7 (paper Table 2): re-rank a supplied top-100 list.

Inputs, in the formats Patch-NetVLAD publishes and writes (so its files are used unchanged):

- image lists: ``pitts30k_imageNames_query.txt`` / ``..._index.txt`` style text files, one image path
  per line, relative to a dataset root;
- ground truth: ``pitts30k_test.npz`` / ``tokyo247.npz`` style, with ``utmQ`` [Nq, 2] and ``utmDb``
  [Ndb, 2] (UTM easting/northing in metres) and optionally ``posDistThr`` (25 m);
- candidates, one of:
  * Patch-NetVLAD's ``NetVLAD_predictions.txt`` (kapture style: ``#`` comment lines, then
    ``query_path, db_path`` lines, each query's candidates in rank order; paths may carry the
    dataset root prefix);
  * a ``.npy`` integer array [Nq, K] of database indices in rank order (Patch-NetVLAD's
    ``pred_input_path``);
  * a ``.npy`` float array [Nq, Ndb] of similarity scores (SegSwap's ``top100_patchVlad.npy``); the
    top ``topk`` by score are the candidates.

Each query's candidates are re-ranked by Eq. 3 with the whole query as the region (refined by the
self pass), at 640x480 like NetVLAD. A query counts as localised at N when one of its first N
candidates lies within 25 m. Tokyo 24/7 stores 12 views per database place (consecutive in the list);
``views_per_place=12`` applies the standard spatial non-maximum suppression: only the best-ranked view
of each place is kept. Recall is reported before and after re-ranking.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from segswap.apps.brueghel import LabelFileError
from segswap.apps.collection import usable_images
from segswap.apps.features_cache import FeatureCache
from segswap.apps.images import BadImage
from segswap.apps.metrics import recall_at_n
from segswap.apps.pairs import score_query

log = logging.getLogger(__name__)

DEFAULT_SIZE = (640, 480)
DEFAULT_DIST = 25.0


def read_image_list(path: str) -> list[str]:
    with open(path) as f:
        names = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    if not names:
        raise LabelFileError(f"{path}: empty image list")
    return names


def read_ground_truth(path: str, n_query: int, n_db: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(utm of queries [Nq,2], utm of database [Ndb,2], distance threshold or None) from an npz."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"utmQ", "utmDb"} <= keys:
                raise LabelFileError(f"{path}: needs arrays 'utmQ' and 'utmDb', found {sorted(keys)}")
            utm_q, utm_db = np.asarray(z["utmQ"], float), np.asarray(z["utmDb"], float)
            thr = float(z["posDistThr"]) if "posDistThr" in keys else None
    except (ValueError, OSError) as e:
        if isinstance(e, LabelFileError):
            raise
        raise LabelFileError(f"{path}: cannot read ground truth npz ({e})") from e
    for name, arr, n in (("utmQ", utm_q, n_query), ("utmDb", utm_db, n_db)):
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] != n:
            raise LabelFileError(f"{path}: {name} has shape {arr.shape}, expected ({n}, 2) to match the image list")
    return utm_q, utm_db, thr


def _path_index(names: list[str], root: str) -> dict[str, int]:
    idx = {}
    for i, n in enumerate(names):
        for key in (n, os.path.join(root, n), os.path.normpath(os.path.join(root, n))):
            idx.setdefault(key, i)
    return idx


def read_candidates(path: str, queries: list[str], db: list[str], root: str, topk: int) -> list[np.ndarray]:
    """Per query, database indices of its candidates in rank order (at most ``topk``)."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise LabelFileError(f"{path}: cannot read candidates ({e})") from e
        if arr.ndim != 2 or arr.shape[0] != len(queries):
            raise LabelFileError(f"{path}: expected [{len(queries)}, K] array, got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating):
            if arr.shape[1] != len(db):
                raise LabelFileError(f"{path}: score matrix has {arr.shape[1]} columns but {len(db)} database images")
            return [row for row in np.argsort(-arr, axis=1, kind="stable")[:, :topk]]
        if arr.min() < 0 or arr.max() >= len(db):
            raise LabelFileError(f"{path}: database index out of range [0, {len(db)})")
        return [row for row in arr[:, :topk].astype(np.int64)]
    qidx, didx = _path_index(queries, root), _path_index(db, root)
    cands: list[list[int]] = [[] for _ in queries]
    with open(path) as f:
        for lineno, ln in enumerate(f, 1):
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            parts = [p.strip() for p in ln.split(",")]
            if len(parts) != 2:
                raise LabelFileError(f"{path}:{lineno}: expected 'query_path, db_path', got {ln!r}")
            q = qidx.get(parts[0], qidx.get(os.path.normpath(parts[0])))
            d = didx.get(parts[1], didx.get(os.path.normpath(parts[1])))
            if q is None:
                raise LabelFileError(f"{path}:{lineno}: query {parts[0]!r} is not in the query list")
            if d is None:
                raise LabelFileError(f"{path}:{lineno}: database image {parts[1]!r} is not in the database list")
            if len(cands[q]) < topk:
                cands[q].append(d)
    empty = [queries[i] for i, c in enumerate(cands) if not c]
    if empty:
        raise LabelFileError(f"{path}: {len(empty)} queries have no candidates, e.g. {empty[:3]}")
    return [np.asarray(c, dtype=np.int64) for c in cands]


def spatial_nms(ranked: np.ndarray, views_per_place: int) -> np.ndarray:
    """Keep only the first (best-ranked) database view of each place (place = index // views_per_place)."""
    if views_per_place <= 1:
        return ranked
    _, first = np.unique(np.asarray(ranked) // views_per_place, return_index=True)
    return np.asarray(ranked)[np.sort(first)]


def evaluate(model, queries: list[str], db: list[str], root: str, candidates: list[np.ndarray],
             utm_q: np.ndarray, utm_db: np.ndarray, cache: FeatureCache, *, dataset: str,
             size=DEFAULT_SIZE, dist: float = DEFAULT_DIST, views_per_place: int = 1, batch_size: int = 16,
             chunk: int = 50, ns=(1, 5, 10), progress=None) -> dict:
    """Re-rank every query's candidates and compute Recall@N before and after (module docstring)."""
    base_d, ours_d, per_query = [], [], []
    skipped = {"unreadable_queries": [], "unreadable_candidates": set()}
    for qi, qname in enumerate(queries):
        cand = candidates[qi]
        try:
            qfeat = cache.compute_path(os.path.join(root, qname), size)
        except BadImage as e:  # counted, and left out of the recalls
            log.warning("skipped query: %s", e)
            skipped["unreadable_queries"].append(qname)
            continue
        qmask = torch.ones(qfeat.shape[1:], device=qfeat.device)
        scores = []
        for s in range(0, len(cand), chunk):
            part = cand[s:s + chunk]
            ok, _ = usable_images(cache, [os.path.join(root, db[j]) for j in part], size)
            ok = set(ok)
            sc = np.full(len(part), -np.inf, np.float32)  # an unreadable candidate goes last
            keep = [k for k, j in enumerate(part) if os.path.join(root, db[j]) in ok]
            skipped["unreadable_candidates"].update(db[j] for k, j in enumerate(part) if k not in keep)
            if keep:
                feats = cache.get_many([os.path.join(root, db[part[k]]) for k in keep], size)
                sc[keep] = score_query(model, qfeat, qmask, feats, batch_size)[0].cpu().numpy()
            scores.append(sc)
        scores = np.concatenate(scores)
        reranked = cand[np.argsort(-scores, kind="stable")]
        b, o = spatial_nms(cand, views_per_place), spatial_nms(reranked, views_per_place)
        base_d.append(np.linalg.norm(utm_db[b] - utm_q[qi], axis=1))
        ours_d.append(np.linalg.norm(utm_db[o] - utm_q[qi], axis=1))
        per_query.append({"query": qname, "top10": [db[j] for j in o[:10]],
                          "top10_dist_m": [round(float(x), 2) for x in ours_d[-1][:10]]})
        if progress:
            progress(qi + 1, len(queries))
    return {"protocol": dataset, "config": {"size": list(size), "dist_m": dist, "views_per_place": views_per_place,
                                            "topk": int(max(len(c) for c in candidates)), "n_queries": len(per_query),
                                            "n_database": len(db)},
            "recall_input": {f"R@{n}": v for n, v in recall_at_n(base_d, dist, ns).items()},
            "recall": {f"R@{n}": v for n, v in recall_at_n(ours_d, dist, ns).items()},
            "per_query": per_query,
            "skipped": {"unreadable_queries": skipped["unreadable_queries"],
                        "unreadable_candidates": sorted(skipped["unreadable_candidates"])}}
