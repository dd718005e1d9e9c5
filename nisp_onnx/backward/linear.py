"""VJPs of Gemm, MatMul and the normalisations, inputs and parameters."""

from __future__ import annotations

import onnx

from .emitter import Emitter, Grads, _only, _out_rank, _rank, attrs_of, fail, unbroadcast

# ---------------------------------------------------------------------------------------------
# linear layers


def _gemm(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    a = attrs_of(node)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)
    A, B, g = node.input[0], node.input[1], dy[0]
    out: Grads = [None] * len(node.input)
    if need[0]:
        if ta:
            out[0] = em.op("Gemm", B, g, alpha=alpha, transA=tb, transB=1)
        else:
            out[0] = em.op("Gemm", g, B, alpha=alpha, transB=1 - tb)
    if need[1]:
        if tb:
            out[1] = em.op("Gemm", g, A, alpha=alpha, transA=1, transB=ta)
        else:
            out[1] = em.op("Gemm", A, g, alpha=alpha, transA=1 - ta)
    if len(need) > 2 and need[2]:
        out[2] = unbroadcast(em, em.op("Mul", g, em.const(beta)), node.input[2], 2, node)
    return out


def _swap_last(em: Emitter, x: str, node: onnx.NodeProto) -> str:
    r = _rank(em, x, node)
    if r < 2:
        raise fail(node, "multiplies a vector")
    return em.op("Transpose", x, perm=[*range(r - 2), r - 1, r - 2])


def _matmul(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    A, B, g = node.input[0], node.input[1], dy[0]
    rank = em.idx.rank(node.output[0]) or _out_rank(em, node)
    ga = gb = None
    if need[0]:
        ga = unbroadcast(em, em.op("MatMul", g, _swap_last(em, B, node)), A, rank, node)
    if need[1]:
        gb = unbroadcast(em, em.op("MatMul", _swap_last(em, A, node), g), B, rank, node)
    return [ga, gb]


def _per_channel(em: Emitter, t: str, rank: int) -> str:
    """A [C] tensor reshaped to broadcast over [N, C, *S] of `rank`."""
    return em.op("Reshape", t, em.ints([-1, *[1] * (rank - 2)]))


def _channel_sum(em: Emitter, t: str, rank: int) -> str:
    """[N, C, *S] summed to [C]."""
    return em.op("ReduceSum", t, em.ints([0, *range(2, rank)]), keepdims=0)


def _batch_norm(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    """Inference mode: y = scale * xhat + bias, xhat = (x - mean) / sqrt(var + eps)."""
    _only(node, need, {0, 1, 2})
    a = attrs_of(node)
    if a.get("training_mode", 0):
        raise fail(node, "is in training mode")
    x, scale, bias, mean, var = node.input[:5]
    r = _rank(em, x, node)
    std = em.op("Sqrt", em.op("Add", var, em.const(a.get("epsilon", 1e-5))))
    out: Grads = [None] * len(node.input)
    if need[0]:
        out[0] = em.op("Mul", dy[0], _per_channel(em, em.op("Div", scale, std), r))
    if need[1]:
        xhat = em.op("Div", em.op("Sub", x, _per_channel(em, mean, r)), _per_channel(em, std, r))
        out[1] = _channel_sum(em, em.op("Mul", dy[0], xhat), r)
    if need[2]:
        out[2] = _channel_sum(em, dy[0], r)
    return out


def _layer_norm(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    """dx = (g - mean(g) - xhat * mean(g * xhat)) / std with g = dy * scale, means over the
    normalized axes."""
    _only(node, need, {0, 1, 2})
    x, scale, a = node.input[0], node.input[1], attrs_of(node)
    r = _rank(em, x, node)
    axes = list(range(a.get("axis", -1) % r, r))
    lead = em.ints(range(axes[0]))
    count, ax = em.count(x, axes), em.ints(axes)

    def mean(t: str) -> str:
        return em.op("Div", em.op("ReduceSum", t, ax, keepdims=1), count)

    centred = em.op("Sub", x, mean(x))
    var = mean(em.op("Mul", centred, centred))
    std = em.op("Sqrt", em.op("Add", var, em.const(a.get("epsilon", 1e-5))))
    xhat = em.op("Div", centred, std)
    out: Grads = [None] * len(node.input)
    if need[1]:
        out[1] = em.op("ReduceSum", em.op("Mul", dy[0], xhat), lead, keepdims=0)
    if len(need) > 2 and need[2]:
        out[2] = em.op("ReduceSum", dy[0], lead, keepdims=0)
    if need[0]:
        g = em.op("Mul", dy[0], scale)
        inner = em.op("Add", mean(g), em.op("Mul", xhat, mean(em.op("Mul", g, xhat))))
        out[0] = em.op("Div", em.op("Sub", g, inner), std)
    return out
