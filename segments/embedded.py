"""The embedded demo corpus: scikit-image's bundled sample photos, written once as PNG files.

scikit-image's wheel ships a handful of real photographs (no download needed); they make a corpus
that lets ``segswap-gen`` run end to end on a fresh machine with no data. Only the functions whose
files are inside the wheel are used: the ones that need ``pooch`` (a download) are never called.

- :func:`embedded_images`: photos with objects worth segmenting (astronaut, camera man, cat, coffee
  cup, coins, rocket, clock, moon, ...), RGB.
- :func:`embedded_backgrounds`: texture photos (brick, grass, gravel) as extra backgrounds.
- :func:`embedded_coco`: a COCO instances json of demo segments for those photos, so the renderer
  has something to paste before any real segment source is set up. The segments are regions of a
  Felzenszwalb graph segmentation (scikit-image) covering 2-35% of the photo, at most
  :data:`MAX_SEGMENTS_PER_IMAGE` per photo, all in one category ("segment"): colour-coherent blobs,
  not objects. Use COCO annotations or ``--segments unsupervised`` for real training data.

Files are written to ``dest_dir`` through a temporary name and ``os.replace`` and reused when present,
so concurrent workers and reruns agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segswap.core.atomic import atomic_open, atomic_write

# skimage.data function names whose image files ship inside the scikit-image wheel.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "clock", "moon", "page", "text",
          "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "cell")
TEXTURES = ("brick", "grass", "gravel")

# Demo segmentation (embedded_coco): Felzenszwalb on the photo shrunk to SEGMENT_SIDE px.
SEGMENT_SIDE = 256
FELZENSZWALB = {"scale": 400, "sigma": 0.8}
MIN_FRACTION, MAX_FRACTION = 0.02, 0.35
MAX_SEGMENTS_PER_IMAGE = 8


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def _write(names, dest_dir) -> list[Path]:
    from skimage import data

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = dest / f"{name}.png"
        if not path.is_file():
            rgb = _as_rgb(np.asarray(getattr(data, name)()))
            with atomic_open(path, "wb") as f:
                Image.fromarray(rgb).save(f, format="PNG", compress_level=1)
        paths.append(path)
    return paths


def embedded_images(dest_dir) -> list[Path]:
    """Write (once) and return the sample photos as RGB PNG files in ``dest_dir``."""
    return _write(PHOTOS, dest_dir)


def embedded_backgrounds(dest_dir) -> list[Path]:
    """Write (once) and return the texture photos as RGB PNG files in ``dest_dir``."""
    return _write(TEXTURES, dest_dir)


def embedded_coco(dest_dir) -> Path:
    """Write (once) the photos and ``dest_dir/embedded_segments.json``; return the json's path."""
    import json

    import cv2
    from pycocotools import mask as mask_utils
    from skimage.segmentation import felzenszwalb

    from segswap.core.images import load_rgb

    dest = Path(dest_dir)
    out = dest / "embedded_segments.json"
    paths = embedded_images(dest)
    if out.is_file():
        return out
    images, annotations = [], []
    for iid, path in enumerate(paths, start=1):
        rgb = load_rgb(path)
        h, w = rgb.shape[:2]
        images.append({"id": iid, "file_name": path.name, "width": w, "height": h})
        s = SEGMENT_SIDE / max(h, w)
        small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        labels = felzenszwalb(small, min_size=int(0.01 * small.shape[0] * small.shape[1]), **FELZENSZWALB)
        areas = np.bincount(labels.ravel()) / labels.size
        keep = [i for i in np.argsort(-areas) if MIN_FRACTION < areas[i] < MAX_FRACTION][:MAX_SEGMENTS_PER_IMAGE]
        for lab in sorted(keep):
            m = cv2.resize((labels == lab).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            rle = mask_utils.encode(np.asfortranarray(m))
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": 1, "iscrowd": 0,
                                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                                "area": float(mask_utils.area(rle)),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "score": 1.0})
    data = {"info": {"description": "segswap embedded demo segments (Felzenszwalb regions of scikit-image "
                                    "sample photos)", "felzenszwalb": FELZENSZWALB, "segment_side": SEGMENT_SIDE},
            "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "segment"}]}
    atomic_write(out, json.dumps(data))
    return out
