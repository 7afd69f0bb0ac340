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
  Over every token ``G`` would cost about one more forward pass of the block; by default
  (``guard_gram: sampled``) it is summed over every 16th calibration token only, so "never
  increases" holds on that sixteenth of the tokens (held-out perplexity on the bundled model,
  Wanda base, 50 / 60 / 70% / 2:4: 29.40 / 66.16 / 302.93 / 69.71 sampled vs 29.41 / 66.57 /
  303.27 / 68.99 full; every 8th token: 29.27 / 66.81 / 291.04 / 69.17); ``guard_gram: full``
  uses every token. With a SparseGPT base the full
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

Loops: with the sign check on (guarded, or N:M) a taken swap never changes ``sign(e_i)``, so a
row reads one regrow list and one pruning list only, and only those are built. Unstructured and
on the torch path, the row's pointers then advance together, which :meth:`DSnoT._swap_in_list_order`
exploits (cycle ``c`` reads column ``c`` of every list; ``G d`` is tracked only at list entries);
otherwise :meth:`DSnoT._swap_unstructured` / :meth:`DSnoT._swap_nm` walk per-row pointers, and
the CuPy backend runs the same cycles in one kernel. All give the same result bit for bit (tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, SparsityPattern
from prune_cli.methods.base import Job, PruneResult, ScoreMethod, WeightMethod, build_method, dsnot_bases, few_threads

MODES = ("guarded", "reference")


def _ordered(
    values: torch.Tensor, eligible: torch.Tensor, descending: bool, limit: int, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the first ``limit`` ``eligible`` entries ordered by ``values``
    (``(out, limit)``; a pointer never moves further than the number of cycles, so a top-k
    suffices instead of a full sort), and how many eligible entries each row has.
    ``overwrite``: ``values`` is scratch and may be overwritten (saves a copy)."""
    fill = float("-inf") if descending else float("inf")
    keyed = values.masked_fill_(~eligible, fill) if overwrite else values.masked_fill(~eligible, fill)
    k = max(1, min(limit, values.shape[1]))
    order = torch.topk(keyed, k, dim=1, largest=descending, sorted=True).indices
    return order, eligible.sum(dim=1)


def _base_info(result: PruneResult) -> dict | None:
    """The base method's diagnostics, reported under ``base`` (None when it has none)."""
    return None if result.info is None else {"base": result.info}


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
    guard_gram: str = "sampled"  # sampled: X^T X over every 16th token | full: over all tokens
    base_options: dict | None = None

    def validate(self) -> None:
        bases = dsnot_bases()  # the registered methods that declare ``dsnot_base``
        if self.base not in bases:
            raise RecipeError(f"dsnot base must be one of {', '.join(bases)}, got {self.base!r}")
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

        return build_method(self.base, self.base_options or {})

    @property
    def required_stats(self) -> frozenset[Stat]:  # type: ignore[override]
        wanted = {Stat.SQ_NORM, Stat.MEAN_VAR} | set(self.base_method().required_stats)
        if self.mode == "guarded" and Stat.GRAM not in wanted:
            wanted.add(Stat.GRAM if self.guard_gram == "full" else Stat.GRAM_SAMPLE)
        return frozenset(wanted)

    @property
    def permutes_inputs(self) -> bool:  # type: ignore[override]
        return self.base_method().permutes_inputs

    @property
    def updates_weights(self) -> bool:  # type: ignore[override]
        """Regrown weights take their dense values: only a base that updates weights does."""
        return self.base_method().updates_weights

    @property
    def unstructured_scope(self) -> str:
        """Swaps are one-for-one within a row: the base's counts stay."""
        return self.base_method().unstructured_scope

    @property
    def patterns(self) -> tuple[type, ...]:  # type: ignore[override]
        """Swaps keep the base's pattern (N:M swaps stay inside an M-group)."""
        return self.base_method().patterns

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
        jobs = [_in_base_order(job, result) for job, result in zip(jobs, results, strict=False)]
        if self.max_cycles == 0:
            return results
        batches: dict[tuple, list[int]] = {}
        for i, (weight, _, pattern) in enumerate(jobs):
            m = pattern.m if isinstance(pattern, NM) else 0
            batches.setdefault((weight.shape[1], m, weight.device), []).append(i)
        for (_, m, device), members in batches.items():
            pattern = jobs[members[0]][2]
            parts = [_Part(jobs[i], results[i], base, m) for i in members]
            check_sign = self._sign_check(pattern)
            swap = getattr(backend, "dsnot_swap", None)  # the CuPy backend's kernel: same result
            kernel = swap is not None and device == getattr(backend, "device", None)
            if self._walks_lists_in_order(m, check_sign, kernel):
                self._swap_in_list_order(parts)
                for i, part in zip(members, parts, strict=False):
                    results[i] = PruneResult(part.What.to(jobs[i][0].dtype), part.keep, _base_info(results[i]),
                                             results[i].input_permutation)
                continue
            rows = _Rows.stack(parts, self.mode == "guarded")
            state = _SwapState(self, rows, check_sign)
            lists = None if m else self._prune_lists(state, rows)  # big ops: all threads
            if kernel:
                self._swap_kernel(swap, state, rows, lists, m)
            else:
                with few_threads(device):  # the cycles: long chains of tiny ops
                    if m:
                        self._swap_nm(state, rows, m)
                    else:
                        self._swap_unstructured(state, lists)
            for i, (weight_hat, keep) in zip(members, rows.split(), strict=False):
                results[i] = PruneResult(weight_hat.to(jobs[i][0].dtype), keep, _base_info(results[i]),
                                         results[i].input_permutation)
        return results

    @staticmethod
    def _walks_lists_in_order(m: int, check_sign: bool, kernel: bool) -> bool:
        """Whether :meth:`_swap_in_list_order` applies: unstructured, sign check on, no kernel."""
        return not m and check_sign and not kernel

    # ------------------------------------------------------------------ the two swap loops

    def _swap_kernel(self, swap, state: _SwapState, rows: _Rows, lists, m: int) -> None:
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

    def _prune_lists(self, state: _SwapState, rows: _Rows):
        """Unstructured pruning candidates per row, lowest Wanda score first: kept weights whose
        pruning raises ``e`` (``What_ik mu_k > 0``) and those that lower it; with their counts."""
        limit = self.max_cycles
        if state.sign_fixed:  # a row only ever reads the list of its own sign: build that one
            order, count = (torch.cat(t) for t in zip(*(part.prune_list(limit) for part in rows.parts), strict=False))
            return order, count, order, count
        return (
            *_ordered(rows.base_score, rows.keep & (state.prune_metric > 0), False, limit),
            *_ordered(rows.base_score, rows.keep & (state.prune_metric < 0), False, limit),
        )

    def _swap_unstructured(self, state: _SwapState, lists) -> None:
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

    def _swap_in_list_order(self, parts: list[_Part]) -> None:
        """:meth:`_swap_unstructured` when each row reads one regrow and one pruning list (the
        sign check is on: a taken swap never changes ``sign(e)``): a row's two pointers then
        advance together every cycle until the row stops, so cycle ``c`` considers column ``c``
        of both lists.

        Everything a swap reads is then known per list entry up front (regrown and pruned weights
        are disjoint sets), so it is gathered per Linear into ``(R, L)`` tensors, which are
        stacked and laid out as ``(L, R)``: a cycle reads row ``c`` of each, and no ``(R, in)``
        tensor is stacked. ``G d`` changes with every taken swap, but only its entries at the
        row's later list columns are ever read: those are kept and a taken swap adds
        ``a G[j, x] + b G[k, x]`` at them, instead of updating a whole row of ``G d``. The taken
        swaps are written into each Linear's ``What`` / ``keep`` once at the end. Same
        candidates, same arithmetic in the same order as :meth:`_SwapState.step`: the same
        result bit for bit (tested)."""
        guarded = self.mode == "guarded"
        if guarded:
            grams, gids = _grams(parts)
            n = grams.shape[-1]
            G_flat = grams.reshape(-1)
        names = ("j", "k", "n_valid", "w_j", "regrow_j", "what_k", "prune_k", "gd_j", "gd_k", "offset")
        cols: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for i, part in enumerate(parts):
            grow, n_grow = part.grow_list(self.var_power, self.max_cycles)
            prune, n_prune = part.prune_list(self.max_cycles)
            cols["j"].append(grow)
            cols["k"].append(prune)
            cols["n_valid"].append(torch.minimum(n_grow, n_prune))
            cols["w_j"].append(part.W.gather(1, grow))
            cols["regrow_j"].append(part.regrow.gather(1, grow))
            cols["what_k"].append(part.What.gather(1, prune))
            cols["prune_k"].append(part.prune.gather(1, prune))
            if guarded:
                Gd = part.d @ grams[gids[i]]
                cols["gd_j"].append(Gd.gather(1, grow))
                cols["gd_k"].append(Gd.gather(1, prune))
                cols["offset"].append(torch.full((1, grow.shape[0]), gids[i] * n * n, dtype=torch.long, device=grow.device))
                del Gd
        length = min(self.max_cycles, cols["j"][0].shape[1])
        if length == 0:
            return

        def stacked(name: str) -> torch.Tensor:  # (L, R)
            return torch.cat(cols.pop(name)).T.contiguous()

        j_cols, k_cols = stacked("j"), stacked("k")
        n_valid = torch.cat(cols.pop("n_valid")).clamp_max(length)
        w_j, regrow_j, what_k, prune_k = stacked("w_j"), stacked("regrow_j"), stacked("what_k"), stacked("prune_k")
        err = torch.cat([part.err for part in parts])
        sign0 = torch.sign(err)
        active = torch.ones_like(err, dtype=torch.bool)
        if guarded:  # the static terms of dE, evaluated as step() does: ((a*a)*G_jj), ((2*a)*b)
            gd_j, gd_k = stacked("gd_j"), stacked("gd_k")
            offset = torch.cat(cols.pop("offset"), dim=1)  # (1, R): where each row's Gram starts
            a_all, b_all = -w_j, what_k
            grow_at, prune_at = offset + j_cols, offset + k_cols  # (L, R): G[0, x] of each entry
            aa_gjj = a_all * a_all * G_flat.take(grow_at + j_cols * n)
            bb_gkk = b_all * b_all * G_flat.take(prune_at + k_cols * n)
            ab2 = 2 * a_all * b_all
            jk_at = grow_at + (j_cols * (n - 1) + k_cols)  # G[j, k]
        taken = torch.zeros(length, err.shape[0], dtype=torch.bool, device=err.device)
        with few_threads(err.device):  # the cycles: long chains of tiny ops
            for c in range(length):
                active &= n_valid > c
                if not bool(active.any()):
                    break
                err_after = err + prune_k[c] - regrow_j[c]
                over = err.abs() > self.update_threshold
                take = active & over & (torch.sign(err_after) == sign0)
                if guarded:
                    a, b = a_all[c], b_all[c]
                    dE = 2 * (a * gd_j[c] + b * gd_k[c]) + aa_gjj[c] + bb_gkk[c] + ab2[c] * G_flat.take(jk_at[c])
                    take &= dE < 0
                    active &= over
                    r = take.nonzero().squeeze(1)
                    if r.numel() and c + 1 < length:
                        ar, br = a[r], b[r]
                        jn, kn = j_cols[c, r] * n, k_cols[c, r] * n
                        for gd, at in ((gd_j, grow_at), (gd_k, prune_at)):
                            later = at[c + 1 :, r]  # (L - c - 1, |r|)
                            delta = ar * G_flat.take(later + jn) + br * G_flat.take(later + kn)
                            gd[c + 1 :].index_add_(1, r, delta)
                else:
                    active.copy_(take)  # reference: the first refused swap stops the row
                err = torch.where(take, err_after, err)
                taken[c] = take
        first = 0
        for part in parts:  # write the taken swaps into each Linear's What / keep
            rows_here = part.W.shape[0]
            cycle, r = taken[:, first : first + rows_here].nonzero(as_tuple=True)
            j, k = j_cols[cycle, first + r], k_cols[cycle, first + r]
            part.What[r, j] = w_j[cycle, first + r]
            part.What[r, k] = 0
            part.keep[r, j] = True
            part.keep[r, k] = False
            first += rows_here

    def _swap_nm(self, state: _SwapState, rows: _Rows, m: int) -> None:
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


def _in_base_order(job: Job, result: PruneResult) -> Job:
    """The job with its input channels in the order the base chose (a RIA base may permute them
    under N:M, :attr:`PruneResult.input_permutation`): the swaps then run on the base's groups,
    and the result keeps the base's permutation for the pruning stage to fold."""
    perm = result.input_permutation
    if perm is None:
        return job
    weight, stats, pattern = job
    assert stats is not None  # prune_group refuses jobs without statistics before this
    return weight[:, perm], stats.permuted(perm), pattern


class _Part:
    """One Linear of a batch, with what the swap loops read: dense ``W``, the base's ``What`` and
    ``keep`` (``(out, in)``; updated in place), ``mu`` (scaled by tokens per window) and ``var``
    (``(in,)``), the effects ``regrow = W * mu`` and ``prune = What * mu``, ``d = W - What``,
    ``e = sum_j d_ij mu_j`` (``(out,)``) and the score that orders pruning candidates: the
    Wanda score of ``What`` (unstructured; with a SparseGPT base, of its updated values) or the
    base score (N:M)."""

    def __init__(self, job: Job, initial: PruneResult, base: WeightMethod, m: int):
        weight, stats, _ = job
        assert stats is not None  # prune_group refuses jobs without statistics before this
        self.stats = stats
        self.W = weight.detach().float()
        self.What = initial.weight.float()
        self.keep = initial.mask
        device = self.W.device
        self.mu = stats.mean.to(device) * float(stats.tokens_per_window or 1)
        self.var = stats.var.to(device).clamp_min(1e-12)
        self.regrow = self.W * self.mu
        self.prune = self.What * self.mu
        self.d = self.W - self.What
        self.err = (self.d * self.mu).sum(dim=1)
        if m and isinstance(base, ScoreMethod):
            self.score = base.score(weight, stats).float()
        else:
            self.score = self.What.abs() * stats.norm.to(device)

    def ranked(self, var_power: float) -> torch.Tensor:
        """Regrow ranking ``W_ij mu_j / var_j^p`` (``(out, in)``, a new tensor)."""
        return self.regrow / self.var.pow(var_power)

    def grow_list(self, var_power: float, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the sign check, the one regrow list each row reads: pruned weights by
        :meth:`ranked`, descending where ``e > 0``, ascending elsewhere (``(out, limit)``), and
        how many each row has (:func:`_ordered`)."""
        ranked = self.ranked(var_power)
        ranked.mul_(torch.where(self.err > 0, 1.0, -1.0).unsqueeze(1))
        return _ordered(ranked, ~self.keep, True, limit, overwrite=True)

    def prune_list(self, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the sign check, the one pruning list each row reads: kept weights whose pruning
        moves ``e`` towards 0 (``What_ik mu_k > 0`` where ``e < 0``, ``< 0`` elsewhere), lowest
        score first (``(out, limit)``), and how many each row has. Consumes ``score`` (its
        ineligible entries are overwritten; a stacked copy, if any, was taken before)."""
        eligible = self.keep & torch.where((self.err < 0).unsqueeze(1), self.prune > 0, self.prune < 0)
        return _ordered(self.score, eligible, False, limit, overwrite=True)


def _grams(parts: list[_Part]) -> tuple[torch.Tensor, list[int]]:
    """The distinct Gram matrices ``X^T X`` of the parts' inputs, stacked (``(n_inputs, in, in)``;
    Linears reading the same input share one), and each part's index into them."""
    index: dict[int, int] = {}
    grams: list[torch.Tensor] = []
    for part in parts:
        if id(part.stats) not in index:
            index[id(part.stats)] = len(grams)
            grams.append(part.stats.xtx.to(part.W.device))
    return torch.stack(grams), [index[id(part.stats)] for part in parts]


class _Rows:
    """The rows of one or more Linears (:class:`_Part`) with the same ``in_features``, stacked
    (``(R, in)`` each): ``W``, ``What``, ``keep`` (updated in place), ``regrow_metric``,
    ``prune_metric``, ``base_score``, ``err`` (``(R,)``) and, guarded, the Gram matrices ``G``
    (``(n_inputs, in, in)``) with each row's index ``gid`` into them and ``Gd = d G``."""

    sizes: list[int]
    parts: list[_Part]
    W: torch.Tensor
    What: torch.Tensor
    keep: torch.Tensor
    regrow_metric: torch.Tensor
    prune_metric: torch.Tensor
    err: torch.Tensor
    base_score: torch.Tensor
    G: torch.Tensor | None  # guarded only (None otherwise), as Gd and gid
    Gd: torch.Tensor | None
    gid: torch.Tensor | None
    G_flat: torch.Tensor  # guarded only (not set otherwise), as gram_offset
    gram_offset: torch.Tensor

    @classmethod
    def stack(cls, parts: list[_Part], guarded: bool) -> _Rows:
        self = cls()
        self.sizes = [part.W.shape[0] for part in parts]
        self.parts = parts

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(part, name) for part in parts])

        self.W, self.What, self.keep = cat("W"), cat("What"), cat("keep")
        self.regrow_metric, self.prune_metric = cat("regrow"), cat("prune")
        self.err, self.base_score = cat("err"), cat("score")
        self.G = self.Gd = self.gid = None
        if guarded:
            self.G, gids = _grams(parts)
            self.Gd = torch.cat([part.d @ self.G[g] for part, g in zip(parts, gids, strict=False)])
            self.gid = torch.cat([torch.full((size,), g, dtype=torch.long, device=self.W.device) for size, g in zip(self.sizes, gids, strict=False)])
            # flat views for one-entry-per-row reads of G[gid, j, k]
            self.G_flat = self.G.reshape(-1)
            self.gram_offset = self.gid * self.G.shape[-1] ** 2
        return self

    def ranked(self, var_power: float) -> torch.Tensor:
        """Regrow ranking ``W_ij mu_j / var_j^p`` (``(R, in)``)."""
        return torch.cat([part.ranked(var_power) for part in self.parts])

    def split(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(What, keep)`` per Linear, in the order they were stacked."""
        return list(zip(self.What.split(self.sizes), self.keep.split(self.sizes), strict=False))


class _SwapState:
    """What both swap loops share: the expected errors ``e``, the regrow candidate lists and
    their two pointers, the acceptance rule and, in guarded mode, ``G d`` for the exact ``dE``.
    ``rows.What`` and ``rows.keep`` are updated in place."""

    def __init__(self, method: DSnoT, rows: _Rows, check_sign: bool):
        self.method, self.data = method, rows
        W, keep = rows.W, rows.keep
        self.rows = torch.arange(W.shape[0], device=W.device)
        self.regrow_metric = rows.regrow_metric  # effect on e of regrowing (pruned entries)
        self.prune_metric = rows.prune_metric  # effect on e of pruning (kept entries)
        self.err = rows.err  # e_i = T sum_j (W_ij - What_ij) mu_j
        self.sign0 = torch.sign(self.err)
        # With the sign check a taken swap never changes sign(e), so each row reads only one
        # regrow list (descending when e > 0, ascending otherwise) and one pruning list: one
        # top-k per list instead of two, the same candidates in the same order.
        self.sign_fixed = check_sign
        if self.sign_fixed:
            lists = (part.grow_list(method.var_power, method.max_cycles) for part in rows.parts)
            self.grow_hi, self.n_grow = (torch.cat(t) for t in zip(*lists, strict=False))
            self.grow_lo = self.grow_hi
        else:
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
            # guarded (mode != reference): _Rows.stack built the Gram matrices
            assert d.G is not None and d.Gd is not None and d.gid is not None
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
