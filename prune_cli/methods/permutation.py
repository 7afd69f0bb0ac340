"""Input-channel permutations for N:M pruning that fold exactly into the checkpoint.

An N:M pattern keeps ``N`` of every ``M`` consecutive inputs of a row; which inputs share a
group is an accident of the channel order. Reordering a Linear's input channels by ``P``
(``W' = W[:, P]``, so input channel ``c`` of the new layer is old channel ``P[c]``) before
choosing the groups can keep more of the score (RIA, Zhang et al. 2024). The exported model
is the same function with real N:M zeros iff whatever produces that input emits its channels
in the order ``P`` too: the producer's output rows (and bias) are reordered the same way.

Where that holds exactly (:func:`block_folds`), for the layouts verified in the tests
(``tests/methods/test_ria.py`` compares every family's logits before and after a random folded
permutation):

* **MLP intermediate channels** (``down_proj``'s input; ``fc2``, ``dense_4h_to_h``): the output
  rows of ``gate_proj`` and ``up_proj`` (or ``fc1`` and its bias; Phi-3's fused ``gate_up_proj``:
  both halves) in the same order; the activation between them is elementwise. Any permutation.
* **Attention output** (``o_proj``'s input; OPT ``out_proj``, GPT-NeoX ``attention.dense``):
  the concatenated heads' ``softmax(q k^T) v``, so it follows ``v_proj``'s rows, but only
  within a head: moving a channel of ``v`` to another head would mix it with that head's
  attention weights. A permutation ``sigma_k`` of ``[0, head_dim)`` per key/value head ``k``
  reorders that head's ``v_proj`` rows; with grouped-query attention (``n_rep`` query heads per
  key/value head, query head ``h`` reading key/value head ``h // n_rep`` as transformers'
  ``repeat_kv`` lays them out) every one of those ``n_rep`` query heads sees ``v`` reordered by
  the same ``sigma_k``, so ``o_proj``'s input must be permuted by ``sigma_k`` inside each of
  them: ``P[h * head_dim + d] = h * head_dim + sigma_{h // n_rep}(d)``. The search therefore
  chooses ``sigma_k`` for the ``n_rep`` head slices of ``o_proj`` stacked as rows of one
  problem (:class:`Fold`'s ``groups``).
* **Not folded**: inputs read from the residual stream (q/k/v, gate/up, fc1, ...): permuting
  them would reorder the shared hidden state and every norm weight, embedding and head that
  touches it, for every block at once. Those Linears are pruned in their own channel order.

Other families (GPT-2's ``Conv1D`` storage, mixture-of-experts blocks, unknown model types)
get no folds: a log line says so and the channel order is kept.

The search (:func:`search_order`) is RIA's: channel reallocation, then one linear-sum-assignment
pass per position of the group (see its docstring).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn

from prune_cli.core.patterns import NM
from prune_cli.methods.base import few_threads

log = logging.getLogger(__name__)
SMALL_PROBLEM = 1 << 20  # scores of a consumer below which its search runs on one CPU thread


@dataclass(frozen=True)
class Fold:
    """A consumer Linear whose input channels may be permuted, and the producer rows that must
    follow.

    ``groups`` (``(P, R, W)`` long): the consumer's input channels in ``P`` independent problems;
    problem ``p`` holds ``R`` tied copies of ``W`` channels that one permutation ``sigma_p`` of
    ``[0, W)`` reorders alike (attention: ``P`` key/value heads, ``R`` query heads each, ``W`` =
    head_dim; MLP: ``1 x 1 x intermediate``). ``producers``: ``(local name, rows)`` with ``rows``
    (``(P, W)``) the producer's output rows that emit ``groups[p, r, w]`` (for every ``r``); a
    producer may appear more than once (Phi-3's ``gate_up_proj``: its gate and its up half)."""

    consumer: str
    groups: torch.Tensor
    producers: tuple[tuple[str, torch.Tensor], ...]

    def sigmas(self, perm: torch.Tensor) -> torch.Tensor:
        """The per-problem permutations ``sigma`` (``(P, W)``) of the consumer permutation
        ``perm``; raises ``ValueError`` unless ``perm`` is one this fold can carry (each tied
        copy reordered alike, within its own channels)."""
        groups = self.groups.to(perm.device)
        P, R, W = groups.shape
        position = torch.full((perm.numel(),), -1, dtype=torch.long, device=perm.device)
        position[groups[:, 0, :].reshape(-1)] = torch.arange(W, device=perm.device).repeat(P)
        sigma = position[perm[groups[:, 0, :]]]  # (P, W)
        if bool((sigma < 0).any()) or not torch.equal(permutation_from_orders(groups, sigma, perm.numel()), perm):
            raise ValueError(f"{self.consumer}: the input permutation does not fold into {self.producer_names()}")
        return sigma

    def producer_names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.producers))

    def producer_orders(self, perm: torch.Tensor, out_features: dict[str, int]) -> dict[str, torch.Tensor]:
        """For each producer, the row order ``order`` (new row ``i`` = old row ``order[i]``) that
        makes it emit the consumer's input in the order ``perm``."""
        sigma = self.sigmas(perm)
        orders: dict[str, torch.Tensor] = {}
        for name, rows in self.producers:
            rows = rows.to(perm.device)
            order = orders.setdefault(name, torch.arange(out_features[name], device=perm.device))
            order[rows.reshape(-1)] = rows.gather(1, sigma).reshape(-1)
        return orders


