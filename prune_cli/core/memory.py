"""The memory budget of a run: how much memory the machine (or its cgroup) allows, how much the
calibration activations of a job take, and sizes as people write them (``--max-memory 8GB``).

Everything else a streamed run holds is bounded by the model's shape, not its depth: the parts
outside the decoder blocks (embeddings, final norm, ``lm_head``) and two blocks. The token
windows' hidden states are what grows with the calibration settings; when their estimate exceeds
the budget they are kept on disk (:mod:`prune_cli.calibrators.spill`), exactly, at the cost of
a read and a write per batch and pass.
"""

from __future__ import annotations

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
