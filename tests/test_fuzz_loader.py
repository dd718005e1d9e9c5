"""Loader fuzzing: corrupted and malformed ONNX files end in success or one NispError.

Real files (small fixtures, two with external data, and a model built here) are corrupted
byte by byte (flips, truncation, insertions, deletions, splices of another file) and
structurally (inputs removed, wrong op types, unknown domains, dangling names, missing
initializers, wrong IR versions and opsets, empty graphs, cycles, bad attributes and
initializers, ...). Each result goes through `load_model`, the CLI's `--dry-run` and, when it
loads, a full CLI run with calibration data. The only acceptable outcomes are success (and
then a valid output file) or a `NispError` with a one-line message; anything else is a bug.

Crashes the fuzzing found (and that were fixed) are listed in FIXED_BUGS, each with the
exception it raised, where, and a minimal reproducer that `test_fixed_bug_stays_fixed` runs.

NISP_FUZZ_EXAMPLES=2000 runs more examples locally.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import Builder
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_graphsurgeon.util.exception import OnnxGraphSurgeonException

from nisp_onnx import NispError, load_model
from nisp_onnx.cli import run as cli_run

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCALE = int(os.environ.get("NISP_FUZZ_EXAMPLES", "0"))
ORT_ERRORS = tuple(
    v
    for v in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(v, type) and issubclass(v, Exception)
)


def profile(n):
    return settings(
        max_examples=SCALE or n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        print_blob=False,
    )


def small_model(opset=14):
    """A conv net with BatchNorm, a residual Add, a Concat, SE and a Gemm head."""
    b = Builder(shape=(2, 3, 8, 8), opset=opset)
    x = b.cbr(b.input, 3, 6)
    y = b.bn(b.conv(b.cbr(x, 6, 6), 6, 6, bias=False), 6)
    x = b.op("Relu", b.op("Add", x, y))
    x = b.op("Concat", x, b.cbr(x, 6, 4, k=1), axis=1)
    s = b.op("Relu", b.conv(b.op("GlobalAveragePool", x), 10, 3, k=1))
    s = b.op("Sigmoid", b.conv(s, 3, 10, k=1))
    x = b.op("MaxPool", b.op("Mul", x, s), kernel_shape=[2, 2], strides=[2, 2])
    return b.model(b.head(x, 10, classes=4))


SOURCES = {
    "builder": small_model().SerializeToString(),
    **{
        name: (FIXTURES / f"{name}.onnx").read_bytes()
        for name in ["alexnet_dynamo", "resnet18_dynamo", "alexnet_torchscript"]
    },
}
EXTERNAL = ["alexnet_dynamo", "resnet18_dynamo"]  # weights in a .data file beside the model


def _calibration(folder, name):
    inp = onnx.load_from_string(SOURCES[name]).graph.input[0]
    dims = [x.dim_value or 2 for x in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal((4, *dims[1:])).astype(np.float32)
    np.savez(folder / f"{name}.npz", **{inp.name: x})
    return folder / f"{name}.npz"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with the fixtures' external data and calibration arrays for every source."""
    d = tmp_path_factory.mktemp("fuzz")
    for name in EXTERNAL:
        shutil.copy(FIXTURES / f"{name}.onnx.data", d)
    for name in SOURCES:
        _calibration(d, name)
    return d


# --- bugs found by these tests, not fixed yet ---------------------------------------------


@dataclass
class FixedBug:
    """A crash (not a NispError) that fuzzing found: what it was, and its reproducer."""

    id: str
    reason: str  # where it was raised and how it was fixed
    types: tuple  # the exception types it raised
    where: tuple  # "dir/file.py:function" where it was raised
    reproduce: object  # reproduce(tmp_path): passes now that the bug is fixed


def _save(proto, folder, name="model.onnx"):
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def _model(**kw):
    return onnx.load_from_string(small_model(**kw).SerializeToString())


def _node(m, op, index=0):
    return [n for n in m.graph.node if n.op_type == op][index]


