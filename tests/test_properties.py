"""Property tests on random valid CNNs built from the supported op patterns (conv chains,
residual blocks, concat branches, depthwise and grouped convs, pooling, squeeze-excitation,
Gemm heads; see random_graphs.py):

- pruning at any ratio gives a model that passes the full checker, runs in onnxruntime, keeps
  the graph's inputs and outputs, and computes what the original computes with the removed
  channels zeroed (tests/equivalence.py);
- ratio 0 reproduces the original;
- the whole pipeline (`prune`, every criterion, repair mode and plan) ends in a valid model
  with the original's outputs, or in a one-line NispError.

Deterministic (derandomize, no example database); NISP_PROPERTY_EXAMPLES scales the counts.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from equivalence import check_equivalent, run
from graphs import Builder
from hypothesis import HealthCheck, Phase, event, given, settings, target
from hypothesis import strategies as st
from random_graphs import BLOCKS, cnn

from nisp_onnx import CRITERIA, ArrayReader, NispError, prune
from nisp_onnx.repair import MODES

SCALE = float(os.environ.get("NISP_PROPERTY_EXAMPLES", "1"))


def profile(n):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
        print_blob=False,
    )


def _outputs(model):
    return [
        (o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
        for o in model.graph.output
    ]


def _check_pruned(case, ratio, seed):
    pruned, groups, keep = check_equivalent(case.model, case.feeds, ratio=ratio, seed=seed)
    assert _outputs(pruned) == _outputs(case.model)
    assert [i.name for i in pruned.graph.input] == [i.name for i in case.model.graph.input]
    removed = float((~keep).mean())
    event("pruned something" if removed else "pruned nothing")
    target(removed, label="fraction of channels removed")
    if ratio >= 0.5 and any(g.prunable >= 2 for g in groups):
        assert removed > 0, "a prunable group kept every channel at ratio >= 0.5"


@pytest.mark.parametrize("kind", BLOCKS)
@profile(20)
@given(data=st.data(), ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
def test_each_pattern_prunes_to_zeroed_reference(kind, data, ratio, seed):
    """Every pattern appears in every run: random graphs that contain it."""
    _check_pruned(data.draw(cnn(required=kind), label="case"), ratio, seed)


@profile(80)
@given(case=cnn(max_blocks=6), ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
def test_pruned_equals_zeroed_reference(case, ratio, seed):
    _check_pruned(case, ratio, seed)


@profile(30)
@given(case=cnn())
def test_ratio_zero_reproduces_original(case):
    pruned, _, keep = check_equivalent(case.model, case.feeds, ratio=0.0)
    assert keep.all()
    for got, want in zip(run(pruned, case.feeds), run(case.model, case.feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    dims = {t.name: list(t.dims) for t in case.model.graph.initializer}
    for t in pruned.graph.initializer:
        assert t.name not in dims or list(t.dims) == dims[t.name], t.name


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@profile(6)
@given(
    case=cnn(max_blocks=4),
    ratio=st.floats(0.0, 0.9),
    repair=st.sampled_from(MODES),
    plan=st.sampled_from(["uniform", "global", "target-macs", "round-to"]),
    samples=st.integers(2, 24),
)
def test_prune_pipeline_on_random_graphs(case, ratio, criterion, repair, plan, samples):
    shape = case.feeds["x"].shape[1:]
    x = np.random.default_rng(samples).standard_normal((samples, *shape)).astype(np.float32)
    reader = ArrayReader({"x": x}, ["x"], 8, labels=np.arange(samples) % 3)
    kw = {
        "global": {"global_ranking": True, "max_layer_ratio": 0.8},
        "target-macs": {"target_macs": 1 - ratio / 2},
        "round-to": {"round_to": 2},
    }.get(plan, {})
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pruned.onnx"
        try:
            prune(case.model, out, reader, ratio, criterion=criterion, repair=repair, **kw)
        except NispError as e:
            assert "\n" not in str(e)
            event(f"NispError: {str(e).split(':')[0][:40]}")
            assert not out.exists()
            return
        pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert _outputs(pruned) == _outputs(case.model)
    got, want = run(pruned, case.feeds), run(case.model, case.feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got)


def test_supervised_infs_one_sample_per_class():
    b = Builder(shape=(1, 4, 8, 8), opset=13)
    model = b.model(b.head(b.op("Relu", b.conv(b.input, 4, 4, group=4)), 4, classes=3))
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    reader = ArrayReader({"x": x}, ["x"], 8, labels=np.array([0, 1]))
    prune(model, None, reader, 0.5, criterion="nisp-infs-supervised")
