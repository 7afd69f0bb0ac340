"""Ctrl-C and SIGTERM: both raise :class:`~prune_cli.core.errors.InterruptedRun` in the main thread
(so every cleanup runs), and the line that says what stopped the run and what is on disk (with
the command that resumes it)."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading

from prune_cli.core import stopping
from prune_cli.core.errors import InterruptedRun

ARGV: list[str] | None = None  # this process's prune-cli arguments (set by remember_arguments)


def remember_arguments(args: list[str]) -> None:
    """The arguments of this run, for the resume command an interrupt line shows."""
    global ARGV
    ARGV = list(args)


def interrupt_message(exc) -> tuple[str, str | None]:
    """What stopped the run and what is on disk now; and a hint."""
    state = getattr(exc, "output_state", None)
    on_disk = {
        "absent": "its staging folder was removed; nothing was written to --output",
        "previous": "its staging folder was removed; the previous checkpoint at --output is intact",
        "written": "the checkpoint had already been written to --output",
    }.get(state, "nothing was written to --output")
    hint = None
    if state == "resumable":
        where = "after the current block" if getattr(exc, "at_block_boundary", False) else "at once"
        on_disk = (f"stopped {where}; the resume state is kept in {getattr(exc, 'staging', '?')} and --output is "
                   f"unchanged; continue with: {resume_command()}")
    return f"interrupted by {exc.signal_name}: {on_disk}", hint


def resume_command() -> str:
    """The command that continues this run: the same arguments plus --resume."""
    args = list(ARGV if ARGV is not None else sys.argv[1:])
    args = [a for a in args if a not in ("--resume", "--no-resume")] + ["--resume"]
    return shlex.join(["prune-cli", *args])


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGINT and SIGTERM raise :class:`InterruptedRun` in the main thread, so every cleanup
    (``finally``, context managers) runs and the CLI can say what is on disk. Previous
    handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopping.reset()

    def handler(signum, frame):
        name = signal.Signals(signum).name
        stopping.request(InterruptedRun(name, 128 + signum))  # inside a walk: after the current block

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
