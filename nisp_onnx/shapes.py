"""Fold shapes computed at run time (TorchScript's Shape -> Gather -> Concat chains) to constants.

The TorchScript exporter computes the targets of `view`/`reshape`, the bounds of `chunk`
and the like from `Shape` at run time. With the input's dimensions fixed except one (the
batch), these tensors are constants or differ only where the batch enters: the model is run
at two batch sizes, equal values become constants, and a Reshape target that differs in one
entry gets 0 there (where that is the input's own batch dimension) or -1. The model computes
the same for every batch; the channel analysis then sees constant shapes it can follow and
rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .calibrate import session
from .verify import data_inputs, is_large

_SHAPE_SOURCES = {"Shape", "Size"}
_BATCHES = (2, 3)


def fold_run_time_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose run-time shape tensors are constants where they can be, or
    `proto` itself when there is nothing to fold or it cannot be run here."""
    frontier = _frontier(proto.graph)
    if not frontier:
        return proto
    consumers = _consumers(proto.graph)
    probes = _probes(proto.graph, frontier, consumers)
    try:
        runs = _run(proto, frontier + list(probes), probes)
    except Exception:  # an input we cannot synthesise, an op onnxruntime lacks: leave it
        return proto
    if runs[0] is None or runs[1] is None:
        return proto
    probed = {
        p: (x, y) for p, x, y in zip(probes, runs[0][len(frontier) :], runs[1][len(frontier) :])
    }
    folded = {}
    for name, a, b in zip(frontier, runs[0], runs[1]):
        if a.dtype.kind not in "iu" or a.shape != b.shape:
            continue
        if np.array_equal(a, b):
            folded[name] = a
        elif a.ndim == 1 and _only_reshape_targets(consumers.get(name, [])):
            diff = np.flatnonzero(a != b)
            if len(diff) == 1 and not (a == 0).any():
                j = int(diff[0])
                copies = all(
                    j < len(probed[p][0]) and probed[p][0][j] == a[j] and probed[p][1][j] == b[j]
                    for p in _probe_names(consumers[name])
                )
                v = a.copy()
                v[j] = 0 if copies else -1  # 0: the dimension of the input (the batch)
                folded[name] = v
    if not folded:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for name, values in folded.items():
        const = f"{name}__folded"
        out.graph.initializer.append(numpy_helper.from_array(values, const))
        for node in out.graph.node:
            for i, t in enumerate(node.input):
                if t == name:
                    node.input[i] = const
    return out


def _frontier(graph: onnx.GraphProto) -> list[str]:
    """Tensors computed from shapes alone (and constants) that data ops read."""
    const = {t.name for t in graph.initializer}
    derived: set[str] = set()
    for node in graph.node:
        ins = [t for t in node.input if t]
        if node.op_type in _SHAPE_SOURCES:
            derived.update(node.output)
        elif node.op_type == "Constant" or (ins and all(t in const for t in ins)):
            const.update(node.output)
        elif ins and all(t in derived or t in const for t in ins):
            derived.update(node.output)
    frontier: list[str] = []
    for node in graph.node:
        if node.op_type in _SHAPE_SOURCES or all(o in derived for o in node.output):
            continue
        for t in node.input:
            if t in derived and t not in frontier:
                frontier.append(t)
    return frontier


def data_weights(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The large initializers that only nodes reading run-time data consume (Conv, Gemm,
    MatMul weights): folding constants never needs their values. {name: initializer}."""
    graph = proto.graph
    data = {i.name for i in data_inputs(graph)}
    for node in graph.node:
        if node.op_type not in _SHAPE_SOURCES and any(t in data for t in node.input):
            data.update(node.output)
    inner = _subgraph_inputs(graph)
    readers: dict[str, bool] = {}
    for node in graph.node:
        reads_data = any(t in data for t in node.input)
        for t in node.input:
            readers[t] = readers.get(t, True) and reads_data
    return {
        t.name: t
        for t in graph.initializer
        if readers.get(t.name) and t.name not in inner and is_large(t)
    }


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name that nodes inside the subgraphs of `graph` read (If, Loop, Scan)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names.update(t for n in g.node for t in n.input)
                names |= _subgraph_inputs(g)
    return names


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list] = {}
    for node in graph.node:
        for i, t in enumerate(node.input):
            out.setdefault(t, []).append((node, i))
    return out


def _only_reshape_targets(uses: list) -> bool:
    return bool(uses) and all(
        n.op_type == "Reshape"
        and i == 1
        and not any(a.name == "allowzero" and a.i for a in n.attribute)
        for n, i in uses
    )


def _probe_names(uses: list) -> list[str]:
    return [f"{n.input[0]}__shape_probe" for n, i in uses if n.op_type == "Reshape" and i == 1]


def _probes(graph: onnx.GraphProto, frontier: list[str], consumers: dict) -> dict[str, str]:
    """Shape probes of the data inputs of Reshapes whose target is computed: {probe: data}."""
    probes = {}
    for name in frontier:
        for p, (n, _) in zip(_probe_names(consumers.get(name, [])), consumers.get(name, [])):
            probes[p] = n.input[0]
    return probes


def _feeds(graph: onnx.GraphProto, batch: int) -> dict[str, np.ndarray] | None:
    """Random inputs with every unknown dimension set to `batch`; None when the unknown
    dimensions are not one and the same."""
    feeds, symbols = {}, set()
    for inp in data_inputs(graph):
        tt = inp.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                symbols.add(d.dim_param or f"?{inp.name}")
                shape.append(batch)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return feeds if len(symbols) == 1 else None


def _run(
    proto: onnx.ModelProto, names: list[str], probes: dict[str, str]
) -> list[list[np.ndarray] | None]:
    """The values of `names` at each of the batch sizes (None where the batch is ambiguous),
    with the shape probes added to the graph."""
    feeds = [_feeds(proto.graph, b) for b in _BATCHES]
    if any(f is None for f in feeds):
        return [None] * len(_BATCHES)
    probe_nodes = [onnx.helper.make_node("Shape", [d], [p]) for p, d in probes.items()]
    sess = session(proto, names, probe_nodes)
    return [[np.asarray(v) for v in sess.run(names, f)] for f in feeds]
