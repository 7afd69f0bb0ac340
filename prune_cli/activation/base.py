"""The activation-method interface, its registry, and the shared threshold.

An :class:`ActivationMethod` fits a :class:`~prune_cli.activation.modules.SparseInputLinear`
for one Linear from a sample of its calibration inputs ``X`` (``(n, in)`` fp32). Each method
declares what it is, as attributes the rest of prune-cli reads instead of lists of names: the
patterns it supports (``patterns``; activation sparsity is unstructured), what its fitted module
holds at run time (:attr:`ActivationMethod.runtime_form`, the buffers the exported activation
file carries), the extra per-layer report fields it records, and whether it rewrites the model
before fitting (:attr:`ActivationMethod.transforms_model`, WINA's tensor transform).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prune_cli.activation.modules import SparseInputLinear
from prune_cli.core.errors import RecipeError
from prune_cli.core.options import build_from_options
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.registry import Registry
from prune_cli.gpu.torch_backend import TorchBackend


def quantile_threshold(
    x: torch.Tensor, sparsity: float, scale: torch.Tensor | None = None, backend: Any = None
) -> float:
    """``tau`` such that a fraction ``sparsity`` of the scores is ``<= tau`` (exact, by k-th value).

    Scores ``S[t, j] = |x[t, j]| * scale[j]`` over all entries, or ``|x[t, j]|`` when ``scale``
    is ``None``; ``x``: ``(n, in)`` (or ``(..., in)``), ``scale``: ``(in,)``. With
    ``k = round(sparsity * numel)``: ``tau`` is the ``min(k, numel)``-th smallest score, and
    ``k <= 0`` (e.g. ``sparsity == 0``) gives ``-1`` so that every channel is kept.

    A backend whose ``device`` is ``x``'s (the CuPy backend) computes it with
    ``backend.activation_threshold(x, scale, k)`` (scores fused, radix select; see
    :class:`prune_cli.gpu.backend.Backend`, whose every backend has it). Otherwise (``None``,
    the torch backend, which has no device of its own, or a backend on another device): the
    torch backend's, ``kthvalue`` on the materialised scores. Both give the same number.
    """
    numel = x.numel()
    k = min(int(round(sparsity * numel)), numel)
    if k <= 0:
        return -1.0
    if scale is not None:
        scale = scale.to(x.device)
    if getattr(backend, "device", None) != x.device:
        backend = TorchBackend()
    return float(backend.activation_threshold(x, scale, k))


def column_norms(linear: nn.Linear) -> torch.Tensor:
    """``||W_:,i||_2`` per input channel, ``(in,)`` fp32."""
    return torch.linalg.vector_norm(linear.weight.detach().float(), dim=0)


@dataclass(frozen=True)
class RuntimeForm:
    """What a fitted sparsifier holds at run time, i.e. what the checkpoint's activation file
    carries for its Linear. Every form is a :class:`SparseInputLinear` with a ``threshold``, a
    ``keep_count`` and a ``channel_scale``; the flags say which of them carry information."""

    # channel_scale: the weight's column norms ||W_:,i|| (WINA, R-Sparse), or all ones (TEAL)
    scaled: bool = False
    # lowrank_u / lowrank_v: a low-rank remainder for the skipped channels (R-Sparse)
    lowrank: bool = False
    # keep_count > 0: a per-token top-k instead of the calibrated threshold (WINA's topk)
    per_token_topk: bool = False
    # attributes of the fitted module recorded per layer in the report where the fit set them
    # (R-Sparse's alpha; a layer fitted at sparsity 0 has none)
    reported: tuple[str, ...] = ()

    @property
    def buffers(self) -> tuple[str, ...]:
        """The buffer names the exported activation file holds per Linear (low-rank factors only
        where the fitted rank is > 0)."""
        return ("threshold", "keep_count", "channel_scale") + (("lowrank_u", "lowrank_v") if self.lowrank else ())


class ActivationMethod(ABC):
    """Base of activation-sparsity methods. Subclasses are frozen dataclasses whose fields are
    the method's recipe options (validated strictly by :meth:`from_options`)."""

    name: ClassVar[str]
    # The sparsity patterns it produces: activation sparsity is per token, never N:M.
    patterns: ClassVar[tuple[type, ...]] = (Unstructured,)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> ActivationMethod:
        return build_from_options(cls, options)

    @classmethod
    def check_pattern_text(cls, text: str | None) -> None:
        """Raise :class:`RecipeError` when the recipe's ``pattern`` (unparsed: any text but
        ``unstructured`` is refused here, before it is parsed) is not one this method declares."""
        if (text or "unstructured").strip().lower() != "unstructured" and NM not in cls.patterns:
            raise RecipeError("activation methods have no N:M pattern", hint="drop --pattern")

    def validate(self) -> None:  # noqa: B027 - an optional hook: most methods check their options
        """Raise :class:`RecipeError` for invalid option values."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @property
    def runtime_form(self) -> RuntimeForm:
        """What this method's fitted module holds (see :class:`RuntimeForm`)."""
        return RuntimeForm()

    @property
    def transforms_model(self) -> bool:
        """Whether the model is rewritten before fitting (WINA's tensor transform): the run
        then checks the model supports it and the checkpoint carries the rotations."""
        return False

    def fit_record(self, module: SparseInputLinear) -> dict[str, Any]:
        """The report's per-layer fields of a module this method fitted: its threshold, its
        low-rank rank and those of the attributes its runtime form lists as ``reported`` that
        the fit set."""
        record: dict[str, Any] = {"threshold": float(module.threshold), "rank": module.rank}
        for field in self.runtime_form.reported:
            value = getattr(module, field, None)
            if value is not None:
                record[field] = value
        return record

    def channel_scale(self, linear: nn.Linear) -> torch.Tensor:
        return torch.ones(linear.in_features)

    def scores(self, linear: nn.Linear, x: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        return x.abs() * self.channel_scale(linear).to(x.device)

    @abstractmethod
    def fit(
        self, linear: nn.Linear, x: torch.Tensor, sparsity: float, cache: dict | None = None, backend: Any = None
    ) -> SparseInputLinear:
        """A sparsifier for ``linear`` skipping about ``sparsity`` of the inputs ``x`` ``(n, in)``.
        ``cache`` is shared by the Linears of one block: ``local`` (this Linear's name in the
        block) and ``linears`` (the block's Linears by name) are set by the calibrator.
        ``backend`` (:class:`prune_cli.gpu.backend.Backend` or ``None``) computes the threshold
        (:func:`quantile_threshold`); every backend gives the same threshold."""


# The registry of activation methods by their recipe/CLI names; ``prune_cli.activation``
# registers them (registration order = the order help texts name them in).
ACTIVATION_METHODS: Registry[type[ActivationMethod]] = Registry("activation method")


def build_activation_method(name: str, options: dict | None = None) -> ActivationMethod:
    """The activation method registered as ``name``, built from its recipe options."""
    return ACTIVATION_METHODS.get(name).from_options(options)


def activation_method_help() -> str:
    """The help of the ``activation.method`` recipe key: every registered activation method."""
    return f"Activation sparsity method: {', '.join(ACTIVATION_METHODS.in_registration_order())}."
