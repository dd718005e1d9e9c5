"""Gradients of the loss with respect to the weights: every trainable parameter of every op
the fine-tuning trains, against float64 finite differences (the harness of test_taylor)."""

import numpy as np
import onnx
import pytest
from graphs import Builder
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from scipy import special
from test_cli import SAMPLE
from test_defaults import reader
from test_taylor import check_gradients, conv_variants, dynamic_sizes, labels_for, with_deltas

from nisp_onnx import NispError, prune
from nisp_onnx.backward import TEACHER, TEACHER_FEATURES, Distill, add_backward
from nisp_onnx.calibrate import collect, hold_back, predict, session
from nisp_onnx.distillation import distil, trainable
from nisp_onnx.verify import check


def layers(b):
    """Conv with bias, BatchNorm, PRelu, per-channel Mul and Add, LayerNorm, MatMul and Gemm
    with a transposed weight."""
    b.shape, b.opset = (3, 4, 7, 7), 17  # LayerNormalization
    x = b.bn(b.conv(b.input, 4, 6, stride=2), 6)  # 7 -> 4
    x = b.op("PRelu", x, b.const(np.linspace(-0.5, 0.5, 6).reshape(6, 1, 1)))
    x = b.op("Mul", x, b.const(np.linspace(0.5, 1.5, 6).reshape(1, 6, 1, 1)))
    x = b.op("Add", b.const(np.linspace(-0.2, 0.2, 6).reshape(6, 1, 1)), x)
    x = b.op("Tanh", b.conv(x, 6, 6, group=3))
    f = b.op("Flatten", b.op("GlobalAveragePool", x))  # [N, 6]
    f = b.op(
        "LayerNormalization",
        f,
        b.const(np.linspace(0.8, 1.2, 6)),
        b.const(np.linspace(-0.1, 0.1, 6)),
        axis=-1,
    )
    f = b.op("Tanh", b.op("MatMul", f, b.weight(6, 5)))
    return b.model(b.gemm(f, 5, 3))


EVERY = {"Conv", "BatchNormalization", "PRelu", "Mul", "Add", "LayerNormalization"}


@pytest.mark.parametrize(
    "case, kinds",
    [
        (layers, EVERY | {"MatMul", "Gemm"}),
        (conv_variants, {"Conv", "Gemm"}),  # output sizes known: unfolded weight gradients
        (dynamic_sizes, {"Conv", "Gemm"}),  # unknown: the weight gradient as a convolution
    ],
    ids=lambda c: getattr(c, "__name__", ""),
)
def test_parameter_gradients_match_finite_differences(case, kinds):
    b = Builder()
    model = case(b)
    params = trainable(model)
    assert kinds == {n.op_type for n in model.graph.node if any(i in params for i in n.input)}
    feed = b.feed()
    check_gradients(model, feed, labels_for(feed, 3), params)


def test_what_trains():
    """Weights, biases and per-channel constants train; BatchNorm statistics and scalars do
    not."""
    b = Builder()
    model = layers(b)
    params = trainable(model)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert bn.input[1] in params and bn.input[2] in params
    assert bn.input[3] not in params and bn.input[4] not in params
    x = b.op("Mul", model.graph.output[0].name, b.const(2.0))
    assert b.inits[-1].name not in trainable(b.model(x))


def test_a_wrong_weight_gradient_is_caught(monkeypatch):
    """The same convolution without stride and dilation swapped is wrong for strided layers."""
    from nisp_onnx.backward import windows

    real = windows._conv_weight

    def unswapped(em, node, g, w, group):
        return real(em, node, g, windows.Window(w.kernel, w.dilations, w.strides, w.pads), group)

    monkeypatch.setattr(windows, "_conv_weight", unswapped)
    b = Builder()
    model = layers(b)
    feed = b.feed()
    with pytest.raises(AssertionError, match="fd"):
        check_gradients(model, feed, labels_for(feed, 3), trainable(model))


