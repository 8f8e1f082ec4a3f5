"""``segswap-eval pairs DIR``: masks and correspondences on real image pairs with optional ground truth.

Folder layout (one sub-folder per pair; docs/evaluation.md has the full description)::

    DIR/<pair>/img0.<ext>, img1.<ext>   the two images (any size, any format read_rgb reads)
    DIR/<pair>/mask0.png, mask1.png      optional: ground-truth repeated region (non-zero = inside)
    DIR/<pair>/H01.txt                   optional: 3x3 homography, image-0 pixels -> image-1 pixels
    DIR/<pair>/flow01.npy                optional: [H0, W0, 2] float displacement (u, v): x1 = x0 + u, y1 = y0 + v
    DIR/<pair>/disp01.npy                optional: [H0, W0] float disparity of a rectified stereo pair: x1 = x0 - d
                                         (at most one geometry file; NaN / inf / <= 0 disparity = unknown)

Pixel coordinates are OpenCV's: pixel (x, y) is the centre of column x, row y.

Both images are resized to SIZE x SIZE (as ``segswap-predict`` does); masks are scored at that size,
geometry on the SIZE/16 grid (cell centres of image 0 mapped through the ground truth). Methods:

- the checkpoint's head (if ``--model``);
- ``mnn``: training-free mutual nearest neighbours of the same L2-normalised features; the mask score of
  a cell is the cosine similarity to its nearest neighbour when the two cells are mutual nearest
  neighbours, 0 otherwise (so threshold t = "mutual NN with similarity > t"); the correspondence is
  the nearest neighbour's cell centre (every cell, mutual or not);
- trivial masks: ``all-foreground``, ``empty``, ``centre-box`` (centred rectangle of 30% of the area);
- ``identity`` correspondences (every cell matched to the same position in image 1).
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from segswap.apps.images import IMAGE_EXTENSIONS, BadImage, read_rgb, resize_rgb
from segswap.apps.pairs import run_head
from segswap.core.images import write_png

log = logging.getLogger(__name__)

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)  # the best-threshold sweep
DEFAULT_THRESHOLD = 0.5
ACCURACY_CELLS = (1, 2, 4)
CENTRE_BOX_AREA = 0.3
GEOMETRY_FILES = ("H01.txt", "flow01.npy", "disp01.npy")


@dataclass
class PairFiles:
    name: str
    img0: str
    img1: str
    mask0: str | None
    mask1: str | None
    geometry: str | None


def _image_file(folder: str, stem: str) -> str | None:
    found = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), stem + ".*"))
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    return found[0] if found else None


def find_pairs(root: str) -> tuple[list[PairFiles], list[str]]:
    """(pairs in name order, skipped: one 'folder: reason' line per unusable pair folder)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    pairs, skipped = [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        img0, img1 = _image_file(folder, "img0"), _image_file(folder, "img1")
        if img0 is None or img1 is None:
            skipped.append(f"{folder}: no {'img0' if img0 is None else 'img1'}.<ext> image")
            continue
        geo = [g for g in GEOMETRY_FILES if os.path.isfile(os.path.join(folder, g))]
        if len(geo) > 1:
            skipped.append(f"{folder}: more than one geometry file ({', '.join(geo)})")
            continue
        masks = [os.path.join(folder, f) if os.path.isfile(os.path.join(folder, f)) else None
                 for f in ("mask0.png", "mask1.png")]
        pairs.append(PairFiles(name, img0, img1, *masks, os.path.join(folder, geo[0]) if geo else None))
    return pairs, skipped


def read_mask(path: str, size: int) -> np.ndarray:
    """Ground-truth mask (non-zero = inside) -> bool [size, size] (nearest-neighbour resize)."""
    m = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise BadImage(f"{path}: cannot read as a mask image")
    return cv2.resize((m > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def read_geometry(path: str, shape0: tuple[int, int]):
    """('homography', H [3,3]) | ('flow', [H0,W0,2]) | ('disparity', [H0,W0]); ValueError names the file."""
    base = os.path.basename(path)
    try:
        if base == "H01.txt":
            h = np.loadtxt(path, dtype=np.float64)
            if h.shape != (3, 3) or not np.isfinite(h).all():
                raise ValueError(f"expected a finite 3x3 matrix, got shape {h.shape}")
            return "homography", h
        arr = np.load(path, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    want = (*shape0, 2) if base == "flow01.npy" else tuple(shape0)
    if arr.shape != want:
        raise ValueError(f"{path}: shape {arr.shape}, expected {want} (image 0 is {shape0[1]}x{shape0[0]})")
    return ("flow", arr) if base == "flow01.npy" else ("disparity", arr)


def cell_centres(h: int, w: int) -> np.ndarray:
    """Normalised (x, y) centres [h, w, 2] of a grid's cells."""
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return np.stack([xs, ys], -1)


def gt_matches(geometry, shape0: tuple[int, int], shape1: tuple[int, int], grid: tuple[int, int]):
    """Ground-truth match of each image-0 cell centre: (normalised (x, y) in image 1 [h,w,2], valid [h,w]).

    valid = the ground truth is known there and the match lies inside image 1.
    """
    kind, data = geometry
    (h0, w0), (h1, w1) = shape0, shape1
    c = cell_centres(*grid)
    x0, y0 = c[..., 0] * w0 - 0.5, c[..., 1] * h0 - 0.5  # OpenCV pixel coordinates in image 0
    if kind == "homography":
        p = np.einsum("ij,hwj->hwi", data, np.stack([x0, y0, np.ones_like(x0)], -1))
        with np.errstate(divide="ignore", invalid="ignore"):
            x1, y1 = p[..., 0] / p[..., 2], p[..., 1] / p[..., 2]
        known = p[..., 2] > 0  # points mapped behind the camera have no match
    else:
        r = np.clip(np.rint(y0).astype(int), 0, h0 - 1)
        q = np.clip(np.rint(x0).astype(int), 0, w0 - 1)
        if kind == "flow":
            uv = data[r, q]
            x1, y1 = x0 + uv[..., 0], y0 + uv[..., 1]
            known = np.isfinite(uv).all(-1)
        else:
            d = data[r, q]
            x1, y1 = x0 - d, y0.copy()
            known = np.isfinite(d) & (d > 0)
    match = np.stack([(x1 + 0.5) / w1, (y1 + 0.5) / h1], -1)
    inside = known & np.isfinite(match).all(-1) & (match >= 0).all(-1) & (match < 1).all(-1)
    return np.where(inside[..., None], match, np.nan), inside


def cells_inside(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """bool [h, w]: the pixel-resolution mask at each cell centre."""
    s = mask.shape[0]
    c = cell_centres(*grid)
    return mask[np.minimum((c[..., 1] * s).astype(int), s - 1), np.minimum((c[..., 0] * s).astype(int), s - 1)]


# --------------------------------------------------------------------------- methods


def mutual_nearest(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Nearest neighbours both ways between cells a [C, q] and each of the batch b [N, C, r] (L2-normalised).

    Returns best01/nn01/mutual0 [N, q] (similarity, index and mutual flag of each a-cell's nearest b-cell)
    and best10/nn10/mutual1 [N, r] the other way.
    """
    sim = torch.einsum("cq,ncr->nqr", a.float(), b.float())   # cosine similarities
    best01, nn01 = sim.max(2)
    best10, nn10 = sim.max(1)
    mutual0 = torch.gather(nn10, 1, nn01) == torch.arange(a.shape[1])[None]
    mutual1 = torch.gather(nn01, 1, nn10) == torch.arange(b.shape[2])[None]
    return {"best01": best01, "nn01": nn01, "mutual0": mutual0, "best10": best10, "nn10": nn10, "mutual1": mutual1}


def mutual_nn(feat0: torch.Tensor, feat1: torch.Tensor) -> dict:
    """Training-free baseline on L2-normalised features [C,h,w] x2 -> numpy mask0/mask1 [h,w], flow01/flow10."""
    c, h, w = feat0.shape
    m = mutual_nearest(feat0.reshape(c, -1), feat1.reshape(1, c, -1))
    centres = torch.as_tensor(cell_centres(h, w).reshape(-1, 2), dtype=torch.float32)
    return {"mask0": (m["best01"][0].clamp(0, 1) * m["mutual0"][0]).reshape(h, w).numpy(),
            "mask1": (m["best10"][0].clamp(0, 1) * m["mutual1"][0]).reshape(h, w).numpy(),
            "flow01": centres[m["nn01"][0]].reshape(h, w, 2).numpy(),
            "flow10": centres[m["nn10"][0]].reshape(h, w, 2).numpy()}


def centre_box(size: int, area: float = CENTRE_BOX_AREA) -> np.ndarray:
    side = int(round(size * np.sqrt(area)))
    m = np.zeros((size, size), np.float32)
    o = (size - side) // 2
    m[o:o + side, o:o + side] = 1
    return m


def trivial_methods(size: int, grid: tuple[int, int]) -> dict[str, dict]:
    """Predictions that look at nothing: constant masks, and identity correspondences."""
    full, empty, box = np.ones((size, size), np.float32), np.zeros((size, size), np.float32), centre_box(size)
    ident = cell_centres(*grid).astype(np.float32)
    return {"all-foreground": {"mask0": full, "mask1": full}, "empty": {"mask0": empty, "mask1": empty},
            "centre-box": {"mask0": box, "mask1": box}, "identity": {"flow01": ident}}


def upsample(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask.astype(np.float32)
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------- metrics


def threshold_counts(score: np.ndarray, gt: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """[T, 4] counts (TP, FP, FN, TN) of the prediction ``score > t`` for every threshold t."""
    k = np.searchsorted(thresholds, score.ravel(), side="left")  # number of thresholds below each score
    g = gt.ravel().astype(bool)
    n_t = len(thresholds)
    # a pixel with k thresholds below its score is predicted inside for t_0..t_{k-1}
    pos_fg = np.cumsum(np.bincount(k[g], minlength=n_t + 1)[::-1])[::-1][1:]
    pos_bg = np.cumsum(np.bincount(k[~g], minlength=n_t + 1)[::-1])[::-1][1:]
    n_fg, n_bg = int(g.sum()), int((~g).sum())
    return np.stack([pos_fg, pos_bg, n_fg - pos_fg, n_bg - pos_bg], 1)


def mask_metrics(scores: list[np.ndarray], gts: list[np.ndarray], thresholds=THRESHOLDS,
                 default: float = DEFAULT_THRESHOLD) -> dict:
    """P and J (mean over images; J over images with a non-empty ground truth) at ``default`` and at the
    threshold maximising mean J over the set, plus the pixel ROC AUC of the scores pooled over the set."""
    from sklearn.metrics import roc_auc_score

    counts = np.stack([threshold_counts(s, g, thresholds) for s, g in zip(scores, gts)])  # [N, T, 4]
    tp, fp, fn, tn = (counts[..., i].astype(np.float64) for i in range(4))
    p = (tp + tn) / (tp + fp + fn + tn)
    has_fg = (tp + fn)[:, 0] > 0
    j = tp[has_fg] / np.maximum(tp + fp + fn, 1)[has_fg]
    mean_p, mean_j = p.mean(0), (j.mean(0) if has_fg.any() else np.full(len(thresholds), np.nan))
    d = int(np.argmin(np.abs(thresholds - default)))
    b = int(np.nanargmax(mean_j)) if has_fg.any() else d
    y = np.concatenate([g.ravel() for g in gts]).astype(bool)
    auc = float(roc_auc_score(y, np.concatenate([s.ravel() for s in scores]))) if 0 < y.sum() < len(y) else None
    nan_none = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return {"P": float(mean_p[d]), "J": nan_none(mean_j[d]), "threshold": float(thresholds[d]),
            "P_best": float(mean_p[b]), "J_best": nan_none(mean_j[b]), "best_threshold": float(thresholds[b]),
            "auc": auc, "n_images": len(scores), "n_images_with_fg": int(has_fg.sum())}


def correspondence_errors(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, shape1: tuple[int, int]):
    """(errors in grid cells, errors in image-1 pixels) over the valid cells; flows are normalised (x, y)."""
    h, w = valid.shape
    d = (pred - gt)[valid]
    cells = np.hypot(d[:, 0] * w, d[:, 1] * h)
    px = np.hypot(d[:, 0] * shape1[1], d[:, 1] * shape1[0])
    return cells, px


def geometry_metrics(err_cells: np.ndarray, err_px: np.ndarray) -> dict:
    if len(err_cells) == 0:
        return {"n_cells": 0}
    out = {f"acc@{k}": float(np.mean(err_cells <= k)) for k in ACCURACY_CELLS}
    out.update({"median_cells": float(np.median(err_cells)), "median_px": float(np.median(err_px)),
                "n_cells": int(len(err_cells))})
    return out


# --------------------------------------------------------------------------- evaluation


def load_pair(pf: PairFiles, size: int, grid: tuple[int, int]) -> dict:
    """Images at SIZE x SIZE, ground-truth masks [size, size] (or None), GT matches on the grid (or None)."""
    im0, im1 = read_rgb(pf.img0), read_rgb(pf.img1)
    item = {"name": pf.name, "images": [resize_rgb(im, (size, size)) for im in (im0, im1)],
            "shape1": im1.shape[:2],
            "gt_mask0": read_mask(pf.mask0, size) if pf.mask0 else None,
            "gt_mask1": read_mask(pf.mask1, size) if pf.mask1 else None, "gt_flow": None, "valid": None}
    if pf.geometry:
        match, valid = gt_matches(read_geometry(pf.geometry, im0.shape[:2]), im0.shape[:2], im1.shape[:2], grid)
        if item["gt_mask0"] is not None:  # score correspondences on the repeated region only
            valid &= cells_inside(item["gt_mask0"], grid)
        item["gt_flow"], item["valid"] = match, valid
    return item


def predict_methods(networks, item: dict) -> dict[str, dict]:
    """Every learned / training-free method's numpy predictions for one loaded pair."""
    model = networks.model
    device = next(model.backbone.parameters()).device
    feats = model.features(torch.as_tensor(np.stack(item["images"])).to(device))
    out = {}
    if networks.has_head:
        pred = run_head(model, feats[:1], feats[1:])
        out[networks.name] = {k: v[0].cpu().numpy() for k, v in pred.items()}
    out["mnn"] = mutual_nn(feats[0].cpu(), feats[1].cpu())
    return out


@torch.no_grad()
def evaluate(networks, root: str, size: int, sheet_dir: str | None = None, progress=None) -> dict:
    """Run every method on every pair of ``root``; returns the results dict (see ``summary_rows``)."""
    pairs, skipped = find_pairs(root)
    grid = (size // 16, size // 16)
    mask_data: dict[str, tuple[list, list]] = {}
    geo_data: dict[str, tuple[list, list]] = {}
    per_pair = {}
    methods_order: list[str] = []
    for n, pf in enumerate(pairs):
        try:
            item = load_pair(pf, size, grid)
        except (BadImage, ValueError) as e:
            skipped.append(str(e))
            log.warning("skipping pair %s: %s", pf.name, e)
            continue
        preds = {**predict_methods(networks, item), **trivial_methods(size, grid)}
        methods_order = list(preds)
        per_pair[pf.name] = {"has_masks": [item["gt_mask0"] is not None, item["gt_mask1"] is not None],
                             "geometry": os.path.basename(pf.geometry) if pf.geometry else None, "methods": {}}
        for name, pred in preds.items():
            row = {}
            for side in (0, 1):
                gt = item[f"gt_mask{side}"]
                if gt is not None and f"mask{side}" in pred:
                    s = upsample(pred[f"mask{side}"], size)
                    mask_data.setdefault(name, ([], []))[0].append(s)
                    mask_data[name][1].append(gt)
                    row[f"mean_mask{side}"] = float(s.mean())
            if item["gt_flow"] is not None and "flow01" in pred:
                c, px = correspondence_errors(pred["flow01"], item["gt_flow"], item["valid"], item["shape1"])
                geo_data.setdefault(name, ([], []))[0].append(c)
                geo_data[name][1].append(px)
                row.update(geometry_metrics(c, px))
            per_pair[pf.name]["methods"][name] = row
        if sheet_dir:
            write_pair_sheet(os.path.join(sheet_dir, pf.name + ".png"), item, preds, networks)
        if progress:
            progress(n + 1, len(pairs))
    if not per_pair:
        raise ValueError(f"{root}: no usable pair folders ({len(skipped)} skipped: {'; '.join(skipped[:3])})")
    summary = {}
    for name in methods_order:
        row = {}
        if name in mask_data:
            row["masks"] = mask_metrics(*mask_data[name])
        if name in geo_data:
            row["geometry"] = geometry_metrics(np.concatenate(geo_data[name][0]), np.concatenate(geo_data[name][1]))
        summary[name] = row
    return {"protocol": "pairs", "root": os.path.abspath(root), "size": size, "backbone": networks.name,
            "n_pairs": len(per_pair), "skipped": skipped, "methods": summary, "per_pair": per_pair}


SUMMARY_HEADER = ["method", "P@.5", "J@.5", "P*", "J*", "t*", "AUC", "acc@1", "acc@2", "acc@4", "med cells", "med px"]


def summary_rows(res: dict) -> list[list]:
    rows = []
    for name, row in res["methods"].items():
        m, g = row.get("masks", {}), row.get("geometry", {})
        val = lambda d, k: "-" if d.get(k) is None else d[k]  # noqa: E731
        rows.append([name, val(m, "P"), val(m, "J"), val(m, "P_best"), val(m, "J_best"), val(m, "best_threshold"),
                     val(m, "auc"), val(g, "acc@1"), val(g, "acc@2"), val(g, "acc@4"), val(g, "median_cells"),
                     val(g, "median_px")])
    return rows


def write_pair_sheet(path: str, item: dict, preds: dict, networks) -> None:
    """One PNG per pair, rows top to bottom: ground truth (if any), the model (if any), mnn.

    Each row is ``segswap-predict``'s rendering: mask tint, lines from a sample of image-0 cells above 0.5
    to their match. The ground-truth row tints the GT masks at grid resolution (image 0: only cells whose
    GT match is known when there is GT geometry) and draws GT matches (none without GT geometry).
    """
    from segswap.apps.predict import render

    size = item["images"][0].shape[0]
    grid = (size // 16, size // 16)
    rows = []
    has_gt = item["gt_mask0"] is not None or item["gt_mask1"] is not None or item["gt_flow"] is not None
    if has_gt:
        ones = np.ones(grid, bool)
        m0 = cells_inside(item["gt_mask0"], grid) if item["gt_mask0"] is not None else ones
        m1 = cells_inside(item["gt_mask1"], grid) if item["gt_mask1"] is not None else ~ones
        if item["gt_flow"] is not None:
            m0 = m0 & item["valid"]
            flow = np.nan_to_num(item["gt_flow"])
        else:
            flow = cell_centres(*grid)
        rows.append(render({"images": item["images"], "mask0": m0.astype(np.float32),
                            "mask1": m1.astype(np.float32), "flow01": flow},
                           n_corr=30 if item["gt_flow"] is not None else 0))
    names = ([networks.name] if networks.has_head else []) + ["mnn"]
    rows += [render({"images": item["images"], **{k: preds[n][k] for k in ("mask0", "mask1", "flow01")}})
             for n in names]
    write_png(path, np.concatenate(rows, 0))
