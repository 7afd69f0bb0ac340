"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
LLMs"): prune-and-grow on top of any base method, with no weight training.

Notation for one Linear: dense weight ``W`` (``(out, in)``), the base method's result ``What``
and KEEP mask, input mean ``mu_j`` and variance ``var_j`` over the calibration tokens, ``T``
tokens per calibration window, Wanda score ``|What_ij| * ||X_j||``.

* Expected output error per row (the reference's "reconstruction error"):
  ``e_i = T * sum_j (W_ij - What_ij) * mu_j``  (= ``sum_{j pruned} W_ij mu_j T`` for mask-only
  bases; ``T`` keeps the released code's scale, so ``update_threshold = 0.1`` means the same).
* Regrow a pruned ``j``: ``e_i -= T W_ij mu_j``. Candidates are ranked by ``T W_ij mu_j / var_j^p``:
  the largest when ``e_i > 0``, the smallest when ``e_i <= 0``.
* Prune a kept ``k``: ``e_i += T What_ik mu_k``. Unstructured: the kept weight of opposite effect
  (sign of ``What_ik mu_k`` opposite to ``e_i``) with the lowest Wanda score; N:M: the kept weight
  of the regrown weight's M-group with the lowest base score, so the pattern stays exact.
* One swap per row per cycle; a row stops when ``|e_i| <= update_threshold`` or after
  ``max_cycles``. All rows advance together (vectorised; no Python loop over rows).

Modes:

* ``reference``: the released algorithm (zyxxmu/DSnoT ``lib/prune.py``). A swap is taken while
  ``|e_i| > threshold`` (and, when ``sign_check``, while it does not flip the sign of ``e_i``); the
  first refused swap stops the row. As released, the sign check runs only in the N:M path
  (``--without_same_sign`` is a ``type=bool`` flag that is always true), and MLP layers are
  skipped (``skip: "^mlp\\."`` reproduces that; ours covers every targeted layer by default).
* ``guarded`` (default): the same candidates, but a swap is kept only when it lowers the layer's
  actual reconstruction error on the calibration activations,
  ``E = ||(W - What) X^T||_F^2 = sum_i d_i^T G d_i`` with ``G = X^T X``, ``d_i = W_i - What_i``.
  For a swap that changes ``d`` by ``a e_j + b e_k`` (``a = -W_ij``, ``b = What_ik``):
  ``dE = 2 (a (G d)_j + b (G d)_k) + a^2 G_jj + b^2 G_kk + 2 a b G_jk``; kept iff ``dE < 0``.
  A refused swap does not stop the row. So this mode never increases ``E``.

Regrown weights take their dense value ``W_ij`` (with a SparseGPT base, its updated weights are
kept everywhere else). Differences from the release: input variance is the population variance
over all tokens (the release averages per-window variances); candidate lists hold only pruned
(regrow) or kept (prune) weights, so a row whose list is exhausted stops instead of touching a
weight of the other set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.errors import RecipeError
from prune_cli.methods.base import PruneResult, ScoreMethod, WeightMethod, few_threads
from prune_cli.patterns import NM, SparsityPattern

MODES = ("guarded", "reference")
BASES = ("magnitude", "wanda", "sparsegpt")


def _ordered(values: torch.Tensor, eligible: torch.Tensor, descending: bool, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the first ``limit`` ``eligible`` entries ordered by ``values``
    (``(out, limit)``; a pointer never moves further than the number of cycles, so a top-k
    suffices instead of a full sort), and how many eligible entries each row has."""
    fill = float("-inf") if descending else float("inf")
    keyed = torch.where(eligible, values, torch.full_like(values, fill))
    k = max(1, min(limit, values.shape[1]))
    order = torch.topk(keyed, k, dim=1, largest=descending, sorted=True).indices
    return order, eligible.sum(dim=1)


def _at(order: torch.Tensor, pointer: torch.Tensor) -> torch.Tensor:
    """``order[i, pointer[i]]`` per row (pointers past the end are clamped; callers mask them)."""
    return order.gather(1, pointer.clamp_max(order.shape[1] - 1).unsqueeze(1)).squeeze(1)


@dataclass(frozen=True)
class DSnoT(WeightMethod):
    """DSnoT prune-and-grow on top of a base method (Zhang et al. 2023)."""

    name = "dsnot"
    base: str = "wanda"
    mode: str = "guarded"
    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    sign_check: str = "auto"  # auto | on | off  (auto: reference -> N:M only, guarded -> on)
    skip: str | None = None  # regex over Linear names (relative to the block) left to the base
    base_options: dict | None = None

    def validate(self) -> None:
        if self.base not in BASES:
            raise RecipeError(f"dsnot base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.mode not in MODES:
            raise RecipeError(f"dsnot mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.sign_check not in ("auto", "on", "off"):
            raise RecipeError(f"dsnot sign_check must be auto, on or off, got {self.sign_check!r}")
        if not (isinstance(self.max_cycles, int) and self.max_cycles >= 0):
            raise RecipeError("dsnot max_cycles must be an integer >= 0")
        if self.update_threshold < 0:
            raise RecipeError("dsnot update_threshold must be >= 0")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as exc:
                raise RecipeError(f"dsnot skip: bad regular expression ({exc})") from None
        self.base_method()  # validates base options

    def base_method(self) -> WeightMethod:
        from prune_cli.methods import build_method

        return build_method(self.base, self.base_options or {})

    @property
    def required_stats(self) -> frozenset[Stat]:  # type: ignore[override]
        wanted = {Stat.SQ_NORM, Stat.MEAN_VAR} | set(self.base_method().required_stats)
        if self.mode == "guarded":
            wanted.add(Stat.GRAM)
        return frozenset(wanted)

    def for_layer(self, local_name: str) -> WeightMethod:
        if self.skip is not None and re.search(self.skip, local_name):
            return self.base_method()
        return self

    def _sign_check(self, pattern: SparsityPattern) -> bool:
        if self.sign_check == "auto":
            return self.mode == "guarded" or isinstance(pattern, NM)
        return self.sign_check == "on"

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        if stats is None:
            raise RuntimeError("dsnot needs input statistics")
        base = self.base_method()
        initial = base.prune(weight, stats, pattern, backend)
        if self.max_cycles == 0:
            return initial
        W = weight.detach().float()
        What = initial.weight.float().clone()
        keep = initial.mask.clone()
        scale = float(stats.tokens_per_window or 1)
        mu = stats.mean.to(W.device) * scale
        var = stats.var.to(W.device).clamp_min(1e-12)
        if isinstance(base, ScoreMethod):
            base_score = base.score(weight, stats).float()
        else:  # SparseGPT: rank kept weights by Wanda score of their updated values
            base_score = What.abs() * stats.norm.to(W.device)
        G = stats.xtx.to(W.device) if self.mode == "guarded" else None
        swap = self._swap_nm if isinstance(pattern, NM) else self._swap_unstructured
        with few_threads(W.device):
            swap(W, What, keep, mu, var, stats.norm.to(W.device), base_score, G, pattern)
        return PruneResult(What.to(weight.dtype), keep)

    # ------------------------------------------------------------------ shared bookkeeping

    def _accept(self, err, err_after, active, sign0, check_sign, dE):
        """Which rows take this cycle's swap, and which rows go on."""
        over = err.abs() > self.update_threshold
        ok = active & over
        if check_sign:
            ok &= torch.sign(err_after) == sign0
        if self.mode == "reference":
            return ok, ok  # the first refused swap stops the row
        ok &= dE < 0
        return ok, active & over

    def _delta_error(self, W, What, Gd, G, rows, j, k):
        """Change of ||(W - What) X^T||^2 for regrowing ``j`` and pruning ``k`` in each row."""
        a = -W[rows, j]
        b = What[rows, k]
        return 2 * (a * Gd[rows, j] + b * Gd[rows, k]) + a * a * G[j, j] + b * b * G[k, k] + 2 * a * b * G[j, k]

    def _apply(self, W, What, keep, Gd, G, rows, j, k, take):
        r, jj, kk = rows[take], j[take], k[take]
        if G is not None and r.numel():
            Gd[r] += (-W[r, jj]).unsqueeze(1) * G[jj] + What[r, kk].unsqueeze(1) * G[kk]
        What[r, jj] = W[r, jj]
        What[r, kk] = 0
        keep[r, jj] = True
        keep[r, kk] = False

    # ------------------------------------------------------------------ unstructured

    def _swap_unstructured(self, W, What, keep, mu, var, norm, base_score, G, pattern):
        out_features, _ = W.shape
        rows = torch.arange(out_features, device=W.device)
        regrow_metric = W * mu  # effect on e of regrowing (pruned entries)
        prune_metric = What * mu  # effect on e of pruning (kept entries)
        err = ((W - What) * mu).sum(dim=1)
        sign0 = torch.sign(err)
        pruned = ~keep
        ranked = regrow_metric / var.pow(self.var_power)
        limit = self.max_cycles
        grow_hi, n_grow = _ordered(ranked, pruned, True, limit)
        grow_lo, _ = _ordered(ranked, pruned, False, limit)
        wanda = What.abs() * norm
        prune_pos, n_pos = _ordered(wanda, keep & (prune_metric > 0), False, limit)
        prune_neg, n_neg = _ordered(wanda, keep & (prune_metric < 0), False, limit)
        ptr_hi = torch.zeros_like(rows)
        ptr_lo = torch.zeros_like(rows)
        ptr_pos = torch.zeros_like(rows)
        ptr_neg = torch.zeros_like(rows)
        Gd = (W - What) @ G if G is not None else None
        active = torch.ones(out_features, dtype=torch.bool, device=W.device)
        check_sign = self._sign_check(pattern)
        for _ in range(self.max_cycles):
            if not bool(active.any()):
                break
            grow_up = err > 0
            idx_grow = torch.where(grow_up, _at(grow_hi, ptr_hi), _at(grow_lo, ptr_lo))
            prune_up = err < 0  # positive-effect weights raise e
            p_prune = torch.where(prune_up, ptr_pos, ptr_neg)
            idx_prune = torch.where(prune_up, _at(prune_pos, ptr_pos), _at(prune_neg, ptr_neg))
            # the two regrow pointers walk one list from both ends: it is used up when they meet
            exhausted = (ptr_hi + ptr_lo >= n_grow) | (p_prune >= torch.where(prune_up, n_pos, n_neg).clamp_max(limit))
            active &= ~exhausted
            err_after = err + prune_metric[rows, idx_prune] - regrow_metric[rows, idx_grow]
            dE = self._delta_error(W, What, Gd, G, rows, idx_grow, idx_prune) if G is not None else None
            take, active = self._accept(err, err_after, active, sign0, check_sign, dE)
            # the pointers that were used advance whether or not the swap was taken
            live = ~exhausted
            ptr_hi += (grow_up & live).long()
            ptr_lo += (~grow_up & live).long()
            ptr_pos += (prune_up & live).long()
            ptr_neg += (~prune_up & live).long()
            err = torch.where(take, err_after, err)
            self._apply(W, What, keep, Gd, G, rows, idx_grow, idx_prune, take)

    # ------------------------------------------------------------------ N:M

    def _swap_nm(self, W, What, keep, mu, var, norm, base_score, G, pattern: NM):
        out_features, in_features = W.shape
        m = pattern.m
        rows = torch.arange(out_features, device=W.device)
        regrow_metric = W * mu
        prune_metric = What * mu
        err = ((W - What) * mu).sum(dim=1)
        sign0 = torch.sign(err)
        ranked = regrow_metric / var.pow(self.var_power)
        pruned = ~keep
        grow_hi, n_grow = _ordered(ranked, pruned, True, self.max_cycles)
        grow_lo, _ = _ordered(ranked, pruned, False, self.max_cycles)
        ptr_hi = torch.zeros_like(rows)
        ptr_lo = torch.zeros_like(rows)
        # a kept weight is a pruning candidate once: after it was considered it is marked used
        used = torch.zeros_like(keep)
        offsets = torch.arange(m, device=W.device)
        Gd = (W - What) @ G if G is not None else None
        active = torch.ones(out_features, dtype=torch.bool, device=W.device)
        check_sign = self._sign_check(pattern)
        for _ in range(self.max_cycles):
            if not bool(active.any()):
                break
            grow_up = err > 0
            exhausted = ptr_hi + ptr_lo >= n_grow
            idx_grow = torch.where(grow_up, _at(grow_hi, ptr_hi), _at(grow_lo, ptr_lo))
            group = (idx_grow - idx_grow % m).unsqueeze(1) + offsets  # (out, m)
            cand = keep.gather(1, group) & ~used.gather(1, group)
            exhausted |= ~cand.any(dim=1)
            active &= ~exhausted
            scores = torch.where(cand, base_score.gather(1, group), torch.full_like(group, float("inf"), dtype=W.dtype))
            idx_prune = group.gather(1, scores.argmin(dim=1, keepdim=True)).squeeze(1)
            err_after = err + prune_metric[rows, idx_prune] - regrow_metric[rows, idx_grow]
            dE = self._delta_error(W, What, Gd, G, rows, idx_grow, idx_prune) if G is not None else None
            take, active = self._accept(err, err_after, active, sign0, check_sign, dE)
            live = ~exhausted
            ptr_hi += (grow_up & live).long()
            ptr_lo += (~grow_up & live).long()
            used[rows[live], idx_prune[live]] = True
            used[rows[take], idx_grow[take]] = True  # a regrown weight is never pruned again
            err = torch.where(take, err_after, err)
            self._apply(W, What, keep, Gd, G, rows, idx_grow, idx_prune, take)
