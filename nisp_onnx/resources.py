"""Time and peak resident memory of a piece of work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Cost:
    seconds: float = 0.0
    peak_mib: float = 0.0  # peak resident memory of the process during the work


def _reset_peak_memory() -> None:
    """Start a new resident-memory high-water mark (Linux; elsewhere the process peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # not on Windows, where the peak stays unknown
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def measure() -> Iterator[Cost]:
    """Fill a `Cost` with the wall time and peak memory of the `with` block."""
    cost = Cost()
    _reset_peak_memory()
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = round(time.perf_counter() - start, 4)
        cost.peak_mib = round(_peak_memory_mib(), 1)
