"""The memory budget of a run: how much memory the machine (or its cgroup) allows, how much the
calibration activations of a job take, and sizes as people write them (``--max-memory 8GB``).

Everything else a streamed run holds is bounded by the model's shape, not its depth: the parts
outside the decoder blocks (embeddings, final norm; an untied ``lm_head`` only while the head is
used, after a walk's blocks) and two blocks. The token
windows' hidden states are what grows with the calibration settings; when their estimate exceeds
the budget they are kept on disk (:mod:`prune_cli.calibrators.spill`), exactly, at the cost of
a read and a write per batch and pass.
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

from prune_cli.core.errors import RecipeError

DEFAULT_FRACTION = 0.4  # of the memory limit, for the activations when --max-memory is not given

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"8GB"`` -> 8e9 bytes, ``"512MiB"``, ``"1e9"``, ``"0"``; a :class:`RecipeError` otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise RecipeError(f"--max-memory must be a size like 8GB, 512MiB or 2e9 bytes, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_limit() -> int:
    """Bytes this process may use: the machine's RAM, or less where a cgroup (v1 or v2) limits it."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    limits = [v for v in (total, _cgroup_limit()) if v]
    return min(limits) if limits else 8 * 2**30


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup, if any (v2 ``memory.max``, v1 ``limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            found.append(_read_int(f"/sys/fs/cgroup{path}/memory.max"))
        elif "memory" in controllers.split(","):
            found.append(_read_int(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
    limits = [v for v in found if v is not None and 0 < v < 2**60]
    return min(limits) if limits else None


def activation_bytes(hidden_size: int, element_bytes: int, n_blocks: int, streams: dict[str, int]) -> dict[str, int]:
    """Bytes of the hidden states each stream keeps (``streams``: name -> tokens; the Fisher
    pass keeps its windows' inputs of every block, so its tokens count ``n_blocks`` times)."""
    return {name: tokens * hidden_size * element_bytes * (n_blocks if name == "fisher inputs" else 1)
            for name, tokens in streams.items() if tokens}


def human(n: float) -> str:
    if n < 1e6:
        return f"{n / 1e3:.0f} kB"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


TRIM_FRACTION = 0.5  # of the memory limit: above it, freed memory goes back to the system after each block


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (musl, macOS, Windows: their allocators differ)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Hand the memory the C allocator holds but no longer uses back to the operating system;
    whether this allocator can (glibc's ``malloc_trim(0)``: every whole free page of every arena).

    Why it is needed: a CLI run keeps freed memory in the heap on purpose
    (:func:`prune_cli.core.allocator.keep_freed_memory`: no ``mmap``-ed blocks, the heap top never
    trimmed), which saves the page faults of re-allocating, but holds the high-water mark of
    every transient, fragmented among live tensors. Streaming 40 blocks of a 0.9 GB model, the
    live heap peaked at 364 MiB while the resident anonymous memory reached 620-660 MiB, inside
    45 MiB of a 700 MiB cgroup (``tests/integration/test_memory_limit.py``); ``malloc_trim``
    releases free pages whatever the trim threshold says. Why not always: memory handed back is
    faulted in again by the next block, which cost that run 15-20% of its time."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_anonymous_bytes() -> int | None:
    """This process's resident anonymous memory (``RssAnon`` of ``/proc/self/status``): what a
    memory limit cannot reclaim. ``None`` where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class FreedMemory:
    """Keeps a streamed walk's resident memory near its live data when memory is tight.

    :meth:`after_block` trims the allocator (:func:`release_freed_memory`) once the resident
    anonymous memory exceeds ``fraction`` of ``limit`` (default: :func:`memory_limit`); with
    room to spare it costs one read of ``/proc/self/status``. ``trims`` counts what it did."""

    def __init__(self, limit: int | None = None, fraction: float = TRIM_FRACTION):
        self.threshold = int((limit if limit is not None else memory_limit()) * fraction)
        self.trims = 0

    def after_block(self) -> bool:
        resident = resident_anonymous_bytes()
        if resident is None or resident <= self.threshold:
            return False
        if release_freed_memory():
            self.trims += 1
            return True
        return False


_PROCESS: list[FreedMemory] = []


def process_freed_memory() -> FreedMemory:
    """The process's :class:`FreedMemory` (one memory limit per process): the driver checks it
    between blocks, the weight methods between the Linears of a block."""
    if not _PROCESS:
        _PROCESS.append(FreedMemory())
    return _PROCESS[0]
