"""Importance criteria: each against a direct computation, and all behind one interface."""

import numpy as np
import pytest
from graphs import Builder
from onnx import numpy_helper
from test_rules import chain, residual_activations

from nisp_onnx import (
    CRITERIA,
    ArrayReader,
    Context,
    NispError,
    analyze,
    collect,
    criteria,
    load_model,
    prune,
)
from nisp_onnx.analyze import find_frl
from nisp_onnx.criteria import FilterL1, NispInfs, NispMag, get_criterion
from nisp_onnx.infs import (
    fisher_scores,
    infs_scores,
    mutual_information,
    supervised_infs_scores,
)
from nisp_onnx.verify import ware


def context(model, feed):
    loaded = load_model(model)
    graph = loaded.graph()
    cg = analyze(graph, 14, ())
    frl = find_frl(graph)[0]
    calib = collect(loaded.proto, ArrayReader(feed, ["x"]), frl)
    return Context(cg, cg.classes(), frl, calib, loaded.proto, seed=3)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_prunes_to_the_same_size(name):
    b = Builder(shape=(8, 3, 8, 8))
    model = residual_activations(b)
    reader = ArrayReader(b.feed(), ["x"], 4, labels=np.arange(8) % 5)
    report = prune(model, None, reader, 0.5, criterion=name, repair="none", global_ranking=False)
    reference = prune(model, None, ArrayReader(b.feed(), ["x"], 4), 0.5, repair="none")
    assert report.criterion == name
    assert report.macs_after == reference.macs_after < report.macs_before


def test_nisp_mag_scores_frl_by_classifier_weight_magnitude():
    b = Builder(shape=(8, 3, 8, 8))
    model = chain(b)
    ctx = context(model, b.feed())
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    w = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    weight = numpy_helper.to_array(w)  # [classes, features] (transB)
    np.testing.assert_allclose(NispMag().frl_scores(ctx), np.abs(weight).sum(axis=0), rtol=1e-6)


def test_l1_is_the_filter_norm_of_each_channel():
    b = Builder(shape=(8, 3, 8, 8))
    model = chain(b)
    ctx = context(model, b.feed())
    conv = next(n for n in ctx.cg.graph.nodes if n.op == "Conv")
    sp = ctx.cg.space(conv.outputs[0])
    norms = np.abs(conv.inputs[1].values).reshape(sp.size, -1).sum(axis=1)
    got = FilterL1().importance(ctx)[ctx.element_class[sp.elements]]
    assert np.all(got >= norms - 1e-6)  # a class adds the norms of all filters it spans
    assert np.argsort(got).tolist() == np.argsort(norms).tolist()


def test_random_is_seeded_and_lbl_scores_live_channels():
    b = Builder(shape=(8, 3, 8, 8))
    ctx = context(chain(b), b.feed())
    r1, r2 = (get_criterion("random").importance(ctx) for _ in range(2))
    np.testing.assert_array_equal(r1, r2)
    lbl = get_criterion("lbl").importance(ctx)
    assert lbl.shape == r1.shape and (lbl > 0).sum() > len(lbl) // 2


def test_user_criterion_object():
    class Last:
        name = "last-first"

        def importance(self, ctx):
            return np.arange(ctx.element_class.max() + 1, dtype=float)

    b = Builder(shape=(8, 3, 8, 8))
    report = prune(chain(b), None, ArrayReader(b.feed(), ["x"]), 0.5, criterion=Last())
    assert report.criterion == "last-first" and report.macs_after < report.macs_before
    with pytest.raises(NispError, match="unknown criterion"):
        get_criterion("magic")
    with pytest.raises(NispError, match="importance"):
        get_criterion(object())


def test_ware_by_hand():
    y = np.array([[1.0, 2.0, 0.0], [-2.0, 4.0, 0.0]])
    y_hat = np.array([[1.5, 2.0, 7.0], [-2.0, 2.0, 7.0]])
    scores = np.array([1.0, 3.0, 2.0])  # mean 2: weights 0.5, 1.5, (1.0, never used: y == 0)
    # relative errors 0.5 and 0.5 on neurons 0 and 1, zero elsewhere; 4 live entries
    assert ware(y, y_hat, scores) == pytest.approx((0.5 * 0.5 + 1.5 * 0.5) / 4)
    assert ware(y, y, scores) == 0.0


