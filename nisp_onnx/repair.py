"""Stage 8: repair the pruned model from calibration data, without gradient training.

Every Conv/Gemm/MatMul whose input changed gets new weights and bias for the channels it still
reads, fitted by ridge-regularised least squares so that its output on the *pruned* model's
inputs matches the *original* model's output at the same place (bias-only mode fits just the
bias: the mean contribution of what was removed). Layers are fitted in dependency order, so
each fit sees, and corrects, the error left by the layers before it.

The pruned graph runs in *stages*: stage s holds the nodes that depend on repaired layers of
level s at most. Stage s runs once, after its layers are fitted, from the cached tensors that
cross the stage boundary, so the whole repair costs one pass of each model plus the fits.
Statistics are streamed per batch (Gram matrices over sampled output positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calibrate import session
from .model_io import export
from .rules import rule_of
from .rules.linear import Linear

MODES = ("ls", "bias", "none")
ROWS_PER_FEATURE = 128  # sampled output rows per input feature of a layer
MAX_FEATURES = 8192  # above this a Gram matrix is too big: bias-only repair
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strengths tried, relative to input energy


@dataclass
class LayerRepair:
    """Relative squared error of one layer's output on the calibration rows, with its pruned
    weights (before) and with the fitted ones (after), given the repaired layers before it."""

    node: str
    method: str
    error_before: float
    error_after: float


@dataclass
class _Layer:
    lin: Linear
    level: int = 0
    positions: list = field(default_factory=list)  # per batch, [n, count]
    targets: list = field(default_factory=list)  # per batch, [groups, rows, O / groups]


class _Sums:
    """Gram sums of [X 1] and Y over rows, for ||[X 1] theta - Y||^2 in closed form."""

    def __init__(self, theta0: np.ndarray):
        g, k, o = theta0.shape
        self.gram, self.cross, self.energy = np.zeros((g, k, k)), np.zeros((g, k, o)), 0.0

    def add(self, x1: np.ndarray, y: np.ndarray) -> None:
        xt = x1.transpose(0, 2, 1)
        self.gram += xt @ x1
        self.cross += xt @ y
        self.energy += float(np.einsum("gro,gro->", y, y))

    def __add__(self, other: _Sums) -> _Sums:
        out = _Sums(self.cross)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.energy = self.energy + other.energy
        return out

    def error(self, theta: np.ndarray) -> float:
        """Relative squared error of `theta` on these rows."""
        quad = np.einsum("gko,gkl,glo->", theta, self.gram, theta)
        sq = quad - 2 * float((theta * self.cross).sum()) + self.energy
        return max(0.0, sq) / max(self.energy, 1e-30)

    def solve(self, theta0: np.ndarray, ridge: float) -> np.ndarray:
        """argmin error + ridge * mean input energy * ||W - W0||^2 (the bias is free)."""
        k = self.gram.shape[1] - 1
        scale = np.einsum("gkk->gk", self.gram[:, :-1, :-1]).mean(axis=1)
        lam = ridge * np.maximum(scale, 1e-12)[:, None, None] * np.diag(np.r_[np.ones(k), 0.0])
        a, b = self.gram + lam, self.cross + lam @ theta0
        try:
            return np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            return np.stack([np.linalg.lstsq(ai, bi, rcond=None)[0] for ai, bi in zip(a, b)])


class _LeastSquares:
    """Ridge-regularised least squares towards the pruned weights. The ridge strength is
    chosen by two-fold cross-validation over batches, so a layer with few calibration rows
    for its inputs (a classifier after global pooling) is not overfitted: at the largest
    strength the fit keeps the pruned weights and only moves the bias."""

    def __init__(self, theta0: np.ndarray):
        self.theta0 = theta0
        self.folds = (_Sums(theta0), _Sums(theta0))
        self.batches = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x1 = np.concatenate([x, np.ones(x.shape[:2] + (1,), x.dtype)], axis=2)
        self.folds[self.batches % 2].add(x1.astype(np.float64), y.astype(np.float64))
        self.batches += 1

    def error(self, theta: np.ndarray) -> float:
        return (self.folds[0] + self.folds[1]).error(theta)

    def fit(self) -> np.ndarray:
        a, b = self.folds
        ridge = RIDGES[0]
        if self.batches >= 2:
            ridge = min(
                RIDGES,
                key=lambda r: b.error(a.solve(self.theta0, r)) + a.error(b.solve(self.theta0, r)),
            )
        return (a + b).solve(self.theta0, ridge)


class _BiasOnly:
    """Streamed residual sums for the best bias with the weights fixed: the mean of what the
    removed inputs (and earlier errors) contributed."""

    def __init__(self, theta0: np.ndarray):
        self.theta0 = theta0
        g, _, o = theta0.shape
        self.count, self.sum, self.energy, self.sq = 0, np.zeros((g, o)), 0.0, 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        y = y.astype(np.float64)
        r = y - x.astype(np.float64) @ self.theta0[:, :-1]  # what the bias has to explain
        self.count += r.shape[1]
        self.sum += r.sum(axis=1)
        self.sq += float(np.einsum("gro,gro->", r, r))
        self.energy += float(np.einsum("gro,gro->", y, y))

    def error(self, theta: np.ndarray) -> float:
        b = theta[:, -1]
        sq = self.sq - 2 * float((b * self.sum).sum()) + self.count * float((b * b).sum())
        return max(0.0, sq) / max(self.energy, 1e-30)

    def fit(self) -> np.ndarray:
        theta = self.theta0.copy()
        theta[:, -1] = self.sum / max(self.count, 1)
        return theta


def repair(
    graph: gs.Graph,
    original: onnx.ModelProto,
    changed: set[str],
    out_keep: dict[str, tuple[int, np.ndarray]],
    batches: list[dict[str, np.ndarray]],
    mode: str = "ls",
    seed: int = 0,
) -> list[LayerRepair]:
    """Refit, in place, the linear layers of the pruned `graph` that read `changed` tensors or
    anything computed from them. `original` is the unpruned model with the same tensor names;
    `out_keep` maps a node to (axis, kept mask) of its output channels; `batches` are the
    calibration inputs."""
    if mode not in MODES:
        raise ValueError(f"repair mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return []
    layers = _layers(graph, changed)
    _collect_targets(original, layers, out_keep, batches, seed)
    stage = _stages(graph, layers)
    runner = _StageRunner(graph, stage, batches, original)
    runner.run(0)
    results = []
    for level in range(1, max(stage.values(), default=0) + 1):
        for layer in (la for la in layers.values() if la.level == level):
            result, added = _fit(layer, runner.cache[layer.lin.node.inputs[0].name], mode)
            results.append(result)
            for node in added:
                graph.nodes.append(node)
                stage[node.name] = level
        runner.run(level)
    graph.toposort()
    return results


def _layers(graph: gs.Graph, changed: set[str]) -> dict[str, _Layer]:
    """Linear nodes whose input differs from the original's: downstream of `changed`."""
    tainted = set(changed)
    layers = {}
    for node in graph.nodes:
        if not any(t.name in tainted for t in node.inputs):
            continue
        tainted.update(t.name for t in node.outputs)
        lin = rule_of(node).linear(node)
        if lin is not None and node.inputs[0].name in tainted:
            layers[node.name] = _Layer(lin)
    return layers


