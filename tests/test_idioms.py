"""Exporter idioms: opsets 8 to 21, fixed and dynamic batch, conv bias as a separate Add,
several graph outputs, the class token broadcast by Expand, and models over 2 GB (external
data in and out). Every pruned model computes what the original computes with the removed
channels zeroed (tests/equivalence.py)."""

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from equivalence import check_equivalent, run
from graphs import Builder
from onnx import TensorProto, helper, numpy_helper, version_converter
from test_architectures import _feed

from nisp_onnx import analyze, load_model, prune, verify

FIXTURES = Path(__file__).parent / "fixtures"
OPSETS = range(8, 22)


class Batches:
    """A calibration reader over a list of input dicts."""

    def __init__(self, batches):
        self.batches = list(batches)

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


def _group_of(model, tensor):
    loaded = load_model(model)
    cg = analyze(loaded.graph(), loaded.proto.opset_import[0].version)
    groups = cg.groups(cg.classes())
    return next(g for g in groups if cg.by_tensor[tensor] in g.spaces)


# --- opsets 8 to 21 ----------------------------------------------------------------------


def residual_net(b):
    """Conv/BatchNorm/Relu, a residual Add, MaxPool, a channel Concat, a Gemm head."""
    x = b.op("Relu", b.bn(b.conv(b.input, 3, 8, bias=False), 8))
    y = b.op("Relu", b.bn(b.conv(x, 8, 8, bias=False), 8))
    s = b.op("Add", x, b.bn(b.conv(y, 8, 8, bias=False), 8))
    p = b.op("MaxPool", s, kernel_shape=[2, 2], strides=[2, 2])
    c = b.op("Concat", p, b.op("Relu", b.conv(p, 8, 4, k=1)), axis=1)
    return b.model(b.head(c, 12))


def layout_net(b):
    """The ops whose parameters moved from attributes to inputs between opsets 8 and 21:
    Split, Clip, Pad, Slice, Dropout, ReduceMean, Squeeze, Unsqueeze (written at opset 8)."""
    x = b.cbr(b.input, 3, 8)
    a, c = b.op("Split", x, axis=1, split=[4, 4], outputs=2)
    x = b.op("Concat", a, b.cbr(c, 4, 4), axis=1)
    x = b.op("Clip", x, min=0.0, max=6.0)
    x = b.op("Pad", x, pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant")
    x = b.op("Slice", x, starts=[1], ends=[9], axes=[2])
    x = b.op("Dropout", b.cbr(x, 8, 6), ratio=0.1)
    x = b.op("ReduceMean", x, axes=[2, 3], keepdims=0)
    x = b.op("Unsqueeze", b.op("Squeeze", b.op("Unsqueeze", x, axes=[2]), axes=[2]), axes=[2])
    x = b.op("Flatten", x, axis=1)
    return b.model(b.op("Softmax", b.gemm(x, 6, 4), axis=1))


def _convert(model, opset):
    """`model` at `opset` (IR version raised where the opset needs it)."""
    out = version_converter.convert_version(model, opset)
    out.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(out.opset_import)))
    return out


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("net", [residual_net, layout_net], ids=lambda f: f.__name__)
def test_every_opset_prunes_equivalently(net, opset):
    """Written at opset 8 and converted up: every opset 8..21 must convert and prune."""
    b = Builder(opset=8)
    model = _convert(net(b), opset)
    assert model.opset_import[0].version == opset
    pruned, _, keep = check_equivalent(model, b.feed(), ratio=0.5)
    assert not keep.all()
    assert pruned.opset_import[0].version == opset


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize(
    "fixture", ["resnet18_torchscript", "mobilenet_v2_dynamo", "squeezenet_torchscript"]
)
def test_fixture_at_every_opset(fixture, opset):
    """Exported models converted to every opset the converter reaches from theirs."""
    model = onnx.load(str(FIXTURES / f"{fixture}.onnx"))
    try:
        converted = _convert(model, opset)
        onnx.checker.check_model(converted, full_check=True)
        run(converted, _feed(converted))
    except Exception as e:  # the converter or onnxruntime cannot take it there
        why = str(e).split("failed: ")[-1].strip().splitlines()[0]
        pytest.skip(f"{fixture} to opset {opset}: {type(e).__name__}: {why}")
    _, _, keep = check_equivalent(converted, _feed(converted), ratio=0.5)
    assert not keep.all()


