"""Perplexity on held-out text: ``exp(mean token NLL)`` over non-overlapping windows.

For windows ``x`` of shape ``(n, L)`` every position ``t >= 1`` is predicted from ``x[:, :t]``,
so ``n * (L - 1)`` tokens are scored: ``ppl = exp(sum_t -log p(x_t | x_<t) / (n (L - 1)))``.

The windows flow through the model one decoder block at a time (:class:`EvalStage`, a stage of
the :class:`~prune_cli.streaming.driver.BlockDriver`), so a model larger than memory is measured the same
way, and a dense and a compressed evaluation can ride along the walk that prunes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.activation.modules import _Count, count_sparsity
from prune_cli.calibrators import layerwise
from prune_cli.core import distributed
from prune_cli.streaming.driver import BlockDriver, HiddenStage, as_driver


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens}

    @classmethod
    def from_sums(cls, total_nll: float, tokens: int) -> Perplexity:
        mean = total_nll / tokens
        return cls(math.exp(mean) if mean < 700 else float("inf"), mean, tokens)


def batch_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` ``(batch, L)`` under ``logits`` ``(batch, L, vocab)``
    (computed in float32) and the number of tokens scored, ``batch * (L - 1)``. With ``batch``
    1 (how :class:`EvalStage` calls it) the shifted logits are a view, not a copy: a 262k-token
    vocabulary (Gemma 3) makes each copy ``L x 262144`` floats."""
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def head_nll(driver: BlockDriver, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL and token count of the windows ``ids`` ``(batch, L)`` from the last block's
    outputs ``hidden`` ``(batch, L, hidden_size)``, one window's logits at a time: ``(L, vocab)``
    floats in memory instead of ``(batch, L, vocab)`` (1 GB per batch of 4 x 256 tokens with
    Gemma 3's 262k vocabulary). Call inside ``driver.head_on_device()``."""
    total, tokens = 0.0, 0
    for row in range(ids.shape[0]):
        nll, n = batch_nll(driver.head_logits(hidden[row : row + 1], ids[row : row + 1]), ids[row : row + 1])
        total, tokens = total + nll, tokens + n
    return total, tokens


class EvalStage(HiddenStage):
    """Perplexity of ``windows`` (``(n, L)`` ids) in batches of ``batch_size``, pushed through each
    block as the walk passes it; :attr:`result` after the walk.

    ``check_finite``: non-finite hidden states raise :class:`~prune_cli.core.errors.NonFiniteError`
    naming the block (the dense model, whose weights are finite: an overflow); off for a
    compressed model, whose divergence is a result (perplexity ``inf``). ``tally``: a
    :class:`~prune_cli.activation.modules.SparsityTally` that receives the achieved activation
    sparsity of each block's sparsifiers on these windows. ``head_dtype``: the parts outside the
    blocks are rounded to it while this stage uses them (a checkpoint saved in that dtype)."""

    timing_key = "eval"
    WHAT = "activations of the evaluation text"

    def __init__(self, windows: torch.Tensor, batch_size: int, check_finite: bool = False, tally=None,
                 on_batch: Callable[[int], None] | None = None, head_dtype: torch.dtype | None = None):
        super().__init__(windows, batch_size)
        self.head_dtype = head_dtype
        self.check_finite = check_finite
        self.tally = tally
        self.on_batch = on_batch
        self.result: Perplexity | None = None

    def begin(self, driver: BlockDriver) -> None:
        self.driver = driver
        with driver.rounded_head(self.head_dtype):
            self.batches = driver.capture(self.windows, self.batch_size)

    def on_block(self, index: int, block: nn.Module) -> None:
        name = self.driver.name(index)
        if self.tally is not None:

            with count_sparsity(block, name, into=self.tally):
                layerwise.propagate(block, self.batches, name=name, check=self.check_finite, what=self.WHAT)
        else:
            layerwise.propagate(block, self.batches, name=name, check=self.check_finite, what=self.WHAT)

    def finish(self, driver: BlockDriver) -> None:
        total_nll, total_tokens = 0.0, 0
        with driver.rounded_head(self.head_dtype), driver.head_on_device(), torch.no_grad():
            for k, start in enumerate(range(0, self.windows.shape[0], self.batch_size)):
                ids = self.windows[start : start + self.batch_size].to(driver.device)
                nll, tokens = head_nll(driver, self.batches[k].hidden, ids)
                total_nll += nll
                total_tokens += tokens
                if self.on_batch:
                    self.on_batch(ids.shape[0])
        super().finish(driver)

        total_nll, total_tokens = distributed.sum_numbers(total_nll, total_tokens)
        self.result = Perplexity.from_sums(total_nll, int(total_tokens))

    def extra_state(self) -> dict:
        return {
            "result": None if self.result is None else [self.result.ppl, self.result.nll, self.result.tokens],
            "tally": None if self.tally is None else {n: list(vars(c).values()) for n, c in self.tally.counts.items()},
        }

    def load_extra_state(self, state: dict) -> None:
        if state["result"] is not None:
            self.result = Perplexity(*state["result"])
        if self.tally is not None and state["tally"] is not None:

            self.tally.counts.update({n: _Count(*v) for n, v in state["tally"].items()})


@torch.no_grad()
def perplexity(
    model: nn.Module | BlockDriver,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` (or a driver's model) on ``windows`` (``(n, L)`` token ids),
    block by block on ``device``; every part of the model is back where it was afterwards."""
    stage = EvalStage(windows, batch_size, on_batch=on_batch)
    as_driver(model, device).walk([stage])
    return stage.result
