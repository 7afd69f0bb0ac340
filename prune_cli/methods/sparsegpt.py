"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot").

For one Linear with weight ``W`` (``(out, in)``) and calibration inputs ``X`` (``(n, in)``):

* Hessian of the layer-wise reconstruction loss ``||WX^T - What X^T||^2``:
  ``H = 2/n X^T X`` (fp32), dampened ``H += lambda I`` with ``lambda = percdamp * mean(diag H)``.
  Dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``: they never see signal.
* ``U = chol(H^-1)^T`` (upper Cholesky factor of the inverse Hessian).
* Columns are swept in blocks of ``blocksize``. For each block the mask removes the weights with
  the smallest OBS saliency ``w_ij^2 / U_jj^2`` (unstructured: over the whole ``out x block``
  tile; N:M: per group of M columns, chosen when the sweep reaches the group). Column ``j``'s
  pruning error ``e = (w_j - q_j) / U_jj`` is propagated to the remaining columns of the block,
  ``W[:, j:] -= e U[j, j:]``, and after the block to all later columns,
  ``W[:, end:] -= E U[block, end:]`` (the OBS update that keeps ``WX`` close).

Returns the updated weights, not only a mask. The Cholesky factor is cached on the shared input
statistics, so q/k/v (and gate/up) factor their common Hessian once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, SparsityPattern, Unstructured
from prune_cli.core.selection import select
from prune_cli.methods.base import PruneResult, WeightMethod, few_threads


def inverse_hessian_factor(stats: InputStats, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: upper Cholesky factor of the dampened inverse Hessian, ``(in, in)``, and
    the boolean mask of dead input channels. Cached on ``stats`` per ``percdamp``."""
    key = ("sparsegpt_hinv", percdamp)
    if key in stats.derived:
        return stats.derived[key]
    H = stats.hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    for attempt in range(6):  # escalate dampening if H is numerically indefinite
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        H.diagonal().add_(damp * (10**attempt))
    else:
        raise RuntimeError("SparseGPT: Hessian is not positive definite even after extra dampening")
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    stats.derived[key] = (U, dead)
    return U, dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, pattern: SparsityPattern, blocksize: int = 128
) -> PruneResult:
    """The blocked OBS sweep. ``weight`` ``(out, in)``; ``U`` ``(in, in)`` upper; returns the
    updated weight (in ``weight``'s dtype) and the KEEP mask."""
    W = weight.detach().float().clone()
    W[:, dead] = 0
    out_features, in_features = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    nm = pattern if isinstance(pattern, NM) else None
    if nm is not None:
        nm.check_fits(in_features)
        blocksize = max(nm.m, blocksize - blocksize % nm.m)
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        with few_threads(W.device):
            Q1, E1, keep1 = _sweep_block(W[:, i1:i2].clone(), U[i1:i2, i1:i2], pattern, nm)
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        if i2 < in_features:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return PruneResult(W.to(weight.dtype) * keep.to(weight.dtype), keep)


def _sweep_block(W1: torch.Tensor, U1: torch.Tensor, pattern: SparsityPattern, nm: NM | None):
    """OBS sweep over one block of columns ``W1`` (``(out, B)``): returns the pruned block ``Q1``,
    the scaled errors ``E1`` (to propagate to later columns) and the block's KEEP mask.

    Works on the transpose so that column ``i`` is a contiguous row (twice as fast on the CPU)."""
    diag = torch.diagonal(U1)
    Wt = W1.t().contiguous()  # (B, out)
    if isinstance(pattern, Unstructured):
        keep_t = select(W1.square() / diag.square(), pattern, scope="matrix").t().contiguous()
    else:
        keep_t = torch.ones_like(Wt, dtype=torch.bool)
    Qt = torch.zeros_like(Wt)
    Et = torch.zeros_like(Wt)
    for i in range(Wt.shape[0]):
        if nm is not None and i % nm.m == 0:
            saliency = Wt[i : i + nm.m].t().square() / diag[i : i + nm.m].square()
            keep_t[i : i + nm.m] = select(saliency, nm).t()
        w = Wt[i]
        q = w * keep_t[i]
        Qt[i] = q
        err = (w - q) / diag[i]
        Wt[i:].addr_(U1[i, i:], err, alpha=-1.0)
        Et[i] = err
    return Qt.t(), Et.t(), keep_t.t()


@dataclass(frozen=True)
class SparseGPT(WeightMethod):
    """SparseGPT: OBS pruning with error-compensating weight updates (Frantar & Alistarh 2023)."""

    name = "sparsegpt"
    required_stats = frozenset({Stat.GRAM})
    updates_weights = True
    dsnot_base = True
    percdamp: float = 0.01
    blocksize: int = 128

    def validate(self) -> None:
        if not (0 <= self.percdamp < 1):
            raise RecipeError(f"sparsegpt percdamp must be in [0, 1), got {self.percdamp}")
        if not (isinstance(self.blocksize, int) and self.blocksize >= 1):
            raise RecipeError(f"sparsegpt blocksize must be a positive integer, got {self.blocksize}")

    @property
    def unstructured_scope(self) -> str:
        return "matrix"  # per tile of ``blocksize`` columns (see WeightMethod.unstructured_scope)

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        # cuBLAS/cuSOLVER (or CPU BLAS) through torch: no custom kernel for the OBS sweep
        if stats is None:
            raise RuntimeError("sparsegpt needs input statistics")
        U, dead = inverse_hessian_factor(stats, self.percdamp)
        return sparsegpt_prune(weight, U.to(weight.device), dead.to(weight.device), pattern, self.blocksize)
