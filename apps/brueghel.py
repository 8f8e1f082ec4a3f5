"""Art-detail retrieval on Brueghel (ArtMiner protocol, paper Table 1).

Label file (``brueghelVal.json`` / ``brueghelTest.json`` from ArtMiner and SegSwap):

    {"<category>": [{"query": ["<image name>", [x1, y1, x2, y2]],
                     "gt":    [["<image name>", [x1, y1, x2, y2]], ...]}, ...], ...}

Boxes are in pixels of the original images. The database is every image of the image folder (sorted
by name) except the query image itself; a retrieved image is correct when it is one of the query's
``gt`` images. The score is the paper's Eq. 3; AP is computed per query, averaged per category, and
the reported mAP is the mean over categories.

Images as in the official evaluation: database images are resized to ``size`` x ``size`` (640); the
query image is resized (keeping its aspect ratio) so that the query box's longer side is about
``query_box_size`` pixels, rounded to whole feature cells, then a ``size`` x ``size`` crop centred on the
box is taken. The query region on the feature grid is the box dilated by one cell.

With ``rerank_topk`` the database is first ranked by a cheap dense-feature baseline (for each query cell
the best cosine similarity anywhere in the image, averaged over the query region) and only its top-k
are re-ranked with the model; the baseline's mAP is reported too.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from segswap.apps.collection import usable_images
from segswap.apps.features_cache import FeatureCache
from segswap.apps.images import list_images, read_rgb, resize_rgb
from segswap.apps.metrics import average_precision
from segswap.apps.pairs import score_query

log = logging.getLogger(__name__)

STRIDE = 16


class LabelFileError(ValueError):
    """A malformed dataset file; the message names the file and the entry."""


@dataclass
class BrueghelQuery:
    category: str
    image: str
    box: tuple[float, float, float, float]
    gt: list[str]


def _check_box(box, where: str) -> tuple[float, float, float, float]:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise LabelFileError(f"{where}: box must be [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise LabelFileError(f"{where}: empty box {box!r}")
    return x1, y1, x2, y2


def load_labels(path: str) -> list[BrueghelQuery]:
    """Parse and check a Brueghel label file (format in the module docstring)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not data:
        raise LabelFileError(f"{path}: expected a non-empty object mapping category -> list of queries")
    queries = []
    for cat in sorted(data):
        entries = data[cat]
        if not isinstance(entries, list):
            raise LabelFileError(f"{path}: category {cat!r}: expected a list of queries")
        for i, e in enumerate(entries):
            where = f"{path}: category {cat!r} query {i}"
            if not isinstance(e, dict) or "query" not in e or "gt" not in e:
                raise LabelFileError(f"{where}: expected {{'query': [name, box], 'gt': [[name, box], ...]}}")
            q = e["query"]
            if not (isinstance(q, list) and len(q) == 2 and isinstance(q[0], str)):
                raise LabelFileError(f"{where}: 'query' must be [image name, box]")
            box = _check_box(q[1], where)
            gt = []
            for j, g in enumerate(e["gt"]):
                if not (isinstance(g, list) and len(g) == 2 and isinstance(g[0], str)):
                    raise LabelFileError(f"{where}: gt {j} must be [image name, box]")
                _check_box(g[1], f"{where} gt {j}")
                gt.append(g[0])
            if not gt:
                raise LabelFileError(f"{where}: no ground-truth images")
            queries.append(BrueghelQuery(str(cat), q[0], box, gt))
    return queries


def preprocess_query(img: np.ndarray, box, query_box_size: int, size: int,
                     stride: int = STRIDE) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize the query so its box's longer side is ~``query_box_size`` px (whole cells), crop ``size`` x
    ``size`` centred on the box (shifted to stay inside). Returns (crop uint8, box in crop pixels)."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    ratio = max(bw, bh) / query_box_size
    new_bw = max(round(bw / ratio / stride), 1) * stride
    new_bh = max(round(bh / ratio / stride), 1) * stride
    new_w = max(round(w * new_bw / bw), size)
    new_h = max(round(h * new_bh / bh), size)
    sx, sy = new_w / w, new_h / h
    img = resize_rgb(img, (new_w, new_h))
    b = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
    left = (b[0] + b[2]) // 2 - size // 2
    top = (b[1] + b[3]) // 2 - size // 2
    left = min(max(left, 0), new_w - size)
    top = min(max(top, 0), new_h - size)
    crop = img[top:top + size, left:left + size]
    return crop, (b[0] - left, b[1] - top, b[2] - left, b[3] - top)


