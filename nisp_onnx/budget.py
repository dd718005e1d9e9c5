"""How much each channel group loses: a uniform ratio, per-layer overrides, one global ranking
across groups, or whatever ratios meet a MACs budget.

Every mode ends in one ratio per group; `select` then picks the classes within each group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

from .channels import ChannelGraph, ChannelGroup
from .errors import NispError
from .select import select
from .sensitivity import STEPS


@dataclass
class Plan:
    """How much to prune where (the `prune()` arguments of the same names)."""

    ratio: float = 0.5
    layer_ratio: dict[str, float] = field(default_factory=dict)
    global_ranking: bool = False
    normalize: bool = True  # global ranking on scores divided by their group's mean
    max_layer_ratio: float = 1.0
    target_macs: float | None = None
    round_to: int = 1
    min_keep: int = 1

    def check(self) -> None:
        """Raise a user error for values out of range."""
        for name, v in [("--ratio", self.ratio), *self.layer_ratio.items()]:
            if not 0 <= v < 1:
                raise NispError(
                    f"{'--layer-ratio ' if name != '--ratio' else ''}{name}: "
                    f"a ratio must be in [0, 1), got {v}"
                )
        if not 0 < self.max_layer_ratio <= 1:
            raise NispError(f"--max-layer-ratio must be in (0, 1], got {self.max_layer_ratio}")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise NispError(
                f"--target-macs is the fraction of MACs to keep, in (0, 1], got {self.target_macs}"
            )
        if self.round_to < 1:
            raise NispError(f"--round-to must be a positive channel count, got {self.round_to}")

    def describe(self, how: str | None = None) -> str:
        """The plan in words; `how` replaces what decides the amount (ratio or target)."""
        if how is None and self.target_macs is not None:
            how = f"target MACs {self.target_macs}"
        if how is None:
            how = f"global ratio {self.ratio}" if self.global_ranking else f"ratio {self.ratio}"
        if self.layer_ratio:
            how += ", " + ", ".join(f"{k}={v}" for k, v in self.layer_ratio.items())
        if self.max_layer_ratio < 1:
            how += f", at most {self.max_layer_ratio} per group"
        return how + (f", multiples of {self.round_to}" if self.round_to > 1 else "")


def allocate(
    groups: list[ChannelGroup],
    element_class: np.ndarray,
    importance: np.ndarray,
    plan: Plan,
    macs: MacModel | None = None,
    damage: Callable[[list[bool]], np.ndarray] | None = None,
) -> np.ndarray:
    """Boolean mask over classes, true where removed, following `plan`.

    A MACs target needs `macs`; without a global ranking it also needs `damage`, which
    returns the measured damage table of `sensitivity.damage` for the groups it is asked for.
    """

    def pick(ratios: list[float | None]) -> np.ndarray:
        return select(groups, element_class, importance, ratios, plan.round_to, plan.min_keep)

    if plan.target_macs is None and not plan.global_ranking:
        return pick(layer_ratios(groups, plan.ratio, plan.layer_ratio))
    fixed = layer_ratios(groups, None, plan.layer_ratio)
    if not plan.global_ranking:
        assert macs is not None and damage is not None, "a MACs target needs a damage table"
        table = damage([f is None and g.prunable > 0 for f, g in zip(fixed, groups)])
        return pick(cheapest_ratios(groups, fixed, plan, macs, table, pick, element_class))
    ranking = GlobalRanking(
        groups, importance, [f is None for f in fixed], plan.normalize, plan.max_layer_ratio
    )
    if plan.target_macs is None:
        k = min(int(round(plan.ratio * ranking.eligible)), len(ranking))
        return pick(ranking.ratios(k, fixed))
    assert macs is not None, "a MACs target needs a MacModel"
    target = plan.target_macs * macs.total

    def macs_at(k: int) -> float:
        return macs.macs(~pick(ranking.ratios(k, fixed))[element_class])

    if macs_at(len(ranking)) > target:
        _unreachable(plan.target_macs, macs_at(len(ranking)) / macs.total)
    k = _nearest(0, len(ranking), macs_at, target)
    return pick(ranking.ratios(k, fixed))


class MacModel:
    """MACs of the pruned model, predicted from which elements are kept.

    Each Conv/Gemm/MatMul's MACs scale with the kept fraction of the channel space it
    produces and of every input space it consumes: a plain conv with both halved costs a
    quarter, a depthwise or grouped conv (whose input is tied to its output) a half.
    """

    def __init__(self, cg: ChannelGraph, node_macs: dict[str, int]):
        consumed: dict[str, list[int]] = {}
        for node, _, sp in cg.mixing:
            consumed.setdefault(node.name, []).append(sp.id)
        self.spaces = cg.spaces
        self.total = sum(node_macs.values())
        macs, ids = [], []
        for node in cg.graph.nodes:
            m = node_macs.get(node.outputs[0].name, 0) if node.outputs else 0
            if not m:
                continue
            spaces = list(consumed.get(node.name, []))
            out = cg.space(node.outputs[0])
            if out is not None and out.producer == node.name:
                spaces.append(out.id)
            macs.append(m)
            ids.append(spaces)
        self.fixed = self.total - sum(macs)  # nodes the analysis never saw
        self.macs_per_term = np.array(macs, dtype=np.float64)
        width = max((len(i) for i in ids), default=0)
        # space ids per term, padded with the id of an extra always-full space
        self.ids = np.full((len(ids), width), len(cg.spaces), dtype=np.int64)
        for t, i in enumerate(ids):
            self.ids[t, : len(i)] = i

    def fractions(self, keep: np.ndarray) -> np.ndarray:
        """Kept fraction of every space (and a trailing 1 for padding)."""
        return np.array([*(keep[sp.elements].mean() for sp in self.spaces), 1.0])

    def from_fractions(self, fractions: np.ndarray) -> float:
        return float(self.fixed + self.macs_per_term @ fractions[self.ids].prod(axis=1))

    def macs(self, keep: np.ndarray) -> float:
        """Predicted MACs per sample with `keep` (bool per element)."""
        return self.from_fractions(self.fractions(keep))


def layer_ratios(
    groups: list[ChannelGroup], default: float | None, patterns: dict[str, float]
) -> list[float | None]:
    """Per group: the ratio of the last node-name glob in `patterns` that matches one of its
    nodes, else `default` (None: left to a global ranking)."""
    out: list[float | None] = []
    for g in groups:
        r = default
        for pattern, value in patterns.items():
            if any(fnmatchcase(n, pattern) for n in g.nodes):
                r = value
        out.append(r)
    return out


class GlobalRanking:
    """All prunable classes of the groups not fixed by a pattern, least important first.

    With `normalize`, scores are divided by their group's mean so that the scale of a group
    (propagated scores grow with depth) does not decide; classes with a non-finite score
    are never ranked. A group gives up at most `max_ratio` of its prunable classes.
    """

    def __init__(
        self,
        groups: list[ChannelGroup],
        importance: np.ndarray,
        free: list[bool],
        normalize: bool = True,
        max_ratio: float = 1.0,
    ):
        self.groups = groups
        self.prunable = np.array([max(g.prunable, 1) for g in groups])
        self.eligible = 0  # prunable classes of the ranked groups
        cls, grp, score = [], [], []
        for i, g in enumerate(groups):
            c = g.classes[~g.frozen]
            s = importance[c].astype(np.float64)
            c, s = c[np.isfinite(s)], s[np.isfinite(s)]
            if not free[i] or not len(c):
                continue
            self.eligible += len(c)
            if normalize:
                s = s / max(float(np.abs(s).mean()), 1e-300)
            cap = int(np.floor(max_ratio * g.prunable + 1e-9))
            take = np.lexsort((c, s))[:cap]  # a capped group offers only its weakest classes
            cls.append(c[take])
            grp.append(np.full(len(take), i))
            score.append(s[take])
        if cls:
            cls_a, grp_a, score_a = map(np.concatenate, (cls, grp, score))
            self.group_of = grp_a[np.lexsort((cls_a, score_a))]
        else:
            self.group_of = np.array([], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.group_of)

    def ratios(self, k: int, fixed: list[float | None]) -> list[float]:
        """Per-group ratios that remove the first `k` ranked classes; `fixed` ones stay."""
        counts = np.bincount(self.group_of[:k], minlength=len(self.groups))
        return [float(c / p) if f is None else f for c, p, f in zip(counts, self.prunable, fixed)]


def cheapest_ratios(
    groups: list[ChannelGroup],
    fixed: list[float | None],
    plan: Plan,
    macs: MacModel,
    table: np.ndarray,
    pick: Callable[[list[float | None]], np.ndarray],
    element_class: np.ndarray,
) -> list[float]:
    """Per-group ratios meeting `plan.target_macs` at the least measured damage.

    Greedy: every group starts at ratio 0 and the group whose next step of `STEPS` costs the
    least damage per MAC saved takes it, until the target is met; the last group's ratio is
    then settled class by class to land nearest the target. Damage is assumed additive.
    """
    steps = [r for r in STEPS if r <= plan.max_layer_ratio + 1e-9]
    target = plan.target_macs * macs.total

    def fractions(ratios: list[float | None]) -> np.ndarray:
        return macs.fractions(~pick(ratios)[element_class])

    base = [0.0 if f is None else f for f in fixed]
    frac = fractions(base)
    moves: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for i, g in enumerate(groups):
        if fixed[i] is None and g.prunable:
            ids = [sp.id for sp in g.spaces]
            moves[i] = (ids, [fractions([*base[:i], r, *base[i + 1 :]])[ids] for r in steps])
    state = dict.fromkeys(moves, 0)
    current, last = macs.from_fractions(frac), None
    while current > target:
        best = None
        for i, j in state.items():
            if j + 1 < len(steps):
                ids, rows = moves[i]
                f = frac.copy()
                f[ids] = rows[j + 1]
                m = macs.from_fractions(f)
                cost = (table[i, j + 1] - table[i, j]) / max(current - m, 1e-9)
                if m < current and (best is None or cost < best[0]):
                    best = (cost, i, m, f)
        if best is None:
            _unreachable(plan.target_macs, current / macs.total)
        _, last, current, frac = best
        state[last] += 1
    ratios = [steps[state[i]] if i in state else float(base[i]) for i in range(len(groups))]
    if last is not None:  # settle the last group's ratio between its last two steps
        p = groups[last].prunable
        lo = int(round(steps[state[last] - 1] * p))
        hi = int(round(steps[state[last]] * p))

        def at(k: int) -> float:
            ratios[last] = k / p
            return macs.macs(~pick(ratios)[element_class])

        ratios[last] = _nearest(lo, hi, at, target) / p
    return ratios


def _nearest(lo: int, hi: int, macs_at: Callable[[int], float], target: float) -> int:
    """The k in [lo, hi] whose MACs, falling as k grows and at most `target` at `hi`, are
    nearest the target: bisection for the first k at or under it, or one before."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if macs_at(mid) <= target else (mid + 1, hi)
    if lo > 0 and macs_at(lo - 1) - target < target - macs_at(lo):
        lo -= 1
    return lo


def _unreachable(target: float, best: float) -> None:
    raise NispError(
        f"--target-macs {target}: at most {100 * (1 - best):.1f}% of the MACs can be removed "
        "(frozen groups, --exclude, --layer-ratio, --max-layer-ratio or --round-to limit the "
        "rest)"
    )
