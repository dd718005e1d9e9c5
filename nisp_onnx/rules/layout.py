"""Ops that move, slice, join or reduce tensors: channels are renumbered, not mixed.

Each rule maps input channel indices to output channel indices; NISP importance flows back
along that map, and the rewrite recomputes the op's index parameters from the kept channels.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelGraph, Space, dim, shape_of
from .base import Keep, Rule, attr_or_input, pass_through, rank


def _norm(axis: int, r: int) -> int:
    return axis + r if axis < 0 else axis


class ConcatRule(Rule):
    """Concat: along the channel axis each input owns a slice of the output channels."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        spaced = [(t, cg.space(t)) for t in node.inputs]
        known = [sp for _, sp in spaced if sp is not None]
        if not known:
            return
        r = rank(node.outputs[0])
        axis = _norm(int(node.attrs["axis"]), r) if r is not None else None
        if axis is None or any(sp.axis != axis for sp in known):
            if axis is not None and len({sp.axis for sp in known}) == 1:
                out = pass_through(node, cg, known[0])
                for sp in known[1:]:
                    cg.link(sp, out)
                if len(known) < len(node.inputs):
                    cg.freeze(out, f"Concat node {node.name!r} joins channels with fixed ones")
                return
            for sp in known:
                cg.freeze(sp, f"Concat node {node.name!r} joins tensors in unknown layouts")
            return
        sizes = [sp.size if sp else dim(shape_of(t), axis) for t, sp in spaced]
        if any(s is None for s in sizes):
            for sp in known:
                cg.freeze(sp, f"Concat node {node.name!r} has inputs of unknown channel count")
            return
        out = cg.new_space(node.outputs[0], axis, sum(sizes))
        offset = 0
        for (t, sp), size in zip(spaced, sizes):
            idx = np.arange(size)
            if sp is not None:
                cg.link(sp, out, idx, offset + idx)
            else:
                cg.freeze(
                    out, f"Concat node {node.name!r} takes channels of {t.name!r}", offset + idx
                )
            offset += size


