"""Latency of the original and the pruned model on onnxruntime's CPU provider, side by side.

`compare(original, pruned, shapes)` builds one CPU session of each model with a fixed number of
intra-op threads, feeds both the same random input, warms both up, then times them
interleaved (A B, B A, A B, ...) so that load from other processes and frequency changes hit
both alike, and returns the median latency of each per batch size::

    from nisp_onnx.latency import compare

    for r in compare("model.onnx", report_pruned_proto, {"input": (1, 3, 224, 224)}):
        print(r.describe())  # batch 1, 1 thread: 41.20 ms -> 17.95 ms (-56.4%)
    report.latency = [r.to_dict() for r in results]  # JSON-ready

`shapes` gives each input's full shape; its first dimension is replaced by every batch size
(where the model's input has a fixed batch, that batch is used instead, once). Dynamic
dimensions other than the batch must be given in `shapes`; `input_shapes(proto)` reads the
static ones from a model. Worker threads do not spin between runs (`allow_spinning` 0), so
one session's idle threads do not steal the cores the other one is timed on.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .calibrate import ORT_TYPES
from .errors import NispError
from .verify import data_inputs, static_dims

Model = onnx.ModelProto | str | os.PathLike


@dataclass
class Latency:
    """Median wall-clock latency of one `session.run` of each model at one batch size."""

    batch_size: int
    threads: int
    original_ms: float
    pruned_ms: float
    runs: int  # timed runs of each model

    @property
    def speedup(self) -> float:
        """original / pruned: 2.0 means the pruned model runs twice as fast."""
        return self.original_ms / self.pruned_ms if self.pruned_ms > 0 else float("inf")

    @property
    def reduction(self) -> float:
        """1 - pruned / original: the fraction of the latency saved (compare with the MACs
        reduction)."""
        return 1 - self.pruned_ms / self.original_ms if self.original_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "reduction": self.reduction}

    def describe(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return (
            f"batch {self.batch_size}, {threads}: {self.original_ms:.2f} ms -> "
            f"{self.pruned_ms:.2f} ms ({-100 * self.reduction:+.1f}%, {self.runs} runs each)"
        )


def make_session(model: Model, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, sequential execution, full graph
    optimisation (onnxruntime's default) and no spinning worker threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def input_shapes(model: Model) -> dict[str, tuple]:
    """The graph inputs' shapes with batch 1 where the batch is dynamic; other dynamic
    dimensions are a NispError (give them in `compare`'s `shapes`)."""
    proto = (
        model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
    )
    shapes = {}
    for inp in data_inputs(proto.graph):
        dims = static_dims(inp)
        if dims and dims[0] is None:
            dims[0] = 1
        if None in dims:
            raise NispError(f"input {inp.name!r} has dynamic dimensions {dims}: give its shape")
        shapes[inp.name] = tuple(dims)
    return shapes


def _feed(sess: ort.InferenceSession, shapes: dict[str, tuple], batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        if inp.name not in shapes:
            raise NispError(f"no shape given for model input {inp.name!r}")
        shape = (batch, *shapes[inp.name][1:])
        dtype = ORT_TYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype)
    return feed


def _fixed_batch(sess: ort.InferenceSession) -> int | None:
    dims = [inp.shape[0] for inp in sess.get_inputs() if inp.shape]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if len(fixed) == 1 else None


def _timed(sess: ort.InferenceSession, feed: dict) -> float:
    start = time.perf_counter()
    sess.run(None, feed)
    return time.perf_counter() - start


def compare(
    original: Model,
    pruned: Model,
    shapes: dict[str, tuple] | None = None,
    threads: int = 1,
    batch_sizes: tuple[int, ...] = (1, 32),
    min_time_s: float = 2.0,
    min_runs: int = 5,
    max_runs: int = 1000,
    warmup: int = 2,
    seed: int = 0,
) -> list[Latency]:
    """Median latency of `original` and `pruned` (protos or paths) per batch size.

    Per batch size: one random input (standard normal floats, zeros for integer inputs)
    shared by both models, `warmup` untimed runs of each, then timed runs in alternating
    order (A B, B A, ...) until both have run `min_runs` times and `min_time_s` seconds have
    passed in all, or `max_runs` each. `shapes` maps input names to full shapes (the batch
    dimension is replaced); None reads them from `original` (`input_shapes`). A model with a
    fixed batch is measured once, at that batch.
    """
    if threads < 1:
        raise NispError(f"threads must be at least 1, got {threads}")
    shapes = shapes if shapes is not None else input_shapes(original)
    sess_a, sess_b = make_session(original, threads), make_session(pruned, threads)
    fixed = _fixed_batch(sess_a)
    sizes = [fixed] if fixed else list(dict.fromkeys(batch_sizes))
    results = []
    for batch in sizes:
        feed = _feed(sess_a, shapes, batch, seed)
        for _ in range(warmup):
            sess_a.run(None, feed)
            sess_b.run(None, feed)
        times_a, times_b = [], []
        start = time.perf_counter()
        while len(times_a) < max_runs and (
            len(times_a) < min_runs or time.perf_counter() - start < min_time_s
        ):
            if len(times_a) % 2 == 0:
                times_a.append(_timed(sess_a, feed))
                times_b.append(_timed(sess_b, feed))
            else:
                times_b.append(_timed(sess_b, feed))
                times_a.append(_timed(sess_a, feed))
        results.append(
            Latency(
                batch,
                threads,
                1000 * statistics.median(times_a),
                1000 * statistics.median(times_b),
                len(times_a),
            )
        )
    return results
