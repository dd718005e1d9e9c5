"""LayerNormalization: normalises over its last axes; per-channel scale and bias after."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelGraph, Link, Space
from .base import Keep, Rule, pass_through, rank, select, set_input


class LayerNormRule(Rule):
    """LayerNormalization over axes `axis`..-1.

    Channels before `axis` pass through untouched. Over the channel axis alone (ConvNeXt,
    transformers: channels last) the channels are prunable: scale and bias are cut, and the
    pruned model normalises the kept channels (its reference does the same). Channels
    normalised together with other axes stay.
    """

    def _axis(self, node: gs.Node) -> int | None:
        r = rank(node.inputs[0])
        if r is None:
            return None
        axis = int(node.attrs.get("axis", -1))
        return axis + r if axis < 0 else axis

    def _over_channels(self, node: gs.Node, src: Space) -> bool:
        return src.axis == self._axis(node) == rank(node.inputs[0]) - 1

    def analyze(self, node: gs.Node, cg: ChannelGraph) -> None:
        src = cg.space(node.inputs[0])
        if src is None:
            return
        axis = self._axis(node)
        params = [t for t in node.inputs[1:] if t.name]
        extra = [t for t in node.outputs[1:] if t.name and t.outputs]
        if axis is not None and src.axis < axis:
            pass_through(node, cg, src)
        elif axis is None or not self._over_channels(node, src):
            cg.freeze(src, f"LayerNormalization {node.name!r} normalises channels with other axes")
        elif extra or not all(isinstance(t, gs.Constant) for t in params):
            cg.freeze(src, f"LayerNormalization {node.name!r} has computed parameters or outputs")
        else:
            pass_through(node, cg, src)

    def gain(self, node: gs.Node, cg: ChannelGraph, link: Link) -> np.ndarray | float:
        src = cg.space(node.inputs[0])
        if not self._over_channels(node, src):
            return 1.0
        scale = np.abs(node.inputs[1].values.astype(np.float64)).reshape(-1)
        return scale if len(scale) == src.size else 1.0

    def _cut(self, node: gs.Node, k: np.ndarray) -> None:
        for i in range(1, len(node.inputs)):
            t = node.inputs[i]
            if isinstance(t, gs.Constant) and t.values.ndim and t.values.shape[-1] == len(k):
                set_input(node, i, select(t.values, t.values.ndim - 1, k))

    def rewrite(self, node: gs.Node, cg: ChannelGraph, keep: Keep) -> None:
        src, k = cg.space(node.inputs[0]), keep(node.inputs[0])
        if src is not None and k is not None and self._over_channels(node, src):
            self._cut(node, k)

    def reference(self, node: gs.Node, cg: ChannelGraph, keep: Keep, graph: gs.Graph) -> None:
        """Gather the kept channels, normalise them, put them back in place (zeros elsewhere)."""
        src, k = cg.space(node.inputs[0]), keep(node.inputs[0])
        if src is None or k is None or k.all() or not self._over_channels(node, src):
            return
        idx = np.flatnonzero(k)
        x, y = node.inputs[0], node.outputs[0]
        xk = gs.Variable(f"{x.name}__kept_{node.name}", dtype=x.dtype)
        yk = gs.Variable(f"{y.name}__kept", dtype=y.dtype)
        ids = gs.Constant(f"{node.name}__kept_ids", idx.astype(np.int64))
        graph.nodes.append(gs.Node("Gather", inputs=[x, ids], outputs=[xk], attrs={"axis": -1}))
        self._cut(node, k)
        node.inputs[0] = xk
        node.outputs[0] = yk
        place = np.zeros((len(idx), len(k)), np.float32)
        place[np.arange(len(idx)), idx] = 1
        graph.nodes.append(
            gs.Node("MatMul", inputs=[yk, gs.Constant(f"{node.name}__place", place)], outputs=[y])
        )