# --- conv bias as a separate Add ---------------------------------------------------------


def test_conv_bias_as_separate_add_is_cut_with_the_conv():
    b = Builder()
    x = b.conv(b.input, 3, 8, bias=False)
    x = b.op("Add", x, b.const(b.rng.standard_normal((1, 8, 1, 1))))  # [1, C, 1, 1]
    x = b.op("Relu", b.bn(x, 8))
    y = b.op("Add", b.const(b.rng.standard_normal((8, 1, 1))), b.conv(x, 8, 8, bias=False))
    model = b.model(b.head(b.op("Relu", y), 8))
    pruned, _, keep = check_equivalent(model, b.feed(), ratio=0.5)
    assert not keep.all()
    biases = [
        numpy_helper.to_array(t).shape
        for t in pruned.graph.initializer
        if len(t.dims) >= 3 and t.dims[-1] == t.dims[-2] == 1
    ]
    assert sorted(biases) == [(1, 4, 1, 1), (4, 1, 1)]


# --- several graph outputs ---------------------------------------------------------------


def _two_heads_and_a_map(b):
    """Logits, a second head and an intermediate feature map, all graph outputs."""
    x = b.cbr(b.input, 3, 8)
    feature = b.cbr(x, 8, 8)
    y = b.cbr(feature, 8, 12)
    return b.model(b.head(y, 12, classes=5), b.head(y, 12, classes=3), feature), feature


def test_several_outputs_are_kept_and_their_channels_frozen(tmp_path):
    b = Builder()
    model, feature = _two_heads_and_a_map(b)
    pruned, groups, keep = check_equivalent(model, b.feed(), ratio=0.5)
    assert not keep.all()
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    g = _group_of(model, feature)
    assert g.prunable == 0 and any("graph output" in r for r in g.reasons)

    report = prune(model, tmp_path / "out.onnx", Batches([b.feed(), b.feed(2)]), 0.5)
    frozen = [r for g in report.groups for r in g.reasons if f"'{feature}'" in r]
    assert frozen and "graph output" in frozen[0]
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, b.feed())))
    want = dict(zip([o.name for o in model.graph.output], run(model, b.feed())))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert report.macs_after < report.macs_before


# --- fixed and dynamic batch -------------------------------------------------------------


def _with_batch(model, batch):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in [*m.graph.input, *m.graph.output]:
        d = vi.type.tensor_type.shape.dim
        if len(d):
            d[0].Clear()
            if batch is None:
                d[0].dim_param = "N"
            else:
                d[0].dim_value = batch
    del m.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(m)


def _run_time_shape_net(b):
    """TorchScript style: a flatten whose target is computed from Shape at run time."""
    x = b.cbr(b.cbr(b.input, 3, 8), 8, 6)
    batch = b.op(
        "Unsqueeze", b.op("Gather", b.op("Shape", x), b.const(0, np.int64)), b.const([0], np.int64)
    )
    flat = b.op("Concat", batch, b.const([-1], np.int64), axis=0)
    return b.model(b.gemm(b.op("Reshape", x, flat), 6 * 64, 4))


@pytest.mark.parametrize("batch", [None, 2], ids=["dynamic", "fixed"])
def test_fixed_and_dynamic_batch(tmp_path, batch):
    b = Builder()
    model = _with_batch(_run_time_shape_net(b), batch)
    check_equivalent(model, b.feed(), ratio=0.5)
    report = prune(model, tmp_path / "out.onnx", Batches([b.feed(1), b.feed(2)]), 0.5)
    assert report.macs_after < report.macs_before
    out = onnx.load(str(tmp_path / "out.onnx"))
    dim = out.graph.input[0].type.tensor_type.shape.dim[0]
    assert (dim.dim_param == "N") if batch is None else (dim.dim_value == batch)
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    for n in [1, 5] if batch is None else [batch]:
        x = np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)
        assert sess.run(None, {"x": x})[0].shape == (n, 4)


