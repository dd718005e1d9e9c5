"""Accuracy benchmark: every criterion, with and without repair, on the real models.

    python tools/bench_accuracy.py > docs/accuracy.md
    python tools/bench_accuracy.py --models ResNet-32 --ratios 0.3 --methods nisp-infs
    python tools/bench_accuracy.py --models ResNet-32 --ratios= --targets 0.7,0.5
    python tools/bench_accuracy.py ... --set repair.SHORTCUTS=False   # an ablation
    python tools/bench_accuracy.py ... --cifar-draws 0,1,2,3   # 4 disjoint calibration sets
    python tools/bench_accuracy.py ... --cifar-orders 4   # each in 4 orders
    python tools/bench_accuracy.py ... --repair ls,ls+ft --finetune 1000   # fine-tuned rows

For each model of ../shared/data (calibration and evaluation inputs disjoint, see
tools/shared_data.py) and each ratio, every criterion prunes the same number of channels of
every group, so all of them land at the same MACs. A method `CRITERION@macs` instead uses
`--target-macs` set to the MACs the first uniform method kept at that ratio (same MACs,
ratios chosen per group from the global ranking); `CRITERION@global` uses `--global`;
`CRITERION@METHOD` removes as many channels from each group as METHOD (run before it) did
at the same setting, ranked by CRITERION: it separates a criterion's ranking within groups
from its allocation across them.
With `--targets F,..`, every method also runs with `--target-macs F` (row "MACs x F"):
ratios chosen by measured sensitivity, or by the global ranking for `CRITERION@global`.
Criteria that need labels get the calibration labels; a method that cannot run on a model
(bn-scale without BatchNorm) gets a row saying why. Columns: top-1 on the evaluation inputs,
top-1 agreement with the unpruned model, and WARE (Yu et al. 2018, Eq. 20) of the final
responses on the evaluation inputs, weighted by the Inf-FS scores of the unpruned model's
final responses. With several `--cifar-draws`, the CIFAR rows are repeated for each
disjoint draw of calibration images (and with `--cifar-orders`, in shuffled orders) and a
table of their means follows. A second table
compares the WARE of NISP and layer-by-layer Inf-FS over network depth (ResNet-20/32/44;
means over the draws).
"""

import argparse
import ast
import glob
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402

from nisp_onnx import (  # noqa: E402
    ArrayReader,
    FineTune,
    NispError,
    find_frl,
    infs_scores,
    load_model,
    prune,
)
from nisp_onnx.calibrate import session  # noqa: E402
from nisp_onnx.verify import ware  # noqa: E402

