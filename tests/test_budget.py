"""How much is pruned where: MACs model, layer ratios, global ranking, MACs targets, rounding,
measured sensitivity."""

import numpy as np
import onnx
import pytest
from graphs import Builder
from onnx import numpy_helper
from scipy.special import log_softmax, softmax
from test_rules import chain, inception, mobilenet, option_a, residual_activations

from nisp_onnx import ArrayReader, NispError, analyze, load_model, prune, rewrite, sensitivity
from nisp_onnx.analyze import find_frl
from nisp_onnx.budget import GlobalRanking, MacModel, Plan, allocate
from nisp_onnx.calibrate import collect
from nisp_onnx.model_io import export
from nisp_onnx.propagate import class_importance
from nisp_onnx.select import select
from nisp_onnx.sensitivity import STEPS, MaskedModel, damage
from nisp_onnx.verify import count, node_macs


def _plan(model, ratio, seed):
    loaded = load_model(model)
    cg = analyze(loaded.graph(), 14, ())
    cls = cg.classes()
    groups = cg.groups(cls)
    imp = class_importance(np.random.default_rng(seed).random(cg.n_elements), cls)
    return loaded, cg, cls, groups, imp


@pytest.mark.parametrize("case", [chain, residual_activations, mobilenet, inception, option_a])
@pytest.mark.parametrize("seed", [0, 1])
def test_mac_model_predicts_the_counted_macs(case, seed):
    b = Builder()
    model = case(b)
    loaded, cg, cls, groups, imp = _plan(model, 0.5, seed)
    shapes = {"x": b.shape}
    macs = MacModel(cg, node_macs(loaded.proto, shapes))
    ratios = list(np.random.default_rng(seed).uniform(0, 0.8, len(groups)))
    keep = ~select(groups, cls, imp, ratios)[cls]
    predicted = macs.macs(keep)
    pruned = onnx.shape_inference.infer_shapes(export(rewrite(cg, keep), loaded.proto))
    counted, _ = count(pruned, shapes)
    assert predicted == pytest.approx(counted, rel=1e-9)
    assert macs.total == count(loaded.proto, shapes)[0]


