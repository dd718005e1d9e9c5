"""What a run did: the report object, its JSON form and its printed summary."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .repair import LayerRepair
from .resources import Cost, measure

REPORT_VERSION = 3  # the schema is nisp_onnx/report.schema.json


@dataclass
class Gate:
    """A quality gate: the measured value against the threshold asked for."""

    name: str  # the flag, e.g. "--min-agreement"
    threshold: float
    value: float | None  # None when it could not be measured (e.g. no labels)
    passed: bool


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
    ratio: float | None  # --ratio, None when not given
    criterion: str
    frl: str
    samples: int
    preprocess: str | None = None
    mode: str = "ratio"  # ratio | target-macs | auto (the largest cut at --min-agreement)
    target_macs: float | None = None
    min_agreement: float | None = None  # the floor of the default mode, or the gate
    plan: str = ""  # how much was asked where, in words
    search: list[dict] = field(default_factory=list)  # default mode: the probes, largest kept
    warnings: list[str] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    size_before: int = 0
    size_after: int = 0
    agreement: float | None = None
    held_out: int = 0  # calibration samples kept back from scoring and repair, for evaluation
    held_back: list[int] = field(default_factory=list)  # their positions in the order read
    sensitivity_samples: int = 0  # of `samples`, those each group's damage was measured on
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    repair: str = "ls"
    frl_kept: list[int] = field(default_factory=list)  # kept channels of the FRL
    groups: list[GroupReport] = field(default_factory=list)
    layers: list[LayerRepair] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    written: bool = False  # whether the output model was written
    finetune: dict | None = None  # with --finetune: steps, time, loss and agreement
    speed_check: dict | None = None  # default mode: batch-1 latency of the kept cut
    benchmark: dict | None = None  # with --benchmark: latency of both models
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    memory: dict[str, float] = field(default_factory=dict)  # peak resident MiB per stage
    version: int = REPORT_VERSION

    @contextmanager
    def stage(self, name: str):  # noqa: ANN201
        """Time a pipeline stage into `timings` and its peak resident memory into `memory`."""
        with measure() as cost:
            yield
        self.record(name, cost)

    def record(self, stage: str, cost: Cost) -> None:
        self.timings[stage], self.memory[stage] = cost.seconds, cost.peak_mib

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def evaluated_on(self) -> str:
        """What agreement and accuracy were measured on, in words."""
        if self.held_out:
            chose = ["the cut"] if self.mode == "auto" else []
            chose += ["the fine-tuning step"] if self.finetune else []
            chosen = f" (which chose {' and '.join(chose)})" if chose else ""
            return f"{self.held_out} held-back inputs{chosen}"
        return f"{self.samples} calibration inputs (seen by repair)"

    @property
    def inputs_used(self) -> str:
        """How many calibration inputs went where, in words."""
        total = self.samples + self.held_out
        uses = f"{self.samples} for scoring and repair"
        if self.sensitivity_samples:
            uses += f" (the first {self.sensitivity_samples} also for sensitivity)"
        if self.held_out:
            uses += f", {self.held_out} held back for measuring"
        return f"{total} calibration inputs: {uses}"

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
        lines = [f"warning: {w}" for w in self.warnings]
        lines += [
            f"{self.model_input} -> {self.model_output}  ({self.criterion}, {self.plan})",
            f"  final response layer: {self.frl}; {self.inputs_used}",
            *(f"  {line}" for line in self._curve()),
            f"  MACs    {self.macs_before:>14,} -> {self.macs_after:>14,}  "
            f"({signed(-self.macs_reduction)})",
            f"  params  {self.params_before:>14,} -> {self.params_after:>14,}  "
            f"({signed(-self.params_reduction)})",
            f"  file    {self.size_before:>14,} -> {self.size_after:>14,} bytes",
        ]
        on = self.evaluated_on
        if self.agreement is not None:
            lines.append(f"  top-1 agreement with the original on {on}: {percent(self.agreement)}")
        if self.accuracy_before is not None:
            lines.append(
                f"  top-1 accuracy (labels) on {on}: {percent(self.accuracy_before)} -> "
                f"{percent(self.accuracy_after)}"
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
        if self.finetune:
            lines.append(f"  {self.finetune_line}")
        pruned = [g for g in self.groups if g.kept < g.channels]
        frozen = [g for g in self.groups if g.frozen]
        lines.append(
            f"  channel groups: {len(self.groups)}, pruned {len(pruned)}, "
            f"with frozen channels {len(frozen)}"
        )
        for g in self.groups if verbose else []:
            lines.append(f"    group {g.id}: kept {g.kept}/{g.channels}: {', '.join(g.nodes)}")
        for g in frozen:
            lines.append(
                f"    group {g.id}: {g.frozen} of {g.channels} channels frozen: "
                + "; ".join(g.reasons)
            )
        if (b := self.speed_check) is not None:
            lines.append(
                f"  speed check (batch 1, 1 thread): {b['original_ms']:.2f} ms -> "
                f"{b['pruned_ms']:.2f} ms ({signed(-b['reduction'])})"
            )
        for b in (self.benchmark or {}).get("batches", []):
            lines.append(
                f"  latency at batch {b['batch_size']}, {b['threads']} thread(s): "
                f"{b['original_ms']:.2f} ms -> {b['pruned_ms']:.2f} ms ({signed(-b['reduction'])})"
            )
        for g in self.gates:
            lines.append(f"  gate {g.name} {g.threshold:g}: {_gate_line(g)}")
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        if self.memory:
            lines.append(f"  peak memory: {max(self.memory.values()):,.0f} MiB")
        return "\n".join(lines)

    @property
    def finetune_line(self) -> str:
        """The fine-tuning in one line."""
        return finetune_line(self.finetune or {})

    def _curve(self) -> list[str]:
        """The default mode's probes, one line each, the kept one marked."""
        if not self.search:
            return []
        lines = ["search (MACs kept asked -> cut, agreement on the held-back inputs):"]
        for p in self.search:
            if p["agreement"] is None:
                lines.append(f"  {p['target_macs']:.3f}: not reachable")
                continue
            mark = "  <- kept" if p["kept"] else "" if p["passed"] else "  (below the floor)"
            lines.append(
                f"  {p['target_macs']:.3f}: {signed(-p['macs_reduction'])} MACs, "
                f"{percent(p['agreement'])}{mark}"
            )
        return lines

    def markdown(self) -> str:
        """A Markdown summary for CI logs and pull-request comments."""
        pct = lambda x: "n/a" if x is None else signed(x)  # noqa: E731
        rows = [
            ("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", pct(-self.macs_reduction)),
            (
                "parameters",
                f"{self.params_before:,}",
                f"{self.params_after:,}",
                pct(-self.params_reduction),
            ),
            ("file bytes", f"{self.size_before:,}", f"{self.size_after:,}", ""),
        ]
        if self.accuracy_before is not None:
            rows.append(
                ("top-1 accuracy", percent(self.accuracy_before), percent(self.accuracy_after), "")
            )
        rows += [
            (
                f"latency, batch {b['batch_size']}, {b['threads']} thread(s)",
                f"{b['original_ms']:.2f} ms",
                f"{b['pruned_ms']:.2f} ms",
                pct(-b["reduction"]),
            )
            for b in (self.benchmark or {}).get("batches", [])
        ]
        if not self.gates:
            status = "No quality gates were set"
        else:
            status = f"Quality gates {'passed' if self.passed else '**failed**'}"
        lines = [f"> **Warning:** {w}" for w in self.warnings]
        lines += [
            *([""] if self.warnings else []),
            f"### nisp-onnx: `{self.model_input}` -> `{self.model_output}`",
            "",
            f"{self.criterion}, {self.plan}, repair {self.repair}; {self.inputs_used}. "
            f"{status}; model {'written' if self.written else '**not written**'}.",
            "",
            "| | before | after | change |",
            "|---|---:|---:|---:|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        ]
        if self.agreement is not None:
            lines += [
                "",
                f"Top-1 agreement with the original on {self.evaluated_on}: "
                f"{percent(self.agreement)}.",
            ]
        if self.search:
            lines += ["", "```", *self._curve(), "```"]
        if self.finetune:
            lines += ["", self.finetune_line[0].upper() + self.finetune_line[1:] + "."]
        if self.gates:
            lines += ["", "| gate | threshold | measured | result |", "|---|---:|---:|---|"]
            lines += [
                f"| `{g.name}` | {g.threshold:g} | "
                f"{'n/a' if g.value is None else f'{g.value:.4f}'} | "
                f"{'pass' if g.passed else '**FAIL**'} |"
                for g in self.gates
            ]
        frozen = [g for g in self.groups if g.frozen]
        if frozen:
            lines += ["", f"{len(frozen)} channel groups with frozen channels:", ""]
            lines += [
                f"- group {g.id}: {g.frozen}/{g.channels}: {'; '.join(g.reasons)}" for g in frozen
            ]
        return "\n".join(lines) + "\n"


def finetune_line(f: dict) -> str:
    """A report's fine-tuning section (`Trained.to_dict()`) in one line."""
    line = (
        f"fine-tune: {f['steps']} steps in {f['seconds']:.0f}s ({f['step_ms']:.0f} ms each), "
        f"{f['parameters']:,} parameters, distillation loss {f['loss_first']:.4f} -> "
        f"{f['loss_last']:.4f}"
    )
    if f["agreement_before"] is not None:
        stop = ", stopped early" if f["stopped_early"] else ""
        line += (
            f", held-back agreement {percent(f['agreement_before'])} -> "
            f"{percent(f['agreement_after'])} (step {f['kept_step']} kept{stop})"
        )
    return line


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def signed(x: float) -> str:
    """A change as a percentage with one sign: +52.4%, -30.0%."""
    return f"{100 * x:+.1f}%"


def _gate_line(g: Gate) -> str:
    if g.value is None:
        return "FAILED: not measurable (no labels)"
    return f"{'passed' if g.passed else 'FAILED'}, measured {g.value:.4f}"
