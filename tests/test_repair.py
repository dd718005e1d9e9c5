"""Repair: the linear view of each mixing op, and least-squares refits after pruning."""

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from equivalence import run
from graphs import Builder
from onnx import TensorProto, helper, numpy_helper
from test_rules import mobilenet, residual_activations, transformer_mlp

from nisp_onnx import (
    ArrayReader,
    ImageFolderReader,
    Preprocess,
    analyze,
    load_model,
    prune,
    rewrite,
)
from nisp_onnx import calibrate as calibrate_module
from nisp_onnx import repair as repair_module
from nisp_onnx.calibrate import session
from nisp_onnx.model_io import export
from nisp_onnx.repair import repair
from nisp_onnx.rules import rule_of


def single(op, x_shape, w_shape, bias=None, **attrs):
    """A one-node model `op(x, W[, B])` with random constants, and a random input."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w")]
    if bias is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias).astype(np.float32), "b"))
    node = helper.make_node(op, ["x", "w"] + (["b"] if bias else []), ["y"], name="n", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


LINEAR_OPS = {
    "conv": ("Conv", (2, 4, 9, 8), (6, 4, 3, 3), (6,), {"pads": [1, 0, 2, 1]}),
    "conv_strided_dilated": (
        "Conv",
        (2, 3, 11, 10),
        (4, 3, 3, 2),
        None,
        {"strides": [2, 3], "dilations": [2, 1], "pads": [2, 1, 0, 1]},
    ),
    "conv_same_upper": ("Conv", (1, 2, 7, 6), (3, 2, 4, 4), (3,), {"auto_pad": "SAME_UPPER"}),
    "conv_same_lower": (
        "Conv",
        (1, 2, 7, 6),
        (3, 2, 4, 3),
        None,
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    ),
    "conv_valid_1d": ("Conv", (2, 3, 12), (5, 3, 3), (5,), {"auto_pad": "VALID"}),
    "conv_grouped": ("Conv", (2, 6, 5, 5), (4, 3, 3, 3), (4,), {"group": 2, "pads": [1] * 4}),
    "conv_depthwise_x2": ("Conv", (2, 3, 6, 6), (6, 1, 3, 3), (6,), {"group": 3}),
    "gemm": ("Gemm", (5, 7), (3, 7), (3,), {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    "gemm_no_bias": ("Gemm", (5, 7), (7, 3), None, {}),
    "gemm_row_bias": ("Gemm", (5, 7), (7, 3), (1, 3), {}),
    "matmul_3d": ("MatMul", (2, 5, 7), (7, 4), None, {}),
}


@pytest.mark.parametrize("case", sorted(LINEAR_OPS))
def test_linear_view_computes_the_op(case):
    """patches @ params reproduce the op's own output at sampled positions, and writing
    params back (bias added where there was none) leaves the model's function unchanged."""
    op, x_shape, w_shape, bias, attrs = LINEAR_OPS[case]
    model, feed = single(op, x_shape, w_shape, bias, **attrs)
    (y,) = run(model, feed)
    graph = gs.import_onnx(model)
    lin = rule_of(graph.nodes[0]).linear(graph.nodes[0])
    pos = lin.positions(y.shape, 4, np.random.default_rng(1))
    theta = lin.params()
    x = lin.patches(feed["x"], pos)
    x1 = np.concatenate([x, np.ones(x.shape[:2] + (1,), x.dtype)], axis=2)
    np.testing.assert_allclose(x1 @ theta, lin.outputs(y, pos, None), rtol=1e-4, atol=1e-4)

    theta[:, -1] += 0.25  # a bias change is visible in the rewritten model
    added = lin.set_params(theta)
    graph.nodes.extend(added)
    (y2,) = run(export(graph.toposort(), model), feed)
    np.testing.assert_allclose(y2, y + 0.25, rtol=1e-4, atol=1e-4)


def _pruned(model, keep_fn):
    """Rewrite `model` keeping the channels `keep_fn(cg)` chooses; also what repair needs."""
    loaded = load_model(model)
    graph = loaded.graph()
    cg = analyze(graph, 17, ())
    keep = keep_fn(cg)
    changed = {sp.tensor for sp in cg.spaces if not keep[sp.elements].all()}
    out_keep = {
        n.name: (sp.axis, keep[sp.elements])
        for n in graph.nodes
        if (sp := cg.space(n.outputs[0])) is not None
    }
    return loaded, rewrite(cg, keep), changed, out_keep


