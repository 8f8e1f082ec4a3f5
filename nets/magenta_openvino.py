"""The Magenta networks on OpenVINO in bfloat16, on CPUs that compute bfloat16 natively.

On a CPU with Intel AMX (Sapphire Rapids and later) OpenVINO runs convolutions on the tile units in
bfloat16, accumulating in float32: the edited 26-style network (``nets/magenta_graphs.py``) takes
0.0183 CPU-s on a 320x320 image, single-threaded, against 0.0410 on onnxruntime in two parts, its
fastest float32 path (0.45x; ``benchmarks/bench_style.py``). OpenVINO's own float32 is slower than
onnxruntime's there (0.0571, 1.28x the edited graph whole on onnxruntime), so OpenVINO is used only
where its CPU plugin's default precision is bfloat16, i.e. where OpenVINO itself judges bfloat16
native (:func:`bf16_is_native`); elsewhere the networks stay on onnxruntime.

bfloat16 keeps 8 bits of mantissa, so the output is not onnxruntime's: at the generator's defaults
(480-px images, work scale 2/3), on the 15 embedded photos with 4 styles each, 0.19-3.65 grey levels
apart on average (median 0.47), PSNR 29.5-55.1 dB (median 49.2) against float32, 1.05% of the pixels
more than 8 levels apart (``benchmarks/picture_style_engines.py``). The largest differences are where
the input is smooth and the network paints strokes from next to nothing (the colour wheel): the
strokes move there, the style does not (``docs/images/style_engines.jpg``).
:class:`segswap.nets.magenta.MagentaNetworks` checks the compiled network against onnxruntime's
shipped graph when it opens it, as it checks its other edits, with a tolerance for that rounding, and
falls back to onnxruntime otherwise.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@functools.cache
def _core():
    import openvino as ov  # imported here: a run on onnxruntime never loads it

    return ov.Core()


@functools.cache
def available() -> bool:
    """Whether OpenVINO is installed and loads. Not only ImportError: a wheel whose shared libraries
    do not load here raises OSError or RuntimeError, and the styliser must then go on without it."""
    try:
        _core()
    except ImportError:
        return False
    except Exception as e:  # noqa: BLE001 - whatever stops OpenVINO loading, onnxruntime runs instead
        log.warning("OpenVINO is installed but does not load (%s: %s); the styles run on onnxruntime",
                    type(e).__name__, e)
        return False
    return True


@functools.cache
def bf16_is_native() -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 by default here (it does on CPUs with AMX)."""
    if not available():
        return False
    import openvino as ov

    try:
        return _core().get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16
    except Exception as e:  # noqa: BLE001 - no CPU plugin, or one that does not know the property
        log.warning("OpenVINO's CPU plugin does not say its precision (%s: %s); the styles run on onnxruntime",
                    type(e).__name__, e)
        return False


@dataclass(frozen=True)
class Input:
    """What :meth:`OpenVINOSession.get_inputs` returns for each input (onnxruntime's NodeArg has a name too)."""
    name: str


class OpenVINOSession:
    """An ONNX model compiled by OpenVINO for the CPU in bfloat16 (``precision="f32"``: float32, which
    ``benchmarks/bench_style.py`` compares), with ``get_inputs`` and ``run`` as an onnxruntime
    ``InferenceSession``'s. Inputs of a new shape are recompiled for by OpenVINO itself (once per
    shape: a generation run has one)."""

    def __init__(self, data: bytes, threads: int | None = 1, precision: str = "bf16"):
        core = _core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(data), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._inputs = [Input(port.get_any_name()) for port in self.compiled.inputs]

    def get_inputs(self) -> list[Input]:
        return self._inputs

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        """All outputs, in the graph's order (``output_names`` must be None, as this module's callers pass)."""
        if output_names is not None:
            raise ValueError("OpenVINOSession.run returns all outputs: pass output_names=None")
        results = self.request.infer(feed)  # copies of the outputs (the request reuses its buffers)
        return [results[port] for port in self.compiled.outputs]
