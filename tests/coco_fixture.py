"""A tiny COCO instances dataset written with real pycocotools encodings, for tests.

``write_coco_fixture(root)`` draws small textured photos with discs, boxes and triangles on them,
and writes ``root/instances.json`` whose annotations are those shapes, encoded every way COCO
files encode masks (polygons, compressed RLE, uncompressed RLE) plus, with ``bad_entries=True``,
one of each kind of broken entry the reader must count and skip. The returned
:class:`CocoFixture` says how many of each it wrote, so tests can check the counters exactly.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "box"}, {"id": 3, "name": "triangle"}]


@dataclass
class CocoFixture:
    json_path: Path
    images_dir: Path
    n_images: int                      # usable images (file present, entry well formed)
    n_segments: int                    # usable segments
    skipped: Counter = field(default_factory=Counter)  # reason -> count the reader must report
    image_files: list[Path] = field(default_factory=list)
    background_files: list[Path] = field(default_factory=list)  # photos without annotations


def _smooth_texture(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    """Smooth random colour field: low-frequency detail, so bilinear sampling errors stay small."""
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[float]:
    if kind == "disc":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    elif kind == "box":
        pts = np.array([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    else:
        pts = np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    return [round(float(v), 2) for v in pts.reshape(-1)]


def write_coco_fixture(root, *, n_images: int = 6, width: int = 128, height: int = 96, seed: int = 0,
                       bad_entries: bool = True, image_ext: str = ".jpg", n_backgrounds: int = 3) -> CocoFixture:
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, files = [], [], []
    ann_id = 1
    encodings = ("polygon", "rle", "uncompressed")
    for i in range(n_images):
        iid = 100 + i
        name = f"img_{i:03d}{image_ext}"
        img = _smooth_texture(rng, height, width)
        # Two or three objects of different categories, in separate thirds of the image so their
        # dilated masks rarely touch.
        kinds = rng.permutation([c["name"] for c in CATEGORIES])[: 2 + i % 2]
        slots = rng.permutation(3)
        for k, kind in enumerate(kinds):
            cat = next(c["id"] for c in CATEGORIES if c["name"] == kind)
            r = rng.uniform(0.12, 0.16) * min(width, height) * 1.2
            cx = (slots[k] + 0.5) * width / 3 + rng.uniform(-3, 3)
            cy = rng.uniform(r + 2, height - r - 2)
            poly = _shape_polygon(kind, cx, cy, r)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
            with warnings.catch_warnings():  # pycocotools' np.array(copy=False) under numpy 2
                warnings.simplefilter("ignore", DeprecationWarning)
                m = mask_utils.decode(rle).astype(bool)
            img[m] = _smooth_texture(rng, height, width, cells=4)[m]
            enc = encodings[(i + k) % 3]
            if enc == "polygon":
                segm = [poly]
            elif enc == "rle":
                segm = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            else:  # uncompressed RLE as COCO stores crowd masks: column-major run lengths
                flat = m.reshape(-1, order="F").astype(np.int8)
                change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                counts = np.diff(np.concatenate([[0], change])).tolist()
                segm = {"size": [height, width], "counts": counts}
            annotations.append({"id": ann_id, "image_id": iid, "category_id": cat, "segmentation": segm,
                                "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                "iscrowd": 0})
            ann_id += 1
        path = images_dir / name
        cv2.imwrite(str(path), np.ascontiguousarray(img.astype(np.uint8)[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 97])
        files.append(path)
        images.append({"id": iid, "file_name": name, "width": width, "height": height})
    n_good = len(annotations)
    skipped: Counter = Counter()
    if bad_entries:
        first = images[0]["id"]
        square = _shape_polygon("box", width / 2, height / 2, 10)
        bad = [
            ("unknown_image", {"image_id": 99999, "category_id": 1, "segmentation": [square]}),
            ("empty_segmentation", {"image_id": first, "category_id": 1, "segmentation": []}),
            ("empty_segmentation", {"image_id": first, "category_id": 1, "segmentation": [[1.0, 2.0, 3.0, 4.0]]}),
            ("out_of_bounds", {"image_id": first, "category_id": 2,
                               "segmentation": [[10.0, 10.0, width + 40.0, 10.0, width + 40.0, 30.0]]}),
            ("out_of_bounds", {"image_id": first, "category_id": 2,
                               "segmentation": {"size": [height + 1, width], "counts": [height * width + width]}}),
            ("crowd", {"image_id": first, "category_id": 1, "iscrowd": 1,
                       "segmentation": {"size": [height, width], "counts": [5, 20, height * width - 25]}}),
            ("malformed_annotation", {"image_id": first, "segmentation": [square]}),  # no category_id
            ("malformed_annotation", {"image_id": first, "category_id": 1,
                                      "segmentation": {"size": [height, width], "counts": "not an rle!!"}}),
            ("malformed_annotation", {"image_id": first, "category_id": 1,
                                      "segmentation": {"size": [height, width], "counts": [3, 4]}}),
        ]
        for reason, ann in bad:
            ann = {"id": ann_id, "iscrowd": 0, **ann}
            annotations.append(ann)
            skipped[reason] += 1
            ann_id += 1
        # An image whose file is missing, with one annotation that therefore has no image.
        images.append({"id": 900, "file_name": "missing.jpg", "width": width, "height": height})
        skipped["missing_image_file"] += 1
        annotations.append({"id": ann_id, "image_id": 900, "category_id": 1, "segmentation": [square], "iscrowd": 0})
        skipped["unknown_image"] += 1
        ann_id += 1
        images.append({"id": 901, "file_name": 7, "width": width, "height": height})
        skipped["malformed_image"] += 1
    backgrounds = []
    (root / "backgrounds").mkdir(exist_ok=True)
    for i in range(n_backgrounds):
        path = root / "backgrounds" / f"bg_{i:03d}.png"
        cv2.imwrite(str(path), _smooth_texture(rng, height, width, cells=8).astype(np.uint8)[:, :, ::-1])
        backgrounds.append(path)
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES,
            "info": {"description": "segswap test fixture"}}
    json_path = root / "instances.json"
    json_path.write_text(json.dumps(data))
    return CocoFixture(json_path=json_path, images_dir=images_dir, n_images=n_images, n_segments=n_good,
                       skipped=skipped, image_files=files, background_files=backgrounds)
