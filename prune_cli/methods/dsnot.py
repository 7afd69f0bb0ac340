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
  ``G`` costs about one more forward pass of the block; by default (``guard_gram: sampled``)
  it is summed over every 4th calibration token only, so "never increases" holds on that
  quarter of the tokens (held-out perplexity on the bundled model, Wanda base, 60% / 70%:
  66.92 / 299.34 sampled vs 66.57 / 303.27 full); ``guard_gram: full`` uses every token. With a SparseGPT base the full
  ``G`` is there anyway and is used.

Regrown weights take their dense value ``W_ij`` (with a SparseGPT base, its updated weights are
kept everywhere else). Differences from the release: input variance is the population variance
over all tokens (the release averages per-window variances); candidate lists hold only pruned
(regrow) or kept (prune) weights, so a row whose list is exhausted stops instead of touching a
weight of the other set.

Batching: the Linears of one block that have the same ``in_features`` (on a Llama block q, k, v,
o, gate and up; down on its own) run through one swap loop, their rows stacked, so the ~25 small
tensor ops of a cycle run once per batch instead of once per Linear. Rows never interact, so the
result is exactly that of one loop per Linear (tested); the calibrator hands the block's Linears
over together through :meth:`WeightMethod.prune_group`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.errors import RecipeError
from prune_cli.methods.base import Job, PruneResult, ScoreMethod, WeightMethod, few_threads
from prune_cli.patterns import NM, SparsityPattern

MODES = ("guarded", "reference")
BASES = ("magnitude", "wanda", "sparsegpt")


