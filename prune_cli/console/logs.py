"""Logging on stderr: rich's handler on a terminal, one plain timestamped line per record
otherwise (CI logs); the quiet settings of the libraries a run uses; the launcher's rank (under
torchrun only rank 0 logs and shows progress)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.logging import RichHandler

from prune_cli.console.progress_log import clock_time
from prune_cli.console.streams import one_line, stderr


class PlainLogFormat(logging.Formatter):
    """One line per record for logs that are not a terminal (CI): ``[prune-cli] HH:MM:SS
    message``, with the level for warnings and errors; never wrapped."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[prune-cli] {clock_time(record.created)} {level}{one_line(record.getMessage())}"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def launcher_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def setup_logging(verbose: bool) -> None:
    if stderr.is_terminal:
        handler: logging.Handler = RichHandler(console=stderr, show_time=False, show_path=False)
    else:
        handler = StderrHandler()
        handler.setFormatter(PlainLogFormat())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("prune_cli").setLevel(logging.DEBUG if verbose else logging.WARNING if launcher_rank() > 0 else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own bars
        try:
            from transformers.utils import logging as hf_logging  # noqa: PLC0415 - heavy; only when a command runs

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
