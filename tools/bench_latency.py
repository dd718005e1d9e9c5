"""Latency of the models nisp-onnx writes: onnxruntime CPU, before and after pruning.

    python tools/bench_latency.py                       # everything, ~20 min on 2 cores
    python tools/bench_latency.py --models resnet20 --ratios 0.5 --round-to 1 8 --threads 1
    python tools/bench_latency.py --profile             # also where the time goes, per op type

Models: full-size ResNet-50 and MobileNetV2 (random weights, TorchScript export, from
tools/architectures.py; build/models/<name>_torchscript.onnx, exported first when missing,
which needs torch 2.13.0 CPU and onnxscript in `--torch-python`, default this Python) and the
pretrained CIFAR-10 ResNet-20/32/44 of ../shared/data (skipped when absent). Each is pruned at
every `--ratios` and `--round-to` through the public API without repair (repair changes
weights, not shapes: latency is the same); full-size models calibrate on 32 random inputs
(only the channel counts matter here), CIFAR models on 256 real images.

Latency (`nisp_onnx.latency.compare`): one CPU session per model with a fixed number of
intra-op threads, the same random input, 2 warm-up runs each, then timed runs interleaved
(A B, B A, ...), at least 5 of each and 2 s; medians. The table gives the MACs cut, the
latency cut at batch 1 and 32, and their ratio (target: latency cut >= 0.8 x MACs cut).
Raw results go to `--json`; the Markdown table to stdout and `--out`.

`--profile` adds, for each model at the largest `--ratios` and smallest `--round-to`,
onnxruntime's per-node profile at each batch size (1 thread) summed by op type (depthwise
convolutions apart), and the node kinds of the optimised graph (NCHWc convolutions, layout
reorders, fused activations): where the latency does not fall as the MACs do, and why.
"""

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402

from nisp_onnx import ArrayReader, prune  # noqa: E402
from nisp_onnx.latency import compare  # noqa: E402

FULL = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2"}
CIFAR = {f"resnet{d}": f"ResNet-{d} (CIFAR)" for d in (20, 32, 44)}
MODELS = ROOT / "build" / "models"


def full_model(name, torch_python):
    """Path of the full-size export, made with tools/make_fixtures.py when missing."""
    path = MODELS / f"{name}_torchscript.onnx"
    if not path.exists():
        cmd = [torch_python, str(ROOT / "tools" / "make_fixtures.py"), name, "--only-full"]
        print(f"exporting {path.name}: {' '.join(cmd)} --exporter torchscript", file=sys.stderr)
        done = subprocess.run([*cmd, "--exporter", "torchscript"], cwd=ROOT)
        if done.returncode or not path.exists():
            sys.exit(
                f"could not export {path}: install torch==2.13.0 (CPU) and onnxscript, or pass "
                "--torch-python /path/to/python-with-torch"
            )
    return path


def models(names, torch_python):
    """(key, label, path, calibration inputs) per model asked for and available."""
    rng = np.random.default_rng(0)
    rows = []
    for key in names:
        if key in FULL:
            x = rng.standard_normal((32, 3, 224, 224)).astype(np.float32)
            rows.append((key, FULL[key], full_model(key, torch_python), x))
        elif not shared_data.available():
            print(f"skipping {key}: {shared_data.DATA} is absent", file=sys.stderr)
        else:
            calib, _, _ = shared_data.cifar(n_calib=256, n_eval=1)
            path = shared_data.DATA / "cifar10" / f"{key}.onnx"
            rows.append((key, CIFAR[key], path, calib))
    return rows


def optimized_graph(path, threads=1):
    """The graph onnxruntime runs after all its optimisations (layout changes, fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath, load_external_data=False)


def _kind(node):
    """domain:op, with the fused activation and 'depthwise' for grouped convolutions."""
    attrs = {a.name: a for a in node.attribute}
    kind = f"{node.domain + ':' if node.domain else ''}{node.op_type}"
    if "activation" in attrs:
        kind += "+" + attrs["activation"].s.decode()
    if node.op_type in ("Conv", "FusedConv") and attrs.get("group") and attrs["group"].i > 1:
        kind += " (depthwise)"
    return kind


def optimized_ops(path, threads=1):
    """How many nodes of each kind the optimised graph has."""
    return collections.Counter(_kind(n) for n in optimized_graph(path, threads).graph.node)


def op_profile(path, shape, threads=1, runs=5):
    """Milliseconds per run spent in each op type (onnxruntime's node profile)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        name = sess.get_inputs()[0].name
        for _ in range(2):
            sess.run(None, {name: x})
        sess.end_profiling()
        opts.profile_file_prefix = str(Path(tmp) / "timed")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):  # the first run is a warm-up, dropped below
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    depthwise = {
        n.name for n in optimized_graph(path, threads).graph.node if "depthwise" in _kind(n)
    }
    per_run = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    cutoff = per_run[0]["ts"] + per_run[0]["dur"] if per_run else 0
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > cutoff:
            node = e["name"][: -len("_kernel_time")]
            op = e["args"]["op_name"] + (" (depthwise)" if node in depthwise else "")
            by_op[op] += e["dur"] / 1000 / runs
    return by_op


def pct(x):
    return f"{100 * x:.1f}%"


