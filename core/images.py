"""One robust image loader for every part of segswap: ``load_rgb(path) -> uint8 [H, W, 3] RGB``.

Users point segswap at their own photo collections, which always hold a few odd files. The loader
turns every readable image into plain 8-bit RGB and every unreadable one into a :class:`BadImage`
naming the file and the problem, so batch jobs can count it, skip it and go on.

What it does with the usual oddities:

- EXIF orientation is applied (``ImageOps.exif_transpose``): phone photos come out upright.
- CMYK JPEGs (including Adobe's inverted CMYK) are converted to RGB by Pillow's colour conversion.
- 16-bit images (PNG ``I;16``/``I`` modes) are scaled to 8 bits (value / 257, rounded), not
  truncated, so a 16-bit PNG and its 8-bit export load alike. Pillow reads 16-bit *RGB* PNGs as
  8-bit RGB itself.
- Transparency (RGBA, LA, palette images with a transparent colour) is composited **on white**:
  dropping the alpha channel instead would expose whatever colour the editor left under transparent
  pixels (often black or garbage), and white is what viewers show.
- Grayscale, bilevel and palette images are expanded to three equal/decoded channels.
- Truncated, corrupt, zero-byte and non-image files raise :class:`BadImage`; so do images with a
  side below ``min_side`` (1x1 pixels say nothing) and images above ``max_pixels`` (a decompression
  bomb or a scan too large to hold several copies of in a worker's memory).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 100 megapixels: a 10000x10000 scan decodes to 300 MB of RGB; a worker holds a few copies at once.
DEFAULT_MAX_PIXELS = 100_000_000
# Below this side length an image carries no usable segment or background.
DEFAULT_MIN_SIDE = 8


class BadImage(ValueError):
    """An image file that cannot be used; ``str(err)`` names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across Ray workers despite the two-argument constructor
        return (BadImage, (self.path, self.reason))


# Conversions run over bands of rows so that no full-size temporary wider than uint8 RGB exists: peak
# memory is the decoded Pillow image plus the uint8 output plus one band (a 100-megapixel RGBA PNG
# used to cost 16 bytes per pixel in float32 alone).
BAND_PIXELS = 1 << 17


def _bands(h: int, w: int):
    rows = max(1, BAND_PIXELS // max(w, 1))
    for y0 in range(0, h, rows):
        yield y0, min(h, y0 + rows)


def _gray_to_uint8(band: np.ndarray) -> np.ndarray:
    """One band of a single-channel image (bool, 8/16/32-bit integers, float) as uint8."""
    if band.dtype == np.uint8:
        return band
    if band.dtype == bool:
        return band.astype(np.uint8) * 255
    if np.issubdtype(band.dtype, np.integer):
        # 16-bit data (Pillow modes I;16 / I): full range 0..65535 -> 0..255 by rounding v / 257. The
        # integer form (v + 128) // 257 is exact: v / 257 is never exactly half-way for integer v.
        v = np.clip(band.astype(np.int64, copy=False), 0, 65535)
        return ((v + 128) // 257).astype(np.uint8)
    return np.clip(np.rint(band), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 4] -> uint8 [h, w, 3]: c * a/255 + 255 * (1 - a/255), rounded to nearest.

    The same value is 255 - (255 - c) * a / 255, and (v + 127) // 255 rounds v / 255 exactly (never
    half-way for an integer v), so 16-bit integer arithmetic on one band suffices: (255 - c) * a + 127
    is at most 65152.
    """
    a = rgba[..., 3:4].astype(np.uint16)
    v = 255 - rgba[..., :3].astype(np.uint16)
    v *= a
    v += 127
    v //= 255
    return (255 - v).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    w, h = im.size
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        if mode != "RGBA":
            im = im.convert("RGBA")
        out = np.empty((h, w, 3), np.uint8)
        for y0, y1 in _bands(h, w):
            out[y0:y1] = _composite_on_white(np.asarray(im.crop((0, y0, w, y1))))
        return out
    if mode.startswith("I") or mode == "F":
        out = np.empty((h, w, 3), np.uint8)
        for y0, y1 in _bands(h, w):
            out[y0:y1] = _gray_to_uint8(np.asarray(im.crop((0, y0, w, y1))))[..., None]
        return out
    return np.asarray(im.convert("RGB"))


def load_rgb(path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE) -> np.ndarray:
    """Read an image file as uint8 [H, W, 3] RGB, upright; raise :class:`BadImage` if unusable.

    ``max_pixels=None`` lifts the size guard (Pillow's own decompression-bomb limit still applies).
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImage(path, f"cannot read file ({e.strerror or e})") from e
    if os.path.isdir(path):
        raise BadImage(path, "a directory, not an image file")
    if size == 0:
        raise BadImage(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # max_pixels is our limit; Pillow's warning (at 89 MP) would only add noise. Its hard
            # error (at 179 MP) still applies when max_pixels is None.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImage(path, f"image is {w}x{h} = {w * h} pixels, above the limit of "
                                         f"{max_pixels} (max_pixels); downscale it or raise the limit")
                if min(w, h) < min_side:
                    raise BadImage(path, f"image is {w}x{h} pixels, smaller than {min_side} px on a side")
                im.load()
                # In place: the rotated copy replaces the decoded pixels instead of living beside them.
                ImageOps.exif_transpose(im, in_place=True)
                rgb = _to_rgb_array(im)
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage(path, "not an image file (format not recognised)") from e
    except Image.DecompressionBombError as e:
        raise BadImage(path, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated ..."),
        # some plugins as SyntaxError/ValueError.
        raise BadImage(path, f"truncated or corrupt image data ({e})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise BadImage(path, f"unexpected decoded shape {list(rgb.shape)}")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to exactly width x height: area averaging when shrinking (no aliasing), bilinear else."""
    import cv2

    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb.copy()
    shrinking = width < w and height < h
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> str:
    """Write uint8 RGB [H, W, 3] (or grey [H, W]) as a PNG, atomically, creating the folder; returns the path."""
    import cv2

    from segswap.core.atomic import atomic_write

    rgb = np.ascontiguousarray(rgb)
    ok, buf = cv2.imencode(".png", rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    atomic_write(path, buf.tobytes())
    return os.fspath(path)
