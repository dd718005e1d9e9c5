"""The Python API: `prune()`, the whole pipeline in onnxruntime-quantization style."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .analyze import analyze, find_frl
from .budget import MacModel, Plan, allocate
from .calibrate import Calibration, collect, hold_back, on_provider, predict
from .channels import ChannelGraph, ChannelGroup
from .criteria import Context, get_criterion
from .distillation import FineTune, Trained
from .errors import GateFailed, NispError
from .latency import compare
from .model_io import LoadedModel, export, load_model, save_model
from .progress import showing_progress
from .repair import MODES
from .repair import repair as fit_layers
from .report import Gate, GroupReport, Report, percent, signed
from .rewrite import rewrite
from .search import FLOOR, largest_cut
from .sensitivity import damage, measured_batches
from .verify import check, count, data_inputs, infer_shapes, node_macs, proto_bytes, static_dims

DEFAULT_HOLDOUT = 0.2  # fraction of the calibration samples held back to measure on
MIN_HELD_BACK = 10  # fewer held-back samples than this measure too little to be worth it
LOW_AGREEMENT = 0.9  # below this top-1 agreement, a warning heads the summary


@showing_progress
@on_provider
def prune(
    model_input: str | os.PathLike | onnx.ModelProto | LoadedModel,
    model_output: str | os.PathLike | None,
    calibration_data_reader: object,
    ratio: float | None = None,
    *,
    frl: str | None = None,
    exclude: Iterable[str] = (),
    num_samples: int | None = None,
    labels: np.ndarray | None = None,
    criterion: str | object = "nisp-infs",
    repair: str = "ls",
    layer_ratio: dict[str, float] | None = None,
    global_ranking: bool | None = None,
    max_layer_ratio: float = 1.0,
    target_macs: float | None = None,
    round_to: int = 1,
    holdout: float | None = None,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    min_macs_reduction: float | None = None,
    speed_check: bool = True,
    keep_on_fail: bool = False,
    overwrite: bool = False,
    benchmark_threads: int | None = None,
    finetune: FineTune | int | str | None = None,
    provider: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Report:
    """Prune a model with NISP + Inf-FS and write it to `model_output` (None writes nothing).

    `calibration_data_reader` is any object whose `get_next()` returns `{input: batch}` or
    None (onnxruntime's `CalibrationDataReader` works). `labels`, when given, align with the
    samples read (readers with a `labels` attribute provide them themselves). `criterion` is
    a name from `CRITERIA` or an object with `importance(ctx)` (see `criteria.py`). `repair`
    is "ls" (least-squares refit of every layer that reads pruned channels), "bias" (bias
    compensation only) or "none".

    How much goes where. By default (no `ratio`, no `target_macs`) the largest MACs cut is
    searched for whose top-1 agreement with the original on held-back inputs stays at or
    above `min_agreement` (default 0.99) and that runs no slower than the original at batch 1
    on one CPU thread (`report.speed_check`; else the model is written unpruned, unless
    `speed_check=False`). `ratio` removes that fraction of every channel
    group; `target_macs` keeps that fraction of the MACs, with ratios per group from each
    group's measured sensitivity (or in the global order with `global_ranking`, which with
    `ratio` ranks all groups' channels together, scores divided by their group's mean).
    `layer_ratio` maps node-name globs to ratios for the groups holding a matching node; no
    group loses more than `max_layer_ratio`; `round_to` keeps channel counts multiples of N.
    `global_ranking=None` takes the criterion's own default (bn-scale ranks globally).

    Measuring and gates: `holdout` keeps that fraction of the calibration samples back from
    scoring and repair to measure agreement and accuracy on (default 0.2 when that holds
    back at least 10 samples, else 0: measured on the samples repair saw, with a warning);
    `min_agreement` (top-1 agreement with the original), `max_accuracy_drop` (needs labels)
    and `min_macs_reduction` are fractions. A failed gate raises `GateFailed` (its `report`
    says by how much) and writes nothing, unless `keep_on_fail`. An existing `model_output`
    is replaced only with `overwrite`.

    `finetune` (a step count, a wall time such as "10m", or a `FineTune`) trains the pruned
    model after repair to mimic the original on the calibration inputs (label-free
    distillation in onnxruntime), the step kept chosen on the held-back inputs, never worse
    there than the repaired start (`report.finetune`). `provider` runs every onnxruntime
    session but the latency ones on that provider ("cuda"; default the CPU).

    `benchmark_threads` measures the CPU latency of the original and the pruned model side
    by side, at batch 1 and 32 with that many onnxruntime threads (`report.benchmark`).
    `progress` shows each long stage (a bar on a terminal, a line per stage elsewhere).
    """
    if repair not in MODES:
        raise NispError(f"--repair must be one of {', '.join(MODES)}, got {repair!r}")
    if model_output is not None and Path(model_output).exists() and not overwrite:
        raise NispError(f"{model_output}: already exists; pass overwrite=True to replace it")
    tuning = FineTune.of(finetune)
    crit = get_criterion(criterion)
    name = getattr(crit, "name", type(crit).__name__)
    crit_global = getattr(crit, "ranking", "group") == "global"
    auto = ratio is None and target_macs is None
    if auto and min_agreement is None:
        min_agreement = FLOOR
    plan = Plan(
        0.0 if ratio is None else ratio,
        dict(layer_ratio or {}),
        crit_global if global_ranking is None else global_ranking,
        not crit_global,
        max_layer_ratio,
        target_macs,
        round_to,
        getattr(crit, "min_keep", 1),
    )
    plan.check()
    gates = _gates(min_agreement, max_accuracy_drop, min_macs_reduction)
    if holdout is not None and not 0 <= holdout < 1:
        raise NispError(f"--holdout must be in [0, 1), got {holdout}")
    report = Report(
        "",
        "" if model_output is None else str(model_output),
        ratio,
        name,
        frl or "",
        0,
        repair=repair,
        mode="auto" if auto else "target-macs" if target_macs is not None else "ratio",
        target_macs=target_macs,
        min_agreement=min_agreement,
    )
    report.plan = plan.describe(f"largest cut at agreement >= {min_agreement:g}" if auto else None)
    loaded = load_model(model_input)
    report.record("load", loaded.cost)
    report.model_input = str(loaded.path or "<model>")
    with report.stage("analyze"):
        graph = loaded.graph()
        opset = next(
            (o.version for o in loaded.proto.opset_import if o.domain in ("", "ai.onnx")), 13
        )
        cg = analyze(graph, opset, exclude)
        if frl is None:
            frl = find_frl(graph)[0]
        elif frl not in graph.tensors():
            raise NispError(f"--frl {frl!r}: the model has no tensor of that name")
        report.frl = frl
    with report.stage("calibrate"):
        calib = collect(loaded.proto, calibration_data_reader, frl, num_samples)
        labels = labels if labels is not None else getattr(calibration_data_reader, "labels", None)
        if labels is not None and len(labels) != calib.count:
            labels = None
        fixed = _fixed_batch(loaded)
        fraction = _holdout(holdout, calib.count, fixed, auto)
        calib, held, labels, held_labels = hold_back(calib, labels, fraction, fixed)
        report.samples, report.held_out = calib.count, held.count if held else 0
        report.held_back = [] if held is None else held.positions.tolist()
    with report.stage("score"):
        element_class = cg.classes()
        ctx = Context(cg, element_class, frl, calib, loaded.proto, seed, labels)
        importance = np.asarray(crit.importance(ctx), dtype=np.float64)
    groups = cg.groups(element_class)
    shapes = {k: v.shape for k, v in calib.batches[0].items()}
    macs = MacModel(cg, node_macs(loaded.proto, shapes))
    table: list[np.ndarray] = []  # the damage table, measured once when first needed

    def sensitivity(free: list[bool]) -> np.ndarray:
        if not table:
            args = (cg, loaded.proto, calib.batches, groups, element_class, importance, free)
            with report.stage("sensitivity"):  # within "select" or "search"
                table.append(damage(*args, plan.min_keep, plan.round_to, repair != "none"))
            used = measured_batches(calib.batches)
            report.sensitivity_samples = sum(len(next(iter(b.values()))) for b in used)
        return table[0]

    def choose(p: Plan) -> np.ndarray:
        return allocate(groups, element_class, importance, p, macs, sensitivity)

    def cut(removed: np.ndarray, fresh: bool) -> _Cut:
        space = analyze(loaded.graph(), opset, exclude) if fresh else cg
        return _cut(space, loaded.proto, ~removed[element_class], frl, calib, repair, seed)

    if auto:
        with report.stage("search"):

            def probe(target: float) -> tuple[float, float, tuple[np.ndarray, _Cut]]:
                removed = choose(replace(plan, target_macs=target))
                candidate = cut(removed, fresh=True)
                agreement = float(
                    (predict(candidate.proto, held.batches) == held.predictions).mean()
                )
                return (
                    1 - macs.macs(~removed[element_class]) / macs.total,
                    agreement,
                    (removed, candidate),
                )

            found = largest_cut(probe, min_agreement)
            report.search = [asdict(p) for p in found.probes]
            if found.best is None:
                report.warnings.append(
                    f"no cut tried kept top-1 agreement >= {percent(min_agreement)} on the "
                    "held-back inputs: the model is written unpruned"
                )
                removed = np.zeros(len(importance), bool)
                built = cut(removed, fresh=False)
            else:
                removed, built = found.best
                report.plan += f": kept {found.kept.target_macs:g} of the MACs"
        if speed_check and removed.any():  # never a cut slower than the original
            with report.stage("speed check"):
                (timed,) = compare(loaded.path or loaded.proto, built.proto, shapes, 1, (1,), 1.0)
                report.speed_check = timed.to_dict()
            if timed.pruned_ms > timed.original_ms:
                report.warnings.append(
                    f"the largest cut at {percent(min_agreement)} agreement runs slower than the "
                    f"original at batch {timed.batch_size} ({timed.original_ms:.2f} ms -> "
                    f"{timed.pruned_ms:.2f} ms): the model is written unpruned; --ratio or "
                    "--target-macs cut anyway"
                )
                removed = np.zeros(len(importance), bool)
                built = cut(removed, fresh=False)
    else:
        with report.stage("select"):
            removed = choose(plan)
        with report.stage("rewrite and repair"):
            built = cut(removed, fresh=False)
    report.groups = [_group_report(g, removed) for g in groups]
    report.layers, report.frl_kept = built.layers, built.frl_kept
    pruned = built.proto
    if tuning is not None and not removed.any():
        report.warnings.append("nothing was removed, so nothing was fine-tuned")
    elif tuning is not None:
        with report.stage("fine-tune"):
            produced = {o for node in pruned.graph.node for o in node.output}
            trained = tuning.run(
                pruned,
                loaded.proto,
                calib.batches,
                held.batches if held else None,
                seed,
                frl if frl in produced else None,
                built.frl_kept or None,
            )
            pruned = trained.model
            check(pruned)
            report.finetune = trained.to_dict()
    with report.stage("verify"):
        evaluation, eval_labels = (held, held_labels) if held else (calib, labels)
        preds = predict(pruned, evaluation.batches)
        report.agreement = float((preds == evaluation.predictions).mean())
        if eval_labels is not None:
            report.accuracy_before = float((evaluation.predictions == eval_labels).mean())
            report.accuracy_after = float((preds == eval_labels).mean())
        report.macs_before, report.params_before = count(loaded.proto, shapes)
        report.macs_after, report.params_after = count(pruned, shapes)
        report.size_before = loaded.file_size
        report.gates = [gate(report) for gate in gates]
    if benchmark_threads is not None:
        with report.stage("benchmark"):
            timed = compare(loaded.path or loaded.proto, pruned, shapes, benchmark_threads)
            report.benchmark = {
                "threads": benchmark_threads,
                "batches": [t.to_dict() for t in timed],
            }
    report.warnings += _warnings(report, holdout)
    report.size_after = proto_bytes(pruned)
    if model_output is not None and (report.passed or keep_on_fail):
        with report.stage("write"):
            report.size_after = save_model(pruned, model_output, loaded.external_data)
            report.written = True
    if not report.passed:
        failed = [g for g in report.gates if not g.passed]
        raise GateFailed(
            "quality gate failed: "
            + "; ".join(f"{g.name} {g.threshold:g}, {_measured(g)}" for g in failed)
            + (
                "; the model was written anyway (--keep-on-fail)"
                if report.written
                else "; nothing written (--keep-on-fail writes it anyway)"
            ),
            report,
        )
    return report


@showing_progress
@on_provider
def finetune(
    student: str | os.PathLike | onnx.ModelProto | LoadedModel,
    teacher: str | os.PathLike | onnx.ModelProto | LoadedModel,
    calibration_data_reader: object,
    model_output: str | os.PathLike | None,
    budget: FineTune | int | str = 2000,
    *,
    num_samples: int | None = None,
    holdout: float | None = None,
    overwrite: bool = False,
    provider: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Trained:
    """Distil `student` from `teacher`, two models with the same input and output names (one
    pruned by another tool, or by nisp-onnx earlier), on the inputs the reader gives, and
    write it to `model_output` (None writes nothing). `budget` is a step count, a wall time
    ("10m") or a `FineTune`; `holdout` (default 0.2 when that is at least 10 inputs) keeps
    inputs back to choose the step kept on, never worse there than the start."""
    tuning = FineTune.of(budget)
    if model_output is not None and Path(model_output).exists() and not overwrite:
        raise NispError(f"{model_output}: already exists; pass overwrite=True to replace it")
    s, t = load_model(student), load_model(teacher)
    for kind, names in (
        ("inputs", lambda m: [i.name for i in data_inputs(m.proto.graph)]),
        ("outputs", lambda m: [o.name for o in m.proto.graph.output]),
    ):
        if names(s) != names(t):
            raise NispError(
                f"{s.path or 'the student'} and {t.path or 'the teacher'}: their {kind} differ "
                f"({', '.join(names(s))} against {', '.join(names(t))}); fine-tuning distils "
                "between models with the same inputs and outputs"
            )
    calib = collect(t.proto, calibration_data_reader, t.proto.graph.output[0].name, num_samples)
    fixed = _fixed_batch(t)
    calib, held, _, _ = hold_back(calib, None, _holdout(holdout, calib.count, fixed, False), fixed)
    trained = tuning.run(s.proto, t.proto, calib.batches, held.batches if held else None, seed)
    check(trained.model)
    if model_output is not None:
        save_model(trained.model, model_output, s.external_data)
    return trained


@dataclass
class _Cut:
    """A pruned and repaired model."""

    proto: onnx.ModelProto
    layers: list
    frl_kept: list[int]


def _cut(
    cg: ChannelGraph,
    original: onnx.ModelProto,
    keep: np.ndarray,
    frl: str,
    calib: Calibration,
    repair: str,
    seed: int,
) -> _Cut:
    """Rewrite `cg`'s graph to the kept elements (in place), repair it, check the result."""
    changed = {sp.tensor for sp in cg.spaces if not keep[sp.elements].all()}
    out_keep = {
        n.name: (sp.axis, keep[sp.elements])
        for n in cg.graph.nodes
        if n.outputs and (sp := cg.space(n.outputs[0])) is not None
    }
    frl_space = cg.by_tensor.get(frl)
    frl_kept = [] if frl_space is None else np.flatnonzero(keep[frl_space.elements]).tolist()
    graph = rewrite(cg, keep)
    layers = fit_layers(graph, original, changed, out_keep, calib.batches, repair, seed)
    pruned = infer_shapes(export(graph, original))
    check(pruned)
    return _Cut(pruned, layers, frl_kept)


