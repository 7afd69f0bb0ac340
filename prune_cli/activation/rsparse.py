"""R-Sparse (Zhang et al. 2025, "Rank-Aware Activation Sparsity"):
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prune_cli.activation.base import ActivationMethod, RuntimeForm, column_norms
from prune_cli.activation.modules import SparseInputLinear
from prune_cli.core.errors import RecipeError


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

    @property
    def runtime_form(self) -> RuntimeForm:
        """Column norms as the channel scale, low-rank factors (rank from ``alpha``), and the
        chosen ``alpha`` reported per layer."""
        return RuntimeForm(scaled=True, lowrank=True, reported=("alpha",))

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