METHODS = ["random", "l1", "nisp-mag", "lbl", "nisp-infs"]
HEADER = (
    "| model | ratio | method | repair | MACs cut | params cut | top-1 | agreement | WARE |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def outputs(path, name, frl, x, batch):
    """(top-1, final responses [N, D]) over `x`, in batches of the model's batch size."""
    sess = session(load_model(path).proto, (frl,))
    first = sess.get_outputs()[0].name
    fixed = isinstance(sess.get_inputs()[0].shape[0], int)
    preds, resp = [], []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        n = len(xb)
        if fixed and n < batch:  # pad the last batch of a fixed-batch model
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
        out, r = sess.run([first, frl], {name: xb})
        preds.append(out.reshape(len(out), -1).argmax(1)[:n])
        resp.append(r.reshape(len(r), -1)[:n])
    return np.concatenate(preds), np.concatenate(resp)


def _cells(row) -> str:
    """Table cells of (MACs cut, params cut, top-1, agreement, WARE)."""
    macs, params, top1, agree, w = row
    return (
        f"{100 * macs:.1f}% | {100 * params:.1f}% | {100 * top1:.2f}% | {100 * agree:.1f}% "
        f"| {w:.3f}"
    )


def _runs(draws, orders, n_calib):
    """(draw, order, calibration labels, model row) to run: every model on the first draw in
    its own order, the CIFAR-10 models on every draw in every order (each draw loaded once)."""
    for d in draws:
        rows = shared_data.models(cifar_calib=n_calib, cifar_draw=d, cifar_only=d != draws[0])
        labels = {row[0]: shared_data.calib_labels(row[0]) for row in rows}
        for o in range(orders):
            for row in rows:
                if (d, o) == (draws[0], 0) or "ResNet" in row[0]:
                    yield d, o, labels[row[0]], row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="comma-separated model names (default: all)")
    ap.add_argument("--ratios", default="0.25,0.5,0.7")
    ap.add_argument("--targets", default="", help="fractions of MACs to keep, e.g. 0.7,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--repair",
        default="none,ls",
        help="comma-separated repair modes; MODE+ft also fine-tunes (--finetune, rows 'ls+ft')",
    )
    ap.add_argument("--finetune", default="1000", help="budget of the +ft rows")
    ap.add_argument("--finetune-lr", type=float, default=FineTune.lr)
    ap.add_argument("--augment", default="none", help="augmentation of the +ft rows")
    ap.add_argument("--feature-weight", type=float, default=FineTune.feature_weight)
    ap.add_argument("--cifar-calib", type=int, default=1024)
    ap.add_argument(
        "--cifar-draws",
        default="0",
        help="disjoint draws of the CIFAR-10 calibration images, e.g. 0,1,2,3: a row per draw, "
        "then their means",
    )
    ap.add_argument(
        "--cifar-orders",
        type=int,
        default=1,
        help="N: also run each CIFAR-10 draw with its images in N-1 shuffled orders (the "
        "order decides which images measure the damage of a MACs target)",
    )
    ap.add_argument("--round-to", type=int, default=1, help="nisp-onnx --round-to")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="override a constant of nisp_onnx for an ablation, e.g. repair.SHORTCUTS=False",
    )
    args = ap.parse_args()
    for item in args.set:
        where, _, value = item.partition("=")
        module, _, name = where.rpartition(".")
        target = importlib.import_module(f"nisp_onnx.{module}")
        if not hasattr(target, name):
            sys.exit(f"--set {item}: nisp_onnx.{module} has no {name}")
        setattr(target, name, ast.literal_eval(value))
    ratios = [float(r) for r in args.ratios.split(",") if r]
    targets = [float(t) for t in args.targets.split(",") if t]
    methods = args.methods.split(",")
    wanted = args.models.split(",") if args.models else None
    draws = [int(d) for d in args.cifar_draws.split(",")]
    if args.cifar_orders < 1:
        sys.exit("--cifar-orders: at least 1 (the images in their own order)")
    if not all(0 <= d < shared_data.cifar_draws(args.cifar_calib) for d in draws):
        sys.exit(
            f"--cifar-draws: CIFAR-10 has draws 0 to "
            f"{shared_data.cifar_draws(args.cifar_calib) - 1} of {args.cifar_calib} images"
        )
    print(f"Command: `python tools/bench_accuracy.py {' '.join(sys.argv[1:])}`".strip())
    print()
    print(HEADER)
    runs = {}  # (model, setting, method, repair): a row of numbers per calibration draw
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        for draw, order, labels, (name, path, inp, batch, cal, x, y) in _runs(
            draws, args.cifar_orders, args.cifar_calib
        ):
            if wanted and name not in wanted:
                continue
            cifar = "ResNet" in name
            if cifar and order:  # the same images in another order
                shuffle = np.random.default_rng(order).permutation(len(cal))
                cal, labels = cal[shuffle], labels[shuffle]
            label = name
            if cifar and len(draws) * args.cifar_orders > 1:
                label += f" #{draw}" + (f".{order}" if args.cifar_orders > 1 else "")
            frl = find_frl(load_model(path).graph())[0]
            _, cal_resp = outputs(path, inp, frl, cal, batch)
            scores = infs_scores(cal_resp)
            base, base_resp = outputs(path, inp, frl, x, batch)
            if (draw, order) == (draws[0], 0):
                print(
                    f"| {name} | 0 | unpruned | | 0% | 0% | {100 * (base == y).mean():.2f}% "
                    f"| 100% | 0 |",
                    flush=True,
                )
            settings = [(r, None) for r in ratios] + [(None, t) for t in targets]
            for ratio, target in settings:
                kept_macs, chosen = None, {}  # chosen: the per-group ratios of each method
                where = ratio if target is None else f"MACs x {target}"
                for method in methods:
                    criterion, _, alloc = method.partition("@")
                    for repair in args.repair.split(","):
                        start = time.perf_counter()
                        reader = ArrayReader({inp: cal}, [inp], batch, labels=labels)
                        kw = {"round_to": args.round_to}
                        if alloc == "global":
                            kw["global_ranking"] = True
                        if alloc == "macs":
                            kw["target_macs"] = kept_macs
                        other = chosen.get((alloc, repair))  # another method's ratios
                        if alloc not in ("", "macs", "global") and other is None:
                            print(
                                f"| {label} | {where} | {method} | {repair} | no {alloc} "
                                "run before it at this setting |||||"
                            )
                            continue
                        if target is not None and other is None:
                            kw["target_macs"] = target
                        if other is not None:
                            kw["layer_ratio"] = other
                        mode, _, tuned = repair.partition("+")
                        if tuned:
                            kw["finetune"] = FineTune(
                                args.finetune,
                                args.finetune_lr,
                                args.augment,
                                feature_weight=args.feature_weight,
                            )
                        try:
                            r = prune(
                                path,
                                out,
                                reader,
                                0.0 if other is not None else ratio or 0.5,
                                criterion=criterion,
                                repair=mode,
                                **kw,
                            )
                        except NispError as e:
                            print(f"| {label} | {where} | {method} | {repair} | {e} |||||")
                            continue
                        if not alloc and kept_macs is None:
                            kept_macs = r.macs_after / r.macs_before
                        chosen[method, repair] = {  # (ratios below 1: a Plan's bound)
                            glob.escape(g.nodes[0]): min(
                                (g.channels - g.kept) / max(g.channels - g.frozen, 1),
                                np.nextafter(1.0, 0.0),
                            )
                            for g in r.groups
                            if g.nodes
                        }
                        pred, resp = outputs(out, inp, frl, x, batch)
                        kept = np.asarray(r.frl_kept)
                        w = ware(base_resp[:, kept], resp, scores[kept])
                        row = (r.macs_reduction, r.params_reduction, (pred == y).mean())
                        row += ((pred == base).mean(), w)
                        runs.setdefault((name, where, method, repair), []).append(row)
                        print(
                            f"| {label} | {where} | {method} | {repair} | {_cells(row)} |",
                            flush=True,
                        )
                        print(
                            f"{label} {where} {method} {repair} {time.perf_counter() - start:.1f}s",
                            file=sys.stderr,
                            flush=True,
                        )
    if len(draws) * args.cifar_orders > 1:
        orders = f", each in {args.cifar_orders} orders" if args.cifar_orders > 1 else ""
        print()
        print(
            f"Means over the CIFAR-10 calibration draws {args.cifar_draws}{orders} "
            "(top-1: min-max):"
        )
        print()
        print(HEADER)
        for (name, where, method, repair), rows in runs.items():
            if len(rows) > 1:
                a = np.array(rows)
                low, high = 100 * a[:, 2].min(), 100 * a[:, 2].max()
                cells = _cells(a.mean(axis=0)).split(" | ")
                cells[2] += f" ({low:.2f}-{high:.2f})"
                print(f"| {name} | {where} | {method} | {repair} | {' | '.join(cells)} |")
    wares = {k: float(np.mean([row[4] for row in rows])) for k, rows in runs.items()}
    depth = [n for n in ("ResNet-20", "ResNet-32", "ResNet-44") if (n, 0.5, "lbl", "none") in wares]
    if depth:
        print()
        print("WARE of the final responses over depth, NISP vs layer-by-layer Inf-FS (LbL):")
        print()
        print("| model | ratio | repair | WARE LbL | WARE NISP |")
        print("|---|---|---|---|---|")
        for name in depth:
            for ratio in ratios:
                for repair in args.repair.split(","):
                    lbl = wares.get((name, ratio, "lbl", repair))
                    nisp = wares.get((name, ratio, "nisp-infs", repair))
                    if lbl is not None and nisp is not None:
                        print(f"| {name} | {ratio} | {repair} | {lbl:.3f} | {nisp:.3f} |")


if __name__ == "__main__":
    main()
