"""Fine-tuning benchmark: `prune(target_macs=F)` with and without `finetune` (needs ../shared/data).

    python tools/bench_finetune.py --models ResNet-20,ResNet-32 --target-macs 0.5,0.3 --budgets 1000
    python tools/bench_finetune.py --models "MobileNet-v1 0.25" --target-macs 0.7 --budgets 300 \\
        --augments flip-crop --feature-weights 0,1

Each model is pruned with `--target-macs` and least-squares repair on its calibration inputs
(CIFAR: 2,048 JPEGs; ImageNet: 100 images; MNIST: 1,000 digits), 20% of them held back to
choose the fine-tuning step on, then once more with each fine-tuning setting (budget x rate x
augmentation x feature weight). Printed per run: top-1 on the evaluation inputs (disjoint from
the calibration ones), agreement with the original there, the MACs cut, fine-tuning time, the
time of one training step (teacher included) against one forward pass of the pruned model on
the same batch, and the peak resident memory of the run.
"""

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402

from nisp_onnx import ArrayReader, FineTune, prune  # noqa: E402
from nisp_onnx.calibrate import predict, session  # noqa: E402


def forward_ms(model: onnx.ModelProto, batch: dict) -> float:
    sess = session(model)
    sess.run(None, batch)
    start = time.perf_counter()
    for _ in range(5):
        sess.run(None, batch)
    return 1000 * (time.perf_counter() - start) / 5


def bench(name, path, inp, batch, cal, x, y, args):
    teacher = onnx.load(path)
    fixed = teacher.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    chunk = fixed or min(250, len(x))
    evaluation = [{inp: x[i : i + chunk]} for i in range(0, len(x) - chunk + 1, chunk)]
    y = y[: len(evaluation) * chunk]
    original = predict(teacher, evaluation)
    print(f"| {name} | original | {100 * (original == y).mean():.2f}% | | | | | |", flush=True)
    settings = [None] + [
        FineTune(budget=b, lr=float(lr), augment=a, feature_weight=float(w), patience=args.patience)
        for b, lr, a, w in itertools.product(
            args.budgets.split(","),
            args.lrs.split(","),
            args.augments.split(","),
            args.feature_weights.split(","),
        )
    ]
    for target, tuning in itertools.product(map(float, args.target_macs.split(",")), settings):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.onnx"
            reader = ArrayReader({inp: cal}, [inp], args.batch or batch)
            report = prune(path, out, reader, target_macs=target, finetune=tuning)
            model = onnx.load(out)
        p = predict(model, evaluation)
        peak = max(report.memory.values())
        run = f"--target-macs {target:g}"
        cost = " | "  # fine-tune time, step / forward
        if tuning is not None:
            f = report.finetune
            run += (
                f" --finetune {tuning.budget} --finetune-lr {tuning.lr:g} --augment "
                f"{tuning.augment} --feature-weight {tuning.feature_weight:g}"
                f" (step {f['kept_step']}/{f['steps']} kept, loss "
                f"{f['loss_first']:.3f} -> {f['loss_last']:.3f})"
            )
            if args.patience != FineTune.patience:
                run += f", patience {args.patience}"
            if args.pooled_features and tuning.feature_weight:
                run += ", features after pooling"
            fwd = forward_ms(model, {inp: cal[: args.batch or batch]})
            ratio = f["step_ms"] / fwd
            cost = f"{f['seconds']:.0f} s | {f['step_ms']:.0f} / {fwd:.0f} ms = {ratio:.1f}x"
        print(
            f"| {name} | {run} | {100 * (p == y).mean():.2f}% | "
            f"{100 * (p == original).mean():.1f}% "
            f"| {100 * report.macs_reduction:.1f}% | {cost} | {peak:,.0f} MiB |",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="ResNet-20", help="comma-separated names")
    ap.add_argument("--target-macs", default="0.5", help="comma-separated fractions")
    ap.add_argument("--budgets", default="2000", help="comma-separated --finetune budgets")
    ap.add_argument("--lrs", default=str(FineTune.lr), help="comma-separated Adam rates")
    ap.add_argument("--augments", default=FineTune.augment, help="comma-separated augmentations")
    ap.add_argument("--feature-weights", default=str(FineTune.feature_weight))
    ap.add_argument("--patience", type=int, default=FineTune.patience, help="0: no early stop")
    ap.add_argument("--pooled-features", action="store_true", help="MSE after global pooling")
    ap.add_argument("--batch", type=int, help="calibration batch (default: the model's own)")
    ap.add_argument("--cifar-draw", type=int, default=0)
    args = ap.parse_args()
    if not shared_data.available():
        sys.exit("needs ../shared/data")
    names = set(args.models.split(","))
    print("| model | run | top-1 | agreement | MACs cut | fine-tune | step / forward | peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in shared_data.models(cifar_calib=2048, cifar_draw=args.cifar_draw):
        if row[0] in names:
            bench(*row, args)


if __name__ == "__main__":
    main()