# --- Expand: the class token -------------------------------------------------------------


def class_token(b, entry=-1, constant_target=False):
    """ViT as TorchScript exports it: the class token is broadcast to the batch by Expand
    (target [N, 1, 1], or [N, 1, C] with `entry` C, computed from Shape at run time, or a
    constant) and concatenated before the patch tokens: the residual stream prunes."""
    b.shape = (2, 6, 16)
    x = b.op("MatMul", b.input, b.weight(16, 16))
    if constant_target:
        target = b.const([b.shape[0], 1, 16 if entry > 0 else 1], np.int64)
    else:
        n = b.op("Gather", b.op("Shape", x), b.const(0, np.int64))
        n = b.op("Unsqueeze", n, b.const([0], np.int64))
        target = b.op("Concat", n, b.const([1, max(entry, 1)], np.int64), axis=0)
    cls = b.op("Expand", b.const(b.rng.standard_normal((1, 1, 16))), target)
    x = b.op("Add", b.op("Concat", cls, x, axis=1), b.const(b.rng.standard_normal((1, 7, 16))))
    h = b.op("Relu", b.op("MatMul", x, b.weight(16, 24)))
    x = b.op("Add", x, b.op("MatMul", h, b.weight(24, 16)))
    y = b.op("Gather", x, b.const(0, np.int64), axis=1)
    return b.model(b.gemm(y, 16, 4))


@pytest.mark.parametrize(
    "entry,constant_target",
    [(-1, False), (16, False), (-1, True), (16, True)],
    ids=["run-time-1", "run-time-C", "constant-1", "constant-C"],
)
def test_class_token_expand_prunes_the_stream(entry, constant_target):
    b = Builder(opset=13)
    model = class_token(b, entry, constant_target)
    stream = next(n for n in b.nodes if n.op_type == "Concat" and n.input[0].startswith("exp"))
    g = _group_of(model, stream.output[0])  # a constant target is folded, Expand and all
    assert g.prunable == g.size == 16 and not g.reasons
    pruned, _, keep = check_equivalent(model, b.feed(), ratio=0.5)
    assert not keep.all()
    assert any(list(t.dims)[1:] == [1, 8] for t in pruned.graph.initializer)  # the token, cut
    if not constant_target:  # the pruned model runs at other batch sizes too
        x = np.random.default_rng(0).standard_normal((5, 6, 16)).astype(np.float32)
        assert run(pruned, {"x": x})[0].shape == (5, 4)


def test_expand_of_channels_passes_them_through():
    """An activation [N, C, 1, 1] broadcast over space keeps its channels."""
    b = Builder()
    x = b.cbr(b.input, 3, 8)
    s = b.op("Sigmoid", b.conv(b.op("GlobalAveragePool", x), 8, 8, k=1))
    s = b.op("Expand", s, b.const([1, 8, 8, 8], np.int64))
    model = b.model(b.head(b.cbr(b.op("Mul", x, s), 8, 6), 6))
    g = _group_of(model, s)
    assert g.prunable == g.size == 8
    check_equivalent(model, b.feed(), ratio=0.5)


def test_vit_torchscript_residual_stream_prunes():
    model = onnx.load(str(FIXTURES / "vit_b_16_torchscript.onnx"))
    expand = next(n for n in model.graph.node if n.op_type == "Expand").output[0]
    g = _group_of(model, expand)
    assert g.prunable == g.size and not g.reasons


# --- models over 2 GB --------------------------------------------------------------------


