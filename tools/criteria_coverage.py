"""Does every criterion run on every model? Architecture fixtures and the shared models.

    python tools/criteria_coverage.py > docs/criteria.md

Each cell prunes at ratio 0.5 without repair (the pruned model is checked and run, as always)
and gives the MACs removed, or why the criterion cannot run there. Fixtures get random inputs
and random labels; the shared models their real calibration inputs and labels.
"""

import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_data  # noqa: E402
from coverage import RandomReader, _input  # noqa: E402

from nisp_onnx import CRITERIA, ArrayReader, NispError, prune  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


class LabeledRandomReader(RandomReader):
    """Random inputs with random labels in [0, classes)."""

    def __init__(self, name, shape, classes):
        super().__init__(name, shape)
        rng = np.random.default_rng(2)
        self.labels = rng.integers(0, classes, shape[0] * len(self.batches))


def cell(path, reader, criterion):
    try:
        r = prune(str(path), None, reader, 0.5, criterion=criterion, repair="none")
    except NispError as e:
        return f"no: {e}"
    except Exception as e:  # a bug: show it in the table
        return f"**crash**: {type(e).__name__}: {e}"[:200]
    return f"{100 * r.macs_reduction:.0f}%"


def short(text):
    """One error per distinct message in the table: the first time in full, then its number."""
    if not text.startswith(("no:", "**crash**")):
        return text
    if text not in NOTES:
        NOTES.append(text)
    return f"[{NOTES.index(text) + 1}]"


NOTES = []


def classes(path):
    out = onnx.load(str(path), load_external_data=False).graph.output[0]
    return out.type.tensor_type.shape.dim[-1].dim_value or 10


def main():
    names = list(CRITERIA)
    print("Command: `python tools/criteria_coverage.py`")
    print()
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rows = []
    for path in sorted(FIXTURES.glob("*.onnx")):
        name, shape = _input(path, 2)
        k = classes(path)
        rows.append((path.stem, path, partial(LabeledRandomReader, name, shape, k)))
    if shared_data.available():
        for name, path, inp, batch, cal, _, _ in shared_data.models(n_eval=10):
            labels = shared_data.calib_labels(name)
            reader = partial(ArrayReader, {inp: cal}, [inp], batch, labels=labels)
            rows.append((name, path, reader))
    for label, path, reader in rows:
        cells = []
        for criterion in names:
            start = time.perf_counter()
            cells.append(short(cell(path, reader(), criterion)))
            print(f"{label} {criterion} {time.perf_counter() - start:.1f}s", file=sys.stderr)
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print()
    for i, note in enumerate(NOTES, 1):
        print(f"[{i}] {note}  ")


if __name__ == "__main__":
    main()
