"""Stage 7: cut the graph to the kept channels, one op rule at a time."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .channels import ChannelGraph
from .rules import rule_of


def rewrite(cg: ChannelGraph, keep_elements: np.ndarray) -> gs.Graph:
    """Slice every node's parameters and attributes to `keep_elements` (a mask over all
    channel elements) and forget intermediate shapes, which change; returns the graph."""

    def keep(tensor: gs.Tensor) -> np.ndarray | None:
        sp = cg.space(tensor)
        return None if sp is None else keep_elements[sp.elements]

    graph = cg.graph
    for node in graph.nodes:
        rule_of(node).rewrite(node, cg, keep)
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None
    return graph.cleanup()


def zero_removed(cg: ChannelGraph, keep_elements: np.ndarray) -> gs.Graph:
    """The reference model: the original graph with removed channels multiplied by zero
    where mixing layers read them, and nodes whose function depends on the channel count
    (LayerNormalization over channels) made to see the kept ones only (`Rule.reference`).
    A correct rewrite computes exactly this function."""
    graph = cg.graph

    def keep(tensor: gs.Tensor) -> np.ndarray | None:
        sp = cg.space(tensor)
        return None if sp is None else keep_elements[sp.elements]

    for node in list(graph.nodes):
        rule_of(node).reference(node, cg, keep, graph)
    for node, index, sp in cg.mixing:
        mask = keep_elements[sp.elements]
        if mask.all():
            continue
        r = len(node.inputs[index].shape)
        shape = [1] * r
        shape[sp.axis] = sp.size
        zero = gs.Constant(f"{node.name}__mask{index}", mask.astype(np.float32).reshape(shape))
        masked = gs.Variable(f"{node.inputs[index].name}__masked_{node.name}", np.float32)
        graph.nodes.append(gs.Node("Mul", inputs=[node.inputs[index], zero], outputs=[masked]))
        node.inputs[index] = masked
    return graph.toposort()
