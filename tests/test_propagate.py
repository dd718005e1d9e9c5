"""NISP propagation against the formulas by hand: s_in = |W|^T s_out, BN and Mul gains."""

import numpy as np
from graphs import Builder
from onnx import numpy_helper

from nisp_onnx import analyze, load_model, propagate


def test_matches_hand_computation():
    b = Builder()
    x0 = b.conv(b.input, 3, 5)
    x = b.conv(x0, 5, 4, bias=False)
    y = b.op("Mul", b.bn(x, 4), b.const(np.array([1.0, -2.0, 3.0, 0.5]).reshape(4, 1, 1)))
    f = b.op("Flatten", b.op("GlobalAveragePool", b.op("Relu", y)))
    h = b.op("Relu", b.gemm(f, 4, 6))
    model = b.model(b.gemm(h, 6, 3))
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    node = {n.op_type: n for n in model.graph.node}  # the last of each op type
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]

    cg = analyze(load_model(model).graph(), 14)
    seed = np.arange(1.0, 7.0)  # importance of the FRL, the last Gemm's input (6 features)
    direct = propagate(cg, cg.by_tensor[h], seed)

    s_f = np.abs(inits[gemms[0].input[1]]).T @ seed  # W is [6, 4] (transB)
    np.testing.assert_allclose(direct[cg.by_tensor[f].elements], s_f)
    bn = node["BatchNormalization"]
    gamma, var = inits[bn.input[1]], inits[bn.input[4]]
    s_x = s_f * np.array([1.0, 2.0, 3.0, 0.5]) * np.abs(gamma / np.sqrt(var + 1e-5))
    w = np.abs(inits[conv.input[1]]).sum(axis=(2, 3))  # [4, 5]
    np.testing.assert_allclose(direct[cg.by_tensor[x0].elements], w.T @ s_x)
    assert direct[cg.by_tensor[x].elements].sum() == 0  # carried, not read by a mixing layer
