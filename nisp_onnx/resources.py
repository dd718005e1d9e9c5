"""Time and peak resident memory of a piece of work."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INTERVAL = 0.01  # seconds between samples of the resident memory


@dataclass
class Cost:
    seconds: float = 0.0
    peak_mib: float = 0.0  # peak resident memory of the process during the work


def _resident_mib() -> float | None:
    """Resident memory of this process now (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _process_peak_mib() -> float:
    """The process's peak so far, where /proc is missing (0 where that is unknown too)."""
    try:
        import resource  # not on Windows
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Sampler(threading.Thread):
    """Samples the resident memory every INTERVAL seconds, keeping the largest value. The
    kernel's own high-water mark is left alone: resetting it would hide the true peak from
    whatever runs this process (a CI job's memory accounting, the caller of the API)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _resident_mib() or 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(INTERVAL):
            self.peak = max(self.peak, _resident_mib() or 0.0)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, _resident_mib() or 0.0)


@contextmanager
def measure() -> Iterator[Cost]:
    """Fill a `Cost` with the wall time and peak memory of the `with` block."""
    cost = Cost()
    sampler = _Sampler() if _resident_mib() is not None else None
    if sampler is not None:
        sampler.start()
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = round(time.perf_counter() - start, 4)
        peak = sampler.stop() if sampler is not None else _process_peak_mib()
        cost.peak_mib = round(peak, 1)
