"""Every architecture from both PyTorch exporters (tests/fixtures, built by
tools/make_fixtures.py): pruned at ratio 0.5 with random importances, the model passes the
full checker, runs, keeps its outputs, computes what the original computes with the removed
channels zeroed, and has fewer MACs."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from equivalence import check_equivalent

from nisp_onnx import load_model
from nisp_onnx.verify import count

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.onnx"))


def _feed(model: onnx.ModelProto) -> dict:
    inp = model.graph.input[0]
    shape = [d.dim_value or 2 for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return {inp.name: x}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_architecture_prunes_equivalently(path):
    model = onnx.load(str(path))
    feed = _feed(model)
    pruned, groups, keep = check_equivalent(model, feed, ratio=0.5)
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert not keep.all(), "nothing was pruned"
    shapes = {k: v.shape for k, v in feed.items()}
    before, _ = count(load_model(model).proto, shapes)  # run-time shapes folded
    after, _ = count(pruned, shapes)
    assert after < before
    for g in groups:
        if g.frozen.any():
            assert g.reasons, f"group {g.id} is frozen without a reason"
            # nothing but the outputs stays: every idiom of both exporters has a rule
            assert all("graph output" in r for r in g.reasons), g.reasons


def test_fixtures_cover_both_exporters():
    stems = {p.stem for p in FIXTURES}
    archs = {s.rsplit("_", 1)[0] for s in stems}
    assert len(archs) >= 18
    for a in archs:
        assert {f"{a}_torchscript", f"{a}_dynamo"} <= stems
