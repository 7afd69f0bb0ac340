"""Perplexity on held-out text: ``exp(mean token NLL)`` over non-overlapping windows.

For windows ``x`` of shape ``(n, L)`` every position ``t >= 1`` is predicted from ``x[:, :t]``,
so ``n * (L - 1)`` tokens are scored: ``ppl = exp(sum_t -log p(x_t | x_<t) / (n (L - 1)))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens}


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` (``(n, L)`` token ids); model stays where it is
    unless ``device`` differs, in which case it is moved there for the duration."""
    device = torch.device(device)
    original = next(model.parameters()).device
    if original != device:
        model.to(device)
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
            if on_batch:
                on_batch(ids.shape[0])
    finally:
        if original != device:
            model.to(original)
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean) if mean < 700 else float("inf"), mean, total_tokens)
