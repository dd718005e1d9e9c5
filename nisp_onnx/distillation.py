"""Label-free fine-tuning of a pruned model against the original, inside onnxruntime."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .augment import AUGMENTS, augment
from .backward import TEACHER, TEACHER_FEATURES, Distill, Index, add_backward, find_logits
from .calibrate import session
from .errors import NispError
from .progress import Progress

OPTIMIZERS = ("adam", "sgd")
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


def trainable(
    model: onnx.ModelProto, train: Iterable[str] = (), freeze: Iterable[str] = ()
) -> list[str]:
    """The float32 initializers that train: every use of one is a trained input of its node
    (through Identity nodes), and a Mul/Add/Sub operand has more than one element. With
    `train` globs, only parameters of nodes whose name matches one; never those of nodes
    matching a `freeze` glob."""
    train, freeze = list(train), list(freeze)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))

    def readers(name: str, size: int) -> list[str] | None:
        """The nodes training `name`, None when a use of it cannot train."""
        found: list[str] = []
        for node, i in uses.get(name, []):
            if node.op_type == "Identity":
                below = readers(node.output[0], size)
                if below is None:
                    return None
                found += below
            elif i not in TRAINS.get(node.op_type, ()) or (
                node.op_type in ("Mul", "Add", "Sub") and size < 2
            ):
                return None
            else:
                found.append(node.name)
        return found

    def matches(nodes: list[str], globs: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, g) for n in nodes for g in globs)

    out = []
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        nodes = readers(t.name, int(np.prod(t.dims)))
        if nodes and (not train or matches(nodes, train)) and not matches(nodes, freeze):
            out.append(t.name)
    return out


def after(model: onnx.ModelProto, tensor: str) -> list[str]:
    """The names of the nodes that read `tensor`, directly or through others (e.g. the
    classifier after the final response layer)."""
    reach, names = {tensor}, []
    for node in model.graph.node:
        if any(i in reach for i in node.input):
            reach.update(node.output)
            names.append(node.name)
    return names


def before_pooling(model: onnx.ModelProto, tensor: str) -> str:
    """The feature map that global pooling (through Flatten/Reshape/Squeeze) turns into
    `tensor`, e.g. the final response layer; `tensor` itself when none does."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = tensor
    while (node := producer.get(name)) is not None:
        if node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"):
            return node.input[0]
        if node.op_type not in ("Flatten", "Reshape", "Squeeze", "Identity"):
            break
        name = node.input[0]
    return tensor