def permutation_from_orders(groups: torch.Tensor, sigma: torch.Tensor, in_features: int) -> torch.Tensor:
    """The consumer's input permutation (``(in_features,)``) that applies ``sigma[p]`` to every
    tied copy of problem ``p`` of ``groups`` and leaves other channels in place."""
    perm = torch.arange(in_features, device=sigma.device)
    groups = groups.to(sigma.device)
    P, R, W = groups.shape
    perm[groups.reshape(-1)] = groups.gather(2, sigma.unsqueeze(1).expand(P, R, W)).reshape(-1)
    return perm


# --------------------------------------------------------------------- which layouts fold

@dataclass(frozen=True)
class _Layout:
    """Module names of one family's foldable inputs: the MLP (consumer, producers with the row
    offset of their slice) and the attention output (consumer, the module holding ``v``, ``v``'s
    first row and the row stride between key/value heads in units of head_dim)."""

    mlp: tuple[str, tuple[tuple[str, int], ...]]
    attention: tuple[str, str, str, int]  # consumer, producer, v offset ("0" | "q+k" | "2hd"), stride


_LLAMA = _Layout(("mlp.down_proj", (("mlp.gate_proj", 0), ("mlp.up_proj", 0))), ("self_attn.o_proj", "self_attn.v_proj", "0", 1))
# model_type -> layout; each verified numerically in tests/methods/test_ria.py
LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _LLAMA,
    "opt": _Layout(("fc2", (("fc1", 0),)), ("self_attn.out_proj", "self_attn.v_proj", "0", 1)),
    "phi3": _Layout(("mlp.down_proj", (("mlp.gate_up_proj", 0), ("mlp.gate_up_proj", 1))),
                    ("self_attn.o_proj", "self_attn.qkv_proj", "q+k", 1)),
    "gpt_neox": _Layout(("mlp.dense_4h_to_h", (("mlp.dense_h_to_4h", 0),)),
                        ("attention.dense", "attention.query_key_value", "2hd", 3)),
}


def text_config(model: nn.Module):
    """The model's (text) config, or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def layout_for(config) -> _Layout | None:
    """The verified fold layout of ``config``'s model type, or None (logged once by the caller)."""
    return LAYOUTS.get(getattr(config, "model_type", "")) if config is not None else None  # "" is no layout


def _heads(config) -> tuple[int, int, int] | None:
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv:
        return None
    return heads, kv, head_dim


def block_folds(linears: dict[str, nn.Linear], config) -> dict[str, Fold]:
    """The folds of one block (:class:`Fold` by consumer name) for a verified layout; a fold whose
    modules are missing or whose shapes do not match the config is left out (logged at debug)."""
    layout = layout_for(config)
    if layout is None:
        return {}
    folds: dict[str, Fold] = {}
    consumer, producers = layout.mlp
    if consumer in linears and all(name in linears for name, _ in producers):
        width = linears[consumer].in_features
        rows = [(name, half * width + torch.arange(width).unsqueeze(0)) for name, half in producers]
        if all(linears[name].out_features >= int(r.max()) + 1 for name, r in rows):
            folds[consumer] = Fold(consumer, torch.arange(width).view(1, 1, width), tuple(rows))
    consumer, producer, offset, stride = layout.attention
    heads = _heads(config)
    if heads is not None and consumer in linears and producer in linears:
        n_heads, kv, hd = heads
        n_rep = n_heads // kv
        first = {"0": 0, "q+k": (n_heads + kv) * hd, "2hd": 2 * hd}[offset]
        query_heads = torch.arange(kv).unsqueeze(1) * n_rep + torch.arange(n_rep)  # (kv, n_rep)
        groups = query_heads.unsqueeze(2) * hd + torch.arange(hd)  # (kv, n_rep, hd)
        kv_rows = first + torch.arange(kv).unsqueeze(1) * (stride * hd) + torch.arange(hd)  # (kv, hd)
        if linears[consumer].in_features == n_heads * hd and linears[producer].out_features >= int(kv_rows.max()) + 1:
            folds[consumer] = Fold(consumer, groups, ((producer, kv_rows),))
        else:
            log.debug("%s: shapes do not match the config's heads; its input is not permuted", consumer)
    return folds


