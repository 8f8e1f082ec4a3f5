"""Build the real-pair and retrieval folders of docs/evaluation.md from photos that are offline here.

    python benchmarks/build_real_pairs.py --out /tmp/realpairs

writes ``OUT/pairs/<pair>/`` (the ``segswap-eval pairs`` layout) and ``OUT/retrieval/<class>/`` (the
``segswap-eval retrieval`` layout), plus ``OUT/manifest.json`` (sources, ground truth, counts). Nothing
is written into the repository. Sources:

- Debian's ``opencv-doc`` samples (``apt-get install opencv-doc``; ``--opencv-data``, default
  /usr/share/doc/opencv-doc/examples/data): graf1/graf3 with the ground-truth homography H1to3p.xml;
  aloeL/aloeR with the Middlebury disparity aloeGT.png (0 = unknown; the builder checks the convention
  x_right = x_left - d photometrically before using it); box/box_in_scene, aero1/aero3, leuvenA/B,
  Blender_Suzanne1/2, rubberwhale1/2, basketball1/2 (no ground truth); single photos;
- scikit-image's Middlebury motorcycle stereo pair and its disparity (``skimage.data.stereo_motorcycle``);
- scikit-learn's two sample photos (china, flower).

Pairs made from one photo ("crop pairs") are two random overlapping perspective crops of it: the
homography between them is exact, and the masks are the parts of each crop seen in the other. Every
random choice comes from one root seed (``--seed``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import cv2
import numpy as np

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
VIEW_SIDE = 320          # longer side of every synthetic view (pixels)
VIEWS_PER_CLASS = 4
# natural multi-view classes: (class, opencv file names); more views are made by perspective crops
MULTI_VIEW = [("graf", ["graf1.png", "graf3.png"]), ("box", ["box.png", "box_in_scene.png"]),
              ("aloe", ["aloeL.jpg", "aloeR.jpg"]), ("aero", ["aero1.jpg", "aero3.jpg"]),
              ("leuven", ["leuvenA.jpg", "leuvenB.jpg"]), ("suzanne", ["Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg"]),
              ("rubberwhale", ["rubberwhale1.png", "rubberwhale2.png"]),
              ("basketball", ["basketball1.png", "basketball2.png"])]
SINGLE_PHOTOS = ["home.jpg", "building.jpg", "fruits.jpg", "baboon.jpg", "messi5.jpg", "butterfly.jpg",
                 "HappyFish.jpg", "squirrel_cls.jpg", "starry_night.jpg", "orange.jpg", "apple.jpg"]
CROP_PAIRS = ["china", "flower", "home", "building", "fruits", "baboon", "butterfly", "messi5"]
NO_GT_PAIRS = [("box", "box.png", "box_in_scene.png"), ("aero", "aero1.jpg", "aero3.jpg"),
               ("leuven", "leuvenA.jpg", "leuvenB.jpg")]


def read(path: str) -> np.ndarray:
    from segswap.apps.images import read_rgb

    return read_rgb(path)


def write_rgb(path: str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"{path}: cannot write")


def perspective_crop(shape: tuple[int, int], rng: np.random.Generator, side=(0.55, 0.8), jitter=0.06):
    """A random quadrilateral inside an image of ``shape`` -> (3x3 H from image to crop pixels, crop (w, h))."""
    h, w = shape
    s = rng.uniform(*side)
    cw, ch = s * w, s * h
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    quad = np.array([[x0, y0], [x0 + cw, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]])
    quad += rng.uniform(-jitter, jitter, quad.shape) * [cw, ch]
    quad = np.clip(quad, 0, [w - 1, h - 1])
    scale = VIEW_SIDE / max(cw, ch)
    out = (int(round(cw * scale)), int(round(ch * scale)))
    dst = np.array([[0, 0], [out[0] - 1, 0], [out[0] - 1, out[1] - 1], [0, out[1] - 1]], np.float64)
    return cv2.getPerspectiveTransform(quad.astype(np.float32), dst.astype(np.float32)).astype(np.float64), out


def photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild gain / offset change, so two views of one photo are not pixel-identical where they overlap."""
    gain, offset = rng.uniform(0.85, 1.15, 3), rng.uniform(-15, 15, 3)
    return np.clip(rgb.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def warp(rgb: np.ndarray, hmat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.warpPerspective(rgb, hmat, size, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def seen_in(h01: np.ndarray, size0: tuple[int, int], size1: tuple[int, int]) -> np.ndarray:
    """bool mask over image 0 (size0 = (w, h)) of the pixels whose H01-image falls inside image 1."""
    ones = np.ones((size1[1], size1[0]), np.uint8)
    return cv2.warpPerspective(ones, np.linalg.inv(h01), size0, flags=cv2.INTER_NEAREST, borderValue=0) > 0


def write_pair(folder: str, img0, img1, *, mask0=None, mask1=None, h01=None, disp=None) -> None:
    os.makedirs(folder)
    write_rgb(os.path.join(folder, "img0.png"), img0)
    write_rgb(os.path.join(folder, "img1.png"), img1)
    for name, m in (("mask0.png", mask0), ("mask1.png", mask1)):
        if m is not None:
            cv2.imwrite(os.path.join(folder, name), m.astype(np.uint8) * 255)
    if h01 is not None:
        np.savetxt(os.path.join(folder, "H01.txt"), h01)
    if disp is not None:
        np.save(os.path.join(folder, "disp01.npy"), disp.astype(np.float32))


def crop_pair(photo: np.ndarray, rng: np.random.Generator, tries: int = 100):
    """Two overlapping perspective crops with 25-75% of each seen in the other."""
    shape = photo.shape[:2]
    for _ in range(tries):
        ha, sa = perspective_crop(shape, rng)
        hb, sb = perspective_crop(shape, rng)
        h01 = hb @ np.linalg.inv(ha)
        m0, m1 = seen_in(h01, sa, sb), seen_in(np.linalg.inv(h01), sb, sa)
        if 0.25 <= m0.mean() <= 0.75 and 0.25 <= m1.mean() <= 0.75:
            return warp(photo, ha, sa), photometric(warp(photo, hb, sb), rng), h01 / h01[2, 2], m0, m1
    raise RuntimeError("no crop pair with the wanted overlap")


def read_opencv_matrix(path: str, name: str) -> np.ndarray:
    """A matrix of an OpenCV XML storage file (read with ElementTree: OpenCV 5.0's FileStorage asserts on it)."""
    import xml.etree.ElementTree as ET

    node = ET.parse(path).getroot().find(name)
    rows, cols = int(node.findtext("rows")), int(node.findtext("cols"))
    return np.array(node.findtext("data").split(), np.float64).reshape(rows, cols)


def disparity_error(left: np.ndarray, right: np.ndarray, disp: np.ndarray) -> tuple[float, float]:
    """Median |left - right(x - d)| over known pixels, and the same with d = 0 (the convention check)."""
    h, w = disp.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    known = np.isfinite(disp) & (disp > 0)
    d = np.where(known, disp, 0).astype(np.float32)
    shifted = cv2.remap(right, xs - d, ys, cv2.INTER_LINEAR)
    g = lambda im: im.astype(np.float32).mean(-1)  # noqa: E731
    inside = known & (xs - d >= 0)
    return float(np.median(np.abs(g(left) - g(shifted))[inside])), float(np.median(np.abs(g(left) - g(right))[inside]))


def build(out: str, opencv_data: str, seed: int) -> dict:
    from skimage.data import stereo_motorcycle
    from sklearn.datasets import load_sample_images

    root_seq = np.random.SeedSequence(seed)
    seqs = iter(root_seq.spawn(200))
    rng_next = lambda: np.random.default_rng(next(seqs))  # noqa: E731
    have_cv = os.path.isdir(opencv_data)
    if not have_cv:
        print(f"warning: {opencv_data} not found (apt-get install opencv-doc); building without the OpenCV samples",
              file=sys.stderr)
    cv = lambda name: read(os.path.join(opencv_data, name))  # noqa: E731
    photos = dict(zip(("china", "flower"), load_sample_images().images))
    if have_cv:
        photos.update({os.path.splitext(n)[0]: cv(n) for n in SINGLE_PHOTOS})
    manifest = {"seed": seed, "opencv_data": opencv_data if have_cv else None, "pairs": {}, "retrieval": {}}
    pairs_dir, ret_dir = os.path.join(out, "pairs"), os.path.join(out, "retrieval")

    # ---- pairs
    if have_cv:
        h13 = read_opencv_matrix(os.path.join(opencv_data, "H1to3p.xml"), "H13")
        g1, g3 = cv("graf1.png"), cv("graf3.png")
        s1, s3 = (g1.shape[1], g1.shape[0]), (g3.shape[1], g3.shape[0])
        write_pair(os.path.join(pairs_dir, "graf1-graf3"), g1, g3, h01=h13, mask0=seen_in(h13, s1, s3),
                   mask1=seen_in(np.linalg.inv(h13), s3, s1))
        manifest["pairs"]["graf1-graf3"] = "opencv graf1/graf3, H1to3p.xml homography; masks = overlap"
        aloe_l, aloe_r = cv("aloeL.jpg"), cv("aloeR.jpg")
        gt = cv2.imread(os.path.join(opencv_data, "aloeGT.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        gt[gt == 0] = np.nan
        err, err0 = disparity_error(aloe_l, aloe_r, gt)
        if err < err0:
            write_pair(os.path.join(pairs_dir, "aloe-stereo"), aloe_l, aloe_r, disp=gt)
            manifest["pairs"]["aloe-stereo"] = (f"opencv aloeL/aloeR, aloeGT.png disparity (x1 = x0 - d); median "
                                                f"grey error {err:.1f} vs {err0:.1f} unshifted")
        else:
            print(f"aloeGT.png does not fit x1 = x0 - d (error {err:.1f} vs {err0:.1f}); aloe pair left out",
                  file=sys.stderr)
        for name, a, b in NO_GT_PAIRS:
            write_pair(os.path.join(pairs_dir, name), cv(a), cv(b))
            manifest["pairs"][name] = f"opencv {a}/{b}, no ground truth (sheet only)"
    left, right, disp = stereo_motorcycle()
    err, err0 = disparity_error(left, right, disp)
    write_pair(os.path.join(pairs_dir, "motorcycle-stereo"), left, right, disp=disp)
    manifest["pairs"]["motorcycle-stereo"] = (f"skimage Middlebury motorcycle, disparity (x1 = x0 - d, inf = unknown); "
                                              f"median grey error {err:.1f} vs {err0:.1f} unshifted")
    for name in CROP_PAIRS:
        if name not in photos:
            continue
        img0, img1, h01, m0, m1 = crop_pair(photos[name], rng_next())
        write_pair(os.path.join(pairs_dir, f"{name}-crops"), img0, img1, mask0=m0, mask1=m1, h01=h01)
        manifest["pairs"][f"{name}-crops"] = (f"two perspective crops of {name}; exact homography; masks = overlap "
                                              f"({m0.mean():.0%} / {m1.mean():.0%})")

    # ---- retrieval classes: natural views first, then perspective crops of them
    classes: dict[str, list[np.ndarray]] = {}
    if have_cv:
        for cls, names in MULTI_VIEW:
            classes[cls] = [cv(n) for n in names]
    classes["motorcycle"] = [left, right]
    for name, img in photos.items():
        classes[name] = [img]
    for cls, natural in classes.items():
        folder = os.path.join(ret_dir, cls)
        os.makedirs(folder)
        rng = rng_next()
        kinds = []
        for k in range(VIEWS_PER_CLASS):
            if k < len(natural):
                img, kind = natural[k], "natural"
                s = VIEW_SIDE / max(img.shape[:2])
                img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
            else:
                src = natural[k % len(natural)]
                hmat, size = perspective_crop(src.shape[:2], rng)
                img, kind = photometric(warp(src, hmat, size), rng), "perspective crop"
            write_rgb(os.path.join(folder, f"{cls}-{k}.png"), img)
            kinds.append(kind)
        manifest["retrieval"][cls] = kinds
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; must not exist unless --force)")
    p.add_argument("--opencv-data", default=OPENCV_DATA, help=f"opencv-doc samples folder ({OPENCV_DATA})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        if not args.force:
            print(f"{args.out}: exists (use --force to replace it)", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = build(tmp, args.opencv_data, args.seed)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, args.out)
    for name, what in manifest["pairs"].items():
        print(f"pair {name}: {what}")
    n = sum(len(v) for v in manifest["retrieval"].values())
    print(f"retrieval: {len(manifest['retrieval'])} classes, {n} images "
          f"({', '.join(f'{k} {len(v)}' for k, v in manifest['retrieval'].items())})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
