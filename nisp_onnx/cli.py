"""The `nisp-onnx` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .api import DEFAULT_HOLDOUT, MIN_HELD_BACK, finetune, prune
from .augment import AUGMENTS
from .criteria import CRITERIA
from .distillation import OPTIMIZERS, FineTune
from .errors import EXIT_GATE, EXIT_INTERNAL, EXIT_OK, EXIT_USER, GateFailed, NispError
from .explain import explain
from .model_io import LoadedModel, external_files_of, load_model, output_files
from .readers import ArrayReader, ImageFolderReader, model_preprocess
from .repair import MODES
from .report import finetune_line
from .search import FLOOR
from .verify import data_inputs, static_dims

log = logging.getLogger("nisp_onnx")

DEFAULT_SAMPLES = 2048  # calibration inputs used at most by default (docs/accuracy.md) ...
DEFAULT_INPUT_MIB = 160  # ... within this much input data: about 270 images at 3x224x224
DRY_RUN_RATIO = 0.5  # what --dry-run shows where the ratios need calibration data
EPILOG = """exit codes: 0 success; 2 user error (bad file, flag or calibration data), nothing
written; 3 a quality gate failed, the model not written unless --keep-on-fail; 4 internal
error (a bug: rerun with -v and report it).

examples:
  nisp-onnx model.onnx pruned.onnx --calib images/
      the largest cut that keeps 99% top-1 agreement on held-back images
  nisp-onnx model.onnx pruned.onnx --calib images/ --target-macs 0.7 --min-agreement 0.95
      keep 70% of the MACs; exit 3 if held-back agreement falls below 95%
