"""The run report: the same data feeds ``sparsity.json``, ``--json`` and the results table."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch


def versions() -> dict:
    import transformers

    import prune_cli

    return {
        "prune_cli": prune_cli.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class LayerRecord:
    """What happened to one Linear."""

    name: str
    shape: tuple[int, int]
    method: str
    pattern: str
    target_sparsity: float
    achieved_sparsity: float  # fraction of exact zeros in the stored weight

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "method": self.method,
            "pattern": self.pattern,
            "target_sparsity": round(self.target_sparsity, 6),
            "achieved_sparsity": round(self.achieved_sparsity, 6),
        }


@dataclass
class Timings:
    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.values[key] = round(self.values.get(key, 0.0) + seconds, 3)


def overall_sparsity(layers: list[LayerRecord]) -> float:
    total = sum(r.shape[0] * r.shape[1] for r in layers)
    zeros = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in layers)
    return zeros / total if total else 0.0
