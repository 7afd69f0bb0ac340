"""Token windows for calibration (random, reproducible) and evaluation (consecutive).

The text is tokenized once as one stream (a text longer than ``sources.WHOLE_TEXT_CHARS``
characters: piece by piece, only its beginning, as far as the windows need; see :func:`tokenize`). Calibration draws ``n`` distinct, non-overlapping
slots of ``seqlen`` tokens in an order fixed by a ``torch.Generator`` seeded with ``seed``,
so no token is used twice and too little text is an error, never a silent shrink.

BOS: a model whose tokenizer adds a beginning-of-sequence token by default (Gemma, Llama 2/3)
sees one at position 0 of every input in use, and its activations there (the "attention sink")
are unlike any other position's. With ``bos`` set, every window is ``[bos] + seqlen - 1`` text
tokens, the slots being ``seqlen - 1`` tokens long; the BOS is never a prediction target (the
loss of position ``t`` predicts token ``t + 1``). With ``bos=None`` the windows are exactly the
plain slots of ``seqlen`` tokens (SmolLM2's tokenizer adds no BOS, so its numbers are unchanged).
"""

from __future__ import annotations

import hashlib
import logging
import warnings

import torch

from prune_cli.core.errors import NotEnoughTextError, RecipeError
from prune_cli.core.names import BOS_MODES

log = logging.getLogger(__name__)



def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` (default ``add_special_tokens=True``) starts with its BOS id."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer("The", verbose=False)["input_ids"]
        plain = tokenizer("The", add_special_tokens=False, verbose=False)["input_ids"]
    return len(ids) > len(plain) and ids[0] == bos


def resolve_bos(tokenizer, mode: str = "auto") -> int | None:
    """The token id every window starts with, or ``None``.

    ``auto``: the BOS id when the tokenizer adds it by default, else none; ``always``: the BOS
    id (a tokenizer without one is a :class:`RecipeError`); ``never``: none."""
    if mode not in BOS_MODES:
        raise RecipeError(f"bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "never":
        return None
    if mode == "always":
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise RecipeError("bos: always, but this tokenizer has no BOS token", hint="use --bos auto or never")
        return int(bos)
    return int(tokenizer.bos_token_id) if adds_bos(tokenizer) else None


# A streamed text (calibrators.sources.StreamedText, longer than WHOLE_TEXT_CHARS) is tokenised
# piece by piece until the windows have room: SLACK times the tokens they use, and at least
# MIN_STREAMED_TOKENS, so that the seeded draw still picks among many more slots than it takes.
SLACK = 4
MIN_STREAMED_TOKENS = 2**19


def tokenize(tokenizer, text, max_tokens: int | None = None) -> torch.Tensor:
    """The text's token ids as one 1-D LongTensor (no special tokens added).

    ``text``: a string or a :class:`~prune_cli.calibrators.sources.Text`, tokenised whole; or a
    :class:`~prune_cli.calibrators.sources.StreamedText`, tokenised a piece at a time, and only
    until ``max_tokens`` ids are there (all of it when ``None``): its memory depends on the
    windows asked for, not on the size of the file."""
    if not getattr(text, "streamed", False):
        return _ids(tokenizer, text if isinstance(text, str) else text.text)
    parts, count = [], 0
    for piece in text.pieces():
        parts.append(_ids(tokenizer, piece))
        count += parts[-1].numel()
        if max_tokens is not None and count >= max_tokens:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _ids(tokenizer, text: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_tokens(n: int, seqlen: int, bos: int | None = None) -> int:
    """Text tokens ``n`` windows of ``seqlen`` use (``seqlen - 1`` each with a BOS)."""
    return n * max(seqlen - (bos is not None), 1)


def calibration_ids(tokenizer, text, n: int, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """The token ids to draw ``n`` calibration (and validation) windows from: the whole text,
    or of a streamed text the first ``max(SLACK * needed, MIN_STREAMED_TOKENS)`` tokens."""
    return tokenize(tokenizer, text, max(SLACK * window_tokens(n, seqlen, bos), MIN_STREAMED_TOKENS))


def evaluation_ids(tokenizer, text, n: int, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """The token ids of ``n`` consecutive evaluation windows and more: the whole text, or of a
    streamed text just its first windows' worth (the windows are its first tokens)."""
    return tokenize(tokenizer, text, window_tokens(n, seqlen, bos))


def _check_enough(ids: torch.Tensor, n: int, seqlen: int, what: str, flag_hint: str, bos: int | None) -> int:
    """The number of text slots of ``seqlen`` tokens (``seqlen - 1`` with a BOS) in ``ids``."""
    if n < 1 or seqlen < (3 if bos is not None else 2):
        raise NotEnoughTextError(f"{what}: need at least 1 window of at least 2 text tokens", hint=flag_hint)
    body = seqlen - (bos is not None)
    slots = ids.numel() // body
    if slots < n:
        raise NotEnoughTextError(
            f"{what} text has {ids.numel()} tokens: room for {slots} windows of {seqlen}, {n} requested",
            hint=flag_hint,
        )
    return slots


def _with_bos(bodies: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``(n, L)`` text slots -> ``(n, L + 1)`` windows starting with ``bos`` (unchanged if None)."""
    if bos is None:
        return bodies
    return torch.cat([torch.full((bodies.shape[0], 1), bos, dtype=bodies.dtype), bodies], dim=1)


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``n`` distinct non-overlapping windows, shape ``(n, seqlen)``, reproducible from ``seed``;
    each starts with ``bos`` when it is given."""
    slots = _check_enough(
        ids, n, seqlen, "calibration", "lower --calib-samples / --seqlen or give more --calib-text", bos
    )
    body = seqlen - (bos is not None)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(slots, generator=generator)[:n]
    starts = order * body
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos)


def validation_windows(ids: torch.Tensor, n_calibration: int, n: int, seqlen: int, seed: int,
                       bos: int | None = None) -> torch.Tensor:
    """``n`` windows drawn after the ``n_calibration`` calibration windows from the same
    permutation: disjoint from them, shape ``(n, seqlen)``."""
    both = calibration_windows(ids, n_calibration + n, seqlen, seed, bos)
    return both[n_calibration:].clone()


def evaluation_windows(ids: torch.Tensor, n: int, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """The first ``n`` consecutive non-overlapping windows, shape ``(n, seqlen)``; each starts
    with ``bos`` when it is given (then ``seqlen - 1`` text tokens each)."""
    _check_enough(ids, n, seqlen, "evaluation", "lower --eval-windows / --eval-seqlen or give more --eval-text", bos)
    body = seqlen - (bos is not None)
    return _with_bos(ids[: n * body].reshape(n, body).clone(), bos)


def fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the exact token ids used (to compare runs)."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
