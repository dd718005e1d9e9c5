"""Safe defaults: the largest cut at the agreement floor, honest numbers, one truth in the CLI."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from test_cli import CALIB, ROOT, SAMPLE, cli

from nisp_onnx import ImageFolderReader, NispError, Preprocess, Report, prune
from nisp_onnx.cli import _parser
from nisp_onnx.errors import NispError as _Err
from nisp_onnx.latency import Latency
from nisp_onnx.search import LOWEST, PROBES, largest_cut


def reader():
    return ImageFolderReader(CALIB, "input", Preprocess(size=(16, 16), color="gray"), 32, 360)


# --- the search, on known curves ---------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.62, 0.9])
def test_search_keeps_largest_passing_cut(threshold):
    """Agreement falls linearly with the cut; the kept cut is the largest probe at the floor
    and lies within the bisection's resolution of where the curve crosses it."""

    def evaluate(target):
        cut = 1 - target
        return cut, 1 - 0.1 * cut / threshold, f"model at {target}"

    found = largest_cut(evaluate, floor=0.9)
    passing = [p for p in found.probes if p.passed]
    assert len(found.probes) == PROBES
    assert all(p.agreement >= 0.9 for p in passing)
    assert all(p.agreement < 0.9 for p in found.probes if not p.passed)
    best = max(passing, key=lambda p: p.macs_reduction)
    assert found.best == f"model at {best.target_macs}" and found.kept is best
    assert threshold - (1 - LOWEST) / 2**PROBES <= best.macs_reduction <= threshold + 1e-9
    assert [p.target_macs for p in found.probes] == sorted(
        (p.target_macs for p in found.probes), reverse=True
    )


def test_search_counts_unreachable_as_failed_and_may_find_nothing():
    def evaluate(target):
        if target < 0.6:
            raise _Err("unreachable")
        return 1 - target, 0.5, object()

    found = largest_cut(evaluate, floor=0.99)
    assert found.best is None and found.kept is None
    assert any(p.agreement is None for p in found.probes)


# --- the default mode on the bundled sample ------------------------------------------------


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """The default mode without its speed check, whose timings of this tiny model are noise
    on a busy machine (the check has its own tests below)."""
    out = tmp_path_factory.mktemp("auto") / "pruned.onnx"
    report = prune(SAMPLE, out, reader(), min_agreement=0.9, speed_check=False)
    return out, report


def test_default_mode_keeps_the_floor_on_held_back_inputs(auto_run):
    out, report = auto_run
    assert report.mode == "auto" and report.ratio is None and report.min_agreement == 0.9
    assert report.held_out == 72 and report.samples == 288 and len(report.held_back) == 72
    assert report.agreement >= 0.9 and report.macs_reduction > 0.2
    passed = [p for p in report.search if p["passed"]]
    (kept,) = [p for p in report.search if p["kept"]]
    assert kept["macs_reduction"] == max(p["macs_reduction"] for p in passed)
    assert kept["macs_reduction"] == pytest.approx(report.macs_reduction, abs=0.01)
    assert report.sensitivity_samples == 32 and "first 32 also for sensitivity" in report.summary()
    failed = [p for p in report.search if not p["passed"]]
    assert all(p["macs_reduction"] is None or p["agreement"] < 0.9 for p in failed)
    assert [g.name for g in report.gates] == ["--min-agreement"] and report.passed


def test_summary_numbers_match_an_independent_evaluation(auto_run):
    """The written file, run on the held-back positions the report names, agrees with the
    original exactly as often as the report says."""
    out, report = auto_run
    x = np.concatenate([b["input"] for b in iter(reader().get_next, None)])
    held = x[report.held_back]
    runs = [ort.InferenceSession(str(m)).run(None, {"input": held})[0] for m in (SAMPLE, out)]
    agreement = (runs[0].argmax(1) == runs[1].argmax(1)).mean()
    assert agreement == pytest.approx(report.agreement)
    assert f"{100 * report.agreement:.1f}%" in report.summary()
    assert "72 held-back inputs (which chose the cut)" in report.summary()


def test_default_mode_needs_inputs_to_hold_back():
    few = ImageFolderReader(CALIB, "input", Preprocess(size=(16, 16), color="gray"), 8, 16)
    with pytest.raises(NispError, match="too few for the default mode"):
        prune(SAMPLE, None, few)
    with pytest.raises(NispError, match="--holdout 0: the default mode"):
        prune(SAMPLE, None, reader(), holdout=0)


def test_nothing_passing_writes_the_model_unpruned(tmp_path, monkeypatch):
    monkeypatch.setattr("nisp_onnx.search.PROBES", 1)  # one probe: half the MACs, unrepaired
    report = prune(SAMPLE, tmp_path / "o.onnx", reader(), min_agreement=1.0, repair="none")
    assert report.macs_after == report.macs_before and report.agreement == 1.0
    assert report.warnings and "written unpruned" in report.warnings[0]
    assert report.summary().startswith("warning: no cut tried kept")


# --- honest numbers --------------------------------------------------------------------------


