"""Which frozen features find the true match? Nearest-neighbour accuracy of each backbone on real pairs
with ground-truth geometry and on generator pairs.

For every cell of image 0 whose true match lies inside image 1 (real pairs) or inside the pasted object
(generator pairs, from the stored flow), the cell of image 1 with the highest cosine similarity is
compared with the true match: a hit when it is at most one cell away (Chebyshev). Images are resized to
``--size`` squares, so the grid is ``size / 16`` cells a side; chance is the share of image-1 cells within
one cell of a random target.

Real pairs, from what is offline here: graf1 -> graf3 with the ground-truth homography ``H1to3p.xml``
(Debian opencv-doc), the Middlebury motorcycle stereo pair with its disparity (scikit-image). Generator
pairs: any shards (``--shards``), e.g. ``segswap-gen --out /tmp/bb --num-shards 1 --pairs-per-shard 32
--style none --workers 0``.

    python benchmarks/bench_backbones.py --shards /tmp/bb
"""
from __future__ import annotations

import argparse
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segswap.nets.backbones import build_backbone
from segswap.nets.vgg16 import CONV_LAYERS, hed_weights_path
from segswap.shards.reader import iter_pairs

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"


def real_pairs(size: int):
    """(name, img0, img1, target [g,g,2] normalised xy of each image-0 cell's match or NaN)."""
    g = size // 16
    centres = (np.stack(np.meshgrid(np.arange(g) + 0.5, np.arange(g) + 0.5), -1) / g).reshape(-1, 2)
    out = []
    if os.path.isfile(os.path.join(OPENCV_DATA, "graf1.png")):
        a = cv2.cvtColor(cv2.imread(os.path.join(OPENCV_DATA, "graf1.png")), cv2.COLOR_BGR2RGB)
        b = cv2.cvtColor(cv2.imread(os.path.join(OPENCV_DATA, "graf3.png")), cv2.COLOR_BGR2RGB)
        fs = cv2.FileStorage(os.path.join(OPENCV_DATA, "H1to3p.xml"), cv2.FILE_STORAGE_READ)  # keep it open while read
        H = fs.getFirstTopLevelNode().mat()
        fs.release()
        pa = centres * [a.shape[1], a.shape[0]]
        pb = cv2.perspectiveTransform(pa[None].astype(np.float64), H)[0] / [b.shape[1], b.shape[0]]
        out.append(("graf1-graf3", a, b, pb))
    from skimage import data
    left, right, disp = data.stereo_motorcycle()
    pa = centres * [left.shape[1], left.shape[0]]
    d = disp[np.clip(pa[:, 1].astype(int), 0, disp.shape[0] - 1), np.clip(pa[:, 0].astype(int), 0, disp.shape[1] - 1)]
    pb = np.stack([(pa[:, 0] - d) / left.shape[1], pa[:, 1] / left.shape[0]], -1)
    pb[~np.isfinite(d)] = np.nan
    out.append(("motorcycle-stereo", left, right, pb))
    res = []
    for name, a, b, pb in out:
        pb = pb.copy()
        pb[~np.all((pb >= 0) & (pb < 1), axis=1)] = np.nan
        res.append((name, cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA),
                    cv2.resize(b, (size, size), interpolation=cv2.INTER_AREA), pb))
    return res


def generator_pairs(urls: str, size: int, limit: int, stylised: bool = False):
    from segswap.train.groundtruth import grid_mask, sample_flow_at_centres
    g = size // 16
    res = []
    for pair in iter_pairs(urls):
        m = grid_mask(cv2.resize(pair.mask0, (size, size), interpolation=cv2.INTER_AREA), g, g).reshape(-1)
        pb = sample_flow_at_centres(pair.flow01, g, g).reshape(-1, 2).astype(np.float64)
        pb[m < 0.5] = np.nan
        a, b = (pair.sty0, pair.sty1) if stylised and pair.sty0 is not None else (pair.img0, pair.img1)
        res.append((pair.key, cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA),
                    cv2.resize(b, (size, size), interpolation=cv2.INTER_AREA), pb))
        if len(res) >= limit:
            break
    return res


