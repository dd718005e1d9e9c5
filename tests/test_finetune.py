"""Fine-tuning in the pipeline and on its own: `prune(finetune=...)`, `finetune()`, the CLI
flags, their one-line errors, budgets, augmentation and what trains."""

import json

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_defaults import reader
from test_safety import CALIB, SAMPLE, SCHEMA, digest, main, one_error

from nisp_onnx import FineTune, NispError, finetune, prune
from nisp_onnx.augment import _resized, _shifted, augment
from nisp_onnx.backward import Index, find_logits
from nisp_onnx.calibrate import predict, session
from nisp_onnx.distillation import (
    after,
    before_pooling,
    distil,
    parse_budget,
    trainable,
)
from nisp_onnx.errors import EXIT_OK, EXIT_USER
from nisp_onnx.verify import check

QUICK = FineTune(budget=40, lr=1e-3, augment="none")  # enough to move the sample's cut


def test_prune_with_finetune_raises_held_back_agreement(tmp_path):
    """A repaired 70% cut regains agreement on the held-back inputs; the report says by how
    much and at which step, the summary and Markdown show it, the output is checked."""
    out = tmp_path / "out.onnx"
    report = prune(SAMPLE, out, reader(), 0.7, finetune=QUICK)
    f = report.finetune
    assert f["agreement_after"] >= f["agreement_before"] + 0.05
    assert report.agreement == pytest.approx(f["agreement_after"])
    assert f["loss_last"] < f["loss_first"] and 0 < f["kept_step"] <= f["steps"] <= 40
    assert f["parameters"] == report.params_after  # every parameter of the sample trains
    assert "fine-tune: " in report.summary() and "Fine-tune: " in report.markdown()
    assert "which chose the fine-tuning step" in report.evaluated_on
    jsonschema.validate(json.loads(json.dumps(report.to_dict())), SCHEMA)
    model = onnx.load(out)
    check(model)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert not {"nisp_teacher_logits"} & {i.name for i in model.graph.input}


def test_same_seed_gives_byte_identical_output(tmp_path):
    tuning = FineTune(budget=12, lr=1e-3, augment="flip-crop")
    for name in "ab":
        prune(SAMPLE, tmp_path / f"{name}.onnx", reader(), 0.7, finetune=tuning)
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


def test_finetuning_an_unpruned_model_keeps_its_outputs(tmp_path):
    """Against itself the loss is at its minimum: without held-back inputs to fall back on,
    the last step's weights still give the original's outputs, up to Adam's steps of the
    rate's size on gradients of rounding noise."""
    out = tmp_path / "same.onnx"
    trained = finetune(SAMPLE, SAMPLE, reader(), out, FineTune(budget=10, lr=1e-4), holdout=0)
    assert trained.kept_step == 10 and trained.losses[0] < 1e-6
    batches = list(iter(reader().get_next, None))[:2]
    a = session(onnx.load(SAMPLE)).run(None, batches[0])[0]
    b = session(onnx.load(out)).run(None, batches[0])[0]
    np.testing.assert_array_equal(b.argmax(1), a.argmax(1))
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())


def test_standalone_cli_distils_a_pruned_model(tmp_path, capsys):
    cut, tuned, report = tmp_path / "cut.onnx", tmp_path / "tuned.onnx", tmp_path / "r.json"
    prune(SAMPLE, cut, reader(), 0.7)
    args = ["--calib", CALIB, "--finetune", "30", "--finetune-lr", "1e-3", "--augment", "none"]
    code, out, err = main(capsys, cut, tuned, "--teacher", SAMPLE, *args, "--report", report)
    assert code == EXIT_OK, err
    assert f"distilled from {SAMPLE}" in out and "held-back agreement" in out
    f = json.loads(report.read_text())["finetune"]
    assert f["agreement_after"] > f["agreement_before"]
    check(onnx.load(tuned))