def _collect_targets(
    original: onnx.ModelProto,
    layers: dict[str, _Layer],
    out_keep: dict[str, tuple[int, np.ndarray]],
    batches: list[dict[str, np.ndarray]],
    seed: int,
) -> None:
    """One pass of the original model: each layer's output at sampled positions."""
    nodes = list(layers)
    names = [layers[n].lin.node.outputs[0].name for n in nodes]
    sess = session(original, tuple(names))
    total = sum(len(next(iter(b.values()))) for b in batches)
    for b, batch in enumerate(batches):
        for i, (name, y) in enumerate(zip(nodes, sess.run(names, batch))):
            layer = layers.get(name)
            if layer is None:
                continue
            lin = layer.lin
            axis, keep = out_keep.get(name, (lin.axis(y.ndim), None))
            if axis != lin.axis(y.ndim):  # its channels are not where it mixes: leave it
                del layers[name]
                continue
            count = -(-ROWS_PER_FEATURE * (lin.features + 1) // total)
            pos = lin.positions(y.shape, count, np.random.default_rng([seed, i, b]))
            layer.positions.append(pos)
            layer.targets.append(lin.outputs(y, pos, keep).astype(np.float32))


def _stages(graph: gs.Graph, layers: dict[str, _Layer]) -> dict[str, int]:
    """Stage of every node: the most repaired layers on any path into it; a layer's stage is
    its level (the stage its new weights are first used in)."""
    at: dict[str, int] = {}
    stage = {}
    for node in graph.nodes:
        s = max((at.get(t.name, 0) for t in node.inputs), default=0)
        if node.name in layers:
            s += 1
            layers[node.name].level = s
        stage[node.name] = s
        at.update((t.name, s) for t in node.outputs)
    return stage


def _fit(layer: _Layer, inputs: list[np.ndarray], mode: str) -> tuple[LayerRepair, list]:
    lin = layer.lin
    theta0 = lin.params().astype(np.float64)
    method = "bias" if mode == "bias" or lin.features >= MAX_FEATURES else "ls"
    stats = _LeastSquares(theta0) if method == "ls" else _BiasOnly(theta0)
    for x, pos, y in zip(inputs, layer.positions, layer.targets):
        stats.add(lin.patches(x, pos), y)
    layer.positions, layer.targets = [], []
    theta = stats.fit()
    before, after = stats.error(theta0), stats.error(theta)
    if not after <= before:  # never make a layer worse on its own data
        theta, after = theta0, before
    added = lin.set_params(theta.astype(np.float32))
    return LayerRepair(lin.node.name, method, before, after), added


class _StageRunner:
    """Runs the pruned graph stage by stage, caching the tensors that cross stages."""

    def __init__(
        self,
        graph: gs.Graph,
        stage: dict[str, int],
        batches: list[dict[str, np.ndarray]],
        like: onnx.ModelProto,
    ):
        self.graph, self.stage, self.like = graph, stage, like
        self.count = len(batches)
        self.cache = {t.name: [b[t.name] for b in batches] for t in graph.inputs}

    def _last_use(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for node in self.graph.nodes:
            for t in node.inputs:
                last[t.name] = max(last.get(t.name, -1), self.stage[node.name])
        return last

    def run(self, s: int) -> None:
        """Run stage `s` over every batch, keeping what later stages read."""
        last = self._last_use()
        nodes = [n for n in self.graph.nodes if self.stage[n.name] == s]
        made = {t.name for n in nodes for t in n.outputs}
        inputs, outputs = {}, {}
        for n in nodes:
            for t in n.inputs:
                if isinstance(t, gs.Variable) and t.name and t.name not in made:
                    inputs[t.name] = t
            for t in n.outputs:
                if last.get(t.name, -1) > s:
                    outputs[t.name] = t
        if outputs:
            sub = gs.Graph(
                nodes,
                list(inputs.values()),
                list(outputs.values()),
                opset=self.graph.opset,
                import_domains=self.graph.import_domains,
            )
            sess = session(export(sub, self.like))
            names = list(outputs)
            feeds = ({k: self.cache[k][b] for k in inputs} for b in range(self.count))
            results = [sess.run(names, feed) for feed in feeds]
            for i, name in enumerate(names):
                self.cache[name] = [r[i] for r in results]
        for name in [k for k in self.cache if last.get(k, -1) <= s]:
            del self.cache[name]