def test_least_squares_restores_a_redundant_channel():
    """Conv1's channel 3 is twice channel 1: cutting it loses nothing a refit cannot restore."""
    b = Builder(opset=17)
    w1 = b.rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w1[3] = 2 * w1[1]
    bias1 = b.rng.standard_normal(4).astype(np.float32)
    bias1[3] = 2 * bias1[1]
    h = b.op("Conv", b.input, b.const(w1), b.const(bias1), pads=[1] * 4)
    y = b.op("Conv", h, b.weight(5, 4, 3, 3), b.const(np.zeros(5)), pads=[1] * 4)
    model = b.model(b.op("Flatten", y))
    feeds = [b.feed(seed) for seed in range(4)]

    def keep_fn(cg):
        keep = np.ones(cg.n_elements, bool)
        keep[cg.by_tensor[h].start + 3] = False
        return keep

    loaded, graph, changed, out_keep = _pruned(model, keep_fn)
    unrepaired = run(export(graph.copy(), loaded.proto), feeds[0])[0]
    layers = repair(graph, loaded.proto, changed, out_keep, feeds, "ls")
    repaired = run(export(graph, loaded.proto), feeds[0])[0]
    want = run(model, feeds[0])[0]
    scale = np.abs(want).max()
    assert np.abs(unrepaired - want).max() > 0.05 * scale
    np.testing.assert_allclose(repaired, want, atol=1e-2 * scale)  # ridge: near, not exact
    assert [la.node for la in layers] == [b.nodes[1].name]
    assert layers[0].error_before > 0.01 and layers[0].error_after < 1e-4


@pytest.mark.parametrize("case", [residual_activations, mobilenet, transformer_mlp])
@pytest.mark.parametrize("mode", ["ls", "bias"])
def test_repair_brings_outputs_closer(case, mode, tmp_path):
    """Every refitted layer ends no worse on its data, and on new inputs the repaired model's
    outputs are closer to the original's than the unrepaired model's."""
    b = Builder()
    model = case(b)
    b.shape = (64, *b.shape[1:])
    calib, test = b.feed(1), b.feed(2)
    want = run(model, test)[0]
    error = {}
    for m in ("none", mode):
        report = prune(
            model, tmp_path / f"{m}.onnx", ArrayReader(calib, [b.input], 16), 0.5, repair=m
        )
        error[m] = np.abs(run(onnx.load(tmp_path / f"{m}.onnx"), test)[0] - want).mean()
    assert report.layers, "nothing was refitted"
    for la in report.layers:
        assert la.error_after <= la.error_before + 1e-9
    assert sum(la.error_after for la in report.layers) < sum(
        la.error_before for la in report.layers
    )
    assert error[mode] < error["none"]


def test_ratio_zero_repairs_nothing():
    b = Builder()
    model = residual_activations(b)
    feed = b.feed()
    report = prune(model, None, ArrayReader(feed, ["x"]), 0.0)
    assert report.layers == []


def test_repair_recovers_accuracy_on_held_out_digits(tmp_path):
    """The bundled sample at ratio 0.5: calibrate on 240 images, evaluate on the other 120."""
    root = Path(__file__).resolve().parent.parent / "models"
    pre = Preprocess(size=(16, 16), color="gray", scale=1 / 255, mean=(0.0,), std=(1.0,))
    reader = ImageFolderReader(root / "digits_calib", "input", pre, batch_size=360)
    x, y = reader.get_next()["input"], reader.labels
    order = np.random.default_rng(0).permutation(len(x))
    cal, test = order[:240], order[240:]
    accuracy = {}
    for mode in ("none", "ls"):
        out = tmp_path / f"{mode}.onnx"
        prune(
            root / "digits_resnet.onnx",
            out,
            ArrayReader({"input": x[cal]}, ["input"], 30),
            0.5,
            repair=mode,
        )
        pred = run(onnx.load(out), {"input": x[test]})[0].argmax(1)
        accuracy[mode] = (pred == y[test]).mean()
    original = run(onnx.load(root / "digits_resnet.onnx"), {"input": x[test]})[0].argmax(1)
    assert (original == y[test]).mean() > 0.85
    assert accuracy["none"] < 0.4 and accuracy["ls"] > accuracy["none"] + 0.3
    assert accuracy["ls"] >= (original == y[test]).mean() - 0.05  # a floor, not only a gain


