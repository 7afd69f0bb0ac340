"""The command line (the only module that imports typer and rich).

Results go to stdout (a table, or one JSON object with ``--json``); logs and progress go to
stderr. Exit codes: 0 done, 2 bad input (one line + hint), 1 internal error, 3 a quality gate
failed (the checkpoint and report are written; prune_cli.core.gates), 130 interrupted (Ctrl-C), 143
stopped by SIGTERM. With ``--json`` an error is one JSON object on stdout too:
``{"error": {"type", "message", "hint"}, "exit_code": N}``.

stdout that cannot take the results is the user's to fix (exit code 2, one stderr line): closed
at start (``>&-``) it is refused before anything runs (a file opened later would get its
descriptor); full, or a pipe whose reader left, when the results are printed, the line says where
the written report is (the checkpoint stays).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from prune_cli.console.progress_log import PlainProgress, clock_time

app = typer.Typer(
    name="prune-cli",
    help="Training-free compression of causal language models: prune, evaluate, export.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    # click's plain help: it wraps long option names at any width, where rich's panels cut
    # them (`--calib-chat-te…` at 80 columns) and read `[...]` in help texts as markup
    rich_markup_mode=None,
)

DISTRIBUTION = "llm-prune-cli"  # the name on PyPI (`prune-cli` there is another project)


def version_line() -> str:
    """``prune-cli X.Y.Z (llm-prune-cli; torch A, transformers B, Python C)``: the installed
    distribution's version, and the libraries that decide a run's numbers."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import prune_cli

    try:
        ours = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = prune_cli.__version__
    libs = []
    for lib in ("torch", "transformers"):
        try:
            libs.append(f"{lib} {version(lib)}")
        except PackageNotFoundError:
            libs.append(f"{lib} missing")
    return f"prune-cli {ours} ({DISTRIBUTION}; {', '.join(libs)}, Python {platform.python_version()})"


def _show_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", help="Print the version and exit.",
                                 is_eager=True, callback=_show_version),
) -> None:
    """Training-free compression of causal language models: prune, evaluate, export."""

