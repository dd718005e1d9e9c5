"""What the default settings give on the shared pretrained models (needs ../shared/data).

    python tools/bench_defaults.py samples              # how many calibration inputs to use
    python tools/bench_defaults.py default              # the default command on every model
    python tools/bench_defaults.py default --models ResNet-20,LeNet-5

`samples`: ResNet-32 at `--target-macs 0.5` (other settings default: 20% held back) with
256 .. 2048 CIFAR-10 JPEG calibration images: wall time, peak memory and top-1 on the 1,017
lossless evaluation images. `default`: `prune()` with no ratio or target (the largest cut at
99% held-back agreement) on each model, with all its calibration inputs; the written file
is then evaluated independently on the held-back inputs the report names (agreement must
equal the report's), on the evaluation inputs (top-1, agreement), and timed against the
original at batch 1, one thread (medians, alternated). "cut found" is the search's kept cut
and its speed check (batch-1 latency change); a slower one is written unpruned.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402

from nisp_onnx import ArrayReader, prune  # noqa: E402
from nisp_onnx.latency import compare  # noqa: E402
from nisp_onnx.report import signed  # noqa: E402
from nisp_onnx.resources import measure  # noqa: E402


def top1(path, x, name, batch):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out).reshape(len(x), -1).argmax(1)


def samples(counts):
    print("| calibration inputs | held back | top-1 before | top-1 after | time | peak memory |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        ((name, path, inp, batch, cal, x, y),) = [
            r for r in shared_data.models(cifar_calib=n, cifar_only=True) if r[0] == "ResNet-32"
        ]
        with tempfile.TemporaryDirectory() as tmp, measure() as cost:
            out = Path(tmp) / "out.onnx"
            report = prune(path, out, ArrayReader({inp: cal}, [inp], batch), target_macs=0.5)
            before, after = top1(path, x, inp, batch), top1(out, x, inp, batch)
        print(
            f"| {n} | {report.held_out} | {100 * (before == y).mean():.2f}% | "
            f"{100 * (after == y).mean():.2f}% | {cost.seconds:.0f} s | {cost.peak_mib:,.0f} MiB |"
        )


def default(names):
    print(
        "| model | inputs (held back) | cut found: speed check | MACs cut | "
        "held-back agreement: report / rerun | top-1 before / after (eval) | eval agreement | "
        "batch-1 latency | time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, path, inp, batch, cal, x, y in shared_data.models(cifar_calib=2048):
        if names and name not in names:
            continue
        if name.startswith("MobileNet"):  # all 200 images: the search needs held-back ones
            cal, x, y = np.concatenate([cal, x]), x, y
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.onnx"
            report = prune(path, out, ArrayReader({inp: cal}, [inp], batch))
            seconds = time.perf_counter() - start
            held = cal[report.held_back]
            rerun = (top1(path, held, inp, batch) == top1(out, held, inp, batch)).mean()
            before, after = top1(path, x, inp, batch), top1(out, x, inp, batch)
            b = 10 if name == "LeNet-5" else 1  # LeNet-5 runs fixed batches of 10
            (lat,) = compare(path, out, {inp: (b, *x.shape[1:])}, 1, batch_sizes=(b,))
        kept = next((p for p in report.search if p["kept"]), None)
        check = report.speed_check
        found = "none" if kept is None else f"{100 * kept['macs_reduction']:.1f}%"
        if check is not None:
            found += f": {signed(-check['reduction'])}"
        print(
            f"| {name} | {len(cal)} ({report.held_out}) | {found} | "
            f"{100 * report.macs_reduction:.1f}% | "
            f"{100 * report.agreement:.1f}% / {100 * rerun:.1f}% | "
            f"{100 * (before == y).mean():.1f}% / {100 * (after == y).mean():.1f}% | "
            f"{100 * (before == after).mean():.1f}% | {lat.original_ms:.2f} -> "
            f"{lat.pruned_ms:.2f} ms ({-100 * lat.reduction:+.1f}%) | {seconds:.0f} s |",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["samples", "default"])
    ap.add_argument("--counts", default="256,512,1024,2048")
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    args = ap.parse_args()
    if not shared_data.available():
        sys.exit("needs ../shared/data")
    if args.what == "samples":
        samples([int(c) for c in args.counts.split(",")])
    else:
        default(set(filter(None, args.models.split(","))))


if __name__ == "__main__":
    main()
