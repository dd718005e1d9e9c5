"""The README's quick start, CI example and Python API example, run as written."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx

from nisp_onnx.errors import EXIT_GATE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def nisp_commands(text):
    """The `nisp-onnx ...` command lines of a block, as argument lists (tool name dropped)."""
    lines = [line.strip() for line in text.splitlines()]
    found = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part.split("#")[0])
            if words and words[0] == "nisp-onnx":
                found.append(words[1:])
    return found


def run(args, cwd):
    cmd = [sys.executable, "-m", "nisp_onnx", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def in_tmp(args, tmp_path):
    """Model and calibration paths from the repository, outputs into tmp_path."""
    fixed = []
    for a in args:
        if a.startswith("models/"):
            a = str(ROOT / a)
        elif a.endswith((".onnx", ".json", ".md")):
            a = str(tmp_path / Path(a).name)
        fixed.append(a)
    return fixed


def test_quick_start(tmp_path):
    (command,) = nisp_commands(blocks("bash")[0])
    r = run(in_tmp(command, tmp_path), tmp_path)
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout
    onnx.checker.check_model(str(tmp_path / "digits_pruned.onnx"), full_check=True)


def test_ci_example_passes_and_a_strict_gate_fails(tmp_path):
    (yaml,) = [b for b in blocks("yaml") if "nisp-onnx" in b]
    (command,) = nisp_commands(yaml)
    assert "--min-agreement" in command and "--summary-md" in command
    args = in_tmp(command, tmp_path)
    r = run(args, tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["written"] and all(g["passed"] for g in report["gates"])
    assert "Quality gates passed" in (tmp_path / "prune.md").read_text()
    strict = [*args, "--min-agreement", "0.99", "--force"]
    (tmp_path / "digits_pruned.onnx").unlink()
    r = run(strict, tmp_path)
    assert r.returncode == EXIT_GATE
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("nisp-onnx: quality gate failed: --min-agreement 0.99, measured")
    )
    assert not (tmp_path / "digits_pruned.onnx").exists()
    assert "**FAIL**" in (tmp_path / "prune.md").read_text()


def test_python_api_example(tmp_path):
    (example,) = [b for b in blocks("python") if "CalibrationDataReader" in b]
    (tmp_path / "models").symlink_to(ROOT / "models")
    code = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path
    )
    assert code.returncode == 0, code.stderr
    assert (tmp_path / "pruned.onnx").exists() and (tmp_path / "report.json").exists()
    assert "MACs" in code.stdout
