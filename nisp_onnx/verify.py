"""Stage 9: check the written model, and count what pruning saved (MACs, parameters)."""

from __future__ import annotations

import numpy as np
import onnx

from .errors import NispError


def check(proto: onnx.ModelProto) -> None:
    """Full `onnx.checker` check; a failure here is a bug of the tool, not of the user."""
    onnx.checker.check_model(proto, full_check=True)


def _fixed_inputs(proto: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(proto.SerializeToString())
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(m, data_prop=True)


def count(proto: onnx.ModelProto, input_shapes: dict[str, tuple]) -> tuple[int, int]:
    """(MACs per sample, parameters) of a model, with inputs of the given shapes (batch first).

    MACs count Conv, ConvTranspose, Gemm and MatMul; parameters are all float initializers.
    """
    macs = sum(node_macs(proto, input_shapes).values())
    params = sum(
        int(np.prod(t.dims))
        for t in proto.graph.initializer
        if t.data_type
        in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.BFLOAT16,
        )
    )
    return macs, params


def node_macs(proto: onnx.ModelProto, input_shapes: dict[str, tuple]) -> dict[str, int]:
    """MACs per sample of every Conv, ConvTranspose, Gemm and MatMul, by its output tensor."""
    m = _fixed_inputs(proto, input_shapes)
    shapes = {}
    for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = tuple(a.t.dims)
    shapes.update({k: list(v) for k, v in inits.items()})
    batch = max(1, int(next(iter(input_shapes.values()))[0]))
    macs: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or w is None or None in out:
            raise NispError(f"cannot size node {node.name!r} to count its MACs")
        if node.op_type == "Conv":
            n = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            n = int(np.prod(shapes[node.input[0]])) * int(np.prod(w[1:]))
        else:
            a = shapes.get(node.input[0])
            k = a[0] if node.op_type == "Gemm" and _attr(node, "transA") else a[-1]
            n = int(np.prod(out)) * int(k)
        macs[node.output[0]] = n // batch
    return macs


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def ware(original: np.ndarray, pruned: np.ndarray, scores: np.ndarray) -> float:
    """Weighted average reconstruction error of final responses (Yu et al. 2018, Eq. 20):
    the mean over samples and neurons of `s_i |y_i - y'_i| / |y_i|`, with the scores scaled
    to mean 1. `original` and `pruned` are [samples, neurons] over the retained neurons;
    responses that are exactly zero in the original are left out (no relative error)."""
    y = np.asarray(original, np.float64)
    s = np.asarray(scores, np.float64)
    s = s / max(float(s.mean()), 1e-30)
    live = np.abs(y) > 0
    rel = np.abs(y - np.asarray(pruned, np.float64)) / np.where(live, np.abs(y), 1.0)
    return float((rel * s)[live].sum() / max(int(live.sum()), 1))
