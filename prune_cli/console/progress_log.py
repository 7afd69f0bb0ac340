"""Progress for logs that are not a terminal (CI): timestamped, rate-limited lines with ETA.

A terminal gets rich's live bars (``prune_cli.console.display.RichEvents``). A CI log gets lines, and one
line per block and stage is too many (an 80-block model walked five times prints 400) and says
nothing about time. Each line here carries the wall-clock time, the time since the run
started, the stage's count and percentage, its elapsed time and an ETA::

    [prune-cli] 13:40:02 +41.2s calibrating + pruning blocks 12/30 (40%) 38.9s, ETA 58.4s: block 12

A stage prints a line when it starts, when it ends (with its duration), and in between only
when its progress crosses the next tenth *and* at least ``min_interval`` seconds passed since
its last line, or when ``heartbeat`` seconds passed without one (a slow block still shows the
run is alive). So a stage prints at most about 12 lines plus one per ``heartbeat``, whatever
its number of blocks. The ETA is the stage's elapsed time scaled by the remaining fraction
(blocks of a walk cost about the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "[prune-cli]"


def clock_time(now_epoch: float) -> str:
    """``HH:MM:SS`` local time."""
    return time.strftime("%H:%M:%S", time.localtime(now_epoch))


def seconds(value: float) -> str:
    """``41.2s``, ``3m05s``, ``1h02m``: short durations for log lines."""
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


@dataclass
class _Stage:
    label: str
    total: int | None
    started: float
    done: int = 0
    last_line: float = 0.0
    last_tenth: int = 0


@dataclass
class PlainProgress:
    """Rate-limited progress lines written through ``write`` (one string per line).

    ``monotonic`` and ``wall`` are the clocks (injectable for tests)."""

    write: Callable[[str], None]
    min_interval: float = 5.0
    heartbeat: float = 60.0
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    run_started: float = field(default=-1.0)
    stages: dict[str, _Stage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.run_started < 0:
            self.run_started = self.monotonic()

    def line(self, text: str) -> None:
        """One line with the wall-clock time and the time since the run started."""
        now = self.monotonic()
        self.write(f"{PREFIX} {clock_time(self.wall())} +{seconds(now - self.run_started)} {text}")

    def start(self, name: str, label: str, total: int | None) -> None:
        now = self.monotonic()
        self.stages[name] = _Stage(label, total, now, last_line=now)
        self.line(f"{label} ..." if not total else f"{label} 0/{total} ...")

    def advance(self, name: str, steps: int = 1, detail: str = "") -> None:
        stage = self.stages.get(name)
        if stage is None:
            return
        stage.done += steps
        now = self.monotonic()
        tenth = int(10 * stage.done / stage.total) if stage.total else 0
        crossed = tenth > stage.last_tenth and now - stage.last_line >= self.min_interval
        if crossed or now - stage.last_line >= self.heartbeat:
            stage.last_tenth, stage.last_line = tenth, now
            self.line(self._status(stage, now) + (f": {detail}" if detail else ""))

    def finish(self, name: str) -> None:
        stage = self.stages.pop(name, None)
        if stage is not None:
            self.line(f"{stage.label} done in {seconds(self.monotonic() - stage.started)}")

    @staticmethod
    def _status(stage: _Stage, now: float) -> str:
        elapsed = now - stage.started
        if not stage.total:
            return f"{stage.label} {stage.done} {seconds(elapsed)}"
        fraction = min(1.0, stage.done / stage.total)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        return (f"{stage.label} {stage.done}/{stage.total} ({100 * fraction:.0f}%) {seconds(elapsed)}"
                + (f", ETA {seconds(eta)}" if eta is not None else ""))
