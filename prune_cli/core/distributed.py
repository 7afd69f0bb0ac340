"""Data-parallel calibration under ``torchrun`` / ``accelerate launch`` (no flag: the world size
comes from the environment they set).

Calibration statistics are sums and counts (:class:`~prune_cli.calibrators.stats.InputStats`),
so ranks split the work by token windows: each rank takes a contiguous share of the calibration,
validation and evaluation windows, pushes them through each block in its own batches, and the
block's statistics are summed over the ranks
(``torch.distributed.all_reduce``, gloo on the CPU, NCCL on CUDA) before any rank prunes. Every
rank then holds the same statistics, computes the same masks and weights (bit for bit: an
all-reduce hands every rank the same sums), and rank 0 writes the checkpoint. Perplexities are
summed the same way (negative log-likelihoods and token counts).

Against one process: with two ranks whose shares fill whole batches, each rank's batches are the
one process's batches and a two-way sum is the same addition, so the checkpoint is bit-identical
(with the same threads per process: more threads sum a matmul in another order; measured on the
bundled model with Wanda and SparseGPT 50%, and tested on a tiny one). Otherwise (more ranks, batches cut
differently) the sums are grouped differently and round differently: Wanda's masks then differ
only at near-ties, but SparseGPT's weight updates carry a flipped decision on through the rest
of the row (tested on a tiny model: >= 99.9% of mask entries, 0.5% perplexity). Activation sparsity (thresholds are quantiles over all tokens)
and ``--resume`` (each rank holds part of the state) run in one process only.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from prune_cli.core.errors import BadInputError

log = logging.getLogger(__name__)


def requested() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init(device: torch.device) -> None:
    """Join the launcher's process group (once), gloo on the CPU, NCCL on CUDA."""

    if requested() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d of %d (%s)", rank(), size(), dist.get_backend())


def active() -> bool:

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:

    return dist.get_rank() if active() else 0


def size() -> int:

    return dist.get_world_size() if active() else 1


def bounds(n: int, ranks: int, r: int) -> tuple[int, int]:
    """Rank ``r``'s contiguous share ``[start, stop)`` of ``n`` windows (the first ``n % ranks``
    ranks take one more)."""
    base, extra = divmod(n, ranks)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(windows: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """This rank's windows: a contiguous share (:func:`bounds`)."""
    if windows is None or not active():
        return windows
    if windows.shape[0] < size():
        raise BadInputError(f"{windows.shape[0]} {what} windows cannot be split over {size()} processes",
                            hint=f"use at least {size()} windows, or fewer processes")
    start, stop = bounds(windows.shape[0], size(), rank())
    return windows[start:stop]


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (float32 sums stay float32)."""
    if active():

        dist.all_reduce(tensor)
    return tensor


def sum_numbers(*values: float) -> list[float]:
    """Python numbers summed over the ranks (in float64)."""
    if not active():
        return list(values)

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce_(tensor).tolist()


def sum_stats(stats) -> None:
    """Sum one block input's statistics over the ranks, in place."""
    if not active():
        return
    for name in ("sum", "sum_sq", "xtx"):
        value = getattr(stats, name)
        if value is not None:
            all_reduce_(value)
    count, xtx_tokens = sum_numbers(stats.count, stats.xtx_tokens)
    stats.count, stats.xtx_tokens = int(count), int(xtx_tokens)
    stats._finite = False


def barrier() -> None:
    if active():

        dist.barrier()
