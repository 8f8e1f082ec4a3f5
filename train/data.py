"""Streaming training pairs from shards: decode, augment, and derive the exact feature-grid ground truth.

``ShardStream`` is an ``IterableDataset`` over WebDataset shards (local paths, brace lists, ``pipe:``
URLs, ``::``-joined lists). Training streams are *resampled*: each DataLoader worker of each rank draws
shards with replacement from its own seeded generator and mixes samples through a shuffle buffer, so
the stream never ends and epochs are not a concept. Validation streams read every shard once, in
order, split across ranks and workers, without augmentation.

Ground truth at the feature grid (``image_size / stride`` cells per side), from the stored full
resolution fields (see ``shards/format.py``):

- soft mask of a cell = mean of the full-resolution mask over the cell (area resampling);
- correspondence of a cell = the stored flow interpolated bilinearly at the cell centre, using only
  defined (finite) neighbours; undefined where none is;
- correspondence weight = soft mask x defined (the loss's ``W`` in Eq. 2).

Augmentations (the official loader's, each an independent draw from the item's generator):

- per image, the stylised rendering instead of the plain one with ``p_style`` (when the shard has one);
- thin-plate-spline warp of image 1 with ``p_tps`` (control grid 4x4 or 6x6, each point moved by up to
  ``tps_move / (2 * grid)`` of the image size); mask1 is warped with it, flow10 is re-sampled through the
  warp and flow01 is pushed through its inverse, so the ground truth stays exact;
- swap of images 0 and 1 with ``p_swap``;
- image 1's background cells hidden as attention keys (``pad1``) with ``p_pad``.

Corrupt samples (undecodable fields, bad shapes, broken tar members) are skipped and counted: each
yielded item carries ``skipped``, the number dropped since the previous item of that worker, which the
trainer sums. ``strict=True`` raises instead.
"""
from __future__ import annotations

import logging
import os
import signal

import cv2
import numpy as np
import torch
from scipy.interpolate import RBFInterpolator
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from segswap.shards.format import ALL_FIELDS, FormatError, Pair, decode_sample

log = logging.getLogger(__name__)

AUGMENT_DEFAULTS = {
    "p_style": 0.5,
    "p_tps": 0.5,
    "tps_grids": [4, 6],
    "tps_move": 1.0,
    "p_swap": 0.5,
    "p_pad": 0.5,
}
STREAM_DEFAULTS = {"shuffle_buffer": 500, "strict": False}
# The TPS map is evaluated on a coarse grid and upsampled: the spline is smooth at this scale.
TPS_EVAL_STEP = 16


def expand_shards(urls: str | list) -> list[str]:
    """Brace lists, ``::``-joined lists, directories and ``pipe:`` URLs -> list of shard URLs."""
    if isinstance(urls, (list, tuple)):
        return [u for part in urls for u in expand_shards(part)]
    urls = os.fspath(urls)
    if not urls.startswith("pipe:") and os.path.isdir(urls):
        found = sorted(os.path.join(urls, f) for f in os.listdir(urls) if f.endswith(".tar"))
        if not found:
            raise FileNotFoundError(f"{urls}: directory holds no .tar shards")
        return found
    out = expand_urls(urls)
    if not out:
        raise ValueError(f"{urls!r} names no shards")
    return out


# ------------------------------------------------------------------------------- grid ground truth

