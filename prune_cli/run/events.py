"""Progress and time: the callbacks a run reports its stages through (:class:`Events`; the CLI
subclasses it with a rich display), one progress stage per block walk (:class:`Progress`), and
the seconds each part of a run takes (:func:`timed`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prune_cli.core.records import Timings
from prune_cli.streaming.driver import BlockDriver


class Events:
    """Progress callbacks; the CLI subclasses this with a rich display. All no-ops here."""

    def stage(self, name: str, total: int | None = None) -> None:
        """A stage starts; ``total`` steps if known."""

    def advance(self, name: str, steps: int = 1, detail: str = "") -> None:
        """``steps`` more steps of stage ``name`` are done."""

    def done(self, name: str) -> None:
        """Stage ``name`` finished."""


class Progress:
    """One progress stage per walk, advanced per block."""

    def __init__(self, events: Events, driver: BlockDriver):
        self.events, self.n = events, driver.n_blocks

    @contextmanager
    def walk(self, name: str, walks: int = 1) -> Iterator[Callable[[int], None]]:
        self.events.stage(name, self.n * walks)
        yield lambda index: self.events.advance(name, 1, f"block {index + 1}/{self.n}")
        self.events.done(name)


@contextmanager
def timed(timings: Timings, key: str) -> Iterator[None]:
    """Adds the seconds the ``with`` body takes to ``timings`` under ``key``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings.add(key, time.perf_counter() - start)
