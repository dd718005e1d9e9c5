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

    def describe(self) -> str:
        how = f"target MACs {self.target_macs}" if self.target_macs is not None else ""
        how = how or (
            f"global ratio {self.ratio}" if self.global_ranking else f"ratio {self.ratio}"
        )
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
) -> np.ndarray:
    """Boolean mask over classes, true where removed, following `plan` (`macs` is needed for
    a MACs target)."""

    def pick(ratios: list[float | None]) -> np.ndarray:
        return select(groups, element_class, importance, ratios, plan.round_to, plan.min_keep)

    if plan.target_macs is None and not plan.global_ranking:
        return pick(layer_ratios(groups, plan.ratio, plan.layer_ratio))
    fixed = layer_ratios(groups, None, plan.layer_ratio)
    ranking = GlobalRanking(
        groups, importance, [f is None for f in fixed], plan.normalize, plan.max_layer_ratio
    )
    if plan.target_macs is None:
        k = min(int(round(plan.ratio * ranking.eligible)), len(ranking))
        r = ranking.ratios(k)
        return pick([float(r[i]) if f is None else f for i, f in enumerate(fixed)])
    assert macs is not None, "a MACs target needs a MacModel"
    ratios = target_ratios(
        ranking,
        fixed,
        plan.target_macs,
        lambda r: macs.macs(~pick(r)[element_class]),
        macs.total,
    )
    return pick(ratios)


class MacModel:
    """MACs of the pruned model, predicted from which elements are kept.

    Each Conv/Gemm/MatMul's MACs scale with the kept fraction of the channel space it
    produces and of every input space it consumes: a plain conv with both halved costs a
    quarter, a depthwise or grouped conv (whose input is tied to its output) a half.
    """

    def __init__(self, cg: ChannelGraph, node_macs: dict[str, int]):
        consumed: dict[str, list] = {}
        for node, _, sp in cg.mixing:
            consumed.setdefault(node.name, []).append(sp)
        self.terms = []
        self.total = sum(node_macs.values())
        for node in cg.graph.nodes:
            macs = node_macs.get(node.outputs[0].name, 0) if node.outputs else 0
            if not macs:
                continue
            spaces = list(consumed.get(node.name, []))
            out = cg.space(node.outputs[0])
            if out is not None and out.producer == node.name:
                spaces.append(out)
            self.terms.append((macs, spaces))
        self.fixed = self.total - sum(m for m, _ in self.terms)  # nodes the analysis never saw

    def macs(self, keep: np.ndarray) -> float:
        """Predicted MACs per sample with `keep` (bool per element)."""
        total = float(self.fixed)
        for macs, spaces in self.terms:
            total += macs * np.prod([keep[sp.elements].mean() for sp in spaces])
        return total


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

    def ratios(self, k: int) -> np.ndarray:
        """Per-group ratios that remove the first `k` ranked classes."""
        counts = np.bincount(self.group_of[:k], minlength=len(self.groups))
        return counts / self.prunable


def target_ratios(
    ranking: GlobalRanking,
    fixed: list[float | None],
    target: float,
    macs_of: Callable[[list[float]], float],
    total: float,
) -> list[float]:
    """Per-group ratios whose pruned model keeps at most `target` of `total` MACs: the
    shortest prefix of the global ranking that gets there, found by bisection."""

    def ratios(k: int) -> list[float]:
        r = ranking.ratios(k)
        return [float(r[i]) if f is None else f for i, f in enumerate(fixed)]

    lo, hi = 0, len(ranking)
    if macs_of(ratios(hi)) > target * total:
        best = 1 - macs_of(ratios(hi)) / total
        raise NispError(
            f"--target-macs {target}: at most {100 * best:.1f}% of the MACs can be removed "
            "(frozen groups, --exclude, --layer-ratio, --max-layer-ratio or --round-to limit the "
            "rest)"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_of(ratios(mid)) <= target * total:
            hi = mid
        else:
            lo = mid + 1
    if lo and macs_of(ratios(lo - 1)) - target * total < target * total - macs_of(ratios(lo)):
        lo -= 1  # one class fewer lands nearer the target
    return ratios(lo)
