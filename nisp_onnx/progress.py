"""What the user sees while a stage runs: a bar with its total and the time left on a terminal,
one line when it starts and one when it ends elsewhere (CI logs), nothing when quiet.

`prune()` sets the mode for its duration (`showing_progress`); stages open a `Progress`
wherever they loop, so no progress flag has to be passed down through every function.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("nisp_onnx")
_mode = {"on": False}
F = TypeVar("F", bound=Callable)


@contextmanager
def showing(on: bool) -> Iterator[None]:
    """Show progress (True) or not (False) inside the block."""
    before = _mode["on"]
    _mode["on"] = on
    try:
        yield
    finally:
        _mode["on"] = before


def within(keyword: str, context: Callable[[object], object]) -> Callable[[F], F]:
    """A decorator running the function inside `context(value of its keyword argument)`
    (None when not given)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: object, **kwargs: object) -> object:
            with context(kwargs.get(keyword)):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


showing_progress = within("progress", lambda on: showing(bool(on)))  # when `progress` is true


class Progress:
    """Progress of one stage over `total` units; use as a context manager and call `update`."""

    def __init__(self, name: str, total: int | None, unit: str = "step"):
        self.name, self.total, self.unit = name, total, unit
        self.on = _mode["on"]
        self.bar = None
        self.start = time.perf_counter()
        self.done = 0
        if not self.on:
            return
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=name, unit=unit, leave=False, file=sys.stderr)
        else:
            of = f" ({total} {unit}s)" if total else ""
            log.info("%s%s ...", name, of)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def set_total(self, total: int) -> None:
        """The total, once it is known (e.g. from the time of the first unit)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def status(self, text: str) -> None:
        """A short status after the bar (e.g. the current loss); nothing off a terminal."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def note(self, message: str) -> None:
        """One line about the stage's progress (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.on:
            log.info("%s", message)

    def close(self) -> None:
        if not self.on:
            return
        self.on = False
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.start
        log.info("%s: done, %d %ss in %.1fs", self.name, self.done, self.unit, seconds)
