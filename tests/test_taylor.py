"""The Taylor criterion and the ONNX backward graph behind it.

Gradients are checked against central finite differences of the loss: every float tensor of
a graph gets an extra additive input, and the derivative of the cross-entropy along a random
direction at that tensor must match the emitted gradient. The differences are taken in float64
with onnx's reference evaluator (independent of onnxruntime, and precise enough for steps of
1e-6 or 1e-7, which ReLU or max-pool kinks hardly ever get in the way of; values that repeat,
such as ReLU zeros, are left unperturbed, as they may sit exactly on a later kink).
"""

import numpy as np
import onnx
import pytest
import test_rules
from graphs import Builder
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from scipy import special
from test_rules import chain, residual_activations, unknown_op

from nisp_onnx import ArrayReader, Context, NispError, analyze, collect, load_model, prune
from nisp_onnx import backward as bwd
from nisp_onnx.analyze import find_frl
from nisp_onnx.backward import Index, add_backward, upgraded
from nisp_onnx.backward.emitter import _unary
from nisp_onnx.calibrate import session
from nisp_onnx.taylor import Taylor, measured

STEPS = (1e-6, 1e-7)  # the second only where a kink lies within the first
RTOL = 1e-4  # of the gradient norm


class Erf(OpRun):
    """Erf in float64 (the reference evaluator's own computes in float32)."""

    op_domain = ""

    def _run(self, x):
        return (special.erf(x),)


class Gelu(OpRun):
    """Gelu in float64, on the Erf above."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            return (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),)
        return (0.5 * x * (1 + special.erf(x / np.sqrt(2))),)


# --- the finite-difference harness -------------------------------------------------------------


def xent(z, t):
    z = z.reshape(len(z), -1)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(t)), t].mean()


def float_tensors(model):
    """The graph input and the first output of every node, where it is a float tensor."""
    idx = Index(onnx.shape_inference.infer_shapes(model))
    out = [model.graph.input[0].name]
    for n in model.graph.node:
        o = n.output[0]
        if n.op_type not in ("Constant", "Shape") and idx.elem_type(o) in (None, TensorProto.FLOAT):
            out.append(o)
    return out


def float64(model):
    """The same model computing in float64."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    for a in (a for n in m.graph.node if n.op_type == "Cast" for a in n.attribute):
        a.i = TensorProto.DOUBLE if a.i == TensorProto.FLOAT else a.i
    return m


def with_deltas(model, tensors, logits):
    """A float64 copy where each tensor t (a weight too) becomes t + d/t (d/t a new input),
    logits an output."""
    m = float64(upgraded(model))  # the opset the gradients were emitted for
    ren = {t: f"{t}__fd" for t in tensors}
    leaves = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer}
    nodes = [helper.make_node("Add", [t, f"d/{t}"], [ren[t]]) for t in tensors if t in leaves]
    for n in m.graph.node:
        n.input[:] = [ren.get(i, i) for i in n.input]
        nodes.append(n)
        nodes += [helper.make_node("Add", [o, f"d/{o}"], [ren[o]]) for o in n.output if o in ren]
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    m.graph.input.extend(
        helper.make_tensor_value_info(f"d/{t}", TensorProto.DOUBLE, None) for t in tensors
    )
    m.graph.output.append(onnx.ValueInfoProto(name=ren.get(logits, logits)))
    return m, ren.get(logits, logits)


def gradients(model, feed, labels, tensors):
    """Loss, values and gradients of `tensors` from the emitted backward graph (onnxruntime)."""
    bw = add_backward(model, tensors)
    extra = tuple(t for t in tensors if t not in feed)
    names = [bw.loss, *bw.grads.values(), *extra]
    got = dict(zip(names, session(bw.model, extra).run(names, {**feed, bw.labels: labels})))
    got.update(feed)
    return bw, float(got[bw.loss][0]), {t: (got[t], got[bw.grads[t]]) for t in tensors}


def unique(y):
    """False where a value repeats: ReLU zeros and other saturated values, shifted or scaled,
    sit exactly on a kink of a later op (max pool tie, PReLU at zero), so they stay put."""
    _, where, counts = np.unique(y, return_inverse=True, return_counts=True)
    return counts[where.reshape(y.shape)] == 1