class _ResultsConsole(Console):
    """stdout's console: a pipe whose reader left is an error like any other write error
    (:func:`_printing_results`), not rich's silent ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        import errno

        self.quiet = True  # nothing more to write there
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


stderr = Console(stderr=True)
stdout = _ResultsConsole()


class _PlainLogFormat(logging.Formatter):
    """One line per record for logs that are not a terminal (CI): ``[prune-cli] HH:MM:SS
    message``, with the level for warnings and errors; never wrapped."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[prune-cli] {clock_time(record.created)} {level}{_one_line(record.getMessage())}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _launcher_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _setup_logging(verbose: bool) -> None:
    if stderr.is_terminal:
        handler: logging.Handler = RichHandler(console=stderr, show_time=False, show_path=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(_PlainLogFormat())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("prune_cli").setLevel(logging.DEBUG if verbose else logging.WARNING if _launcher_rank() > 0 else logging.INFO)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own bars
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _emit_error(kind: str, message: str, hint: str | None, code: int, as_json: bool, label: str = "error") -> None:
    """The one-line error (and hint) on stderr; with ``--json`` also one JSON object on stdout."""
    from rich.markup import escape

    stderr.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        stderr.print(f"[dim]hint: {escape(hint)}[/]", highlight=False, soft_wrap=True)
    if as_json:
        _emit_json({"error": {"type": kind, "message": message, "hint": hint}, "exit_code": code})


@contextlib.contextmanager
def _cli_boundary(debug: bool, as_json: bool):
    """Every command's body runs inside it: an exception becomes its exit code and one line
    (:func:`_fail`); ``typer.Exit`` passes through."""
    try:
        yield
    except typer.Exit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary
        _fail(exc, debug, as_json)


def _fail(exc: BaseException, debug: bool, as_json: bool = False) -> None:
    """Turn an exception at the CLI boundary into its exit code and one line."""
    from prune_cli.core.errors import InterruptedRun

    if isinstance(exc, KeyboardInterrupt):
        _interrupted(exc if isinstance(exc, InterruptedRun) else InterruptedRun(), as_json)
    if debug and not isinstance(exc, typer.BadParameter):  # the traceback, then the same line and exit code
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    kind, message, hint, code, label = _error_fields(exc)
    _emit_error(kind, message, hint, code, as_json, label=label)
    raise typer.Exit(code)


def _error_fields(exc: BaseException) -> tuple[str, str, str | None, int, str]:
    """``(type, message, hint, exit code, label)`` of an exception at the CLI boundary: a usage
    error or a :class:`PruneCliError` as itself, Ctrl-C / SIGTERM as what stopped the run,
    anything else an internal error (exit code 1)."""
    from prune_cli.core.errors import InterruptedRun, PruneCliError

    if isinstance(exc, KeyboardInterrupt):
        exc = exc if isinstance(exc, InterruptedRun) else InterruptedRun()
        message, hint = _interrupt_message(exc)
        return "Interrupted", message, hint, exc.exit_code, "stopped"
    if isinstance(exc, typer.BadParameter):
        return "UsageError", _one_line(exc.format_message()), "see --help", 2, "error"
    if isinstance(exc, PruneCliError):
        return type(exc).__name__, str(exc), exc.hint, exc.exit_code, "error"
    user = _user_os_error(exc)
    if user is not None:
        return (type(exc).__name__, *user, 2, "error")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (type(exc).__name__, f"{type(exc).__name__}: {first}", "rerun with --debug for the traceback, and please report it",
            1, "internal error")


def _user_os_error(exc: BaseException) -> tuple[str, str] | None:
    """``(message, hint)`` for an operating-system error that is the user's to fix wherever it
    comes from (exit code 2): a path with a name longer than the file system allows (any path
    argument), a full disk or quota; None for any other error."""
    import errno

    from prune_cli.checkpoint.output import os_errno

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


def _parse_tasks(text: str | None) -> tuple[str, ...]:
    from prune_cli.recipe.tasks import parse_tasks

    return parse_tasks(text)


def _parse_limits(items: list[str] | None, flag: str) -> dict[str, float]:
    """``["task=0.4", "task:acc_norm=0.5"]`` -> ``{"task": 0.4, "task:acc_norm": 0.5}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"expected TASK[:METRIC]=NUMBER, got {item!r}", param_hint=flag) from None
    return out


def _print_tasks_table(tasks: dict) -> None:
    """Per task and metric: dense and compressed scores (± lm-eval's standard error) and the change."""
    table = Table(title="lm-eval tasks" + (f" (limit {tasks['limit']})" if tasks.get("limit") else ""))
    table.add_column("task")
    table.add_column("metric")
    which = [w for w in ("dense", "compressed", "results") if tasks.get(w)]  # "results": eval's one model
    for w in which:
        table.add_column("score" if w == "results" else w, justify="right")
    if tasks.get("change"):
        table.add_column("change", justify="right")
    first = tasks[which[0]] if which else {}
    for task, scores in first.items():
        for metric, value in scores["metrics"].items():
            if metric.endswith("_stderr"):
                continue
            cells = []
            for w in which:
                m = tasks[w][task]["metrics"]
                err = m.get(f"{metric}_stderr")
                cells.append(_fmt(m.get(metric)) + (f" ± {_fmt(err)}" if isinstance(err, float) else ""))
            if tasks.get("change"):
                cells.append(_fmt(tasks["change"][task].get(metric)))
            table.add_row(task, metric, *cells)
    _print_table(table)


def _exit_on_failed_gates(report: dict, checkpoint: Path | None = None) -> None:
    """Exit 3 with one line per failed gate on stderr (the report, with its ``gates`` results,
    is already written and printed); ``checkpoint``: where it was written (the report holds only
    the folder's name)."""
    from prune_cli.core.gates import GATE_FAILED_EXIT, describe, failed

    bad = failed(report.get("gates"))
    if bad:
        for result in bad:
            stderr.print(f"gate failed: {describe(result)}; the checkpoint was written to {checkpoint or report.get('output')}",
                         markup=False, highlight=False)
        raise typer.Exit(GATE_FAILED_EXIT)


def _interrupted(exc, as_json: bool) -> None:
    """One line saying what stopped the run and what is on disk now."""
    message, hint = _interrupt_message(exc)
    _emit_error("Interrupted", message, hint, exc.exit_code, as_json, label="stopped")
    raise typer.Exit(exc.exit_code)


def _interrupt_message(exc) -> tuple[str, str | None]:
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
                   f"unchanged; continue with: {_resume_command()}")
    return f"interrupted by {exc.signal_name}: {on_disk}", hint


_ARGV: list[str] | None = None  # this process's prune-cli arguments (set by main)


def _resume_command() -> str:
    """The command that continues this run: the same arguments plus --resume."""
    import shlex

    args = list(_ARGV if _ARGV is not None else sys.argv[1:])
    args = [a for a in args if a not in ("--resume", "--no-resume")] + ["--resume"]
    return shlex.join(["prune-cli", *args])


@contextlib.contextmanager
def _signals_as_interrupts():
    """SIGINT and SIGTERM raise :class:`InterruptedRun` in the main thread, so every cleanup
    (``finally``, context managers) runs and the CLI can say what is on disk. Previous
    handlers are restored on exit."""
    from prune_cli.core.errors import InterruptedRun

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    from prune_cli.core import stopping

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
        self.quiet = _launcher_rank() > 0  # under torchrun, rank 0 alone shows progress
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
        import time

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


def _print_table(table: Table) -> None:
    """``table`` on stdout, or where the terminal is narrower than the table needs (rich would
    cut its cells to ``3…``) the same cells as plain lines, ``column: value, ...`` per row (a row
    label first when the first column has no header), never wrapped inside a value."""
    from rich.markup import escape
    from rich.measure import Measurement

    if Measurement.get(stdout, stdout.options.update_width(1 << 16), table).maximum <= stdout.width:  # its natural width
        stdout.print(table)
        return
    if table.title:
        stdout.print(str(table.title), highlight=False, markup=False, soft_wrap=True)
    headers = [str(c.header) for c in table.columns]
    columns = [[str(cell) for cell in c.cells] for c in table.columns]
    for r in range(table.row_count):
        values = [column[r] for column in columns]
        if headers[0]:
            line = ", ".join(f"{h}: {v}" for h, v in zip(headers, values))
        else:  # a row label: "perplexity: dense 12.3, compressed 14.5"
            line = f"{values[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(headers[1:], values[1:]))
        stdout.print(escape(line), highlight=False, soft_wrap=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1e5 else f"{value:.3e}"
    return str(value)


def _print_compress_table(report: dict, checkpoint: Path | None = None) -> None:
    table = Table(title=f"prune-cli: {report['method']} {report['pattern']} on {report['model']}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    ppl = report["ppl"]
    table.add_row("perplexity", _fmt(ppl.get("dense")), _fmt(ppl.get("compressed")))
    table.add_row("sparsity (targeted Linears)", "0.000", _fmt(report.get("sparsity")))
    _print_table(table)
    if report.get("tasks"):
        _print_tasks_table(report["tasks"])
    if report.get("sparsity") is None:
        stdout.print("sparsity: not measured (activation sparsity is measured on the evaluation tokens; --no-eval)", highlight=False, soft_wrap=True)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
    stdout.print(f"timings: {timings}", highlight=False, soft_wrap=True)
    if report.get("output"):
        stdout.print(f"checkpoint: {checkpoint or report['output']}", highlight=False, soft_wrap=True)


def _print_plan(plan: dict) -> None:
    table = Table(title=f"plan: {plan['method']} on {plan['model']} ({plan['blocks']})")
    table.add_column("module", overflow="fold")  # full names, never truncated
    for col in ("shape", "method", "pattern", "sparsity"):
        table.add_column(col)
    for row in plan["layers"]:
        table.add_row(row["module"], "x".join(map(str, row["shape"])), row["method"], row["pattern"], f"{row['sparsity']:.3f}")
    _print_table(table)
    stdout.print(f"{len(plan['layers'])} Linear modules, {plan['target_params']:,} weights targeted", highlight=False, soft_wrap=True)


def _parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings into a dict; values are read as YAML scalars (numbers, bools).

    A value YAML cannot read (``scope=[``, an unclosed quote, a ``!!python/...`` tag) is a
    usage error naming the option and the value, not an internal error."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise typer.BadParameter(f"cannot read the value of {key.strip()!r} ({value!r}): {problem} "
                                     "(quote a text value, e.g. -O 'key=\"text\"')", param_hint="--option") from None
    return out


@contextlib.contextmanager
def _printing_results(report_file: Path | None = None):
    """Around the printing of a command's results on stdout: stdout that cannot take them (a
    full device, a pipe whose reader left, an I/O error) is a :class:`StdoutError`, exit code 2
    with one stderr line saying so and where the written report is (``report_file``), never an
    internal error; what was written (a checkpoint) stays. stdout is then pointed at /dev/null,
    so that nothing tries to write the rest again (the interpreter's exit flush included)."""
    from prune_cli.core.errors import StdoutError

    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        import errno

        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        reason = "its reader closed the pipe" if exc.errno == errno.EPIPE else (exc.strerror or str(exc))
        where = f"; the report is in {report_file}" if report_file is not None else ""
        raise StdoutError(f"could not print the results on stdout ({reason}){where}",
                          hint="send stdout to a file with room (> report.json), or run without the pipe") from None


def _stdout_closed() -> bool:
    """Whether this process was started with its stdout closed (``>&-``)."""
    if sys.stdout is None:
        return True
    try:
        os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return True
    return False


def _emit_json(data: dict) -> None:
    """One strict JSON object on stdout (NaN / inf written as null and flagged)."""
    from prune_cli.core.records import json_ready

    sys.stdout.write(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


from prune_cli.recipe.settings import cli_help  # noqa: E402 - option help from the one table of recipe keys


def _auto_number(value: Optional[str]) -> "str | float | None":
    """``auto`` or a number, as the recipe's ``auto-number`` settings take them."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither 'auto' nor a number") from None


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="Hub id, local HF folder, .gguf file; omit for the bundled SmolLM2-135M."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML (flags override it)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=cli_help("method")),
    base: Optional[str] = typer.Option(None, "--base", help="Base method of dsnot: magnitude, wanda, sparsegpt, alps or ria."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="Method option KEY=VALUE (repeatable), e.g. -O mode=reference."),
    layerwise: Optional[str] = typer.Option(None, "--layerwise", help=cli_help("layerwise.method")),
    owl_m: Optional[str] = typer.Option(None, "--owl-m", help=cli_help("layerwise.m"), callback=_auto_number, metavar="auto|<float>"),
    owl_lambda: Optional[str] = typer.Option(None, "--owl-lambda", help=cli_help("layerwise.lambda"), callback=_auto_number, metavar="auto|<float>"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s", help=cli_help("sparsity")),
    pattern: Optional[str] = typer.Option(None, "--pattern", "-p", help=cli_help("pattern")),
    calib_text: Optional[List[Path]] = typer.Option(None, "--calib-text", help=cli_help("calibration.text")),
    calib_dataset: Optional[str] = typer.Option(None, "--calib-dataset", help=cli_help("calibration.dataset")),
    calib_split: Optional[str] = typer.Option(None, "--calib-split", help=cli_help("calibration.split")),
    calib_column: Optional[str] = typer.Option(None, "--calib-column", help=cli_help("calibration.column")),
    calib_chat_template: bool = typer.Option(False, "--calib-chat-template", help=cli_help("calibration.chat_template")),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help=cli_help("calibration.samples")),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help=cli_help("calibration.seqlen")),
    seed: Optional[int] = typer.Option(None, "--seed", help=cli_help("calibration.seed")),
    eval_text: Optional[List[Path]] = typer.Option(None, "--eval-text", help=cli_help("evaluation.text")),
    eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help=cli_help("evaluation.windows")),
    eval_seqlen: Optional[int] = typer.Option(None, "--eval-seqlen", help=cli_help("evaluation.seqlen")),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity evaluation."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help=cli_help("gates.max_ppl_ratio")),
    eval_tasks: Optional[str] = typer.Option(None, "--tasks", "--eval-tasks", help=cli_help("evaluation.tasks")),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", "--limit", min=1, help=cli_help("evaluation.task_limit")),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help=cli_help("evaluation.num_fewshot")),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help=cli_help("evaluation.task_include_path")),
    min_task_score: Optional[List[str]] = typer.Option(None, "--min-task-score", help="Quality gate TASK[:METRIC]=V (repeatable): exit 3 when the compressed score is below V."),
    max_task_drop: Optional[List[str]] = typer.Option(None, "--max-task-drop", help="Quality gate TASK[:METRIC]=D (repeatable): exit 3 when the score falls more than D below the dense model's."),
    bos: Optional[str] = typer.Option(None, "--bos", help=cli_help("bos")),
    device: Optional[str] = typer.Option(None, "--device", help=cli_help("device")),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=cli_help("dtype")),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help=cli_help("save_dtype")),
    backend: Optional[str] = typer.Option(None, "--backend", help=cli_help("backend")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Checkpoint folder to write (required unless --dry-run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output folder that prune-cli wrote (others are refused)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue an interrupted run to the same --output from its last finished block (--no-resume: discard its state and start over)."),
    checkpoint_interval: float = typer.Option(30.0, "--checkpoint-interval", min=0, help="Seconds between writes of the resume state (0: after every block)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory for the calibration activations, e.g. 8GB; beyond it they are kept on disk (default: 40% of the RAM or cgroup limit)."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (like HF_HUB_OFFLINE=1)."),
    baseline_cache: bool = typer.Option(True, "--baseline-cache/--no-baseline-cache", help="Reuse the dense model's perplexity and task scores from an earlier run with the same model, tokens and settings (~/.cache/prune-cli/baselines)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit without calibrating."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error before its line (same exit code)."),
) -> None:
    """Prune MODEL with a training-free method, evaluate it against the dense model, export it.

    Exit codes: 0 done, 1 internal error, 2 bad input, 3 a quality gate failed (checkpoint and
    report written), 130 Ctrl-C, 143 SIGTERM."""
    _setup_logging(verbose)
    with _cli_boundary(debug, as_json):
        from prune_cli.recipe.config import load_recipe, resolve
        from prune_cli.run.pipeline import CompressRequest
        from prune_cli.run.pipeline import compress as run_compress
        from prune_cli.run.pipeline import dry_run as run_dry

        recipe_data = load_recipe(recipe) if recipe else None
        method_options = _parse_options(option or [])
        if base is not None:
            method_options["base"] = base
        overrides = {
            "method": method,
            "method_options": method_options or None,
            "layerwise": {"method": layerwise, "m": owl_m, "lambda": owl_lambda},
            "sparsity": sparsity,
            "pattern": pattern,
            "calibration": {
                "text": [str(p) for p in calib_text] if calib_text else None,
                "dataset": calib_dataset,
                "split": calib_split,
                "column": calib_column,
                "chat_template": True if calib_chat_template else None,
                "samples": calib_samples,
                "seqlen": seqlen,
                "seed": seed,
            },
            "evaluation": {
                "text": [str(p) for p in eval_text] if eval_text else None,
                "windows": eval_windows,
                "seqlen": eval_seqlen,
                "enabled": False if no_eval else None,
                "tasks": list(_parse_tasks(eval_tasks)) or None,
                "task_limit": task_limit,
                "num_fewshot": num_fewshot,
                "task_include_path": [str(p) for p in include_path] if include_path else None,
            },
            "device": device,
            "dtype": dtype,
            "save_dtype": save_dtype,
            "backend": backend,
            "bos": bos,
            "gates": {"max_ppl_ratio": max_ppl_ratio,
                      "min_task_score": _parse_limits(min_task_score, "--min-task-score") or None,
                      "max_task_drop": _parse_limits(max_task_drop, "--max-task-drop") or None},
        }
        if max_memory is not None:
            from prune_cli.core.memory import parse_size

            parse_size(max_memory)  # a bad size is a usage error now, not after loading
        if output is not None and not output.strip():
            raise typer.BadParameter("must not be empty", param_hint="--output")
        config = resolve(recipe_data, overrides)
        if not dry_run and output is None:
            raise typer.BadParameter("--output DIR is required (or pass --dry-run)", param_hint="--output")
        request = CompressRequest(config, model, Path(output) if output is not None else None, overwrite, offline,
                                  resume, checkpoint_interval, max_memory, baseline_cache)
        if dry_run:
            plan = run_dry(request)
            with _printing_results():
                _emit_json(plan) if as_json else _print_plan(plan)
            return
        with _signals_as_interrupts(), RichEvents() as events:
            report = run_compress(request, events)
        from prune_cli.checkpoint.output import REPORT_FILE, output_path

        written = output_path(request.output) if report.get("output") else None  # the report names the folder only
        with _printing_results(written / REPORT_FILE if written is not None else None):
            if as_json:
                _emit_json(report)  # every rank's, under torchrun (they hold the same masks)
            elif _launcher_rank() == 0:
                _print_compress_table(report, written)
        _exit_on_failed_gates(report, written)


@app.command("eval")
def eval_command(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint folder, .gguf file or hub id; omit for the bundled model."),
    eval_text: Optional[List[Path]] = typer.Option(None, "--eval-text", help="Held-out evaluation text file(s)."),
    eval_windows: int = typer.Option(16, "--eval-windows", min=1, help="Evaluation windows."),
    eval_seqlen: int = typer.Option(512, "--eval-seqlen", min=2, help="Tokens per evaluation window."),
    bos: str = typer.Option("auto", "--bos", help="Start every window with the BOS token: auto (when the tokenizer adds one by default), always or never."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "--eval-tasks", help="lm-eval tasks to score, comma-separated (offline: prune_cloze, prune_lastword)."),
    limit: Optional[int] = typer.Option(None, "--task-limit", "--limit", min=1, help="Examples per task (default: all)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="Few-shot examples per task prompt (default: the task's)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Task requests per batch (grouped by length)."),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help="Folder of lm-eval task YAML (repeatable)."),
    no_ppl: bool = typer.Option(False, "--no-ppl", help="Score the tasks only (no perplexity)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (the checkpoint's; float32 on a CPU without fast bfloat16), float32, bfloat16 or float16."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Evaluate any checkpoint: perplexity on held-out text, lm-eval tasks (--tasks), measured sparsity."""
    _setup_logging(verbose)
    with _cli_boundary(debug, as_json):
        from prune_cli.core.errors import RecipeError
        from prune_cli.recipe.config import EvaluationConfig
        from prune_cli.recipe.settings import check_value, setting
        from prune_cli.run.pipeline import evaluate_checkpoint

        for key, value in (("device", device), ("dtype", dtype), ("bos", bos)):
            check_value(setting(key), value)  # as compress checks them: the choices, did you mean
        names = _parse_tasks(tasks)
        if no_ppl and not names:
            raise RecipeError("--no-ppl leaves nothing to evaluate", hint="give --tasks, or drop --no-ppl")
        ev = EvaluationConfig(windows=eval_windows, seqlen=eval_seqlen, text=tuple(eval_text or ()), batch_size=4,
                              tasks=names, task_limit=limit, num_fewshot=num_fewshot,
                              task_include_path=tuple(include_path or ()))
        with _signals_as_interrupts(), RichEvents() as events:
            report = evaluate_checkpoint(checkpoint, ev, device, dtype, offline, events, bos_mode=bos,
                                         perplexity=not no_ppl, task_batch_size=batch_size)
        with _printing_results():
            if as_json:
                _emit_json(report)
            else:
                table = Table(title=f"prune-cli eval: {report['model']}")
                table.add_column("perplexity", justify="right")
                table.add_column("sparsity (block Linears)", justify="right")
                table.add_column("tokens", justify="right")
                table.add_row(_fmt(report["ppl"]), _fmt(report["sparsity"]), str(report["tokens"]))
                _print_table(table)
                if report.get("tasks"):
                    _print_tasks_table(report["tasks"])


@app.command("sweep")
def sweep_command(
    model: Optional[str] = typer.Argument(None, help="Hub id, local HF folder, .gguf file; omit for the bundled SmolLM2-135M."),
    methods: str = typer.Option(..., "--methods", help="Weight methods, comma-separated, e.g. wanda,sparsegpt."),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help="Unstructured sparsities, comma-separated, e.g. 0.3,0.5,0.7."),
    patterns: Optional[str] = typer.Option(None, "--patterns", help="N:M patterns, comma-separated, e.g. 2:4,4:8."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML for everything but the method and sparsity."),
    calib_text: Optional[List[Path]] = typer.Option(None, "--calib-text", help=cli_help("calibration.text")),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help=cli_help("calibration.samples")),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help=cli_help("calibration.seqlen")),
    seed: Optional[int] = typer.Option(None, "--seed", help=cli_help("calibration.seed")),
    eval_text: Optional[List[Path]] = typer.Option(None, "--eval-text", help=cli_help("evaluation.text")),
    eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help=cli_help("evaluation.windows")),
    eval_seqlen: Optional[int] = typer.Option(None, "--eval-seqlen", help=cli_help("evaluation.seqlen")),
    eval_tasks: Optional[str] = typer.Option(None, "--tasks", "--eval-tasks", help=cli_help("evaluation.tasks")),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", "--limit", min=1, help=cli_help("evaluation.task_limit")),
    device: Optional[str] = typer.Option(None, "--device", help=cli_help("device")),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=cli_help("dtype")),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of perplexity against sparsity here."),
    keep_checkpoints: Optional[Path] = typer.Option(None, "--keep-checkpoints", help="Export every point's checkpoint under this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace checkpoints prune-cli wrote under --keep-checkpoints."),
    baseline_cache: bool = typer.Option(True, "--baseline-cache/--no-baseline-cache", help="Keep the dense scores in ~/.cache/prune-cli/baselines (off: for this sweep only)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory for the calibration activations, e.g. 8GB."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Compress MODEL with several methods at several sparsities: a table, --json, a --plot PNG.

    The dense model is scored once for the whole sweep. Exit codes as for compress (no gates)."""
    _setup_logging(verbose)
    with _cli_boundary(debug, as_json):
        from prune_cli.recipe.config import load_recipe
        from prune_cli.run.sweep import check_plot_path, parse_list, plot, points, run_sweep

        try:
            values = [float(x) for x in parse_list(sparsities)]
        except ValueError:
            raise typer.BadParameter(f"expected numbers, got {sparsities!r}", param_hint="--sparsities") from None
        grid = points(parse_list(methods), values, parse_list(patterns))
        base = {
            "calibration": {"text": [str(p) for p in calib_text] if calib_text else None, "samples": calib_samples,
                            "seqlen": seqlen, "seed": seed},
            "evaluation": {"text": [str(p) for p in eval_text] if eval_text else None, "windows": eval_windows,
                           "seqlen": eval_seqlen, "tasks": list(_parse_tasks(eval_tasks)) or None, "task_limit": task_limit},
            "device": device, "dtype": dtype,
        }
        recipe_data = load_recipe(recipe) if recipe else None
        if plot_path is not None:
            check_plot_path(plot_path)
        try:
            with _signals_as_interrupts(), RichEvents() as events:
                report = run_sweep(model, recipe_data, base, grid, offline=offline, keep=keep_checkpoints,
                                   overwrite=overwrite, baseline_cache=baseline_cache, events=events, max_memory=max_memory)
        except BaseException as exc:  # noqa: BLE001 - the points that finished are printed, then the error
            if getattr(exc, "sweep_report", None) is None:
                raise
            _sweep_stopped(exc.sweep_report, exc, as_json, debug)
        if plot_path is not None:
            try:
                report["plot"] = str(plot(report, plot_path))
            except Exception as exc:  # noqa: BLE001 - the sweep's results are printed all the same
                _sweep_stopped(report, exc, as_json, debug)
        _print_sweep(report, as_json)


def _print_sweep(report: dict, as_json: bool) -> None:
    """The sweep report: one JSON object, or the table of its points."""
    with _printing_results():
        _print_sweep_report(report, as_json)


def _print_sweep_report(report: dict, as_json: bool) -> None:
    from prune_cli.run.sweep import plan_summary

    if as_json:
        _emit_json(report)
        return
    table = Table(title=f"prune-cli sweep: {report['model']} (dense perplexity {_fmt(report['dense']['ppl'])})")
    for col in ("method", "sparsity / pattern", "achieved", "perplexity", "ratio", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in plan_summary(report):
        table.add_row(*[_fmt(v) for v in row])
    _print_table(table)
    if report.get("points_planned"):
        stdout.print(f"stopped after {len(report['runs'])} of {report['points_planned']} points", highlight=False, soft_wrap=True)
    if report.get("plot"):
        stdout.print(f"plot: {report['plot']}", highlight=False, soft_wrap=True)


def _sweep_stopped(partial: dict, exc: BaseException, as_json: bool, debug: bool) -> None:
    """A sweep point failed (or the sweep was stopped) after others finished: their results on
    stdout (under ``--json`` the one JSON object, with the error and exit code in it), then the
    error's one line on stderr and its exit code."""
    kind, message, hint, code, _ = _error_fields(exc)
    from prune_cli.core.errors import StdoutError

    if as_json:
        partial = {**partial, "error": {"type": kind, "message": message, "hint": hint}, "exit_code": code}
    with contextlib.suppress(StdoutError):  # the point's own error is the one to say
        _print_sweep(partial, as_json)
    _fail(exc, debug, as_json=False)


@app.command("verify")
def verify_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder written by prune-cli compress."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check a checkpoint against its report: every tensor's bytes against its recorded sha256,
    every pruned layer's zeros and N:M pattern recomputed from the stored weights.

    Exit codes: 0 it matches, 2 a mismatch (the first tensor or layer named), 1 internal error."""
    _setup_logging(False)
    with _cli_boundary(debug, as_json):
        from prune_cli.run.verify import verify_checkpoint

        summary = verify_checkpoint(checkpoint)
        with _printing_results():
            if as_json:
                _emit_json({"ok": True, **summary})
            else:
                note = "" if summary["hashes_recorded"] else " (no tensor hashes recorded: an older prune-cli wrote it)"
                stdout.print(f"{checkpoint}: ok, {summary['tensors_checked']} tensors and {summary['layers_checked']} "
                             f"pruned layers match its report{note}", highlight=False, soft_wrap=True)


def method_summary(cls) -> str:
    """The first line of a method class's own docstring (a dataclass without one gets a
    generated ``Name(field: type = default)`` text, which is no description)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc.strip() or doc.startswith(f"{cls.__name__}("):
        return "(no description)"
    return doc.strip().splitlines()[0]


def method_options(cls) -> str:
    """``name=default, ...`` of a method's recipe options (``-O`` / ``method_options:``)."""
    import dataclasses

    return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init)


