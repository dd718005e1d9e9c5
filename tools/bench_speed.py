"""Speed and memory of nisp-onnx itself, against one plain onnxruntime pass over the same data.

    python tools/bench_speed.py                   # ResNet-50 and MobileNetV2, 3 rounds each
    python tools/bench_speed.py --models mobilenet_v2 --rounds 1 --no-repair-only
    python tools/bench_speed.py --sensitivity --models mobilenet_v2 --baseline /tmp/old

For each full-size model (random weights, build/models/<name>_torchscript.onnx, exported with
tools/make_fixtures.py when missing: needs torch 2.13.0 CPU and onnxscript in
`--torch-python`) and 256 random calibration inputs at 224x224 (build/bench/calib_224.npz,
seeded), three commands run, each in a fresh process, interleaved round by round:

- plain: one onnxruntime session (CPU, default options: all cores) over the 256 inputs in
  batches of 32, the way nisp-onnx batches them; its time is the pass alone (`run` calls),
  without starting Python or the session, so the targets below are the strict reading;
- `nisp-onnx MODEL OUT --calib calib_224.npz --ratio 0.5 --no-repair --report R.json`;
- the same with the default least-squares repair.

Wall time of each nisp-onnx process (start to exit), its peak resident memory (`ru_maxrss`
of that child, from `os.wait4`), and the per-stage times and peak memory of its JSON report
(`timings`, `memory`, when the report has them). Medians over `--rounds`. Targets (issue 6):
without repair at most 1.5 x plain + 10 s; with repair at most 4 x plain; peak memory under
3 GB for ResNet-50.

`--sensitivity` instead times `nisp-onnx MODEL OUT --calib calib_224.npz --target-macs 0.7
--num-samples 256` (repair ls) and compares its report's `sensitivity` and `rewrite and
repair` stages (target, issue 20: sensitivity at most as long as repair); with `--baseline
DIR` (a checkout of an older commit) the same command from DIR runs next to it each round.
A report without a `sensitivity` stage (older commits) counts its whole `select` stage.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import FULL, full_model, machine  # noqa: E402

OUT = ROOT / "build" / "bench"
SAMPLES, BATCH, SIZE = 256, 32, 224

PLAIN = """
import sys, time, numpy as np, onnxruntime as ort
x = np.load(sys.argv[2])["input"]
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
start = time.perf_counter()
for i in range(0, len(x), int(sys.argv[3])):
    sess.run(None, {"input": x[i : i + int(sys.argv[3])]})
