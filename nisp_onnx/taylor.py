"""The Taylor criterion (Molchanov et al., CVPR 2019), first order, FO-BN variant.

A channel's importance is `(sum over the batch and all positions of dL/dy * y)^2`, computed
per calibration batch and averaged over batches, where `y` is the BatchNorm output (the conv
output where BatchNorm was folded; Gemm and MatMul outputs for fully connected neurons) and
`L` the cross-entropy against the labels, or against the model's own top-1 predictions when
there are none. The gradients come from an ONNX backward graph (`backward.py`) run by
onnxruntime together with the forward pass; each run returns only the per-channel sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from .backward import Backward, add_backward
from .calibrate import session
from .channels import Space
from .errors import NispError

if TYPE_CHECKING:  # criteria may register this criterion: no import at run time
    from .criteria import Context

LINEAR = ("Conv", "Gemm", "MatMul")


def measured(ctx: Context) -> list[tuple[Space, str, int]]:
    """(space, tensor where y is taken, its rank) for every scored layer output.

    BatchNorm outputs, and Conv/Gemm/MatMul outputs not read by BatchNorm alone; a conv
    whose only consumer adds a constant bias is measured after the bias.
    """
    nodes = {n.name: n for n in ctx.cg.graph.nodes}
    out = []
    for sp in ctx.cg.spaces:
        node = nodes.get(sp.producer)
        if node is None or not node.outputs or node.outputs[0].name != sp.tensor:
            continue
        tensor = node.outputs[0]
        readers = tensor.outputs
        if node.op in LINEAR and readers and all(r.op == "BatchNormalization" for r in readers):
            continue
        if node.op in LINEAR:
            tensor = _after_bias(tensor)
        elif node.op != "BatchNormalization":
            continue
        if tensor.shape is None:
            raise NispError(f"taylor: the shape of {tensor.name!r} is unknown; try nisp-infs")
        out.append((sp, tensor.name, len(tensor.shape)))
    return out


def _after_bias(tensor: gs.Variable) -> gs.Variable:
    """The output of a lone `Add` of a constant bias after `tensor`, else `tensor` itself."""
    if len(tensor.outputs) != 1:
        return tensor
    add = tensor.outputs[0]
    others = [t for t in add.inputs if t is not tensor]
    if add.op != "Add" or len(others) != 1 or not isinstance(others[0], gs.Constant):
        return tensor
    result = add.outputs[0]
    same = result.shape is not None and list(result.shape) == list(tensor.shape or [])
    return result if same else tensor


def targets(ctx: Context) -> np.ndarray:
    """One class per calibration sample: the labels, else the model's own predictions."""
    t = ctx.labels if ctx.labels is not None else ctx.calib.predictions
    t = np.asarray(t).astype(np.int64).reshape(-1)
    if len(t) != ctx.calib.count:
        raise NispError(f"taylor: {len(t)} labels for {ctx.calib.count} calibration samples")
    return t


def add_scores(bw: Backward, picks: list[tuple[Space, str, int]]) -> list[str]:
    """Append `ReduceSum(y * dL/dy)` over every axis but the channel axis; the output names."""
    graph = bw.model.graph
    outs = []
    for i, (sp, tensor, rank) in enumerate(picks):
        prod, axes, out = (f"nisp_taylor/{k}_{i}" for k in ("prod", "axes", "score"))
        keep = np.array([a for a in range(rank) if a != sp.axis], np.int64)
        graph.initializer.append(numpy_helper.from_array(keep, axes))
        graph.node.append(helper.make_node("Mul", [tensor, bw.grads[tensor]], [prod]))
        graph.node.append(helper.make_node("ReduceSum", [prod, axes], [out], keepdims=0))
        graph.output.append(onnx.ValueInfoProto(name=out))
        outs.append(out)
    return outs


class Taylor:
    """Molchanov et al. 2019: squared first-order Taylor estimate of the loss change (FO-BN)."""

    name = "taylor"

    def importance(self, ctx: Context) -> np.ndarray:
        picks = measured(ctx)
        direct = np.zeros(ctx.cg.n_elements)
        if not picks:
            return ctx.per_class(direct)
        bw = add_backward(ctx.model, [t for _, t, _ in picks], as_outputs=False)
        outs = add_scores(bw, picks)
        labels = targets(ctx)
        if bw.classes and ((labels < 0) | (labels >= bw.classes)).any():
            raise NispError(f"taylor: labels must be class indices in [0, {bw.classes})")
        try:
            sess = session(bw.model)
        except Exception as e:  # onnxruntime raises its own types
            raise NispError(
                f"taylor: onnxruntime cannot run the gradient graph ({str(e).splitlines()[0]}); "
                "use another criterion such as nisp-infs or l1"
            ) from None
        start = 0
        for batch in ctx.calib.batches:
            n = len(next(iter(batch.values())))
            feed = {**batch, bw.labels: labels[start : start + n]}
            start += n
            for (sp, _, _), s in zip(picks, sess.run(outs, feed)):
                direct[sp.elements] += np.square(s.astype(np.float64))
        return ctx.per_class(direct / len(ctx.calib.batches))
