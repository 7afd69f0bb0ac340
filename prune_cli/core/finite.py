"""Detecting NaN and +-inf where they first appear: weights, calibration activations, statistics.

A single non-finite value poisons everything downstream (statistics, scores, masks, the
perplexity) without any exception, so prune-cli checks each kind of value once, where it is
made, and raises :class:`~prune_cli.core.errors.NonFiniteError` (exit code 2) naming the module:

* weights: every parameter and floating buffer after loading (:func:`check_finite_parameters`),
* calibration activations: the inputs of the first decoder block and every block's outputs
  (:mod:`prune_cli.calibrators.layerwise`),
* statistics: each finished input statistic (:class:`prune_cli.calibrators.stats.InputStats`),
* activation sparsifiers: thresholds, channel scales and low-rank factors once fitted.

The test is one ``torch.aminmax`` reduction per tensor: ``min`` and ``max`` are both finite
if and only if every element is (NaN propagates through both, ``+inf`` is the max, ``-inf`` the
min). Unlike ``torch.isfinite(t).all()`` it allocates no boolean copy of the tensor, and it is
about 20x faster on the CPU (measured: 17 ms vs 360 ms for 64M fp32 values on 2 cores). The
element counts of the message are only computed once something was found.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeGuard

import torch
from torch import nn

from prune_cli.core.errors import NonFiniteError

WEIGHTS_HINT = (
    "the checkpoint is corrupt or was saved in a dtype that overflowed (with --dtype float16 its "
    "values may also exceed float16's range: try --dtype float32); prune-cli never exports non-finite weights"
)


def _checkable(t: torch.Tensor | None) -> TypeGuard[torch.Tensor]:
    return t is not None and t.is_floating_point() and t.numel() > 0 and t.device.type != "meta"


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on ``t``'s device, True iff every element of ``t`` is finite. No host
    sync: combine flags of several tensors and read them once (:func:`all_finite`)."""
    if not _checkable(t):
        return torch.ones((), dtype=torch.bool, device=t.device if t is not None else None)
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return torch.isfinite(lo) & torch.isfinite(hi)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True iff every element of every tensor is finite (one host sync per device)."""
    flags = [finite_flag(t) for t in tensors if _checkable(t)]
    if not flags:
        return True
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    return all(bool(torch.stack(group).all()) for group in by_device.values())


def is_finite(t: torch.Tensor | None) -> bool:
    """True iff every element of ``t`` is finite (True for None, empty or non-float tensors)."""
    return not _checkable(t) or bool(finite_flag(t))


def count_nonfinite(tensors: torch.Tensor | Iterable[torch.Tensor]) -> tuple[int, int, int]:
    """``(NaN, +inf, -inf)`` element counts over one tensor or several."""
    if isinstance(tensors, torch.Tensor):
        tensors = (tensors,)
    nan = pos = neg = 0
    for t in tensors:
        if not _checkable(t):
            continue
        t = t.detach()
        nan += int(torch.isnan(t).sum())
        pos += int(torch.isposinf(t).sum())
        neg += int(torch.isneginf(t).sum())
    return nan, pos, neg


def describe_nonfinite(tensors: torch.Tensor | Iterable[torch.Tensor]) -> str:
    """E.g. ``"1 NaN, 0 +inf, 0 -inf"``."""
    nan, pos, neg = count_nonfinite(tensors)
    return f"{nan} NaN, {pos} +inf, {neg} -inf"


def check_finite_tensor(t: torch.Tensor | None, what: str, hint: str | None = None) -> None:
    """Raise :class:`NonFiniteError` ``"non-finite values in {what}: 1 NaN, 0 +inf, 0 -inf"``
    unless every element of ``t`` is finite."""
    if t is not None and not is_finite(t):
        raise NonFiniteError(f"non-finite values in {what}: {describe_nonfinite(t)}", hint=hint)


def check_finite_tensors(tensors: Iterable[torch.Tensor], what: str, hint: str | None = None) -> None:
    """:func:`check_finite_tensor` over several tensors at once (e.g. the batches of one block's
    outputs): one host sync per device; the counts of the message are summed over all."""
    tensors = list(tensors)
    if not all_finite(tensors):
        raise NonFiniteError(f"non-finite values in {what}: {describe_nonfinite(tensors)}", hint=hint)


def _named_tensors(module: nn.Module, recurse: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return dict(module.named_parameters(recurse=recurse)), dict(module.named_buffers(recurse=recurse))


def nonfinite_parameters(module: nn.Module, prefix: str = "", recurse: bool = True) -> list[str]:
    """Full names of the parameters and floating buffers of ``module`` that hold NaN or +-inf,
    in ``named_parameters`` then ``named_buffers`` order (tied weights once)."""
    dot = f"{prefix}." if prefix else ""
    params, buffers = _named_tensors(module, recurse)
    return [dot + n for n, t in (params | buffers).items() if not is_finite(t)]


def check_finite_parameters(
    module: nn.Module, prefix: str = "", hint: str | None = WEIGHTS_HINT, recurse: bool = True
) -> None:
    """Raise :class:`NonFiniteError` naming the FIRST parameter or floating buffer of ``module``
    that holds NaN or +-inf, by full name (``prefix`` + its name in ``module``), e.g.
    ``"non-finite weights in model.layers.1.mlp.down_proj.weight: 1 NaN, 0 +inf, 0 -inf"``,
    plus how many other tensors are non-finite. ``recurse=False``: only ``module``'s own."""
    dot = f"{prefix}." if prefix else ""
    params, buffers = _named_tensors(module, recurse)
    bad = [n for n, t in (params | buffers).items() if not is_finite(t)]
    if not bad:
        return
    first = bad[0]
    kind = "weights" if first in params else "buffer"
    counts = describe_nonfinite((params | buffers)[first])
    more = ""
    if len(bad) > 1:
        shown = ", ".join(dot + n for n in bad[1:4]) + (", ..." if len(bad) > 4 else "")
        more = f" (and {len(bad) - 1} more non-finite tensors: {shown})"
    raise NonFiniteError(f"non-finite {kind} in {dot}{first}: {counts}{more}", hint=hint)
