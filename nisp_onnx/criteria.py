"""Importance criteria: how much each channel class matters (higher is kept first).

A criterion is any object with a `name` and `importance(ctx) -> ndarray` (one value per
channel class); pass one to `prune(criterion=...)` to rank channels your own way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import Calibration, session
from .channels import ChannelGraph, Space
from .errors import NispError
from .infs import infs_scores, supervised_infs_scores
from .propagate import class_importance, propagate
from .rules import rule_of
from .taylor import Taylor


@dataclass
class Context:
    """What a criterion may look at."""

    cg: ChannelGraph
    element_class: np.ndarray
    frl: str
    calib: Calibration
    model: onnx.ModelProto  # the original model, for extra passes over `calib.batches`
    seed: int = 0
    labels: np.ndarray | None = None  # one class per calibration sample, when known

    @property
    def frl_space(self) -> Space:
        space = self.cg.by_tensor.get(self.frl)
        if space is None:
            raise NispError(f"final response layer {self.frl!r} carries no prunable channels")
        return space

    def per_class(self, per_element: np.ndarray) -> np.ndarray:
        return class_importance(per_element, self.element_class)


MAX_FEATURES = 4096  # Inf-FS solves a D x D system: wider responses are pooled per channel


def _by_channel(ctx: Context, per_feature: np.ndarray) -> np.ndarray:
    """[..., D] values over the FRL's features as [..., channels, positions]."""
    space, shape = ctx.frl_space, ctx.calib.response_shape
    axis = space.axis - 1
    if not 0 <= axis < len(shape) or shape[axis] != space.size:
        raise NispError(
            f"final response layer {ctx.frl!r} has shape {shape}, "
            f"not {space.size} channels on axis {space.axis}"
        )
    lead = per_feature.shape[:-1]
    per = np.moveaxis(per_feature.reshape(*lead, *shape), len(lead) + axis, len(lead))
    return per.reshape(*lead, space.size, -1)


def frl_channel_scores(ctx: Context, feature_scores: np.ndarray) -> np.ndarray:
    """Scores of the FRL's features (flattened per sample) summed per channel of its space."""
    return _by_channel(ctx, np.asarray(feature_scores)).sum(axis=-1)


def frl_inputs(ctx: Context) -> tuple[np.ndarray, bool]:
    """The responses to rank (N x D), and whether they were pooled to one per channel:
    responses wider than MAX_FEATURES (a spatial FRL) are averaged over positions."""
    x = ctx.calib.responses
    if x.shape[1] <= MAX_FEATURES:
        return x, False
    return _by_channel(ctx, x).mean(axis=-1), True


class NispInfs:
    """NISP (Yu et al. 2018): Inf-FS scores of the final responses, propagated back."""

    name = "nisp-infs"

    def frl_scores(self, ctx: Context) -> np.ndarray:
        x, pooled = frl_inputs(ctx)
        scores = infs_scores(x)
        return scores if pooled else frl_channel_scores(ctx, scores)

    def importance(self, ctx: Context) -> np.ndarray:
        return ctx.per_class(propagate(ctx.cg, ctx.frl_space, self.frl_scores(ctx)))


class NispInfsSupervised(NispInfs):
    """NISP seeded with supervised Inf-FS (Fisher score and mutual information with the
    calibration labels, Roffo et al. 2020) instead of the unsupervised ranking."""

    name = "nisp-infs-supervised"

    def frl_scores(self, ctx: Context) -> np.ndarray:
        if ctx.labels is None:
            raise NispError(
                "nisp-infs-supervised needs labels: put the calibration images in one "
                "subfolder per class, or use nisp-infs"
            )
        x, pooled = frl_inputs(ctx)
        scores = supervised_infs_scores(x, ctx.labels)
        return scores if pooled else frl_channel_scores(ctx, scores)


class NispMag(NispInfs):
    """NISP-Mag: each FRL neuron scored by the magnitude of the classifier weights reading it."""

    name = "nisp-mag"

    def frl_scores(self, ctx: Context) -> np.ndarray:
        cg, space = ctx.cg, ctx.frl_space
        for node, _, sp in cg.mixing:
            out = cg.space(node.outputs[0])
            if sp is space and out is not None:
                total = np.zeros(cg.n_elements)
                total[out.elements] = 1.0
                rule_of(node).backprop(node, cg, total)
                return total[space.elements]
        raise NispError(f"nisp-mag needs a classifier layer reading {ctx.frl!r}; try nisp-infs")