def _set_attr(node, name, value):
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _full_run(path, calib, repair="ls"):
    out = path.with_name("out.onnx")
    return cli_run(
        [
            str(path),
            str(out),
            "--calib",
            str(calib),
            "-q",
            "--num-samples",
            "4",
            "--ratio",
            "0.5",
            "--repair",
            repair,
        ]
    )


def repro_external_data(tmp):
    shutil.copy(FIXTURES / "alexnet_dynamo.onnx", tmp)
    data = (FIXTURES / "alexnet_dynamo.onnx.data").read_bytes()
    (tmp / "alexnet_dynamo.onnx.data").write_bytes(data[:100])  # cut short
    _no_crash(load_model, tmp / "alexnet_dynamo.onnx")  # ValueError
    for location in ["", "/etc/passwd", "../outside.bin", "missing.bin"]:
        m = _model()
        t = m.graph.initializer[0]
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        t.external_data.add(key="location", value=location)
        _no_crash(load_model, _save(m, tmp))  # onnx.checker.ValidationError


def repro_not_utf8(tmp):
    m = _model()
    name = m.graph.node[2].output[0].encode()  # a tensor name; same length keeps the framing
    data = m.SerializeToString().replace(name, name[:-1] + b"\xff")
    (tmp / "model.onnx").write_bytes(data)
    _no_crash(load_model, tmp / "model.onnx")  # UnicodeDecodeError


def repro_cycle(tmp):
    m = _model()
    m.graph.node[0].input[0] = m.graph.node[2].output[0]
    _no_crash(load_model, _save(m, tmp))  # OnnxGraphSurgeonException


def repro_malformed_node(tmp):
    m = _model()
    _set_attr(_node(m, "Concat"), "axis", None)  # a required attribute missing
    _no_crash(cli_run, [str(_save(m, tmp)), "--dry-run", "-q"])  # KeyError 'axis'
    m = _model()
    del _node(m, "Relu", 1).input[:]
    _no_crash(cli_run, [str(_save(m, tmp)), "--dry-run", "-q"])  # IndexError


def repro_no_outputs(tmp):
    m = _model()
    del m.graph.output[:]
    _no_crash(_full_run, _save(m, tmp), _calibration(tmp, "builder"))  # IndexError


def repro_no_inputs(tmp):
    m = _model()
    del m.graph.input[:]
    _no_crash(_full_run, _save(m, tmp), _calibration(tmp, "builder"))  # ValueError


def repro_conv_attributes(tmp):
    for group in [0, 1000]:
        m = _model()
        _set_attr(_node(m, "Conv", 1), "group", group)
        _no_crash(cli_run, [str(_save(m, tmp)), "--dry-run", "-q"])
    m = _model()
    w = next(t for t in m.graph.initializer if t.name == _node(m, "Conv", 1).input[1])
    size = int(np.prod(w.dims))
    del w.dims[:]
    w.dims.append(size)  # a 1-D Conv weight: onnxruntime only fails when it runs
    del m.graph.value_info[:]
    _no_crash(cli_run, [str(_save(m, tmp)), "--dry-run", "-q"])  # ValueError


def repro_dry_run_shapes(tmp):
    m = onnx.load(str(FIXTURES / "alexnet_torchscript.onnx"))
    m.graph.input[0].type.tensor_type.ClearField("shape")
    m.opset_import[0].version = 12
    _no_crash(cli_run, [str(_save(m, tmp)), "--dry-run", "-q"])  # IndexError


def repro_onnxruntime_errors(tmp):
    calib = _calibration(tmp, "builder")
    m = _model()
    m.graph.node[1].input[0] = "no_such_tensor"
    _no_crash(_full_run, _save(m, tmp), calib)  # InvalidArgument at session
    m = _model()
    _set_attr(_node(m, "Conv", 0), "group", 1000)
    _no_crash(_full_run, _save(m, tmp), calib)  # Fail at run


