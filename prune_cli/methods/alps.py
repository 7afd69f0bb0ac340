"""ALPS (Meng, Behdin, Wang & Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse
One-Shot Pruning for Large Language Models", arXiv 2406.07831): the layer-wise pruning problem
solved by ADMM with a penalty schedule driven by the support's change, then conjugate gradients
on the final support.

For one Linear with dense weight ``W`` (``(out, in)``) and calibration inputs ``X``
(``(n, in)``), with ``G = X^T X`` (the Gram matrix SparseGPT collects, ``Stat.GRAM``):

* The problem: ``min_What ||X What^T - X W^T||_F^2 = sum_i (What_i - W_i) G (What_i - W_i)^T``
  subject to the pattern (unstructured: a given number of zeros; N:M: ``N`` kept in every group
  of ``M`` consecutive inputs of a row).
* Damping and scaling: ``G <- G + lambda I`` with ``lambda = percdamp * mean(diag G)`` (1%), and
  the columns normalised by ``s = sqrt(diag G)``: ``Gn = S^-1 G S^-1`` (unit diagonal), the weight
  ``B0 = W S``, the target ``C = B0 Gn`` (= ``X^T Y`` of the paper in these coordinates). Scaling
  does not change the problem; it equalises the penalty ``rho`` across inputs and makes ``Gn``'s
  Jacobi preconditioner the identity.
* One eigendecomposition ``Gn = Q diag(l) Q^T`` (in ``precision``, once per input: q/k/v and
  gate/up share theirs): ``(Gn + rho I)^-1 = Q diag(1 / (l + rho)) Q^T`` for every ``rho`` without a new
  factorisation.
* ADMM, from ``D = P(B0)``, ``V = 0``, ``rho = rho0`` (0.1):

  ``B <- (C - V + rho D) (Gn + rho I)^-1``
  ``D <- P(B + V / rho)``
  ``V <- V + rho (B - D)``

  where the projection ``P(Z)`` keeps the largest ``|Z_ij|`` under the pattern and zeroes the
  rest (:func:`prune_cli.methods.base.select` on ``|Z|``: exactly the pattern, ties by index).
* The ``rho`` schedule (the paper's release): every ``check_every`` (3) iterations, ``c`` = the
  number of entries whose membership in the support changed since the last check, ``k`` = the
  number kept: ``c/k > 0.1`` -> ``rho *= 1.3``; ``c/k > 0.005`` -> ``rho *= 1.2``; else ``c > 0``
  -> ``rho *= 1.1`` once ``rho`` has been raised before, otherwise ``rho /= 5`` and a restart
  from ``(B0, P(B0), 0)``; ``c = 0`` -> stop once ``rho`` has been raised, otherwise
  ``rho /= 5``. ``rho <= rho_max`` (1e6). After ``switch_iter`` (30) iterations a check with
  ``c/k < 3e-4`` also stops. At most ``max_iter`` (300) iterations.
* Refinement: the support of ``P(B)`` fixed, ``B`` solves ``B_i Gn = C_i`` on the row's support
  (the least-squares problem restricted to the kept weights) by conjugate gradients batched over
  the rows, from ``P(B)``, the residual masked to the support; preconditioned by the Jacobi
  preconditioner, which the normalisation has made the identity (as in the release). At most
  ``pcg_steps`` steps; stops earlier when every row's masked residual is below ``pcg_rtol``
  (1e-4) times its right-hand side's. Default 0 steps, chosen from the measured curve
  (``python bench/alps_curve.py``: every Linear of block 10 of the bundled SmolLM2-135M at 50%,
  60%, 70% and 2:4): the release's 10 steps lower the layer error by a median 0.04% (at most
  0.1%) for 9% of the solve's time. Once the schedule has stopped, ADMM's fixed point already
  meets the support's optimality conditions (``B = D`` and ``V = 0`` on the support give a zero
  gradient there), so the refinement only mops up what the iterations left; ``-O pcg_steps=10``
  runs the release's. The iteration cap matters far more: capping ADMM at 21 iterations (0.70x
  the time) costs 3% layer error, at 12 iterations (0.48x) 43%, so the schedule is kept whole.
* ``What = B S^-1``, exact zeros off the support, in the weight's dtype.

What differs from the release (mazumder-lab/ALPS ``alps.py``), and why:

* Unstructured scope: the release keeps the top entries of the whole layer, so rows end with
  different counts; that is the default here (``scope: matrix``; the layer's sparsity is exact).
  ``scope: row`` keeps the same count in every row (as Wanda, and the README's "per output row").
* The support change is counted on the projection's keep mask, not on ``D == 0`` (a kept entry
  that is exactly zero counts as kept), and the conjugate gradients stop on the residual on the
  support (the release measures the unmasked residual, which never meets its tolerance, so it
  always runs its 10 steps). Its per-check objective printout is not computed.
* ``precision``: the eigendecomposition, ADMM and CG arithmetic in float32 (default) or float64
  (the release: float64 ``eigh``, float32 iterations). Measured on block 10 of the bundled
  SmolLM2-135M (16 x 512 calibration tokens; q_proj and o_proj at 50%, 70% and 2:4): float64
  iterations reach the same layer error within 0.1%; a float32 ``eigh`` under float32
  iterations (q/o/up/down_proj, 50%, 70%, 2:4) the same error within 0.08% either way, the
  masks agreeing on 97-99.7% of the weights, for half the time (0.23 s against 0.45 s for the
  1536-wide ``down_proj`` input, two cores).
* A pattern that prunes nothing returns the weight unchanged (the schedule would only divide
  ``rho`` by 5 until ``max_iter``).

On that block (q/o/up/down_proj, 50%, 70%, 2:4) every solve stopped by the schedule after 33
iterations (final ``rho`` 0.84-1.0, no restart), with a relative layer error 0.46-0.66x
SparseGPT's on the same statistics; the refinement lowered it by 0.01-0.1%.

Deterministic: no randomness, a fixed schedule; the same inputs give the same result bit for
bit (a resumed run equals an uninterrupted one).

Diagnostics (:attr:`PruneResult.info`, in the report's per-layer ``diagnostics``): iterations,
restarts, final ``rho``, the last support change ``c/k``, CG steps, and the relative layer
error ``||(W - What) X^T||^2 / ||W X^T||^2`` (on the undamped ``G``) after ADMM and after the
refinement, of the solution in ``precision`` before it is rounded to the weight's dtype (from
the CG's residuals: :func:`normalised_error`, no extra ``(in, in)`` product); with
``compare_sparsegpt: true`` also SparseGPT's relative error on the same statistics and the ratio (that runs SparseGPT on every layer as well, so it is off by default).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from prune_cli.calibrators.stats import InputStats, Stat, symmetric_gram
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, SparsityPattern
from prune_cli.core.selection import select
from prune_cli.methods.base import PruneResult, WeightMethod, few_threads
from prune_cli.methods.sparsegpt import SparseGPT

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
SCOPES = ("matrix", "row")
# Below this many multiply-adds per ``B (Gn + rho I)^-1`` product, a layer's iterations are chains
# of tiny ops and run on one CPU thread (see :func:`few_threads`); larger layers use all threads.
SMALL_LAYER_MACS = 1 << 24


@dataclass(frozen=True)
class Problem:
    """The damped, normalised layer problem of one input (shared by its consumers): ``scale``
    ``s = sqrt(diag(G + lambda I))`` (``(in,)``), ``gram`` ``Gn`` (``(in, in)``) and its
    eigendecomposition ``Gn = vectors diag(values) vectors^T``; float64 but the decomposition
    (in the arithmetic's precision, :func:`normalised_problem`). ``damp``: the
    ``lambda`` added to ``G``'s diagonal."""

    scale: torch.Tensor
    gram: torch.Tensor
    values: torch.Tensor
    vectors: torch.Tensor
    damp: float


def normalised_problem(stats: InputStats, percdamp: float, precision: torch.dtype = torch.float64) -> Problem:
    """The :class:`Problem` of ``stats``' input, cached on ``stats`` per ``percdamp`` and the
    eigendecomposition's ``precision`` (the Gram matrix and its scaling are float64 either way;
    eigenvalues clamped at 0: ``Gn`` is positive semi-definite, rounding aside)."""
    key = ("alps_problem", percdamp, precision)
    if key in stats.derived:
        return stats.derived[key]
    if Stat.GRAM not in stats.wanted:
        raise RuntimeError("alps needs the full Gram matrix (Stat.GRAM), not a sample")
    stats.check_finite()
    G = stats.xtx.double()  # X^T X; its scale (SparseGPT's 2/n) cancels in the normalisation
    damp = percdamp * float(torch.mean(torch.diag(G)))
    damp = damp if damp > 0 else 1.0  # every input dead: any positive diagonal
    G.diagonal().add_(damp)
    scale = torch.diag(G).sqrt()
    gram = G / scale.unsqueeze(1) / scale.unsqueeze(0)
    gram = (gram + gram.T) / 2  # exactly symmetric after the divisions
    values, vectors = torch.linalg.eigh(gram.to(precision))
    values = values.clamp(min=0)
    problem = Problem(scale, gram, values, vectors, damp)
    stats.derived[key] = problem
    return problem


def project(z: torch.Tensor, pattern: SparsityPattern, scope: str) -> torch.Tensor:
    """KEEP mask of the projection onto the pattern: the largest ``|z_ij|`` (``(out, in)``)."""
    return select(z.abs(), pattern, scope)


def inverse_penalised(problem: Problem, rho: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``(Gn + rho I)^-1 = R R^T`` with ``R = Q diag(1 / (l + rho))^(1/2)``, from the
    eigendecomposition; the product as :func:`symmetric_gram` forms it (upper bands only, exactly
    symmetric: 25% less time than ``(Q diag) @ Q^T`` at width 1536 on two cores, and this is
    re-formed at every change of ``rho``)."""
    q = problem.vectors.to(device=device, dtype=dtype)
    inv = (1.0 / (problem.values + rho)).to(device=device, dtype=dtype)
    return symmetric_gram((q * inv.sqrt()).T)


@dataclass
class AdmmState:
    """Where the ADMM loop stopped: the last ``B`` and its counters."""

    B: torch.Tensor
    iterations: int
    rho: float
    restarts: int
    change: float | None  # the last check's c/k (None before the first check)
    stopped: str  # why: "support fixed", "small change" or "max_iter"


def admm(
    B0: torch.Tensor, C: torch.Tensor, problem: Problem, pattern: SparsityPattern, method: ALPS
) -> AdmmState:
    """The ADMM iterations and the ``rho`` schedule of the module docstring, from ``B0``
    (``(out, in)``, normalised) with target ``C = B0 Gn``."""
    dtype, device = B0.dtype, B0.device
    rho = method.rho
    last_keep = project(B0, pattern, method.scope)
    D0 = B0 * last_keep
    kept = int(last_keep.sum())
    B, D, V = B0.clone(), D0.clone(), torch.zeros_like(B0)
    inverse = inverse_penalised(problem, rho, dtype, device)
    raised, restarts, change, it, stopped = False, 0, None, 0, "max_iter"
    for it in range(1, method.max_iter + 1):
        B = torch.add(C - V, D, alpha=rho) @ inverse  # (C - V + rho D) (Gn + rho I)^-1
        Z = torch.add(B, V, alpha=1 / rho)  # B + V / rho
        keep = project(Z, pattern, method.scope)
        D = Z * keep
        V = V.add_(B - D, alpha=rho)  # V + rho (B - D), in place (V is this loop's own)
        if it % method.check_every:
            continue
        flipped = int((keep != last_keep).sum())
        change = flipped / kept
        last_keep = keep
        if change > 0.1:
            rho, raised = rho * 1.3, True
        elif change > 0.005:
            rho, raised = rho * 1.2, True
        elif flipped > 0:
            if raised:
                rho *= 1.1
            else:
                rho /= 5
                B, D, V = B0.clone(), D0.clone(), torch.zeros_like(B0)
                restarts += 1
        elif raised:
            stopped = "support fixed"
            break
        else:
            rho /= 5
        rho = min(rho, method.rho_max)
        inverse = inverse_penalised(problem, rho, dtype, device)
        if it > method.switch_iter and change < 3e-4:
            stopped = "small change"
            break
    return AdmmState(B, it, rho, restarts, change, stopped)


@dataclass
class Refined:
    """What :func:`refine_on_support` returns: the new ``B``, the CG steps taken, and the full
    residuals ``C - B Gn`` (``(out, in)``) before and after, which give the layer objective
    without another product (:func:`normalised_error`)."""

    B: torch.Tensor
    steps: int
    residual_before: torch.Tensor
    residual: torch.Tensor


def refine_on_support(
    B: torch.Tensor, C: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, steps: int, rtol: float
) -> Refined:
    """Conjugate gradients for ``B_i Gn = C_i`` on each row's support ``keep_i``, all rows at
    once, from ``B`` (zero off the support). The residual ``R = (C - B Gn) * keep`` is the
    gradient of the row's objective on its support, so ``B`` stays on the support; with
    ``steps >= in`` this is the exact least-squares solution on the support (up to rounding).
    Preconditioner: the identity (``Gn``'s diagonal is 1: the Jacobi preconditioner is already
    applied by the normalisation). The unmasked residual ``C - B Gn`` is carried along from the
    products the steps compute anyway (``R_full -= alpha P Gn``)."""
    mask = keep.to(B.dtype)
    B = B * mask
    residual_before = C - B @ gram
    full = residual_before
    R = full * mask
    limit = (rtol * (C * mask).norm(dim=1)).square()
    rr = R.square().sum(dim=1)
    P = R.clone()
    taken = 0
    for taken in range(1, steps + 1):
        if bool((rr <= limit).all()):
            taken -= 1
            break
        GP_full = P @ gram
        GP = GP_full * mask
        curvature = (P * GP).sum(dim=1)
        alpha = torch.where(curvature > 0, rr / torch.where(curvature > 0, curvature, 1.0), 0.0)
        B = B + alpha.unsqueeze(1) * P
        R = R - alpha.unsqueeze(1) * GP
        full = full - alpha.unsqueeze(1) * GP_full
        rr_next = R.square().sum(dim=1)
        beta = torch.where(rr > 0, rr_next / torch.where(rr > 0, rr, 1.0), 0.0)
        P = R + beta.unsqueeze(1) * P
        rr = rr_next
    return Refined(B, taken, residual_before, full)


def normalised_error(
    B0: torch.Tensor, B: torch.Tensor, residual: torch.Tensor, C: torch.Tensor, problem: Problem
) -> float:
    """:func:`relative_error` of the pruned weight ``B S^-1`` from the normalised quantities,
    with no ``(in, in)`` product: with ``d = B0 - B`` (``(out, in)``) and ``d Gn = C - B Gn`` (the
    ``residual``), and ``G = S Gn S - lambda I`` the undamped Gram matrix,

    ``tr(dW G dW^T) = tr(d Gn d^T) - lambda ||d S^-1||^2``,  ``tr(W G W^T) = tr(B0 Gn B0^T) -
    lambda ||B0 S^-1||^2`` with ``B0 Gn = C``;

    sums in float64 (0 when the dense energy is no more than rounding of the damping's)."""
    scale = problem.scale.to(device=B.device, dtype=B.dtype)
    d = B0 - B
    damp = problem.damp
    damped = float((B0 * C).double().sum())
    dense = damped - damp * float((B0 / scale).double().square().sum())
    if dense <= 1e-6 * abs(damped):
        return 0.0
    error = float((d * residual).double().sum()) - damp * float((d / scale).double().square().sum())
    return max(error, 0.0) / dense


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||(W - What) X^T||^2 / ||W X^T||^2 = tr(d G d^T) / tr(W G W^T)`` on the undamped Gram
    matrix ``G = X^T X`` (products in float32, sums in float64; 0 for a layer whose inputs are all
    zero). ALPS's own errors come from :func:`normalised_error`; this is the direct formula, for
    SparseGPT's result on the same statistics."""
    G = xtx.to(device=weight.device, dtype=torch.float32)
    d = weight.float() - pruned.float()
    W = weight.float()
    dense = float(((W @ G) * W).double().sum())
    return float(((d @ G) * d).double().sum()) / dense if dense > 0 else 0.0


@dataclass(frozen=True)
class ALPS(WeightMethod):
    """ALPS: ADMM on the layer's reconstruction error, its penalty raised as the support settles, then conjugate gradients on the support (Meng et al. 2024)."""

    name = "alps"
    required_stats = frozenset({Stat.GRAM})
    updates_weights = True
    dsnot_base = True
    percdamp: float = 0.01
    rho: float = 0.1  # initial ADMM penalty
    max_iter: int = 300
    check_every: int = 3  # iterations between support checks (and rho updates)
    switch_iter: int = 30  # after this many iterations a check with c/k < 3e-4 stops
    rho_max: float = 1e6
    pcg_steps: int = 0  # CG steps on the final support (the release: 10; see the module docstring)
    pcg_rtol: float = 1e-4
    scope: str = "matrix"  # unstructured: matrix (the paper) | row (the same count in every row)
    precision: str = "float32"  # eigh, ADMM and CG arithmetic: float32 | float64
    compare_sparsegpt: bool = False  # also run SparseGPT on the same statistics, report its error

    def validate(self) -> None:
        def number(name: str, low: float, low_open: bool = True) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value <= low if low_open else value < low):
                raise RecipeError(f"alps {name} must be a finite number {'>' if low_open else '>='} {low}, got {value!r}")

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecipeError(f"alps {name} must be an integer >= {low}, got {value!r}")

        number("percdamp", 0.0, low_open=False)
        if self.percdamp >= 1:
            raise RecipeError(f"alps percdamp must be in [0, 1), got {self.percdamp!r}")
        number("rho", 0.0)
        number("rho_max", 0.0)
        number("pcg_rtol", 0.0, low_open=False)
        integer("max_iter", 0)
        integer("check_every", 1)
        integer("switch_iter", 0)
        integer("pcg_steps", 0)
        if self.scope not in SCOPES:
            raise RecipeError(f"alps scope must be matrix or row, got {self.scope!r}")
        if self.precision not in PRECISIONS:
            raise RecipeError(f"alps precision must be float32 or float64, got {self.precision!r}")
        if not isinstance(self.compare_sparsegpt, bool):
            raise RecipeError(f"alps compare_sparsegpt must be true or false, got {self.compare_sparsegpt!r}")

    @property
    def unstructured_scope(self) -> str:
        return self.scope

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        # torch only (cuBLAS / CPU BLAS matrix products and torch's sort); ``backend`` is unused
        if stats is None:
            raise RuntimeError("alps needs input statistics")
        if isinstance(pattern, NM):
            pattern.check_fits(weight.shape[1])
        small = weight.numel() * weight.shape[1] < SMALL_LAYER_MACS
        with few_threads(weight.device) if small else nullcontext():
            return self._prune(weight, stats, pattern)

    def _prune(self, weight: torch.Tensor, stats: InputStats, pattern: SparsityPattern) -> PruneResult:
        keep = project(weight.float(), pattern, self.scope)
        if bool(keep.all()):  # nothing to prune
            return PruneResult(weight.clone(), keep, {"iterations": 0})
        dtype, device = PRECISIONS[self.precision], weight.device
        problem = normalised_problem(stats, self.percdamp, dtype)
        scale = problem.scale.to(device=device, dtype=dtype)
        gram = problem.gram.to(device=device, dtype=dtype)
        B0 = weight.to(dtype) * scale
        C = B0 @ gram
        state = admm(B0, C, problem, pattern, self)
        keep = project(state.B, pattern, self.scope)
        refined = refine_on_support(state.B * keep, C, gram, keep, self.pcg_steps, self.pcg_rtol)
        pruned = ((refined.B / scale) * keep).to(weight.dtype)
        info: dict[str, Any] = {  # counts, the stop reason and float objectives
            "iterations": state.iterations,
            "restarts": state.restarts,
            "stopped": state.stopped,
            "rho": state.rho,
            "support_change": state.change,
            "pcg_steps": refined.steps,
        }
        info["objective_admm"] = normalised_error(B0, state.B * keep, refined.residual_before, C, problem)
        info["objective"] = normalised_error(B0, refined.B, refined.residual, C, problem)
        if self.compare_sparsegpt:
            reference = SparseGPT(percdamp=self.percdamp).prune(weight, stats, pattern)
            info["objective_sparsegpt"] = relative_error(weight, reference.weight, stats.xtx)
            if info["objective_sparsegpt"] > 0:
                info["vs_sparsegpt"] = info["objective"] / info["objective_sparsegpt"]
        return PruneResult(pruned, keep, info)