def box_grid_mask(box, grid: tuple[int, int], stride: int = STRIDE, dilate: int = 1) -> torch.Tensor:
    """[h, w] float mask of the feature cells covered by a pixel box, dilated by ``dilate`` cells."""
    h, w = grid
    x1, y1, x2, y2 = box
    c1 = max(int(round(x1 / stride)) - dilate, 0)
    r1 = max(int(round(y1 / stride)) - dilate, 0)
    c2 = min(int(round(x2 / stride)) + dilate, w)
    r2 = min(int(round(y2 / stride)) + dilate, h)
    m = torch.zeros(h, w)
    m[r1:max(r2, r1 + 1), c1:max(c2, c1 + 1)] = 1
    return m


@torch.no_grad()
def cosine_baseline(query_feat: torch.Tensor, query_mask: torch.Tensor, db_feats: torch.Tensor) -> torch.Tensor:
    """Per database image: mean over query-region cells of the best cosine similarity in the image."""
    c = query_feat.shape[0]
    qf = query_feat.reshape(c, -1)[:, query_mask.reshape(-1) > 0]              # [C, n]
    sim = torch.einsum("cn,bcm->bnm", qf, db_feats.reshape(db_feats.shape[0], c, -1))
    return sim.amax(2).mean(1)


def evaluate(model, labels: list[BrueghelQuery], image_dir: str, cache: FeatureCache, *, size: int = 640,
             query_box_size: int = 64, rerank_topk: int | None = None, batch_size: int = 16,
             chunk: int = 64, progress=None) -> dict:
    """Run the protocol; returns the results dict written as JSON by ``segswap-eval brueghel``."""
    names = list_images(image_dir)
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({q.image for q in labels if q.image not in index} |
                     {g for q in labels for g in q.gt if g not in index})
    if missing:
        raise LabelFileError(f"{image_dir}: {len(missing)} images named in the label file are missing, "
                             f"e.g. {missing[:3]}")
    # Every database image's features once, up front; unreadable images leave the database (reported).
    good, bad = usable_images(cache, [os.path.join(image_dir, n) for n in names], (size, size))
    for msg in bad:
        log.warning("skipped: %s", msg)
    names = [os.path.basename(p) for p in good]
    index = {n: i for i, n in enumerate(names)}
    paths = good
    dev = cache.device
    per_query, skipped_queries = [], []
    for qi, q in enumerate(labels):
        if q.image not in index:
            skipped_queries.append(q.image)
            continue
        crop, box = preprocess_query(read_rgb(os.path.join(image_dir, q.image)), q.box, query_box_size, size)
        qfeat = cache.compute([crop])[0]
        qmask = box_grid_mask(box, qfeat.shape[1:]).to(dev)
        db = [i for i in range(len(names)) if i != index[q.image]]
        base = torch.cat([cosine_baseline(qfeat, qmask, cache.get_many([paths[i] for i in db[s:s + chunk]], (size, size)))
                          for s in range(0, len(db), chunk)]).cpu().numpy()
        base_order = np.argsort(-base, kind="stable")
        k = len(db) if rerank_topk is None else min(rerank_topk, len(db))
        cand = base_order[:k]
        scores = []
        for s in range(0, k, chunk):
            sel = [db[j] for j in cand[s:s + chunk]]
            sc, _ = score_query(model, qfeat, qmask, cache.get_many([paths[i] for i in sel], (size, size)), batch_size)
            scores.append(sc.cpu().numpy())
        scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.concatenate([cand[np.argsort(-scores, kind="stable")], base_order[k:]])
        gt = set(q.gt) - {q.image}  # unreadable gt images stay relevant: missing them costs AP
        relevant = np.array([names[db[j]] in gt for j in order])
        base_relevant = np.array([names[db[j]] in gt for j in base_order])
        per_query.append({"category": q.category, "query": q.image, "box": list(q.box),
                          "ap": average_precision(relevant, len(gt)),
                          "ap_cosine": average_precision(base_relevant, len(gt)),
                          "top10": [names[db[j]] for j in order[:10]]})
        if progress:
            progress(qi + 1, len(labels))
    res = summarise(per_query, {"size": size, "query_box_size": query_box_size, "rerank_topk": rerank_topk,
                                "n_database": len(names), "n_queries": len(labels)})
    res["skipped"] = {"unreadable_images": bad, "queries_on_unreadable_images": skipped_queries}
    return res


def summarise(per_query: list[dict], config: dict) -> dict:
    """Mean AP per category, then the mean over categories (the paper's mAP)."""
    cats = sorted({p["category"] for p in per_query})
    per_cat = {}
    for c in cats:
        ps = [p for p in per_query if p["category"] == c]
        per_cat[c] = {"ap": float(np.mean([p["ap"] for p in ps])),
                      "ap_cosine": float(np.mean([p["ap_cosine"] for p in ps])), "n_queries": len(ps)}
    return {"protocol": "brueghel", "config": config,
            "map": float(np.mean([v["ap"] for v in per_cat.values()])) if per_cat else float("nan"),
            "map_cosine": float(np.mean([v["ap_cosine"] for v in per_cat.values()])) if per_cat else float("nan"),
            "per_category": per_cat, "per_query": per_query}
