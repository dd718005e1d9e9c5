"""Stage 8: repair the pruned model from calibration data, without gradient training.

Every Conv/Gemm/MatMul whose input changed gets new weights and bias for the channels it still
reads, fitted by ridge-regularised least squares so that its output on the *pruned* model's
inputs matches the *original* model's output at the same place (bias-only mode fits just the
bias: the mean contribution of what was removed). Layers are fitted in dependency order, so
each fit sees, and corrects, the error left by the layers before it. A layer that feeds a
residual Add is fitted to the original's output plus the error the pruned model carries in
the other addend, so the stream's error is cancelled where it meets the block; a layer that
a Relu follows is then refined for the error after the Relu (`ls-relu`).

The pruned graph runs in *stages*: stage s holds the nodes that depend on repaired layers of
level s at most. Stage s runs once, after its layers are fitted, from the cached tensors that
cross the stage boundary, so the whole repair costs one pass of each model plus the fits.
Statistics are streamed per batch (Gram matrices over sampled output positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from scipy.linalg import cho_factor, cho_solve

from .calibrate import run_sliced, samples_per_run, session
from .model_io import export
from .progress import Progress
from .rules import rule_of
from .rules.linear import Linear

MODES = ("ls", "bias", "none")
ROWS_PER_FEATURE = 64  # sampled output rows per input feature of a layer
MAX_FEATURES = 8192  # above this a Gram matrix is too big: bias-only repair
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strengths tried, relative to input energy
CHOLESKY_FROM = 64  # inputs per group from which the normal equations are solved by Cholesky
SHORTCUTS = True  # a layer feeding a residual Add also corrects the error of the other addend
RELU_PASSES = 2  # refinements of a layer before a Relu for the error after it (0: plain LS)


@dataclass
class LayerRepair:
    """Relative squared error of one layer's output on the calibration rows, with its pruned
    weights (before) and with the fitted ones (after), given the repaired layers before it.
    For a layer feeding a residual Add the target includes the shortcut's error (in the
    layer's output units); method `ls-relu` measures the error after the Relu instead."""

    node: str
    method: str
    error_before: float
    error_after: float


@dataclass
class _Tail:
    """What follows a layer's output: an optional BatchNormalization (per-channel scale and
    shift), an optional residual Add (the name of its other input) and an optional Relu."""

    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    add: bool = False
    shortcut: str | None = None  # None where unknown at the layer's fit
    relu: bool = False

    @property
    def refines(self) -> bool:
        """A Relu follows whose input is known at the fit (through the Add: the shortcut)."""
        return self.relu and (self.shortcut is not None or not self.add)


@dataclass
class _Layer:
    lin: Linear
    level: int = 0
    positions: list = field(default_factory=list)  # per batch, [n, count]
    targets: list = field(default_factory=list)  # per batch, [groups, rows, O / groups]
    tail: _Tail = field(default_factory=_Tail)
    shortcuts: list = field(default_factory=list)  # per batch, the original's shortcut rows


