"""Ops whose constant weight mixes input channels into new output channels: Conv, Gemm, MatMul.

Their output starts a new channel space; their input space is *consumed* (cutting an input
channel drops a weight column). NISP flows back as `s_in = |W|^T s_out`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelGraph, dim, shape_of
from .base import Keep, Rule, pass_through, rank, select, set_input, weight
from .linear import ConvLinear, GemmLinear, Linear, MatMulLinear


class ConvRule(Rule):
    """Conv with a constant weight [M, C/g, k...]; grouped convs tie each group's in and out."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        w = node.inputs[1]
        src = cg.space(node.inputs[0])
        if not isinstance(w, gs.Constant):
            cg.freeze(src, f"Conv node {node.name!r} has a weight computed at run time")
            return
        shape = tuple(w.shape)  # the shape only: a large weight is not read here
        g = int(node.attrs.get("group", 1))
        if len(shape) < 3 or g < 1 or shape[0] % g or (src and src.size != shape[1] * g):
            cg.freeze(src, f"Conv node {node.name!r}: weight {list(shape)}, group {g} and input")
            return
        m, cig = shape[:2]
        out = cg.new_space(node.outputs[0], 1, m)
        if g == 1:
            cg.consume(node, 0)
            return
        if src is None:
            cg.freeze(out, f"grouped Conv {node.name!r} reads channels that cannot be cut")
            return
        cog = m // g
        c_in = np.arange(cig * g)
        c_out = np.arange(m)
        cg.link(src, out, c_in, (c_in // cig) * cog)
        cg.link(src, out, (c_out // cog) * cig, c_out)

    def backprop(self, node: gs.Node, cg: ChannelGraph, total: np.ndarray) -> None:
        src, out = cg.space(node.inputs[0]), cg.space(node.outputs[0])
        if src is None or out is None:
            return
        w = weight(node.inputs[1])
        m, cig = w.shape[:2]
        g = int(node.attrs.get("group", 1))
        norms = np.concatenate([a.reshape(len(a), cig, -1).sum(-1) for _, a in _abs_rows(w)])
        per_link = norms * total[out.elements][:, None]  # [M, C/g]
        total[src.elements] += per_link.reshape(g, m // g, cig).sum(1).reshape(-1)

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        k_out, k_in = keep(node.outputs[0]), keep(node.inputs[0])
        w = weight(node.inputs[1])
        g = int(node.attrs.get("group", 1))
        if g == 1:
            set_input(node, 1, select(select(w, 0, k_out), 1, k_in))
        elif k_out is not None:
            set_input(node, 1, select(w, 0, k_out))
            node.attrs["group"] = int(k_out.reshape(g, -1).any(1).sum())
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            set_input(node, 2, select(node.inputs[2].values, 0, k_out))

    def linear(self, node: gs.Node) -> Linear | None:
        return ConvLinear(node) if isinstance(node.inputs[1], gs.Constant) else None


class GemmRule(Rule):
    """Gemm y = A B (+ C) with constant B; A's feature axis is consumed, y's starts anew."""

    def _weight(self, node: gs.Node) -> np.ndarray:
        """B as [N, K]."""
        b = weight(node.inputs[1])
        return b if node.attrs.get("transB", 0) else b.T

    def _outputs(self, node: gs.Node) -> int:
        """N, from the shape alone (a large weight is not read during analysis)."""
        return node.inputs[1].shape[0 if node.attrs.get("transB", 0) else 1]

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if not isinstance(node.inputs[1], gs.Constant) or node.attrs.get("transA", 0):
            cg.freeze(src, f"Gemm node {node.name!r} has a computed weight or transA")
            return
        cg.new_space(node.outputs[0], 1, self._outputs(node))
        cg.consume(node, 0)

    def backprop(self, node: gs.Node, cg: ChannelGraph, total: np.ndarray) -> None:
        src, out = cg.space(node.inputs[0]), cg.space(node.outputs[0])
        if src is not None and out is not None:
            w, t_out = self._weight(node).T, total[out.elements]  # [K, N]
            for rows, a in _abs_rows(w):
                total[src.elements[rows]] += a @ t_out

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        k_out, k_in = keep(node.outputs[0]), keep(node.inputs[0])
        w = select(select(self._weight(node), 0, k_out), 1, k_in)
        set_input(node, 1, w if node.attrs.get("transB", 0) else w.T)
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            c = node.inputs[2].values
            if c.ndim and c.shape[-1] > 1:
                set_input(node, 2, select(c, c.ndim - 1, k_out))

    def linear(self, node: gs.Node) -> Linear | None:
        if isinstance(node.inputs[1], gs.Constant) and not node.attrs.get("transA", 0):
            return GemmLinear(node)
        return None


class MatMulRule(Rule):
    """MatMul x @ W with a constant 2-D W [K, N]: mixes x's last axis into N new features.

    When x's channels sit on another axis (a spatial MatMul), they pass through unchanged.
    """

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        a, b = node.inputs[:2]
        src = cg.space(a)
        if not isinstance(b, gs.Constant):
            self._computed(node, cg)
            return
        if len(b.shape) != 2:
            cg.freeze(src, f"MatMul node {node.name!r} has a batched constant weight")
            return
        r = rank(a)
        if src is not None and r is not None and src.axis != r - 1:
            pass_through(node, cg, src)
            return
        out_rank = rank(node.outputs[0]) or r or 2
        cg.new_space(node.outputs[0], out_rank - 1, b.shape[1])
        if src is not None and dim(shape_of(a), -1) == b.shape[0]:
            cg.consume(node, 0)
        else:
            cg.freeze(src, f"MatMul node {node.name!r} reads its input in an unknown layout")

    def _computed(self, node: gs.Node, cg: ChannelGraph) -> None:
        """A @ B of two computed tensors (attention): channels on A's rows or B's columns pass
        to the output; channels on the contracted axis of both are one and the same (cutting
        one drops a term of every dot product, as zeroing it on both sides does)."""
        a, b = node.inputs[:2]
        sa, sb = cg.space(a), cg.space(b)
        ra, rb, ro = rank(a), rank(b), rank(node.outputs[0])
        why = f"MatMul node {node.name!r} multiplies two computed tensors"
        if None in (ra, rb, ro) or min(ra, rb) < 2:
            cg.freeze(sa, why)
            cg.freeze(sb, why)
            return
        ka = sa is not None and sa.axis == ra - 1
        kb = sb is not None and sb.axis == rb - 2
        if ka and kb and sa.size == sb.size:
            cg.link(sa, sb)
            cg.consume(node, 0)
            cg.consume(node, 1)
        elif ka or kb:
            cg.freeze(sa if ka else sb, why + " and only one side's contracted channels are cut")
        if sa is not None and sa.axis == ra - 2:
            pass_through(node, cg, sa, axis=ro - 2)
        elif sa is not None and not ka:
            cg.freeze(sa, why + " with channels on a batch axis")
        if sb is not None and sb.axis == rb - 1:
            if cg.space(node.outputs[0]) is not None:
                cg.freeze(sb, why + " with channels on both rows and columns")
            else:
                pass_through(node, cg, sb, axis=ro - 1)
        elif sb is not None and not kb:
            cg.freeze(sb, why + " with channels on a batch axis")

    def _mixes(self, node: gs.Node, cg: ChannelGraph) -> bool:
        out = cg.space(node.outputs[0])
        const = isinstance(node.inputs[1], gs.Constant)
        return const and out is not None and not cg.node_links.get(node.name)

    def backprop(self, node: gs.Node, cg: ChannelGraph, total: np.ndarray) -> None:
        if not self._mixes(node, cg):
            return super().backprop(node, cg, total)
        src, out = cg.space(node.inputs[0]), cg.space(node.outputs[0])
        if src is not None:
            t_out = total[out.elements]
            for rows, a in _abs_rows(weight(node.inputs[1])):
                total[src.elements[rows]] += a @ t_out

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        if self._mixes(node, cg):
            w = weight(node.inputs[1])
            set_input(node, 1, select(select(w, 0, keep(node.inputs[0])), 1, keep(node.outputs[0])))

    def linear(self, node: gs.Node) -> Linear | None:
        w = node.inputs[1]
        return MatMulLinear(node) if isinstance(w, gs.Constant) and w.values.ndim == 2 else None


def _abs_rows(w: np.ndarray, block: int = 1 << 18) -> Iterator[tuple[slice, np.ndarray]]:
    """|w| in float64, a block of rows (axis 0) at a time: (rows, block), so that a large
    weight is never copied whole."""
    step = max(1, block // max(1, w[:1].size))
    for i in range(0, len(w), step):
        yield slice(i, i + step), np.abs(w[i : i + step].astype(np.float64))
