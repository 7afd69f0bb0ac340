"""RIA (Zhang, Bai, Lin, Mo, Tang & Wang, "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024): Relative Importance and Activations, with
channel permutation for N:M.

Score of weight ``W_ij`` (row ``i`` = output, column ``j`` = input), with ``||X_j||_2`` the L2
norm of input channel ``j`` over the calibration tokens::

    S_ij = ( |W_ij| / sum_k |W_ik|  +  |W_ij| / sum_k |W_kj| ) * ||X_j||_2 ** a      (a = 0.5)

the weight's share of its row (all its output's inputs) plus its share of its column (all
the outputs its input feeds), times the input's activation norm to the power ``a``. A row or
column that sums to zero contributes 0 (its weights are all zero). Selection as Wanda: in every
output row the lowest ``floor(in * s)`` scores are pruned (``scope: row``), or in every group
of ``M`` consecutive inputs the ``M - N`` lowest.

N:M with ``permute: true`` (the default): where the Linear's input channels can be reordered
exactly in the exported model (the pruning stage says which: ``down_proj``'s input and
``o_proj``'s input within key/value heads, :mod:`prune_cli.methods.permutation`), the channels are
reordered before the groups are chosen, by RIA's search (:func:`prune_cli.methods.permutation.search_order`):

1. channel reallocation: channels sorted by their column sum of ``S``, cut into ``M`` bands,
   position ``s`` of every group takes band ``s`` (reversed for odd ``s``);
2. one linear-sum-assignment pass per position ``s = 0..M-1``: the channels at position ``s``
   are reassigned among the groups to maximise the total kept score
   (``scipy.optimize.linear_sum_assignment``), the other positions fixed.

The weight and mask come back in the new channel order (``PruneResult.input_permutation``); the
stage reorders the producers' rows (``gate_proj``/``up_proj``, ``v_proj``), so the checkpoint is
the same function with contiguous N:M groups. Diagnostics per N:M layer
(``PruneResult.info``, in the report): ``inputs_permuted``, the kept score sum with the identity order,
after reallocation and after the assignment passes, and ``kept_score_gain`` (final / identity - 1).

Taken from the paper and its release (biomedical-cybernetics/Relative-importance-and-activation-
pruning, ``lib/prune.py``): the score and ``a = 0.5``; reallocation by the column sum
(``--importance_score sum``, its default) with the alternating band order; the assignment step's
problem (a group's kept score with each candidate channel in position ``s``), one pass per
position; splitting the groups into chunks of contiguous groups (its ``--fast``, which uses
4-16 chunks per layer; here ``lsa_groups`` bounds a chunk, default 128 groups: the assignment's
cost grows with its square, and on a random 576 x 1536 layer 128, 256 and 512 gave a kept-score
gain of 3.44%, 3.48% and 3.53% over the identity, most of it from the reallocation).

Where this differs, and why:

* Unstructured scope: the release's default ranks the whole matrix (``--per_outneuron`` off);
  here ``scope: row`` (as Wanda, and the README's "per output row") is the default and
  ``scope: matrix`` the release's behaviour.
* The release's activation term is ``sqrt(mean_k ||x_j||^2)`` over calibration sequences, a
  constant multiple of ``||X_j||_2``: the same ranking.
* The permutation is folded into the producers (real N:M zeros in the checkpoint); the release
  keeps the original order and zeroes the weights whose permuted groups lost (so its checkpoint
  is not N:M in storage order), and permutes every Linear, including those reading the residual
  stream, which cannot be folded; here those keep their order.
* The search starts from the identity when the reallocation keeps less, and the identity is kept
  when the search does not beat it: the kept score never drops (the release can lose score in
  step 1). The assignment gain is computed in closed form (``top_N`` of the group's others plus
  ``max(0, v - N-th largest other)``) instead of sorting every candidate group.
* Attention output: one permutation per key/value head, shared by its query heads (the
  constraint that makes it exact under grouped-query attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, SparsityPattern
from prune_cli.core.selection import select
from prune_cli.methods.base import PruneResult, ScoreMethod
from prune_cli.methods.permutation import consumer_permutation


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """``|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|`` (float32, ``(out, in)``); a zero row
    or column sum counts as 1 (its entries are all 0)."""
    w = weight.abs().float()
    rows = w.sum(dim=1, keepdim=True)
    cols = w.sum(dim=0, keepdim=True)
    return w / torch.where(rows > 0, rows, 1.0) + w / torch.where(cols > 0, cols, 1.0)


@dataclass(frozen=True)
class RIA(ScoreMethod):
    """RIA: relative importance times ||X_j||^a, N:M after an exact channel permutation (Zhang et al. 2024)."""

    name = "ria"
    required_stats = frozenset({Stat.SQ_NORM})
    permutes_inputs = True
    dsnot_base = True
    a: float = 0.5
    scope: str = "row"
    permute: bool = True
    lsa_groups: int = 128

    def validate(self) -> None:
        if not (isinstance(self.a, (int, float)) and not isinstance(self.a, bool) and math.isfinite(self.a) and self.a >= 0):
            raise RecipeError(f"ria a must be a finite number >= 0, got {self.a!r}")
        if self.scope not in ("row", "matrix"):
            raise RecipeError(f"ria scope must be 'row' or 'matrix', got {self.scope!r}")
        if not isinstance(self.permute, bool):
            raise RecipeError(f"ria permute must be true or false, got {self.permute!r}")
        if not (isinstance(self.lsa_groups, int) and not isinstance(self.lsa_groups, bool) and self.lsa_groups >= 2):
            raise RecipeError(f"ria lsa_groups must be an integer >= 2, got {self.lsa_groups!r}")

    def selection_scope(self) -> str:
        return self.scope

    def score(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        if stats is None:
            raise RuntimeError("ria needs input statistics")
        return relative_importance(weight) * stats.norm.to(weight.device).pow(self.a).unsqueeze(0)

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        groups = getattr(stats, "channel_groups", None)
        if not isinstance(pattern, NM):
            return super().prune(weight, stats, pattern, backend)
        if not self.permute or groups is None:
            return replace(super().prune(weight, stats, pattern, backend), info={"inputs_permuted": False})
        score = self.score(weight, stats)
        found = consumer_permutation(score, groups, pattern, self.lsa_groups)
        if found is None:  # groups not aligned with M (head_dim % M): keep the order
            return replace(self._select(weight, score, pattern, backend), info={"inputs_permuted": False})
        perm, kept = found
        info = {
            "inputs_permuted": kept["final"] > kept["identity"],
            "kept_score": {"identity": kept["identity"], "reallocated": kept["reallocated"], "final": kept["final"]},
            "kept_score_gain": kept["final"] / kept["identity"] - 1.0 if kept["identity"] > 0 else 0.0,
        }
        if not info["inputs_permuted"]:
            return replace(self._select(weight, score, pattern, backend), info=info)
        result = self._select(weight[:, perm], score[:, perm], pattern, backend)
        return replace(result, info=info, input_permutation=perm)

    def _select(self, weight: torch.Tensor, score: torch.Tensor, pattern: SparsityPattern, backend) -> PruneResult:
        if backend is not None:
            mask = backend.select_mask(score, pattern, self.selection_scope())
        else:
            mask = select(score, pattern, self.selection_scope())
        return PruneResult(weight * mask, mask)  # bool promotes per element, no float copy of the mask
