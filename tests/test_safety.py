"""Fit for CI: exit codes, quality gates, file safety, reports, determinism, bad input."""

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nisp_onnx
from nisp_onnx import cli
from nisp_onnx.errors import EXIT_GATE, EXIT_INTERNAL, EXIT_USER

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits_resnet.onnx"
CALIB = ROOT / "models" / "digits_calib"
SCHEMA = json.loads((Path(nisp_onnx.__file__).parent / "report.schema.json").read_text())
FAST = ["--num-samples", "64", "--no-repair", "--ratio", "0.5"]


def main(capsys, *args):
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_error(err, prefix="nisp-onnx: error:"):
    lines = [line for line in err.splitlines() if line.startswith("nisp-onnx:")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_gates_pass_and_report_follows_the_schema(tmp_path, capsys):
    out, report, md = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "s.md"
    gates = ["--min-agreement", "0.1", "--max-accuracy-drop", "0.9", "--min-macs-reduction", "0.3"]
    code, stdout, _ = main(
        capsys, SAMPLE, out, "--calib", CALIB, *FAST, *gates, "--report", report,
        "--summary-md", md,
    )  # fmt: skip
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["written"] and data["held_out"] == 13 and data["samples"] == 51
    assert [g["passed"] for g in data["gates"]] == [True, True, True]
    assert set(data["timings"]) == set(data["memory"]) and min(data["memory"].values()) > 10
    assert "gate --min-agreement 0.1: passed" in stdout and "13 held-back inputs" in stdout
    text = md.read_text()
    assert "Quality gates passed; model written." in text and "| `--min-agreement` |" in text


def test_benchmark_times_both_models(tmp_path, capsys):
    report, md = tmp_path / "r.json", tmp_path / "s.md"
    args = [*FAST, "--benchmark", "--report", report, "--summary-md", md]
    code, stdout, _ = main(capsys, SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, *args)
    assert code == 0
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["benchmark"]["threads"] == 1
    assert [b["batch_size"] for b in data["benchmark"]["batches"]] == [1, 32]
    assert all(b["original_ms"] > 0 and b["pruned_ms"] > 0 for b in data["benchmark"]["batches"])
    assert "latency at batch 32, 1 thread(s)" in stdout and "| latency, batch 1," in md.read_text()


def test_failed_gate_exits_3_and_writes_no_model(tmp_path, capsys):
    out, report, md = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "s.md"
    args = [SAMPLE, out, "--calib", CALIB, *FAST, "--report", report, "--summary-md", md]
    code, _, err = main(capsys, *args, "--min-macs-reduction", "0.95")
    line = one_error(err, "nisp-onnx: quality gate failed: --min-macs-reduction 0.95, measured")
    assert code == EXIT_GATE and "nothing written" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] != []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s.md"]
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    assert not data["written"] and data["gates"][0]["passed"] is False
    assert "**FAIL**" in md.read_text() and "**not written**" in md.read_text()
    code, _, err = main(capsys, *args, "--min-macs-reduction", "0.95", "--keep-on-fail")
    assert code == EXIT_GATE and "written anyway" in err and out.exists()
    onnx.checker.check_model(str(out), full_check=True)


