"""The real pretrained models of ../shared/data at ratio 0.5 (skipped when it is absent)."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import shared_data  # noqa: E402

from nisp_onnx import ArrayReader, prune  # noqa: E402

pytestmark = pytest.mark.skipif(not shared_data.available(), reason="../shared/data is absent")
MODELS = shared_data.models(n_eval=20) if shared_data.available() else []


@pytest.mark.parametrize("row", MODELS, ids=[r[0] for r in MODELS])
def test_prunes_real_model(row, tmp_path):
    name, path, inp, batch, cal, x, _ = row
    out = tmp_path / "pruned.onnx"
    report = prune(path, out, ArrayReader({inp: cal[:50]}, [inp], batch), 0.5)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {inp: x[:batch]})[0]
    assert got.shape == original.run(None, {inp: x[:batch]})[0].shape
    assert np.isfinite(got).all()
    assert [o.name for o in sess.get_outputs()] == [o.name for o in original.get_outputs()]
    assert report.macs_reduction > 0.6, f"{name}: only {report.macs_reduction:.1%} MACs cut"
    frozen = [g for g in report.groups if g.kept == g.channels]
    assert all(g.frozen == g.channels for g in frozen), "a prunable group was left whole"