def _ordered(values: torch.Tensor, eligible: torch.Tensor, descending: bool, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the first ``limit`` ``eligible`` entries ordered by ``values``
    (``(out, limit)``; a pointer never moves further than the number of cycles, so a top-k
    suffices instead of a full sort), and how many eligible entries each row has."""
    keyed = values.masked_fill(~eligible, float("-inf") if descending else float("inf"))
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
    guard_gram: str = "sampled"  # sampled: X^T X over every 4th token | full: over all tokens
    base_options: dict | None = None

    def validate(self) -> None:
        if self.base not in BASES:
            raise RecipeError(f"dsnot base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.mode not in MODES:
            raise RecipeError(f"dsnot mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.guard_gram not in ("sampled", "full"):
            raise RecipeError(f"dsnot guard_gram must be sampled or full, got {self.guard_gram!r}")
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
        if self.mode == "guarded" and Stat.GRAM not in wanted:
            wanted.add(Stat.GRAM if self.guard_gram == "full" else Stat.GRAM_SAMPLE)
        return frozenset(wanted)

    def for_layer(self, local_name: str) -> WeightMethod:
        if self.skip is not None and re.search(self.skip, local_name):
            return self.base_method()
        return self

    def _sign_check(self, pattern: SparsityPattern) -> bool:
        if self.sign_check == "auto":
            return self.mode == "guarded" or isinstance(pattern, NM)
        return self.sign_check == "on"

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        return self.prune_group([(weight, stats, pattern)], backend)[0]

    @torch.no_grad()
    def prune_group(self, jobs: list[Job], backend=None) -> list[PruneResult]:
        """The base method on every job, then one prune-and-grow loop per batch of jobs with the
        same ``in_features`` and swap kind (unstructured, or N:M with the same ``M``)."""
        if any(stats is None for _, stats, _ in jobs):
            raise RuntimeError("dsnot needs input statistics")
        base = self.base_method()
        results = [base.prune(weight, stats, pattern, backend) for weight, stats, pattern in jobs]
        if self.max_cycles == 0:
            return results
        batches: dict[tuple, list[int]] = {}
        for i, (weight, _, pattern) in enumerate(jobs):
            m = pattern.m if isinstance(pattern, NM) else 0
            batches.setdefault((weight.shape[1], m, weight.device), []).append(i)
        for (_, m, device), members in batches.items():
            pattern = jobs[members[0]][2]
            rows = _Rows.stack([(jobs[i], results[i]) for i in members], base, self.mode == "guarded", m)
            state = _SwapState(self, rows, self._sign_check(pattern))
            lists = None if m else self._prune_lists(state, rows)  # big ops: all threads
            swap = getattr(backend, "dsnot_swap", None)  # the CuPy backend's kernel: same result
            if swap is not None and device == getattr(backend, "device", None):
                self._swap_kernel(swap, state, rows, lists, m)
            else:
                with few_threads(device):  # the cycles: long chains of tiny ops
                    if m:
                        self._swap_nm(state, rows, m)
                    else:
                        self._swap_unstructured(state, lists)
            for i, (weight_hat, keep) in zip(members, rows.split()):
                results[i] = PruneResult(weight_hat.to(jobs[i][0].dtype), keep)
        return results

    # ------------------------------------------------------------------ the two swap loops

    def _swap_kernel(self, swap, state: "_SwapState", rows: "_Rows", lists, m: int) -> None:
        """The cycles of :meth:`_swap_unstructured` / :meth:`_swap_nm` in one launch of the
        backend's ``dsnot_swap`` (one warp per row, bit-identical); updates ``rows.What``,
        ``rows.keep``, ``state.err`` and, guarded, ``rows.Gd`` in place."""
        swap(
            rows.W, rows.What, rows.keep, state.regrow_metric, state.prune_metric, state.err,
            state.grow_hi, state.grow_lo, state.n_grow,
            max_cycles=self.max_cycles, update_threshold=self.update_threshold,
            guarded=self.mode == "guarded", check_sign=state.check_sign,
            prune_lists=None if m else lists, m=m, base_score=rows.base_score if m else None,
            G=rows.G, Gd=rows.Gd, gid=rows.gid,
        )

    def _prune_lists(self, state: "_SwapState", rows: "_Rows"):
        """Unstructured pruning candidates per row, lowest Wanda score first: kept weights whose
        pruning raises ``e`` (``What_ik mu_k > 0``) and those that lower it; with their counts."""
        limit = self.max_cycles
        return (
            *_ordered(rows.base_score, rows.keep & (state.prune_metric > 0), False, limit),
            *_ordered(rows.base_score, rows.keep & (state.prune_metric < 0), False, limit),
        )

    def _swap_unstructured(self, state: "_SwapState", lists) -> None:
        limit = self.max_cycles
        prune_pos, n_pos, prune_neg, n_neg = lists
        ptr_pos = torch.zeros_like(state.rows)
        ptr_neg = torch.zeros_like(state.rows)
        for _ in range(self.max_cycles):
            if not bool(state.active.any()):
                break
            grow_up, idx_grow, exhausted = state.next_grow()
            prune_up = state.err < 0  # positive-effect weights raise e
            p_prune = torch.where(prune_up, ptr_pos, ptr_neg)
            idx_prune = torch.where(prune_up, _at(prune_pos, ptr_pos), _at(prune_neg, ptr_neg))
            exhausted |= p_prune >= torch.where(prune_up, n_pos, n_neg).clamp_max(limit)
            live = ~exhausted
            state.step(idx_grow, idx_prune, exhausted)
            # the pointers that were used advance whether or not the swap was taken
            state.advance_grow(grow_up, live)
            ptr_pos += (prune_up & live).long()
            ptr_neg += (~prune_up & live).long()

    def _swap_nm(self, state: "_SwapState", rows: "_Rows", m: int) -> None:
        keep = rows.keep
        row_ids = state.rows
        # a kept weight is a pruning candidate once: after it was considered it is marked used
        used = torch.zeros_like(keep)
        offsets = torch.arange(m, device=keep.device)
        inf = torch.tensor(float("inf"), device=keep.device)
        for _ in range(self.max_cycles):
            if not bool(state.active.any()):
                break
            grow_up, idx_grow, exhausted = state.next_grow()
            group = (idx_grow - idx_grow % m).unsqueeze(1) + offsets  # (rows, m)
            cand = keep.gather(1, group) & ~used.gather(1, group)
            exhausted |= ~cand.any(dim=1)
            scores = torch.where(cand, rows.base_score.gather(1, group), inf)
            idx_prune = group.gather(1, scores.argmin(dim=1, keepdim=True)).squeeze(1)
            live = ~exhausted
            take = state.step(idx_grow, idx_prune, exhausted)
            state.advance_grow(grow_up, live)
            used[row_ids[live], idx_prune[live]] = True
            used[row_ids[take], idx_grow[take]] = True  # a regrown weight is never pruned again


class _Rows:
    """The rows of one or more Linears with the same ``in_features``, stacked (``(R, in)``
    each), with what the swap loops read: dense ``W``, current ``What`` and ``keep`` (updated
    in place), the effects ``W * mu`` and ``What * mu`` (``mu`` scaled by tokens per window),
    the regrow ranking ``W * mu / var^p``, the Wanda score of ``What`` (unstructured) or the
    base score (N:M) and, guarded, the Gram matrices ``G`` (``(n_inputs, in, in)``: Linears
    reading the same input share one) with each row's index ``gid`` into them and ``G d``."""

    @classmethod
    def stack(cls, items: list[tuple[Job, PruneResult]], base: WeightMethod, guarded: bool, m: int) -> "_Rows":
        self = cls()
        parts: dict[str, list] = {k: [] for k in ("W", "What", "keep", "err", "regrow", "prune", "ranked", "score", "Gd", "gid")}
        grams: list[torch.Tensor] = []
        gram_of: dict[int, int] = {}
        self.sizes = []
        for (weight, stats, _), initial in items:
            W = weight.detach().float()
            What = initial.weight.float()
            device = W.device
            mu = stats.mean.to(device) * float(stats.tokens_per_window or 1)
            var = stats.var.to(device).clamp_min(1e-12)
            norm = stats.norm.to(device)
            regrow = W * mu
            parts["W"].append(W)
            parts["What"].append(What)
            parts["keep"].append(initial.mask)
            parts["err"].append(((W - What) * mu).sum(dim=1))
            parts["regrow"].append(regrow)
            parts["prune"].append(What * mu)
            parts["ranked"].append((regrow, var))
            if m and isinstance(base, ScoreMethod):
                parts["score"].append(base.score(weight, stats).float())
            else:  # unstructured: Wanda score of What; SparseGPT base: Wanda score of its updated values
                parts["score"].append(What.abs() * norm)
            if guarded:
                key = id(stats)
                if key not in gram_of:
                    gram_of[key] = len(grams)
                    grams.append(stats.xtx.to(device))
                G = grams[gram_of[key]]
                parts["Gd"].append((W - What) @ G)
                parts["gid"].append(torch.full((W.shape[0],), gram_of[key], dtype=torch.long, device=device))
            self.sizes.append(W.shape[0])
        self.W = torch.cat(parts["W"])
        self.What = torch.cat(parts["What"])
        self.keep = torch.cat(parts["keep"])
        self.regrow_metric = torch.cat(parts["regrow"])
        self.prune_metric = torch.cat(parts["prune"])
        self.err = torch.cat(parts["err"])
        self._ranked_parts = parts["ranked"]
        self.base_score = torch.cat(parts["score"])
        self.G = torch.stack(grams) if guarded else None
        self.Gd = torch.cat(parts["Gd"]) if guarded else None
        self.gid = torch.cat(parts["gid"]) if guarded else None
        if guarded:  # flat views for one-entry-per-row reads of G[gid, j, k]
            self.G_flat = self.G.reshape(-1)
            self.gram_offset = self.gid * self.G.shape[-1] ** 2
        return self

    def ranked(self, var_power: float) -> torch.Tensor:
        """Regrow ranking ``W_ij mu_j / var_j^p`` (``(R, in)``)."""
        return torch.cat([regrow / var.pow(var_power) for regrow, var in self._ranked_parts])

    def split(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(What, keep)`` per Linear, in the order they were stacked."""
        return list(zip(self.What.split(self.sizes), self.keep.split(self.sizes)))


class _SwapState:
    """What both swap loops share: the expected errors ``e``, the regrow candidate lists and
    their two pointers, the acceptance rule and, in guarded mode, ``G d`` for the exact ``dE``.
    ``rows.What`` and ``rows.keep`` are updated in place."""

    def __init__(self, method: DSnoT, rows: _Rows, check_sign: bool):
        self.method, self.data = method, rows
        W, What, keep = rows.W, rows.What, rows.keep
        self.rows = torch.arange(W.shape[0], device=W.device)
        self.regrow_metric = rows.regrow_metric  # effect on e of regrowing (pruned entries)
        self.prune_metric = rows.prune_metric  # effect on e of pruning (kept entries)
        self.err = rows.err  # e_i = T sum_j (W_ij - What_ij) mu_j
        self.sign0 = torch.sign(self.err)
        ranked = rows.ranked(method.var_power)
        self.grow_hi, self.n_grow = _ordered(ranked, ~keep, True, method.max_cycles)
        self.grow_lo, _ = _ordered(ranked, ~keep, False, method.max_cycles)
        del ranked
        self.ptr_hi = torch.zeros_like(self.rows)
        self.ptr_lo = torch.zeros_like(self.rows)
        self.active = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
        self.check_sign = check_sign

    def next_grow(self):
        """Per row: whether to regrow from the top (``e > 0``), which weight, and whether the
        regrow list is used up (its two pointers walk one list from both ends and have met)."""
        grow_up = self.err > 0
        idx = torch.where(grow_up, _at(self.grow_hi, self.ptr_hi), _at(self.grow_lo, self.ptr_lo))
        return grow_up, idx, self.ptr_hi + self.ptr_lo >= self.n_grow

    def advance_grow(self, grow_up, live) -> None:
        self.ptr_hi += (grow_up & live).long()
        self.ptr_lo += (~grow_up & live).long()

    def step(self, j, k, exhausted):
        """Decide and apply this cycle's swap (regrow ``j``, prune ``k``) per row; returns the
        rows that took it. Row-wise reads are gathers (one entry per row), writes scatters."""
        self.active &= ~exhausted
        d = self.data
        W, What, keep = d.W, d.What, d.keep
        j1, k1 = j.unsqueeze(1), k.unsqueeze(1)
        w_j = W.gather(1, j1).squeeze(1)
        what_j = What.gather(1, j1).squeeze(1)
        what_k = What.gather(1, k1).squeeze(1)
        err_after = self.err + self.prune_metric.gather(1, k1).squeeze(1) - self.regrow_metric.gather(1, j1).squeeze(1)
        over = self.err.abs() > self.method.update_threshold
        take = self.active & over
        if self.check_sign:
            take &= torch.sign(err_after) == self.sign0
        if self.method.mode == "reference":
            self.active = take  # the first refused swap stops the row
        else:
            a, b = -w_j, what_k
            G, n, base = d.G_flat, d.G.shape[-1], d.gram_offset
            dE = (
                2 * (a * d.Gd.gather(1, j1).squeeze(1) + b * d.Gd.gather(1, k1).squeeze(1))
                + a * a * G.take(base + j * (n + 1)) + b * b * G.take(base + k * (n + 1)) + 2 * a * b * G.take(base + j * n + k)
            )
            take &= dE < 0
            self.active = self.active & over
            r = take.nonzero().squeeze(1)
            if r.numel():
                rows_of_g = d.G.view(-1, n)
                g = d.gid[r] * n
                delta = a[r].unsqueeze(1) * rows_of_g.index_select(0, g + j[r]) + b[r].unsqueeze(1) * rows_of_g.index_select(0, g + k[r])
                d.Gd.index_add_(0, r, delta)
        self.err = torch.where(take, err_after, self.err)
        What.scatter_(1, j1, torch.where(take, w_j, what_j).unsqueeze(1))
        What.scatter_(1, k1, torch.where(take, torch.zeros_like(what_k), what_k).unsqueeze(1))
        keep.scatter_(1, j1, (take | keep.gather(1, j1).squeeze(1)).unsqueeze(1))
        keep.scatter_(1, k1, (~take & keep.gather(1, k1).squeeze(1)).unsqueeze(1))
        return take
