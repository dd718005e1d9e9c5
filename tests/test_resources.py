"""Per-stage time and peak memory."""

import time
from pathlib import Path

import numpy as np
import pytest

from nisp_onnx.resources import measure

linux = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")


def _kernel_peak_mib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if "VmHWM" in x)
    return int(line.split()[1]) / 1024


@linux
def test_a_stage_peak_sees_a_transient_allocation_and_the_process_peak_stays():
    with measure() as quiet:
        time.sleep(0.05)
    with measure() as busy:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched, held for 50 ms, freed
        time.sleep(0.05)
        del block
    with measure() as after:
        time.sleep(0.05)
    assert busy.peak_mib > quiet.peak_mib + 250
    assert after.peak_mib < busy.peak_mib - 250
    assert busy.seconds >= 0.05
    # the kernel's high-water mark is not reset, so a parent process still sees the peak
    assert _kernel_peak_mib() >= busy.peak_mib - 5
