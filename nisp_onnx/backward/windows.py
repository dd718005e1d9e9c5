"""VJPs of sliding windows and reductions: Conv (inputs and weights), pools, Reduce*."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .emitter import Emitter, Grads, _only, _rank, attrs_of, fail
from .linear import _channel_sum

# ---------------------------------------------------------------------------------------------
# sliding windows: Conv, AveragePool, MaxPool


@dataclass
class Window:
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[int]

    @property
    def extents(self) -> list[int]:
        return [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]


def window(em: Emitter, node: onnx.NodeProto, kernel: list[int]) -> Window:
    """Kernel, strides, dilations and explicit pads of a Conv or pool (auto_pad resolved)."""
    a, n = attrs_of(node), len(kernel)
    w = Window(list(kernel), a.get("strides", [1] * n), a.get("dilations", [1] * n), [0] * 2 * n)
    auto = a.get("auto_pad", "NOTSET")
    if auto == "NOTSET":
        w.pads = list(a.get("pads", [0] * 2 * n))
    elif auto.startswith("SAME"):
        spatial = (em.idx.shape(node.input[0]) or (None,) * (n + 2))[2:]
        if any(s is None for s in spatial):
            raise fail(node, f"uses auto_pad={auto} on an input of unknown spatial size")
        for i, (size, s, e) in enumerate(zip(spatial, w.strides, w.extents)):
            total = max(0, (-(-size // s) - 1) * s + e - size)
            small = total // 2
            begin = small if auto == "SAME_UPPER" else total - small
            w.pads[i], w.pads[i + n] = begin, total - begin
    return w


def _transposed(em: Emitter, g: str, weight: str, x: str, w: Window, group: int = 1) -> str:
    """ConvTranspose of `g` sized back to the spatial size of `x` (N and C as they come)."""
    n = len(w.kernel)
    spatial = (em.idx.shape(x) or (None,) * (n + 2))[2:]
    known = all(s is not None for s in spatial)
    extra = [0] * n
    if known:
        extra = [
            (size + w.pads[i] + w.pads[i + n] - e) % s
            for i, (size, s, e) in enumerate(zip(spatial, w.strides, w.extents))
        ]
    out = em.op(
        "ConvTranspose",
        g,
        weight,
        strides=w.strides,
        pads=w.pads,
        dilations=w.dilations,
        group=group,
        output_padding=extra,
    )
    if known or all(s == 1 for s in w.strides):
        return out
    missing = em.op("Sub", em.shape(x, 2), em.shape(out, 2))
    pads = em.op("Concat", em.ints([0] * (n + 2)), em.ints([0, 0]), missing, axis=0)
    return em.op("Pad", out, pads)


def _conv_weight(em: Emitter, node: onnx.NodeProto, g: str, w: Window, group: int) -> str:
    """dW[o, c, *k] = sum over n and output positions p of g[n, o, p] * x_padded[n, c, p*s + k*d].
    With the output's spatial size known: for each kernel offset k, the strided slice of x it
    reads as [N, G, Cg, P] times g as [N, G, P, Og], one matrix product per sample and group,
    summed over the samples (3-5x faster in onnxruntime than the convolution below)."""
    x, weight, n = node.input[0], node.input[1], len(w.kernel)
    out = (em.idx.shape(node.output[0]) or (None,) * (n + 2))[2:]
    if all(out) and len(out) == n:
        xp = em.op("Pad", x, em.ints([0, 0, *w.pads[:n], 0, 0, *w.pads[n:]]))
        sizes = em.ints([0, group, -1, int(np.prod(out))])
        gt = em.op("Transpose", em.op("Reshape", g, sizes), perm=[0, 1, 3, 2])  # [N, G, P, Og]
        parts = []
        for ks in itertools.product(*(range(k) for k in w.kernel)):
            begin = [k * d for k, d in zip(ks, w.dilations)]
            end = [b + (o - 1) * s + 1 for b, o, s in zip(begin, out, w.strides)]
            cols = em.op(
                "Slice",
                xp,
                em.ints(begin),
                em.ints(end),
                em.ints(range(2, n + 2)),
                em.ints(w.strides),
            )
            part = em.op("MatMul", em.op("Reshape", cols, sizes), gt)  # [N, G, Cg, Og]
            parts.append(
                em.op("Unsqueeze", em.op("ReduceSum", part, em.ints([0]), keepdims=0), em.ints([3]))
            )
        dw = em.op("Concat", *parts, axis=3) if len(parts) > 1 else parts[0]  # [G, Cg, Og, K]
        dw = em.op("Transpose", dw, perm=[0, 2, 1, 3])
        return em.op("Reshape", dw, em.shape(weight))
    spatial = list(range(3, n + 3))
    xs = em.op("Reshape", x, em.op("Concat", em.ints([0, group, -1]), em.shape(x, 2), axis=0))
    xs = em.op("Transpose", xs, perm=[2, 1, 0, *spatial])  # [Cg, G, N, *S]
    xs = em.op("Reshape", xs, em.op("Concat", em.ints([0, -1]), em.shape(xs, 3), axis=0))
    gs = em.op("Reshape", g, em.op("Concat", em.ints([0, group, -1]), em.shape(g, 2), axis=0))
    gs = em.op("Transpose", gs, perm=[1, 2, 0, *spatial])  # [G, Og, N, *So]
    gs = em.op("Reshape", gs, em.op("Concat", em.ints([-1]), em.shape(gs, 2), axis=0))
    dw = em.op(
        "Conv", xs, gs, strides=w.dilations, dilations=w.strides, pads=w.pads, group=group
    )  # [Cg, G*Og, *k or more]
    dw = em.op("Transpose", dw, perm=[1, 0, *range(2, n + 2)])
    return em.op("Slice", dw, em.ints([0] * n), em.ints(w.kernel), em.ints(range(2, n + 2)))


def _conv(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    x, weight = node.input[0], node.input[1]
    kshape = attrs_of(node).get("kernel_shape") or (em.idx.shape(weight) or (0, 0))[2:]
    if not kshape or any(k is None for k in kshape):
        raise fail(node, "has a kernel of unknown size")
    w = window(em, node, list(kshape))
    group = attrs_of(node).get("group", 1)
    out: Grads = [None] * len(node.input)
    if need[0]:
        out[0] = _transposed(em, dy[0], weight, x, w, group)
    if need[1]:
        out[1] = _conv_weight(em, node, dy[0], w, group)
    if len(need) > 2 and need[2]:
        out[2] = _channel_sum(em, dy[0], len(kshape) + 2)
    return out


def _planes(em: Emitter, t: str) -> str:
    """Reshape [N, C, *S] to [N*C, 1, *S]."""
    return em.op("Reshape", t, em.op("Concat", em.ints([-1, 1]), em.shape(t, 2), axis=0))


def _check_ceil(em: Emitter, node: onnx.NodeProto, x: str, w: Window) -> None:
    if not attrs_of(node).get("ceil_mode", 0):
        return
    n = len(w.kernel)
    spatial = (em.idx.shape(x) or (None,) * (n + 2))[2:]
    for i, (size, s, e) in enumerate(zip(spatial, w.strides, w.extents)):
        if size is None or (size + w.pads[i] + w.pads[i + n] - e) % s:
            raise fail(node, "uses ceil_mode with partial windows")


def _average_pool(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    x, a = node.input[0], attrs_of(node)
    w = window(em, node, a["kernel_shape"])
    _check_ceil(em, node, x, w)
    ones = np.ones([1, 1, *w.kernel])
    g = _planes(em, dy[0])
    if a.get("count_include_pad", 0) or not any(w.pads):
        weight = em.const(ones / ones.size)
    else:
        weight = em.const(ones)
        one = numpy_helper.from_array(np.ones(1, em.dtype))
        shape = em.op("Concat", em.ints([1, 1]), em.shape(x, 2), axis=0)
        plane = em.op("ConstantOfShape", shape, value=one)
        counts = em.op("Conv", plane, weight, strides=w.strides, pads=w.pads, dilations=w.dilations)
        g = em.op("Div", g, counts)
    return [em.op("Reshape", _transposed(em, g, weight, x, w), em.shape(x))]


def _scatter_add(em: Emitter, x: str, index: str, g: str) -> str:
    """A zero tensor shaped like `x` plus `g` added at flat positions `index`."""
    size = em.op("ReduceProd", em.shape(x), keepdims=1)
    zero = numpy_helper.from_array(np.zeros(1, em.dtype))
    flat = em.op("ConstantOfShape", size, value=zero)
    minus1 = em.ints([-1])
    index, g = em.op("Reshape", index, minus1), em.op("Reshape", g, minus1)
    out = em.op("ScatterElements", flat, index, g, axis=0, reduction="add")
    return em.op("Reshape", out, em.shape(x))


def _max_pool(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    a = {k: v for k, v in attrs_of(node).items() if k != "storage_order"}
    _, index = em.op("MaxPool", node.input[0], outputs=2, **a)
    return [_scatter_add(em, node.input[0], index, dy[0])]


def _global_max_pool(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    x = node.input[0]
    flat = em.op("Reshape", x, em.ints([0, 0, -1]))
    index = em.op("ArgMax", flat, axis=2, keepdims=1)
    zero = numpy_helper.from_array(np.zeros(1, em.dtype))
    base = em.op("ConstantOfShape", em.shape(flat), value=zero)
    g = em.op("Reshape", dy[0], em.ints([0, 0, -1]))
    return [em.op("Reshape", em.op("ScatterElements", base, index, g, axis=2), em.shape(x))]


def _global_average_pool(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    x = node.input[0]
    axes = list(range(2, _rank(em, x, node)))
    return [em.op("Div", em.op("Expand", dy[0], em.shape(x)), em.count(x, axes))]


def _reduce(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
    _only(node, need, {0})
    x, a = node.input[0], attrs_of(node)
    r = _rank(em, x, node)
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        value = em.idx.value(node.input[1])
        if value is None:
            raise fail(node, "reduces over axes computed at run time")
        axes = value.reshape(-1).tolist()
    else:
        axes = []
    if not axes and a.get("noop_with_empty_axes", 0):
        return [dy[0]]
    axes = sorted(ax % r for ax in axes) if axes else list(range(r))
    g = dy[0] if a.get("keepdims", 1) else em.op("Unsqueeze", dy[0], em.ints(axes))
    g = em.op("Expand", g, em.shape(x))
    return [em.op("Div", g, em.count(x, axes)) if node.op_type == "ReduceMean" else g]
