"""Activation-sparsity methods: each fits a :class:`SparseInputLinear` for one Linear from a
sample of its calibration inputs ``X`` (``(n, in)`` fp32).

* **TEAL** (Liu et al. 2024, "Training-Free Activation Sparsity in LLMs"): ``m_i = 1[|x_i| > tau]``
  with ``tau`` the ``s``-quantile of ``|X|`` over all calibration entries (exact quantile of the
  magnitudes; TEAL's released code assumes a symmetric distribution of ``x`` and misses the
  target, e.g. 51% achieved at 50% here).
* **WINA** (Chen et al. 2025, "Weight Informed Neuron Activation"): ``m_i = 1[|x_i| * ||W_:,i||_2 > tau]``
  with ``tau`` the ``s``-quantile of ``|X| * ||W_:,i||`` — on every targeted Linear (the release
  applies the weight-norm criterion only to k_proj and gate_proj). ``transform: true`` first
  applies the paper's tensor transform (:mod:`prune_cli.activation.transform`: norm weights
  folded into q/k/v and gate/up, inputs rotated so k_proj's and gate_proj's columns are
  orthogonal; the dense function is unchanged).
* **R-Sparse** (Zhang et al. 2025, "Rank-Aware Activation Sparsity"):
  ``y = W (x * m) + L (x * (1 - m))`` where ``L = U V`` is a rank-``r`` approximation of ``W``.
  Under a compute budget of ``(1 - s)`` of the dense product, a fraction ``k = (1 - s) alpha``
  of channels (largest ``|x_i| ||W_:,i||``) go through the sparse path and
  ``r = floor((1 - s)(1 - alpha) in out / (in + out))``. Ours makes ``L`` activation-aware:
  ``L = [W C^{1/2}]_r C^{-1/2}`` with ``C = X^T X / n`` (so ``E||(W - L) x||^2`` is minimised,
  not ``||W - L||_F``; ``svd: weight`` gives the plain SVD of the paper). ``alpha`` per layer
  is chosen from a grid by the output error on the calibration sample (the paper's search was
  never released), with ``alpha = 1`` (no low rank) always a candidate. The per-layer budget
  ``s`` is uniform, or with ``allocation: greedy`` comes from the Fisher-weighted greedy
  allocation of :mod:`prune_cli.stages.activation` (on the curves of the sparse path), so
  the search is: greedy over layers for ``s``, then a grid over ``alpha`` per layer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prune_cli.activation.modules import SparseInputLinear
from prune_cli.core.errors import RecipeError
from prune_cli.core.options import build_from_options
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
    :class:`prune_cli.gpu.backend.Backend`). Otherwise (``None``, the torch backend, which has no
    device of its own, or a backend on another device): the torch backend's, ``kthvalue`` on the
    materialised scores. Both give the same number.
    """
    numel = x.numel()
    k = min(int(round(sparsity * numel)), numel)
    if k <= 0:
        return -1.0
    if scale is not None:
        scale = scale.to(x.device)
    if getattr(backend, "device", None) != x.device or not hasattr(backend, "activation_threshold"):
        backend = TorchBackend()
    return float(backend.activation_threshold(x, scale, k))


def column_norms(linear: nn.Linear) -> torch.Tensor:
    """``||W_:,i||_2`` per input channel, ``(in,)`` fp32."""
    return torch.linalg.vector_norm(linear.weight.detach().float(), dim=0)


class ActivationMethod(ABC):
    name: ClassVar[str]

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "ActivationMethod":
        return build_from_options(cls, options)

    def validate(self) -> None:
        pass

    def options(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)  # type: ignore[call-overload]

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


@dataclass(frozen=True)
class Teal(ActivationMethod):
    """TEAL: magnitude thresholds on the input of every Linear."""

    name = "teal"

    def fit(self, linear, x, sparsity, cache=None, backend=None):
        """``tau`` = the ``sparsity``-quantile of ``|x|`` over all ``(n, in)`` entries."""
        return SparseInputLinear(linear, quantile_threshold(x, sparsity, backend=backend))


# The release computes one mask per hidden state from a single reader's column norms.
RELEASED_NORM_SOURCE = {"self_attn.q_proj": "self_attn.k_proj", "self_attn.k_proj": "self_attn.k_proj",
                        "self_attn.v_proj": "self_attn.k_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj"}


