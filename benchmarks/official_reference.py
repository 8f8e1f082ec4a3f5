"""A re-creation of the official SegSwap generator's CPU steps, as the yardstick of ``bench_gen.py``.

Written from the description in DESIGN.md (the official one-object generator), not from its code, and
only for timing: per pasted segment

1. the segment's mask (decoded from its RLE, as pycocotools' ``annToMask``),
2. dilated by 20 iterations of a 3x3 kernel (the official context),
3. the source image and mask resized to size x size, the background too,
4. independent x/y scale U[0.7, 1] (a resize), rotation U[-15, 15] degrees (``warpAffine`` on a
   canvas large enough for the rotated box), crop to the mask's bounding box, the fit rescale by a
   ratio from linspace(r_min, 1, 10) with p ∝ exp(-i/10) (a resize), a uniform translation,
5. one ``cv2.seamlessClone(NORMAL_CLONE)`` of the whole size x size images,

then both images written as JPEG files at segswap's quality (95), so the encode cost compares like with
like. No ground truth beyond the masks, no PNG, no flows: the official code computes its grid-resolution
targets in the data loader. Given the same decoded images and segments as segswap's renderer (the
benchmark passes them in), the difference in CPU time is the work segswap does that the official code
does not.
"""
from __future__ import annotations

import math
import os

import cv2
import numpy as np

DILATION_ITERATIONS = 20
JPEG_QUALITY = 95


def _fit_ratio(rng: np.random.Generator, r_min: float) -> float:
    prob = np.exp(-np.arange(10) / 10.0)
    return float(np.linspace(r_min, 1.0, 10)[rng.choice(10, p=prob / prob.sum())])


def _transform(rng, image: np.ndarray, mask: np.ndarray, cell, r_min: float, params: dict | None):
    """Scale, rotate, crop and fit one image + mask; returns (patch, patch mask, top-left in the cell).
    ``params`` (segswap's per-segment json: scale_x, scale_y, rotation_deg, fit_ratio, translation)
    replaces the random draws, so both generators paste the same sizes."""
    h, w = mask.shape
    sx, sy = (params["scale_x"], params["scale_y"]) if params else rng.uniform(0.7, 1.0, size=2)
    size = (max(1, round(w * sx)), max(1, round(h * sy)))
    image, mask = cv2.resize(image, size), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    angle = params["rotation_deg"] if params else float(rng.uniform(-15, 15))
    h, w = mask.shape
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    bw, bh = int(w * c + h * s) + 1, int(w * s + h * c) + 1
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    rot[:, 2] += (bw - w) / 2, (bh - h) / 2
    image = cv2.warpAffine(image, rot, (bw, bh))
    mask = cv2.warpAffine(mask, rot, (bw, bh), flags=cv2.INTER_NEAREST)
    x, y, bw, bh = cv2.boundingRect(mask)
    image, mask = image[y:y + bh, x:x + bw], mask[y:y + bh, x:x + bw]
    cx0, cy0, cx1, cy1 = cell
    fit = min((cx1 - cx0) / bw, (cy1 - cy0) / bh) * (params["fit_ratio"] if params else _fit_ratio(rng, r_min))
    size = (max(1, int(bw * fit)), max(1, int(bh * fit)))
    image, mask = cv2.resize(image, size), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if params:
        tx, ty = (int(v) for v in params["translation"])
    else:
        tx = int(rng.uniform(cx0, max(cx1 - size[0], cx0)))
        ty = int(rng.uniform(cy0, max(cy1 - size[1], cy0)))
    return image, mask, (tx, ty)


def reference_pair(rng: np.random.Generator, source: np.ndarray, background: np.ndarray, masks: list[np.ndarray],
                   out_dir: str, key: str, size: int = 480, cells=None, params=None) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``masks`` (full-resolution uint8 masks of ``source``) into ``background``; writes
    ``out_dir/key.{0,1}.jpg`` and returns (image 0, image 1). ``cells``: one layout cell per mask
    (default: the whole image, fit ratios from 0.2; with several cells, from 0.5); ``params``: one
    dict of transform parameters per mask instead of random draws (see ``_transform``)."""
    cells = cells or [(0, 0, size, size)] * len(masks)
    params = params or [None] * len(masks)
    r_min = 0.2 if len(masks) == 1 else 0.5
    img0 = cv2.resize(source, (size, size))
    img1 = cv2.resize(background, (size, size))
    kernel = np.ones((3, 3), np.uint8)
    for mask, cell, par in zip(masks, cells, params):
        small = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        context = cv2.dilate(small, kernel, iterations=DILATION_ITERATIONS)
        patch, patch_mask, (tx, ty) = _transform(rng, img0, context, cell, r_min, par)
        ph, pw = patch_mask.shape
        ph, pw = min(ph, size - ty), min(pw, size - tx)
        src = np.zeros_like(img1)
        full_mask = np.zeros((size, size), np.uint8)
        src[ty:ty + ph, tx:tx + pw] = patch[:ph, :pw]
        full_mask[ty:ty + ph, tx:tx + pw] = patch_mask[:ph, :pw] * 255
        full_mask[[0, -1]] = 0  # seamlessClone needs the mask off the image border
        full_mask[:, [0, -1]] = 0
        x, y, w, h = cv2.boundingRect(full_mask)
        if w == 0 or h == 0:
            continue
        img1 = cv2.seamlessClone(src, img1, full_mask, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
    for i, image in enumerate((img0, img1)):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        with open(os.path.join(out_dir, f"{key}.{i}.jpg"), "wb") as f:
            f.write(buf.tobytes())
    return img0, img1