def check_gradients(model, feed, labels, tensors=None, seed=0):
    """Assert the emitted gradient of every tensor against central finite differences."""
    tensors = tensors or float_tensors(model)
    bw, loss, values = gradients(model, feed, labels, tensors)
    fd_model, out = with_deltas(model, tensors, bw.logits)
    ref = ReferenceEvaluator(fd_model, new_ops=[Erf, Gelu])
    base = {k: v.astype(np.float64) for k, v in feed.items()}
    base.update({f"d/{t}": np.zeros(y.shape) for t, (y, _) in values.items()})

    def loss_at(t, delta):
        return xent(ref.run([out], {**base, f"d/{t}": delta})[0], labels)

    assert loss == pytest.approx(loss_at(tensors[0], base[f"d/{tensors[0]}"]), rel=1e-5)
    rng = np.random.default_rng(seed)
    for t, (y, g) in values.items():
        assert g.shape == y.shape, t
        v = rng.standard_normal(y.shape) * unique(y)
        analytic = float(np.sum(g * v))
        size = float(np.sqrt(np.sum(np.square(g, dtype=np.float64))))  # std of analytic
        fds = []
        for step in STEPS:
            fds.append((loss_at(t, step * v) - loss_at(t, -step * v)) / (2 * step))
            if abs(fds[-1] - analytic) <= RTOL * size + 1e-7:
                break
        else:
            raise AssertionError(f"{t}: fd {fds} vs {analytic:.6g}")
    return bw


def labels_for(feed, classes, seed=0):
    n = len(next(iter(feed.values())))
    return np.random.default_rng(seed).integers(0, classes, n)


# --- graphs for the VJPs that the pruning cases do not reach ------------------------------------


def conv_variants(b):
    """Strides with output padding, asymmetric pads, dilations, every auto_pad, groups."""
    b.shape = (2, 4, 9, 9)

    def conv(x, cin, cout, k, **attrs):
        w = b.weight(cout, cin // attrs.get("group", 1), k, k)
        return b.op("Tanh", b.op("Conv", x, w, kernel_shape=[k, k], **attrs))

    x = conv(b.input, 4, 6, 3, strides=[2, 2], pads=[1, 0, 0, 0])  # 9 -> 4, output padding
    x = conv(x, 6, 6, 3, dilations=[2, 2], pads=[2, 2, 2, 2], group=2)
    x = conv(x, 6, 6, 3, strides=[2, 2], auto_pad="SAME_UPPER")  # 4 -> 2
    x = conv(x, 6, 6, 2, auto_pad="SAME_LOWER", group=6)  # depthwise
    x = conv(x, 6, 8, 1, auto_pad="VALID")
    return b.model(b.head(x, 8))


def dynamic_sizes(b):
    """Strided conv and pools on an input of unknown spatial size: gradients padded at run time."""
    b.shape = (2, 3, 12, 12)
    x = b.op("Tanh", b.conv(b.input, 3, 4, stride=2))
    x = b.op("AveragePool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = b.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
    model = b.model(b.head(x, 4))
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "S"
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def pools(b):
    """Overlapping and dilated max pools, ceil mode, average pools with and without counted
    padding."""
    b.shape = (2, 3, 10, 10)
    x = b.op("Tanh", b.conv(b.input, 3, 4))
    x = b.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)  # 10 -> 5
    x = b.op("AveragePool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # excluded padding
    y = b.op(
        "AveragePool",
        x,
        kernel_shape=[2, 2],
        strides=[2, 2],
        pads=[1, 1, 0, 0],
        count_include_pad=1,
    )
    y = b.op("MaxPool", b.conv(y, 4, 4), kernel_shape=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2])
    return b.model(b.head(b.op("Sigmoid", y), 4))


def arithmetic(b):
    """Computed operands on both sides of Add/Sub/Mul/Div; Sum, Pow, Expand, Cast, Split with an
    unused output, Slice with negative steps, Pad."""
    b.shape = (2, 4, 6, 6)
    a = b.op("Tanh", b.conv(b.input, 4, 4))
    s = b.op("Sigmoid", b.conv(b.input, 4, 4))
    x = b.op("Div", a, b.op("Add", s, b.const(1.0)))
    x = b.op("Sub", x, b.op("Mul", s, s))
    x = b.op("Sqrt", b.op("Add", b.op("Pow", x, b.const(2.0)), b.const(1.0)))
    x = b.op("Sum", x, a, b.op("Exp", b.op("Neg", s)))
    g = b.op("Expand", b.op("GlobalAveragePool", x), b.const([2, 4, 6, 6], np.int64))
    x = b.op("Celu", b.op("Cast", b.op("Add", x, g), to=TensorProto.FLOAT), alpha=0.7)
    left, _ = b.op("Split", x, b.const([3, 1], np.int64), axis=1, outputs=2)  # one unused
    left = b.op(
        "Slice",
        left,
        b.const([-1, 5], np.int64),
        b.const([-(2**62), 0], np.int64),
        b.const([3, 2], np.int64),
        b.const([-2, -1], np.int64),
    )
    x = b.op("Pad", left, b.const([0, 1, 1, 0, 0, 0, 0, 2], np.int64))
    return b.model(b.head(x, 4))


def strided_slices(b):
    """Slices with positive steps (the gradient spread out and padded back): a start offset,
    an end past the size, a step that overruns it, a plain channel slice."""
    b.shape = (2, 4, 7, 8)
    x = b.op("Tanh", b.conv(b.input, 4, 4))
    x = b.op(
        "Slice",
        x,
        b.const([1, 0], np.int64),
        b.const([100, 7], np.int64),
        b.const([2, 3], np.int64),
        b.const([2, 3], np.int64),
    )  # H 1, 3, 5 of 7; W 0, 3, 6 of 8
    x = b.op("Slice", x, b.const([1], np.int64), b.const([3], np.int64), b.const([1], np.int64))
    return b.model(b.head(b.conv(x, 2, 4), 4))


def gemm_attention(b):
    """Opset 20: MatMul of two computed tensors, internal Softmax, Gelu, Gemm on every input."""
    b.shape, b.opset = (2, 5, 8), 20
    q = b.op("MatMul", b.input, b.weight(8, 8))
    k = b.op("MatMul", b.input, b.weight(8, 8))
    att = b.op("Div", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 2, 1])), b.const(3.0))
    h = b.op("MatMul", b.op("Softmax", att, axis=-1), b.input)
    h = b.op("Gelu", b.op("Gelu", h), approximate="tanh")
    h = b.op("ReduceSum", b.op("Unsqueeze", h, b.const([1], np.int64)), b.const([3], np.int64))
    f = b.op("Squeeze", h, b.const([1, 3], np.int64))  # [2, 5]
    c = b.op("Gemm", f, b.weight(4, 5), b.const(np.zeros(4)), alpha=0.5, transB=1)
    c = b.op("ReduceMean", c, b.const([0], np.int64))  # [1, 4]
    z = b.op("Gemm", b.op("Transpose", f), b.weight(5, 4), c, transA=1)  # computed C
    m = b.op("Gemm", z, b.weight(4, 3))
    zz = b.op("Gemm", z, z, alpha=0.3, transB=1)  # computed A and B
    z = b.op("Gemm", zz, m, transA=1, alpha=1.5)
    return b.model(b.op("LogSoftmax", z, axis=-1))


