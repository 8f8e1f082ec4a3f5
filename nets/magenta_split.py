"""The 26-style network run in two parts, its first instance norm computed between them by one kernel.

After the network's first convolution (9x9, 3 -> 32 channels, at full resolution) come an instance
norm, a ReLU and the reflection pad of the next convolution. onnxruntime runs them as three operators,
each a pass over the largest map of the network (the norm two): on a 320x320 image 5.4 ms of the
network's 37 after the edits of ``nets/magenta_graphs.py``. :func:`norm_relu_pad` does the three in
one kernel that reads the map three times and writes it once (1.2 ms). The graph is cut there into two
onnxruntime sessions, and :class:`SplitSession` runs them with the kernel in between, looking like
one session to its caller. The map crosses the cut in plain NCHW, so onnxruntime reorders it out of
and back into its blocked layout, which costs most of the gain back: the network takes 0.93-0.96x the
time of the edited graph (``benchmarks/bench_style.py``). Cutting at the second norm as well (32
channels at half resolution) was slower: its reorders cost more than the kernel saves there.

The output moves by float rounding only (the kernel sums in another order); :class:`segswap.nets.magenta.
MagentaNetworks` checks the parts against the shipped graph when loading, as it checks the other edits,
and runs the edited graph whole if they differ.
"""
from __future__ import annotations

import numpy as np
import onnx
from numba import njit
from onnx import helper

from segswap.nets.magenta_graphs import GraphIndex, node_attribute


@njit(cache=True, fastmath=True)
def norm_relu_pad(y, scale, shift, eps, out):
    """out [C, H + 2, W + 2] = the one-pixel reflection pad of ``relu(instance_norm(y) * scale + shift)``
    for one image's y [C, H, W] (float32), scale and shift [C]. The mean, then the variance about it (two
    reads; no cancellation, and 1.4x faster than one read summing the values and their squares, which
    does not vectorise as well), each row summed in float32 and the rows in float64; then one read and
    one write. The pad is fixed at one pixel, the image at one: with a pad width or a batch axis as
    variables numba's loops run 1.5x slower."""
    c, h, w = y.shape
    count = h * w
    for k in range(c):
        yk, ok = y[k], out[k]
        total = 0.0
        for i in range(h):
            row = yk[i]
            s = np.float32(0.0)
            for j in range(w):
                s += row[j]
            total += s
        mean = total / count
        centre = np.float32(mean)
        total = 0.0
        for i in range(h):
            row = yk[i]
            s = np.float32(0.0)
            for j in range(w):
                d = row[j] - centre
                s += d * d
            total += s
        gain = scale[k] / np.sqrt(total / count + eps)
        a, offset = np.float32(gain), np.float32(shift[k] - mean * gain)
        for i in range(h):
            row, o = yk[i], ok[i + 1]
            for j in range(w):
                o[j + 1] = max(row[j] * a + offset, np.float32(0.0))
            o[0], o[w + 1] = o[2], o[w - 1]
        ok[0, :] = ok[2, :]
        ok[h + 1, :] = ok[h - 1, :]


def _cut_point(model: onnx.ModelProto, g: GraphIndex) -> tuple:
    """The first InstanceNormalization whose output goes only to a ReLU, whose output goes only to a
    reflection Pad read only by a 3x3 convolution: (the norm, its epsilon, the pad, the convolution's
    input channels). The pad is taken to be one pixel, half the kernel: the pads themselves are
    computed in the graph (the load-time check would catch another width)."""
    for node in model.graph.node:
        if node.op_type != "InstanceNormalization" or len(node.input) != 3:
            continue
        relu = g.only_consumer(node.output[0], "Relu")
        pad = relu and g.only_consumer(relu.output[0], "Pad")
        conv = pad and g.only_consumer(pad.output[0], "Conv")
        if conv is None or node_attribute(pad, "mode") != b"reflect" or conv.input[1] not in g.initializers:
            continue
        kernel = g.initializers[conv.input[1]].dims
        if list(kernel[2:]) == [3, 3]:
            eps = node_attribute(node, "epsilon")
            return node, 1e-5 if eps is None else float(eps), pad, kernel[1]
    raise ValueError("no instance norm -> ReLU -> reflection pad -> 3x3 convolution chain")


def _part(model: onnx.ModelProto, g: GraphIndex, inputs: list, outputs: list[str], name: str) -> onnx.ModelProto:
    """The nodes and initializers ``outputs`` need, given ``inputs`` (value infos); a ValueError if
    they need a graph input not among ``inputs`` (the cut does not separate the graph)."""
    graph = model.graph
    given = {v.name for v in inputs}
    graph_inputs = {v.name for v in graph.input}
    needed, kept, todo = set(), set(), list(outputs)
    while todo:
        value = todo.pop()
        if value in needed or value in given:
            continue
        if value in graph_inputs:
            raise ValueError(f"the {name} needs the graph input {value}")
        needed.add(value)
        node = g.producer.get(value)
        if node is not None and node.output[0] not in kept:
            kept.add(node.output[0])
            todo.extend(v for v in node.input if v)
    part = helper.make_graph(
        [n for n in graph.node if n.output[0] in kept], name, inputs,
        [helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in outputs],
        [init for init in graph.initializer if init.name in needed])
    return helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)


def split_at_first_norm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, tuple]:
    """``model`` cut before its first instance norm -> ReLU -> reflection pad chain (see the module
    docstring): (head, tail, (the tail's padded input name, epsilon)). The head reads the
    graph's inputs and returns the norm's input, scale and shift; the tail reads the padded map and
    the graph's other inputs and returns the graph's outputs. ``model`` is not changed."""
    graph = model.graph
    g = GraphIndex(graph)
    norm, eps, pad, channels = _cut_point(model, g)
    head = _part(model, g, list(graph.input), list(norm.input), "head")
    padded = helper.make_tensor_value_info(pad.output[0], onnx.TensorProto.FLOAT, ["batch", channels, "h", "w"])
    tail = _part(model, g, [padded, *graph.input[1:]], [o.name for o in graph.output], "tail")
    return head, tail, (pad.output[0], eps)


class SplitSession:
    """Runs the head and tail of :func:`split_at_first_norm` (onnxruntime sessions) as one graph, with
    :func:`norm_relu_pad` between them; ``get_inputs`` and ``run`` as an ``InferenceSession``'s."""

    def __init__(self, head, tail, cut: tuple):
        self.head, self.tail, self.cut = head, tail, cut
        self._head_inputs = [i.name for i in head.get_inputs()]
        self._tail_inputs = [i.name for i in tail.get_inputs()]

    def get_inputs(self):
        return self.head.get_inputs()

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        y, scale, shift = self.head.run(None, {name: feed[name] for name in self._head_inputs})
        padded_name, eps = self.cut
        n, c, h, w = y.shape
        padded = np.empty((n, c, h + 2, w + 2), np.float32)
        for image, out in zip(y, padded):
            norm_relu_pad(image, scale, shift, eps, out)
        values = {**feed, padded_name: padded}
        return self.tail.run(output_names, {name: values[name] for name in self._tail_inputs})