@app.command("methods")
def methods_command() -> None:
    """List every weight and activation method, with its options (-O KEY=VALUE)."""
    import textwrap

    from prune_cli.activation import ACTIVATION_METHODS
    from prune_cli.methods import WEIGHT_METHODS

    width, indent = max(40, stdout.width), " " * 13

    def say(first: str, text: str) -> None:  # hanging indent, wrapped at the terminal's width
        for line in textwrap.wrap(text, width - 1, initial_indent=first, subsequent_indent=indent):
            stdout.print(line, markup=False, highlight=False, soft_wrap=True)

    for title, registry in (("weight methods (--method; prune the weights)", WEIGHT_METHODS),
                            ("activation methods (--method; skip small inputs at run time)", ACTIVATION_METHODS)):
        stdout.print(title, markup=False, highlight=False, soft_wrap=True)
        for name in registry:
            cls = registry.get(name)
            say(f"  {name:<10} ", method_summary(cls))
            say(indent, f"options: {method_options(cls) or '(none)'}")


def main(argv: list[str] | None = None) -> None:
    """The ``prune-cli`` entry point. Usage errors found by the option parser (before a command
    runs) keep their message and exit code 2, and with ``--json`` are a JSON object too."""
    from prune_cli.core.allocator import keep_freed_memory

    keep_freed_memory()  # a CLI run owns its process: no page-fault storms (see prune_cli.core.allocator)
    global _ARGV
    args = sys.argv[1:] if argv is None else list(argv)
    _ARGV = args
    if _stdout_closed():  # nowhere for the results; and a file opened later would get its descriptor
        if sys.stderr is not None:
            sys.stderr.write("error: stdout is closed: prune-cli prints its results there (nothing was run)\n"
                             "hint: send it to a file or to /dev/null (> report.json) instead of closing it (>&-)\n")
        sys.exit(2)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="prune-cli", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors, as Typer vendors them
        exc.show()
        code = getattr(exc, "exit_code", 2)
        if "--json" in args:
            _emit_json({"error": {"type": "UsageError", "message": _one_line(exc.format_message()), "hint": "see --help"},
                        "exit_code": code})
    except typer.Abort:
        _emit_error("Interrupted", "interrupted by SIGINT: nothing was written to --output", None, 130, "--json" in args, label="stopped")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