def old_opset(b):
    b.opset = 9
    return chain(b)


PRUNING_CASES = [
    "chain",
    "residual_activations",
    "mobilenet",
    "inception",
    "option_a",
    "flatten_map",
    "squeeze_excite",
    "split_concat",
    "transformer_mlp",
    "channel_shuffle",
    "run_time_shapes",
    "convnext_block",
    "attention",
]
GRAPHS = [getattr(test_rules, name) for name in PRUNING_CASES] + [
    conv_variants,
    dynamic_sizes,
    pools,
    arithmetic,
    strided_slices,
    gemm_attention,
    old_opset,
]


@pytest.mark.parametrize("case", GRAPHS, ids=lambda c: c.__name__)
def test_gradients_match_finite_differences(case):
    b = Builder()
    model = case(b)
    feed = b.feed()
    bw = check_gradients(model, feed, labels_for(feed, 3))
    if case is dynamic_sizes:  # sizes unknown until run time: gradients padded to fit then
        assert any(n.op_type == "Pad" for n in bw.model.graph.node)
    if case is strided_slices:  # no scatter: spread and padded
        assert not any(n.op_type == "ScatterElements" for n in bw.model.graph.node)


def test_every_vjp_is_checked():
    ops = {n.op_type for case in GRAPHS for n in case(Builder()).graph.node}
    assert not set(bwd.VJPS) - ops


def _sigmoid_without_one_minus(em, node, x, y, dy):
    return em.op("Mul", dy, y)


@pytest.mark.parametrize(
    "op, broken, case",
    [
        ("Relu", lambda em, node, dy, need: [dy[0]], chain),
        ("BatchNormalization", lambda em, node, dy, need: [dy[0]], chain),
        ("Sigmoid", _unary(_sigmoid_without_one_minus), pools),
    ],
)
def test_a_wrong_vjp_is_caught(monkeypatch, op, broken, case):
    monkeypatch.setitem(bwd.VJPS, op, broken)
    b = Builder()
    model = case(b)
    feed = b.feed()
    with pytest.raises(AssertionError, match="fd"):
        check_gradients(model, feed, labels_for(feed, 3))


