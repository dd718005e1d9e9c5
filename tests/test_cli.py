"""The command line on the bundled sample, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits_resnet.onnx"
CALIB = ROOT / "models" / "digits_calib"


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nisp_onnx", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_prunes_bundled_sample(tmp_path):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    r = cli(SAMPLE, out, "--calib", CALIB, "--ratio", "0.5", "--report", report)
    assert r.returncode == 0, r.stderr
    assert "MACs" in r.stdout and "preprocessing: resize to 16x16, gray" in r.stderr
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["version"] == 3 and data["samples"] + data["held_out"] == 360
    assert 0.6 < data["macs_reduction"] < 0.9
    assert data["accuracy_before"] > 0.85
    assert data["repair"] == "ls" and data["criterion"] == "nisp-infs" and data["layers"]
    assert all(la["error_after"] <= la["error_before"] for la in data["layers"])
    x = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": x})[0].shape == (3, 10)


def test_criterion_and_no_repair_flags(tmp_path):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    args = ["--ratio", "0.3", "--criterion", "l1", "--no-repair", "--num-samples", "64"]
    r = cli(SAMPLE, out, "--calib", CALIB, *args, "--report", report)
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    assert data["criterion"] == "l1" and data["repair"] == "none" and data["layers"] == []
    assert "refitted" not in r.stdout


def test_ratio_zero_keeps_the_function(tmp_path):
    out = tmp_path / "same.onnx"
    r = cli(SAMPLE, out, "--calib", CALIB, "--ratio", "0", "-q", "--num-samples", "40")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)
    before = ort.InferenceSession(str(SAMPLE)).run(None, {"input": x})[0]
    after = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx", "OUT", "--calib", CALIB], "missing.onnx: no such file"),
        ([SAMPLE, "OUT", "--calib", "EMPTY"], "no images found"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--ratio", "1"], "--ratio must be in [0, 1)"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--ratio", "-0.1"], "--ratio must be in [0, 1)"),
        ([SAMPLE, "OUT", "--calib", "NOTHERE"], "--calib path does not exist"),
        (["NOTONNX", "OUT", "--calib", CALIB], "not a valid ONNX file"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--frl", "nope"], "'nope': the model has no tensor"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--criterion", "magic"], "invalid choice: 'magic'"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--layer-ratio", "conv"], "expected PATTERN=R"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--layer-ratio", "*=2"], "must be in [0, 1)"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--target-macs", "0"], "--target-macs is the"),
        ([SAMPLE, "OUT", "--calib", CALIB, "--round-to", "0"], "--round-to must be"),
        ([SAMPLE, "OUT"], "give the output model and --calib"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOTONNX").write_bytes(b"this is not a model")
    subst = {
        "OUT": tmp_path / "out.onnx",
        "EMPTY": tmp_path / "EMPTY",
        "NOTHERE": tmp_path / "nothere",
        "NOTONNX": tmp_path / "NOTONNX",
    }
    r = cli(*[subst.get(a, a) if isinstance(a, str) else a for a in args])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("nisp-onnx: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()
    assert not list(tmp_path.glob(".out.onnx*"))


def test_target_macs_and_round_to(tmp_path):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    args = ["--target-macs", "0.5", "--round-to", "2", "--num-samples", "64", "--no-repair"]
    r = cli(SAMPLE, out, "--calib", CALIB, *args, "--report", report)
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    assert abs(data["macs_reduction"] - 0.5) < 0.05 and "target MACs 0.5" in data["plan"]
    assert all(g["kept"] % 2 == 0 for g in data["groups"] if g["kept"] < g["channels"])


def test_dry_run_writes_nothing(tmp_path):
    r = cli(SAMPLE, tmp_path / "never.onnx", "--dry-run", "--ratio", "0.5")
    assert r.returncode == 0, r.stderr
    assert "channel groups" in r.stdout and "saves" in r.stdout and "frozen" in r.stdout
    assert "all groups together" in r.stdout and not list(tmp_path.iterdir())
