"""The Python API: readers, reports, external data, exclusions."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Builder
from test_rules import residual_activations

from nisp_onnx import ArrayReader, NispError, prune

SAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


class ListReader:
    """A user's reader, as onnxruntime's CalibrationDataReader would be."""

    def __init__(self, batches):
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save_model(
        onnx.load(SAMPLE),
        src,
        save_as_external_data=True,
        location="in.onnx.data",
        size_threshold=0,
    )
    x = np.random.default_rng(0).random((16, 1, 16, 16), dtype=np.float32)
    report = prune(src, tmp_path / "out.onnx", ListReader([{"input": x}]), 0.5)
    assert (tmp_path / "out.onnx.data").exists()
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert report.size_after < report.size_before


def test_exclude_keeps_node_channels():
    b = Builder()
    model = residual_activations(b)
    conv = next(n for n in b.nodes if n.op_type == "Conv" and n.name != b.nodes[0].name)
    x = b.feed()["x"]
    report = prune(model, None, ArrayReader({"x": x}, ["x"]), 0.5, exclude=[conv.name])
    whole = [g for g in report.groups if any("excluded" in r for r in g.reasons)]
    assert len(whole) == 1 and whole[0].kept == whole[0].channels
    assert any(g.kept < g.channels for g in report.groups)


def test_unknown_exclude_and_missing_frl_are_user_errors():
    b = Builder()
    model = residual_activations(b)
    reader = ArrayReader(b.feed(), ["x"])
    with pytest.raises(NispError, match="--exclude names no node"):
        prune(model, None, reader, 0.5, exclude=["nope"])
    b2 = Builder()
    no_classifier = b2.model(b2.op("Relu", b2.cbr(b2.input, 3, 4)))
    with pytest.raises(NispError, match="--frl"):
        prune(no_classifier, None, ArrayReader(b2.feed(), ["x"]), 0.5)


def test_labels_give_accuracy():
    b = Builder()
    model = residual_activations(b)
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    labels = np.arange(12) % 5
    report = prune(model, None, ArrayReader({"x": x}, ["x"], 4, labels=labels), 0.0)
    assert report.agreement == 1.0
    assert report.accuracy_before == report.accuracy_after
    assert report.to_dict()["macs_reduction"] == 0.0