# --------------------------------------------------------------------- applying a permutation

def fold_into_producers(folds: dict[str, Fold], results: dict, linears: dict[str, nn.Linear]) -> None:
    """For every result (``PruneResult`` by local name) carrying an ``input_permutation`` (its
    weight and mask already in the new order), reorder its producers' rows to match: a pruned
    producer's result (weight, mask; its diagnostics name the consumer), an unpruned one's
    weight in place, and every producer's bias in place. ``results`` is updated in place."""
    for consumer in list(results):
        perm = getattr(results[consumer], "input_permutation", None)
        if perm is None:
            continue
        if consumer not in folds:
            raise RuntimeError(f"{consumer}: permuted input channels with no producer to fold them into")
        fold = folds[consumer]
        orders = fold.producer_orders(perm, {name: linears[name].out_features for name in fold.producer_names()})
        for name, order in orders.items():
            linear = linears[name]
            order = order.to(linear.weight.device)
            if linear.bias is not None:
                linear.bias.data.copy_(linear.bias.data[order])
            if name in results:
                done = results[name]
                info = {**(done.info or {}), "rows_permuted_for": consumer}
                results[name] = replace(done, weight=done.weight[order], mask=done.mask[order], info=info)
            else:
                linear.weight.data.copy_(linear.weight.data[order])


def permute_in_place(fold: Fold, perm: torch.Tensor, linears: dict[str, nn.Linear]) -> None:
    """Reorder the consumer's input columns by ``perm`` and its producers' rows to match: the
    block computes the same function (what the tests check on every verified layout)."""
    consumer = linears[fold.consumer]
    consumer.weight.data.copy_(consumer.weight.data[:, perm.to(consumer.weight.device)])
    fold_into_producers({fold.consumer: fold}, {fold.consumer: _Permuted(perm)}, linears)


@dataclass(frozen=True)
class _Permuted:
    input_permutation: torch.Tensor
    info: dict | None = None


# --------------------------------------------------------------------- RIA's search

