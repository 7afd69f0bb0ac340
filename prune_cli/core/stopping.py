"""Stopping a long run at the end of the current block, so it can be resumed.

The CLI's SIGINT / SIGTERM handler asks :func:`request`: while a walk that keeps resume state is
running (:func:`deferring`), the first signal is remembered and the walk stops after the block
it is working on, once the resume state is written (:func:`check`); a second signal, or one that
arrives outside such a walk, stops at once. Library code never installs signal handlers.
"""

from __future__ import annotations

import contextlib
import logging

from prune_cli.core.errors import InterruptedRun

log = logging.getLogger(__name__)

_depth = 0
_pending: InterruptedRun | None = None


@contextlib.contextmanager
def deferring():
    """While inside, a first stop request waits for :func:`check` (the end of a block)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def request(interrupt: InterruptedRun) -> None:
    """A stop request (from a signal handler): deferred inside :func:`deferring` the first
    time, else raised here and now."""
    global _pending
    if _depth == 0 or _pending is not None:
        raise interrupt
    _pending = interrupt
    log.warning("%s: stopping after the current block to keep the resume state (%s again to stop now)",
                interrupt.signal_name, "Ctrl-C" if interrupt.signal_name == "SIGINT" else interrupt.signal_name)


def pending() -> bool:
    return _pending is not None


def check() -> None:
    """Raise the deferred stop request, if there is one (call where stopping is safe)."""
    global _pending
    if _pending is not None:
        interrupt, _pending = _pending, None
        interrupt.at_block_boundary = True
        raise interrupt


def reset() -> None:
    global _pending
    _pending = None
