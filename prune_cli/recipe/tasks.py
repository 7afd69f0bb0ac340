"""Which lm-eval tasks a recipe asks to score (the scoring itself: :mod:`prune_cli.stages.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskSettings:
    """What to score: lm-eval task names, ``limit`` examples per task (``None``: all),
    ``num_fewshot`` (``None``: the task's default), extra task folders (``include_path``)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: tuple[Path, ...] = ()
    batch_size: int = 8

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "limit": self.limit, "num_fewshot": self.num_fewshot,
                "include_path": [str(p) for p in self.include_path], "batch_size": self.batch_size}


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")`` (empty names dropped, order kept, duplicates removed)."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    return tuple(dict.fromkeys(names))
