"""The rule interface: what every op family answers about channels."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..channels import ChannelGraph, Link, Space, shape_of

if TYPE_CHECKING:
    from .linear import Linear

# keep(tensor) -> boolean mask over the tensor's channel space, or None when it has no space
Keep = Callable[[gs.Tensor], "np.ndarray | None"]


class Rule:
    """One op family: how channels relate across it, how importance flows back, how to cut it.

    The default is the rule for an op nobody taught us: every channel space it reads is frozen
    and its outputs have no channel space, so nothing around it can be cut wrongly.
    """

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        for t in node.inputs:
            cg.freeze(cg.space(t), f"{node.op} node {node.name!r} has no pruning rule")

    def gain(self, node: gs.Node, cg: ChannelGraph, link: Link) -> np.ndarray | float:
        """Factor on importance flowing from `link.b` (output side) back to `link.a`."""
        return 1.0

    def backprop(self, node: gs.Node, cg: ChannelGraph, total: np.ndarray) -> None:
        """Add this node's outputs' importance to its inputs (default: along its links)."""
        for lk in cg.node_links.get(node.name, []):
            contrib = total[lk.b.start + lk.b_idx] * _expand(self.gain(node, cg, lk), lk)
            np.add.at(total, lk.a.start + lk.a_idx, contrib)

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        """Cut parameters and attributes of `node` to the kept channels (default: nothing)."""

    def linear(self, node: gs.Node) -> Linear | None:
        """The node as `y = x W + b` for least-squares repair, if it is one (default: not)."""
        return None

    def reference(self, node: gs.Node, cg: ChannelGraph, keep: Keep, graph: gs.Graph) -> None:
        """Make `node` of the reference model (removed channels zeroed where mixing layers read
        them) compute what its pruned version computes, where zeroing alone does not say it
        (a LayerNormalization over channels normalises the kept ones). Default: nothing."""


def _expand(gain: np.ndarray | float, lk: Link) -> np.ndarray | float:
    if np.ndim(gain) == 0:
        return gain
    return np.asarray(gain)[lk.b_idx]


def rank(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def pass_through(node: gs.Node, cg: ChannelGraph, src: Space, axis: int | None = None) -> Space:
    """Give output 0 the same channels as `src` (on `axis`, default the same axis)."""
    out = cg.new_space(node.outputs[0], src.axis if axis is None else axis, src.size)
    cg.link(src, out)
    return out


_PLAIN = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
}


def weight(t: gs.Constant) -> np.ndarray:
    """`t.values`, read from the ONNX tensor with one copy of its bytes where they are still
    unread (graphsurgeon's own load copies them twice): large weights stay affordable. The
    array is read-only; cuts make new arrays."""
    lazy = t._values
    tensor = getattr(lazy, "tensor", None)
    if (
        isinstance(lazy, LazyValues)
        and isinstance(tensor, onnx.TensorProto)
        and tensor.data_type in _PLAIN
        and tensor.HasField("raw_data")
        and sys.byteorder == "little"
    ):
        t.values = np.frombuffer(tensor.raw_data, _PLAIN[tensor.data_type]).reshape(lazy.shape)
    return t.values


def set_input(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Replace a constant input of `node`, copying it first if other nodes share it."""
    old = node.inputs[index]
    values = np.ascontiguousarray(values.astype(old.values.dtype, copy=False))
    if len(old.outputs) > 1:
        node.inputs[index] = gs.Constant(f"{old.name}__{node.name}", values)
    else:
        old.values = values


def select(values: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """Keep the entries of `values` along `axis` where `mask` is true."""
    if mask is None or values.shape[axis] != len(mask):
        return values
    return np.compress(mask, values, axis=axis)


def attr_or_input(node: gs.Node, name: str, index: int) -> np.ndarray | None:
    """An op parameter that moved from attribute to input across opsets (axes, pads, split)."""
    if name in node.attrs and node.attrs[name] is not None:
        return np.asarray(node.attrs[name], dtype=np.int64)
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return np.asarray(node.inputs[index].values, dtype=np.int64).reshape(-1)
    if len(node.inputs) > index and node.inputs[index].name:
        return None  # computed at run time
    return np.array([], dtype=np.int64)
