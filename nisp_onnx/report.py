"""What a run did: the report object, its JSON form and its printed summary."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .repair import LayerRepair

REPORT_VERSION = 1


@dataclass
class GroupReport:
    """One channel group: its size, what was kept, and why it was frozen if it was."""

    id: int
    channels: int
    kept: int
    frozen: int  # channels that could not be cut
    nodes: list[str]
    reasons: list[str]


@dataclass
class Report:
    """Everything a run measured; `to_json` writes it, `summary` prints it."""

    model_input: str
    model_output: str
    ratio: float
    criterion: str
    frl: str
    samples: int
    preprocess: str | None = None
    plan: str = ""  # how much was asked where, in words
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    size_before: int = 0
    size_after: int = 0
    agreement: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    repair: str = "ls"
    frl_kept: list[int] = field(default_factory=list)  # kept channels of the FRL
    groups: list[GroupReport] = field(default_factory=list)
    layers: list[LayerRepair] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    version: int = REPORT_VERSION

    @contextmanager
    def stage(self, name: str):  # noqa: ANN201
        """Time a pipeline stage into `timings`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 4)

    @property
    def macs_reduction(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_reduction(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"] = self.macs_reduction
        d["params_reduction"] = self.params_reduction
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self, verbose: bool = False) -> str:
        """A readable account of the run, a few lines long (every group with `verbose`)."""
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        lines = [
            f"{self.model_input} -> {self.model_output}  "
            f"({self.criterion}, {self.plan or f'ratio {self.ratio}'})",
            f"  final response layer: {self.frl}; {self.samples} calibration samples",
            f"  MACs    {self.macs_before:>14,} -> {self.macs_after:>14,}  "
            f"(-{pct(self.macs_reduction)})",
            f"  params  {self.params_before:>14,} -> {self.params_after:>14,}  "
            f"(-{pct(self.params_reduction)})",
            f"  file    {self.size_before:>14,} -> {self.size_after:>14,} bytes",
        ]
        if self.agreement is not None:
            lines.append(f"  top-1 agreement with the original: {pct(self.agreement)}")
        if self.accuracy_before is not None:
            lines.append(
                f"  top-1 accuracy (calibration labels): {pct(self.accuracy_before)} -> "
                f"{pct(self.accuracy_after)}"
            )
        if self.layers:
            before = sum(la.error_before for la in self.layers) / len(self.layers)
            after = sum(la.error_after for la in self.layers) / len(self.layers)
            lines.append(
                f"  repair ({self.repair}): {len(self.layers)} layers refitted, mean relative "
                f"output error {before:.4f} -> {after:.4f}"
            )
        for la in self.layers if verbose else []:
            lines.append(
                f"    {la.node}: {la.method}, error {la.error_before:.4f} -> {la.error_after:.4f}"
            )
        pruned = [g for g in self.groups if g.kept < g.channels]
        frozen = [g for g in self.groups if g.frozen]
        lines.append(
            f"  channel groups: {len(self.groups)}, pruned {len(pruned)}, "
            f"with frozen channels {len(frozen)}"
        )
        for g in self.groups if verbose else []:
            more = ", ..." if len(g.nodes) > 4 else ""
            lines.append(
                f"    group {g.id}: kept {g.kept}/{g.channels} ({', '.join(g.nodes[:4])}{more})"
            )
        for g in frozen:
            lines.append(
                f"    group {g.id}: {g.frozen} of {g.channels} channels frozen: "
                + "; ".join(g.reasons)
            )
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)