def grid_mask(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Full-resolution mask (uint8 0/255 or float 0/1) -> soft [gh, gw] = mean over each cell."""
    m = mask.astype(np.float32)
    if mask.dtype == np.uint8:
        m /= 255.0
    return cv2.resize(m, (gw, gh), interpolation=cv2.INTER_AREA)


def sample_flow(flow: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear, NaN-aware sampling of a flow field [fh,fw,2] at normalised points [...,2] -> [...,2].

    Flow cell (i, j) has its centre at ((j+0.5)/fw, (i+0.5)/fh). Undefined (NaN) neighbours are left
    out and the remaining weights renormalised; a point with no defined neighbour gets NaN.
    """
    fh, fw = flow.shape[:2]
    f = flow.astype(np.float32)
    shape = pts.shape[:-1]
    p = pts.reshape(-1, 2).astype(np.float64)
    u = p[:, 0] * fw - 0.5
    v = p[:, 1] * fh - 0.5
    j0 = np.floor(u).astype(int)
    i0 = np.floor(v).astype(int)
    du, dv = u - j0, v - i0
    acc = np.zeros((len(p), 2), np.float64)
    wsum = np.zeros(len(p), np.float64)
    for di, wi in ((0, 1 - dv), (1, dv)):
        for dj, wj in ((0, 1 - du), (1, du)):
            ii = np.clip(i0 + di, 0, fh - 1)
            jj = np.clip(j0 + dj, 0, fw - 1)
            val = f[ii, jj]
            ok = np.isfinite(val[:, 0])
            w = wi * wj * ok
            acc += w[:, None] * np.where(ok[:, None], val, 0)
            wsum += w
    out = np.full((len(p), 2), np.nan, np.float32)
    good = wsum > 1e-8
    out[good] = (acc[good] / wsum[good, None]).astype(np.float32)
    return out.reshape(*shape, 2)


def cell_centres(gh: int, gw: int) -> np.ndarray:
    """Normalised (x, y) of the centres of a gh x gw grid: [gh, gw, 2]."""
    x = (np.arange(gw) + 0.5) / gw
    y = (np.arange(gh) + 0.5) / gh
    return np.stack(np.meshgrid(x, y), axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------- TPS

class ThinPlateSpline:
    """A smooth map T of normalised coordinates with T(c_i) = d_i at control points (scipy's TPS RBF).

    ``inverse`` starts from the spline fitted the other way (d_i -> c_i, the official code's inverse,
    accurate to a fraction of a pixel) and polishes it by fixed-point iteration.
    """

    def __init__(self, src: np.ndarray, dst: np.ndarray):
        self._rbf = RBFInterpolator(src, dst, kernel="thin_plate_spline", degree=1)
        self._inv = RBFInterpolator(dst, src, kernel="thin_plate_spline", degree=1)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        shape = pts.shape
        return self._rbf(pts.reshape(-1, 2).astype(np.float64)).reshape(shape).astype(np.float32)

    def inverse(self, pts: np.ndarray, iters: int = 12, tol: float = 2.5e-4) -> np.ndarray:
        """Solve T(q) = p for q by fixed-point iteration (T is a small perturbation of the identity).

        Stops once every residual is below ``tol`` (normalised: 0.12 px at 480, about the precision of
        the float16 flows in the shards).
        """
        if not len(pts):
            return pts.astype(np.float32)
        q = self._inv(pts.reshape(-1, 2).astype(np.float64)).reshape(pts.shape).astype(np.float32)
        for _ in range(iters):
            r = pts - self(q)
            q = q + r
            if np.abs(r).max(initial=0.0) < tol:
                break
        return q


def random_tps(rng: np.random.Generator, grids, move: float) -> ThinPlateSpline:
    """T: warped-image coordinates -> original coordinates; control points on an n x n grid over [0,1]^2."""
    n = int(rng.choice(grids))
    axis = np.linspace(0, 1, n)
    src = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    # The official moves are U(-0.5, 0.5)/n in [-1, 1] units, i.e. half that in [0, 1] units.
    dst = np.clip(src + (rng.random(src.shape) - 0.5) * move / (2 * n), 0, 1)
    return ThinPlateSpline(src, dst)


def warp_dense(tps: ThinPlateSpline, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps (pixel coordinates in the original) for every pixel of the warped image."""
    ys = np.arange(0, h + TPS_EVAL_STEP, TPS_EVAL_STEP, dtype=np.float32)
    xs = np.arange(0, w + TPS_EVAL_STEP, TPS_EVAL_STEP, dtype=np.float32)
    px = np.stack(np.meshgrid(xs, ys), axis=-1)  # pixel-corner coordinates of a coarse lattice
    mapped = tps(px / np.array([w, h], np.float32)) * np.array([w, h], np.float32)
    # Upsample the coarse lattice to every pixel centre: pixel centre c+0.5 sits at lattice index (c+0.5)/step.
    gx = (np.arange(w, dtype=np.float32) + 0.5) / TPS_EVAL_STEP
    gy = (np.arange(h, dtype=np.float32) + 0.5) / TPS_EVAL_STEP
    gxx, gyy = np.meshgrid(gx, gy)
    mx = cv2.remap(mapped[..., 0], gxx, gyy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    my = cv2.remap(mapped[..., 1], gxx, gyy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # remap samples pixel centres at integer coordinates: original pixel centre X+0.5 -> index X.
    return mx - 0.5, my - 0.5


# ------------------------------------------------------------------------------------ augmenting

class PairAugmenter:
    """Pair -> training item (numpy arrays) at ``image_size`` with feature-grid ground truth."""

    def __init__(self, image_size: int = 480, stride: int = 16, p_style: float = 0.5, p_tps: float = 0.5,
                 tps_grids=(4, 6), tps_move: float = 1.0, p_swap: float = 0.5, p_pad: float = 0.5):
        if image_size % stride:
            raise ValueError(f"image_size {image_size} must be a multiple of the feature stride {stride}")
        self.size = int(image_size)
        self.grid = self.size // stride
        self.p_style, self.p_tps, self.p_swap, self.p_pad = p_style, p_tps, p_swap, p_pad
        self.tps_grids = tuple(int(g) for g in tps_grids)
        self.tps_move = float(tps_move)

    def choose_fields(self, raw: dict, rng: np.random.Generator) -> dict:
        """Keep one rendering per image (stylised with p_style) before decoding: decode only what is used."""
        out = {k: v for k, v in raw.items() if not k.startswith("sty")}
        for i in ("0", "1"):
            sty = raw.get(f"sty{i}.jpg")
            if sty is not None and rng.random() < self.p_style:
                out[f"img{i}.jpg"] = sty
        return out

    def _resize(self, img: np.ndarray) -> np.ndarray:
        if img.shape[0] == self.size and img.shape[1] == self.size:
            return img
        return cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def __call__(self, pair: Pair, rng: np.random.Generator) -> dict:
        s, g = self.size, self.grid
        img0, img1 = self._resize(pair.img0), self._resize(pair.img1)
        m0 = self._resize(pair.mask0.astype(np.float32) / 255.0)
        m1 = self._resize(pair.mask1.astype(np.float32) / 255.0)
        centres = cell_centres(g, g)
        f01 = sample_flow(pair.flow01, centres)
        if rng.random() < self.p_tps:
            tps = random_tps(rng, self.tps_grids, self.tps_move)
            mx, my = warp_dense(tps, s, s)
            img1 = cv2.remap(img1, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            m1 = cv2.remap(m1, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            f10 = sample_flow(pair.flow10, tps(centres))   # warped cell -> original cell -> image 0
            ok = np.isfinite(f01[..., 0])
            f01[ok] = np.clip(tps.inverse(f01[ok]), 0, 1)  # image 0 -> original image 1 -> warped
        else:
            f10 = sample_flow(pair.flow10, centres)
        gm0, gm1 = grid_mask(m0, g, g), grid_mask(m1, g, g)
        if rng.random() < self.p_swap:
            img0, img1, gm0, gm1, f01, f10 = img1, img0, gm1, gm0, f10, f01
        pad1 = (gm1 < 0.5) if rng.random() < self.p_pad else np.zeros((g, g), bool)
        w01 = gm0 * np.isfinite(f01[..., 0])
        w10 = gm1 * np.isfinite(f10[..., 0])
        return {
            "key": pair.key,
            "img0": np.ascontiguousarray(img0), "img1": np.ascontiguousarray(img1),
            "mask0": gm0.astype(np.float32), "mask1": gm1.astype(np.float32),
            "flow01": np.nan_to_num(f01, nan=0.0).astype(np.float32),
            "flow10": np.nan_to_num(f10, nan=0.0).astype(np.float32),
            "flow01_weight": w01.astype(np.float32), "flow10_weight": w10.astype(np.float32),
            "pad1": pad1,
        }


def no_augment(image_size: int, stride: int = 16) -> PairAugmenter:
    """The validation / pool view: plain images, no warp, no swap, no padding."""
    return PairAugmenter(image_size, stride, p_style=0.0, p_tps=0.0, p_swap=0.0, p_pad=0.0)


# --------------------------------------------------------------------------------------- stream

def decode_choice(raw: dict, augment: PairAugmenter, rng: np.random.Generator) -> Pair:
    """Whitelist the raw sample, pick renderings, decode through the shard format's checked decoder."""
    key = raw.get("__key__", "?")
    unknown = sorted(k for k in raw if not k.startswith("__") and k not in ALL_FIELDS)
    if unknown:
        raise FormatError(f"sample {key}: unknown field(s) {unknown}")
    return decode_sample(augment.choose_fields(raw, rng))


class ShardStream(IterableDataset):
    """Augmented training items from shards; see the module docstring."""

    def __init__(self, urls, augment: PairAugmenter, seed: int = 0, resampled: bool = True,
                 shuffle_buffer: int = STREAM_DEFAULTS["shuffle_buffer"], strict: bool = STREAM_DEFAULTS["strict"],
                 rank: int = 0, world_size: int = 1, stream_id: int = 0, max_items: int | None = None):
        super().__init__()
        expanded = expand_shards(urls)
        self.urls = self._existing(expanded, strict)
        self._missing = len(expanded) - len(self.urls)  # counted once, as skips of the first worker
        self.augment = augment
        self.seed = int(seed)
        self.resampled = resampled
        self.shuffle_buffer = int(shuffle_buffer)
        self.strict = strict
        self.rank, self.world_size = rank, world_size
        self.stream_id = int(stream_id)  # distinguishes restarts (resume step) and pool streams
        self.max_items = max_items
        self._skipped = 0

    @staticmethod
    def _existing(urls: list[str], strict: bool) -> list[str]:
        """Check local shard paths once, here, rather than in every worker on every pass: a mistyped
        path must stop the run with its name, not loop over skips."""
        missing = [u for u in urls if not u.startswith("pipe:") and "://" not in u and not os.path.isfile(u)]
        if missing and (strict or len(missing) == len(urls)):
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {', '.join(missing[:3])}")
        if missing:
            log.warning("%d of %d shards do not exist and are left out, e.g. %s", len(missing), len(urls),
                        ", ".join(missing[:3]))
            gone = set(missing)
            urls = [u for u in urls if u not in gone]
        return urls

    # Every random choice of a worker comes from one SeedSequence keyed by (seed, rank, worker, stream).
    def _rng(self) -> tuple[np.random.Generator, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        ss = np.random.SeedSequence([self.seed, self.rank, wid, self.stream_id])
        return np.random.default_rng(ss), wid, nw

    def _handler(self, exn: Exception) -> bool:
        if self.strict:
            return False
        self._skipped += 1
        log.warning("skipping unreadable shard data: %s", str(exn)[:300])
        return True

    def _shard_order(self, rng, wid, nw):
        if self.resampled:
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        else:
            k = self.rank * nw + wid
            yield from self.urls[k::self.world_size * nw]

    def _raw_samples(self, rng, wid, nw):
        for url in self._shard_order(rng, wid, nw):
            try:
                stream = gopen(url, "rb")
            except Exception as e:  # noqa: BLE001 - missing file, failing pipe: count and go on
                if self.strict:
                    raise FormatError(f"{url}: cannot open ({e})") from e
                self._handler(e)
                if self.resampled and self._skipped > 100 * len(self.urls):
                    raise RuntimeError(f"no shard of {self.urls[:3]}... can be opened") from e
                continue
            try:
                for raw in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=self._handler),
                                         handler=self._handler):
                    yield raw
            finally:
                stream.close()

    def _shuffled(self, samples, rng):
        if not self.resampled or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            k = int(rng.integers(len(buf)))
            buf[k], s = s, buf[k]
            yield s
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def __iter__(self):
        rng, wid, nw = self._rng()
        if wid == 0 and self.rank == 0:
            self._skipped += self._missing
        n = 0
        for raw in self._shuffled(self._raw_samples(rng, wid, nw), rng):
            try:
                item = self.augment(decode_choice(raw, self.augment, rng), rng)
            except (FormatError, cv2.error, ValueError, KeyError) as e:
                if self.strict:
                    raise FormatError(f"{raw.get('__url__', '?')}: {e}") from e
                self._skipped += 1
                log.warning("skipping corrupt sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)
                continue
            item["skipped"] = self._skipped
            self._skipped = 0
            yield item
            n += 1
            if self.max_items is not None and n >= self.max_items:
                return


def worker_init(_worker_id: int) -> None:
    # Workers decode and warp with numpy/cv2; one thread each keeps 2-core machines responsive.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the trainer handles them (saves,
    # then shuts the workers down); a worker dying first would make the last batch fetch fail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(stream: ShardStream, batch_size: int, workers: int, drop_last: bool = True):
    # DataLoader draws a base seed when iterated; give it its own generator so that creating a loader
    # (e.g. for validation) never moves torch's global RNG, which dropout uses.
    gen = torch.Generator().manual_seed(stream.seed)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                                       generator=gen,
                                       worker_init_fn=worker_init if workers else None,
                                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