def test_matmul_over_a_spatial_axis_is_not_refitted():
    """A MatMul mixing image columns carries channels through: repair leaves it alone and
    refits the layers around it."""
    b = Builder(shape=(8, 3, 8, 8))
    x = b.cbr(b.input, 3, 8)
    x = b.op("MatMul", x, b.weight(8, 8))  # mixes the W axis, channels pass through
    model = b.model(b.head(b.cbr(x, 8, 8), 8))
    matmul = next(n.name for n in b.nodes if n.op_type == "MatMul")
    report = prune(model, None, ArrayReader(b.feed(), ["x"], 2), 0.5)
    names = [la.node for la in report.layers]
    assert names and matmul not in names


def _relu_resnet(b, blocks=3, c=8):
    """Residual blocks conv-BN-Relu-conv-BN-Add-Relu on a stream of `c` channels; also the
    inner tensors (the first Relu of each block) and the residual sums."""
    s = b.cbr(b.input, 3, c)
    inner, sums = [], []
    for _ in range(blocks):
        h = b.cbr(s, c, c)
        inner.append(h)
        sums.append(b.op("Add", b.bn(b.conv(h, c, c, bias=False), c), s))
        s = b.op("Relu", sums[-1])
    return b.model(b.head(s, c)), inner, sums