def kept_score(score: torch.Tensor, pattern: NM) -> float:
    """Sum over rows and groups of ``M`` consecutive columns of the ``N`` largest scores
    (float64): what an N:M mask chosen on ``score`` keeps."""
    rows, width = score.shape
    groups = score.reshape(rows, width // pattern.m, pattern.m)
    return float(groups.topk(pattern.n_keep, dim=2).values.sum(dtype=torch.float64))


def reallocated(score: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic channel reallocation: channels sorted by total score (ascending, ties by
    index) are cut into ``M`` equal bands; position ``s`` of every group takes band ``s``, in
    order for even ``s`` and reversed for odd ``s``, so each group holds one channel of every
    importance band (a snake: group 0 gets the least of band 0, the most of band 1, ...).
    Returns the order (``order[c]`` = the old channel at new position ``c``)."""
    width = score.shape[1]
    n_groups = width // m
    ranked = torch.sort(score.double().sum(dim=0), stable=True).indices.view(m, n_groups)
    ranked[1::2] = ranked[1::2].flip(1)
    return ranked.T.reshape(-1).contiguous()


def _assignment_pass(score: torch.Tensor, order: torch.Tensor, pattern: NM, slot: int, max_groups: int) -> torch.Tensor:
    """One linear-sum-assignment step of RIA: the channels at position ``slot`` of the groups are
    redistributed among the groups (each group takes exactly one), maximising the kept score;
    the groups' other channels stay. Groups are handled in contiguous chunks of at most
    ``max_groups`` (the release's ``--fast`` blocks; one chunk when it fits).

    Group ``g`` with its other ``M - 1`` channels ``a`` (per row) and a candidate channel
    ``v`` keeps ``top_N(a) + max(0, v - a_(N))`` per row (``a_(N)``: the N-th largest of ``a``;
    ``N < M``), so the gain matrix is ``C[g, r] = sum_i max(0, v_ir - t_ig)`` with ``t`` = the
    groups' N-th largest others and ``v`` = the candidates' scores, computed as
    ``(sum_i v_ir - sum_i t_ig + ||v_r - t_g||_1) / 2`` (one ``cdist``)."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 - scipy only when RIA permutes

    rows, width = score.shape
    m, n = pattern.m, pattern.n_keep
    n_groups = width // m
    chunks = -(-n_groups // max_groups)
    bounds = [round(i * n_groups / chunks) for i in range(chunks + 1)]
    by_group = order.view(n_groups, m).clone()
    others = [s for s in range(m) if s != slot]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        cols = by_group[lo:hi]
        v = score[:, cols[:, slot]]  # (rows, g)
        t = score[:, cols[:, others]].topk(n, dim=2).values[:, :, -1]  # (rows, g)
        l1 = torch.cdist(t.T.unsqueeze(0), v.T.unsqueeze(0), p=1)[0]  # (g, g): |t_g - v_r|_1
        gain = 0.5 * (v.sum(0).unsqueeze(0) - t.sum(0).unsqueeze(1) + l1)
        _, taken = linear_sum_assignment(gain.double().cpu().numpy(), maximize=True)
        cols[:, slot] = cols[torch.as_tensor(taken, device=cols.device), slot].clone()
    return by_group.reshape(-1)


def search_order(score: torch.Tensor, pattern: NM, max_groups: int = 128) -> tuple[torch.Tensor, dict]:
    """RIA's channel permutation for an N:M mask on ``score`` (``(rows, W)``, ``W % M == 0``):
    start from the channel reallocation (:func:`reallocated`) or the identity, whichever keeps
    more, then one assignment pass (:func:`_assignment_pass`) per position ``0..M-1``. Each pass
    can only keep more (the current assignment is one of its choices); the result is kept only
    if it beats the identity, so the kept score never drops. Returns the order and the kept
    scores (identity, reallocated, final)."""
    score = score.float()
    identity = torch.arange(score.shape[1], device=score.device)
    kept_identity = kept_score(score, pattern)
    if pattern.n_keep >= pattern.m:  # nothing is pruned: every order keeps everything
        return identity, {"identity": kept_identity, "reallocated": kept_identity, "final": kept_identity}
    order = reallocated(score, pattern.m)
    kept_reallocated = kept_score(score[:, order], pattern)
    best, kept_best = (order, kept_reallocated) if kept_reallocated > kept_identity else (identity, kept_identity)
    order = best
    for slot in range(pattern.m):
        order = _assignment_pass(score, order, pattern, slot, max_groups)
    kept_final = kept_score(score[:, order], pattern)
    if kept_final > kept_best:
        best, kept_best = order, kept_final
    return best, {"identity": kept_identity, "reallocated": kept_reallocated, "final": kept_best}


def consumer_permutation(score: torch.Tensor, groups: torch.Tensor, pattern: NM, max_groups: int = 128):
    """The input permutation of a consumer Linear with RIA scores ``score`` (``(out, in)``)
    under a fold's ``groups``: per problem, the tied slices stacked as rows of one score matrix
    and :func:`search_order` on it. Returns ``(perm, kept)`` (kept scores summed over problems),
    or ``None`` when the groups do not align with the pattern (a slice not a whole number of
    aligned ``M``-groups: ``head_dim % M``), so N:M groups would straddle problems."""
    groups = groups.to(score.device)
    P, R, W = groups.shape
    contiguous = torch.equal(groups, groups[:, :, :1] + torch.arange(W, device=score.device))
    if W % pattern.m or not contiguous or bool((groups[:, :, 0] % pattern.m).any()):
        return None
    sigmas = []
    kept = {"identity": 0.0, "reallocated": 0.0, "final": 0.0}
    # a chain of small ops (a few hundred thousand scores per problem): one CPU thread avoids
    # OpenMP stalls (measured ~10x slower with 2 threads on a shared CPU); large layers keep all

    threads = few_threads(score.device) if score.numel() <= SMALL_PROBLEM else nullcontext()
    with threads:
        for p in range(P):
            stacked = torch.cat([score[:, groups[p, r]] for r in range(R)], dim=0)  # (out * R, W)
            sigma, part = search_order(stacked, pattern, max_groups)
            sigmas.append(sigma)
            kept = {k: kept[k] + part[k] for k in kept}
    return permutation_from_orders(groups, torch.stack(sigmas), score.shape[1]), kept