def _holdout(holdout: float | None, n: int, fixed_batch: int | None, auto: bool) -> float:
    """The fraction of samples to hold back: as given, else DEFAULT_HOLDOUT when that gives
    at least MIN_HELD_BACK samples (0 otherwise; the default mode then cannot run)."""
    if holdout is not None:
        if auto and holdout == 0:
            raise NispError(
                "--holdout 0: the default mode chooses the cut on held-back inputs; "
                "give --holdout > 0, or --ratio or --target-macs"
            )
        return holdout
    step = fixed_batch or 1
    held = round(n * DEFAULT_HOLDOUT / step) * step
    if MIN_HELD_BACK <= held < n:
        return DEFAULT_HOLDOUT
    if auto:
        raise NispError(
            f"{n} calibration inputs are too few for the default mode, which holds back "
            f"{DEFAULT_HOLDOUT:.0%} of them (at least {MIN_HELD_BACK}) to choose the cut on; "
            "give more inputs, or choose the cut with --ratio or --target-macs"
        )
    return 0.0


def _warnings(r: Report, holdout: float | None) -> list[str]:
    """What a user must not miss, for the top of the summary."""
    out = []
    if not r.held_out:
        why = "--holdout 0" if holdout == 0 else f"too few to hold back {MIN_HELD_BACK}"
        out.append(
            f"agreement and accuracy are measured on the {r.samples} calibration inputs that "
            f"repair fitted ({why}), not on unseen ones"
        )
    if r.agreement is not None and r.agreement < LOW_AGREEMENT:
        out.append(
            f"the pruned model agrees with the original on only {percent(r.agreement)} of the "
            f"{r.evaluated_on}"
        )
    for b in (r.benchmark or {}).get("batches", []):
        if b["pruned_ms"] > b["original_ms"]:
            out.append(
                f"the pruned model is slower at batch {b['batch_size']}: {b['original_ms']:.2f} ms"
                f" -> {b['pruned_ms']:.2f} ms ({signed(-b['reduction'])})"
            )
    return out