def test_accuracy_gate_without_labels_fails(tmp_path, capsys):
    x = np.random.default_rng(0).random((40, 1, 16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code, _, err = main(
        capsys, SAMPLE, tmp_path / "o.onnx", "--calib", tmp_path / "x.npy", *FAST[2:],
        "--max-accuracy-drop", "0.05",
    )  # fmt: skip
    assert code == EXIT_GATE and "not measurable without labels" in one_error(err, "nisp-onnx:")
    assert not (tmp_path / "o.onnx").exists()


def test_internal_error_is_one_line_with_the_traceback_behind_v(tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(cli, "prune", bug)
    args = [SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, *FAST]
    code, _, err = main(capsys, *args)
    line = one_error(err, "nisp-onnx: internal error: ZeroDivisionError: simulated bug")
    assert code == EXIT_INTERNAL and "please report it" in line
    code, _, err = main(capsys, *args, "-v")
    assert code == EXIT_INTERNAL and "Traceback" in err and "def bug" not in err


def test_existing_output_needs_force_and_the_input_is_never_touched(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save_model(
        onnx.load(SAMPLE), src, save_as_external_data=True, location="victim.onnx.data",
        size_threshold=0,
    )  # fmt: skip
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    code, _, err = main(capsys, src, out, "--calib", CALIB, *FAST)
    assert code == EXIT_USER and "already exists; pass --force" in one_error(err)
    assert out.read_bytes() == b"precious"
    for target in (src, tmp_path / "victim.onnx"):  # the second would write victim.onnx.data
        code, _, err = main(capsys, src, target, "--calib", CALIB, *FAST, "--force")
        assert code == EXIT_USER and "refusing to overwrite the input" in one_error(err)
    code, _, err = main(capsys, src, out, "--calib", CALIB, *FAST, "--force")
    assert code == 0, err
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*before, "out.onnx", "out.onnx.data"]
    )
    onnx.checker.check_model(str(out), full_check=True)


def test_a_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    real = onnx.save_model

    def disk_full(proto, path, *args, **kwargs):
        real(proto, path, *args, **kwargs)  # a partial file exists when the error comes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", disk_full)
    code, _, err = main(capsys, SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, *FAST)
    assert code == EXIT_USER and "cannot write the output model (No space left" in one_error(err)
    assert list(tmp_path.iterdir()) == []


def test_same_inputs_give_byte_identical_outputs(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    runs = []
    for _ in range(2):
        args = ["--num-samples", "48", "--ratio", "0.4", "--report", report, "--force"]
        assert main(capsys, SAMPLE, out, "--calib", CALIB, *args)[0] == 0
        data = json.loads(report.read_text())
        del data["timings"], data["memory"]
        runs.append((out.read_bytes(), data))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]


# Bad input: each gives one line, exit 2, no traceback and nothing written.


def small_model(path, nodes, inputs, inits=(), domain_opsets=()):
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inits),
    )
    opsets = [helper.make_opsetid("", 13), *domain_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def image_input(c=1, h=16, w=16):
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])


def no_classifier(path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.ones(36).tolist())
    return small_model(
        path, [helper.make_node("Conv", ["input", "w"], ["y"])], [image_input()], [w]
    )


def unknown_domain(path):
    node = helper.make_node("Frobnicate", ["input"], ["y"], domain="com.example")
    return small_model(path, [node], [image_input()], (), [helper.make_opsetid("com.example", 1)])


def quantized(path):
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", TensorProto.UINT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    return small_model(path, nodes, [image_input()], [s, z])


def four_channel_input(path):
    model = onnx.load(SAMPLE)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value = 4
    onnx.save_model(model, path)
    return path


def truncated(path):
    data = SAMPLE.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def missing_data(path):
    onnx.save_model(
        onnx.load(SAMPLE), path, save_as_external_data=True, location="gone.data",
        size_threshold=0,
    )  # fmt: skip
    (path.parent / "gone.data").unlink()
    return path


def images(folder, good=0, bad=0):
    folder.mkdir()
    for i, f in enumerate(sorted(p for p in CALIB.rglob("*.png"))[:good]):
        (folder / f"{i}.png").write_bytes(f.read_bytes())
    for i in range(bad):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.txt").write_text("not an image")
    return folder


def arrays(path, **arrays):
    np.savez(path, **arrays)
    return path