def renamed_input(path):
    model = onnx.load(SAMPLE)
    model.graph.input[0].name = "image"
    for node in model.graph.node:
        node.input[:] = ["image" if i == "input" else i for i in node.input]
    onnx.save(model, path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--finetune", "0"], "--finetune '0': give a number of steps"),
        (["--finetune", "ten"], "--finetune 'ten': give a number of steps"),
        (["--finetune=-5m"], "give a number of steps (2000) or a wall time"),
        (["--finetune", "5", "--provider", "NoSuchProvider"], "--provider NoSuchProvider: not"),
        (["--finetune", "5", "--train", "nothing*"], "no trainable float parameters match"),
        (["--teacher", "OTHER"], "their inputs differ (input against image)"),
    ],
)
def test_bad_fine_tuning_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    other = tmp_path / "other.onnx"
    renamed_input(other)
    out = tmp_path / "out.onnx"
    args = [str(other) if a == "OTHER" else a for a in args]
    code, _, err = main(capsys, SAMPLE, out, "--calib", CALIB, "--ratio", "0.5", *args)
    assert code == EXIT_USER
    assert message in one_error(err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx"]


def test_provider_names(tmp_path):
    report = prune(SAMPLE, None, reader(), 0.3, provider="cpu", num_samples=64)
    assert report.agreement is not None
    with pytest.raises(NispError, match="not available in this onnxruntime"):
        prune(SAMPLE, None, reader(), 0.3, provider="cuda-but-not-here")


def test_nothing_removed_is_not_fine_tuned():
    report = prune(SAMPLE, None, reader(), 0.0, finetune=QUICK, num_samples=64)
    assert report.finetune is None
    assert "nothing was removed, so nothing was fine-tuned" in report.warnings


def test_budgets():
    assert parse_budget(2000) == parse_budget("2000") == 2000
    assert (parse_budget("90s"), parse_budget("10m"), parse_budget("1h")) == (90, 600, 3600)
    for bad in ("", "0", "1.5", "m", "3d", "-2s"):
        with pytest.raises(NispError):
            parse_budget(bad)


def test_wall_time_budget_sets_the_steps_from_the_first_one():
    """A wall-time budget becomes a step count after the first step: one a step cannot fit
    in runs that one step only."""
    model = onnx.load(SAMPLE)
    batches = list(iter(reader().get_next, None))
    trained = distil(model, model, batches, steps=1e-6)
    assert len(trained.losses) == 1 and trained.kept_step == 1


def test_augmentation_is_seeded_and_keeps_shapes():
    x = np.random.default_rng(1).random((8, 3, 12, 10), dtype=np.float32)
    batch = {"input": x, "ids": np.arange(8)}
    assert augment(batch, "none", np.random.default_rng(0)) is batch
    for how in ("flip", "flip-shift", "flip-crop"):
        a = augment(batch, how, np.random.default_rng(0))
        b = augment(batch, how, np.random.default_rng(0))
        assert a["input"].shape == x.shape and a["input"].dtype == np.float32
        np.testing.assert_array_equal(a["input"], b["input"])
        np.testing.assert_array_equal(a["ids"], batch["ids"])
        assert not np.array_equal(a["input"], x)
    flipped = augment(batch, "flip", np.random.default_rng(0))["input"]
    for xi, fi in zip(x, flipped):
        assert np.array_equal(fi, xi) or np.array_equal(fi, xi[..., ::-1])
    np.testing.assert_allclose(_resized(x[0], (0, 0, 12, 10)), x[0], atol=1e-6)
    np.testing.assert_array_equal(_shifted(x[0], (0, 0)), x[0])
    moved = _shifted(x[0], (1, -2))
    np.testing.assert_array_equal(moved[:, 1:, :-2], x[0][:, :-1, 2:])
    assert not moved[:, 0].any() and not moved[:, :, -2:].any()


def test_what_trains_follows_the_globs():
    model = onnx.load(SAMPLE)
    every = trainable(model)
    assert every and trainable(model, freeze=["*"]) == []
    first = model.graph.node[0].name
    only = trainable(model, train=[first])
    assert only and set(only) < set(every)
    assert set(trainable(model, freeze=[first])) == set(every) - set(only)
    head = after(model, model.graph.node[-2].output[0])
    assert head == [model.graph.node[-1].name]


def test_feature_distillation_compares_the_map_before_pooling():
    """The feature MSE reads the map global pooling turns into the final response layer (the
    teacher's at the channels kept) and adds to the loss; without a weight it is left out."""
    model = onnx.load(SAMPLE)
    pool = next(n for n in model.graph.node if n.op_type == "GlobalAveragePool")
    assert before_pooling(model, "/Flatten_output_0") == pool.input[0]
    assert before_pooling(model, pool.input[0]) == pool.input[0]  # no pooling before it
    runs = [
        prune(SAMPLE, None, reader(), 0.5, finetune=FineTune(budget=3, feature_weight=w))
        for w in (0.0, 1.0)
    ]
    plain, both = (r.finetune["loss_first"] for r in runs)
    assert both > plain > 0


def test_a_softmax_output_trains_on_its_logits():
    """Where output 0 is a Softmax (behind an Identity, as TensorFlow exports write it),
    agreement and the loss read its input."""
    model = onnx.load(SAMPLE)
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.node.append(helper.make_node("Identity", ["probs"], ["output"]))
    model.graph.output[0].name = "output"
    assert find_logits(Index(model), model) == "logits"
    batches = list(iter(reader().get_next, None))
    trained = distil(model, model, batches[:2], steps=2, held=batches[-1:], checks=2)
    assert trained.agreements[0] == 1.0
    expected = predict(model, batches[-1:])
    assert (predict(trained.model, batches[-1:]) == expected).all()


def test_sgd_with_weight_decay_shrinks_the_weights():
    """Against itself the gradients vanish, so SGD's first step is the decay alone: every
    trained parameter shrinks by 1 - lr d."""
    model = onnx.load(SAMPLE)
    batches = list(iter(reader().get_next, None))[:2]
    trained = distil(model, model, batches, 1, lr=0.1, optimizer="sgd", weight_decay=0.5)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in trained.model.graph.initializer:
        if t.name in trainable(model):
            shrunk = before[t.name] * (1 - 0.1 * 0.5)
            np.testing.assert_allclose(numpy_helper.to_array(t), shrunk, rtol=1e-4, atol=1e-6)
    with pytest.raises(NispError, match="optimizer must be one of adam, sgd"):
        distil(model, model, batches, 1, optimizer="rmsprop")
