"""Harness: prune with given importances and compare with the zeroed-channel reference."""

import numpy as np
import onnx
import onnxruntime as ort

from nisp_onnx import analyze, load_model, rewrite, select, zero_removed
from nisp_onnx.model_io import export
from nisp_onnx.propagate import class_importance


def plan(proto, ratio, seed=0, exclude=()):
    """Analyze a model and choose removals from random importances: (loaded, removed mask fn)."""
    loaded = load_model(proto)
    opset = loaded.proto.opset_import[0].version

    def build(transform):
        cg = analyze(loaded.graph(), opset, exclude)
        cls = cg.classes()
        groups = cg.groups(cls)
        imp = class_importance(np.random.default_rng(seed).random(cg.n_elements), cls)
        keep = ~select(groups, cls, imp, ratio)[cls]
        out = export(transform(cg, keep), loaded.proto)
        return onnx.shape_inference.infer_shapes(out), groups, keep

    return loaded, build


def run(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check_equivalent(proto, feeds, ratio=0.5, seed=0, rtol=1e-4):
    """Prune `proto` at `ratio`; assert the pruned model equals the zeroed reference.

    Returns (pruned proto, groups) for further checks.
    """
    loaded, build = plan(proto, ratio, seed)
    pruned, groups, keep = build(rewrite)
    reference, _, _ = build(zero_removed)
    onnx.checker.check_model(pruned, full_check=True)
    got, want = run(pruned, feeds), run(reference, feeds)
    original = run(loaded.proto, feeds)
    assert len(got) == len(original)
    for g, w, o in zip(got, want, original):
        assert g.shape == o.shape
        scale = max(1e-6, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)
    return pruned, groups, keep
