"""The Python API: `prune()`, the whole pipeline in onnxruntime-quantization style."""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import partial

import numpy as np
import onnx

from .analyze import analyze, find_frl
from .budget import MacModel, Plan, allocate
from .calibrate import collect, hold_back, predict
from .channels import ChannelGroup
from .criteria import Context, get_criterion
from .errors import GateFailed, NispError
from .latency import compare
from .model_io import LoadedModel, export, load_model, save_model
from .repair import MODES
from .repair import repair as fit_layers
from .report import Gate, GroupReport, Report
from .rewrite import rewrite
from .sensitivity import damage
from .verify import check, count, data_inputs, infer_shapes, node_macs, proto_bytes, static_dims


def prune(
    model_input: str | os.PathLike | onnx.ModelProto | LoadedModel,
    model_output: str | os.PathLike | None,
    calibration_data_reader: object,
    ratio: float = 0.5,
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
    holdout: float = 0.0,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    min_macs_reduction: float | None = None,
    keep_on_fail: bool = False,
    benchmark_threads: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Report:
    """Prune `ratio` of the channels of every channel group of a model with NISP + Inf-FS.

    `calibration_data_reader` is any object whose `get_next()` returns `{input: batch}` or
    None (onnxruntime's `CalibrationDataReader` works). The model is verified (full checker,
    an onnxruntime session, top-1 agreement on the calibration inputs) before it is written
    to `model_output` (None writes nothing). `labels`, when given, align with the samples read
    (readers with a `labels` attribute provide them themselves). `criterion` is a name from
    `CRITERIA` or an object with `importance(ctx)` (see `criteria.py`). `repair` is "ls"
    (least-squares refit of every layer that reads pruned channels), "bias" (bias
    compensation only) or "none".

    How much goes where: `layer_ratio` maps node-name globs to ratios for the groups holding
    a matching node; `global_ranking` ranks all other groups' channels together (scores
    divided by their group's mean) and removes `ratio` of them, no group losing more than
    `max_layer_ratio`; `target_macs` instead chooses the ratios so that the model keeps that
    fraction of its MACs, from each group's measured sensitivity (or in the global order with
    `global_ranking`); `round_to` keeps channel counts multiples of N.
    `global_ranking=None` takes the criterion's own default (bn-scale ranks globally).

    Quality gates: `holdout` keeps that fraction of the calibration samples back from scoring
    and repair, to measure agreement and accuracy on; `min_agreement` (top-1 agreement with
    the original), `max_accuracy_drop` (needs labels) and `min_macs_reduction` are fractions.
    A failed gate raises `GateFailed` (its `report` says by how much) and writes nothing,
    unless `keep_on_fail`.

    `benchmark_threads` measures the CPU latency of the original and the pruned model side
    by side, at batch 1 and 32 with that many onnxruntime threads (`report.benchmark`).
    """
    if repair not in MODES:
        raise NispError(f"--repair must be one of {', '.join(MODES)}, got {repair!r}")
    crit = get_criterion(criterion)
    name = getattr(crit, "name", type(crit).__name__)
    crit_global = getattr(crit, "ranking", "group") == "global"
    plan = Plan(
        ratio,
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
    if not 0 <= holdout < 1:
        raise NispError(f"--holdout must be in [0, 1), got {holdout}")
    report = Report(
        "",
        "" if model_output is None else str(model_output),
        ratio,
        name,
        frl or "",
        0,
        repair=repair,
    )
    report.plan = plan.describe()
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
        calib = collect(loaded.proto, calibration_data_reader, frl, num_samples, progress)
        labels = labels if labels is not None else getattr(calibration_data_reader, "labels", None)
        if labels is not None and len(labels) != calib.count:
            labels = None
        calib, held, labels, held_labels = hold_back(calib, labels, holdout, _fixed_batch(loaded))
        report.samples, report.held_out = calib.count, held.count if held else 0
    with report.stage("score"):
        element_class = cg.classes()
        ctx = Context(cg, element_class, frl, calib, loaded.proto, seed, labels)
        importance = np.asarray(crit.importance(ctx), dtype=np.float64)
    with report.stage("select"):
        groups = cg.groups(element_class)
        shapes = {k: v.shape for k, v in calib.batches[0].items()}
        base = node_macs(loaded.proto, shapes)
        sensitivity = partial(
            damage, cg, loaded.proto, calib.batches, groups, element_class, importance
        )
        removed = allocate(
            groups,
            element_class,
            importance,
            plan,
            MacModel(cg, base),
            lambda measure: sensitivity(measure, plan.min_keep, plan.round_to, repair != "none"),
        )
        report.groups = [_group_report(g, removed) for g in groups]
    with report.stage("rewrite"):
        keep = ~removed[element_class]
        changed = {sp.tensor for sp in cg.spaces if not keep[sp.elements].all()}
        out_keep = {
            n.name: (sp.axis, keep[sp.elements])
            for n in graph.nodes
            if n.outputs and (sp := cg.space(n.outputs[0])) is not None
        }
        if (frl_space := cg.by_tensor.get(frl)) is not None:
            report.frl_kept = np.flatnonzero(keep[frl_space.elements]).tolist()
        graph = rewrite(cg, keep)
    with report.stage("repair"):
        report.layers = fit_layers(
            graph, loaded.proto, changed, out_keep, calib.batches, repair, seed
        )
    with report.stage("verify"):
        pruned = infer_shapes(export(graph, loaded.proto))
        check(pruned)
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