class FilterL1:
    """Li et al. 2017: the L1 norm of the filter that produces each channel."""

    name = "l1"

    def importance(self, ctx: Context) -> np.ndarray:
        cg = ctx.cg
        nodes = {n.name: n for n in cg.graph.nodes}
        direct = np.zeros(cg.n_elements)
        for sp in cg.spaces:
            node = nodes.get(sp.producer)
            lin = rule_of(node).linear(node) if node is not None else None
            if lin is None or lin.axis(len(node.outputs[0].shape or [0, 0])) != sp.axis:
                continue
            norms = np.abs(lin.params()[:, :-1]).sum(axis=1).reshape(-1)
            if len(norms) == sp.size:
                direct[sp.elements] += norms
        return ctx.per_class(direct)


class BnScale:
    """Network slimming / receding importances: the BatchNorm scale |gamma / sqrt(var + eps)|.

    Scores are comparable across layers, so by default one global threshold cuts them
    (`ranking = "global"`), and every tensor keeps at least 3 channels. A class takes the
    largest scale of its channels; channels that no BatchNorm scales are never cut.
    """

    name = "bn-scale"
    ranking = "global"
    min_keep = 3

    def importance(self, ctx: Context) -> np.ndarray:
        cg = ctx.cg
        direct = np.full(cg.n_elements, -np.inf)
        for node in cg.graph.nodes:
            if node.op != "BatchNormalization" or (sp := cg.space(node.outputs[0])) is None:
                continue
            gamma, _, _, var = (getattr(t, "values", None) for t in node.inputs[1:5])
            if gamma is None or var is None:
                continue
            eps = float(node.attrs.get("epsilon", 1e-5))
            scale = np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
            direct[sp.elements] = np.maximum(direct[sp.elements], scale)
        if not np.isfinite(direct).any():
            raise NispError(
                "bn-scale needs BatchNormalization nodes, and this model has none (folded "
                "into the convolutions by the exporter?); use nisp-infs or l1"
            )
        per_class = np.full(int(ctx.element_class.max()) + 1, -np.inf)
        np.maximum.at(per_class, ctx.element_class, direct)
        return np.where(np.isfinite(per_class), per_class, np.inf)


class Random:
    """Uniformly random importances (seeded): the baseline every criterion must beat."""

    name = "random"

    def importance(self, ctx: Context) -> np.ndarray:
        n = int(ctx.element_class.max()) + 1
        return np.random.default_rng(ctx.seed).random(n)


class LayerByLayer:
    """The NISP paper's LbL baseline: Inf-FS on each layer's own responses (per-channel means
    over positions), each layer ranked on its own, scores normalised per layer."""

    name = "lbl"

    def importance(self, ctx: Context) -> np.ndarray:
        cg = ctx.cg
        spaces = [sp for sp in cg.spaces if sp.producer and sp.size > 1]
        names = [sp.tensor for sp in spaces]
        sess = session(ctx.model, tuple(names))
        means: list[list[np.ndarray]] = [[] for _ in spaces]
        for batch in ctx.calib.batches:
            for i, (sp, y) in enumerate(zip(spaces, sess.run(names, batch))):
                if y.ndim < 2 or sp.axis == 0:  # not a per-sample tensor (a constant's space)
                    continue
                y = np.moveaxis(y, sp.axis, -1)
                means[i].append(y.reshape(len(y), -1, y.shape[-1]).mean(axis=1))
        direct = np.zeros(cg.n_elements)
        for sp, m in zip(spaces, means):
            if not m:
                continue
            s = infs_scores(np.concatenate(m))
            direct[sp.elements] += s / max(float(s.mean()), 1e-12)
        return ctx.per_class(direct)


CRITERIA = {
    c.name: c
    for c in (
        NispInfs,
        NispInfsSupervised,
        NispMag,
        Taylor,
        FilterL1,
        BnScale,
        Random,
        LayerByLayer,
    )
}


def get_criterion(criterion: str | object) -> object:
    """A criterion object from its name, or the object itself."""
    if not isinstance(criterion, str):
        if not callable(getattr(criterion, "importance", None)):
            raise NispError("a criterion object needs an importance(ctx) method")
        return criterion
    if criterion not in CRITERIA:
        raise NispError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[criterion]()