def test_op_without_vjp_is_a_user_error():
    b = Builder()
    with pytest.raises(NispError, match=r"LRN node 'LRN\d+' has no backward rule.*nisp-infs"):
        add_backward(unknown_op(b), ["x"])


def test_constants_need_no_rule():
    b = Builder()
    x = b.op("Relu", b.conv(b.input, 3, 4))
    w = b.op("Identity", b.op("Identity", b.weight(4, 4, 1, 1)))  # TorchScript style
    scale = b.op("LRN", b.const(np.ones((1, 4, 1, 1))), size=3)  # no rule, but constant
    y = b.op("Mul", b.op("Conv", x, w, kernel_shape=[1, 1]), scale)
    model = b.model(b.head(y, 4))
    feed = b.feed()
    check_gradients(model, feed, labels_for(feed, 3), tensors=["x", x, y])


# --- the criterion --------------------------------------------------------------------------------


def make_context(model, x, batch=32, labels=None):
    loaded = load_model(model)
    graph = loaded.graph()
    cg = analyze(graph, loaded.proto.opset_import[0].version, ())
    frl = find_frl(graph)[0]
    calib = collect(loaded.proto, ArrayReader({"x": x}, ["x"], batch), frl)
    return Context(cg, cg.classes(), frl, calib, loaded.proto, labels=labels)


def small_net(b):
    b.shape = (16, 3, 6, 6)
    y = b.bn(b.conv(b.input, 3, 4, bias=False), 4)
    pooled = b.op("Flatten", b.op("GlobalAveragePool", b.op("Relu", y)))
    h = b.gemm(pooled, 4, 6)
    return b.model(b.gemm(b.op("Relu", h), 6, 3)), y, h


def softmax_grad(z, t):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(t)), t] -= 1
    return p / len(t)


@pytest.mark.parametrize("with_labels", [False, True])
def test_taylor_matches_a_direct_computation(with_labels):
    b = Builder()
    model, bn, fc = small_net(b)
    labels = np.arange(16) % 3 if with_labels else None
    ctx = make_context(model, b.feed()["x"], batch=8, labels=labels)
    assert len(ctx.calib.batches) == 2
    targets = labels if with_labels else ctx.calib.predictions
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    w1, w2, logits = inits[gemms[0].input[1]], inits[gemms[1].input[1]], gemms[1].output[0]
    sess = session(model, (bn, fc))
    want = {bn: 0.0, fc: 0.0, logits: 0.0}
    for i, batch in enumerate(ctx.calib.batches):
        z, y, h = sess.run([logits, bn, fc], batch)
        dz = softmax_grad(z.astype(np.float64), targets[8 * i : 8 * i + 8])
        dh = (dz @ w2) * (h > 0)
        dy = (dh @ w1)[:, :, None, None] / 36 * (y > 0)
        want[bn] += np.square((dy * y).sum(axis=(0, 2, 3))) / 2
        want[fc] += np.square((dh * h).sum(axis=0)) / 2
        want[logits] += np.square((dz * z).sum(axis=0)) / 2
    picked = {t for _, t, _ in measured(ctx)}
    assert picked == set(want)  # the conv before BatchNorm is not measured
    direct = np.zeros(ctx.cg.n_elements)
    for sp in ctx.cg.spaces:
        if sp.tensor in picked:
            direct[sp.elements] = want[sp.tensor]
    np.testing.assert_allclose(Taylor().importance(ctx), ctx.per_class(direct), rtol=1e-4)


def test_taylor_measures_after_a_separate_bias():
    b = Builder()
    x = b.op("Conv", b.input, b.weight(4, 3, 3, 3), kernel_shape=[3, 3])
    x = b.op("Relu", b.op("Add", x, b.const(np.ones((4, 1, 1)))))  # CNTK-style bias
    model = b.model(b.head(x, 4))
    ctx = make_context(model, b.feed()["x"])
    assert [t for _, t, _ in measured(ctx)][0].startswith("add")


def test_taylor_prunes_through_the_api():
    b = Builder(shape=(8, 3, 8, 8))
    model = residual_activations(b)
    reader = ArrayReader(b.feed(), ["x"], 4, labels=np.arange(8) % 5)
    report = prune(model, None, reader, 0.5, criterion=Taylor())
    assert report.criterion == "taylor"
    assert report.macs_after < report.macs_before


def test_taylor_rejects_labels_out_of_range():
    b = Builder(shape=(8, 3, 8, 8))
    ctx = make_context(chain(b), b.feed()["x"], labels=np.full(8, 7))
    with pytest.raises(NispError, match="labels"):
        Taylor().importance(ctx)