class _Sums:
    """Gram sums of [X 1] and Y over rows, for ||[X 1] theta - Y||^2 in closed form."""

    def __init__(self, theta0: np.ndarray):
        g, k, o = theta0.shape
        self.gram, self.cross, self.energy = np.zeros((g, k, k)), np.zeros((g, k, o)), 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Rows `x` [groups, rows, K] (the bias's constant 1 implied) and their targets, in
        float32: the products are taken of rows minus their (rounded) means, where float32
        loses nothing that matters, and the means' part is added in float64."""
        x, y = x.astype(np.float32, copy=False), y.astype(np.float32, copy=False)
        k, n = x.shape[2], x.shape[1]
        sx, sy = x.sum(axis=1, dtype=np.float64), y.sum(axis=1, dtype=np.float64)
        mx, my = (sx / n).astype(np.float32), (sy / n).astype(np.float32)
        xc, yc = x - mx[:, None], y - my[:, None]
        xt, mx, my = xc.transpose(0, 2, 1), mx.astype(np.float64), my.astype(np.float64)
        # sum x x^T = sum (x - m)(x - m)^T + m u^T + u m^T with u = s - n m / 2, for any m
        gram, mean = (xt @ xc).astype(np.float64), _outer(mx, sx - n / 2 * mx)
        gram += mean
        gram += mean.transpose(0, 2, 1)
        self.gram[:, :k, :k] += gram
        self.gram[:, :k, k] += sx
        self.gram[:, k, :k] += sx
        self.gram[:, k, k] += n
        # and sum x y^T = sum (x - m)(y - w)^T + m (t - n w)^T + s w^T, with t = sum y
        cross = (xt @ yc).astype(np.float64)
        cross += _outer(mx, sy - n * my)
        cross += _outer(sx, my)
        self.cross[:, :k] += cross
        self.cross[:, k] += sy
        self.energy += float(np.einsum("gro,gro->", y, y, dtype=np.float64))

    def __add__(self, other: _Sums) -> _Sums:
        out = _Sums(self.cross)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.energy = self.energy + other.energy
        return out

    def error(self, theta: np.ndarray) -> float:
        """Relative squared error of `theta` on these rows."""
        quad = float((theta * (self.gram @ theta)).sum())  # one GEMM, not a 4-deep einsum loop
        sq = quad - 2 * float((theta * self.cross).sum()) + self.energy
        return max(0.0, sq) / max(self.energy, 1e-30)

    def solver(self, theta0: np.ndarray, ridge: float) -> Callable[[np.ndarray], np.ndarray]:
        """argmin error + ridge * mean input energy * ||W - W0||^2 (the bias is free), as a
        function of the rows' X^T Y (from 64 inputs on, factorised once for any targets)."""
        k = self.gram.shape[1] - 1
        scale = np.einsum("gkk->gk", self.gram[:, :-1, :-1]).mean(axis=1)
        lam = ridge * np.maximum(scale, 1e-12)[:, None] * np.r_[np.ones(k), 0.0]  # the diagonal
        a = self.gram.copy()
        np.einsum("gkk->gk", a)[...] += lam
        pull = lam[:, :, None] * theta0
        if k >= CHOLESKY_FROM:  # symmetric positive definite: Cholesky, half the work of LU
            try:
                factors = [cho_factor(ai, check_finite=False) for ai in a]
                return lambda cross: np.stack(
                    [cho_solve(f, bi, check_finite=False) for f, bi in zip(factors, cross + pull)]
                )
            except np.linalg.LinAlgError:
                pass

        def general(cross: np.ndarray) -> np.ndarray:
            b = cross + pull
            try:
                return np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                return np.stack([np.linalg.lstsq(ai, bi, rcond=None)[0] for ai, bi in zip(a, b)])

        return general

    def solve(self, theta0: np.ndarray, ridge: float) -> np.ndarray:
        return self.solver(theta0, ridge)(self.cross)


def _outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per group outer products of [groups, K] and [groups, O]."""
    return a[:, :, None] * b[:, None, :]


class _LeastSquares:
    """Ridge-regularised least squares towards the pruned weights. The ridge strength is
    chosen on held-out batches (fitted on every other batch, measured on the others, then
    refitted on all), so a layer with few calibration rows for its inputs (a classifier after
    global pooling) is not overfitted: at the largest strength the fit keeps the pruned
    weights and only moves the bias. Strengths are tried from the weakest up, until the
    held-out error rises."""

    def __init__(self, theta0: np.ndarray):
        self.theta0 = theta0
        self.folds = (_Sums(theta0), _Sums(theta0))
        self.batches = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.folds[self.batches % 2].add(x, y)
        self.batches += 1

    def error(self, theta: np.ndarray) -> float:
        return (self.folds[0] + self.folds[1]).error(theta)

    def fit(self) -> np.ndarray:
        a, b = self.folds
        ridge, best = RIDGES[0], np.inf
        for r in RIDGES if self.batches >= 2 else ():
            held = b.error(a.solve(self.theta0, r))
            if held < best:
                ridge, best = r, held
            elif not held <= best * (1 + 1e-3):  # a clear rise (or NaN): stop
                break
        total = a + b
        self._solve = total.solver(self.theta0, ridge)
        return self._solve(total.cross)

    def refit(self, cross: np.ndarray) -> np.ndarray:
        """The fit with the strength `fit` chose, for targets whose X^T Y is `cross`."""
        return self._solve(cross)


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
    for layer in layers.values():
        layer.tail = _tail(layer.lin.node)
    _drop_late_shortcuts(graph, layers, _stages(graph, layers))
    _collect_targets(original, layers, out_keep, batches, seed)
    stage = _stages(graph, layers)  # again: collecting may have left layers out
    runner = _StageRunner(graph, stage, batches, original)
    runner.run(0)
    results = []
    with Progress("repair", len(layers), "layer") as bar:
        for level in range(1, max(stage.values(), default=0) + 1):
            for layer in (la for la in layers.values() if la.level == level):
                inputs = runner.cache[layer.lin.node.inputs[0].name]
                shortcut = runner.cache.get(layer.tail.shortcut or "")
                result, added = _fit(layer, inputs, mode, shortcut)
                results.append(result)
                bar.update()
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


def _bn_affine(t: gs.Tensor) -> tuple[gs.Tensor, np.ndarray, np.ndarray] | None:
    """(output, per-channel scale, shift) of the BatchNormalization that alone reads `t`,
    with constant parameters; None where there is none."""
    if len(t.outputs) != 1 or t.outputs[0].op != "BatchNormalization":
        return None
    bn = t.outputs[0]
    params = bn.inputs[1:5]
    if len(params) < 4 or not all(isinstance(p, gs.Constant) for p in params):
        return None
    gamma, beta, mean, var = (p.values.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return bn.outputs[0], scale, beta - mean * scale


def _tail(node: gs.Node) -> _Tail:
    """What follows `node`'s output, each part alone reading what comes before it. The
    shortcut is left out without SHORTCUTS: fitting the layer to the original's Add input
    plus the shortcut's error corrects the error carried in the stream."""
    tail, t = _Tail(), node.outputs[0]
    if (bn := _bn_affine(t)) is not None:
        if node.op == "MatMul":
            return tail  # (a MatMul's channels are not the BatchNorm's)
        t, tail.scale, tail.shift = bn
    if len(t.outputs) == 1 and t.outputs[0].op == "Add":
        add = t.outputs[0]
        other = add.inputs[1] if add.inputs[0] is t else add.inputs[0]
        if not isinstance(other, gs.Variable) or other is t:
            return tail  # a constant (a bias) or the tensor twice: no residual
        tail.add, t = True, add.outputs[0]
        tail.shortcut = other.name if SHORTCUTS else None
    tail.relu = len(t.outputs) == 1 and t.outputs[0].op == "Relu"
    return tail


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
    extra = sorted({la.tail.shortcut for la in layers.values() if la.tail.shortcut} - set(names))
    sess = session(original, tuple(names + extra))
    total = sum(len(next(iter(b.values()))) for b in batches)
    step = samples_per_run(original, names + extra)
    for b, batch in enumerate(batches):
        n = len(next(iter(batch.values())))
        drawn: dict[str, np.ndarray] = {}  # positions over the whole batch, per layer
        rows: dict[str, list[np.ndarray | None]] = {}  # target and shortcut rows
        for lo, hi, values in run_sliced(sess, names + extra, batch, step):
            tensors = dict(zip(names + extra, values))
            for i, (name, y) in enumerate(zip(nodes, values)):
                layer = layers.get(name)
                if layer is None:
                    continue
                lin = layer.lin
                axis, keep = out_keep.get(name, (lin.axis(y.ndim), None))
                if axis != lin.axis(y.ndim):  # its channels are not where it mixes: leave it
                    del layers[name]
                    continue
                if name not in drawn:
                    count = -(-ROWS_PER_FEATURE * (lin.features + 1) // total)
                    shape = y.shape if hi is None else (n, *y.shape[1:])
                    drawn[name] = lin.positions(shape, count, np.random.default_rng([seed, i, b]))
                pos = drawn[name] if hi is None else drawn[name][lo:hi]
                at = slice(lo * pos.shape[1], None if hi is None else hi * pos.shape[1])
                out = rows.setdefault(name, [None, None])
                _put(out, 0, lin.outputs(y, pos, keep), at, n * pos.shape[1])
                if layer.tail.shortcut is not None:
                    other = tensors[layer.tail.shortcut]
                    if other.shape != y.shape or (layer.tail.scale is not None and axis != 1):
                        layer.tail.shortcut, layer.shortcuts = None, []
                    else:
                        _put(out, 1, lin.outputs(other, pos, keep), at, n * pos.shape[1])
            del values, tensors
        for name, (targets, shortcuts) in rows.items():
            layer = layers.get(name)
            if layer is None:
                continue
            layer.positions.append(drawn[name])
            layer.targets.append(targets)
            if layer.tail.shortcut is not None:
                layer.shortcuts.append(shortcuts)


def _put(out: list, i: int, part: np.ndarray, at: slice, total: int) -> None:
    """Write the rows `part` [groups, rows, O / groups] of one run at `at` into `out[i]`,
    the float32 rows of a whole batch (made at the first run)."""
    if at.start == 0 and at.stop is None:
        out[i] = part.astype(np.float32, copy=False)
        return
    if out[i] is None:
        out[i] = np.empty((part.shape[0], total, part.shape[2]), np.float32)
    out[i][:, at] = part


def _drop_late_shortcuts(graph: gs.Graph, layers: dict[str, _Layer], stage: dict) -> None:
    """Forget the shortcut of layers whose shortcut the pruned model computes no earlier than
    the layer's own stage (ResNet downsampling convolutions): it is not known when the layer
    is fitted, so its rows are not collected."""
    made = {t.name: stage[n.name] for n in graph.nodes for t in n.outputs}
    for layer in layers.values():
        if made.get(layer.tail.shortcut or "", -1) >= layer.level:
            layer.tail.shortcut = None


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


def _fit(
    layer: _Layer, inputs: list[np.ndarray], mode: str, shortcut: list[np.ndarray] | None
) -> tuple[LayerRepair, list]:
    """Refit one layer from its pruned inputs; `shortcut` is the pruned model's other addend
    of the Add the layer feeds, per batch, when it is known (see `_tail`)."""
    lin = layer.lin
    theta0 = lin.params().astype(np.float64)
    method = "bias" if mode == "bias" or lin.features >= MAX_FEATURES else "ls"
    stats = _LeastSquares(theta0) if method == "ls" else _BiasOnly(theta0)
    tail = layer.tail
    if shortcut is None or not layer.shortcuts:
        shortcut, tail.shortcut = [None] * len(layer.targets), None
    refine = method == "ls" and RELU_PASSES > 0 and tail.refines
    rows, ys, offsets = [], [], []  # kept for the refinement, which reads them again
    for b, (x, pos, y) in enumerate(zip(inputs, layer.positions, layer.targets)):
        other = None if shortcut[b] is None else lin.outputs(shortcut[b], pos, None)
        if other is not None:  # the Add should see the original's sum
            y = y + (layer.shortcuts[b] - other) * _inverse(tail.scale, y.shape)
        x = lin.patches(x, pos)
        stats.add(x, y)
        if refine:
            rows.append(x.astype(np.float32, copy=False))
            ys.append(y)
            offsets.append(_offset(tail.shift, other, y.shape))
    layer.positions, layer.targets, layer.shortcuts = [], [], []
    theta = stats.fit()
    if refine:  # errors after the Relu, which the refinement minimises
        method = "ls-relu"
        theta, before, after = _relu_refit(stats, rows, ys, offsets, tail.scale, theta)
    else:
        before, after = stats.error(theta0), stats.error(theta)
        if not after <= before:  # never make a layer worse on its own data
            theta, after = theta0, before
    added = lin.set_params(theta.astype(np.float32))
    return LayerRepair(lin.node.name, method, before, after), added


def _offset(shift: np.ndarray | None, other: np.ndarray | None, shape: tuple) -> np.ndarray:
    """What is added to scale * output before the Relu, per output row: the BatchNorm's shift
    and the shortcut."""
    g, _, o = shape
    out = (np.zeros(g * o) if shift is None else shift).astype(np.float32).reshape(g, 1, o)
    return out if other is None else out + other


def _relu_refit(
    stats: _LeastSquares,
    rows: list[np.ndarray],
    ys: list[np.ndarray],
    offsets: list[np.ndarray],
    scale: np.ndarray | None,
    theta: np.ndarray,
) -> tuple[np.ndarray, float, float]:
    """Refine a least-squares fit for the error after the Relu that follows the layer:
    where the original is cut off by the Relu, an output on the cut-off side costs nothing.
    Majorize-minimize, each pass a least-squares fit to the targets that make the current
    fit's cut-off outputs free; then per output channel the weights (pruned, least squares
    or refined) with the least error after the Relu. Returns the weights and the relative
    errors after the Relu of the pruned and of the chosen weights (never larger)."""
    g, _, o = theta.shape
    a = None if scale is None else scale.reshape(g, 1, o).astype(np.float32)
    big = np.ones((g, 1, o), bool) if a is None else _significant(a)
    # per batch: the Relu's threshold in output units, the original after the Relu, and
    # where that is cut off (elsewhere the target stays the original's; used as a factor,
    # as arithmetic is many times faster than numpy's masked selection)
    edge = [-c if a is None else -c / np.where(big, a, 1.0) for c in offsets]
    wants = [np.maximum(y if a is None else a * y, -c) + c for y, c in zip(ys, offsets)]
    cut = [(w <= 0) & big for w in wants]
    energy = max(sum(float(np.einsum("gro,gro->", w, w, dtype=np.float64)) for w in wants), 1e-30)
    candidates, losses = [stats.theta0, theta], []
    for step in range(RELU_PASSES + 1):  # (rows in float32: this only ranks and refines)
        last = step == RELU_PASSES
        cross = np.zeros_like(theta)
        new = [th.astype(np.float32) for th in candidates[len(losses) :]]
        loss = [np.zeros((g, o)) for _ in new]
        for b, (x, y, c, want) in enumerate(zip(rows, ys, offsets, wants)):
            for i, th in enumerate(new):
                p = x @ th[:, :-1]
                p += th[:, -1:]
                err = p.copy() if a is None else a * p  # in place from here: these are the
                err += c  # largest arrays of the repair
                np.maximum(err, 0, out=err)
                err -= want
                loss[i] += np.einsum("gro,gro->go", err, err)
                del err
            if not last:  # `p` is the newest candidate's output: make its cut-off side free
                if a is None or (a > 0).all():
                    free = np.minimum(p, edge[b], out=p)
                else:
                    free = np.where(a > 0, np.minimum(p, edge[b]), np.maximum(p, edge[b]))
                free -= y  # the target: y + cut * (free - y)
                free *= cut[b]
                target = np.add(free, y, out=free)
                cross[:, :-1] += x.transpose(0, 2, 1) @ target
                cross[:, -1] += target.sum(axis=1)
        losses += loss
        if not last:
            candidates.append(stats.refit(cross))
    losses = np.stack(losses)  # [candidates, g, o]
    best = np.argmin(losses, axis=0)
    stacked = np.stack(candidates)  # [candidates, g, K + 1, o]
    chosen = np.take_along_axis(stacked, best[None, :, None, :], axis=0)[0]
    return chosen, float(losses[0].sum()) / energy, float(losses.min(axis=0).sum()) / energy


def _significant(scale: np.ndarray) -> np.ndarray:
    """Channels whose BatchNorm scale is large enough to correct anything through: dividing
    by a tiny scale would ask the layer for huge outputs that its ridge barely restrains."""
    size = np.abs(scale)
    return size > 0.05 * np.median(size)


def _inverse(scale: np.ndarray | None, shape: tuple) -> np.ndarray | float:
    """1 / scale shaped like output rows [groups, rows, O / groups]; 0 where the scale is too
    small for the layer to correct anything through it."""
    if scale is None:
        return 1.0
    big = _significant(scale)
    inv = np.where(big, 1 / np.where(big, scale, 1.0), 0.0).astype(np.float32)
    return inv.reshape(shape[0], 1, shape[2])


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
            dying = [k for k in inputs if last.get(k, -1) <= s]  # read for the last time here
            results = []
            for b in range(self.count):
                out = sess.run(names, {k: self.cache[k][b] for k in inputs})
                # own copies: onnxruntime's outputs live in the session's arena, which would
                # keep this stage's whole working memory alive as long as any of them is cached
                results.append([np.array(v) for v in out])
                del out
                for k in dying:  # free each batch once read, not the whole tensor at the end
                    self.cache[k][b] = None
            for i, name in enumerate(names):
                self.cache[name] = [r[i] for r in results]
        for name in [k for k in self.cache if last.get(k, -1) <= s]:
            del self.cache[name]
