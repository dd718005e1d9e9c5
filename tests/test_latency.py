"""Side-by-side latency measurement (`nisp_onnx.latency`)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nisp_onnx import NispError
from nisp_onnx.latency import Latency, compare, input_shapes


def convs(widths, size=32, batch="N"):
    """x [batch, widths[0], size, size] through 3x3 convs to each next width."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3), np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, w.name], [f"y{i}"], pads=[1] * 4))
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, widths[0], size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, widths[-1], size, size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_more_compute_measures_slower():
    big = convs([16, 128, 16])  # 38 M MACs per sample
    small = convs([16, 4, 16])  # 1.2 M MACs per sample: 32x fewer
    results = compare(big, small, {"x": (1, 16, 32, 32)}, batch_sizes=(1, 4), min_time_s=0.2)
    assert [r.batch_size for r in results] == [1, 4]
    for r in results:
        assert isinstance(r, Latency) and r.threads == 1 and r.runs >= 5
        assert r.original_ms > 0 and r.pruned_ms > 0
        assert r.original_ms > 3 * r.pruned_ms, r.describe()
        assert r.speedup > 3 and 0.66 < r.reduction < 1
        d = r.to_dict()
        assert set(d) >= {"batch_size", "threads", "original_ms", "pruned_ms", "speedup"}
        assert "batch" in r.describe()
    slower = Latency(1, 1, original_ms=10.0, pruned_ms=15.24, runs=5)
    assert "(+52.4%," in slower.describe() and "--" not in slower.describe()


def test_fixed_batch_and_shapes_from_model(tmp_path):
    model = convs([3, 4], size=8, batch=2)
    assert input_shapes(model) == {"x": (2, 3, 8, 8)}
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    (r,) = compare(path, model, min_time_s=0.0, min_runs=3, warmup=1, threads=2)
    assert r.batch_size == 2 and r.runs == 3 and r.threads == 2


def test_dynamic_spatial_needs_shapes():
    model = convs([3, 4], size="H")
    with pytest.raises(NispError, match="dynamic"):
        input_shapes(model)
    (r,) = compare(model, model, {"x": (1, 3, 8, 8)}, batch_sizes=(3,), min_time_s=0.0)
    assert r.batch_size == 3
