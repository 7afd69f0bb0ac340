"""Quality gates: limits a compressed checkpoint must meet, checked after its evaluation.

A failed gate does not stop the run: the checkpoint and its report are written as usual, the
report's ``gates`` list says which gate failed and by how much, and ``prune-cli compress`` exits
with :data:`GATE_FAILED_EXIT` (3), distinct from bad input (2) and internal errors (1), so a CI
job can tell "worse than allowed" from "did not run".

* ``max_ppl_ratio`` (``--max-ppl-ratio R``, recipe ``gates: {max_ppl_ratio: R}``): the held-out
  perplexity ratio ``ppl_compressed / ppl_dense`` must be ``<= R``. A non-finite ratio fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GATE_FAILED_EXIT = 3


@dataclass(frozen=True)
class Gates:
    max_ppl_ratio: float | None = None

    @property
    def active(self) -> bool:
        return self.max_ppl_ratio is not None

    def to_dict(self) -> dict:
        return {"max_ppl_ratio": self.max_ppl_ratio}

    def check(self, ppl: dict) -> list[dict]:
        """One result per set gate from the report's ``ppl`` part (``dense``, ``compressed``,
        ``ratio``): ``{"gate", "limit", "value", "passed", "by"}``, ``by`` how far the value is
        past the limit (negative: the margin left)."""
        results = []
        if self.max_ppl_ratio is not None:
            value = ppl.get("ratio")
            finite = value is not None and math.isfinite(value)
            results.append({
                "gate": "max_ppl_ratio",
                "limit": self.max_ppl_ratio,
                "value": value,
                "passed": bool(finite and value <= self.max_ppl_ratio),
                "by": (value - self.max_ppl_ratio) if finite else None,
            })
        return results


def failed(results: list[dict] | None) -> list[dict]:
    return [r for r in results or [] if not r["passed"]]


def describe(result: dict) -> str:
    """One line for a gate result, e.g. ``max_ppl_ratio: 1.862 > 1.5 (by 0.362)``."""
    value = result["value"]
    shown = "non-finite" if result["by"] is None else f"{value:.4g}"
    if result["passed"]:
        return f"{result['gate']}: {shown} <= {result['limit']:g}"
    past = "" if result["by"] is None else f" (by {result['by']:.4g})"
    return f"{result['gate']}: {shown} > {result['limit']:g}{past}"
