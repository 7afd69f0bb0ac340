"""stdout and stderr: the consoles every command writes through, the one JSON object of
``--json``, and stdout that cannot take the results (closed, full, a pipe whose reader left).

Results go to stdout (a table, or one JSON object with ``--json``); logs, progress and error
lines go to stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from prune_cli.core.errors import StdoutError


class ResultsConsole(Console):
    """stdout's console: a pipe whose reader left is an error like any other write error
    (:func:`printing_results`), not rich's silent ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write there
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


stderr = Console(stderr=True)
stdout = ResultsConsole()


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def printing_results(report_file: Path | None = None):
    """Around the printing of a command's results on stdout: stdout that cannot take them (a
    full device, a pipe whose reader left, an I/O error) is a :class:`StdoutError`, exit code 2
    with one stderr line saying so and where the written report is (``report_file``), never an
    internal error; what was written (a checkpoint) stays. stdout is then pointed at /dev/null,
    so that nothing tries to write the rest again (the interpreter's exit flush included)."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        reason = "its reader closed the pipe" if exc.errno == errno.EPIPE else (exc.strerror or str(exc))
        where = f"; the report is in {report_file}" if report_file is not None else ""
        raise StdoutError(f"could not print the results on stdout ({reason}){where}",
                          hint="send stdout to a file with room (> report.json), or run without the pipe") from None


def stdout_closed() -> bool:
    """Whether this process was started with its stdout closed (``>&-``)."""
    if sys.stdout is None:
        return True
    try:
        os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return True
    return False


def emit_json(data: dict) -> None:
    """One strict JSON object on stdout (NaN / inf written as null and flagged)."""
    from prune_cli.core.records import json_ready  # noqa: PLC0415 - imports torch; --help must not

    sys.stdout.write(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()
