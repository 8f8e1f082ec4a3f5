"""The segswap shard format, version 1: the one contract between the generator and the trainer.

Shards are WebDataset tar files named ``train-000000.tar`` … (``{prefix}-%06d.tar``). Each training
pair is one *sample*: a group of contiguous tar members sharing a key, one member per field, named
``<key>.<field>``. Keys are ``"%06d-%06d" % (shard_id, index_in_shard)``: they contain no dots, are
unique across a dataset, and sort in generation order.

Coordinates. An image of width W and height H covers the continuous square [0, W) x [0, H); pixel
(row r, column c) is the unit square with centre (c + 0.5, r + 0.5). *Normalised* coordinates divide
by the image size: x = X / W, y = Y / H, so (0, 0) is the top-left corner of the image and (1, 1) the
bottom-right. A feature grid of stride s has cell centres at normalised ((j + 0.5) s / W,
(i + 0.5) s / H); with 480x480 images and s = 16 that is (i + 0.5) / 30, as in the official code.

Fields (all images of a pair have the same size, ``H x W``, 480x480 by default):

===============  ============================  ==================================================
field            decoded dtype / shape         meaning
===============  ============================  ==================================================
``img0.jpg``     uint8 [H, W, 3] RGB           image 0 (the *source*: the segments' own image)
``img1.jpg``     uint8 [H, W, 3] RGB           image 1 (the *target*: background + pasted, warped,
                                               blended segments)
``sty0.jpg``     uint8 [H, W, 3] RGB           image 0 stylised (optional: present when a
                                               styliser ran; both or neither)
``sty1.jpg``     uint8 [H, W, 3] RGB           image 1 stylised (optional, see above)
``mask0.png``    uint8 [H, W], values {0, 255} ground-truth repeated region in image 0
``mask1.png``    uint8 [H, W], values {0, 255} ground-truth repeated region in image 1
``flow01.npy``   float16 [H/g, W/g, 2]         for the centre of each g x g cell of image 0, the
                                               normalised (x, y) of its match in image 1; NaN
                                               where the cell centre has no match
``flow10.npy``   float16 [H/g, W/g, 2]         the same from image 1 to image 0
``json``         dict                          provenance, see below
===============  ============================  ==================================================

``g`` is the *flow stride* (``json["flow_stride"]``, 4 by default): flow cell (i, j) has its centre at
pixel coordinates ((j + 0.5) g, (i + 0.5) g). The trainer derives the ground truth of any feature grid
from these fields: the soft mask of a cell is the mean of the full-resolution mask over the cell, and
its correspondence is the bilinear interpolation of the flow at the cell centre. float16 keeps the
normalised positions to within 1/2048 (a quarter pixel at 480 px).

Consistency guarantees (checked by :func:`check_pair`, :func:`check_consistency` and ``segswap-shards verify``):

- masks are cycle-consistent: a pixel of mask0 maps inside mask1 and a pixel of mask1 maps inside
  mask0; pixels with no match are not in the mask;
- a flow cell is finite exactly when its centre pixel lies in the mask (up to a small tolerance for
  the mask's rasterisation at segment edges), and finite values are in [0, 1];
- each mask covers at least the generator's minimum number of 16-px grid cells (9 by default).

``json`` holds (at least): ``format_version`` (int, this module's :data:`FORMAT_VERSION`), ``key``,
``size`` ([H, W]), ``flow_stride``, ``seed`` (the entropy and spawn key of the pair's
``SeedSequence``), ``kind`` ("one-object" / "two-object"), ``source`` (file name and id of image 0's
source image), ``background`` (file name and id of image 1's background), ``segments`` (per pasted
segment: its id, category, area, and every transform parameter: dilation, border crop, x/y scale,
rotation in degrees, fit ratio, translation, TPS control points), ``blend`` (method and parameters),
``style`` (per image: styliser name, style id and strength, or null).

Decoding never unpickles: :func:`decode_sample` accepts only the fields above, reads arrays with
``np.load(..., allow_pickle=False)`` and rejects any other member of the tar.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import cv2
import numpy as np

FORMAT_VERSION = 1
RENDERER_VERSION = 6  # json renderer_version; 2: Magenta built-in styles at 2/3 scale, pyamg forward/backward smoothing;
# 3: the default blend is the numba multigrid solver (pipeline/poisson.py) at tol 1e-6, which rounds a few pixels
# differently, and the mask PNGs are written without row filters (the same pixels, other bytes);
# 4: the Magenta 26-style graph runs edited (fused instance norms, sub-pixel convolutions: the same sums in another
# order, so a stylised pixel can round one level the other way), the TPS and its inverse are compiled loops
# (the same values to ~1e-12 px, which can move a flow's last bit), and the multigrid's V-cycle is float32 (the
# same pixels on 64 benchmark pastes, but a blended pixel can round the other way);
# 5: the 26-style graph runs in two parts with its first instance norm computed between them (nets/magenta_split.py:
# another summation order again; 1545 of 20.7M stylised bytes differ on 30 test images);
# 6: on a CPU with native bfloat16 (AMX) the 26-style network runs on OpenVINO in bfloat16 by default
# (nets/magenta_openvino.py: 0.19-3.65 grey levels from float32 on average; each image's json names the engine)
SHARD_PATTERN = "train-%06d.tar"
DEFAULT_FLOW_STRIDE = 4
JPEG_QUALITY = 95
MIN_MASK_CELLS = 9

IMAGE_FIELDS = ("img0.jpg", "img1.jpg", "sty0.jpg", "sty1.jpg")
MASK_FIELDS = ("mask0.png", "mask1.png")
FLOW_FIELDS = ("flow01.npy", "flow10.npy")
REQUIRED_FIELDS = ("img0.jpg", "img1.jpg", "mask0.png", "mask1.png", "flow01.npy", "flow10.npy", "json")
OPTIONAL_FIELDS = ("sty0.jpg", "sty1.jpg")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
KEY_RE = re.compile(r"^\d{6}-\d{6}$")


class FormatError(ValueError):
    """A sample or shard does not follow the format; the message names the key and the field."""


def sample_key(shard_id: int, index: int) -> str:
    return "%06d-%06d" % (shard_id, index)


# ---------------------------------------------------------------------------------------- encoding

def _encode_jpg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise FormatError("could not encode JPEG")
    return buf.tobytes()


# The masks are {0, 255} regions: unfiltered rows and zlib's run-length strategy encode one in
# 0.3-0.4 ms to ~1 kB, where libpng's adaptive filters took 1.8 ms for 1.6 kB (480 px; same pixels).
PNG_MASK_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                   cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def _encode_png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(gray), PNG_MASK_PARAMS)
    if not ok:
        raise FormatError("could not encode PNG")
    return buf.tobytes()


def _encode_npy(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, np.ascontiguousarray(arr), allow_pickle=False)
    return bio.getvalue()


@dataclass
class Pair:
    """One decoded training pair. Arrays follow the table in the module docstring."""

    key: str
    img0: np.ndarray
    img1: np.ndarray
    mask0: np.ndarray
    mask1: np.ndarray
    flow01: np.ndarray
    flow10: np.ndarray
    meta: dict
    sty0: np.ndarray | None = None
    sty1: np.ndarray | None = None


def encode_sample(pair: Pair) -> dict:
    """Pair -> {"__key__": key, field: bytes} ready for ``webdataset.TarWriter.write``."""
    check_pair(pair)
    meta = dict(pair.meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta["key"] = pair.key
    sample = {
        "__key__": pair.key,
        "img0.jpg": _encode_jpg(pair.img0),
        "img1.jpg": _encode_jpg(pair.img1),
        "mask0.png": _encode_png(pair.mask0),
        "mask1.png": _encode_png(pair.mask1),
        "flow01.npy": _encode_npy(pair.flow01.astype(np.float16)),
        "flow10.npy": _encode_npy(pair.flow10.astype(np.float16)),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
    if pair.sty0 is not None:
        sample["sty0.jpg"] = _encode_jpg(pair.sty0)
        sample["sty1.jpg"] = _encode_jpg(pair.sty1)
    return sample


# ---------------------------------------------------------------------------------------- decoding

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _decode_image(data: bytes, flags: int, what: str) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if arr is None:
        raise FormatError(f"{what}: not a decodable image")
    return arr


def decode_field(field: str, data: bytes, key: str = "?"):
    """Decode one whitelisted field; anything else is a FormatError (never unpickled)."""
    what = f"sample {key} field {field}"
    if field in IMAGE_FIELDS:
        # Decoding is the training loader's main cost: OpenCV >= 4.10 decodes straight to RGB; older
        # versions decode BGR and cvtColor (20x faster than a reversed-stride copy at 480 px).
        if _IMREAD_RGB is not None:
            return _decode_image(data, _IMREAD_RGB, what)
        return cv2.cvtColor(_decode_image(data, cv2.IMREAD_COLOR, what), cv2.COLOR_BGR2RGB)
    if field in MASK_FIELDS:
        return _decode_image(data, cv2.IMREAD_UNCHANGED, what)
    if field in FLOW_FIELDS:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refuse them
            raise FormatError(f"{what}: {e}") from e
    if field == "json":
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{what}: bad JSON ({e})") from e
    raise FormatError(f"{what}: field not in the format (allowed: {', '.join(ALL_FIELDS)})")


def decode_sample(sample: dict) -> Pair:
    """{"__key__": key, field: bytes} (as webdataset yields raw samples) -> checked Pair."""
    key = sample.get("__key__", "?")
    if isinstance(key, str) and "/" in key:
        key = key.rsplit("/", 1)[-1]
    fields = {k: v for k, v in sample.items() if not k.startswith("__")}
    unknown = sorted(set(fields) - set(ALL_FIELDS))
    if unknown:
        raise FormatError(f"sample {key}: unknown field(s) {unknown}")
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise FormatError(f"sample {key}: missing field(s) {missing}")
    if ("sty0.jpg" in fields) != ("sty1.jpg" in fields):
        raise FormatError(f"sample {key}: sty0.jpg and sty1.jpg must be both present or both absent")
    dec = {f: decode_field(f, v, key) for f, v in fields.items()}
    pair = Pair(key=key, img0=dec["img0.jpg"], img1=dec["img1.jpg"], mask0=dec["mask0.png"],
                mask1=dec["mask1.png"], flow01=dec["flow01.npy"], flow10=dec["flow10.npy"],
                meta=dec["json"], sty0=dec.get("sty0.jpg"), sty1=dec.get("sty1.jpg"))
    check_pair(pair)
    return pair


# ---------------------------------------------------------------------------------------- checking

def check_pair(pair: Pair, min_cells: int = 0) -> None:
    """Shapes, dtypes and value ranges of a pair; raises FormatError naming key and field.

    The deeper geometric consistency check (flow lands in the other mask, cycle consistency) is
    :func:`check_consistency`, which ``segswap-shards verify`` runs too.
    """
    key = pair.key
    if not KEY_RE.match(key or ""):
        raise FormatError(f"sample {key!r}: key must look like 000012-000034 (no dots)")
    h, w = pair.img0.shape[:2]
    for name in ("img0", "img1", "sty0", "sty1"):
        im = getattr(pair, name)
        if im is None:
            continue
        if im.dtype != np.uint8 or im.shape != (h, w, 3):
            raise FormatError(f"sample {key} field {name}: want uint8 [{h},{w},3], got {im.dtype} {list(im.shape)}")
    for name in ("mask0", "mask1"):
        m = getattr(pair, name)
        if m.dtype != np.uint8 or m.shape != (h, w):
            raise FormatError(f"sample {key} field {name}: want uint8 [{h},{w}], got {m.dtype} {list(m.shape)}")
        if not ((m == 0) | (m == 255)).all():  # np.isin sorts: 20x slower on a 480 px mask
            raise FormatError(f"sample {key} field {name}: values must be 0 or 255")
    g = int(pair.meta.get("flow_stride", DEFAULT_FLOW_STRIDE))
    if h % g or w % g:
        raise FormatError(f"sample {key}: image size {h}x{w} is not a multiple of flow_stride {g}")
    for name in ("flow01", "flow10"):
        f = getattr(pair, name)
        if f.shape != (h // g, w // g, 2) or f.dtype not in (np.float16, np.float32):
            raise FormatError(f"sample {key} field {name}: want float16 [{h // g},{w // g},2], got {f.dtype} {list(f.shape)}")
        fin = np.isfinite(f)
        if (fin[..., 0] != fin[..., 1]).any():
            raise FormatError(f"sample {key} field {name}: x and y must be NaN together")
        vals = f[fin].astype(np.float32)
        if vals.size and (vals.min() < 0 or vals.max() > 1):
            raise FormatError(f"sample {key} field {name}: normalised positions outside [0, 1]")
    if min_cells:
        for name in ("mask0", "mask1"):
            cells = mask_cells(getattr(pair, name))
            if cells < min_cells:
                raise FormatError(f"sample {key} field {name}: covers {cells} grid cells < {min_cells}")


def mask_cells(mask: np.ndarray, stride: int = 16) -> float:
    """Number of stride-sized grid cells covered by a full-resolution mask (soft count)."""
    h, w = mask.shape
    m = (mask[: h - h % stride, : w - w % stride] > 0).astype(np.float32)
    return float(m.reshape(h // stride, stride, w // stride, stride).mean(axis=(1, 3)).sum())


def flow_cell_centres_in_mask(mask: np.ndarray, g: int) -> np.ndarray:
    """Boolean [H/g, W/g]: whether the pixel holding each flow cell's centre is in the mask."""
    h, w = mask.shape
    rows = (np.arange(h // g) * g + g // 2)
    cols = (np.arange(w // g) * g + g // 2)
    return mask[np.ix_(rows, cols)] > 0


def check_consistency(pair: Pair, tol: float = 0.05) -> None:
    """Mask/flow agreement: finite flow where the mask is on, and flow landing inside the other mask.

    ``tol`` is the fraction of cells allowed to disagree (segment edges are rasterised at full
    resolution, flows are sampled at cell centres, and JPEG does not touch either, so disagreement
    beyond a few edge cells means a broken generator).
    """
    g = int(pair.meta.get("flow_stride", DEFAULT_FLOW_STRIDE))
    for a, b, flow in (("mask0", "mask1", pair.flow01), ("mask1", "mask0", pair.flow10)):
        m_src, m_dst = getattr(pair, a), getattr(pair, b)
        inside = flow_cell_centres_in_mask(m_src, g)
        finite = np.isfinite(flow[..., 0])
        n = max(int(inside.sum()), 1)
        disagree = int((inside != finite).sum())
        if disagree > tol * n + 2:
            raise FormatError(f"sample {pair.key}: {a} and flow {a[-1]}{b[-1]} disagree on {disagree} of {n} cells")
        pts = flow[finite].astype(np.float32)
        if len(pts):
            h, w = m_dst.shape
            cols = np.clip((pts[:, 0] * w).astype(int), 0, w - 1)
            rows = np.clip((pts[:, 1] * h).astype(int), 0, h - 1)
            # Land within one pixel of the other mask (rounding at its edge).
            dil = cv2.dilate(m_dst, np.ones((3, 3), np.uint8))
            miss = int((dil[rows, cols] == 0).sum())
            if miss > tol * len(pts) + 2:
                raise FormatError(f"sample {pair.key}: {miss} of {len(pts)} flow points of {a} land outside {b}")
