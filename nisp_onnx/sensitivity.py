"""Measured sensitivity of each channel group: how far the model's output moves when the group
alone loses its least important channels, for a MACs budget spent where it hurts least."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calibrate import run_sliced, samples_per_run, session
from .channels import ChannelGraph, ChannelGroup
from .model_io import export, load_model
from .progress import Progress
from .select import select

STEPS = tuple(np.round(np.arange(10) / 10, 1))  # ratios tried per group
SAMPLES = 32  # calibration inputs the damage is measured on
TEMPERATURE = 8.0  # predictions are compared softened: logits / TEMPERATURE
FILL_MEANS = True  # removed channels take their means where a repair follows (else zero)


class MaskedModel:
    """The model with every input that a mixing layer reads replaced by `x * mask + fill`,
    masks and fills fed as graph inputs: one session evaluates any choice of removed
    channels. A removed channel is filled with its mean over `batches` (what bias
    compensation gives the layer reading it), so the damage measured is the part a repair
    cannot take back by moving biases; without `batches`, with zero (the pruned model)."""

    def __init__(
        self,
        cg: ChannelGraph,
        proto: onnx.ModelProto,
        batches: list[dict[str, np.ndarray]] | None = None,
    ):
        loaded = load_model(proto)
        graph = loaded.graph()
        nodes = {n.name: n for n in graph.nodes}
        self.masks = []
        for node, index, sp in cg.mixing:
            x = nodes[node.name].inputs[index]
            if x.shape is None:
                continue
            shape = [1] * len(x.shape)
            shape[sp.axis] = sp.size
            mask = gs.Variable(f"{node.name}__mask{index}", np.float32, shape)
            fill = gs.Variable(f"{node.name}__fill{index}", np.float32, shape)
            scaled = gs.Variable(f"{x.name}__scaled_{node.name}", np.float32)
            masked = gs.Variable(f"{x.name}__masked_{node.name}", np.float32)
            graph.nodes.append(gs.Node("Mul", inputs=[x, mask], outputs=[scaled]))
            graph.nodes.append(gs.Node("Add", inputs=[scaled, fill], outputs=[masked]))
            nodes[node.name].inputs[index] = masked
            graph.inputs += [mask, fill]
            self.masks.append((mask.name, fill.name, x.name, sp, shape))
        self.means = (
            {x: np.zeros(shape, np.float32) for _, _, x, _, shape in self.masks}
            if batches is None
            else _channel_means(proto, self.masks, batches)
        )
        self.session = session(export(graph.toposort(), loaded.proto))
        self.output = self.session.get_outputs()[0].name

    def run(self, batches: list[dict[str, np.ndarray]], keep: np.ndarray) -> np.ndarray:
        """Output 0 over `batches` with the elements where `keep` is false set to their means."""
        feeds = {}
        for mask, fill, x, sp, shape in self.masks:
            m = keep[sp.elements].astype(np.float32).reshape(shape)
            feeds[mask], feeds[fill] = m, (1 - m) * self.means[x]
        return np.concatenate([self.session.run([self.output], {**b, **feeds})[0] for b in batches])


def _channel_means(
    proto: onnx.ModelProto, masks: list[tuple], batches: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Mean of each masked tensor over `batches` and every axis but its channel axis."""
    layout = {x: (sp.axis, shape) for _, _, x, sp, shape in masks}
    names = sorted(layout)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    sess = session(proto, tuple(names))
    step = samples_per_run(proto, names)
    for b in batches:
        for _, _, values in run_sliced(sess, names, b, step):
            for x, v in zip(names, values):
                axis, shape = layout[x]
                other = tuple(a for a in range(v.ndim) if a != axis)
                sums[x] = sums.get(x, 0.0) + v.sum(axis=other, dtype=np.float64).reshape(shape)
                counts[x] = counts.get(x, 0) + v.size // v.shape[axis]
    return {x: (sums[x] / counts[x]).astype(np.float32) for x in names}


def damage(
    cg: ChannelGraph,
    proto: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    groups: list[ChannelGroup],
    element_class: np.ndarray,
    importance: np.ndarray,
    measure: list[bool],
    min_keep: int = 1,
    round_to: int = 1,
    fill_means: bool = True,
) -> np.ndarray:
    """[groups, STEPS]: KL divergence of the model's predictions (softened at TEMPERATURE,
    so that the order of the runner-up classes counts too) from the original's when one
    group alone loses each ratio of STEPS of its channels (least important first), made
    non-decreasing in the ratio; zero for groups not to `measure`. Removed channels take
    their means when `fill_means` (a repair follows), else zero."""
    used = measured_batches(batches)
    model = MaskedModel(cg, proto, used if fill_means and FILL_MEANS else None)
    reference = _log_probs(model.run(used, np.ones(cg.n_elements, bool)))
    table = np.zeros((len(groups), len(STEPS)))
    runs = sum(measure) * (len(STEPS) - 1)
    with Progress("sensitivity", runs, "run") as bar:
        for i in range(len(groups)):
            if not measure[i]:
                continue
            for j, ratio in enumerate(STEPS[1:], 1):
                ratios = [0.0] * len(groups)
                ratios[i] = ratio
                keep = ~select(groups, element_class, importance, ratios, round_to, min_keep)
                logq = _log_probs(model.run(used, keep[element_class]))
                table[i, j] = float((np.exp(reference) * (reference - logq)).sum(axis=1).mean())
                bar.update()
    return np.maximum.accumulate(table, axis=1)


def measured_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The first batches, holding at least SAMPLES inputs where there are that many."""
    used, n = [], 0
    for b in batches:
        if n >= SAMPLES:
            break
        used.append(b)
        n += len(next(iter(b.values())))
    return used


def _log_probs(y: np.ndarray) -> np.ndarray:
    """Log class probabilities at TEMPERATURE from outputs that are logits, or already
    probabilities (whose logs are logits)."""
    y = y.reshape(len(y), -1).astype(np.float64)
    if (y >= 0).all() and np.allclose(y.sum(axis=1), 1, atol=1e-3):
        y = np.log(np.maximum(y, 1e-30))
    y = y / TEMPERATURE
    y = y - y.max(axis=1, keepdims=True)
    return y - np.log(np.exp(y).sum(axis=1, keepdims=True))