def test_distillation_gradients_match_finite_differences():
    """KL at a temperature on the logits plus MSE on a feature tensor, against a numpy loss."""
    b = Builder()
    model = layers(b)
    params = trainable(model)
    feature = next(n.output[0] for n in model.graph.node if n.op_type == "Flatten")
    feed = b.feed()
    rng = np.random.default_rng(3)
    teacher, teacher_f = rng.standard_normal((3, 3)), rng.standard_normal((3, 6))
    bw = add_backward(model, params, distill=Distill(4.0, feature, 0.5))
    names = [bw.loss, *bw.grads.values()]
    inputs = {**feed, TEACHER: teacher.astype(np.float32)}
    inputs[TEACHER_FEATURES] = teacher_f.astype(np.float32)
    got = dict(zip(names, session(bw.model).run(names, inputs)))
    fd_model, out = with_deltas(model, params, bw.logits)
    fd_model.graph.output.append(onnx.ValueInfoProto(name=feature))
    ref = ReferenceEvaluator(fd_model)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    base = {k: v.astype(np.float64) for k, v in feed.items()}
    base.update({f"d/{t}": np.zeros(values[t].shape) for t in params})

    def loss_at(t, delta):
        z, f = ref.run([out, feature], {**base, f"d/{t}": delta})
        log_s, log_t = special.log_softmax(z / 4, axis=1), special.log_softmax(teacher / 4, axis=1)
        kl = (np.exp(log_t) * (log_t - log_s)).sum(1).mean()
        return 16 * kl + 0.5 * np.mean((f - teacher_f) ** 2)

    start = loss_at(params[0], base[f"d/{params[0]}"])
    assert float(got[bw.loss][0]) == pytest.approx(start, rel=1e-5)
    for t in params:
        g = got[bw.grads[t]]
        v = rng.standard_normal(g.shape)
        analytic = float(np.sum(g * v))
        fd = (loss_at(t, 1e-6 * v) - loss_at(t, -1e-6 * v)) / 2e-6
        assert fd == pytest.approx(analytic, rel=1e-4, abs=1e-7), t


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A repaired 70% cut of the bundled sample, the original, training and held-back
    batches (a random fifth: the sample's files come in class order), and the original's
    top-1 on the held-back ones."""
    out = tmp_path_factory.mktemp("cut") / "cut.onnx"
    prune(SAMPLE, out, reader(), 0.7, holdout=0)
    student, teacher = onnx.load(out), onnx.load(SAMPLE)
    train, held, _, _ = hold_back(collect(teacher, reader(), "logits"), None, 0.2)
    return student, teacher, train.batches, held.batches, held.predictions


def test_distillation_lowers_the_loss_of_a_pruned_model(cut):
    """Trained against the original, the cut regains agreement on inputs it did not train on
    and lowers its loss on a batch it sees again; the result has the original's interface and
    passes the checker."""
    student, teacher, train, held, expected = cut
    trained = distil(student, teacher, train, steps=40, lr=1e-3)
    before = (predict(student, held) == expected).mean()
    after = (predict(trained.model, held) == expected).mean()
    assert after >= before + 0.05
    one = distil(student, teacher, train[:1], steps=20, lr=1e-3).losses  # the same batch
    assert one[-1] < 0.5 * one[0] and np.all(np.isfinite(one))
    check(trained.model)
    assert [i.name for i in trained.model.graph.input] == [i.name for i in student.graph.input]
    assert len(trained.model.graph.node) == len(student.graph.node)


def test_distillation_needs_a_step():
    with pytest.raises(NispError, match="at least one step"):
        distil(onnx.load(SAMPLE), onnx.load(SAMPLE), [], steps=0)


def test_held_back_agreement_chooses_the_step(cut):
    """The step kept is the best check on the held-back batches, and never worse than the
    start: a rate that wrecks the model keeps the start's weights exactly."""
    student, teacher, train, held, expected = cut
    good = distil(student, teacher, train, steps=40, lr=1e-3, held=held, checks=4)
    assert sorted(good.agreements) == [0, 10, 20, 30, 40]
    assert good.agreements[good.kept_step] == max(good.agreements.values()) > good.agreements[0]
    kept = (predict(good.model, held) == expected).mean()
    assert kept == pytest.approx(good.agreements[good.kept_step])
    bad = distil(student, teacher, train[:1], steps=6, lr=1e3, held=held, checks=3)
    assert bad.kept_step == 0 and max(bad.agreements.values()) == bad.agreements[0]
    for a, b in zip(bad.model.graph.initializer, student.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
