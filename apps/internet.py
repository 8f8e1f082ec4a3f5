"""Co-segmentation on the Internet dataset (Rubinstein et al. 2013; paper Table 4), or any folder of
images with ground-truth masks.

Layout (the official one, as SegSwap's download script leaves it)::

    ROOT/Airplane100/*.jpg   ROOT/Airplane100/GroundTruth/*.png
    ROOT/Car100/...          ROOT/Horse100/...

Every subfolder of ROOT holding images is a class; if ROOT itself holds images it is the only class.
The mask of ``x.jpg`` is ``GroundTruth/x.png`` (any image extension; non-zero = foreground). Images
without a mask are still used to build the graph (they help the others) but are left out of the scores
and counted. Per class: predictions over the class's images at 480x480 (30x30 grid), graph from each
image's top-5 images (Eq. 3), first eigenvector, potentials, GrabCut, then precision P (pixel accuracy)
and Jaccard J (IoU; images with an empty mask left out), averaged over the class's images.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from segswap.apps.collection import Collection, usable_images
from segswap.apps.coseg import foreground_potentials, grabcut_mask
from segswap.apps.discover import collection_graph
from segswap.apps.images import IMAGE_EXTENSIONS, BadImage, list_images, read_rgb
from segswap.apps.metrics import precision_jaccard
from segswap.apps.spectral import first_eigenvector

log = logging.getLogger(__name__)

DEFAULT_SIZE = 480
DEFAULT_THRESHOLD = 0.85  # the official conf_th
DEFAULT_SIGMA = 1.0       # grid cells; the official per-class values are Car 5.0, Airplane 0.8, Horse 1.2


def find_classes(root: str, masks_dir: str = "GroundTruth") -> dict[str, str]:
    """{class name: folder} following the layout in the module docstring."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != masks_dir)
    classes = {d: os.path.join(root, d) for d in subs if list_images(os.path.join(root, d))}
    if list_images(root):
        classes = {os.path.basename(os.path.normpath(root)): root}
    if not classes:
        raise FileNotFoundError(f"{root}: no images, and no subfolders with images")
    return classes


def find_mask(folder: str, image: str, masks_dir: str) -> str | None:
    stem = os.path.splitext(image)[0]
    for ext in (".png", *IMAGE_EXTENSIONS):
        p = os.path.join(folder, masks_dir, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def evaluate_class(model, folder: str, cache, workdir: str, *, size: int = DEFAULT_SIZE, top_k: int = 5,
                   threshold: float = DEFAULT_THRESHOLD, sigma: float = DEFAULT_SIGMA, min_weight: float = 0.01,
                   masks_dir: str = "GroundTruth", batch_size: int = 16, save_masks: str | None = None) -> dict:
    good, bad = usable_images(cache, [os.path.join(folder, n) for n in list_images(folder)], (size, size))
    for msg in bad:
        log.warning("skipped: %s", msg)
    names = [os.path.basename(p) for p in good]
    paths = good
    coll = Collection(model, paths, (size, size), workdir, cache, batch_size=batch_size)
    verts, adj, preds, stats = collection_graph(coll, top_k=top_k, threshold=threshold, sigma=sigma,
                                                min_weight=min_weight)
    eig = first_eigenvector(adj) if len(verts) else np.zeros(0)
    pots = foreground_potentials(verts, eig, len(paths), preds.grid)
    ps, js, skipped = [], [], {"no_mask": 0, "bad_mask": 0, "empty_mask_for_J": 0, "bad_image": len(bad)}
    for i, name in enumerate(names):
        mpath = find_mask(folder, name, masks_dir)
        img = read_rgb(paths[i])
        pred = grabcut_mask(img, pots[i])
        if save_masks:
            import cv2

            os.makedirs(save_masks, exist_ok=True)
            cv2.imwrite(os.path.join(save_masks, os.path.splitext(name)[0] + ".png"), pred.astype(np.uint8) * 255)
        if mpath is None:
            skipped["no_mask"] += 1
            continue
        try:
            gt = read_rgb(mpath).max(2) > 0
        except BadImage as e:
            log.warning("%s", e)
            skipped["bad_mask"] += 1
            continue
        if gt.shape != pred.shape:
            log.warning("%s: mask is %s but image is %s; skipped", mpath, gt.shape, pred.shape)
            skipped["bad_mask"] += 1
            continue
        p, j = precision_jaccard(pred, gt)
        ps.append(p)
        if j is None:
            skipped["empty_mask_for_J"] += 1
        else:
            js.append(j)
    return {"P": float(np.mean(ps)) if ps else float("nan"), "J": float(np.mean(js)) if js else float("nan"),
            "n_images": len(names), "n_scored": len(ps), "skipped": skipped, "graph": stats}
