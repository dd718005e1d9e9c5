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
from .verify import inline

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
        self.proto = export(graph.toposort(), loaded.proto)
        self.session = session(self.proto)
        self.output = self.session.get_outputs()[0].name

    def feeds(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """The mask and fill inputs that remove the elements where `keep` is false."""
        feeds = {}
        for mask, fill, x, sp, shape in self.masks:
            m = keep[sp.elements].astype(np.float32).reshape(shape)
            feeds[mask], feeds[fill] = m, (1 - m) * self.means[x]
        return feeds

    def run(self, batches: list[dict[str, np.ndarray]], keep: np.ndarray) -> np.ndarray:
        """Output 0 over `batches` with the elements where `keep` is false set to their means."""
        feeds = self.feeds(keep)
        return np.concatenate([self.session.run([self.output], {**b, **feeds})[0] for b in batches])

    def downstream(self, masks: set[str]) -> Part | None:
        """The nodes that the masks named in `masks` reach, as a `Part` in which every other
        mask, left whole, is taken out; None where the part cannot be cut out (a node with a
        subgraph, or a model kept on disk)."""
        g = self.proto.graph
        if not inline(self.proto):
            return None
        whole = {m: f for m, f, *_ in self.masks if m not in masks}
        scaled, bypass = {}, {}  # tensors of the whole masks -> the tensor they mask
        for node in g.node:
            if node.op_type == "Mul" and node.input[1] in whole:
                scaled[node.output[0]] = node.input[0], whole[node.input[1]]
            elif node.op_type == "Add" and scaled.get(node.input[0], (0, 0))[1] == node.input[1]:
                bypass[node.output[0]] = scaled[node.input[0]][0]
        reached = set(masks)
        nodes = []
        for node in g.node:  # in topological order
            if node.output[0] in scaled or node.output[0] in bypass:
                continue
            node = _renamed(node, bypass)
            if not any(t in reached for t in node.input):
                continue
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            ):
                return None
            nodes.append(node)
            reached.update(node.output)
        made = {t for n in nodes for t in n.output}
        weights = {t.name for t in g.initializer}
        needed = {t for n in nodes for t in n.input if t and t not in made and t not in weights}
        return Part(self, nodes, sorted(needed), self.output in made)


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    """A copy of `node` reading `names[t]` in place of each input t that `names` holds."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for k, t in enumerate(copy.input):
        copy.input[k] = names.get(t, t)
    return copy


class Part:
    """The nodes after a set of masks: run on the tensors they read (the `frontier`) taken
    from an unmasked run, it gives output 0 of the whole masked model for masks that differ
    from all-kept only in that set, without computing what lies before it."""

    def __init__(self, model: MaskedModel, nodes: list, frontier: list[str], reaches: bool):
        self.model, self.nodes, self.frontier, self.reaches = model, nodes, frontier, reaches
        self.session = None

    def run(self, cached: list[dict[str, np.ndarray]], keep: np.ndarray) -> np.ndarray | None:
        """Output 0 over the batches whose frontier tensors `cached` holds (None where the
        part does not reach output 0, which the masks then leave as it was)."""
        if not self.reaches:
            return None
        feeds = self.model.feeds(keep)
        if self.session is None:
            self.session = session(self._proto(cached[0], feeds))
        names = [t for t in self.frontier if t not in feeds]
        out = self.model.output
        return np.concatenate(
            [
                self.session.run(
                    [out],
                    {
                        **{t: c[t] for t in names},
                        **{t: feeds[t] for t in self.frontier if t in feeds},
                    },
                )[0]
                for c in cached
            ]
        )

    def _proto(self, sample: dict[str, np.ndarray], feeds: dict) -> onnx.ModelProto:
        full = self.model.proto
        inputs = {i.name: i for i in full.graph.input}
        values = {**sample, **feeds}
        graph_inputs = [
            inputs[t]
            if t in inputs
            else onnx.helper.make_tensor_value_info(
                t,
                onnx.helper.np_dtype_to_tensor_dtype(values[t].dtype),
                ["N", *values[t].shape[1:]],
            )
            for t in self.frontier
        ]
        used = {t for n in self.nodes for t in n.input}
        outputs = [o for o in full.graph.output if o.name == self.model.output]
        graph = onnx.helper.make_graph(
            self.nodes,
            "part",
            graph_inputs,
            outputs,
            [w for w in full.graph.initializer if w.name in used],
        )
        part = onnx.helper.make_model(graph, opset_imports=full.opset_import)
        part.ir_version = full.ir_version
        return part


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
    keeps = {
        i: [
            ~select(
                groups, element_class, importance, _alone(i, r, len(groups)), round_to, min_keep
            )[element_class]
            for r in STEPS[1:]
        ]
        for i in range(len(groups))
        if measure[i]
    }
    parts = {i: _part(model, k) for i, k in keeps.items()}
    ones = np.ones(cg.n_elements, bool)
    unmasked = model.feeds(ones)
    frontier = sorted(
        {t for p in parts.values() if p for t in p.frontier} - set(unmasked) - set(used[0])
    )
    reference, cached = [], []
    whole = session(model.proto, frontier) if frontier else model.session
    for b in used:
        y, *values = whole.run([model.output, *frontier], {**b, **unmasked})
        reference.append(y)
        cached.append({**b, **dict(zip(frontier, values))})
    del whole
    reference = _log_probs(np.concatenate(reference))
    table = np.zeros((len(groups), len(STEPS)))
    with Progress("sensitivity", len(keeps) * (len(STEPS) - 1), "run") as bar:
        for i, steps in keeps.items():
            part = parts[i]
            for j, keep in enumerate(steps, 1):
                if j > 1 and np.array_equal(keep, steps[j - 2]):
                    table[i, j] = table[i, j - 1]  # rounding left the same cut
                elif (y := part.run(cached, keep) if part else model.run(used, keep)) is not None:
                    logq = _log_probs(y)
                    table[i, j] = float((np.exp(reference) * (reference - logq)).sum(1).mean())
                bar.update()
            parts[i] = None  # its session is not needed again
    return np.maximum.accumulate(table, axis=1)


def _alone(i: int, ratio: float, n: int) -> list[float]:
    ratios = [0.0] * n
    ratios[i] = ratio
    return ratios


def _part(model: MaskedModel, keeps: list[np.ndarray]) -> Part | None:
    """The part of `model` after the masks that any of `keeps` changes (None: the whole)."""
    changed = {
        mask for mask, _, _, sp, _ in model.masks if not all(k[sp.elements].all() for k in keeps)
    }
    return model.downstream(changed)


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