def _wide_model(folder, hidden, side, name="big"):
    """Conv -> Flatten -> Gemm [hidden, 64 * side^2] -> Gemm [hidden, hidden] -> Gemm -> Gemm,
    written with external data straight from numpy (no copy of the weights in a protobuf):
    over 2 GB at hidden 16384, side 16."""
    rng = np.random.default_rng(0)
    data = folder / f"{name}.onnx.data"
    inits, nodes, offset = [], [], 0

    def small(n, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.float32), n))
        return n

    conv = [small("w0", rng.standard_normal((64, 3, 3, 3)) * 0.3), small("b0", np.zeros(64))]
    nodes.append(helper.make_node("Conv", ["x", *conv], ["c0"], kernel_shape=[3, 3], pads=[1] * 4))
    nodes.append(helper.make_node("Relu", ["c0"], ["r0"]))
    nodes.append(helper.make_node("Flatten", ["r0"], ["f0"]))
    k = 64 * side * side
    block = (rng.random((min(1024, hidden), k), dtype=np.float32) - 0.5) / np.float32(np.sqrt(k))
    x = "f0"
    with open(data, "wb") as f:
        for i, (rows, cols) in enumerate([(hidden, k), (hidden, hidden)], 1):
            for r in range(0, rows, len(block)):  # blocks of random rows, scaled apart
                (block[: rows - r, :cols] * np.float32(1 + r % 7)).tofile(f)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, cols])
            t.data_location = TensorProto.EXTERNAL
            for key, v in (
                ("location", data.name),
                ("offset", offset),
                ("length", rows * cols * 4),
            ):
                t.external_data.add(key=key, value=str(v))
            offset += rows * cols * 4
            inits.append(t)
            small(f"b{i}", rng.standard_normal(rows) * 0.1)
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"]))
            x = f"r{i}"
    small("w3", rng.standard_normal((64, hidden)) / np.sqrt(hidden))
    small("w4", rng.standard_normal((10, 64)) / 8)
    nodes.append(helper.make_node("Gemm", ["r2", "w3"], ["g3"], transB=1))
    nodes.append(helper.make_node("Relu", ["g3"], ["r3"]))
    nodes.append(helper.make_node("Gemm", ["r3", "w4"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / f"{name}.onnx"))
    return folder / f"{name}.onnx"


def _reader(side, batches=2, size=4):
    rng = np.random.default_rng(1)
    shape = (size, 3, side, side)
    return Batches([{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)])


def _check_written(out, side):
    assert out.with_name(out.name + ".data").exists()
    onnx.checker.check_model(str(out), full_check=True)  # from the path: external data
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((3, 3, side, side)).astype(np.float32)
    assert sess.run(None, {"x": x})[0].shape == (3, 10)


def test_large_model_paths_on_a_small_model(tmp_path, monkeypatch):
    """The paths a model over 2 GB takes (onnxruntime and the checker from a temporary file
    with external data, shapes inferred without the weights), forced on a small model."""
    monkeypatch.setattr(verify, "INLINE_LIMIT", 1)
    path = _wide_model(tmp_path, hidden=256, side=8, name="wide")
    proto = load_model(path).proto
    assert not verify.inline(proto)
    assert verify.proto_bytes(proto) > (256 * 64 * 64 + 256 * 256) * 4
    verify.check(proto)
    report = prune(path, tmp_path / "out.onnx", _reader(8), 0.5, repair="none")
    assert report.macs_after < report.macs_before
    _check_written(tmp_path / "out.onnx", 8)

    b = Builder()  # shapes computed at run time are folded through the file-backed session
    model = _run_time_shape_net(b)
    graph = load_model(model).graph()
    assert not any(n.op == "Shape" for n in graph.nodes)
    check_equivalent(model, b.feed(), ratio=0.5)


@pytest.mark.slow
def test_model_over_2gb_with_external_data(tmp_path):
    """2 GiB of weights (two 1 GiB Gemm weights) in, external data out, through the public
    API. Slow (70 s of CPU on a 2-core machine): every pass over 2 GB costs seconds. Peak
    memory about 2.5 times the weights."""
    path = _wide_model(tmp_path, hidden=16384, side=16)
    assert path.with_name("big.onnx.data").stat().st_size >= 2**31
    start = time.perf_counter()
    report = prune(str(path), tmp_path / "out.onnx", _reader(16), 0.5, repair="none")
    assert report.macs_after < 0.3 * report.macs_before
    _check_written(tmp_path / "out.onnx", 16)
    print(f"pruned a model over 2 GB in {time.perf_counter() - start:.0f} s")