def repro_stale_value_info(tmp):
    """A wrong value_info entry (onnxruntime merges it leniently and runs the model)."""
    m = onnx.load(str(FIXTURES / "alexnet_torchscript.onnx"))
    pool = _node(m, "MaxPool", 2).output[0]
    m.graph.value_info.append(helper.make_tensor_value_info(pool, TensorProto.FLOAT, [1, 5, 3]))
    path = _save(m, tmp)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a model that runs
    calib = tmp / "calib.npz"
    x = np.random.default_rng(0).standard_normal((4, 3, 96, 96)).astype(np.float32)
    np.savez(calib, input=x)
    assert _full_run(path, calib) == 0  # Fail in repair.py: a stage input without a type


def repro_ai_onnx_domain(tmp):
    """The default domain spelled "ai.onnx": valid, onnxruntime runs it."""
    m = _model()
    m.graph.node[0].domain = "ai.onnx"
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert _full_run(_save(m, tmp), _calibration(tmp, "builder")) == 0  # InvalidGraph


def _no_crash(fn, *args):
    """Success or a one-line NispError."""
    try:
        fn(*args)
    except NispError as e:
        assert "\n" not in str(e)


FIXED_BUGS = [
    FixedBug(
        "external-data",
        "model_io.load_model: onnx.load(path) with external data raises ValueError (file cut "
        "short), onnx.checker.ValidationError (empty, absolute, escaping or missing location) "
        "or TypeError (location not UTF-8); only FileNotFoundError/OSError are caught. Fix: "
        "catch (OSError, ValueError, TypeError, onnx.checker.ValidationError) there",
        (ValueError, TypeError, onnx.checker.ValidationError),
        ("onnx/external_data_helper.py",),
        repro_external_data,
    ),
    FixedBug(
        "not-utf8",
        "model_io._prepare: a name that is not UTF-8 (protobuf parses it) raises "
        "UnicodeDecodeError in gs.export_onnx. Fix: catch UnicodeDecodeError in load_model "
        "around onnx.load and _prepare (or run an onnxruntime session of the proto first)",
        (UnicodeDecodeError,),
        ("nisp_onnx/model_io.py",),
        repro_not_utf8,
    ),
    FixedBug(
        "cycle",
        "model_io._prepare: graph.toposort() raises OnnxGraphSurgeonException on a cycle. Fix: "
        "catch it in load_model (NispError 'the graph has a cycle'), or validate the model "
        "with an onnxruntime session before _prepare",
        (OnnxGraphSurgeonException,),
        ("nisp_onnx/model_io.py",),
        repro_cycle,
    ),
    FixedBug(
        "malformed-node",
        "rules/*.analyze: a node without its inputs or required attributes (Concat without "
        "axis: KeyError in ConcatRule.analyze; Relu without input: IndexError in "
        "UnaryRule.analyze) reaches the analysis, because load_model never validates. Fix: "
        "in load_model create an onnxruntime session of the proto (it rejects these) and raise "
        "NispError(f'{path}: onnxruntime cannot load the model: {first line}')",
        (IndexError, KeyError, TypeError, ValueError),
        ("nisp_onnx/rules/",),
        repro_malformed_node,
    ),
    FixedBug(
        "no-outputs",
        "analyze.find_frl: graph.outputs[0] raises IndexError on a graph without outputs "
        "(onnxruntime loads it). Fix: load_model raises NispError when graph.output is empty",
        (IndexError,),
        ("nisp_onnx/analyze.py:find_frl",),
        repro_no_outputs,
    ),
    FixedBug(
        "no-inputs",
        "readers.ArrayReader.__init__: min() of no input names raises ValueError for a graph "
        "without inputs. Fix: load_model raises NispError when the graph has no inputs besides "
        "initializers (the session check of malformed-node also rejects this one), and "
        "ArrayReader raises NispError for empty input_names",
        (ValueError,),
        ("nisp_onnx/readers.py:__init__",),
        repro_no_inputs,
    ),
    FixedBug(
        "conv-attributes",
        "rules/mixing.ConvRule.analyze: group 0 (ZeroDivisionError), a group that does not fit "
        "the channels (ValueError in ChannelGraph.classes: link indices beyond the space) and a "
        "weight of rank < 3 (ValueError unpacking shape[:2]) are not checked; onnxruntime only "
        "fails when it runs. Fix: freeze the input space unless w.ndim >= 3, g >= 1, m % g == 0 "
        "and src.size == cig * g",
        (ZeroDivisionError, ValueError),
        ("nisp_onnx/rules/mixing.py:analyze", "nisp_onnx/channels.py:classes"),
        repro_conv_attributes,
    ),
    FixedBug(
        "dry-run-shapes",
        "cli._dry_run_shapes gives an input without shape the shape (1,); verify.node_macs "
        "then indexes an empty shape (IndexError), takes next() of no inputs (StopIteration) "
        "or onnx shape inference raises InferenceError in verify._fixed_inputs. Fix: "
        "_dry_run_shapes raises NispError for an input without shape (or rank < 2); "
        "node_macs raises NispError('cannot size node') for empty shapes and catches "
        "InferenceError",
        (IndexError, StopIteration, onnx.shape_inference.InferenceError),
        ("nisp_onnx/verify.py:node_macs", "nisp_onnx/verify.py:_fixed_inputs"),
        repro_dry_run_shapes,
    ),
    FixedBug(
        "onnxruntime-errors",
        "calibrate.session/collect: onnxruntime's exceptions (InvalidArgument, InvalidGraph, "
        "Fail, NotImplemented: none derive from RuntimeError) escape for a model onnxruntime "
        "cannot load (dangling input) or cannot run (a Conv group that does not fit, a Reshape "
        "the data does not fit). Fix: validate with a session in load_model (see "
        "malformed-node) and wrap sess.run in collect: NispError('onnxruntime failed on "
        "calibration batch i: first line')",
        ORT_ERRORS,
        ("nisp_onnx/calibrate.py:session", "nisp_onnx/calibrate.py:collect"),
        repro_onnxruntime_errors,
    ),
    FixedBug(
        "stale-value-info",
        "repair.StageRunner.run: a file with a wrong value_info entry (onnxruntime merges it "
        "leniently and runs the model) makes _prepare's strict shape inference fail, its "
        "fallback leaves tensors untyped, and a repair stage gets a graph input without type: "
        "onnxruntime Fail 'Model input ... does not have type information'. Fix: drop "
        "proto.graph.value_info before inference in _prepare (the file's shapes are only "
        "hints), and give stage inputs the dtype of the cached arrays",
        ORT_ERRORS,
        ("nisp_onnx/repair.py:run",),
        repro_stale_value_info,
    ),
    FixedBug(
        "ai-onnx-domain",
        "a valid model whose nodes name the default domain 'ai.onnx' loads and runs in "
        "onnxruntime, but after _prepare the session in calibrate.session fails "
        "(InvalidGraph: onnx shape inference knows no opset for 'ai.onnx'). Fix: in load_model "
        "set node.domain = '' where it is 'ai.onnx'",
        ORT_ERRORS,
        ("nisp_onnx/calibrate.py:session",),
        repro_ai_onnx_domain,
    ),
]


