"""Ops that act on each channel on its own: activations, normalisations, broadcast arithmetic.

Their outputs have the channels of their inputs; NISP passes importance straight back
(activations are 1-Lipschitz), scaled by a per-channel factor where the op scales channels.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelGraph, Link, dim, shape_of
from .base import Keep, Rule, pass_through, rank, select, set_input


class UnaryRule(Rule):
    """y = f(x) channel by channel (Relu, Clip, Sigmoid, pooling, Identity, ...)."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is not None:
            pass_through(node, cg, src)


class PerChannelRule(UnaryRule):
    """Normalisations with per-channel constant parameters in inputs 1.. (BatchNormalization,
    InstanceNormalization); the gain is |scale / sqrt(var + eps)| (var = 1 when absent)."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
            cg.freeze(src, f"{node.op} node {node.name!r} has parameters computed at run time")
            return
        pass_through(node, cg, src)

    def gain(self, node: gs.Node, cg: ChannelGraph, link: Link) -> np.ndarray:
        scale = node.inputs[1].values.astype(np.float64)
        var = node.inputs[4].values.astype(np.float64) if len(node.inputs) > 4 else 1.0
        return np.abs(scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5))))

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        k = keep(node.outputs[0])
        for i in range(1, len(node.inputs)):
            set_input(node, i, select(node.inputs[i].values, 0, k))


class BroadcastRule(Rule):
    """Add, Sub, Mul, Div, PRelu, ... with numpy broadcasting.

    Inputs with channel spaces are the same channels as the output; a constant operand with a
    full channel axis is cut with them; a computed operand without channel space whose channel
    axis is not 1 freezes the output.
    """

    def _axis(self, node: gs.Node, cg: ChannelGraph) -> int | None:
        """The output's channel axis, or None when the spaced inputs disagree."""
        out_rank = rank(node.outputs[0])
        axes = set()
        for t in node.inputs:
            sp = cg.space(t)
            if sp is not None:
                r = rank(t)
                if r is None or out_rank is None:
                    return None
                axes.add(sp.axis + out_rank - r)
        return axes.pop() if len(axes) == 1 else None

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        spaced = [cg.space(t) for t in node.inputs if cg.space(t) is not None]
        if not spaced:
            return
        axis = self._axis(node, cg)
        if axis is None:
            for sp in spaced:
                cg.freeze(sp, f"{node.op} node {node.name!r} combines tensors in unknown layouts")
            return
        size = max(sp.size for sp in spaced)
        out = cg.new_space(node.outputs[0], axis, size)
        out_rank = rank(node.outputs[0])
        for t in node.inputs:
            sp = cg.space(t)
            if sp is not None and sp.size == size:
                cg.link(sp, out)
            elif sp is not None:
                cg.freeze(sp, f"{node.op} node {node.name!r} broadcasts {t.name!r} over channels")
                cg.freeze(out, f"{node.op} node {node.name!r} broadcasts {t.name!r} over channels")
            elif not isinstance(t, gs.Constant):
                r = rank(t)
                if r is None or (r >= out_rank - axis and dim(shape_of(t), axis - out_rank) != 1):
                    cg.freeze(
                        out,
                        f"{node.op} node {node.name!r} combines channels with "
                        f"{t.name!r}, whose channels cannot be cut",
                    )

    def gain(self, node: gs.Node, cg: ChannelGraph, link: Link) -> np.ndarray | float:
        """|c| per channel for Mul by a constant c, 1/|c| for Div by it, else 1."""
        out = cg.space(node.outputs[0])
        const = [(i, t) for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
        if node.op not in ("Mul", "Div") or not const or out is None:
            return 1.0
        i, c = const[0]
        if node.op == "Div" and i == 0:
            return 1.0
        mag = np.abs(self._channel_values(c.values, out.axis - rank(node.outputs[0]), out.size))
        return mag if node.op == "Mul" else 1.0 / np.maximum(mag, 1e-12)

    @staticmethod
    def _channel_values(c: np.ndarray, axis: int, size: int) -> np.ndarray:
        """Mean |c| per channel, broadcast to `size` channels (axis counted from the end)."""
        c = np.abs(c.astype(np.float64))
        if c.ndim < -axis or c.shape[axis] == 1:
            return np.full(size, c.mean() if c.size else 1.0)
        other = tuple(a for a in range(c.ndim) if a != c.ndim + axis)
        return c.mean(axis=other)

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        out = cg.space(node.outputs[0])
        k = keep(node.outputs[0])
        if out is None or k is None:
            return
        from_end = out.axis - rank(node.outputs[0])
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.values.ndim >= -from_end:
                if t.values.shape[from_end] == out.size and out.size > 1:
                    set_input(node, i, select(t.values, t.values.ndim + from_end, k))
