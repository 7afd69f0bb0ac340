"""The weight-method interface and the shared mask selection.

A :class:`WeightMethod` turns one Linear's weight ``W`` (shape ``(out, in)``) and the
statistics of its input into a new weight and a KEEP mask of the same shape. Score-based
methods only implement :meth:`ScoreMethod.score`; all of them share :func:`select`.

Each method declares what it is, as class attributes the rest of prune-cli reads instead of
lists of names: the input statistics it needs (``required_stats``), whether it changes the
weights it keeps (``updates_weights``), the patterns it can produce (``patterns``, checked by
:meth:`WeightMethod.check_pattern`), whether DSnoT may start from it (``dsnot_base``) and
whether it may reorder input channels (``permutes_inputs``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.errors import RecipeError
from prune_cli.core.memory import process_freed_memory
from prune_cli.core.options import build_from_options
from prune_cli.core.patterns import NM, SparsityPattern, Unstructured
from prune_cli.core.registry import Registry
from prune_cli.core.selection import select  # noqa: F401 - re-exported: methods.base.select


@contextmanager
def few_threads(device: torch.device):
    """For long chains of tiny ops (SparseGPT's column sweep, DSnoT's cycles): on the CPU, one
    thread avoids OpenMP barrier stalls, which made them ~20x slower here with 2 threads while
    another process shared the cores (and no faster on an idle machine)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pattern_kind(pattern) -> str:
    """``unstructured`` or ``N:M`` for a pattern or a pattern type (for messages)."""
    return "N:M" if pattern is NM or isinstance(pattern, NM) else "unstructured"


# One Linear to prune: its weight ``(out, in)``, its input statistics, its pattern.
Job = tuple[torch.Tensor, "InputStats | None", SparsityPattern]


@dataclass(frozen=True)
class PruneResult:
    weight: torch.Tensor  # (out, in), the dtype of the input weight, zeros where ~mask
    mask: torch.Tensor  # (out, in) bool, True = kept
    # The method's own per-layer diagnostics (JSON-ready: str keys, numbers, strings); the
    # pruning stage records them as the layer's ``diagnostics`` in the report. None: nothing.
    info: dict | None = None
    # The order of the input channels ``weight`` and ``mask`` are in (``perm[c]`` = the original
    # input channel now at ``c``), when the method permuted them (RIA under N:M, only where the
    # input's statistics carry ``channel_groups``); the pruning stage reorders the producers'
    # rows to match (:func:`prune_cli.methods.permutation.fold_into_producers`). None: original order.
    input_permutation: torch.Tensor | None = None


class WeightMethod(ABC):
    """Base of weight-pruning methods. Subclasses are frozen dataclasses whose fields are the
    method's recipe options (validated strictly by :meth:`from_options`)."""

    name: ClassVar[str]
    # The input statistics the calibrator collects for it (none: no calibration pass needed).
    required_stats: ClassVar[frozenset[Stat]] = frozenset()
    # Whether the method may reorder a Linear's input channels (``PruneResult.input_permutation``)
    # when its input statistics say which reorderings fold into the checkpoint (``channel_groups``).
    permutes_inputs: ClassVar[bool] = False
    # Whether kept weights may differ from the dense ones (SparseGPT, ALPS); False: a mask only.
    updates_weights: ClassVar[bool] = False
    # The sparsity patterns it produces exactly (pattern types of :mod:`prune_cli.core.patterns`).
    patterns: ClassVar[tuple[type, ...]] = (Unstructured, NM)
    # Whether DSnoT's prune-and-grow may start from this method's result (``dsnot base:``).
    dsnot_base: ClassVar[bool] = False

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> WeightMethod:
        return build_from_options(cls, options)

    def validate(self) -> None:  # noqa: B027 - an optional hook: most methods check their options
        """Raise :class:`RecipeError` for invalid option values."""

    def check_pattern(self, pattern: SparsityPattern) -> None:
        """Raise :class:`RecipeError` when ``pattern`` is not one of the declared ``patterns``."""
        if not isinstance(pattern, self.patterns):
            raise RecipeError(f"{self.name} has no {pattern_kind(pattern)} pattern",
                              hint=f"{self.name} prunes {' or '.join(pattern_kind(p) for p in self.patterns)}")

    @property
    def unstructured_scope(self) -> str:
        """Where an unstructured pattern's count is exact: ``row`` (``floor(in * s)`` removed in
        every row) or ``matrix`` (``floor(out * in * s)`` over the whole matrix; SparseGPT: over
        each tile of ``blocksize`` columns, the whole matrix when it is no wider)."""
        return "row"

    def for_layer(self, local_name: str) -> WeightMethod:
        """The method to apply to the Linear ``local_name`` (relative to its block); a composite
        method may leave some layers to its base."""
        return self

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @abstractmethod
    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None
    ) -> PruneResult:
        """Prune one Linear. ``weight``: ``(out, in)``; ``stats``: its input statistics;
        ``backend``: a :mod:`prune_cli.gpu.backend` backend for mask selection (None = torch)."""

    def prune_group(self, jobs: list[Job], backend=None) -> list[PruneResult]:
        """Prune several Linears of one block (same method); a method that can share work
        between them (DSnoT's swap loop) overrides this. Results are in the order of ``jobs``
        and equal to calling :meth:`prune` on each. Under a tight memory limit what a Linear's
        temporaries held goes back to the system before the next (:func:`process_freed_memory`)."""
        results = []
        for weight, stats, pattern in jobs:
            results.append(self.prune(weight, stats, pattern, backend))
            process_freed_memory().after_block()
        return results


class ScoreMethod(WeightMethod):
    """A method that ranks weights by a score and masks the lowest (no weight update)."""

    @abstractmethod
    def score(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """Importance of each weight, ``(out, in)`` float32; higher = keep."""

    def selection_scope(self) -> str:
        return "row"

    @property
    def unstructured_scope(self) -> str:
        return self.selection_scope()

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        score = self.score(weight, stats)
        if backend is not None:
            mask = backend.select_mask(score, pattern, self.selection_scope())
        else:
            mask = select(score, pattern, self.selection_scope())
        return PruneResult(weight * mask, mask)  # bool promotes per element, no float copy of the mask


# The registry of weight methods by their recipe/CLI names; ``prune_cli.methods`` registers them.
WEIGHT_METHODS: Registry[type[WeightMethod]] = Registry("method")


def build_method(name: str, options: dict | None = None) -> WeightMethod:
    """The method registered as ``name``, built from its recipe options."""
    return WEIGHT_METHODS.get(name).from_options(options)


def dsnot_bases() -> list[str]:
    """The registered methods that declare ``dsnot_base``, in registration order."""
    return [name for name in WEIGHT_METHODS.in_registration_order() if WEIGHT_METHODS.get(name).dsnot_base]
