"""Prune every real model of ../shared/data and measure MACs, parameters and top-1.

    python tools/bench_shared.py --ratio 0.5 --repair none > table.md

Calibration and evaluation inputs are disjoint (see tools/shared_data.py). With `--repair none`
this is the raw effect of cutting the channels; tools/bench_accuracy.py compares repairs.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402

from nisp_onnx import ArrayReader, prune  # noqa: E402


def top1(path, name, x, batch):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(x) - len(x) % batch
    out = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, n, batch)]
    return np.concatenate(out).reshape(n, -1).argmax(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repair", default="ls", choices=["ls", "bias", "none"])
    args = ap.parse_args()
    print(
        "| model | MACs before | MACs after | MACs cut | params cut | valid | "
        "top-1 before | top-1 after | agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, inp, batch, cal, x, y in shared_data.models():
            out = Path(tmp) / "pruned.onnx"
            reader = ArrayReader({inp: cal}, [inp], batch)
            r = prune(path, out, reader, args.ratio, repair=args.repair)
            onnx.checker.check_model(onnx.load(out), full_check=True)
            before, after = top1(path, inp, x, batch), top1(out, inp, x, batch)
            y = y[: len(before)]
            print(
                f"| {name} | {r.macs_before / 1e6:.2f} M | {r.macs_after / 1e6:.2f} M | "
                f"{100 * r.macs_reduction:.1f}% | {100 * r.params_reduction:.1f}% | yes | "
                f"{100 * (before == y).mean():.1f}% | {100 * (after == y).mean():.1f}% | "
                f"{100 * (before == after).mean():.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