def test_bn_scale_is_the_largest_batchnorm_scale_of_each_class():
    b = Builder(shape=(8, 3, 8, 8))
    model = residual_activations(b)
    ctx = context(model, b.feed())
    imp = get_criterion("bn-scale").importance(ctx)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    want = np.full(len(imp), -np.inf)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            gamma, var = inits[node.input[1]], inits[node.input[4]]
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            sp = ctx.cg.by_tensor[node.output[0]]
            cls = ctx.element_class[sp.elements]
            want[cls] = np.maximum(want[cls], np.abs(gamma) / np.sqrt(var + eps))
    want[~np.isfinite(want)] = np.inf  # no BatchNorm: never cut
    np.testing.assert_allclose(imp, want, rtol=1e-6)


def test_bn_scale_uses_one_global_threshold_and_keeps_three():
    b = Builder(shape=(8, 3, 8, 8))
    model = residual_activations(b)
    r = prune(model, None, ArrayReader(b.feed(), ["x"], 4), 0.8, criterion="bn-scale")
    assert r.plan.startswith("global ratio 0.8")
    assert all(g.kept >= min(3, g.channels) for g in r.groups)
    assert len({round(g.kept / g.channels, 2) for g in r.groups if not g.frozen}) > 1


def test_bn_scale_without_batchnorm_is_a_user_error():
    b = Builder(shape=(8, 3, 8, 8))
    x = b.op("Relu", b.conv(b.input, 3, 4))
    model = b.model(b.head(x, 4))
    with pytest.raises(NispError, match="bn-scale needs BatchNormalization"):
        prune(model, None, ArrayReader(b.feed(), ["x"]), 0.5, criterion="bn-scale")


def test_supervised_infs_parts_against_direct_computations():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(3), 100))
    x = rng.standard_normal((300, 4))
    x[:, 0] += 2 * y  # informative
    # Fisher score by its definition
    mu = x.mean(0)
    between = sum((y == c).sum() * (x[y == c].mean(0) - mu) ** 2 for c in range(3))
    within = sum((y == c).sum() * x[y == c].var(0) for c in range(3))
    np.testing.assert_allclose(fisher_scores(x, y), between / within)
    # a feature that is the label itself carries H(Y) = ln 3 nats; an independent one about 0
    h = np.log(3)
    mi = mutual_information(np.column_stack([y.astype(float), rng.random(300)]), y, bins=3)
    assert mi[0] == pytest.approx(h) and mi[1] < 0.05
    scores = supervised_infs_scores(x, y)
    assert scores.argmax() == 0


def test_supervised_criterion_needs_labels():
    b = Builder(shape=(8, 3, 8, 8))
    model = chain(b)
    with pytest.raises(NispError, match="needs labels"):
        prune(model, None, ArrayReader(b.feed(), ["x"]), 0.5, criterion="nisp-infs-supervised")


def test_wide_spatial_frl_is_ranked_on_channel_means(monkeypatch):
    b = Builder(shape=(16, 3, 8, 8))
    x = b.cbr(b.input, 3, 8)
    logits = b.op("Relu", b.conv(x, 8, 5, k=1))
    model = b.model(b.op("Flatten", b.op("GlobalAveragePool", logits)))
    ctx = context(model, b.feed())
    assert ctx.calib.responses.shape[1] == 8 * 8 * 8
    full = NispInfs().frl_scores(ctx)  # 512 features: ranked per position, summed
    monkeypatch.setattr(criteria, "MAX_FEATURES", 100)
    pooled = NispInfs().frl_scores(ctx)
    means = ctx.calib.responses.reshape(16, 8, 64).mean(axis=2)
    np.testing.assert_allclose(pooled, infs_scores(means))
    assert pooled.shape == full.shape == (8,)
