"""Stage 3: run the model on calibration inputs with onnxruntime, keeping the final responses.

Like onnxruntime's own static quantization, the tensors to observe are added as extra graph
outputs and the data is streamed batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import NispError
from .progress import Progress, within
from .verify import data_inputs, inline, on_disk

ORT_TYPES = {  # onnxruntime's type names to numpy dtypes
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


CPU = "CPUExecutionProvider"
_provider = {"name": CPU}  # the provider of every session() opened (latency stays on the CPU)


def provider_name(name: str) -> str:
    """onnxruntime's name for provider `name` ("cuda" or "CUDAExecutionProvider"), checked
    to be installed."""
    have = ort.get_available_providers()
    for full in have:
        if name.lower() in (full.lower(), full.lower().removesuffix("executionprovider")):
            return full
    raise NispError(
        f"--provider {name}: not available in this onnxruntime ({', '.join(have)}); install "
        "the package that has it (onnxruntime-gpu for CUDA)"
    )


@contextmanager
def using_provider(name: str | None) -> Iterator[None]:
    """Open the sessions inside the block on provider `name` (None: the CPU), with the CPU
    provider behind it for the ops it lacks."""
    before = _provider["name"]
    _provider["name"] = CPU if name is None else provider_name(name)
    try:
        yield
    finally:
        _provider["name"] = before


on_provider = within("provider", using_provider)  # sessions on the `provider` keyword's


MAX_RUN_BYTES = 128 * 2**20  # what one run may return: larger batches are split


def samples_per_run(proto: onnx.ModelProto, names: Sequence[str]) -> int | None:
    """How many samples one run of `proto` returning `names` may take to stay within
    MAX_RUN_BYTES (from the inferred shapes); None where the batch cannot be split (a fixed
    batch, inputs that do not share one symbolic batch dimension, or shapes not known)."""
    batch = set()
    for inp in data_inputs(proto.graph):
        dims = inp.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return None
        batch.add(dims[0].dim_param)
    if len(batch) != 1:
        return None
    infos = {vi.name: vi for vi in [*proto.graph.value_info, *proto.graph.output]}
    per_sample = 0
    for name in names:
        vi = infos.get(name)
        dims = vi.type.tensor_type.shape.dim[1:] if vi is not None else None
        if dims is None or not all(d.HasField("dim_value") for d in dims):
            return None
        size = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize
        per_sample += size * int(np.prod([d.dim_value for d in dims]))
    return max(1, MAX_RUN_BYTES // max(per_sample, 1))


def run_sliced(
    sess: ort.InferenceSession, names: list[str], batch: dict, step: int | None
) -> Iterator[tuple[int, int | None, list[np.ndarray]]]:
    """(first sample, end, outputs) of runs over `batch`, `step` samples at a time, so that
    the outputs of a large batch never all exist at once. One run (0, None, outputs) where
    the batch is small or `step` is None, and where the first slice does not run or does
    not keep the samples on the first axis (a batch fixed inside the graph)."""
    n = len(next(iter(batch.values())))
    if step is not None and step < n:
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            try:
                values = sess.run(names, {k: v[lo:hi] for k, v in batch.items()})
            except Exception:  # (onnxruntime raises its own types) a batch fixed inside
                if lo == 0:
                    break
                raise
            if any(np.ndim(v) == 0 or len(v) != hi - lo for v in values):
                if lo == 0:
                    break  # not split along the samples: run the whole batch
                raise ValueError("outputs of a split batch changed their first axis")
            yield lo, hi, values
            del values
        else:
            return
    yield 0, None, sess.run(names, batch)


@dataclass
class Calibration:
    """What one pass over the calibration data keeps."""

    batches: list[dict[str, np.ndarray]]  # the inputs, for verifying the pruned model
    responses: np.ndarray  # N x D final responses
    predictions: np.ndarray  # top-1 of the first output, per sample
    response_shape: tuple[int, ...]  # shape of one sample's final response
    positions: np.ndarray | None = None  # where each sample was in the order read, when split

    @property
    def count(self) -> int:
        return len(self.predictions)


def session(
    proto: onnx.ModelProto,
    extra_outputs: Sequence[str] = (),
    extra_nodes: Sequence[onnx.NodeProto] = (),
) -> ort.InferenceSession:
    """An onnxruntime session of `proto` (on the provider `using_provider` set), with
    `extra_nodes` and `extra_outputs` (graph outputs) added to a copy. A model over 2 GB,
    which no protobuf carries, is saved to a temporary folder with external data and the
    session made from the file; onnxruntime maps its weights from there and does not pack
    them again, so they are not copied."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = list(dict.fromkeys([_provider["name"], CPU]))
    if not inline(proto):
        opts.add_session_config_entry("session.disable_prepacking", "1")
        with on_disk(proto, extra_outputs, extra_nodes) as path:
            return ort.InferenceSession(str(path), opts, providers=providers)
    if extra_outputs or extra_nodes:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        proto.graph.node.extend(extra_nodes)
        have = {o.name for o in proto.graph.output}
        proto.graph.output.extend(
            onnx.ValueInfoProto(name=name) for name in extra_outputs if name not in have
        )
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)