@pytest.mark.parametrize("bug", FIXED_BUGS, ids=lambda b: b.id)
def test_fixed_bug_stays_fixed(bug, tmp_path):
    bug.reproduce(tmp_path)


# --- the fuzz harness ----------------------------------------------------------------------


def expect_clean(fn, *args):
    """Call fn: "ok" or "error" (a one-line NispError); any other exception propagates."""
    try:
        fn(*args)
    except NispError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"NispError message is not one line: {msg!r}"
        return "error"
    return "ok"


def check_all(path, calib, repair="ls"):
    """load_model, CLI --dry-run and (when the model loads) a full CLI run."""
    loaded = expect_clean(load_model, path)
    event(f"load {loaded}")
    event(f"dry-run {expect_clean(cli_run, [str(path), '--dry-run', '-q'])}")
    if loaded != "ok":
        return
    out = path.with_name("out.onnx")
    out.unlink(missing_ok=True)
    result = expect_clean(_full_run, path, calib, repair)
    event(f"run {result}")
    if result == "ok":
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    elif result == "error":
        assert not out.exists(), "a failed run left its output behind"


# --- byte-level corruption ---------------------------------------------------------------

edit = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]),
    st.floats(0, 1),
    st.binary(min_size=1, max_size=8),
    st.integers(1, 64),
    st.sampled_from(sorted(SOURCES)),
)


