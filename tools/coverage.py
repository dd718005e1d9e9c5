"""Graph coverage: prune every architecture from both exporters and write docs/coverage.md.

    python tools/coverage.py            # the fixtures in tests/fixtures
    python tools/coverage.py --full     # also the full-size models in build/models
                                        # (python tools/make_fixtures.py --only-full first)

Runs the real pipeline (`nisp_onnx.prune`, repair "none", random calibration inputs) at one
ratio and records per model: valid (full checker, onnxruntime session, output names and
shapes as before), MACs and parameters removed, and the frozen channel groups with reasons.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from nisp_onnx import prune

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
CNN_TARGET = 0.6


class RandomReader:
    """`count` batches of standard normal inputs shaped like the model's input."""

    def __init__(self, name: str, shape: list[int], count: int = 2, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.batches = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]

    def get_next(self) -> dict | None:
        return self.batches.pop(0) if self.batches else None


def _input(path: Path, batch: int) -> tuple[str, list[int]]:
    m = onnx.load(str(path), load_external_data=False)
    inp = m.graph.input[0]
    return inp.name, [d.dim_value or batch for d in inp.type.tensor_type.shape.dim]


def _outputs(path: Path, feed: dict) -> list[tuple[str, tuple]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [(n, v.shape) for n, v in zip(names, sess.run(names, feed))]


def _short(reason: str) -> str:
    """A reason without node and tensor names, to count like reasons together."""
    return re.sub(r"'[^']*'", "X", reason)


def run_one(path: Path, ratio: float, criterion: str, batch: int = 2) -> dict:
    name, shape = _input(path, batch)
    feed = RandomReader(name, shape, 1, seed=1).batches[0]
    row = {"model": path.stem, "valid": False}
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / path.name
            report = prune(
                str(path), out, RandomReader(name, shape), ratio, criterion=criterion, repair="none"
            )
            row["valid"] = _outputs(out, feed) == _outputs(path, feed)
    except Exception as e:  # a row of the table, not a crash of the tool
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return row
    frozen = [g for g in report.groups if g.frozen]
    outputs = [g for g in frozen if all("graph output" in r for r in g.reasons)]
    others = [g for g in frozen if g not in outputs]
    reasons: dict[str, list] = {}  # like reasons: [count, first example]
    for g in others:
        for r in g.reasons:
            if "graph output" not in r:
                reasons.setdefault(_short(r), [0, r])[0] += 1
    row.update(
        macs=report.macs_reduction,
        params=report.params_reduction,
        macs_before=report.macs_before,
        groups=len(report.groups),
        frozen=len(others),
        frozen_channels=sum(g.frozen for g in others),
        channels=sum(g.channels for g in report.groups),
        reasons=reasons,
        seconds=time.perf_counter() - start,
    )
    return row


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | exporter | valid | MACs | MACs removed | params removed "
        "| frozen groups (besides the classifier output) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        arch, exporter = r["model"].rsplit("_", 1)
        if "error" in r:
            lines.append(f"| {arch} | {exporter} | **no** | | | | {r['error']} |")
            continue
        cnn = arch != "vit_b_16"
        mark = " (below 60%)" if cnn and r["macs"] < CNN_TARGET else ""
        why = "; ".join(
            example + (f" (and {n - 1} alike)" if n > 1 else "")
            for n, example in sorted(r["reasons"].values(), key=lambda v: v[1])
        )
        frozen = f"{r['frozen']} ({r['frozen_channels']} of {r['channels']} channels): {why}"
        lines.append(
            f"| {arch} | {exporter} | {'yes' if r['valid'] else '**no**'} "
            f"| {r['macs_before'] / 1e6:.2f} M | {100 * r['macs']:.1f}%{mark} "
            f"| {100 * r['params']:.1f}% | {frozen if r['frozen'] else 'none'} |"
        )
    return lines


def _section(title: str, command: str, rows: list[dict], note: str) -> list[str]:
    valid = sum(r.get("valid", False) for r in rows)
    cnn = [r for r in rows if not r["model"].startswith("vit") and "macs" in r]
    low = sum(r["macs"] < CNN_TARGET for r in cnn)
    return [
        f"## {title}",
        "",
        note,
        "",
        f"`{command}`: {valid} of {len(rows)} valid; "
        f"{len(cnn) - low} of {len(cnn)} CNN rows remove at least 60% of MACs.",
        "",
        *_table(rows),
        "",
    ]


IDIOMS = [
    "## Exporter idioms (tests/test_idioms.py)",
    "",
    "Checked by function (the pruned model computes what the original computes with the "
    "removed channels zeroed) on small graphs and fixtures:",
    "",
    "- **Opsets 8 to 21**: two graphs written at opset 8 (one with every op whose parameters "
    "moved from attributes to inputs: Split, Clip, Pad, Slice, Dropout, ReduceMean, Squeeze, "
    "Unsqueeze) and converted by `onnx.version_converter` to each of 8..21. Of the fixtures, "
    "resnet18 and squeezenet (TorchScript, opset 17) convert to 14..21 and mobilenet_v2 "
    "(dynamo, opset 18) to 18..21: below that the converter has no adapters (Relu, Add "
    "below 14), and its ReduceMean adapter from 18 leaves an attribute opsets 14..17 reject.",
    "- **Fixed and dynamic batch**: the input keeps its fixed size or its symbol, and a "
    "dynamic model runs at other batch sizes after pruning, run-time shapes included.",
    "- **Conv bias as a separate Add** (`[1, C, 1, 1]` or `[C, 1, 1]`): cut with the conv.",
    "- **Several graph outputs** (two heads and a feature map): all kept with their names "
    "and shapes; an output tensor's channels stay and the report says so.",
    "- **The class token broadcast by Expand** (TorchScript's ViT): the constant is cut with "
    "the residual stream; a run-time target gets its channel entry set to 1.",
    "- **Models over 2 GB**: external data in and out; onnxruntime and the checker read them "
    "from a temporary file, shapes are inferred without the weights.",
    "",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--criterion", default="nisp-mag")
    ap.add_argument("--full", action="store_true", help="also the models in build/models")
    ap.add_argument("--only", nargs="*", default=[], help="substrings of model names to run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    args = ap.parse_args(argv)
    command = "python tools/coverage.py" + (" --full" if args.full else "")
    sections = [
        (
            "Small fixtures (tests/fixtures)",
            "Random weights, narrow widths and 32-96 pixel inputs (tools/make_fixtures.py). "
            "At these widths the stem convolution, whose 3 input channels stay, holds a large "
            "share of the MACs, so the MACs removed are lower than on the full-size models.",
            ROOT / "tests" / "fixtures",
        )
    ]
    if args.full:
        sections.append(
            (
                "Full-size models (build/models)",
                "Random weights at the published widths and resolutions "
                "(`python tools/make_fixtures.py --only-full`).",
                ROOT / "build" / "models",
            )
        )
    doc = [
        "# Graph coverage",
        "",
        f"Every architecture from both PyTorch exporters, pruned at `--ratio {args.ratio}` by "
        f"`nisp_onnx.prune` (criterion `{args.criterion}`, repair `none`, 2 batches of random "
        "calibration inputs). *Valid*: the output passes the full `onnx.checker`, runs in "
        "onnxruntime and keeps the output names and shapes. MACs are per sample. The "
        "classifier's output channels (a graph output) are frozen in every model and not "
        "counted below. Generated by:",
        "",
        "```bash",
        "python tools/make_fixtures.py" + (" --full" if args.full else "") + "   # needs torch",
        command,
        "```",
        "",
    ]
    for title, note, folder in sections:
        rows = []
        for path in sorted(folder.glob("*.onnx")):
            if args.only and not any(s in path.stem for s in args.only):
                continue
            row = run_one(path, args.ratio, args.criterion)
            rows.append(row)
            print(
                f"{path.stem}: valid {row['valid']} "
                + (
                    f"MACs -{100 * row['macs']:.1f}% frozen {row['frozen']} ({row['seconds']:.1f}s)"
                    if "macs" in row
                    else row.get("error", "")
                ),
                flush=True,
            )
        doc += _section(title, command, rows, note)
    doc += IDIOMS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
