"""Loading and saving ONNX files: the only module that handles raw protobuf."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model
from onnx_graphsurgeon.util.exception import OnnxGraphSurgeonException

from .errors import NispError
from .resources import Cost, measure
from .shapes import data_weights, fold_run_time_shapes
from .verify import data_inputs, infer_shapes, inline, proto_bytes, skeleton

TWO_GB = 2**31


@dataclass
class LoadedModel:
    """A model as read from disk, with its graph folded and shape-inferred for analysis."""

    path: Path | None
    proto: onnx.ModelProto
    external_data: bool
    file_size: int
    cost: Cost | None = None  # of reading and preparing it

    def graph(self) -> gs.Graph:
        """A fresh graphsurgeon graph of the model (constants folded, shapes inferred)."""
        return gs.import_onnx(self.proto)


def check_path(model: str | os.PathLike) -> Path:
    """The path of an existing model file, or a NispError saying what is wrong with it."""
    path = Path(model)
    if not path.exists():
        raise NispError(f"{path}: no such file; pass the path of an .onnx model")
    if not path.is_file():
        raise NispError(f"{path}: is a directory, not an ONNX file")
    return path


_MODEL_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25, 26}  # ModelProto's field numbers


def _truncated(data: bytes) -> bool:
    """Whether `data` reads as ModelProto fields until one runs past the end of the file: a
    model cut short, rather than a file of some other kind."""
    pos, n = 0, len(data)

    def varint() -> int | None:
        nonlocal pos
        value, shift = 0, 0
        while pos < n and shift < 64:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        return None

    while pos < n:
        tag = varint()
        if tag is None or tag >> 3 not in _MODEL_FIELDS:
            return False
        wire = tag & 7
        if wire == 0:
            if varint() is None:
                return True
        elif wire == 2:
            length = varint()
            if length is None or pos + length > n:
                return True
            pos += length
        else:
            return False
    return False


def load_model(model: str | os.PathLike | onnx.ModelProto | LoadedModel) -> LoadedModel:
    """Read an ONNX model (path or proto), fold constant subgraphs and infer shapes."""
    if isinstance(model, LoadedModel):
        return model
    with measure() as cost:
        loaded = _load(model)
    loaded.cost = cost
    return loaded


def _load(model: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    if isinstance(model, onnx.ModelProto):
        proto, path, external, files = onnx.ModelProto(), None, False, set()
        proto.CopyFrom(model)  # the caller's proto stays as it is
        size = proto_bytes(proto)
    else:
        path = check_path(model)
        try:
            header = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as e:
            if _truncated(path.read_bytes()):
                raise NispError(
                    f"{path}: the file is truncated ({path.stat().st_size:,} bytes end inside "
                    "the model); copy or export it again"
                ) from None
            raise NispError(f"{path}: not a valid ONNX file ({type(e).__name__})") from None
        if not header.graph.node:
            raise NispError(f"{path}: not an ONNX model (the file holds no graph nodes)")
        files = _external_files(header)
        external = bool(files)
        for name in sorted(files):
            if not (path.parent / name).is_file():
                raise NispError(
                    f"{path}: its external data file {name} is missing; keep it beside the model"
                )
        proto = header  # the file is parsed once; external data complete it in place
        try:
            if external:
                load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, TypeError, onnx.checker.ValidationError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NispError(
                f"{path}: cannot read its external data ({first}); keep the .data files "
                "beside it, whole"
            ) from None
        size = path.stat().st_size + sum((path.parent / p).stat().st_size for p in files)
    _check_graph(proto, path)
    try:
        prepared = _prepare(proto)
    except (UnicodeDecodeError, OnnxGraphSurgeonException) as e:
        raise NispError(f"{path or 'model'}: cannot read the graph ({e})") from None
    return LoadedModel(path, prepared, external, size)


def _external_files(proto: onnx.ModelProto) -> set[str]:
    files = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in t.external_data if e.key == "location")
    return files


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _check_graph(proto: onnx.ModelProto, path: Path | None) -> None:
    """Refuse what cannot be pruned, naming the node: ops from unknown domains, quantized
    models, graphs without inputs or outputs, and anything onnxruntime cannot load."""
    where = path or "model"
    _check_domains(proto, where)
    if not data_inputs(proto.graph):
        raise NispError(f"{where}: the graph has no inputs to feed calibration data to")
    if not proto.graph.output:
        raise NispError(f"{where}: the graph has no outputs")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if path is not None:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        elif inline(proto):
            data = proto.SerializeToString()
            ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise NispError(f"{where}: onnxruntime cannot load the model: {first}") from None


def _check_domains(proto: onnx.ModelProto, where: Path | str) -> None:
    """Refuse ops from unknown domains and quantized models; "ai.onnx" becomes ""."""
    known = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    for node in proto.graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
        name = node.name or node.op_type
        if node.domain not in known:
            raise NispError(
                f"{where}: node {name!r} uses op domain {node.domain!r}, which "
                "onnxruntime cannot run here; export with standard ops"
            )
        if (
            node.op_type in QUANTIZED_OPS
            or node.op_type.startswith("QLinear")
            or (node.op_type.endswith("Integer"))
        ):
            raise NispError(
                f"{where}: node {name!r} ({node.op_type}) makes this a quantized "
                "model; prune the float model, then quantize the pruned one"
            )


def _prepare(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constant subgraphs (weights behind Identity, reshaped parameters) and shapes
    computed at run time, and infer shapes. The large weights that only data nodes read stay
    out of the graph surgery and are copied in once at the end (no serialisation, so any
    size, over 2 GB too); shapes are inferred without the weights."""
    source = fold_run_time_shapes(proto)
    held = data_weights(source)
    graph = gs.import_onnx(skeleton(source, held) if held else source)
    graph.fold_constants(error_ok=True).cleanup().toposort()
    _name_nodes(graph)
    folded = export(graph, proto)
    for t in folded.graph.initializer:
        if t.name in held:
            t.CopyFrom(held[t.name])
    del folded.graph.value_info[:]  # inferred afresh: stale entries would stop inference
    try:
        return infer_shapes(folded, data_prop=True)
    except Exception:  # best effort; analysis freezes what it cannot size
        return folded


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name (reports and rules refer to nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph with the opset, IR version and metadata of `like`."""
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = max(like.ir_version, 4)  # IR 3 wants initializers listed as inputs
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.producer_name = like.producer_name
    out.producer_version = like.producer_version
    out.model_version = like.model_version
    out.doc_string = like.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    return out


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, external_data: bool) -> int:
    """Write atomically: into a temporary folder beside `path`, then renamed into place (the
    external data file `<name>.data` first, the model last). Returns the bytes written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise NispError(f"{path}: the output folder {folder} does not exist")
    external_data = external_data or proto_bytes(proto) >= TWO_GB
    data_name = path.name + ".data"
    try:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=folder) as tmp:
            staged = Path(tmp) / path.name
            if external_data:
                onnx.save_model(
                    proto,
                    staged,
                    save_as_external_data=True,
                    location=data_name,
                    size_threshold=1024,
                )
                os.replace(Path(tmp) / data_name, folder / data_name)
            else:
                onnx.save_model(proto, staged)
            os.replace(staged, path)
    except OSError as e:
        raise NispError(f"{path}: cannot write the output model ({e.strerror or e})") from None
    size = path.stat().st_size
    if external_data:
        size += (folder / data_name).stat().st_size
    return size


def output_files(path: str | os.PathLike) -> list[Path]:
    """The files writing a model to `path` may create: the model and its external data."""
    path = Path(path)
    return [path, path.with_name(path.name + ".data")]


def external_files_of(path: str | os.PathLike) -> set[str]:
    """The external data files an ONNX file names (none if it cannot be read)."""
    try:
        return _external_files(onnx.load(str(path), load_external_data=False))
    except Exception:  # unreadable files are reported when they are loaded
        return set()
