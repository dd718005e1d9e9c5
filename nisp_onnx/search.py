"""The default mode: the largest MACs cut whose agreement with the original on held-back inputs
stays at or above a floor, found by bisection over the fraction of MACs kept.

Every probe is a whole pruned and repaired model, measured on inputs that neither scoring nor
repair saw; the sensitivity table behind the allocation is measured once and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import NispError
from .progress import Progress, showing

FLOOR = 0.99  # default top-1 agreement to keep
LOWEST = 0.05  # the smallest fraction of MACs a probe keeps
PROBES = 6  # bisection steps: the cut is found to within (1 - LOWEST) / 2**PROBES

T = TypeVar("T")


@dataclass
class Probe:
    """One point of the curve walked: the MACs kept asked for, the cut measured, the agreement."""

    target_macs: float
    macs_reduction: float | None  # None when the target could not be reached
    agreement: float | None
    passed: bool
    kept: bool = False  # the largest passing cut: the one written


@dataclass
class Found(Generic[T]):
    """The search's result: the kept probe's candidate (None if no probe passed), the curve."""

    best: T | None
    probes: list[Probe]

    @property
    def kept(self) -> Probe | None:
        return next((p for p in self.probes if p.kept), None)


def largest_cut(
    evaluate: Callable[[float], tuple[float, float, T]], floor: float = FLOOR
) -> Found[T]:
    """Bisect the fraction of MACs kept between 1 (no cut: agreement 1) and LOWEST.

    `evaluate(target)` prunes to keep `target` of the MACs and returns (MACs reduction,
    agreement, candidate); it raises NispError when the target cannot be reached, which counts
    as a failed probe. Agreement is assumed to fall as the cut grows.
    """
    passing, failing = 1.0, LOWEST
    probes: list[Probe] = []
    best, best_probe = None, None
    with Progress(f"search for the largest cut at agreement >= {floor:g}", PROBES, "probe") as bar:
        for _ in range(PROBES):
            target = round((passing + failing) / 2, 6)
            try:
                with showing(False):  # one bar for the search, not one per repair
                    cut, agreement, candidate = evaluate(target)
            except NispError:
                probes.append(Probe(target, None, None, False))
                bar.note(f"  keep {target:.3f} of the MACs: not reachable")
                failing = target
                bar.update()
                continue
            probe = Probe(target, cut, agreement, agreement >= floor)
            probes.append(probe)
            bar.note(
                f"  keep {target:.3f} of the MACs: {100 * cut:.1f}% fewer, agreement "
                f"{100 * agreement:.1f}%: {'kept' if probe.passed else 'below the floor'}"
            )
            if probe.passed:
                passing = target
                if best_probe is None or cut > best_probe.macs_reduction:
                    best, best_probe = candidate, probe
            else:
                failing = target
            bar.update()
    if best_probe is not None:
        best_probe.kept = True
    probes.sort(key=lambda p: -p.target_macs)
    return Found(best, probes)
