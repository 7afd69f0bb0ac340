"""The dense model's scores, cached: a CI job that compresses one model many ways (or a sweep)
measures the dense perplexity and task scores once.

What is cached is the dense evaluation's result (perplexity sums) and the dense task answers
(``(log p, greedy)`` per lm-eval request; lm-eval recomputes its metrics from them), in
``$PRUNE_CLI_CACHE/baselines/<key>.json`` (default ``~/.cache/prune-cli``). The key is the sha256
of everything the dense numbers depend on:

* the model: its source and the digest of ``config.json`` and of every weight file a load reads
  (:func:`~prune_cli.checkpoint.files.file_digest`: device, inode, size, modification and
  change times, and a sha256 of the whole content for files up to 1 GiB);
* the exact token ids of the evaluation windows and of the task requests, and the task settings;
* the compute dtype, the device type, and the versions of prune-cli, torch, transformers and
  lm-eval.

Anything else changing gives another key, never a stale hit. A model without local files (a hub
id not in the local cache) is not cached. ``--no-baseline-cache`` (or
``PRUNE_CLI_BASELINE_CACHE=0``) turns it off; a run that resumes an interrupted one, and a run
under several processes, neither read nor write it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from prune_cli.checkpoint.gguf_cache import cache_root

log = logging.getLogger(__name__)

FORMAT = "prune-cli/dense-baseline"


_SCOPED: list[Path] = []  # folders of scoped() caches, innermost last


def enabled() -> bool:
    if _SCOPED:
        return True
    return os.environ.get("PRUNE_CLI_BASELINE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def folder() -> Path:
    if _SCOPED:
        return _SCOPED[-1]

    return cache_root() / "baselines"


@contextlib.contextmanager
def scoped(path: Path):
    """A cache in ``path`` for the duration, on even where the user's cache is off (a sweep
    scores its dense model once without keeping it)."""
    _SCOPED.append(Path(path))
    try:
        yield
    finally:
        _SCOPED.pop()


def baseline_key(parts: dict) -> str:
    """First 32 hex digits of the sha256 of ``parts`` (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class DenseBaseline:
    """The cached dense results under ``key`` (:meth:`load`, :meth:`store`)."""

    def __init__(self, key: str, parts: dict):
        self.key, self.parts = key, parts
        self.path = folder() / f"{key}.json"

    def load(self) -> dict | None:
        """``{"ppl": [ppl, nll, tokens] | None, "answers": [[logp, greedy], ...] | None}`` or ``None``."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("format") != FORMAT or data.get("key") != self.key:
            return None
        return data

    def store(self, ppl, answers) -> None:
        """Write atomically (a temporary file renamed into place); a failure to write is logged,
        never fatal."""
        data = {"format": FORMAT, "key": self.key, "parts": self.parts,
                "ppl": None if ppl is None else [ppl.ppl, ppl.nll, ppl.tokens],
                "answers": None if answers is None else [[float(a), bool(g)] for a, g in answers]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(data, allow_nan=True), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("could not cache the dense baseline in %s: %s", self.path, exc)