def _keep_half(tensors):
    """Cut the first half of the channels of `tensors`, and everything coupled to them."""

    def keep_fn(cg):
        cls = cg.classes()
        cut = [cls[sp.start : sp.start + sp.size // 2] for sp in map(cg.by_tensor.get, tensors)]
        return ~np.isin(cls, np.concatenate(cut))

    return keep_fn


def test_shortcut_targets_cancel_the_error_in_the_stream(monkeypatch):
    """Blocks lose half their inner channels, the stream stays whole: a layer feeding a
    residual Add, fitted to the original's sum (its output plus the shortcut's error), leaves
    the stream closer to the original on new inputs than one fitted to its own output alone."""
    monkeypatch.setattr(repair_module, "RELU_PASSES", 0)
    b = Builder(shape=(32, 3, 8, 8))
    model, inner, sums = _relu_resnet(b, blocks=6)
    calib, test = [b.feed(s) for s in (1, 2, 3, 4)], b.feed(9)
    want = session(model, (sums[-1],)).run([sums[-1]], test)[0]
    error = {}
    for on in (False, True):
        monkeypatch.setattr(repair_module, "SHORTCUTS", on)
        loaded, graph, changed, out_keep = _pruned(model, _keep_half(inner))
        repair(graph, loaded.proto, changed, out_keep, calib, "ls")
        got = session(export(graph, loaded.proto), (sums[-1],)).run([sums[-1]], test)[0]
        error[on] = float(((got - want) ** 2).sum() / (want**2).sum())
    assert error[True] < 0.9 * error[False]


def _chain(b):
    """conv-BN-Relu three times; the cut tensor and the Relu after the first refitted conv."""
    x = b.cbr(b.input, 3, 8)
    r = b.cbr(x, 8, 8)
    return b.model(b.head(b.cbr(r, 8, 8), 8)), [x], r


def _block(b):
    """One residual block: the first refitted conv's Relu comes after BatchNorm and the Add."""
    model, inner, sums = _relu_resnet(b, blocks=1)
    return model, inner, next(n.output[0] for n in b.nodes if n.input[0] == sums[0])


@pytest.mark.parametrize("case", [_chain, _block])
def test_relu_aware_refit_is_no_worse_after_the_relu(monkeypatch, case):
    """A refitted layer followed by BatchNorm and Relu (in a block: BatchNorm, the residual
    Add, Relu): refined for the error after the Relu (where the original is cut off, so may
    the fit be), that error on the calibration data is no larger than with the plain
    least-squares fit, and smaller here; it is reported as `ls-relu`."""
    b = Builder(shape=(16, 3, 8, 8))
    model, cut, r = case(b)
    calib = [b.feed(s) for s in (1, 2)]
    want = np.concatenate([session(model, (r,)).run([r], f)[0] for f in calib])
    error = {}
    for passes in (0, 2):
        monkeypatch.setattr(repair_module, "RELU_PASSES", passes)
        loaded, graph, changed, out_keep = _pruned(model, _keep_half(cut))
        layers = repair(graph, loaded.proto, changed, out_keep, calib, "ls")
        sess = session(export(graph, loaded.proto), (r,))
        got = np.concatenate([sess.run([r], f)[0] for f in calib])
        error[passes] = float(((got - want) ** 2).sum())
        assert (layers[0].method == "ls-relu") == (passes > 0)
    assert error[2] < error[0]


def test_target_pass_in_slices_fits_the_same_weights(monkeypatch):
    """The original's extra outputs fetched a sample at a time (a large model's batch) give
    the weights of one run per batch: the sampled positions are drawn per batch either way."""
    b = Builder(shape=(16, 3, 8, 8))
    model, inner, _ = _relu_resnet(b)
    calib = [b.feed(s) for s in (1, 2)]
    weights = {}
    for limit in (calibrate_module.MAX_RUN_BYTES, 1):
        monkeypatch.setattr(calibrate_module, "MAX_RUN_BYTES", limit)
        loaded, graph, changed, out_keep = _pruned(model, _keep_half(inner))
        if limit == 1:  # the batches of 16 do run a sample at a time
            assert calibrate_module.samples_per_run(loaded.proto, [inner[0]]) == 1
        repair(graph, loaded.proto, changed, out_keep, calib, "ls")
        weights[limit] = [t.values for t in graph.tensors().values() if hasattr(t, "values")]
    for a, c in zip(*weights.values()):
        np.testing.assert_array_equal(a, c)


def test_float32_sums_match_float64_on_rows_far_from_zero():
    """The Gram sums are taken in float32 around the rows' means: on Relu-like rows with a
    large mean (where plain float32 products lose digits) they match float64 to 1e-8."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((2, 3000, 300)) + 40, 0).astype(np.float32)
    y = (x @ rng.standard_normal((300, 20)) + 5).astype(np.float32)
    sums = repair_module._Sums(np.zeros((2, 301, 20)))
    sums.add(x, y)
    x1 = np.concatenate([x.astype(np.float64), np.ones((2, 3000, 1))], axis=2)
    gram, cross = x1.transpose(0, 2, 1) @ x1, x1.transpose(0, 2, 1) @ y.astype(np.float64)
    assert np.abs(sums.gram - gram).max() <= 1e-8 * np.abs(gram).max()
    assert np.abs(sums.cross - cross).max() <= 1e-8 * np.abs(cross).max()
    plain = x.transpose(0, 2, 1) @ x  # what float32 alone gives, for scale
    assert np.abs(plain - gram[:, :-1, :-1]).max() > 100 * np.abs(sums.gram - gram).max()


def test_relu_refinement_through_a_negative_scale_mirrors_a_positive_one(monkeypatch):
    """Relu(-(x W) + c) fitted to Relu(-y + c) is Relu(x (-W) + c) fitted to Relu(-y + c)
    read the other way: the refinement through a BatchNorm scale of -1 (the general path)
    must give the negated weights and the same errors as with +1 and negated targets (the
    fast path), and both must gain over plain least squares."""
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal((1, 400, 12)).astype(np.float32) for _ in range(4)]
    w, v = rng.standard_normal((12, 5)), rng.standard_normal((12, 5))
    ys = [(x[0] @ w + 0.5 * (x[0] @ v) ** 2)[None].astype(np.float32) for x in rows]
    offsets = [rng.standard_normal((1, 400, 5)).astype(np.float32) for _ in rows]
    theta0 = np.concatenate([w, np.zeros((1, 5))])[None]
    out = {}
    for passes, sign in ((0, 1.0), (2, 1.0), (2, -1.0)):
        monkeypatch.setattr(repair_module, "RELU_PASSES", passes)
        stats = repair_module._LeastSquares(sign * -theta0)
        targets = [sign * -y for y in ys]
        for x, y in zip(rows, targets):
            stats.add(x, y)
        scale = np.full(5, sign)
        out[passes, sign] = repair_module._relu_refit(
            stats, rows, targets, offsets, scale, stats.fit()
        )
    np.testing.assert_allclose(out[2, -1.0][0], -out[2, 1.0][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[2, -1.0][1:], out[2, 1.0][1:], rtol=1e-4)
    assert out[2, 1.0][2] < 0.95 * out[0, 1.0][2]  # the refinement did something