def corrupt(data, edits):
    data = bytearray(data)
    for kind, where, payload, length, other in edits:
        pos = int(where * len(data))
        if kind == "flip" and pos < len(data):
            data[pos] ^= payload[0] or 0xFF
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = payload
        elif kind == "delete":
            del data[pos : pos + length]
        elif kind == "splice":
            donor = SOURCES[other]
            start = int(where * len(donor))
            data[pos : pos + length] = donor[start : start + 4 * length]
    return bytes(data)


@profile(250)
@given(source=st.sampled_from(sorted(SOURCES)), edits=st.lists(edit, min_size=1, max_size=3))
def test_corrupted_bytes(workdir, source, edits):
    path = workdir / f"{source}.onnx"  # beside the external data of the dynamo fixtures
    path.write_bytes(corrupt(SOURCES[source], edits))
    check_all(path, workdir / f"{source}.npz", repair="none")


@profile(25)
@given(source=st.sampled_from(EXTERNAL), edits=st.lists(edit, max_size=2))
def test_corrupted_external_data(workdir, source, edits):
    """The .data file beside the model is corrupted or cut short."""
    sub = workdir / "external"
    sub.mkdir(exist_ok=True)
    data = (FIXTURES / f"{source}.onnx.data").read_bytes()
    edits = [e for e in edits if e[0] != "splice"]
    (sub / f"{source}.onnx.data").write_bytes(corrupt(data, edits))
    path = sub / f"{source}.onnx"
    path.write_bytes(SOURCES[source])
    check_all(path, workdir / f"{source}.npz", repair="none")


# --- structural corruption ---------------------------------------------------------------


def _pick(items, draw):
    return items[draw(st.integers(0, len(items) - 1))] if len(items) else None


def drop_node_input(m, draw):
    n = _pick(m.graph.node, draw)
    if n is not None and n.input:
        if draw(st.booleans()):
            n.input.pop()
        else:
            n.input[draw(st.integers(0, len(n.input) - 1))] = ""


def wrong_op_type(m, draw):
    ops = ["Relu", "Add", "Conv", "Gemm", "Concat", "Reshape", "Flatten", "MatMul", "Split"]
    n = _pick(m.graph.node, draw)
    if n is not None:
        n.op_type = draw(st.sampled_from([*ops, "NoSuchOp", ""]))


def unknown_domain(m, draw):
    n = _pick(m.graph.node, draw)
    if n is not None:
        n.domain = draw(st.sampled_from(["com.example", "ai.onnx.ml", "com.microsoft"]))


def dangling_input(m, draw):
    n = _pick(m.graph.node, draw)
    if n is not None and n.input:
        n.input[draw(st.integers(0, len(n.input) - 1))] = "no_such_tensor"


def dangling_output(m, draw):
    if m.graph.output:
        names = ["no_such_tensor", *(i.name for i in m.graph.input[:1])]
        m.graph.output[0].name = draw(st.sampled_from(names))


def drop_initializer(m, draw):
    t = _pick(m.graph.initializer, draw)
    if t is not None:
        m.graph.initializer.remove(t)


def wrong_ir_version(m, draw):
    m.ir_version = draw(st.sampled_from([0, 1, 2, 3, 4, 6, 11, 99]))