class VGGLayers:
    """The HED VGG16 read out at several layers on the stride-16 grid (pool4 = conv4_3 max-pooled: the default; conv4_3 average-pooled; conv5_3)."""

    def __init__(self):
        self.net = build_backbone("vgg16")
        import h5py
        with h5py.File(hed_weights_path(), "r") as f:
            self.conv5 = [(torch.from_numpy(np.asarray(f[f"block5/layers/conv2d{'' if k == 0 else f'_{k}'}/vars/0"])
                                            .transpose(3, 2, 0, 1).copy()),
                           torch.from_numpy(np.asarray(f[f"block5/layers/conv2d{'' if k == 0 else f'_{k}'}/vars/1"])))
                          for k in range(3)]

    @torch.no_grad()
    def __call__(self, img):
        x, block = self.net.normalise(img), 1
        for (b, _, _, _), conv in zip(CONV_LAYERS, self.net.convs):
            if b != block:
                x, block = F.max_pool2d(x, 2, 2, ceil_mode=True), b
            x = F.relu(conv(x))
        c5 = F.max_pool2d(x, 2, 2, ceil_mode=True)
        for w, bias in self.conv5:
            c5 = F.relu(F.conv2d(c5, w, bias, padding=1))
        return {"vgg16 conv4_3 avg-pool": F.avg_pool2d(x, 2, 2, ceil_mode=True),
                "vgg16 pool4 (default)": F.max_pool2d(x, 2, 2, ceil_mode=True), "vgg16 conv5_3": c5}


def nn_accuracy(f0: torch.Tensor, f1: torch.Tensor, target: np.ndarray) -> tuple[int, int, float]:
    """hits, cells evaluated, chance; f: [C,g,g]."""
    g = f0.shape[-1]
    a = F.normalize(f0.reshape(f0.shape[0], -1), dim=0)
    b = F.normalize(f1.reshape(f1.shape[0], -1), dim=0)
    nn_idx = (a.T @ b).argmax(1).numpy()
    ok = np.isfinite(target[:, 0])
    tgt = np.floor(target[ok] * g).astype(int)
    pred = np.stack([nn_idx[ok] % g, nn_idx[ok] // g], -1)
    hits = int((np.abs(pred - tgt).max(1) <= 1).sum())
    chance = float(np.mean([(min(t[0] + 1, g - 1) - max(t[0] - 1, 0) + 1) * (min(t[1] + 1, g - 1) - max(t[1] - 1, 0) + 1)
                            for t in tgt]) / g ** 2) if len(tgt) else 0.0
    return hits, int(ok.sum()), chance


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="generator shards (optional)")
    p.add_argument("--pairs", type=int, default=32, help="generator pairs used (32)")
    p.add_argument("--size", type=int, default=480)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    sets = {"real": real_pairs(args.size)}
    if args.shards:
        sets["generator"] = generator_pairs(args.shards, args.size, args.pairs)
        sets["gen-styled"] = generator_pairs(args.shards, args.size, args.pairs, stylised=True)
    vgg = VGGLayers()
    resnet = build_backbone("resnet50")  # random: the no-weights default
    from segswap.nets.dense_features import build_feature_extractor
    colour = build_feature_extractor("colour")

    def all_features(img):
        out = vgg(img)
        out["resnet50 conv4, random weights"] = resnet(resnet.normalise(img))
        out["colour histograms (weight-free)"] = torch.from_numpy(colour(img)).permute(2, 0, 1)[None]
        return {k: v[0] for k, v in out.items()}

    table = {}
    for set_name, pairs in sets.items():
        for name, a, b, target in pairs:
            fa, fb = all_features(a), all_features(b)
            for feat in fa:
                h, n, c = nn_accuracy(fa[feat], fb[feat], target)
                row = table.setdefault((set_name, feat), [0, 0, 0.0, 0])
                row[0] += h
                row[1] += n
                row[2] += c * n
                row[3] += 1
            if set_name == "real":
                print(f"  {name}: " + ", ".join(f"{k.split(',')[0]} {nn_accuracy(fa[k], fb[k], target)[0] / max(1, nn_accuracy(fa[k], fb[k], target)[1]):.3f}"
                                                for k in fa))
    print(f"\nnearest neighbour within one cell of the true match, {args.size} px ({args.size // 16} cells a side)")
    print(f"{'set':10s} {'features':36s} {'accuracy':>9s} {'chance':>7s} {'cells':>6s} {'pairs':>5s}")
    for (set_name, feat), (h, n, c, k) in table.items():
        print(f"{set_name:10s} {feat:36s} {h / max(n, 1):9.3f} {c / max(n, 1):7.3f} {n:6d} {k:5d}")


if __name__ == "__main__":
    main()
