"""The live progress display: rich's bars on a terminal, plain timestamped lines in a CI log
(:mod:`prune_cli.console.progress_log`), nothing on the ranks other than 0 under torchrun."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from prune_cli.console.logs import launcher_rank
from prune_cli.console.progress_log import PlainProgress
from prune_cli.console.streams import stderr


class RichEvents:
    """Progress on stderr, driven by the pipeline's Events callbacks: a live rich display on a
    terminal; plain timestamped lines otherwise (CI logs), one per stage and per block."""

    LABELS = {
        "load": "loading model and text",
        "eval dense": "perplexity (dense)",
        "calibration": "calibrating + pruning blocks",
        "eval compressed": "perplexity (compressed)",
        "export": "writing checkpoint",
        "allocation": "OWL per-block sparsity",
        "eval": "perplexity",
    }

    def __init__(self, live: bool | None = None):
        self.quiet = launcher_rank() > 0  # under torchrun, rank 0 alone shows progress
        self.live = (stderr.is_terminal and not self.quiet) if live is None else live
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=stderr,
            disable=not self.live,
        )
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.plain = PlainProgress(self._write_plain)  # CI logs: timestamped, rate-limited, with ETA

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    @property
    def _plain_lines(self) -> bool:
        return not self.live and not self.quiet

    def _write_plain(self, text: str) -> None:
        stderr.print(text, highlight=False, markup=False, soft_wrap=True)

    def stage(self, name: str, total: int | None = None) -> None:
        self.started[name] = time.perf_counter()
        self.tasks[name] = self.progress.add_task(self.LABELS.get(name, name), total=total, detail="")
        if self._plain_lines:
            self.plain.start(name, self.LABELS.get(name, name), total)

    def advance(self, name: str, steps: int = 1, detail: str = "") -> None:
        if name in self.tasks:
            self.progress.update(self.tasks[name], advance=steps, detail=detail)
            if self._plain_lines:
                self.plain.advance(name, steps, detail)

    def done(self, name: str) -> None:
        if name in self.tasks:
            task_id = self.tasks[name]
            total = next(t.total for t in self.progress.tasks if t.id == task_id) or 1
            self.progress.update(task_id, completed=total, total=total)
            if self._plain_lines:
                self.plain.finish(name)
