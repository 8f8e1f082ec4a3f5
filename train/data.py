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
  ``tps_move / (4 * grid)`` of the image size, the official loader's range); mask1 is warped with it,
  flow10 is re-sampled through the warp and flow01 is pushed through its exact (Newton) inverse, so the
  ground truth stays exact; a match pushed out of the frame loses its correspondence;
- swap of images 0 and 1 with ``p_swap``;
- image 1's background cells hidden as attention keys (``pad1``) with ``p_pad``.

Corrupt samples (undecodable fields, bad shapes, broken tar members) are skipped and counted: each
yielded item carries ``skipped``, the number dropped since the previous item of that worker, which the
trainer sums. ``strict=True`` raises instead.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from segswap.shards.format import ALL_FIELDS, FormatError, Pair, decode_sample
from segswap.shards.tps import ThinPlateSpline, lattice_points, random_tps, upsample_lattice

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
# The TPS image map is evaluated on a lattice of about this many points per side and upsampled: 16 px
# apart at 480 px, where it is within 0.6 px of the spline at 99% of the pixels (see warp_dense).
TPS_LATTICE = 30


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


def _bilinear_neighbours(fh: int, fw: int, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices [4, n] of the four flow cells around each normalised point, and their weights."""
    p = pts.reshape(-1, 2).astype(np.float64)
    u = p[:, 0] * fw - 0.5
    v = p[:, 1] * fh - 0.5
    j0, i0 = np.floor(u), np.floor(v)
    du, dv = u - j0, v - i0
    ii = np.clip(i0.astype(np.intp) + np.array([[0], [0], [1], [1]]), 0, fh - 1)
    jj = np.clip(j0.astype(np.intp) + np.array([[0], [1], [0], [1]]), 0, fw - 1)
    w = np.stack([(1 - dv) * (1 - du), (1 - dv) * du, dv * (1 - du), dv * du]).astype(np.float32)
    return ii * fw + jj, w


@functools.lru_cache(maxsize=16)
def _centre_neighbours(fh: int, fw: int, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    # Every pair of a run samples its flows at the same cell centres: the table is built once.
    idx, w = _bilinear_neighbours(fh, fw, cell_centres(gh, gw))
    idx.flags.writeable = w.flags.writeable = False  # shared by every later call
    return idx, w


def _gather_flow(flow: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NaN-aware bilinear combination of the flow cells ``idx`` [4, n] with weights ``w`` -> [n, 2]."""
    val = flow.reshape(-1, 2)[idx].astype(np.float32)  # [4, n, 2]: only the neighbours are converted
    ok = ~np.isnan(val[..., 0])
    w = w * ok
    val[~ok] = 0
    wsum = w.sum(axis=0)
    acc = (w[..., None] * val).sum(axis=0)
    out = np.full(acc.shape, np.nan, np.float32)
    good = wsum > 1e-6
    out[good] = acc[good] / wsum[good, None]
    return out


def sample_flow(flow: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear, NaN-aware sampling of a flow field [fh,fw,2] at normalised points [...,2] -> [...,2].

    Flow cell (i, j) has its centre at ((j+0.5)/fw, (i+0.5)/fh). Undefined (NaN) neighbours are left
    out and the remaining weights renormalised; a point with no defined neighbour gets NaN. Points
    outside the field take their nearest border cells.
    """
    fh, fw = flow.shape[:2]
    return _gather_flow(flow, *_bilinear_neighbours(fh, fw, pts)).reshape(*pts.shape[:-1], 2)


def sample_flow_at_centres(flow: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """``sample_flow(flow, cell_centres(gh, gw))`` with the neighbour table cached: [gh, gw, 2]."""
    fh, fw = flow.shape[:2]
    return _gather_flow(flow, *_centre_neighbours(fh, fw, gh, gw)).reshape(gh, gw, 2)


def cell_centres(gh: int, gw: int) -> np.ndarray:
    """Normalised (x, y) of the centres of a gh x gw grid: [gh, gw, 2]."""
    x = (np.arange(gw) + 0.5) / gw
    y = (np.arange(gh) + 0.5) / gh
    return np.stack(np.meshgrid(x, y), axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------- TPS

def random_warp(rng: np.random.Generator, grids, move: float) -> ThinPlateSpline:
    """T: warped-image coordinates -> original coordinates, normalised to [0, 1]^2.

    The generator's spline (``shards/tps.py``, also the one with the exact Newton inverse) with the
    official loader's draw: an n x n control grid (n from ``grids``), each point moved by
    U(-0.5, 0.5) / n in [-1, 1] units, i.e. U(-0.25, 0.25) * move / n in [0, 1] units.
    """
    return random_tps(rng, 0.0, 0.0, 1.0, 1.0, points_per_side=tuple(grids), jitter=0.25 * move)[0]


def warp_dense(tps: ThinPlateSpline, h: int, w: int) -> np.ndarray:
    """cv2.remap map (fixed point, ``CV_16SC2`` + ``CV_16UC1``): for every pixel of the warped image, where
    to read it in the original.

    The spline is evaluated on a lattice of cell centres every ``min(h, w) // TPS_LATTICE`` pixels and
    upsampled bilinearly (``shards.tps.upsample_lattice``, the generator's dense maps). Fixed point is
    what cv2.remap converts float maps to internally for bilinear sampling (1/32 px), so converting once
    here loses nothing and makes every later remap cheaper.

    Against the spline at every pixel (default warps, 480 px): median 0.1 px, 99th percentile 0.6 px,
    at most about 1.5 px next to a control point, where the kernel's curvature peaks. The ground truth
    does not go through this map: it uses the spline and its exact inverse at the cell centres.
    """
    step = max(1, min(h, w) // TPS_LATTICE)
    size = np.array([w, h], np.float64)
    mapped = tps(lattice_points(h, w, step) / size) * size - 0.5  # remap addresses pixel centres by integer coordinates
    return cv2.convertMaps(upsample_lattice(mapped, h, w, step), None, cv2.CV_16SC2)


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
        return self.augment(pair, self._resize(pair.img0), self._resize(pair.img1), rng, "img", warp_image)

    def augment(self, pair: Pair, view0, view1, rng: np.random.Generator, name: str, warp1) -> dict:
        """The augmentations and the grid ground truth around two views of the pair's images (pixels, or
        cached features: ``train/feature_cache.py``). ``warp1(view1, tps, map1, map2)`` applies the TPS to
        image 1's view; the ground truth is the same whatever the view. Items carry the views as
        ``{name}0`` / ``{name}1``."""
        s, g = self.size, self.grid
        # Masks stay uint8 {0, 255} until grid_mask averages them over each cell.
        m0, m1 = self._resize(pair.mask0), self._resize(pair.mask1)
        f01 = sample_flow_at_centres(pair.flow01, g, g)
        if rng.random() < self.p_tps:
            tps = random_warp(rng, self.tps_grids, self.tps_move)
            map1, map2 = warp_dense(tps, s, s)
            view1 = warp1(view1, tps, map1, map2)
            # Nearest keeps the mask binary (as stored) and costs half a bilinear remap.
            m1 = cv2.remap(m1, map1, map2, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            f10 = sample_flow(pair.flow10, tps(cell_centres(g, g)))  # warped cell -> original cell -> image 0
            ok = np.isfinite(f01[..., 0])
            # image 0 -> original image 1 -> warped image 1; a match the warp pushes out of the frame
            # (or where Newton does not converge: NaN) has no correspondence any more.
            moved = tps.inverse(f01[ok]).astype(np.float32)
            moved[~np.all((moved >= 0) & (moved <= 1), axis=1)] = np.nan
            f01[ok] = moved
        else:
            f10 = sample_flow_at_centres(pair.flow10, g, g)
        gm0, gm1 = grid_mask(m0, g, g), grid_mask(m1, g, g)
        if rng.random() < self.p_swap:
            view0, view1, gm0, gm1, f01, f10 = view1, view0, gm1, gm0, f10, f01
        pad1 = (gm1 < 0.5) if rng.random() < self.p_pad else np.zeros((g, g), bool)
        w01 = gm0 * np.isfinite(f01[..., 0])
        w10 = gm1 * np.isfinite(f10[..., 0])
        return {
            "key": pair.key,
            f"{name}0": np.ascontiguousarray(view0), f"{name}1": np.ascontiguousarray(view1),
            "mask0": gm0.astype(np.float32), "mask1": gm1.astype(np.float32),
            "flow01": np.nan_to_num(f01, nan=0.0).astype(np.float32),
            "flow10": np.nan_to_num(f10, nan=0.0).astype(np.float32),
            "flow01_weight": w01.astype(np.float32), "flow10_weight": w10.astype(np.float32),
            "pad1": pad1,
        }


def warp_image(img: np.ndarray, _tps, map1: np.ndarray, map2: np.ndarray) -> np.ndarray:
    """The pixel path's TPS on image 1: bilinear remap through the dense map, reflected at the borders."""
    return cv2.remap(img, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


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


def tune_loader_process() -> None:
    """One thread per loader process, and freed image-sized buffers recycled instead of unmapped.

    Workers decode and warp with numpy/cv2; one thread each keeps 2-core machines responsive. Every
    item allocates a few dozen arrays of 0.2-2 MB; glibc hands blocks that large back to the kernel on
    free, so the next item takes a fresh page fault on every 4 KB page of them (measured: ~480 faults
    and 1.6 ms of system time per 480-px pair). Raising glibc's mmap and trim thresholds keeps them
    in the heap for reuse. Other C libraries are left as they are.
    """
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def worker_init(_worker_id: int) -> None:
    tune_loader_process()
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
