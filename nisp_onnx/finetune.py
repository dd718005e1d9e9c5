"""Label-free fine-tuning of a pruned model against the original, inside onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .backward import TEACHER, Distill, Index, add_backward, find_logits
from .calibrate import session
from .errors import NispError

# the inputs of each op that train: weights, biases, normalisation scales and shifts, slopes
TRAINS = {
    "Conv": {1, 2},
    "Gemm": {1, 2},
    "MatMul": {1},
    "BatchNormalization": {1, 2},
    "LayerNormalization": {1, 2},
    "PRelu": {1},
    "Mul": {0, 1},
    "Add": {0, 1},
    "Sub": {0, 1},
}


def trainable(model: onnx.ModelProto) -> list[str]:
    """The float32 initializers that train: every use of one is a trained input of its node
    (through Identity nodes), and a Mul/Add/Sub operand has more than one element."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))

    def trains(name: str, size: int) -> bool:
        found = uses.get(name, [])
        for node, i in found:
            if node.op_type == "Identity":
                if not trains(node.output[0], size):
                    return False
            elif i not in TRAINS.get(node.op_type, ()) or (
                node.op_type in ("Mul", "Add", "Sub") and size < 2
            ):
                return False
        return bool(found)

    return [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and trains(t.name, int(np.prod(t.dims)))
    ]


@dataclass
class Trained:
    """The fine-tuned model, the distillation loss of each step (on its batch), and with
    held-back batches the agreement measured every few steps and the step kept."""

    model: onnx.ModelProto
    losses: list[float]
    agreements: dict[int, float] = field(default_factory=dict)  # step -> held-back top-1
    kept_step: int = 0  # 0: the start; else the parameters after that many steps


def distil(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    steps: int,
    lr: float = 1e-3,
    temperature: float = 4.0,
    warmup: float = 0.1,
    held: list[dict[str, np.ndarray]] | None = None,
    checks: int = 10,
) -> Trained:
    """Train every trainable parameter of `student` to mimic `teacher` (same inputs) on
    `batches`, one batch per step in turn, with Adam: the rate warms up linearly over the first
    `warmup` of the steps, then falls on a cosine to 0. With `held` batches, top-1 agreement
    with the teacher on them is measured at the start and `checks` times during training, and
    the parameters of the best check are kept (the start unless a later one agrees more)."""
    if steps < 1:
        raise NispError(f"fine-tuning needs at least one step, got {steps}")
    names = trainable(student)
    bw = add_backward(student, names, distill=Distill(temperature))
    inits = {t.name: t for t in student.graph.initializer}
    params = {n: numpy_helper.to_array(inits[n]) for n in names}
    sess = session(_with_inputs(bw.model, names))
    outputs = [bw.loss, *(bw.grads[n] for n in names)]
    t_logits = find_logits(Index(teacher), teacher)
    t_sess = session(teacher, [t_logits])
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    ramp = max(1, int(warmup * steps))
    held = held or []
    expected = [t_sess.run([t_logits], b)[0] for b in held]

    def agreement() -> float:
        same = [
            sess.run([bw.logits], {**b, TEACHER: t, **params})[0].reshape(len(t), -1).argmax(1)
            == t.reshape(len(t), -1).argmax(1)
            for b, t in zip(held, expected)
        ]
        return float(np.concatenate(same).mean())

    checked = {round(steps * (i + 1) / checks) for i in range(checks)} if held else set()
    result = Trained(student, [], {0: agreement()} if held else {})
    best = params
    for step in range(steps):
        batch = batches[step % len(batches)]
        (target,) = t_sess.run([t_logits], batch)
        loss, *grads = sess.run(outputs, {**batch, TEACHER: target, **params})
        result.losses.append(float(loss[0]))
        rate = lr * min(1.0, (step + 1) / ramp)
        if step >= ramp:
            rate = lr * 0.5 * (1 + np.cos(np.pi * (step - ramp) / max(1, steps - ramp)))
        params = dict(params)  # a new dict each step: `best` keeps the one it was given
        for n, g in zip(names, grads):
            m[n] = 0.9 * m[n] + 0.1 * g
            v[n] = 0.999 * v[n] + 0.001 * g * g
            mh, vh = m[n] / (1 - 0.9 ** (step + 1)), v[n] / (1 - 0.999 ** (step + 1))
            params[n] = (params[n] - rate * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if step + 1 in checked:
            result.agreements[step + 1] = agreement()
            if result.agreements[step + 1] > result.agreements[result.kept_step]:
                result.kept_step, best = step + 1, params
    if not held:
        best = params
    result.model = onnx.ModelProto.FromString(student.SerializeToString())
    for t in result.model.graph.initializer:
        if t.name in best:
            t.CopyFrom(numpy_helper.from_array(best[t.name], t.name))
    return result


def _with_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` with the initializers `names` turned into graph inputs of the same name."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    keep, moved = [], []
    for t in out.graph.initializer:
        (moved if t.name in names else keep).append(t)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    out.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved
    )
    return out
