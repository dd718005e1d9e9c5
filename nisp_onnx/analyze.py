"""Stage 2: the channel groups of a graph, and its final response layer (FRL)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_graphsurgeon as gs

from .channels import ChannelGraph, dim, shape_of
from .errors import NispError
from .rules import rule_of

# ops allowed between the classifier and the graph output
_HEAD_OPS = {
    "Softmax",
    "LogSoftmax",
    "Identity",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Cast",
    "Sigmoid",
    "Dropout",
    "Add",
    "Sub",
}
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}


def analyze(graph: gs.Graph, opset: int, exclude: Iterable[str] = ()) -> ChannelGraph:
    """Channel spaces, links and freezes of a (toposorted) graph.

    `exclude` names nodes whose output channels are never pruned.
    """
    exclude = set(exclude)
    names = {n.name for n in graph.nodes}
    missing = sorted(exclude - names)
    if missing:
        raise NispError(f"--exclude names no node of the model: {', '.join(missing)}")
    cg = ChannelGraph(graph, opset)
    for node in graph.nodes:
        cg._current = node
        rule_of(node).analyze(node, cg)
        if node.name in exclude:
            for t in node.outputs:
                cg.freeze(cg.space(t), f"node {node.name!r} is excluded by the user")
    cg._current = None
    for t in graph.outputs:
        cg.freeze(cg.space(t), f"tensor {t.name!r} is a graph output")
    return cg


def find_frl(graph: gs.Graph) -> tuple[str, str]:
    """(FRL tensor, classifier node): the data input of the last weighted layer before the
    first graph output, looking through Softmax/Flatten/Reshape/bias-Add and the like, and
    through global pooling (with a Relu) to a 1x1 Conv classifier (SqueezeNet)."""
    out = graph.outputs[0]
    pooled = False
    while out.inputs:
        node = out.inputs[0]
        if _is_classifier(node, pooled):
            return node.inputs[0].name, node.name
        if node.op in _GLOBAL_POOLS or (pooled and node.op == "Relu"):
            pooled = True
        elif node.op not in _HEAD_OPS:
            break
        data = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(data) != 1:
            break
        out = data[0]
    raise NispError(
        f"cannot find the classifier (Gemm, MatMul or 1x1 Conv after global pooling) before "
        f"output {graph.outputs[0].name!r}; name the final response layer with --frl TENSOR"
    )


def _is_classifier(node: gs.Node, pooled: bool = False) -> bool:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return False
    if node.op in ("Gemm", "MatMul"):
        return not isinstance(node.inputs[0], gs.Constant)
    if node.op == "Conv" and node.attrs.get("group", 1) == 1:
        w = node.inputs[1].values
        shape = shape_of(node.inputs[0])
        unit = shape is not None and all(dim(shape, a) == 1 for a in range(2, len(shape)))
        after_pool = bool(node.inputs[0].inputs) and node.inputs[0].inputs[0].op in _GLOBAL_POOLS
        return all(k == 1 for k in w.shape[2:]) and (pooled or after_pool or unit)
    return False
