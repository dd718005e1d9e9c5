"""Distillation from the repaired start on the shared CIFAR ResNets (needs ../shared/data).

    python tools/bench_finetune.py --models ResNet-20 --steps 300 --lr 1e-4,3e-4

Each model is pruned with `--target-macs` (default 0.5) and least-squares repair on its 2,048
calibration JPEGs, then `finetune.distil` trains it against the original on those inputs in
batches of 64. Printed: top-1 on the 1,017 lossless evaluation images of the original, the
repaired start and each fine-tuned run, agreement with the original, and the time of one
training step (teacher forward included) against one forward pass of the pruned model on
the same batch.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402

from nisp_onnx import ArrayReader, prune  # noqa: E402
from nisp_onnx.calibrate import predict, session  # noqa: E402
from nisp_onnx.finetune import distil  # noqa: E402

BATCH = 64


def bench(name, path, inp, cal, x, y, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        prune(path, out, ArrayReader({inp: cal}, [inp], BATCH), target_macs=args.target_macs)
        student, teacher = onnx.load(out), onnx.load(path)
    batches = [{inp: cal[i : i + BATCH]} for i in range(0, len(cal) - BATCH + 1, BATCH)]
    evaluation = [{inp: x[i : i + 256]} for i in range(0, len(x), 256)]
    original = predict(teacher, evaluation)
    sess = session(student)
    start = time.perf_counter()
    for b in batches[:10]:
        sess.run(None, b)
    forward = (time.perf_counter() - start) / 10

    def row(run, model, step=None):
        p = predict(model, evaluation)
        cost = " | " if step is None else f"{1000 * step:.0f} | {step / forward:.1f}x"
        print(
            f"| {name} | {run} | {100 * (p == y).mean():.2f}% | "
            f"{100 * (p == original).mean():.1f}% | {cost} |",
            flush=True,
        )

    row("original", teacher)
    row(f"repaired, --target-macs {args.target_macs}", student)
    for lr in map(float, args.lr.split(",")):
        start = time.perf_counter()
        trained = distil(student, teacher, batches, steps=args.steps, lr=lr)
        row(
            f"+ {args.steps} steps, Adam {lr:g}",
            trained.model,
            (time.perf_counter() - start) / args.steps,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="ResNet-20")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", default="1e-4,3e-4", help="comma-separated Adam rates")
    args = ap.parse_args()
    if not shared_data.available():
        sys.exit("needs ../shared/data")
    names = set(args.models.split(","))
    print("| model | run | top-1 | agreement | ms per step | step / forward |")
    print("|---|---|---:|---:|---:|---:|")
    for name, path, inp, _, cal, x, y in shared_data.models(cifar_calib=2048):
        if name in names:
            bench(name, path, inp, cal, x, y, args)


if __name__ == "__main__":
    main()