X = np.random.default_rng(0).random((40, 1, 16, 16), dtype=np.float32)
BAD_INPUT = {
    "a directory": (lambda d: d, None, "is a directory, not an ONNX file"),
    "truncated file": (lambda d: truncated(d / "t.onnx"), None, "the file is truncated"),
    "missing external data": (
        lambda d: missing_data(d / "m.onnx"),
        None,
        "external data file gone.data is missing",
    ),
    "unknown domain": (lambda d: unknown_domain(d / "u.onnx"), None, "op domain 'com.example'"),
    "quantized": (lambda d: quantized(d / "q.onnx"), None, "quantized model; prune the float"),
    "no classifier": (lambda d: no_classifier(d / "n.onnx"), None, "--frl TENSOR"),
    "channels do not fit": (
        lambda d: four_channel_input(d / "c.onnx"),
        None,
        "has 4 channels but --color",
    ),
    "all images corrupt": (None, lambda d: images(d / "i", bad=3), "none of the images could"),
    "too few images": (
        None,
        lambda d: images(d / "i", good=10, bad=1),
        "--num-samples 64 asked for, but only 11",
    ),
    "npz with wrong names": (
        None,
        lambda d: arrays(d / "a.npz", image=X),
        "calibration data has arrays ['image']",
    ),
    "npz with wrong shapes": (
        None,
        lambda d: arrays(d / "a.npz", input=X[:, :, :8]),
        "has shape [32, 1, 8, 16] but the model expects",
    ),
    "NaN outputs": (
        None,
        lambda d: arrays(d / "a.npz", input=np.full_like(X, np.nan)),
        "NaN or Inf on calibration batch 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line(tmp_path, capsys, case):
    make_model, make_calib, message = BAD_INPUT[case]
    (tmp_path / "work").mkdir()
    model = make_model(tmp_path / "work") if make_model else SAMPLE
    calib = make_calib(tmp_path / "work") if make_calib else CALIB
    before = {p: digest(p) for p in (tmp_path / "work").rglob("*") if p.is_file()}
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    samples = ["--num-samples", "64"] if case == "too few images" else []
    code, _, err = main(capsys, model, out, "--calib", calib, *samples, "--no-repair")
    assert code == EXIT_USER and message in one_error(err)
    assert list(out.parent.iterdir()) == []
    assert {p: digest(p) for p in (tmp_path / "work").rglob("*") if p.is_file()} == before


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, capsys, caplog):
    calib = images(tmp_path / "i", good=40, bad=2)
    out = tmp_path / "o.onnx"
    code, _, _ = main(capsys, SAMPLE, out, "--calib", calib, *FAST[2:])
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert code == 0 and out.exists() and len(skipped) == 2 and "bad0.png" in skipped[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-agreement", "1.5"], "--min-agreement is a fraction in [0, 1]"),
        (["--holdout", "1"], "--holdout must be in [0, 1)"),
        (["--holdout", "0.001"], "cannot be split into calibration and held-back"),
        (["--size", "8", "8"], "has shape [32, 1, 8, 8] but the model expects"),
    ],
)
def test_bad_flags(tmp_path, capsys, args, message):
    code, _, err = main(capsys, SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, *FAST, *args)
    assert code == EXIT_USER and message in one_error(err)
    assert not list(tmp_path.iterdir())


def test_output_folder_missing(tmp_path, capsys):
    out = tmp_path / "nowhere" / "o.onnx"
    code, _, err = main(capsys, SAMPLE, out, "--calib", CALIB, *FAST)
    assert code == EXIT_USER and "output folder" in one_error(err)


def test_the_full_checker_runs_on_the_written_model(tmp_path, monkeypatch):
    """The model written is the one `onnx.checker` checked in full (a spy on the real one)."""
    checked, real = [], onnx.checker.check_model

    def spy(model, *args, **kwargs):
        if kwargs.get("full_check"):
            checked.append(onnx.ModelProto.FromString(model.SerializeToString()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    out = tmp_path / "out.onnx"
    reader = nisp_onnx.ImageFolderReader(
        CALIB, "input", nisp_onnx.Preprocess(size=(16, 16), color="gray"), 32, 64
    )
    nisp_onnx.prune(SAMPLE, out, reader, 0.5)
    written = onnx.load(out)
    assert any(c.graph == written.graph for c in checked)