print(time.perf_counter() - start)
"""


def calib_file():
    path = OUT / f"calib_{SIZE}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((SAMPLES, 3, SIZE, SIZE)).astype(np.float32)
        np.savez(path, input=x)
    return path


def _rss_mib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def timed(cmd, cwd=ROOT, env=None):
    """(wall seconds, peak RSS MiB, stdout) of one child process. The peak is the larger of
    its resident memory sampled every 20 ms and its `ru_maxrss` from os.wait4 (which only
    covers the time since the process last reset its high-water mark, as nisp-onnx does per
    stage)."""
    with open(OUT / "child.out", "w+b") as out, open(OUT / "child.err", "w+b") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        peak = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _rss_mib(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(
                f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err.read().decode()}"
            )
        return wall, max(peak, usage.ru_maxrss / 1024), out.read().decode()


def run(args):
    OUT.mkdir(parents=True, exist_ok=True)
    calib = calib_file()
    rows = {}
    for key in args.models:
        path = full_model(key, args.torch_python)
        plain = [sys.executable, "-c", PLAIN, str(path), str(calib), str(BATCH)]
        modes = ["none"] if args.no_repair_only else ["none", "ls"]
        runs = {"plain": [], **{m: [] for m in modes}}
        for i in range(args.rounds):
            order = ["plain", *modes]
            order = order[i % len(order) :] + order[: i % len(order)]  # rotate the order
            for what in order:
                if what == "plain":
                    wall, rss, out = timed(plain)
                    runs["plain"].append({"wall": wall, "pass": float(out.split()[-1]), "rss": rss})
                else:
                    report = OUT / f"speed_{key}_{what}.json"
                    output = OUT / f"speed_{key}_{what}.onnx"
                    for old in (report, output, output.with_name(output.name + ".data")):
                        old.unlink(missing_ok=True)
                    cmd = [
                        sys.executable,
                        "-m",
                        "nisp_onnx",
                        str(path),
                        str(output),
                        "--calib",
                        str(calib),
                        "--ratio",
                        "0.5",
                        "--repair",
                        what,
                        "--batch-size",
                        str(BATCH),
                        "--num-samples",
                        str(SAMPLES),
                        "--report",
                        str(report),
                        "-q",
                    ]
                    wall, rss, _ = timed(cmd)
                    rep = json.loads(report.read_text())
                    rss = max([rss, *rep.get("memory", {}).values()])
                    runs[what].append(
                        {
                            "wall": wall,
                            "rss": rss,
                            "timings": rep.get("timings", {}),
                            "memory": rep.get("memory", {}),
                        }
                    )
                print(
                    f"{FULL[key]} round {i + 1} {what}: {wall:.1f} s, {rss:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        rows[key] = runs
    return rows


def sensitivity_rows(args):
    """Per model and code version: the sensitivity and repair seconds of each round."""
    OUT.mkdir(parents=True, exist_ok=True)
    calib = calib_file()
    versions = {"this checkout": ROOT}
    if args.baseline:
        versions[f"baseline {args.baseline}"] = args.baseline.resolve()
    rows = {}
    for key in args.models:
        path = full_model(key, args.torch_python)
        runs = {v: [] for v in versions}
        for i in range(args.rounds):
            order = list(versions)[i % len(versions) :] + list(versions)[: i % len(versions)]
            for version in order:
                report, output = OUT / "sens.json", OUT / "sens.onnx"
                for old in (report, output):
                    old.unlink(missing_ok=True)
                cmd = [sys.executable, "-m", "nisp_onnx", str(path), str(output)]
                cmd += ["--calib", str(calib), "--target-macs", "0.7", "--num-samples"]
                cmd += [str(SAMPLES), "--report", str(report), "-q"]
                env = {**os.environ, "PYTHONPATH": str(versions[version])}
                wall, _, _ = timed(cmd, cwd=versions[version], env=env)
                t = json.loads(report.read_text())["timings"]
                runs[version].append(
                    {
                        "wall": wall,
                        "sensitivity": t.get("sensitivity", t["select"]),
                        "repair": t["rewrite and repair"],
                    }
                )
                print(f"{FULL[key]} round {i + 1} {version}: {runs[version][-1]}", file=sys.stderr)
        rows[key] = runs
    return rows


def sensitivity_table(rows):
    lines = [
        "| model | code | sensitivity | repair | sensitivity / repair (per round) | process |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, runs in rows.items():
        for version, rs in runs.items():
            ratios = ", ".join(f"{r['sensitivity'] / r['repair']:.2f}" for r in rs)
            lines.append(
                f"| {FULL[key]} | {version} | {median(rs, 'sensitivity'):.1f} s | "
                f"{median(rs, 'repair'):.1f} s | {ratios} | {median(rs, 'wall'):.1f} s |"
            )
    return "\n".join(lines)


def median(runs, field):
    return statistics.median(r[field] for r in runs)


def stage_median(runs, field, stage):
    values = [r[field][stage] for r in runs if stage in r[field]]
    return statistics.median(values) if values else None


def tables(rows):
    """Targets are judged round by round (each nisp-onnx run against the plain pass of the
    same round, run next to it), then the median over rounds is taken."""
    lines = [
        "| model | plain pass | nisp-onnx --no-repair | target 1.5 x plain + 10 s | "
        "nisp-onnx (repair ls) | target 4 x plain | peak memory --no-repair / repair | "
        "target < 3 GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in rows.items():
        plain = [r["pass"] for r in runs["plain"]]
        none = [r["wall"] for r in runs["none"]]
        over = statistics.median(n - (1.5 * p + 10) for n, p in zip(none, plain))
        ratios = ", ".join(f"{n / p:.2f}" for n, p in zip(none, plain))
        cells = [
            FULL[key],
            f"{statistics.median(plain):.1f} s",
            f"{statistics.median(none):.1f} s ({ratios} x)",
            "met" + (f" by {-over:.1f} s" if over < 0 else "")
            if over <= 0
            else f"**missed by {over:.1f} s**",
        ]
        rss = [median(runs["none"], "rss")]
        if "ls" in runs:
            ls = [r["wall"] for r in runs["ls"]]
            factor = statistics.median(x / p for x, p in zip(ls, plain))
            ratios = ", ".join(f"{x / p:.2f}" for x, p in zip(ls, plain))
            cells += [
                f"{statistics.median(ls):.1f} s ({ratios} x)",
                "met" if factor <= 4 else f"**missed: {factor:.1f} x, {factor / 4:.1f} x over**",
            ]
            rss.append(median(runs["ls"], "rss"))
        else:
            cells += ["-", "-"]
        peak = max(rss)
        cells += [
            " / ".join(f"{r:.0f} MiB" for r in rss),
            ("met" if peak * 2**20 < 3e9 else "**missed**") if key == "resnet50" else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for key, runs in rows.items():
        modes = [m for m in ("none", "ls") if m in runs]
        stages = list(dict.fromkeys(s for m in modes for r in runs[m] for s in r["timings"]))
        if not stages:
            continue
        lines += ["", f"{FULL[key]}, per stage (median seconds / peak MiB):", ""]
        head = ["stage"] + [f"{'no repair' if m == 'none' else 'repair ls'}" for m in modes]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for stage in [*stages, "process"]:
            row = [stage]
            for m in modes:
                if stage == "process":
                    t, mem = median(runs[m], "wall"), median(runs[m], "rss")
                else:
                    t = stage_median(runs[m], "timings", stage)
                    mem = stage_median(runs[m], "memory", stage)
                row.append(
                    "-" if t is None else f"{t:.2f} s" + ("" if mem is None else f" / {mem:.0f}")
                )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-repair-only", action="store_true")
    ap.add_argument("--sensitivity", action="store_true", help="time sensitivity against repair")
    ap.add_argument("--baseline", type=Path, help="with --sensitivity: an older checkout")
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--json", type=Path, default=OUT / "speed.json")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args()
    rows = sensitivity_rows(args) if args.sensitivity else run(args)
    text = f"Machine: {machine()}.\n\n{(sensitivity_table if args.sensitivity else tables)(rows)}"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
