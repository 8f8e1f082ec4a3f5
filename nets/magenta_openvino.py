"""The Magenta networks on OpenVINO in bfloat16, on CPUs that compute bfloat16 natively.

On a CPU with Intel AMX (Sapphire Rapids and later) OpenVINO runs convolutions on the tile units in
bfloat16, accumulating in float32: the edited 26-style network (``nets/magenta_graphs.py``) takes
0.43x the CPU time of onnxruntime's float32 on a 320x320 image, single-threaded
(``benchmarks/bench_style.py``). OpenVINO's own float32 is slower than onnxruntime's there (1.25x),
so it is used only where its CPU plugin's default precision is bfloat16, i.e. where OpenVINO itself
judges bfloat16 native (:func:`bf16_is_native`); elsewhere the networks stay on onnxruntime.

bfloat16 keeps 8 bits of mantissa, so the output is not onnxruntime's: on 12 photos at 320 px with
one style each, 0.2-2.5 grey levels apart on average (PSNR 30-54 dB against float32). The largest
differences are where the input is flat and the network paints strokes from next to nothing (where
float32 summed in another order also moves them); the strokes differ there, the style does not
(``docs/images/style_engines.jpg``). :class:`segswap.nets.magenta.MagentaNetworks` checks the
compiled network against onnxruntime's shipped graph when it opens it, as it checks its other edits,
with a tolerance for that rounding, and falls back to onnxruntime otherwise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.cache
def _core():
    import openvino as ov  # imported here: a run on onnxruntime never loads it

    return ov.Core()


def available() -> bool:
    """Whether OpenVINO is installed and importable."""
    try:
        _core()
    except ImportError:
        return False
    return True


def bf16_is_native() -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 by default here (it does on CPUs with AMX)."""
    if not available():
        return False
    import openvino as ov

    return _core().get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16


@dataclass(frozen=True)
class Input:
    """What :meth:`OpenVINOSession.get_inputs` returns for each input (onnxruntime's NodeArg has a name too)."""
    name: str


class OpenVINOSession:
    """An ONNX model compiled by OpenVINO for the CPU in bfloat16, with ``get_inputs`` and ``run`` as an
    onnxruntime ``InferenceSession``'s. Inputs of a new shape are recompiled for by OpenVINO itself
    (once per shape: a generation run has one)."""

    def __init__(self, data: bytes, threads: int | None = 1):
        core = _core()
        config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
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
