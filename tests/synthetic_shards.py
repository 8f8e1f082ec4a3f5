"""Tiny, valid shards made from synthetic pairs, so trainer tests do not depend on the generator.

Each pair shows the same textured square in both images, on two different textured backgrounds, at
two different positions (a pure translation). Masks and flows are therefore exact:

- ``mask0``/``mask1`` are the square in image 0/1;
- a flow cell of image 0 whose centre pixel lies in the square maps to the same point shifted by the
  translation, and vice versa; every other flow cell is NaN.

Optional ``sty0``/``sty1`` are colour-remapped versions of the images (a cheap stand-in for a
styliser) so the loader's stylised-or-plain choice is exercised. ``corrupt`` writes samples whose
image bytes are not a JPEG, for the skip-and-count path.

Usage in a test::

    from synthetic_shards import write_synthetic_shards  # tests/ is on sys.path under pytest
    urls = write_synthetic_shards(tmp_path / "shards", n_shards=2, pairs_per_shard=8, size=128)
    # urls == "<dir>/train-{000000..000001}.tar"
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from segswap.shards.format import (
    DEFAULT_FLOW_STRIDE,
    FORMAT_VERSION,
    SHARD_PATTERN,
    Pair,
    encode_sample,
    sample_key,
)
from segswap.shards.writer import ShardWriter


def _texture(rng: np.random.Generator, size: int, coarse: int, contrast: float) -> np.ndarray:
    """Smooth random colour texture: coarse noise upsampled, plus a little fine noise."""
    low = rng.uniform(0, 255, size=(coarse, coarse, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img = 128 + contrast * (img - 128) + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _square_flow(size: int, g: int, top: int, left: int, side: int, dy: int, dx: int) -> np.ndarray:
    """flow of the image holding the square at (top, left): cells whose centre pixel is inside map by (dx, dy)."""
    n = size // g
    flow = np.full((n, n, 2), np.nan, np.float32)
    centre_px = np.arange(n) * g + g // 2  # the pixel that holds each flow cell's centre
    rows = (centre_px >= top) & (centre_px < top + side)
    cols = (centre_px >= left) & (centre_px < left + side)
    inside = rows[:, None] & cols[None, :]
    xs = ((np.arange(n) + 0.5) * g + dx) / size
    ys = ((np.arange(n) + 0.5) * g + dy) / size
    flow[..., 0] = np.where(inside, xs[None, :], np.nan)
    flow[..., 1] = np.where(inside, ys[:, None], np.nan)
    return flow


def _stylise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A cheap, visibly different rendering of the same content: per-channel gain/offset and a channel swap."""
    gain = rng.uniform(0.6, 1.2, size=3)
    offset = rng.uniform(-30, 30, size=3)
    out = img.astype(np.float32)[:, :, rng.permutation(3)] * gain + offset
    return np.clip(out, 0, 255).astype(np.uint8)


def make_pair(rng: np.random.Generator, key: str, size: int = 128, min_side: int | None = None,
              max_side: int | None = None, flow_stride: int = DEFAULT_FLOW_STRIDE,
              stylised: bool = True) -> Pair:
    """One synthetic pair of ``size`` x ``size`` images (``size`` a multiple of 16)."""
    if size % 16:
        raise ValueError(f"size {size} must be a multiple of 16")
    # At least 9 stride-16 cells (the format's minimum), at most about half the image width.
    min_side = min_side or 48
    max_side = max_side or max(min_side, size // 2 + 8)
    side = int(rng.integers(min_side, max_side + 1))
    top0, left0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    top1, left1 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    dy, dx = top1 - top0, left1 - left0

    bg0 = _texture(rng, size, coarse=int(rng.integers(3, 8)), contrast=0.6)
    bg1 = _texture(rng, size, coarse=int(rng.integers(3, 8)), contrast=0.6)
    patch = _texture(rng, side, coarse=int(rng.integers(3, 6)), contrast=1.4)
    img0, img1 = bg0.copy(), bg1.copy()
    img0[top0:top0 + side, left0:left0 + side] = patch
    img1[top1:top1 + side, left1:left1 + side] = patch
    mask0 = np.zeros((size, size), np.uint8)
    mask1 = np.zeros((size, size), np.uint8)
    mask0[top0:top0 + side, left0:left0 + side] = 255
    mask1[top1:top1 + side, left1:left1 + side] = 255
    flow01 = _square_flow(size, flow_stride, top0, left0, side, dy, dx)
    flow10 = _square_flow(size, flow_stride, top1, left1, side, -dy, -dx)
    sty0 = _stylise(img0, rng) if stylised else None
    sty1 = _stylise(img1, rng) if stylised else None
    meta = {
        "format_version": FORMAT_VERSION, "key": key, "size": [size, size], "flow_stride": flow_stride,
        "seed": None, "kind": "synthetic-square",
        "source": {"file": "synthetic", "id": 0}, "background": {"file": "synthetic", "id": 1},
        "segments": [{"id": 0, "category": "square", "area": side * side,
                      "translation": [dx, dy], "side": side}],
        "blend": {"method": "paste"},
        "style": [{"styliser": "channel-remap"}, {"styliser": "channel-remap"}] if stylised else [None, None],
    }
    return Pair(key=key, img0=img0, img1=img1, mask0=mask0, mask1=mask1, flow01=flow01.astype(np.float16),
                flow10=flow10.astype(np.float16), meta=meta, sty0=sty0, sty1=sty1)


def write_synthetic_shards(out_dir: str | os.PathLike, n_shards: int = 2, pairs_per_shard: int = 8,
                           size: int = 128, seed: int = 0, stylised: bool = True,
                           corrupt: tuple[str, ...] = (), first_shard: int = 0) -> str:
    """Write ``n_shards`` shards to ``out_dir``; returns the brace URL naming all of them.

    ``corrupt`` lists sample keys (``"000000-000003"``) whose ``img0.jpg`` is replaced by bytes that
    are not an image; the sample is otherwise complete, as a truncated upload would leave it.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    root = np.random.SeedSequence(seed)
    for s, child in enumerate(root.spawn(first_shard + n_shards)[first_shard:], start=first_shard):
        rng = np.random.default_rng(child)
        with ShardWriter(os.path.join(out_dir, SHARD_PATTERN % s)) as writer:
            for i in range(pairs_per_shard):
                key = sample_key(s, i)
                sample = encode_sample(make_pair(rng, key, size=size, stylised=stylised))
                if key in corrupt:
                    sample["img0.jpg"] = b"this is not a jpeg"
                writer.write(sample)
    last = first_shard + n_shards - 1
    if n_shards == 1:
        return os.path.join(out_dir, SHARD_PATTERN % first_shard)
    return os.path.join(out_dir, "train-{%06d..%06d}.tar" % (first_shard, last))
