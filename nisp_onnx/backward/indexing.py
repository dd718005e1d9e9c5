"""VJPs of ops that move elements: reshapes, transposes, concatenation, slices, gathers,
pads, casts."""

from __future__ import annotations

import numpy as np
import onnx

from .emitter import Emitter, Grads, _only, _rank, attrs_of, fail
from .windows import _scatter_add

# ---------------------------------------------------------------------------------------------
# index maps


def _reshape_back(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    return [em.op("Reshape", dy[0], em.shape(node.input[0]))]


def _identity(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    return [dy[0]]


def _cast(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    elem = em.idx.elem_type(node.input[0])
    if elem is None:
        raise fail(
            node, f"needs the type of {node.input[0]!r}, which shape inference could not find"
        )
    return [em.op("Cast", dy[0], to=elem)]


def _transpose(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    perm = attrs_of(node).get("perm")
    if perm is None:
        perm = list(reversed(range(_rank(em, node.input[0], node))))
    return [em.op("Transpose", dy[0], perm=np.argsort(perm).tolist())]


def _concat(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    axis = attrs_of(node)["axis"]
    if axis < 0:
        axis += _rank(em, node.output[0], node)
    sizes = [em.op("Slice", em.shape(x), em.ints([axis]), em.ints([axis + 1])) for x in node.input]
    split = em.op("Concat", *sizes, axis=0)
    parts = em.op("Split", dy[0], split, axis=axis, outputs=len(node.input))
    parts = parts if isinstance(parts, list) else [parts]
    return [p if n else None for p, n in zip(parts, need)]


def _split(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    axis = attrs_of(node).get("axis", 0)
    parts = [g if g is not None else em.zeros_like(o) for g, o in zip(dy, node.output)]
    return [em.op("Concat", *parts, axis=axis) if len(parts) > 1 else parts[0]]


def _positions(em: Emitter, x: str) -> str:
    """The flat position of every element of `x`, shaped like `x` (int64)."""
    size = em.op("ReduceProd", em.shape(x), keepdims=0)
    flat = em.op("Range", em.const(0, np.int64), size, em.const(1, np.int64))
    return em.op("Reshape", flat, em.shape(x))


def _index_map(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    """Slice or Gather: apply the op to the input's flat positions, scatter the gradient there."""
    _only(node, need, {0})
    x = node.input[0]
    picked = em.op(node.op_type, _positions(em, x), *node.input[1:], **attrs_of(node))
    return [_scatter_add(em, x, picked, dy[0])]


def _slice(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    """Constant bounds, positive steps, sliced axes of known size: the gradient spread out by
    each step (zeros between) and padded back to the input's size; else as an index map."""
    _only(node, need, {0})
    x, shape = node.input[0], em.idx.shape(node.input[0])
    given = [em.idx.value(i) if i else None for i in node.input[1:5]]
    given += [None] * (4 - len(given))
    starts, ends, axes, steps = given
    if shape is None or starts is None or ends is None:
        return _index_map(em, node, dy, need)
    rank, n = len(shape), starts.size
    axes = np.arange(n) if axes is None and len(node.input) < 4 else axes
    steps = np.ones(n, np.int64) if steps is None and len(node.input) < 5 else steps
    if axes is None or steps is None or (steps <= 0).any():
        return _index_map(em, node, dy, need)
    axes = [int(a) % rank for a in axes.reshape(-1)]
    if any(shape[a] is None for a in axes):
        return _index_map(em, node, dy, need)
    g, before, after = dy[0], [0] * rank, [0] * rank
    for a, b, e, k in zip(axes, starts.reshape(-1), ends.reshape(-1), steps.reshape(-1)):
        k, picked = int(k), range(shape[a])[slice(int(b), int(e), int(k))]
        if not picked:
            return [em.zeros_like(x)]
        if k > 1:  # [.., m, ..] -> [.., m, k, ..] (zeros after each) -> [.., m*k, ..]
            spread = [0] * (2 * rank + 2)
            spread[rank + 2 + a] = k - 1
            g = em.op("Pad", em.op("Unsqueeze", g, em.ints([a + 1])), em.ints(spread))
            dims = [em.op("Shape", g, end=a), em.ints([-1]), em.op("Shape", g, start=a + 2)]
            g = em.op("Reshape", g, em.op("Concat", *dims, axis=0))
            g = em.op("Slice", g, em.ints([0]), em.ints([shape[a] - picked[0]]), em.ints([a]))
        before[a], after[a] = picked[0], max(0, shape[a] - picked[0] - len(picked) * k)
    return [em.op("Pad", g, em.ints(before + after))]


def _pad(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    x, a = node.input[0], attrs_of(node)
    if a.get("mode", "constant") != "constant":
        raise fail(node, f"pads in mode {a['mode']!r}")
    pads = em.idx.value(node.input[1])  # an input from opset 11 on
    if len(node.input) > 3 and node.input[3]:
        axes, r = em.idx.value(node.input[3]), _rank(em, x, node)
        if axes is None or pads is None:
            raise fail(node, "pads axes computed at run time")
        full = np.zeros(2 * r, np.int64)
        for i, ax in enumerate(axes.reshape(-1) % r):
            full[ax], full[ax + r] = pads[i], pads[i + len(axes)]
        pads = full
    if pads is not None:
        if (pads < 0).any():
            raise fail(node, "crops (negative pads)")
        starts = em.ints(pads[: len(pads) // 2])
    else:
        starts = em.op("Slice", node.input[1], em.ints([0]), em.shape(em.shape(x)))
    ends = em.op("Add", starts, em.shape(x))
    return [em.op("Slice", dy[0], starts, ends)]