def test_ratio_mode_measures_on_held_back_inputs_by_default(tmp_path):
    report = prune(SAMPLE, None, reader(), 0.3)
    assert report.held_out == 72 and report.mode == "ratio" and not report.gates
    assert report.sensitivity_samples == 0 and "sensitivity" not in report.summary()
    assert "72 held-back inputs:" in report.summary()
    assert "No quality gates were set; model" in report.markdown()
    assert "Quality gates passed" not in report.markdown()


def test_measuring_on_seen_inputs_and_low_agreement_are_warned_first():
    report = prune(SAMPLE, None, reader(), 0.9, holdout=0, repair="none")
    assert report.agreement < 0.9
    first, second = report.summary().splitlines()[:2]
    assert first.startswith("warning: agreement and accuracy are measured on the 360")
    assert second.startswith("warning: the pruned model agrees with the original on only")
    assert report.markdown().startswith("> **Warning:** agreement and accuracy")


def test_percentages_carry_one_sign():
    r = Report("a.onnx", "b.onnx", 0.3, "nisp-infs", "f", 10, macs_before=100, macs_after=70)
    batch = dict(batch_size=1, threads=1, original_ms=10.0, pruned_ms=15.24, reduction=-0.524)
    r.benchmark = {"threads": 1, "batches": [batch]}
    text = r.summary()
    assert "(-30.0%)" in text and "10.00 ms -> 15.24 ms (+52.4%)" in text and "--" not in text
    md = r.markdown()
    assert "| -30.0% |" in md and "| +52.4% |" in md


def test_report_records_mode_and_targets(tmp_path):
    path = tmp_path / "r.json"
    r = cli(SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, "--target-macs", "0.7", "--report", path)
    assert r.returncode == 0, r.stderr
    data = json.loads(path.read_text())
    assert data["mode"] == "target-macs" and data["target_macs"] == 0.7 and data["ratio"] is None
    assert data["version"] == 3 and data["held_out"] > 0


def test_prune_refuses_to_overwrite(tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(NispError, match="already exists; pass overwrite=True"):
        prune(SAMPLE, out, reader(), 0.3)
    assert out.read_bytes() == b"keep me"
    prune(SAMPLE, out, reader(), 0.3, overwrite=True)
    assert out.stat().st_size > 1000


# --- one truth: --help, the README, --dry-run, -v ----------------------------------------------


def test_help_matches_the_readme_option_table():
    help_text = cli("--help").stdout
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| option | meaning |") : readme.index("### Exit codes")]
    documented = set(re.findall(r"`(--?[a-z][a-z-]*)", table))
    offered = {o for a in _parser()._actions for o in a.option_strings}
    offered -= {"-h", "--help", "--version"}
    assert all(o in help_text for o in offered)
    assert documented == offered, (documented - offered, offered - documented)
    assert "exit codes: 0 success; 2 user error" in help_text
    assert help_text.count("  nisp-onnx model.onnx pruned.onnx") == 2
    assert "(default 0.99)" in help_text and "default 0.2" in help_text


@pytest.mark.parametrize(
    "flags, note",
    [
        (["--target-macs", "0.7"], "--target-macs 0.7 chooses ratios from each group's"),
        (["--target-macs", "0.7", "--global"], "in the global ranking"),
        ([], "the default mode searches for the largest cut"),
        (["--ratio", "0.3", "--global"], "--global ranks channels by scores"),
    ],
)
def test_dry_run_says_what_it_cannot_plan(flags, note):
    r = cli(SAMPLE, "--dry-run", *flags)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("note: ") and note in r.stdout.splitlines()[0]


def test_dry_run_plans_the_ratio_it_is_given():
    r = cli(SAMPLE, "--dry-run", "--ratio", "0.25")
    assert not r.stdout.startswith("note:") and "ratio 0.25: keep" in r.stdout


def test_verbose_lists_every_group_with_all_its_nodes(tmp_path):
    r = cli(SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, "--ratio", "0.3", "-v")
    assert r.returncode == 0, r.stderr
    report = prune(SAMPLE, None, reader(), 0.3)
    for g in report.groups:
        assert f"group {g.id}: kept {g.kept}/{g.channels}: {', '.join(g.nodes)}" in r.stdout
    assert f"final response layer: {report.frl}" in r.stdout


def test_progress_is_one_line_per_stage_without_a_terminal(tmp_path):
    r = cli(SAMPLE, tmp_path / "o.onnx", "--calib", CALIB, "--target-macs", "0.7")
    lines = r.stderr.splitlines()
    for stage in ("calibration", "sensitivity", "repair"):
        assert sum(line.startswith(f"{stage}: done") for line in lines) == 1, r.stderr
    quiet = cli(SAMPLE, tmp_path / "q.onnx", "--calib", CALIB, "--ratio", "0.3", "-q")
    assert quiet.stderr == "" and quiet.stdout == ""


# --- inputs checked ------------------------------------------------------------------------


def test_missing_calibration_path_says_it_does_not_exist(tmp_path):
    r = cli(SAMPLE, tmp_path / "o.onnx", "--calib", tmp_path / "nope")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "nope: --calib path does not exist" in r.stderr and not (tmp_path / "o.onnx").exists()


def _images(folder, n, size, mode):
    folder.mkdir()
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return folder


def test_gray_images_for_a_colour_model_are_converted_with_one_line(tmp_path, caplog):
    folder = _images(tmp_path / "gray", 5, (20, 20), "L")
    rd = ImageFolderReader(folder, "x", Preprocess(size=(16, 16), color="rgb"), 2)
    with caplog.at_level("WARNING", logger="nisp_onnx"):
        batches = list(iter(rd.get_next, None))
    assert sum(len(b["x"]) for b in batches) == 5 and batches[0]["x"].shape[1:] == (3, 16, 16)
    x = batches[0]["x"][0]
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "converted 5 image(s) to RGB, the model input's colour; check that these "
        "are the images meant for this model"
    ]


