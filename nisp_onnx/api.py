"""The Python API: `prune()`, the whole pipeline in onnxruntime-quantization style."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import onnx

from .analyze import analyze, find_frl
from .calibrate import Calibration, collect, predict
from .channels import ChannelGraph, ChannelGroup
from .errors import NispError
from .infs import infs_scores
from .model_io import LoadedModel, export, load_model, save_model
from .propagate import class_importance, propagate
from .repair import MODES
from .repair import repair as fit_layers
from .report import GroupReport, Report
from .rewrite import rewrite
from .select import select
from .verify import check, count


def frl_seed(cg: ChannelGraph, frl: str, calib: Calibration) -> np.ndarray:
    """Inf-FS scores of the FRL features, summed per channel of the FRL's channel space."""
    space = cg.by_tensor.get(frl)
    if space is None:
        raise NispError(f"final response layer {frl!r} carries no prunable channels")
    scores = infs_scores(calib.responses)
    per_sample = calib.response_shape
    axis = space.axis - 1
    if not 0 <= axis < len(per_sample) or per_sample[axis] != space.size:
        raise NispError(
            f"final response layer {frl!r} has shape {per_sample}, "
            f"not {space.size} channels on axis {space.axis}"
        )
    scores = np.moveaxis(scores.reshape(per_sample), axis, 0)
    return scores.reshape(space.size, -1).sum(axis=1)


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
    repair: str = "ls",
    seed: int = 0,
    progress: bool = False,
) -> Report:
    """Prune `ratio` of the channels of every channel group of a model with NISP + Inf-FS.

    `calibration_data_reader` is any object whose `get_next()` returns `{input: batch}` or
    None (onnxruntime's `CalibrationDataReader` works). The model is verified (full checker,
    an onnxruntime session, top-1 agreement on the calibration inputs) before it is written
    to `model_output` (None writes nothing). `labels`, when given, align with the samples read
    (readers with a `labels` attribute provide them themselves). `repair` is "ls" (least-squares
    reconstruction of every layer that reads pruned channels), "bias" (bias compensation only)
    or "none".
    """
    if not 0 <= ratio < 1:
        raise NispError(f"--ratio must be in [0, 1), got {ratio}")
    if repair not in MODES:
        raise NispError(f"--repair must be one of {', '.join(MODES)}, got {repair!r}")
    report = Report("", str(model_output), ratio, "nisp-infs", frl or "", 0, repair=repair)
    with report.stage("load"):
        loaded = load_model(model_input)
        graph = loaded.graph()
        report.model_input = str(loaded.path or "<model>")
    with report.stage("analyze"):
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
        report.samples = calib.count
    with report.stage("rank"):
        scores = frl_seed(cg, frl, calib)
    with report.stage("propagate"):
        direct = propagate(cg, cg.by_tensor[frl], scores)
    with report.stage("select"):
        element_class = cg.classes()
        groups = cg.groups(element_class)
        removed = select(groups, element_class, class_importance(direct, element_class), ratio)
        report.groups = [_group_report(g, removed) for g in groups]
    with report.stage("rewrite"):
        keep = ~removed[element_class]
        changed = {sp.tensor for sp in cg.spaces if not keep[sp.elements].all()}
        out_keep = {
            n.name: (sp.axis, keep[sp.elements])
            for n in graph.nodes
            if n.outputs and (sp := cg.space(n.outputs[0])) is not None
        }
        graph = rewrite(cg, keep)
    with report.stage("repair"):
        report.layers = fit_layers(
            graph, loaded.proto, changed, out_keep, calib.batches, repair, seed
        )
    with report.stage("verify"):
        pruned = onnx.shape_inference.infer_shapes(export(graph, loaded.proto))
        check(pruned)
        preds = predict(pruned, calib.batches)
        report.agreement = float((preds == calib.predictions).mean())
        labels = labels if labels is not None else getattr(calibration_data_reader, "labels", None)
        if labels is not None and len(labels) == calib.count:
            report.accuracy_before = float((calib.predictions == labels).mean())
            report.accuracy_after = float((preds == labels).mean())
        shapes = {k: v.shape for k, v in calib.batches[0].items()}
        report.macs_before, report.params_before = count(loaded.proto, shapes)
        report.macs_after, report.params_after = count(pruned, shapes)
        report.size_before = loaded.file_size
    if model_output is not None:
        with report.stage("write"):
            report.size_after = save_model(pruned, model_output, loaded.external_data)
    else:
        report.size_after = pruned.ByteSize()
    return report


def _group_report(g: ChannelGroup, removed: np.ndarray) -> GroupReport:
    return GroupReport(
        id=g.id,
        channels=g.size,
        kept=int((~removed[g.classes]).sum()),
        frozen=int(g.frozen.sum()),
        nodes=g.nodes,
        reasons=g.reasons,
    )
