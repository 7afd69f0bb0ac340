"""Token windows for calibration (random, reproducible) and evaluation (consecutive).

The text is tokenized once as one stream. Calibration draws ``n`` distinct, non-overlapping
slots of ``seqlen`` tokens in an order fixed by a ``torch.Generator`` seeded with ``seed``,
so no token is used twice and too little text is an error, never a silent shrink.
"""

from __future__ import annotations

import hashlib
import logging
import warnings

import torch

from prune_cli.errors import NotEnoughTextError

log = logging.getLogger(__name__)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_enough(ids: torch.Tensor, n: int, seqlen: int, what: str, flag_hint: str) -> int:
    if n < 1 or seqlen < 2:
        raise NotEnoughTextError(f"{what}: need at least 1 window of at least 2 tokens", hint=flag_hint)
    slots = ids.numel() // seqlen
    if slots < n:
        raise NotEnoughTextError(
            f"{what} text has {ids.numel()} tokens: room for {slots} windows of {seqlen}, {n} requested",
            hint=flag_hint,
        )
    return slots


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` distinct non-overlapping windows, shape ``(n, seqlen)``, reproducible from ``seed``."""
    slots = _check_enough(
        ids, n, seqlen, "calibration", "lower --calib-samples / --seqlen or give more --calib-text"
    )
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(slots, generator=generator)[:n]
    starts = order * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def validation_windows(ids: torch.Tensor, n_calibration: int, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` windows drawn after the ``n_calibration`` calibration windows from the same
    permutation: disjoint from them, shape ``(n, seqlen)``."""
    both = calibration_windows(ids, n_calibration + n, seqlen, seed)
    return both[n_calibration:].clone()


def evaluation_windows(ids: torch.Tensor, n: int, seqlen: int) -> torch.Tensor:
    """The first ``n`` consecutive non-overlapping windows, shape ``(n, seqlen)``."""
    _check_enough(ids, n, seqlen, "evaluation", "lower --eval-windows / --eval-seqlen or give more --eval-text")
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the exact token ids used (to compare runs)."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