def _feed(sess: ort.InferenceSession, batch: dict) -> dict[str, np.ndarray]:
    feed = {}
    for inp in sess.get_inputs():
        if inp.name not in batch:
            raise NispError(
                f"calibration data gives {sorted(batch)} but the model input is {inp.name!r}"
            )
        x = np.asarray(batch[inp.name]).astype(ORT_TYPES.get(inp.type, np.float32), copy=False)
        fixed = [(i, d) for i, d in enumerate(inp.shape) if isinstance(d, int)]
        if x.ndim != len(inp.shape) or any(x.shape[i] != d for i, d in fixed):
            raise NispError(
                f"calibration input {inp.name!r} has shape {list(x.shape)} but the model expects "
                f"{list(inp.shape)}; check --size, --color and --batch-size"
            )
        feed[inp.name] = x
    return feed


def top1(output: np.ndarray) -> np.ndarray:
    """Predicted class per sample of a classifier output [N, ..., classes]."""
    return output.reshape(len(output), -1).argmax(axis=1)


def collect(
    proto: onnx.ModelProto,
    reader: object,
    frl: str,
    num_samples: int | None = None,
) -> Calibration:
    """Run `proto` over batches from `reader` (up to `num_samples`), keeping the FRL responses."""
    sess = session(proto, (frl,))
    first = sess.get_outputs()[0].name
    batches, responses, preds = [], [], []
    seen = 0
    total = min((n for n in (num_samples, _length(reader)) if n is not None), default=None)
    bar = Progress("calibration", total, "input")
    while num_samples is None or seen < num_samples:
        batch = reader.get_next()
        if batch is None:
            break
        feed = _feed(sess, batch)
        try:
            out, resp = sess.run([first, frl], feed)
        except Exception as e:  # onnxruntime's own exception types
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise NispError(
                f"onnxruntime failed on calibration batch {len(batches)}: {first_line}"
            ) from None
        if not (np.isfinite(out).all() and np.isfinite(resp).all()):
            raise NispError(
                f"the model gives NaN or Inf on calibration batch {len(batches)}; "
                "check the preprocessing flags (--scale, --mean, --std)"
            )
        batches.append(feed)
        responses.append(resp.reshape(len(resp), -1).astype(np.float64))
        preds.append(top1(out))
        seen += len(out)
        bar.update(len(out))
    bar.close()
    if not batches:
        raise NispError("the calibration reader gave no data")
    shape = tuple(resp.shape[1:])
    return Calibration(batches, np.concatenate(responses), np.concatenate(preds), shape)


def _length(reader: object) -> int | None:
    """How many inputs a reader holds, where it says (onnxruntime's base class raises)."""
    try:
        return len(reader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def predict(proto: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Top-1 of the first output over the cached calibration batches."""
    sess = session(proto)
    first = sess.get_outputs()[0].name
    return np.concatenate([top1(sess.run([first], b)[0]) for b in batches])


def hold_back(
    calib: Calibration,
    labels: np.ndarray | None,
    fraction: float,
    fixed_batch: int | None = None,
    seed: int = 0,
) -> tuple[Calibration, Calibration | None, np.ndarray | None, np.ndarray | None]:
    """Keep a random `fraction` of the samples back for evaluation (a multiple of the model's
    fixed batch size): (calibration, held back or None, their labels)."""
    if fraction <= 0:
        return calib, None, labels, None
    n, step = calib.count, fixed_batch or 1
    count = round(n * fraction / step) * step
    if not 0 < count < n:
        raise NispError(
            f"--holdout {fraction}: {n} calibration samples cannot be split into calibration "
            f"and held-back inputs (batches of {step}); give more with --num-samples"
        )
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).choice(n, count, replace=False)] = True
    inputs = {k: np.concatenate([b[k] for b in calib.batches]) for k in calib.batches[0]}
    size = len(next(iter(calib.batches[0].values())))

    def part(mask: np.ndarray) -> Calibration:
        chosen = {k: v[mask] for k, v in inputs.items()}
        m = int(mask.sum())
        batches = [{k: v[i : i + size] for k, v in chosen.items()} for i in range(0, m, size)]
        return Calibration(
            batches,
            calib.responses[mask],
            calib.predictions[mask],
            calib.response_shape,
            np.flatnonzero(mask),
        )

    split = (None, None) if labels is None else (labels[~held], labels[held])
    return part(~held), part(held), split[0], split[1]
