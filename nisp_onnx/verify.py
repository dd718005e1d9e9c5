"""Stage 9: check the written model, and count what pruning saved (MACs, parameters)."""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import NispError

INLINE_LIMIT = 2**31 - 2**26  # bytes one protobuf can carry, with room for extra outputs
_STUB_BYTES = 1 << 16  # initializers this large are left out of shape inference
_ALIGN = 1 << 16  # external data offsets, aligned so onnxruntime can map the file


def proto_bytes(proto: onnx.ModelProto) -> int:
    """The serialised size of `proto`, estimated from its initializers' shapes where it is
    over 2 GB (`ByteSize()` raises there)."""
    data = sum(_nbytes(t) for t in proto.graph.initializer)
    if data < INLINE_LIMIT:
        try:
            return proto.ByteSize()
        except Exception:  # large tensors elsewhere (node attributes): over the limit
            return INLINE_LIMIT
    return data + _header(proto).ByteSize()


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return t.ByteSize()
    if t.HasField("raw_data") or t.data_type != onnx.TensorProto.STRING:
        return int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t)
    return t.ByteSize()


def data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs fed at run time (initializers listed as inputs left out)."""
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def static_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """A value's dimensions, None where one is not a fixed number."""
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def inline(proto: onnx.ModelProto) -> bool:
    """Whether `proto` fits one protobuf (under 2 GB, with room to spare)."""
    return proto_bytes(proto) < INLINE_LIMIT


def check(proto: onnx.ModelProto) -> None:
    """Full `onnx.checker` check; a failure here is a bug of the tool, not of the user.
    A model over 2 GB is checked from a temporary copy with external data."""
    if inline(proto):
        onnx.checker.check_model(proto, full_check=True)
        return
    with on_disk(proto) as path:
        onnx.checker.check_model(str(path), full_check=True)


def _header(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` without the initializers of its main graph (cheap: no weights)."""
    m = onnx.ModelProto()
    _copy_fields(proto, m, skip="graph")
    _copy_fields(proto.graph, m.graph, skip="initializer")
    return m


def _copy_fields(src: object, dst: object, skip: str) -> None:
    for f, value in src.ListFields():
        if f.name == skip:
            continue
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
        if repeated:
            getattr(dst, f.name).extend(value)
        elif f.message_type is not None:
            getattr(dst, f.name).CopyFrom(value)
        else:
            setattr(dst, f.name, value)


def _stub(t: onnx.TensorProto, location: str, offset: int = 0, length: int = 0) -> onnx.TensorProto:
    """An initializer with the name, type and shape of `t` whose data is in an external file."""
    s = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
    s.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        s.external_data.add(key=key, value=str(value))
    return s


def is_large(t: onnx.TensorProto) -> bool:
    """Whether an initializer is worth keeping out of copies (64 KiB of data or more)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
        return False
    return _nbytes(t) >= _STUB_BYTES


def _itemsize(t: onnx.TensorProto) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # strings, sub-byte types: a lower bound
        return 1


def skeleton(proto: onnx.ModelProto, names: Collection[str] | None = None) -> onnx.ModelProto:
    """A copy of `proto` whose large initializers (those of `names` only, when given) keep
    their name, type and shape but no data (marked external, in no file): enough for shape
    inference and counting, never to run."""
    m = _header(proto)
    for t in proto.graph.initializer:
        stub = is_large(t) and (names is None or t.name in names)
        m.graph.initializer.append(_stub(t, "__nisp_no_data__") if stub else t)
    return m


def infer_shapes(proto: onnx.ModelProto, data_prop: bool = False) -> onnx.ModelProto:
    """`proto` with inferred shapes (its value_info and output types replaced, in place),
    inferred on its skeleton: no copy of the weights, any size (even over 2 GB)."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(proto), data_prop=data_prop)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    for out, new in zip(proto.graph.output, inferred.graph.output):
        out.CopyFrom(new)
    return proto


@contextmanager
def on_disk(
    proto: onnx.ModelProto,
    extra_outputs: Sequence[str] = (),
    extra_nodes: Sequence[onnx.NodeProto] = (),
) -> Iterator[Path]:
    """`proto` (with `extra_nodes` and `extra_outputs` added) saved in a temporary folder,
    its large initializers in an external data file beside it, one at a time: a model of any
    size for the checker or onnxruntime. `proto` itself is left as it is."""
    with tempfile.TemporaryDirectory(prefix="nisp-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        data = path.name + ".data"
        m = _header(proto)
        m.graph.node.extend(extra_nodes)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in have)
        with open(Path(tmp) / data, "wb") as f:
            for t in proto.graph.initializer:
                if not is_large(t):
                    m.graph.initializer.append(t)
                    continue
                raw = t.raw_data if t.HasField("raw_data") else _raw(t)
                offset = -f.tell() % _ALIGN + f.tell()
                f.seek(offset)
                f.write(raw)
                m.graph.initializer.append(_stub(t, data, offset, len(raw)))
                del raw
        onnx.save_model(m, str(path))
        yield path


def _raw(t: onnx.TensorProto) -> bytes:
    """The bytes of an initializer stored in typed fields, as external data holds them."""
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _fixed_inputs(proto: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    m = skeleton(proto)
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # onnx's InferenceError and the errors of malformed graphs
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise NispError(f"cannot infer the model's shapes to count MACs: {first}") from None


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
        shapes[vi.name] = static_dims(vi)
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
        a = shapes.get(node.input[0])
        if a is None or None in a or len(a) < 2:
            raise NispError(f"cannot size the input of node {node.name!r} to count its MACs")
        if node.op_type == "Conv":
            n = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            n = int(np.prod(a)) * int(np.prod(w[1:]))
        else:
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