def _wide_residual(width=32):
    b = Builder(shape=(16, 3, 8, 8))
    x = b.cbr(b.input, 3, width)
    for _ in range(3):
        y = b.cbr(b.cbr(x, width, 3 * width // 4), 3 * width // 4, width)
        x = b.op("Relu", b.op("Add", x, y))
    return b, b.model(b.head(x, width))


def test_layer_ratio_overrides_the_groups_of_matching_nodes():
    b, model = _wide_residual()
    first_inner = [n for n in b.nodes if n.op_type == "Conv"][1].name
    reader = ArrayReader(b.feed(), ["x"], 8)
    r = prune(model, None, reader, 0.5, repair="none", layer_ratio={first_inner: 0.25})
    kept = {tuple(g.nodes): g.kept / g.channels for g in r.groups if not g.frozen}
    override = [k for k in kept if first_inner in k]
    assert len(override) == 1 and kept[override[0]] == pytest.approx(0.75)
    assert all(v == pytest.approx(0.5) for k, v in kept.items() if first_inner not in k)


def test_global_ranking_removes_the_ratio_of_all_channels_and_respects_the_cap():
    b, model = _wide_residual()
    loaded, cg, cls, groups, imp = _plan(model, 0.5, 0)
    free = [True] * len(groups)
    ranking = GlobalRanking(groups, imp, free, max_ratio=0.6)
    prunable = sum(g.prunable for g in groups)
    k = int(round(0.5 * prunable))
    ratios = ranking.ratios(k, [None] * len(groups))
    assert sum(r * max(g.prunable, 1) for r, g in zip(ratios, groups)) == pytest.approx(k)
    assert max(ratios) <= 0.6 + 1e-9
    # scores are normalised per group: scaling one group's scores changes nothing
    scaled = imp.copy()
    scaled[groups[1].classes] *= 1e6
    again = GlobalRanking(groups, scaled, free, max_ratio=0.6).ratios(k, [None] * len(groups))
    np.testing.assert_allclose(again, ratios)


@pytest.mark.parametrize("target", [0.5, 0.7])  # 0.7: aiming at 1 - target would land at 0.3
@pytest.mark.parametrize("global_ranking", [False, True])
def test_target_macs_lands_within_one_percent(global_ranking, target):
    b, model = _wide_residual(64)
    reader = ArrayReader(b.feed(), ["x"], 8)
    r = prune(model, None, reader, repair="none", target_macs=target, global_ranking=global_ranking)
    assert r.macs_after / r.macs_before == pytest.approx(target, abs=0.01)
    assert f"target MACs {target:g}" in r.summary()


def test_target_macs_cuts_where_measured_damage_is_least():
    b, model = _wide_residual(64)
    loaded, cg, cls, groups, imp = _plan(model, 0.5, 0)
    macs = MacModel(cg, node_macs(loaded.proto, {"x": b.shape}))
    cheap = next(i for i, g in enumerate(groups) if g.prunable and len(g.spaces) <= 3)
    table = np.tile(np.arange(len(STEPS), dtype=float), (len(groups), 1))
    table[cheap] = 0.0  # cutting this group costs nothing
    plan = Plan(target_macs=0.9)
    removed = allocate(groups, cls, imp, plan, macs, lambda measure: table)
    keep = ~removed[cls]
    assert macs.macs(keep) == pytest.approx(0.9 * macs.total, rel=0.01)
    lost = [1 - keep[groups[i].spaces[0].elements].mean() for i in range(len(groups))]
    assert lost[cheap] > 0 and all(lost[i] == 0 for i in range(len(groups)) if i != cheap)


def test_unreachable_target_is_a_user_error():
    b, model = _wide_residual()
    with pytest.raises(NispError, match="at most .* of the MACs can be removed"):
        prune(model, None, ArrayReader(b.feed(), ["x"]), target_macs=0.2, max_layer_ratio=0.3)


def test_round_to_keeps_multiples(tmp_path):
    b, model = _wide_residual()
    out = tmp_path / "out.onnx"
    prune(model, out, ArrayReader(b.feed(), ["x"], 8), 0.4, repair="none", round_to=8)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    convs = [n for n in onnx.load(out).graph.node if n.op_type == "Conv"]
    widths = [weights[n.input[1]].shape[0] for n in convs]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 32


def test_masked_model_and_damage_table():
    b, model = _wide_residual()
    loaded, cg, cls, groups, imp = _plan(model, 0.5, 0)
    batches = [b.feed()]
    masked = MaskedModel(cg, loaded.proto)
    sess_out = collect(loaded.proto, ArrayReader(b.feed(), ["x"]), find_frl(cg.graph)[0])
    original = masked.run(batches, np.ones(cg.n_elements, bool))
    assert (original.argmax(1) == sess_out.predictions).all()
    # zeroing through the masks is the zeroed-channel reference of a real cut
    keep = ~select(groups, cls, imp, 0.5)[cls]
    pruned = export(rewrite(cg, keep), loaded.proto)
    from equivalence import run

    np.testing.assert_allclose(masked.run(batches, keep), run(pruned, b.feed())[0], atol=1e-4)
    _, cg, cls, groups, imp = _plan(model, 0.5, 0)
    table = damage(cg, loaded.proto, batches, groups, cls, imp, [g.prunable > 0 for g in groups])
    assert table.shape == (len(groups), len(STEPS))
    assert (table[:, 0] == 0).all() and (np.diff(table, axis=1) >= 0).all()
    assert table[:, -1].max() > 0


def test_damage_is_the_kl_divergence_of_softened_predictions():
    """Each entry is KL(p || q) of the softmax of the logits over TEMPERATURE, original p
    against the cut model's q (zero-filled here), made non-decreasing along the steps. The
    table runs only the nodes after each group's masks; the whole masked model must agree."""
    b, model = _wide_residual()
    loaded, cg, cls, groups, imp = _plan(model, 0.5, 0)
    batches = [b.feed(1), b.feed(2)]
    measure = [g.prunable >= 10 for g in groups]
    assert sum(measure) >= 3
    table = damage(cg, loaded.proto, batches, groups, cls, imp, measure, fill_means=False)
    masked = MaskedModel(cg, loaded.proto)
    t = sensitivity.TEMPERATURE
    logp = log_softmax(masked.run(batches, np.ones(cg.n_elements, bool)) / t, axis=1)
    for i in np.flatnonzero(measure):
        want = [0.0]
        for ratio in STEPS[1:]:
            ratios = [ratio if k == i else 0.0 for k in range(len(groups))]
            keep = ~select(groups, cls, imp, ratios)[cls]
            logq = log_softmax(masked.run(batches, keep) / t, axis=1)
            want.append(float((np.exp(logp) * (logp - logq)).sum(1).mean()))
        assert want[-1] > 1e-4  # the cut changes the predictions measurably
        np.testing.assert_allclose(table[i], np.maximum.accumulate(want), rtol=1e-3, atol=1e-7)
    assert (table[~np.array(measure)] == 0).all()


def test_probability_outputs_are_softened_like_their_logits():
    """A model whose output is already a softmax is compared as its logits would be."""
    z = np.random.default_rng(0).normal(size=(5, 7)) * 3
    want = log_softmax(z / sensitivity.TEMPERATURE, axis=1)
    np.testing.assert_allclose(sensitivity._log_probs(z), want, atol=1e-9)
    np.testing.assert_allclose(sensitivity._log_probs(softmax(z, axis=1)), want, atol=1e-9)


def test_removed_channels_take_their_means_in_the_damage_measure():
    """With calibration batches, a removed channel is filled with its mean: a classifier
    reading pooled features then keeps its mean output exactly (bias compensation), which
    zero-filling does not."""
    b = Builder(shape=(16, 3, 8, 8))
    model = b.model(b.head(b.cbr(b.input, 3, 8), 8))
    loaded, cg, cls, groups, imp = _plan(model, 0.5, 0)
    batches = [b.feed(1), b.feed(2)]
    keep = ~select(groups, cls, imp, 0.5)[cls]
    want = MaskedModel(cg, loaded.proto).run(batches, np.ones(cg.n_elements, bool)).mean(0)
    filled = MaskedModel(cg, loaded.proto, batches).run(batches, keep).mean(0)
    zeroed = MaskedModel(cg, loaded.proto).run(batches, keep).mean(0)
    np.testing.assert_allclose(filled, want, atol=1e-4)
    assert np.abs(zeroed - want).max() > 1e-2


@pytest.mark.parametrize("case", [chain, mobilenet])
def test_selection_removes_the_least_important_classes(case):
    """With known importances, every group whose tensors all hold the same classes loses
    exactly its lowest-scored prunable classes, as many as the ratio asks."""
    b = Builder()
    _, _, cls, groups, imp = _plan(case(b), 0.5, 3)
    removed = select(groups, cls, imp, 0.5)
    checked = 0
    for g in groups:
        same = all(np.array_equal(np.unique(cls[sp.elements]), g.classes) for sp in g.spaces)
        if not same or not g.prunable:
            continue
        free = g.classes[~g.frozen]
        quota = min(int(round(0.5 * len(free))), len(g.classes) - 1)
        lowest = free[np.argsort(imp[free], kind="stable")[:quota]]
        assert set(g.classes[removed[g.classes]].tolist()) == set(lowest.tolist()), g.nodes
        checked += 1
    assert checked >= 2
