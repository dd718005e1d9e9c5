"""VJPs of elementwise ops: activations and broadcasting arithmetic."""

from __future__ import annotations

import numpy as np
import onnx

from .emitter import (
    Emitter,
    Grads,
    _mul,
    _only,
    _out_rank,
    _positive,
    _rank,
    _where,
    attrs_of,
    unbroadcast,
)

# ---------------------------------------------------------------------------------------------
# elementwise activations


def _relu(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return _where(em, _positive(em, x), dy)


def _leaky_relu(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    alpha = attrs_of(node).get("alpha", 0.01)
    return _where(em, _positive(em, x), dy, em.op("Mul", dy, em.const(alpha)))


def _clip(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    a = attrs_of(node)
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    lo = lo or (em.const(a["min"]) if "min" in a else None)
    hi = hi or (em.const(a["max"]) if "max" in a else None)
    masks = [em.op("Greater", x, lo)] if lo else []
    masks += [em.op("Less", x, hi)] if hi else []
    if not masks:
        return dy
    mask = masks[0] if len(masks) == 1 else em.op("And", *masks)
    return _where(em, mask, dy)


def _sigmoid(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return _mul(em, dy, y, em.op("Sub", em.const(1.0), y))


def _hard_sigmoid(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    alpha = attrs_of(node).get("alpha", 0.2)
    inside = em.op("And", _positive(em, y), em.op("Less", y, em.const(1.0)))
    return _where(em, inside, em.op("Mul", dy, em.const(alpha)))


def _hard_swish(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    slope = em.op("Add", em.op("Mul", x, em.const(1 / 3)), em.const(0.5))
    slope = _where(em, em.op("Greater", x, em.const(3.0)), em.const(1.0), slope)
    slope = _where(em, em.op("Less", x, em.const(-3.0)), em.const(0.0), slope)
    return em.op("Mul", dy, slope)


def _tanh(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return em.op("Mul", dy, em.op("Sub", em.const(1.0), em.op("Mul", y, y)))


def _erf(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    gauss = em.op("Exp", em.op("Neg", em.op("Mul", x, x)))
    return _mul(em, dy, gauss, em.const(2 / np.sqrt(np.pi)))


def _gelu(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    if attrs_of(node).get("approximate", "none") == "tanh":
        c = np.sqrt(2 / np.pi)
        x2 = em.op("Mul", x, x)
        u = _mul(em, x, em.op("Add", em.const(1.0), em.op("Mul", x2, em.const(0.044715))))
        t = em.op("Tanh", em.op("Mul", u, em.const(c)))
        du = em.op("Add", em.const(c), em.op("Mul", x2, em.const(3 * 0.044715 * c)))
        sech2 = em.op("Sub", em.const(1.0), em.op("Mul", t, t))
        d = em.op("Add", em.op("Add", em.const(1.0), t), _mul(em, x, sech2, du))
        return _mul(em, dy, d, em.const(0.5))
    cdf = em.op("Erf", em.op("Mul", x, em.const(1 / np.sqrt(2))))
    cdf = em.op("Mul", em.op("Add", cdf, em.const(1.0)), em.const(0.5))
    pdf = em.op("Exp", em.op("Mul", em.op("Mul", x, x), em.const(-0.5)))
    pdf = em.op("Mul", pdf, em.const(1 / np.sqrt(2 * np.pi)))
    return em.op("Mul", dy, em.op("Add", cdf, em.op("Mul", x, pdf)))


def _elu(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    alpha = attrs_of(node).get("alpha", 1.0)
    return _where(em, _positive(em, x), dy, em.op("Mul", dy, em.op("Add", y, em.const(alpha))))


def _selu(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    a = attrs_of(node)
    alpha = a.get("alpha", 1.6732632423543772)
    gamma = a.get("gamma", 1.0507009873554805)
    neg = em.op("Mul", dy, em.op("Add", y, em.const(alpha * gamma)))
    return _where(em, _positive(em, x), em.op("Mul", dy, em.const(gamma)), neg)


def _celu(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    alpha = attrs_of(node).get("alpha", 1.0)
    neg = em.op("Mul", dy, em.op("Add", em.op("Mul", y, em.const(1 / alpha)), em.const(1.0)))
    return _where(em, _positive(em, x), dy, neg)


def _softplus(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return em.op("Mul", dy, em.op("Sigmoid", x))


def _exp(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return em.op("Mul", dy, y)


def _neg(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return em.op("Neg", dy)


def _sqrt(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    return em.op("Div", em.op("Mul", dy, em.const(0.5)), y)


def _softmax(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    axes = em.ints([attrs_of(node).get("axis", -1)])
    inner = em.op("ReduceSum", em.op("Mul", dy, y), axes, keepdims=1)
    return em.op("Mul", y, em.op("Sub", dy, inner))


def _log_softmax(em: Emitter, node: onnx.NodeProto, x: str, y: str, dy: str) -> str:
    total = em.op("ReduceSum", dy, em.ints([attrs_of(node).get("axis", -1)]), keepdims=1)
    return em.op("Sub", dy, em.op("Mul", em.op("Exp", y), total))


def _prelu(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    x, slope = node.input[0], node.input[1]
    positive = _positive(em, x)
    dx = _where(em, positive, dy[0], em.op("Mul", dy[0], slope)) if need[0] else None
    dslope = None
    if need[1]:
        below = _where(em, positive, em.const(0.0), em.op("Mul", dy[0], x))
        dslope = unbroadcast(em, below, slope, _rank(em, x, node), node)
    return [dx, dslope]


# ---------------------------------------------------------------------------------------------
# broadcasting arithmetic


def _binary(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    a, b = node.input[0], node.input[1]
    g, y, op = dy[0], node.output[0], node.op_type
    rank = _out_rank(em, node)
    ga = gb = None
    if need[0]:
        ga = g if op in ("Add", "Sub") else em.op(op, g, b)
        ga = unbroadcast(em, ga, a, rank, node)
    if need[1]:
        if op == "Add":
            gb = g
        elif op == "Sub":
            gb = em.op("Neg", g)
        elif op == "Mul":
            gb = em.op("Mul", g, a)
        else:
            gb = em.op("Neg", em.op("Div", em.op("Mul", g, y), b))
        gb = unbroadcast(em, gb, b, rank, node)
    return [ga, gb]


def _sum(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    rank = _out_rank(em, node)
    return [unbroadcast(em, dy[0], x, rank, node) if n else None for x, n in zip(node.input, need)]


def _pow(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    x, p = node.input[0], node.input[1]
    p1 = em.op("Sub", p, em.op("CastLike", em.const(1.0), p))
    d = em.op("Mul", em.op("Pow", x, p1), em.op("CastLike", p, x))
    return [unbroadcast(em, em.op("Mul", dy[0], d), x, _out_rank(em, node), node)]


def _expand(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    return [unbroadcast(em, dy[0], node.input[0], _rank(em, node.output[0], node), node)]
