"""Export every architecture of `architectures.py` with both PyTorch exporters.

    python tools/make_fixtures.py                 # tiny fixtures -> tests/fixtures/
    python tools/make_fixtures.py --full          # also full size -> build/models/
    python tools/make_fixtures.py resnet18 vit_b_16 --exporter dynamo

TorchScript: `dynamo=False`, opset 17, dynamic batch. Dynamo: `dynamo=True`, opset 18,
fixed batch, weights in an external `<name>.onnx.data` file. Random weights, eval mode,
BatchNorm statistics randomised. Needs torch 2.13.0 (CPU), onnx and onnxscript; no torchvision.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from architectures import ARCHS, build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPORTERS = ("torchscript", "dynamo")
BATCH = 2


def export(name: str, exporter: str, folder: Path, tiny: bool) -> Path:
    """Write `<folder>/<name>_<exporter>.onnx` (and its .onnx.data for dynamo)."""
    model, res = build(name, tiny)
    x = torch.randn(BATCH, 3, res, res)
    path = folder / f"{name}_{exporter}.onnx"
    for old in (path, path.with_name(path.name + ".data")):
        old.unlink(missing_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        else:
            program = torch.onnx.export(
                model, (x,), dynamo=True, opset_version=18, input_names=["input"], verbose=False
            )
            program.model.graph.outputs[0].name = "logits"
            program.save(str(path), external_data=True)
    _strip(path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _strip(path: Path) -> None:
    """Drop the exporters' per-node debug metadata (stack traces with local paths)."""
    m = onnx.load(str(path), load_external_data=False)
    for node in m.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(m, str(path))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("names", nargs="*", help="architectures (default: all)")
    ap.add_argument("--exporter", choices=EXPORTERS, action="append")
    ap.add_argument("--full", action="store_true", help="also export full-size models")
    ap.add_argument("--only-full", action="store_true", help="export only full-size models")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    ap.add_argument("--full-out", type=Path, default=ROOT / "build" / "models")
    args = ap.parse_args(argv)
    names = args.names or list(ARCHS)
    exporters = args.exporter or list(EXPORTERS)
    jobs = [] if args.only_full else [(args.out, True)]
    if args.full or args.only_full:
        jobs.append((args.full_out, False))
    for folder, tiny in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            for exporter in exporters:
                path = export(name, exporter, folder, tiny)
                size = sum(
                    os.path.getsize(p)
                    for p in (path, path.with_name(path.name + ".data"))
                    if p.exists()
                )
                print(
                    f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                    f"{size / 1024:.0f} KiB"
                )


if __name__ == "__main__":
    main()
