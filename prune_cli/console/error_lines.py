"""Errors at the command line's boundary: every exception becomes its exit code and one line on
stderr (and with ``--json`` one JSON object on stdout: ``{"error": {"type", "message", "hint"},
"exit_code": N}``).

Exit codes: 0 done, 2 bad input (one line + hint), 1 internal error, 3 a quality gate failed
(the checkpoint and report are written; :mod:`prune_cli.core.gates`), 130 interrupted (Ctrl-C),
143 stopped by SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from pathlib import Path

import typer
from rich.markup import escape

from prune_cli.console.interrupts import interrupt_message
from prune_cli.console.streams import emit_json, one_line, stderr
from prune_cli.core.errors import InterruptedRun, PruneCliError
from prune_cli.core.gates import GATE_FAILED_EXIT, describe, failed


def emit_error(kind: str, message: str, hint: str | None, code: int, as_json: bool, label: str = "error") -> None:
    """The one-line error (and hint) on stderr; with ``--json`` also one JSON object on stdout."""
    stderr.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        stderr.print(f"[dim]hint: {escape(hint)}[/]", highlight=False, soft_wrap=True)
    if as_json:
        emit_json({"error": {"type": kind, "message": message, "hint": hint}, "exit_code": code})


@contextlib.contextmanager
def cli_boundary(debug: bool, as_json: bool):
    """Every command's body runs inside it: an exception becomes its exit code and one line
    (:func:`fail`); ``typer.Exit`` passes through."""
    try:
        yield
    except typer.Exit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary
        fail(exc, debug, as_json)


def fail(exc: BaseException, debug: bool, as_json: bool = False) -> None:
    """Turn an exception at the CLI boundary into its exit code and one line."""
    if isinstance(exc, KeyboardInterrupt):
        interrupted(exc if isinstance(exc, InterruptedRun) else InterruptedRun(), as_json)
    if debug and not isinstance(exc, typer.BadParameter):  # the traceback, then the same line and exit code
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    kind, message, hint, code, label = error_fields(exc)
    emit_error(kind, message, hint, code, as_json, label=label)
    raise typer.Exit(code)


def error_fields(exc: BaseException) -> tuple[str, str, str | None, int, str]:
    """``(type, message, hint, exit code, label)`` of an exception at the CLI boundary: a usage
    error or a :class:`PruneCliError` as itself, Ctrl-C / SIGTERM as what stopped the run,
    anything else an internal error (exit code 1)."""
    if isinstance(exc, KeyboardInterrupt):
        exc = exc if isinstance(exc, InterruptedRun) else InterruptedRun()
        message, hint = interrupt_message(exc)
        return "Interrupted", message, hint, exc.exit_code, "stopped"
    if isinstance(exc, typer.BadParameter):
        return "UsageError", one_line(exc.format_message()), "see --help", 2, "error"
    if isinstance(exc, PruneCliError):
        return type(exc).__name__, str(exc), exc.hint, exc.exit_code, "error"
    user = user_os_error(exc)
    if user is not None:
        return (type(exc).__name__, *user, 2, "error")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (type(exc).__name__, f"{type(exc).__name__}: {first}", "rerun with --debug for the traceback, and please report it",
            1, "internal error")


def user_os_error(exc: BaseException) -> tuple[str, str] | None:
    """``(message, hint)`` for an operating-system error that is the user's to fix wherever it
    comes from (exit code 2): a path with a name longer than the file system allows (any path
    argument), a full disk or quota; None for any other error."""
    from prune_cli.checkpoint.output import os_errno  # noqa: PLC0415 - imports torch; --help must not

    number = os_errno(exc)
    if number == errno.ENAMETOOLONG:
        name = getattr(exc, "filename", None)
        return (f"file name too long: {name}" if name else "a file name is too long for the file system",
                "each name in a path may have at most 255 bytes on most file systems")
    if number in (errno.ENOSPC, errno.EDQUOT):
        name = getattr(exc, "filename", None)
        return (f"no space left on the device{f' writing {name}' if name else ''}: {os.strerror(number)}",
                "free some space and run it again")
    return None


def interrupted(exc, as_json: bool) -> None:
    """One line saying what stopped the run and what is on disk now."""
    message, hint = interrupt_message(exc)
    emit_error("Interrupted", message, hint, exc.exit_code, as_json, label="stopped")
    raise typer.Exit(exc.exit_code)


def exit_on_failed_gates(report: dict, checkpoint: Path | None = None) -> None:
    """Exit 3 with one line per failed gate on stderr (the report, with its ``gates`` results,
    is already written and printed); ``checkpoint``: where it was written (the report holds only
    the folder's name)."""
    bad = failed(report.get("gates"))
    if bad:
        for result in bad:
            stderr.print(f"gate failed: {describe(result)}; the checkpoint was written to {checkpoint or report.get('output')}",
                         markup=False, highlight=False)
        raise typer.Exit(GATE_FAILED_EXIT)
