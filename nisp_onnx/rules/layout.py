"""Ops that move, slice, join or reduce tensors: channels are renumbered, not mixed.

Each rule maps input channel indices to output channel indices; NISP importance flows back
along that map, and the rewrite recomputes the op's index parameters from the kept channels.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelGraph, Space, dim, shape_of
from .base import Keep, Rule, attr_or_input, pass_through, rank, select, set_input


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
                if any(sp is None and not self._cuttable(t, out) for t, sp in spaced):
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

    @staticmethod
    def _cuttable(t: gs.Tensor, out: Space) -> bool:
        """A constant joined along another axis, with the channels on the same axis."""
        r = rank(t)
        return (
            isinstance(t, gs.Constant) and r is not None and dim(shape_of(t), out.axis) == out.size
        )

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        out, k = cg.space(node.outputs[0]), keep(node.outputs[0])
        if (
            out is None
            or k is None
            or k.all()
            or out.axis == _norm(int(node.attrs["axis"]), rank(node.outputs[0]))
        ):
            return
        for i, t in enumerate(node.inputs):
            if cg.space(t) is None and self._cuttable(t, out):
                set_input(node, i, select(t.values, out.axis, k))


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
    """Reshape with a constant shape. The channel axis may stay whole, be merged with the axes
    around it (channel c owns the entries `(e // inner) % C == c` of one output axis: Flatten,
    dynamo's view(-1)), or be split into factors whose last carries the channels (the channel
    shuffle's [N, C] -> [N, g, C/g]: channels c, C/g + c, ... are one, kept or cut together)."""

    def _plan(self, node: gs.Node, src: Space) -> tuple[int, np.ndarray] | None:
        """(output axis, input channel of every entry of that axis), or None."""
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        s, t = shape_of(node.inputs[0]), shape_of(node.outputs[0])
        if s is None or t is None:
            return None
        s = [dim(s, a) for a in range(len(s))]
        t = [dim(t, a) for a in range(len(t))]
        c = src.axis
        s[c] = src.size
        if None in s[c + 1 :] or None in t[1:]:
            return None
        for j in range(len(t)):
            if t[j] is None:
                continue
            for a in range(c, -1, -1):  # merge input axes a..b into output axis j
                if a < c and s[a] is None:
                    break
                if not _prod_equal(s[:a], t[:j]):
                    continue
                for b in range(c, len(s)):
                    inner = int(np.prod(s[c + 1 : b + 1]))
                    if int(np.prod(s[a : b + 1])) == t[j] and _prod_equal(s[b + 1 :], t[j + 1 :]):
                        return j, (np.arange(t[j]) // inner) % src.size
            for k in range(j + 1, len(t)):  # split the channel axis into t[j..k]
                factors = int(np.prod(t[j : k + 1]))
                if factors == src.size and _prod_equal(s[c + 1 :], t[k + 1 :]) and t[k] > 1:
                    if _prod_equal(s[:c], t[:j]):
                        return k, -np.arange(t[k]) - 1  # negative: entry k <- channels % t[k]
                if factors >= src.size:
                    break
        return None

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        plan = self._plan(node, src)
        if plan is None:
            cg.freeze(src, f"Reshape node {node.name!r} mixes the channel axis with others")
            return
        axis, owner = plan
        out = cg.new_space(node.outputs[0], axis, len(owner))
        if owner[0] < 0:
            cg.link(src, out, np.arange(src.size), np.arange(src.size) % out.size)
        else:
            cg.link(src, out, owner, np.arange(out.size))

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        out, k = cg.space(node.outputs[0]), keep(node.outputs[0])
        if out is None or k is None or k.all():
            return
        shape = np.array(node.inputs[1].values, dtype=np.int64).copy()
        if shape[out.axis] <= 0:
            return  # -1 or a copied dimension follows the pruned input
        known = shape_of(node.outputs[0]) or ()
        for j, v in enumerate(shape):  # only the batch may stay implicit
            if v < 0 and dim(known, j) is not None:
                shape[j] = dim(known, j)
        shape[out.axis] = int(k.sum())
        node.inputs[1] = gs.Constant(f"{node.name}__shape", shape)


class GatherRule(Rule):
    """Gather with constant indices. Along another axis the channels pass (their axis moves by
    the rank of the indices minus one); along the channel axis the output's channels are the
    gathered ones, on the longest axis of a multi-dimensional index tensor."""

    def _plan(self, node: gs.Node, src: Space) -> tuple[int, int] | None:
        """(gather axis, index axis carrying the channels or -1 when gathering elsewhere)."""
        r, idx = rank(node.inputs[0]), node.inputs[1]
        if r is None:
            return None
        axis = _norm(int(node.attrs.get("axis", 0)), r)
        if axis != src.axis:
            return (axis, -1) if rank(idx) is not None else None
        if not isinstance(idx, gs.Constant) or idx.values.ndim == 0:
            return None
        shape = idx.values.shape
        return axis, max(range(len(shape)), key=lambda m: (shape[m], m))

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        plan = self._plan(node, src)
        if plan is None:
            cg.freeze(src, f"Gather node {node.name!r} picks channels chosen at run time")
            return
        axis, m = plan
        if m < 0:
            shift = rank(node.inputs[1]) - 1
            pass_through(node, cg, src, axis=src.axis if src.axis < axis else src.axis + shift)
            return
        ids = np.asarray(node.inputs[1].values, dtype=np.int64)
        ids = np.moveaxis(np.where(ids < 0, ids + src.size, ids), m, -1)
        out = cg.new_space(node.outputs[0], axis + m, ids.shape[-1])
        pos = np.broadcast_to(np.arange(out.size), ids.shape)
        cg.link(src, out, ids.reshape(-1), pos.reshape(-1))

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        src, k_in, k_out = cg.space(node.inputs[0]), keep(node.inputs[0]), keep(node.outputs[0])
        if src is None or k_in is None or k_out is None:
            return
        axis, m = self._plan(node, src)
        if m < 0:
            return
        ids = np.asarray(node.inputs[1].values, dtype=np.int64)
        ids = np.compress(k_out, np.where(ids < 0, ids + src.size, ids), axis=m)
        new = (np.cumsum(k_in) - 1)[ids]
        node.inputs[1] = gs.Constant(f"{node.name}__indices", new.astype(np.int64))


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


class ExpandRule(Rule):
    """Expand (broadcast to a shape, numpy style). A channel axis the input carries whole keeps
    its channels, moved by the difference of the ranks. A constant broadcast along its other
    axes (TorchScript's class token, `cls.expand(N, -1, -1)`, whose target is computed at run
    time) starts channels of its own on its one axis longer than 1: where a Concat or Add joins
    it to a stream, the constant is cut with the stream. The target's entry at the channel axis
    (1 or the channel count) becomes 1, by a Mul and an Add where the target is computed."""

    def _plan(self, node: gs.Node, cg: ChannelGraph) -> tuple[int, int, int] | None | str:
        """(input axis, output axis, channels); None when nothing is carried; a reason string
        when the channels cannot be followed."""
        x, src = node.inputs[0], cg.space(node.inputs[0])
        r_in, r_out = rank(x), rank(node.outputs[0])
        if src is not None:
            axis, size = src.axis, src.size
        elif isinstance(x, gs.Constant):
            long = [a for a, d in enumerate(x.shape) if d > 1]
            if len(long) != 1:
                return None
            axis, size = long[0], x.shape[long[0]]
        else:
            return None
        if r_in is None or r_out is None or dim(shape_of(node.inputs[1]), 0) is None:
            return f"Expand node {node.name!r} has a target of unknown length"
        out_axis = axis + r_out - r_in
        if size == 1 and dim(shape_of(node.outputs[0]), out_axis) != 1:
            return f"Expand node {node.name!r} repeats one channel"
        return axis, out_axis, size

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        plan = self._plan(node, cg)
        if isinstance(plan, str):
            cg.freeze(cg.space(node.inputs[0]), plan)
        elif plan is not None:
            out = cg.new_space(node.outputs[0], plan[1], plan[2])
            if cg.space(node.inputs[0]) is not None:
                cg.link(cg.space(node.inputs[0]), out)

    def _fix(self, node: gs.Node) -> str:
        return f"{node.name}__target"

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        out, k = cg.space(node.outputs[0]), keep(node.outputs[0])
        target = node.inputs[1]
        if out is None or k is None or k.all() or target.name == self._fix(node):
            return  # nothing cut, or seen again after the nodes inserted before it
        axis, out_axis, _ = self._plan(node, cg)
        if cg.space(node.inputs[0]) is None:
            set_input(node, 0, select(node.inputs[0].values, axis, k))
        length = dim(shape_of(target), 0)
        entry = out_axis - (rank(node.outputs[0]) - length)
        if entry < 0:
            return
        if isinstance(target, gs.Constant):
            values = np.asarray(target.values, dtype=np.int64).copy()
            values[entry] = 1
            node.inputs[1] = gs.Constant(f"{node.name}__shape", values)
            return
        # entry := 1 at run time: target * (1 - onehot) + onehot
        onehot = np.zeros(length, dtype=np.int64)
        onehot[entry] = 1
        scaled = gs.Variable(f"{node.name}__target_scaled", np.int64, [length])
        fixed = gs.Variable(self._fix(node), np.int64, [length])
        at = cg.graph.nodes.index(node)
        cg.graph.nodes[at:at] = [
            gs.Node(
                "Mul",
                f"{node.name}__target_mul",
                inputs=[target, gs.Constant(f"{node.name}__target_mask", 1 - onehot)],
                outputs=[scaled],
            ),
            gs.Node(
                "Add",
                f"{node.name}__target_add",
                inputs=[scaled, gs.Constant(f"{node.name}__target_one", onehot)],
                outputs=[fixed],
            ),
        ]
        node.inputs[1] = fixed