def _fixed_batch(loaded: LoadedModel) -> int | None:
    """The batch size the model's first input fixes, or None when it is dynamic."""
    inputs = data_inputs(loaded.proto.graph)
    dims = static_dims(inputs[0]) if inputs else []
    return (dims[0] or None) if dims else None


def _gates(
    min_agreement: float | None, max_accuracy_drop: float | None, min_macs: float | None
) -> list:
    """The requested gates as functions of the finished report."""
    gates = []
    for flag, value in (
        ("--min-agreement", min_agreement),
        ("--max-accuracy-drop", max_accuracy_drop),
        ("--min-macs-reduction", min_macs),
    ):
        if value is not None and not 0 <= value <= 1:
            raise NispError(f"{flag} is a fraction in [0, 1], got {value}")
    if min_agreement is not None:
        gates.append(
            lambda r: Gate(
                "--min-agreement", min_agreement, r.agreement, r.agreement >= min_agreement
            )
        )
    if max_accuracy_drop is not None:

        def accuracy(r: Report) -> Gate:
            if r.accuracy_before is None:
                return Gate("--max-accuracy-drop", max_accuracy_drop, None, False)
            drop = r.accuracy_before - r.accuracy_after
            return Gate("--max-accuracy-drop", max_accuracy_drop, drop, drop <= max_accuracy_drop)

        gates.append(accuracy)
    if min_macs is not None:
        gates.append(
            lambda r: Gate(
                "--min-macs-reduction", min_macs, r.macs_reduction, r.macs_reduction >= min_macs
            )
        )
    return gates


def _measured(g: Gate) -> str:
    return "not measurable without labels" if g.value is None else f"measured {g.value:.4f}"


def _group_report(g: ChannelGroup, removed: np.ndarray) -> GroupReport:
    return GroupReport(
        id=g.id,
        channels=g.size,
        kept=int((~removed[g.classes]).sum()),
        frozen=int(g.frozen.sum()),
        nodes=g.nodes,
        reasons=g.reasons,
    )