def test_colour_images_for_the_gray_sample_are_converted_on_the_cli(tmp_path):
    folder = _images(tmp_path / "rgb", 12, (16, 16), "RGB")
    r = cli(SAMPLE, tmp_path / "o.onnx", "--calib", folder, "--ratio", "0.3", "--holdout", "0")
    assert r.returncode == 0, r.stderr
    assert sum("converted 12 image(s) to gray" in line for line in r.stderr.splitlines()) == 1


def test_far_too_small_images_are_refused(tmp_path, caplog):
    tiny = _images(tmp_path / "tiny", 4, (3, 2), "L")
    r = cli(SAMPLE, tmp_path / "o.onnx", "--calib", tiny, "--ratio", "0.3")
    errors = [line for line in r.stderr.splitlines() if line.startswith("nisp-onnx: error")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert "all 4 image(s) far smaller than the model's 16x16 input (e.g. 0.png (3x2))" in r.stderr
    assert not (tmp_path / "o.onnx").exists()
    mixed = _images(tmp_path / "mixed", 3, (16, 16), "L")
    Image.fromarray(np.zeros((2, 3), np.uint8), "L").save(mixed / "small.png")
    rd = ImageFolderReader(mixed, "x", Preprocess(size=(16, 16), color="gray"), 8)
    with caplog.at_level("WARNING", logger="nisp_onnx"):
        assert len(rd.get_next()["x"]) == 3 and rd.get_next() is None
    assert [r.getMessage() for r in caplog.records] == [
        "skipped 1 image(s) far smaller than the model's 16x16 input (e.g. small.png (3x2))"
    ]


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_model_says_truncated(tmp_path, keep):
    data = SAMPLE.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * keep)])
    r = cli(cut, tmp_path / "o.onnx", "--calib", CALIB)
    assert r.returncode == 2 and "the file is truncated" in r.stderr, r.stderr
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 40)
    r = cli(garbage, tmp_path / "o.onnx", "--calib", CALIB)
    assert (
        r.returncode == 2
        and "the file is truncated" not in r.stderr
        and "not a valid ONNX" in r.stderr
    )


def test_default_mode_plan_names_its_floor_not_a_ratio():
    from nisp_onnx.budget import Plan

    plan = Plan(0.0, {"stage3*": 0.2}, global_ranking=True, round_to=8)
    text = plan.describe("largest cut at agreement >= 0.99")
    assert text == "largest cut at agreement >= 0.99, stage3*=0.2, multiples of 8"
    assert plan.describe().startswith("global ratio 0.0")


# --- the speed check -----------------------------------------------------------------------


def test_default_mode_times_the_kept_cut():
    """The kept cut is timed against the original, and what is written follows the timing:
    the cut when it was not slower, else the model unpruned with a warning."""
    report = prune(SAMPLE, None, reader(), min_agreement=0.9)
    check = report.speed_check
    assert check["batch_size"] == 1 and check["threads"] == 1 and check["runs"] >= 5
    assert "speed check (batch 1, 1 thread)" in report.summary()
    slower = check["pruned_ms"] > check["original_ms"]
    assert (report.macs_reduction == 0) == slower
    assert any("runs slower than the original" in w for w in report.warnings) == slower


@pytest.mark.parametrize("check", [True, False])
def test_a_slower_cut_is_written_unpruned(tmp_path, monkeypatch, check):
    timed = []

    def slower(original, pruned, *args):
        timed.append(pruned)
        return [Latency(1, 1, 1.0, 1.5, 5)]

    monkeypatch.setattr("nisp_onnx.api.compare", slower)
    out = tmp_path / "o.onnx"
    report = prune(SAMPLE, out, reader(), min_agreement=0.9, speed_check=check)
    if check:
        assert len(timed) == 1 and report.speed_check["pruned_ms"] == 1.5
        assert report.macs_after == report.macs_before and report.agreement == 1.0
        assert "runs slower than the original at batch 1 (1.00 ms -> 1.50 ms)" in report.warnings[0]
        assert "written unpruned" in report.summary().splitlines()[0]
        original = ort.InferenceSession(str(SAMPLE)).get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((2, *original.shape[1:])).astype(np.float32)
        runs = [ort.InferenceSession(str(m)).run(None, {"input": x})[0] for m in (SAMPLE, out)]
        np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    else:
        assert not timed and report.speed_check is None and report.macs_reduction > 0.2
        assert not report.warnings
