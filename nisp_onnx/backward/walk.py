"""The loss and the walk: which nodes need a VJP, in what order, and the graph they make."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, version_converter

from ..errors import NispError
from .emitter import (
    FLOATS,
    LABELS,
    MIN_OPSET,
    NON_DIFF,
    TEACHER,
    TEACHER_FEATURES,
    Emitter,
    Index,
    fail,
)
from .vjps import VJPS


@dataclass
class Distill:
    """The distillation loss: T^2 times the batch mean of KL(softmax(t/T) || softmax(s/T)) of
    the teacher's logits t (input TEACHER) and the student's s, plus `weight` times the mean
    squared difference of the student's tensor `features` and the teacher's (input
    TEACHER_FEATURES, the same shape)."""

    temperature: float = 4.0
    features: str | None = None
    weight: float = 0.0

    @property
    def compares_features(self) -> bool:
        return self.features is not None and self.weight != 0


@dataclass
class Backward:
    """A model extended with its loss and gradients."""

    model: onnx.ModelProto
    grads: dict[str, str]  # requested tensor -> the tensor holding its gradient
    labels: str  # the int64 [N] input of target classes
    loss: str  # the mean cross-entropy, shape [1]
    logits: str  # the tensor the loss is computed from
    classes: int | None  # number of classes when known


# ---------------------------------------------------------------------------------------------
# the walk


def upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` at opset >= MIN_OPSET with shapes inferred."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    if opset < MIN_OPSET:
        try:
            out = version_converter.convert_version(out, MIN_OPSET)
        except Exception as e:  # the converter raises many types
            raise NispError(
                f"gradients: cannot convert the model from opset {opset} to {MIN_OPSET} "
                f"({type(e).__name__}); use another criterion such as nisp-infs or l1"
            ) from None
    out.ir_version = max(out.ir_version, 8)
    try:
        return onnx.shape_inference.infer_shapes(out)
    except Exception:  # best effort: VJPs that need a shape say so
        return out


def find_logits(idx: Index, model: onnx.ModelProto) -> str:
    """Output 0, or the input of the Softmax/LogSoftmax that produces it (through Identity,
    Flatten, Reshape and Squeeze nodes, as exporters write them)."""
    out = name = model.graph.output[0].name
    while (node := idx.producer.get(name)) is not None:
        if node.op_type in ("Softmax", "LogSoftmax"):
            return node.input[0]
        if node.op_type not in ("Identity", "Flatten", "Reshape", "Squeeze"):
            break
        name = node.input[0]
    return out


def _forward_reach(idx: Index, tensors: Iterable[str]) -> set[str]:
    """Float tensors that depend on `tensors` through differentiable ops."""
    reach = set(tensors)
    for node in idx.nodes:
        if node.op_type in NON_DIFF or not any(i in reach for i in node.input if i):
            continue
        outs = node.output[:1] if node.op_type in ("MaxPool", "Dropout") else node.output
        for o in outs:
            t = idx.elem_type(o)
            if o and (t is None or t in FLOATS):
                reach.add(o)
    return reach


def _backward_reach(idx: Index, target: str) -> set[str]:
    reach = {target}
    for node in reversed(idx.nodes):
        if any(o in reach for o in node.output):
            reach.update(i for i in node.input if i)
    return reach


def _loss(em: Emitter, logits: str, labels: str) -> tuple[str, str]:
    """Mean cross-entropy of softmax(logits) against `labels`, and its gradient."""
    z = em.op("Flatten", logits, axis=1)
    shape = em.shape(z)
    depth = em.op("Slice", shape, em.ints([1]), em.ints([2]))
    onehot = em.op("OneHot", labels, depth, em.const([0.0, 1.0]), axis=-1)
    n = em.op("Cast", em.op("Slice", shape, em.ints([0]), em.ints([1])), to=em.elem)
    diff = em.op("Sub", em.op("Softmax", z, axis=1), onehot)
    dz = em.op("Reshape", em.op("Div", diff, n), em.shape(logits))
    logp = em.op("LogSoftmax", z, axis=1)
    total = em.op("ReduceSum", em.op("Mul", onehot, logp), keepdims=0)
    return em.op("Div", em.op("Neg", total), n), dz


def _distillation(em: Emitter, logits: str, d: Distill) -> tuple[str, dict[str, str]]:
    """The distillation loss and its gradients: dL/ds = T (softmax(s/T) - softmax(t/T)) / N,
    dL/df = 2 w (f - f_t) / size(f)."""
    inv = em.const(1.0 / d.temperature)
    z = em.op("Mul", em.op("Flatten", logits, axis=1), inv)
    t = em.op("Mul", em.op("Flatten", TEACHER, axis=1), inv)
    n = em.op("Cast", em.op("Slice", em.shape(z), em.ints([0]), em.ints([1])), to=em.elem)
    p_t = em.op("Softmax", t, axis=1)
    gap = em.op("Sub", em.op("LogSoftmax", t, axis=1), em.op("LogSoftmax", z, axis=1))
    kl = em.op("ReduceSum", em.op("Mul", p_t, gap), keepdims=0)
    loss = em.op("Div", em.op("Mul", kl, em.const(d.temperature**2)), n)
    diff = em.op("Sub", em.op("Softmax", z, axis=1), p_t)
    scaled = em.op("Div", em.op("Mul", diff, em.const(d.temperature)), n)
    seeds = {logits: em.op("Reshape", scaled, em.shape(logits))}
    if d.compares_features:
        f = em.op("Sub", d.features, TEACHER_FEATURES)
        size = em.op("Cast", em.op("Size", f), to=em.elem)
        mse = em.op("ReduceMean", em.op("Mul", f, f), keepdims=0)
        loss = em.op("Add", loss, em.op("Mul", mse, em.const(d.weight)))
        seeds[d.features] = em.op("Div", em.op("Mul", f, em.const(2 * d.weight)), size)
    return em.op("Reshape", loss, em.ints([1])), seeds


def add_backward(
    model: onnx.ModelProto,
    tensors: Iterable[str],
    as_outputs: bool = True,
    labels: str = LABELS,
    distill: Distill | None = None,
) -> Backward:
    """A copy of `model` that also computes the loss and its gradient w.r.t. each of `tensors`
    (activations or weights).

    The loss is the mean cross-entropy of the logits (output 0, or the input of the Softmax
    producing it) against the int64 input `labels`, or with `distill` the distillation loss
    against the float inputs TEACHER (and TEACHER_FEATURES). With `as_outputs`, the loss and
    the gradients are graph outputs; otherwise the caller adds nodes reading `Backward.grads`.
    """
    model = upgraded(model)
    idx = Index(model)
    tensors = list(dict.fromkeys(tensors))
    missing = [t for t in tensors if t not in idx.names]
    if missing:
        raise NispError(f"gradients: the model has no tensor {missing[0]!r}")
    logits = find_logits(idx, model)
    elem = idx.elem_type(logits) or TensorProto.FLOAT
    em = Emitter(idx, elem)
    if distill is None:
        loss, dz = _loss(em, logits, labels)
        seeds = {logits: dz}
    else:
        if distill.features is not None and distill.features not in idx.names:
            raise NispError(f"distillation: the model has no tensor {distill.features!r}")
        loss, seeds = _distillation(em, logits, distill)
    grads = _walk(em, idx, tensors, seeds)
    result = {}
    for t in tensors:
        g = grads(t) or em.zeros_like(t)
        result[t] = em.op("Identity", g) if as_outputs else g
    g = model.graph
    g.node.extend(em.nodes)
    g.initializer.extend(em.inits)
    if distill is None:
        g.input.append(helper.make_tensor_value_info(labels, TensorProto.INT64, ["N"]))
    else:
        g.input.append(helper.make_tensor_value_info(TEACHER, elem, None))
        if distill.compares_features:
            g.input.append(helper.make_tensor_value_info(TEACHER_FEATURES, elem, None))
    if as_outputs:
        g.output.extend(onnx.ValueInfoProto(name=n) for n in [loss, *result.values()])
    shape = idx.shape(logits)
    classes = int(np.prod(shape[1:])) if shape and all(shape[1:]) else None
    return Backward(model, result, labels, loss, logits, classes)


def _walk(em: Emitter, idx: Index, tensors: list[str], seeds: dict[str, str]) -> Callable:
    """Emit the VJPs of every node between `tensors` and the tensors `seeds` gives the loss's
    gradients of; return name -> gradient."""
    fwd = _forward_reach(idx, tensors)
    live = fwd & set().union(*(_backward_reach(idx, t) for t in seeds))
    parts: dict[str, list[str]] = defaultdict(list)
    for name, seed in seeds.items():
        parts[name].append(seed)
    totals: dict[str, str | None] = {}

    def total(name: str) -> str | None:
        if name not in totals:
            totals[name] = em.sum(parts.pop(name, []))
        return totals[name]

    for node in reversed(idx.nodes):
        if not any(o in live for o in node.output):
            continue
        dy = [total(o) if o in live else None for o in node.output]
        if all(g is None for g in dy):
            continue
        need = [bool(i) and i in fwd for i in node.input]
        if not any(need):
            continue
        vjp = VJPS.get(node.op_type)
        if vjp is None:
            raise fail(
                node, "has no backward rule (it lies between the scored layers and the loss)"
            )
        for name, g in zip(node.input, vjp(em, node, dy, need)):
            if g is not None and name in fwd:
                parts[name].append(g)
    return total