class SplitRule(Rule):
    """Split: along the channel axis each output is a slice of the input channels."""

    def _sizes(self, node: gs.Node, src: Space) -> list[int] | None:
        split = attr_or_input(node, "split", 1)
        if split is None:
            return None
        if len(split):
            return [int(s) for s in split]
        n = len(node.outputs)
        if src.size % n:
            return None
        return [src.size // n] * n

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        r = rank(node.inputs[0])
        axis = _norm(int(node.attrs.get("axis", 0)), r) if r is not None else None
        if axis != src.axis:
            for t in node.outputs:
                cg.link(src, cg.new_space(t, src.axis, src.size))
            return
        sizes = self._sizes(node, src)
        if sizes is None:
            cg.freeze(src, f"Split node {node.name!r} has sizes computed at run time")
            return
        offset = 0
        for t, size in zip(node.outputs, sizes):
            idx = np.arange(size)
            cg.link(src, cg.new_space(t, axis, size), offset + idx, idx)
            offset += size

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        src = cg.space(node.inputs[0])
        r = rank(node.inputs[0])
        if src is None or r is None or _norm(int(node.attrs.get("axis", 0)), r) != src.axis:
            return
        sizes = np.array([int(keep(t).sum()) for t in node.outputs], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs or cg.opset < 13:
            node.attrs["split"] = sizes.tolist()
        elif len(node.inputs) > 1:
            node.inputs[1] = gs.Constant(f"{node.name}__split", sizes)
        else:
            node.inputs.append(gs.Constant(f"{node.name}__split", sizes))


def _slice_params(node: gs.Node) -> tuple | None:
    """(starts, ends, axes, steps) as int arrays, or None when computed at run time."""
    if "starts" in node.attrs:  # opset < 10
        starts = np.asarray(node.attrs["starts"])
        ends = np.asarray(node.attrs["ends"])
        axes = np.asarray(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, np.ones_like(starts)
    vals = [attr_or_input(node, "_", i) for i in range(1, 5)]
    if any(v is None for v in vals):
        return None
    starts, ends, axes, steps = vals
    axes = axes if len(axes) else np.arange(len(starts))
    steps = steps if len(steps) else np.ones_like(starts)
    return starts, ends, axes, steps


class SliceRule(Rule):
    """Slice: a step-1 slice along the channel axis keeps a contiguous range of channels."""

    def _range(self, node: gs.Node, src: Space) -> tuple[int, int] | None | str:
        params = _slice_params(node)
        if params is None:
            return "dynamic"
        starts, ends, axes, steps = params
        r = rank(node.inputs[0])
        for s, e, a, st in zip(starts, ends, axes, steps):
            if _norm(int(a), r) == src.axis:
                if st != 1:
                    return "dynamic"
                begin, end, _ = slice(int(s), int(e)).indices(src.size)
                return begin, max(begin, end)
        return None

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        rng = self._range(node, src)
        if rng is None:
            pass_through(node, cg, src)
        elif rng == "dynamic":
            cg.freeze(src, f"Slice node {node.name!r} cuts channels with a step or at run time")
        else:
            begin, end = rng
            out = cg.new_space(node.outputs[0], src.axis, end - begin)
            cg.link(src, out, np.arange(begin, end), np.arange(end - begin))

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        src = cg.space(node.inputs[0])
        k_in = keep(node.inputs[0])
        if src is None or k_in is None or self._range(node, src) is None:
            return
        begin, _ = self._range(node, src)
        new_begin = int(k_in[:begin].sum())
        new_end = new_begin + int(keep(node.outputs[0]).sum())
        starts, ends, axes, steps = _slice_params(node)
        r = rank(node.inputs[0])
        pos = [i for i, a in enumerate(axes) if _norm(int(a), r) == src.axis][0]
        starts, ends = starts.copy(), ends.copy()
        starts[pos], ends[pos] = new_begin, new_end
        if "starts" in node.attrs:
            node.attrs["starts"], node.attrs["ends"] = starts.tolist(), ends.tolist()
        else:
            node.inputs[1] = gs.Constant(f"{node.name}__starts", starts.astype(np.int64))
            node.inputs[2] = gs.Constant(f"{node.name}__ends", ends.astype(np.int64))


class PadRule(Rule):
    """Pad: constant padding along the channel axis adds new (constant) channels around the
    input's ("option A" ResNet shortcuts); padding elsewhere keeps the channels."""

    def _pads(self, node: gs.Node) -> np.ndarray | None:
        return attr_or_input(node, "pads", 1)

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        pads, r = self._pads(node), rank(node.inputs[0])
        if pads is None or r is None or len(pads) != 2 * r:
            cg.freeze(src, f"Pad node {node.name!r} has pads computed at run time")
            return
        before, after = int(pads[src.axis]), int(pads[src.axis + r])
        if before == after == 0:
            pass_through(node, cg, src)
            return
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant" or before < 0 or after < 0:
            cg.freeze(src, f"Pad node {node.name!r} pads channels in {mode} mode")
            return
        out = cg.new_space(node.outputs[0], src.axis, before + src.size + after)
        cg.link(src, out, np.arange(src.size), before + np.arange(src.size))

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        src, k_out = cg.space(node.inputs[0]), keep(node.outputs[0])
        if src is None or k_out is None:
            return
        pads, r = self._pads(node).copy(), rank(node.inputs[0])
        before, after = int(pads[src.axis]), int(pads[src.axis + r])
        if before == after == 0:
            return
        pads[src.axis] = int(k_out[:before].sum())
        pads[src.axis + r] = int(k_out[before + src.size :].sum())
        if "pads" in node.attrs:
            node.attrs["pads"] = pads.tolist()
        else:
            node.inputs[1] = gs.Constant(f"{node.name}__pads", pads.astype(np.int64))


def _flatten_link(cg: ChannelGraph, src: Space, out: Space, inner: int) -> None:
    """Channel c of `src` owns features c*inner .. c*inner + inner - 1 of `out`."""
    cg.link(src, out, np.repeat(np.arange(src.size), inner), np.arange(src.size * inner))


class FlattenRule(Rule):
    """Flatten at (or before, over unit axes) the channel axis: channel c becomes `inner`
    consecutive features of output axis 1."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        shape = shape_of(node.inputs[0]) or ()
        axis = _norm(int(node.attrs.get("axis", 1)), len(shape))
        inner = [dim(shape, a) for a in range(src.axis + 1, len(shape))]
        unit_gap = all(dim(shape, a) == 1 for a in range(axis, src.axis))
        if not shape or axis > src.axis or not unit_gap or None in inner:
            cg.freeze(src, f"Flatten node {node.name!r} merges channels with other axes")
            return
        out = cg.new_space(node.outputs[0], 1, src.size * int(np.prod(inner)))
        _flatten_link(cg, src, out, int(np.prod(inner)))


class ReshapeRule(Rule):
    """Reshape with a constant shape that keeps the channel axis whole, or flattens it with
    the axes after it (channel c -> `inner` consecutive entries of one output axis)."""

    def _plan(self, node: gs.Node, src: Space) -> tuple[int, int] | None:
        """(output axis, entries per channel), or None when channels do not stay apart."""
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        s, t = shape_of(node.inputs[0]), shape_of(node.outputs[0])
        if s is None or t is None:
            return None
        s = [dim(s, a) for a in range(len(s))]
        t = [dim(t, a) for a in range(len(t))]
        inner_in = s[src.axis + 1 :]
        if None in inner_in or None in t[1:]:
            return None
        lead = s[: src.axis]
        for j in range(len(t)):
            if _prod_equal(lead, t[:j]) and t[j] is not None and t[j] % src.size == 0:
                inner = t[j] // src.size
                if int(np.prod(inner_in)) == inner * int(np.prod(t[j + 1 :])):
                    return j, inner
        return None

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        plan = self._plan(node, src)
        if plan is None:
            cg.freeze(src, f"Reshape node {node.name!r} mixes the channel axis with others")
            return
        axis, inner = plan
        out = cg.new_space(node.outputs[0], axis, src.size * inner)
        _flatten_link(cg, src, out, inner)

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        out, k = cg.space(node.outputs[0]), keep(node.outputs[0])
        if out is None or k is None:
            return
        shape = np.array(node.inputs[1].values, dtype=np.int64).copy()
        if shape[out.axis] > 0:
            shape[out.axis] = int(k.sum())
            node.inputs[1] = gs.Constant(f"{node.name}__shape", shape)


def _prod_equal(a: list, b: list) -> bool:
    """Whether two lists of dims have equal products (unknown dims match only each other)."""
    known_a = [d for d in a if d is not None]
    known_b = [d for d in b if d is not None]
    return (len(a) - len(known_a) == len(b) - len(known_b)) and np.prod(known_a) == np.prod(known_b)


class TransposeRule(Rule):
    """Transpose: the channel axis moves to where `perm` puts it."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        r = rank(node.inputs[0])
        perm = list(node.attrs.get("perm", range(r - 1, -1, -1))) if r else None
        if perm is None:
            cg.freeze(src, f"Transpose node {node.name!r} has an unknown rank")
            return
        pass_through(node, cg, src, axis=perm.index(src.axis))


class ReduceRule(Rule):
    """Reductions, Squeeze and Unsqueeze: channels survive unless their axis is touched."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        r_in, r_out = rank(node.inputs[0]), rank(node.outputs[0])
        axes = attr_or_input(node, "axes", 1)
        if r_in is None or r_out is None or axes is None:
            cg.freeze(src, f"{node.op} node {node.name!r} has axes computed at run time")
            return
        if node.op == "Unsqueeze":
            added = sorted(_norm(int(a), r_out) for a in axes)
            axis = src.axis
            for a in added:
                axis += a <= axis
            pass_through(node, cg, src, axis=axis)
            return
        axes = {_norm(int(a), r_in) for a in axes}
        if not axes:
            everything = node.op != "Squeeze" and not node.attrs.get("noop_with_empty_axes", 0)
            axes = (
                set(range(r_in))
                if everything
                else {a for a in range(r_in) if dim(shape_of(node.inputs[0]), a) == 1}
            )
        if src.axis in axes:
            cg.freeze(src, f"{node.op} node {node.name!r} reduces over the channel axis")
            return
        drops = node.op == "Squeeze" or not node.attrs.get("keepdims", 1)
        axis = src.axis - sum(a < src.axis for a in axes) if drops else src.axis
        pass_through(node, cg, src, axis=axis)


class SoftmaxRule(Rule):
    """Softmax-like ops normalise across their axis: channels there are coupled, never cut."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        r = rank(node.inputs[0])
        if src is None or r is None:
            return
        axis = _norm(int(node.attrs.get("axis", -1 if cg.opset >= 13 else 1)), r)
        if src.axis == axis or (cg.opset < 13 and src.axis > axis):
            cg.freeze(src, f"{node.op} node {node.name!r} normalises across channels")
        else:
            pass_through(node, cg, src)


class ShapeRule(Rule):
    """Shape and Size read only dimensions: they neither carry nor freeze channels."""

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        return None