def wrong_opset(m, draw):
    if draw(st.booleans()):
        del m.opset_import[:]
    else:
        if not m.opset_import:
            m.opset_import.add(domain="")
        m.opset_import[0].version = draw(st.sampled_from([1, 6, 9, 12, 22, 99]))


def empty_graph(m, draw):
    field = draw(st.sampled_from(["node", "input", "output", "initializer"]))
    m.graph.ClearField(field)


def duplicate_output(m, draw):
    a, b = _pick(m.graph.node, draw), _pick(m.graph.node, draw)
    if a is not None and a is not b and a.output and b.output:
        b.output[0] = a.output[0]


def cycle(m, draw):
    n, later = _pick(m.graph.node, draw), _pick(m.graph.node, draw)
    if n is not None and n.input and later.output:
        n.input[0] = later.output[0]


def wrong_initializer(m, draw):
    t = _pick(m.graph.initializer, draw)
    if t is None:
        return
    kind = draw(st.sampled_from(["dtype", "truncate", "dims", "rank", "huge", "external"]))
    event(f"initializer {kind}")
    if kind == "dtype":
        types = [TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.STRING]
        t.data_type = draw(st.sampled_from([*types, 0]))
    elif kind == "truncate":
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    elif kind == "dims" and t.dims:
        t.dims[0] += 1
    elif kind == "rank" and t.dims:
        size = int(np.prod(t.dims))
        del t.dims[:]
        t.dims.append(size)
    elif kind == "huge":
        del t.dims[:]
        t.dims.extend([2**20, 2**20])
    elif kind == "external":
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        location = draw(st.sampled_from(["missing.bin", "../../../etc/passwd", "/etc/passwd", ""]))
        t.external_data.add(key="location", value=location)


def wrong_attribute(m, draw):
    n = _pick(m.graph.node, draw)
    if n is not None:
        name = draw(st.sampled_from(["group", "axis", "kernel_shape", "pads", "strides", "transB"]))
        value = draw(st.sampled_from([0, -7, 2.5, "x", [0, 0], [1, 2, 3, 4, 5, 6], 1000, None]))
        _set_attr(n, name, value)


def wrong_input(m, draw):
    if not m.graph.input or not m.graph.input[0].type.tensor_type.shape.dim:
        return
    inp = m.graph.input[0]
    kind = draw(st.sampled_from(["int64", "undefined", "rank", "zero", "no-shape", "renamed"]))
    event(f"input {kind}")
    tt = inp.type.tensor_type
    if kind == "int64":
        tt.elem_type = TensorProto.INT64
    elif kind == "undefined":
        tt.elem_type = TensorProto.UNDEFINED
    elif kind == "rank":
        del tt.shape.dim[-1]
    elif kind == "zero":
        tt.shape.dim[1].dim_value = 0
    elif kind == "no-shape":
        tt.ClearField("shape")
    else:
        inp.name = "renamed_input"


def conflicting_value_info(m, draw):
    n = _pick(m.graph.node, draw)
    if n is not None and n.output:
        info = helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [1, 5, 3])
        m.graph.value_info.append(info)


MUTATIONS = [
    drop_node_input,
    wrong_op_type,
    unknown_domain,
    dangling_input,
    dangling_output,
    drop_initializer,
    wrong_ir_version,
    wrong_opset,
    empty_graph,
    duplicate_output,
    cycle,
    wrong_initializer,
    wrong_attribute,
    wrong_input,
    conflicting_value_info,
]
STRUCT_SOURCES = ["builder", "alexnet_torchscript"]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda f: f.__name__)
@profile(5)
@given(data=st.data(), source=st.sampled_from(STRUCT_SOURCES))
def test_structurally_broken_model(workdir, mutation, data, source):
    m = onnx.load_from_string(SOURCES[source])
    mutation(m, data.draw)
    if data.draw(st.booleans(), label="a second mutation"):
        data.draw(st.sampled_from(MUTATIONS), label="then")(m, data.draw)
    check_all(_save(m, workdir, f"struct_{source}.onnx"), workdir / f"{source}.npz")