@dataclass
class Trained:
    """The fine-tuned model, the distillation loss of each step (on its batch), and with
    held-back batches the agreement and loss measured every few steps and the step kept."""

    model: onnx.ModelProto
    losses: list[float]
    agreements: dict[int, float] = field(default_factory=dict)  # step -> held-back top-1
    held_losses: dict[int, float] = field(default_factory=dict)  # step -> held-back loss
    kept_step: int = 0  # 0: the start; else the parameters after that many steps
    parameters: int = 0  # trained parameter values
    step_ms: float = 0.0  # mean wall time of one training step (the teacher's run included)
    seconds: float = 0.0  # the whole fine-tuning, checks included
    stopped_early: bool = False  # `patience` checks in a row without a lower held-back loss

    def to_dict(self) -> dict:
        """The report's fine-tuning section."""
        n = len(self.losses)
        head, tail = self.losses[: max(1, n // 10)], self.losses[-max(1, n // 10) :]
        return {
            "steps": n,
            "parameters": self.parameters,
            "seconds": self.seconds,
            "step_ms": self.step_ms,
            "loss_first": float(np.mean(head)) if n else None,
            "loss_last": float(np.mean(tail)) if n else None,
            "agreement_before": self.agreements.get(0),
            "agreement_after": self.agreements.get(self.kept_step),
            "kept_step": self.kept_step,
            "stopped_early": self.stopped_early,
            "checks": {str(k): v for k, v in sorted(self.agreements.items())},
        }


def parse_budget(value: int | str) -> int | float:
    """A fine-tuning budget: steps (an int, or digits) or wall time ("90s", "10m", "1h",
    returned as float seconds)."""
    text = str(value).strip().lower()
    unit = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(text[-1:]) if text else None
    try:
        amount = float(text[:-1]) if unit else int(text)
    except ValueError:
        amount = None
    if amount is None or amount <= 0:
        raise NispError(
            f"--finetune {value!r}: give a number of steps (2000) or a wall time (90s, 10m, 1h)"
        )
    return amount * unit if unit else int(amount)


def distil(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    steps: int | float,
    lr: float = 1e-3,
    temperature: float = 4.0,
    warmup: float = 0.1,
    held: list[dict[str, np.ndarray]] | None = None,
    checks: int = 10,
    names: list[str] | None = None,
    augmentation: str = "none",
    seed: int = 0,
    features: str | None = None,
    kept: list[int] | None = None,
    feature_weight: float = 0.0,
    patience: int | None = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
) -> Trained:
    """Train the parameters `names` of `student` (default: every trainable one) to mimic
    `teacher` (same inputs) on `batches`, their samples shuffled into batches of the first
    one's size anew every epoch and augmented as `augmentation` says (seeded), with Adam:
    the rate warms up linearly over the first `warmup` of the steps, then falls on a cosine
    to 0. `steps` is a count (int) or wall seconds (float: the count is set from the time of
    the first step). Without augmentation the teacher runs once per sample, else on every
    augmented batch. With `held` batches, top-1 agreement with the teacher and the loss on
    them are measured at the start and `checks` times during training, and the parameters of
    the check with the lowest loss among those that agree at least as much as the start are
    kept (the start when none beats it). With `features` (a tensor both
    models have, e.g. the final response layer) and `feature_weight`, the loss adds that
    times the mean squared difference of the two relative to the teacher's mean square (on
    the first batch), the teacher's taken at channels `kept` (axis 1) when given. With
    `patience`, training stops after that many checks in a row without a lower held-back
    loss."""
    if steps <= 0 or (isinstance(steps, int) and steps < 1):
        raise NispError(f"fine-tuning needs at least one step, got {steps}")
    if augmentation not in AUGMENTS:
        raise NispError(f"augmentation must be one of {', '.join(AUGMENTS)}, got {augmentation}")
    if optimizer not in OPTIMIZERS:
        raise NispError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer}")
    began = time.perf_counter()
    names = trainable(student) if names is None else names
    if not names:
        raise NispError("fine-tuning: the model has no trainable float parameters")
    compares = features is not None and feature_weight != 0
    t_logits = find_logits(Index(teacher), teacher)
    wanted = [t_logits, features] if compares else [t_logits]
    t_sess = session(teacher, wanted)

    def teach(batch: dict) -> dict[str, np.ndarray]:
        """The teacher's side of the loss on `batch`."""
        out = t_sess.run(wanted, batch)
        feed = {TEACHER: out[0]}
        if compares:
            feed[TEACHER_FEATURES] = out[1] if kept is None else np.take(out[1], kept, 1)
        return feed

    rng = np.random.default_rng(seed)
    fixed = augmentation == "none"  # the teacher's side once per sample, not every step
    pool = [{**b, **teach(b)} for b in batches] if fixed else batches
    draw = _shuffled(pool, rng)
    if compares:  # the MSE relative to the teacher's mean square on the first batch
        first = pool[0] if fixed else teach(batches[0])
        feature_weight /= max(float(np.mean(first[TEACHER_FEATURES] ** 2)), 1e-12)
    loss = Distill(temperature, features if compares else None, feature_weight)
    bw = add_backward(student, names, distill=loss)
    inits = {t.name: t for t in student.graph.initializer}
    params = {n: numpy_helper.to_array(inits[n]) for n in names}
    sess = session(_with_inputs(bw.model, names), (bw.logits,))
    outputs = [bw.loss, *(bw.grads[n] for n in names)]
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    held = held or []
    expected = [teach(b) for b in held]

    def check() -> tuple[float, float]:
        """Top-1 agreement with the teacher and the mean loss, on the held-back batches."""
        same, losses = [], []
        for b, t in zip(held, expected):
            z, value = sess.run([bw.logits, bw.loss], {**b, **t, **params})
            n = len(t[TEACHER])
            same.append(z.reshape(n, -1).argmax(1) == t[TEACHER].reshape(n, -1).argmax(1))
            losses.append(float(value[0]) * n)
        same = np.concatenate(same)
        return float(same.mean()), sum(losses) / len(same)

    result = Trained(student, [], {})
    if held:
        result.agreements[0], result.held_losses[0] = check()
    result.parameters = sum(p.size for p in params.values())
    best, total, step, stale = params, steps, 0, 0
    with Progress("fine-tune", steps if isinstance(steps, int) else None) as bar:
        while step == 0 or step < total:
            batch = draw(step) if fixed else augment(draw(step), augmentation, rng)
            started = time.perf_counter()
            teacher_side = {} if fixed else teach(batch)
            value, *grads = sess.run(outputs, {**batch, **teacher_side, **params})
            if not isinstance(total, int):  # a wall-time budget: steps from the first one
                total = max(1, int((steps - (started - began)) / (time.perf_counter() - started)))
                bar.set_total(total)
            if step == 0:
                ramp = max(1, int(warmup * total))
                checked = {round(total * (i + 1) / checks) for i in range(checks)} if held else ()
            result.losses.append(float(value[0]))
            rate = lr * min(1.0, (step + 1) / ramp)
            if step >= ramp:
                rate = lr * 0.5 * (1 + np.cos(np.pi * (step - ramp) / max(1, total - ramp)))
            params = dict(params)  # a new dict each step: `best` keeps the one it was given
            for n, g in zip(names, grads):
                if optimizer == "sgd":  # with momentum 0.9
                    m[n] = 0.9 * m[n] + g
                    move = m[n]
                else:
                    m[n] = 0.9 * m[n] + 0.1 * g
                    v[n] = 0.999 * v[n] + 0.001 * g * g
                    mh, vh = m[n] / (1 - 0.9 ** (step + 1)), v[n] / (1 - 0.999 ** (step + 1))
                    move = mh / (np.sqrt(vh) + 1e-8)
                decayed = params[n] * (1 - rate * weight_decay) if weight_decay else params[n]
                params[n] = (decayed - rate * move).astype(np.float32)
            result.step_ms += 1000 * (time.perf_counter() - started)
            step += 1
            bar.update()
            if step in checked:
                result.agreements[step], result.held_losses[step] = check()
                better = result.held_losses[step] < result.held_losses[result.kept_step]
                stale = 0 if better else stale + 1
                if better and result.agreements[step] >= result.agreements[0]:
                    result.kept_step, best = step, params
                bar.note(
                    f"fine-tune step {step}/{total}: loss {np.mean(result.losses[-10:]):.4f}, "
                    f"held-back agreement {100 * result.agreements[step]:.1f}%"
                )
            if step % 10 == 0 or step == total:
                bar.status(f"loss {np.mean(result.losses[-10:]):.4f}")
            if patience and stale >= patience:
                result.stopped_early = True
                break
    if not held:
        best, result.kept_step = params, step
    result.step_ms /= step
    result.model = onnx.ModelProto.FromString(student.SerializeToString())
    for t in result.model.graph.initializer:
        if t.name in best:
            t.CopyFrom(numpy_helper.from_array(best[t.name], t.name))
    result.seconds = time.perf_counter() - began
    return result


def _shuffled(batches: list[dict[str, np.ndarray]], rng: np.random.Generator):  # noqa: ANN202
    """step -> a batch of the samples of `batches`, all of them in a new random order every
    epoch (those left over from whole batches wait for the next); the batches in turn where
    their inputs do not all share the first axis."""
    if any(len({len(x) if np.ndim(x) else -1 for x in b.values()}) != 1 for b in batches):
        return lambda step: batches[step % len(batches)]
    pool = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = sum(len(next(iter(b.values()))) for b in batches)
    size = len(next(iter(batches[0].values())))
    per_epoch, order = n // size, {}

    def draw(step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = rng.permutation(n)
        take = order[epoch][i * size : (i + 1) * size]
        return {k: v[take] for k, v in pool.items()}

    return draw


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


@dataclass
class FineTune:
    """How `prune(finetune=...)` and `finetune()` train: the budget (steps, or wall time as
    "90s", "10m", "1h"), the optimizer's peak rate, the augmentation, node-name globs to
    train only or to freeze, whether to freeze the nodes after the final response layer (the
    classifier), the weight of the feature MSE (relative to the teacher's mean square) beside
    the logit KL at `temperature` (on the map before global pooling unless
    `pooled_features`), how many checks without gain stop early, the optimizer ("adam" or
    "sgd" with momentum) and its decoupled weight decay."""

    budget: int | str = 2000
    lr: float = 1e-4
    augment: str = "none"
    train: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    freeze_classifier: bool = False
    feature_weight: float = 100.0  # measured: docs/accuracy.md, Fine-tuning
    temperature: float = 4.0
    patience: int | None = 3
    pooled_features: bool = False  # compare the final response layer, not the map before it
    optimizer: str = "adam"
    weight_decay: float = 0.0

    @classmethod
    def of(cls, value: FineTune | int | str | None) -> FineTune | None:
        """`value` as a FineTune: a budget alone takes the defaults; checked."""
        if value is None:
            return None
        out = value if isinstance(value, FineTune) else cls(budget=value)
        parse_budget(out.budget)
        if out.augment not in AUGMENTS:
            raise NispError(f"--augment must be one of {', '.join(AUGMENTS)}, got {out.augment}")
        if not out.lr > 0:
            raise NispError(f"--finetune-lr must be positive, got {out.lr}")
        if out.optimizer not in OPTIMIZERS:
            raise NispError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if out.weight_decay < 0:
            raise NispError(f"--weight-decay must be at least 0, got {out.weight_decay}")
        return out

    def run(
        self,
        student: onnx.ModelProto,
        teacher: onnx.ModelProto,
        batches: list[dict[str, np.ndarray]],
        held: list[dict[str, np.ndarray]] | None,
        seed: int = 0,
        features: str | None = None,
        kept: list[int] | None = None,
    ) -> Trained:
        """Distil `student` from `teacher` on `batches`, the step kept chosen on `held`;
        `features` names the final response layer both have, the teacher's channels `kept`
        of it matching the student's."""
        freeze = list(self.freeze)
        if features is not None and not self.pooled_features:
            features = before_pooling(student, features)
        if self.freeze_classifier and features is not None:
            freeze += after(student, features)
        names = trainable(student, self.train, freeze)
        if not names:
            raise NispError(
                "fine-tuning: no trainable float parameters"
                + (" match --train / --freeze" if self.train or freeze else " in the model")
            )
        return distil(
            student,
            teacher,
            batches,
            parse_budget(self.budget),
            lr=self.lr,
            temperature=self.temperature,
            held=held,
            names=names,
            augmentation=self.augment,
            seed=seed,
            features=features,
            kept=kept,
            feature_weight=self.feature_weight,
            patience=self.patience if held else None,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
        )