def run(args):
    out_dir = ROOT / "build" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    results, profiles = [], []
    for key, label, path, calib in models(args.models, args.torch_python):
        size = calib.shape[2:]
        for ratio in args.ratios:
            for round_to in args.round_to:
                pruned = out_dir / f"{key}_r{ratio}_n{round_to}.onnx"
                start = time.perf_counter()
                report = prune(
                    path,
                    pruned,
                    ArrayReader({"input": calib}, ["input"], 32),
                    ratio,
                    repair="none",
                    round_to=round_to,
                )
                print(
                    f"{label} ratio {ratio} round-to {round_to}: MACs -"
                    f"{pct(report.macs_reduction)}, pruned in {time.perf_counter() - start:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                for threads in args.threads:
                    lat = compare(
                        path,
                        pruned,
                        {"input": (1, 3, *size)},
                        threads=threads,
                        batch_sizes=tuple(args.batch_sizes),
                        min_time_s=args.min_time,
                        min_runs=args.min_runs,
                    )
                    for r in lat:
                        print("  " + r.describe(), file=sys.stderr, flush=True)
                    results.append(
                        {
                            "model": label,
                            "ratio": ratio,
                            "round_to": round_to,
                            "macs_before": report.macs_before,
                            "macs_after": report.macs_after,
                            "macs_reduction": report.macs_reduction,
                            "threads": threads,
                            "latency": [r.to_dict() for r in lat],
                        }
                    )
        if args.profile:
            ratio = max(args.ratios)
            pruned = out_dir / f"{key}_r{ratio}_n{min(args.round_to)}.onnx"
            entry = {"model": label, "ratio": ratio, "round_to": min(args.round_to)}
            entry["ops_before"] = optimized_ops(path)
            entry["ops_after"] = optimized_ops(pruned)
            for batch in args.batch_sizes:
                shape = (batch, 3, *size)
                entry[f"ms_before_b{batch}"] = op_profile(path, shape)
                entry[f"ms_after_b{batch}"] = op_profile(pruned, shape)
            profiles.append(entry)
    return results, profiles


def table(results, batch_sizes, target):
    head = ["model", "ratio", "round-to", "MACs cut", "threads"]
    for b in batch_sizes:
        head += [f"b{b} ms before -> after", f"b{b} latency cut", f"b{b} cut / MACs cut"]
    head.append(f">= {target}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        row = [
            res["model"],
            f"{res['ratio']}",
            f"{res['round_to']}",
            pct(res["macs_reduction"]),
            f"{res['threads']}",
        ]
        ok = True
        by_batch = {r["batch_size"]: r for r in res["latency"]}
        for b in batch_sizes:
            r = by_batch.get(b)
            if r is None:
                row += ["-", "-", "-"]
                continue
            share = r["reduction"] / res["macs_reduction"] if res["macs_reduction"] else 0.0
            ok = ok and share >= target
            row += [
                f"{r['original_ms']:.2f} -> {r['pruned_ms']:.2f}",
                pct(r["reduction"]),
                f"{share:.2f}",
            ]
        row.append("yes" if ok else "**no**")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def profile_tables(profiles, batch_sizes):
    lines = []
    for p in profiles:
        lines.append(
            f"\n{p['model']}, ratio {p['ratio']}, round-to {p['round_to']}: milliseconds per "
            "run by op type (onnxruntime profile, 1 thread)\n"
        )
        head = ["op"]
        for b in batch_sizes:
            head += [f"b{b} before", f"b{b} after", f"b{b} cut"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ops = sorted(
            set().union(*(p[f"ms_{w}_b{b}"] for b in batch_sizes for w in ("before", "after"))),
            key=lambda op: -p[f"ms_before_b{batch_sizes[-1]}"].get(op, 0),
        )
        for op in [*ops, "total"]:
            row = [op]
            for b in batch_sizes:
                before, after = p[f"ms_before_b{b}"], p[f"ms_after_b{b}"]
                x = sum(before.values()) if op == "total" else before.get(op, 0.0)
                y = sum(after.values()) if op == "total" else after.get(op, 0.0)
                row += [f"{x:.2f}", f"{y:.2f}", pct(1 - y / x) if x else "-"]
            lines.append("| " + " | ".join(row) + " |")
        ops = sorted(set(p["ops_before"]) | set(p["ops_after"]))
        lines.append(
            "\nOptimised graph, nodes by op type (before -> after): "
            + ", ".join(
                f"{op} {p['ops_before'].get(op, 0)} -> {p['ops_after'].get(op, 0)}" for op in ops
            )
        )
    return "\n".join(lines)


def machine():
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next(
        (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
        "",
    ).split()
    simd = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags)
    return f"{cpu}, {os.cpu_count()} cores ({simd}), onnxruntime {ort.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*FULL, *CIFAR], choices=[*FULL, *CIFAR])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--round-to", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--min-runs", type=int, default=5, help="timed runs of each model")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--profile", action="store_true", help="per-op-type profile")
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "latency.json")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args()
    results, profiles = run(args)
    text = "\n".join(
        [
            f"Machine: {machine()}.",
            "",
            table(results, args.batch_sizes, args.target),
            profile_tables(profiles, args.batch_sizes),
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "profiles": profiles}, indent=1))


if __name__ == "__main__":
    main()