"""
BUG_REPORT = (
    "this is a bug in nisp-onnx: please report it with the command line and the output of "
    "the same command with -v (see README, Reporting bugs)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nisp-onnx",
        description="Prune an ONNX CNN with NISP (Neuron Importance Score Propagation): "
        "whole channels are removed, the output runs on any onnxruntime provider. By default "
        f"the largest MACs cut is searched for whose top-1 agreement with the original on "
        f"held-back calibration inputs stays at or above --min-agreement ({FLOOR:g}).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="the ONNX model to prune")
    p.add_argument("output", nargs="?", help="where to write the pruned model")
    p.add_argument(
        "--calib",
        help="folder of images (class subfolders give labels), or .npz/.npy inputs",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the channel groups, what is frozen and why, and the MACs each group would "
        "save; needs no calibration data and writes nothing",
    )
    p.add_argument(
        "--ratio",
        type=float,
        help="fraction of channels removed from every channel group, in [0, 1) (default: "
        "none, the largest cut at --min-agreement)",
    )
    d = p.add_argument_group("calibration data")
    d.add_argument(
        "--num-samples",
        type=int,
        help=f"calibration inputs to use (default: all, up to {DEFAULT_SAMPLES} and "
        f"{DEFAULT_INPUT_MIB} MiB of inputs; an error if fewer than N are there)",
    )
    d.add_argument("--batch-size", type=int, default=32, help="default 32")
    d.add_argument(
        "--seed", type=int, default=0, help="seed for sampling calibration images (default 0)"
    )
    i = p.add_argument_group("image preprocessing (defaults read from the model input)")
    i.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="model input size")
    i.add_argument(
        "--resize",
        type=int,
        metavar="S",
        help="resize the short side to S, then centre crop to --size",
    )
    i.add_argument("--scale", type=float, help="pixel scale factor (default 1/255)")
    i.add_argument("--mean", type=float, nargs="+", help="per-channel mean, after scaling")
    i.add_argument("--std", type=float, nargs="+", help="per-channel std, after scaling")
    i.add_argument("--color", choices=["rgb", "bgr", "gray"])
    m = p.add_argument_group("method")
    m.add_argument(
        "--criterion",
        choices=list(CRITERIA),
        default="nisp-infs",
        help="channel importance (default nisp-infs; see the README)",
    )
    m.add_argument("--frl", metavar="TENSOR", help="final response layer (default: found)")
    m.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="NODE",
        help="never prune the channels these nodes produce",
    )
    a = p.add_argument_group("how much, where")
    a.add_argument(
        "--layer-ratio",
        action="append",
        default=[],
        metavar="PATTERN=R",
        help="ratio R for the channel groups of nodes whose name matches the glob PATTERN "
        "(repeatable; the last match wins)",
    )
    a.add_argument(
        "--global",
        dest="global_ranking",
        action="store_true",
        default=None,
        help="rank channels of all groups together (scores normalised per group) and remove "
        "--ratio of them, or meet --target-macs in that order",
    )
    a.add_argument(
        "--max-layer-ratio",
        type=float,
        default=1.0,
        metavar="R",
        help="with --global or --target-macs: no group loses more than R of its channels "
        "(default 1)",
    )
    a.add_argument(
        "--target-macs",
        type=float,
        metavar="F",
        help="keep the fraction F of the model's MACs, with ratios per group from each group's "
        "measured sensitivity (in the global ranking's order with --global)",
    )
    a.add_argument(
        "--round-to",
        type=int,
        default=1,
        metavar="N",
        help="kept channel counts are multiples of N (for fast kernels; default 1)",
    )
    r = p.add_argument_group("repair (after pruning, from the calibration data)")
    r.add_argument(
        "--repair",
        choices=MODES,
        default="ls",
        help="ls: least-squares refit of every layer that reads pruned channels (default); "
        "bias: bias compensation only; none: no repair",
    )
    r.add_argument(
        "--no-repair", dest="repair", action="store_const", const="none", help="= --repair none"
    )
    f = p.add_argument_group("fine-tuning (label-free distillation from the original)")
    f.add_argument(
        "--finetune",
        metavar="BUDGET",
        help="after repair, train the pruned model to mimic the original on the calibration "
        "inputs for BUDGET steps (2000) or wall time (90s, 10m, 1h); the step kept is chosen "
        "on the held-back inputs and is never worse there than the repaired start",
    )
    f.add_argument(
        "--teacher",
        metavar="MODEL",
        help="no pruning: fine-tune INPUT against MODEL (same input and output names) and "
        f"write it to OUTPUT (budget --finetune, default {FineTune.budget})",
    )
    f.add_argument(
        "--finetune-lr",
        type=float,
        default=FineTune.lr,
        metavar="LR",
        help=f"the optimizer's peak rate ({FineTune.lr:g})",
    )
    f.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=FineTune.optimizer,
        help="adam (default) or sgd with momentum 0.9; both warm up, then follow a cosine",
    )
    f.add_argument(
        "--weight-decay",
        type=float,
        default=FineTune.weight_decay,
        metavar="D",
        help="decoupled weight decay per step, times the rate (default 0)",
    )
    f.add_argument(
        "--augment",
        choices=AUGMENTS,
        default=FineTune.augment,
        help="augmentation of the training batches: flip (a random half mirrored), flip-shift "
        "(also moved by up to 1/8), flip-crop (random resized crops); default none, which "
        "measured best (docs/accuracy.md)",
    )
    f.add_argument(
        "--feature-weight",
        type=float,
        default=FineTune.feature_weight,
        metavar="W",
        help="weight of the mean squared difference of the feature maps before global "
        "pooling, relative to the original's mean square, beside the logit KL (default "
        f"{FineTune.feature_weight:g}; 0 leaves it out)",
    )
    f.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="PATTERN",
        help="train only the parameters of nodes whose name matches the glob (repeatable)",
    )
    f.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="PATTERN",
        help="never train the parameters of nodes whose name matches the glob (repeatable)",
    )
    f.add_argument(
        "--freeze-classifier",
        action="store_true",
        help="never train the nodes after the final response layer",
    )
    f.add_argument(
        "--provider",
        metavar="NAME",
        help="onnxruntime execution provider for calibration, repair, fine-tuning and "
        "verification, e.g. cuda (default: the CPU; latency is always measured on the CPU)",
    )
    g = p.add_argument_group("quality gates (fractions; a failed gate exits 3 and writes no model)")
    g.add_argument(
        "--min-agreement",
        type=float,
        metavar="A",
        help="top-1 agreement of pruned and original on held-back calibration inputs: the "
        f"floor of the default mode (default {FLOOR:g}), a gate with --ratio or --target-macs",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="D",
        help="largest top-1 accuracy loss on held-back inputs (needs class subfolders)",
    )
    g.add_argument("--min-macs-reduction", type=float, metavar="M", help="smallest MACs cut")
    g.add_argument(
        "--holdout",
        type=float,
        metavar="F",
        help="fraction of calibration inputs kept back from scoring and repair, for measuring "
        f"agreement and accuracy (default {DEFAULT_HOLDOUT} when that is at least "
        f"{MIN_HELD_BACK} inputs, else 0)",
    )
    g.add_argument(
        "--no-speed-check",
        dest="speed_check",
        action="store_false",
        help="default mode: keep the cut even when it runs slower than the original on one CPU "
        "thread at batch 1 (for models deployed elsewhere)",
    )
    g.add_argument(
        "--keep-on-fail", action="store_true", help="write the model even when a gate fails"
    )
    o = p.add_argument_group("output")
    o.add_argument("--force", action="store_true", help="overwrite an existing output model")
    o.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    o.add_argument(
        "--benchmark",
        nargs="?",
        type=int,
        const=1,
        metavar="THREADS",
        help="measure the CPU latency of both models side by side at batch 1 and 32 with "
        "THREADS onnxruntime threads (default 1)",
    )
    o.add_argument(
        "--summary-md", metavar="FILE.md", help="write a Markdown summary (CI logs, PR comments)"
    )
    o.add_argument("-q", "--quiet", action="store_true", help="print errors only, no progress")
    o.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every channel group with its nodes, every repaired layer, and the "
        "traceback of internal errors",
    )
    p.add_argument("--version", action="version", version=f"nisp-onnx {__version__}")
    return p


def _input_info(proto: onnx.ModelProto) -> tuple[list[str], list, int | None]:
    """(input names, shape of the first input, fixed batch size or None)."""
    inputs = data_inputs(proto.graph)
    if not inputs:
        return [], [], None
    dims = [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    return [i.name for i in inputs], dims, batch


def _default_samples(shape: list, size: list[int] | None) -> int:
    """Inputs used when --num-samples is not given: up to DEFAULT_SAMPLES, within
    DEFAULT_INPUT_MIB of float32 inputs (sizes read from the model's input, or --size)."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape[1:]]
    if size and len(dims) >= 3:
        dims[-2:] = size
    per_sample = 4 * int(np.prod([d or 224 for d in dims])) if dims else 4 * 3 * 224 * 224
    return max(1, min(DEFAULT_SAMPLES, DEFAULT_INPUT_MIB * 2**20 // per_sample))


def _reader(args: argparse.Namespace, model: LoadedModel) -> ImageFolderReader | ArrayReader:
    names, shape, fixed_batch = _input_info(model.proto)
    batch = fixed_batch or args.batch_size
    calib = Path(args.calib)
    num = args.num_samples or _default_samples(shape, args.size)
    if not calib.exists():
        raise NispError(
            f"{calib}: --calib path does not exist; give a folder of images or an .npz/.npy file"
        )
    if calib.suffix in (".npz", ".npy"):
        reader = ArrayReader(calib, names, batch, num)
        _enough(args, reader.n)
        return reader
    if not calib.is_dir():
        raise NispError(f"{calib}: --calib must be a folder of images or an .npz/.npy file")
    pre = model_preprocess(
        shape,
        size=args.size,
        resize=args.resize,
        scale=args.scale,
        mean=args.mean,
        std=args.std,
        color=args.color,
    )
    log.info("preprocessing: %s", pre.describe())
    if fixed_batch:
        num = max(fixed_batch, num - num % fixed_batch)
    reader = ImageFolderReader(calib, names[0], pre, batch, num, args.seed)
    _enough(args, len(reader.files))
    if fixed_batch and len(reader.files) % fixed_batch:
        keep = len(reader.files) - len(reader.files) % fixed_batch
        if keep == 0:
            raise NispError(
                f"{calib}: the model runs batches of {fixed_batch} but only "
                f"{len(reader.files)} images were found"
            )
        reader.files = reader.files[:keep]
    return reader


def _enough(args: argparse.Namespace, available: int) -> None:
    """An explicit --num-samples must be there to take."""
    if args.num_samples is not None and available < args.num_samples:
        raise NispError(
            f"{args.calib}: --num-samples {args.num_samples} asked for, but only {available} "
            "calibration inputs are there; add inputs or lower --num-samples"
        )


def _dry_run_shapes(proto: onnx.ModelProto, size: list[int] | None) -> dict[str, tuple]:
    """Input shapes for counting MACs: batch 1, --size for the last two dimensions."""
    shapes = {}
    for inp in data_inputs(proto.graph):
        dims = static_dims(inp)
        if not dims:
            raise NispError(f"input {inp.name!r} has no shape in the model; re-export it with one")
        dims[:1] = [1]
        if size and len(dims) >= 3:
            dims[-2:] = size
        if None in dims:
            raise NispError(f"input {inp.name!r} has dynamic dimensions {dims}; give --size H W")
        shapes[inp.name] = tuple(dims)
    return shapes


def _dry_run_ratio(args: argparse.Namespace) -> float:
    """The uniform ratio a dry run shows: --ratio, unless the ratios need calibration data."""
    planned = args.ratio is not None and args.target_macs is None
    return args.ratio if planned else DRY_RUN_RATIO


def _dry_run_notes(args: argparse.Namespace) -> list[str]:
    """What a dry run cannot plan without calibration data, and what it shows instead."""
    if args.target_macs is not None:
        how = "in the global ranking, from channel scores" if args.global_ranking else ""
        need = f"--target-macs {args.target_macs:g} chooses ratios " + (
            how or "from each group's sensitivity"
        )
    elif args.ratio is None:
        need = "the default mode searches for the largest cut at --min-agreement"
    elif args.global_ranking:
        need = "--global ranks channels by scores"
    else:
        return []
    shown = _dry_run_ratio(args)
    return [f"{need} measured on calibration data; the groups below are shown at ratio {shown:g}"]


def _pattern_ratio(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if sep and pattern:
            return pattern, float(value)
    except ValueError:
        pass
    raise NispError(f"--layer-ratio {text!r}: expected PATTERN=R, for example 'layer4.*=0.7'")


def _check_files(args: argparse.Namespace) -> None:
    """Refuse, before any work, to overwrite the input or an existing output."""
    inputs = set()
    for model in map(Path, filter(None, (args.input, args.teacher))):
        inputs.add(model.resolve())
        if model.is_file():
            inputs.update((model.parent / f).resolve() for f in external_files_of(model))
    for path in output_files(args.output):
        if path.resolve() in inputs:
            raise NispError(f"{path}: refusing to overwrite the input model or its data")
    folder = Path(args.output).parent
    if not folder.is_dir():
        raise NispError(f"{args.output}: the output folder {folder} does not exist")
    if Path(args.output).exists() and not args.force:
        raise NispError(f"{args.output}: already exists; pass --force to overwrite it")
    for flag, path in (("--report", args.report), ("--summary-md", args.summary_md)):
        if path and Path(path).resolve() in inputs:
            raise NispError(f"{flag} {path}: refusing to overwrite the input model")


def _fine_tune(args: argparse.Namespace) -> FineTune:
    """The fine-tuning the flags ask for (used with --finetune or --teacher)."""
    tuning = FineTune(
        budget=args.finetune or FineTune.budget,
        lr=args.finetune_lr,
        augment=args.augment,
        train=tuple(args.train),
        freeze=tuple(args.freeze),
        freeze_classifier=args.freeze_classifier,
        feature_weight=args.feature_weight,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
    )
    return FineTune.of(tuning)


def _distil_only(args: argparse.Namespace, tuning: FineTune) -> int:
    """--teacher: fine-tune the input against the teacher, no pruning."""
    teacher = load_model(args.teacher)
    student = load_model(args.input)
    reader = _reader(args, teacher)
    trained = finetune(
        student,
        teacher,
        reader,
        args.output,
        tuning,
        num_samples=len(reader),
        holdout=args.holdout,
        overwrite=args.force,
        provider=args.provider,
        seed=args.seed,
        progress=not args.quiet,
    )
    line = finetune_line(trained.to_dict())
    if args.report:
        Path(args.report).write_text(json.dumps({"finetune": trained.to_dict()}, indent=2) + "\n")
    if args.summary_md:
        Path(args.summary_md).write_text(f"{line[0].upper()}{line[1:]}.\n")
    if not args.quiet:
        print(f"{args.input} -> {args.output}, distilled from {args.teacher}\n  {line}")
    return EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, prune, print; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=logging.ERROR if args.quiet else logging.INFO
    )
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise NispError(f"--ratio must be in [0, 1), got {args.ratio}")
    layer_ratio = dict(_pattern_ratio(v) for v in args.layer_ratio)
    if args.dry_run:
        model = load_model(args.input)
        shapes = _dry_run_shapes(model.proto, args.size)
        plan = explain(
            model, shapes, _dry_run_ratio(args), args.exclude, layer_ratio, args.round_to
        )
        print("\n".join([*(f"note: {n}" for n in _dry_run_notes(args)), plan]))
        return EXIT_OK
    if args.output is None or args.calib is None:
        raise NispError("give the output model and --calib (or --dry-run to only look)")
    _check_files(args)
    tuning = _fine_tune(args)
    if args.teacher is not None:
        return _distil_only(args, tuning)
    model = load_model(args.input)
    reader = _reader(args, model)
    try:
        report = prune(
            model,
            args.output,
            reader,
            args.ratio,
            frl=args.frl,
            exclude=args.exclude,
            num_samples=len(reader),
            criterion=args.criterion,
            repair=args.repair,
            layer_ratio=layer_ratio,
            global_ranking=args.global_ranking,
            max_layer_ratio=args.max_layer_ratio,
            target_macs=args.target_macs,
            round_to=args.round_to,
            holdout=args.holdout,
            min_agreement=args.min_agreement,
            max_accuracy_drop=args.max_accuracy_drop,
            min_macs_reduction=args.min_macs_reduction,
            speed_check=args.speed_check,
            keep_on_fail=args.keep_on_fail,
            overwrite=args.force,
            benchmark_threads=args.benchmark,
            finetune=tuning if args.finetune is not None else None,
            provider=args.provider,
            seed=args.seed,
            progress=not args.quiet,
        )
        failure = None
    except GateFailed as e:
        report, failure = e.report, e
    report.preprocess = reader.preprocess.describe() if hasattr(reader, "preprocess") else None
    if args.report:
        report.to_json(args.report)
    if args.summary_md:
        Path(args.summary_md).write_text(report.markdown())
    if not args.quiet:
        print(report.summary(verbose=args.verbose))
    if failure is not None:
        print(f"nisp-onnx: {failure}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; the exit codes are documented in the README."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = run(argv)
    except NispError as e:
        print(f"nisp-onnx: error: {e}", file=sys.stderr)
        code = EXIT_USER
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # a bug: one line, the traceback behind -v
        if "-v" in argv or "--verbose" in argv:
            traceback.print_exc()
        print(f"nisp-onnx: internal error: {type(e).__name__}: {e}; {BUG_REPORT}", file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)