@dataclass(frozen=True)
class Wina(ActivationMethod):
    """WINA: thresholds on |x_i| * ||W_:,i||_2 (weight-informed)."""

    name = "wina"
    selection: str = "threshold"  # threshold (calibrated) | topk (per token, as released)
    variant: str = "all"  # all: the criterion on every Linear | released: only k_proj/gate_proj norms
    transform: bool = False  # the paper's tensor transform (prune_cli.activation.transform)

    def validate(self):
        if not isinstance(self.transform, bool):
            raise RecipeError(f"wina transform must be true or false, got {self.transform!r}")
        if self.selection not in ("threshold", "topk"):
            raise RecipeError(f"wina selection must be threshold or topk, got {self.selection!r}")
        if self.variant not in ("all", "released"):
            raise RecipeError(f"wina variant must be all or released, got {self.variant!r}")

    def channel_scale(self, linear, context: dict | None = None):
        if self.variant == "released":
            local = (context or {}).get("local")
            source = RELEASED_NORM_SOURCE.get(local)
            if source is None:
                return torch.ones(linear.in_features)  # o_proj / down_proj: plain magnitudes
            return column_norms(context["linears"][source])
        return column_norms(linear)

    def scores(self, linear, x, context=None):
        return x.abs() * self.channel_scale(linear, context).to(x.device)

    def fit(self, linear, x, sparsity, cache=None, backend=None):
        """``threshold``: ``tau`` = the ``sparsity``-quantile of ``|x[t, j]| * c_j`` over all
        ``(n, in)`` entries, ``c = channel_scale`` ``(in,)`` fp32; ``topk``: no threshold."""
        scale = self.channel_scale(linear, cache)
        if self.selection == "topk":
            keep = max(1, int(round((1 - sparsity) * linear.in_features)))
            return SparseInputLinear(linear, -1.0, scale, keep_count=keep if sparsity > 0 else 0)
        return SparseInputLinear(linear, quantile_threshold(x, sparsity, scale, backend), scale)


@dataclass(frozen=True)
class RSparse(ActivationMethod):
    """R-Sparse: sparse input channels plus a low-rank remainder under a compute budget."""

    name = "rsparse"
    alpha: Any = "auto"  # fraction of the budget spent on sparse channels, or "auto"
    alpha_grid: tuple = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    svd: str = "activation"  # activation | weight
    error_tokens: int = 2048

    def validate(self):
        if self.svd not in ("activation", "weight"):
            raise RecipeError(f"rsparse svd must be 'activation' or 'weight', got {self.svd!r}")
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0 < self.alpha <= 1):
            raise RecipeError(f"rsparse alpha must be 'auto' or in (0, 1], got {self.alpha!r}")
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))

    def channel_scale(self, linear):
        return column_norms(linear)

    @staticmethod
    def rank(sparsity: float, alpha: float, in_f: int, out_f: int) -> int:
        return max(0, math.floor((1 - sparsity) * (1 - alpha) * in_f * out_f / (in_f + out_f)))

    def _factors(self, linear: nn.Linear, x: torch.Tensor, cache: dict | None):
        """``(A, B)`` with ``W ~ A[:, :r] @ B[:r]`` best first: ``A = U S`` and ``B = V^T C^{-1/2}``."""
        W = linear.weight.detach().float()
        if self.svd == "weight":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            return U * S, Vh
        # Linears reading one input (q/k/v) share its whitening; the cache holds the input itself,
        # so a later tensor that reuses a freed one's id() is never taken for it.
        hit = cache.get("rsparse_whiten") if cache is not None else None
        if hit is not None and hit[0] is x:
            root, inv_root = hit[1], hit[2]
        else:
            C = x.T @ x / x.shape[0]
            evals, evecs = torch.linalg.eigh(C.double())
            evals = evals.clamp_min(float(evals.max()) * 1e-8)
            root = (evecs * evals.sqrt()) @ evecs.T
            inv_root = (evecs * evals.rsqrt()) @ evecs.T
            root, inv_root = root.float(), inv_root.float()
            if cache is not None:
                cache["rsparse_whiten"] = (x, root, inv_root)
        U, S, Vh = torch.linalg.svd(W @ root, full_matrices=False)
        return U * S, Vh @ inv_root

    def fit(self, linear, x, sparsity, cache=None, backend=None):
        """Picks ``alpha`` on the error of the calibration sample. R-Sparse keeps its sort-based
        thresholds: one torch sort of the scores ``|x| * ||W_:,i||`` serves the quantile of every
        ``alpha`` of the grid. ``backend`` is accepted (same signature as the other methods) and
        not used."""
        scale = self.channel_scale(linear)
        scores = x.abs() * scale
        in_f, out_f = linear.in_features, linear.out_features
        if sparsity <= 0:
            return SparseInputLinear(linear, -1.0, scale)
        A, B = self._factors(linear, x, cache)
        alphas = self.alpha_grid if self.alpha == "auto" else (float(self.alpha),)
        sample = x[: self.error_tokens]
        W = linear.weight.detach().float()
        reference = sample @ W.T
        ordered = scores.reshape(-1).sort().values  # one sort serves every alpha's quantile
        best = None
        for alpha in alphas:
            k = int(round((1 - (1 - sparsity) * alpha) * ordered.numel()))
            tau = float(ordered[k - 1]) if k > 0 else -1.0
            r = self.rank(sparsity, alpha, in_f, out_f)
            keep = (sample.abs() * scale) > tau
            approx = (sample * keep) @ W.T
            if r > 0:
                approx = approx + ((sample * ~keep) @ B[:r].T) @ A[:, :r].T
            err = float((approx - reference).pow(2).sum())
            if best is None or err < best[0]:
                best = (err, alpha, tau, r)
        _, alpha, tau, r = best
        module = SparseInputLinear(
            linear, tau, scale,
            A[:, :r].contiguous() if r else None,
            B[:r].contiguous() if r else None,
        )
        module.alpha = alpha
        return module
