"""Quality gates: limits a compressed checkpoint must meet, checked after its evaluation.

A failed gate does not stop the run: the checkpoint and its report are written as usual, the
report's ``gates`` list says which gate failed and by how much, and ``prune-cli compress`` exits
with :data:`GATE_FAILED_EXIT` (3), distinct from bad input (2) and internal errors (1), so a CI
job can tell "worse than allowed" from "did not run".

* ``max_ppl_ratio`` (``--max-ppl-ratio R``, recipe ``gates: {max_ppl_ratio: R}``): the held-out
  perplexity ratio ``ppl_compressed / ppl_dense`` must be ``<= R``. A non-finite ratio fails.
* ``min_task_score`` (``--min-task-score TASK[:METRIC]=V``, repeatable; recipe
  ``gates: {min_task_score: {TASK[:METRIC]: V}}``): the compressed model's score on an lm-eval
  task (:mod:`prune_cli.stages.tasks`) must be ``>= V`` (``<= V`` for a metric where lower is better,
  e.g. ``perplexity``).
* ``max_task_drop`` (``--max-task-drop TASK[:METRIC]=D``): the score may fall at most ``D``
  (absolute) below the dense model's: ``dense - compressed <= D``, or ``compressed - dense <= D``
  for a metric where lower is better.

``METRIC`` defaults to the task's ``acc`` when it has one, else its first metric. A gated task
must be scored (``--eval-tasks``); a metric the task does not report fails with ``value: null``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GATE_FAILED_EXIT = 3
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def split_key(key: str) -> tuple[str, str | None]:
    """``"task:metric"`` -> ``("task", "metric")``; ``"task"`` -> ``("task", None)``."""
    task, _, metric = key.partition(":")
    return task, metric or None


def task_metric(metrics: dict, metric: str | None) -> str | None:
    """The metric a gate on a task reads: ``metric``, else ``acc``, else the first that is not
    a standard error."""
    if metric is not None:
        return metric
    names = [m for m in metrics if not m.endswith("_stderr")]
    return "acc" if "acc" in names else (names[0] if names else None)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Gates:
    max_ppl_ratio: float | None = None
    min_task_score: dict = field(default_factory=dict)  # "task[:metric]" -> lowest allowed score
    max_task_drop: dict = field(default_factory=dict)  # "task[:metric]" -> largest allowed drop vs dense

    @property
    def active(self) -> bool:
        return self.max_ppl_ratio is not None or bool(self.min_task_score) or bool(self.max_task_drop)

    @property
    def needs_ppl(self) -> bool:
        return self.max_ppl_ratio is not None

    def gated_tasks(self) -> set[str]:
        return {split_key(k)[0] for k in (*self.min_task_score, *self.max_task_drop)}

    def to_dict(self) -> dict:
        return {"max_ppl_ratio": self.max_ppl_ratio, "min_task_score": dict(self.min_task_score),
                "max_task_drop": dict(self.max_task_drop)}

    def check(self, ppl: dict, tasks: dict | None = None) -> list[dict]:
        """One result per set gate from the report's ``ppl`` part (``dense``, ``compressed``,
        ``ratio``) and ``tasks`` part (``dense`` / ``compressed``: task -> ``{"metrics"}``):
        ``{"gate", "limit", "value", "passed", "by"}``, ``by`` how far the value is past the
        limit (negative: the margin left); task gates also name ``task`` and ``metric``."""
        results = []
        if self.max_ppl_ratio is not None:
            value = ppl.get("ratio")
            margin = value - self.max_ppl_ratio if value is not None and _finite(value) else None
            results.append({
                "gate": "max_ppl_ratio",
                "limit": self.max_ppl_ratio,
                "value": value,
                "passed": margin is not None and margin <= 0,
                "by": margin,
            })
        tasks = tasks or {}
        for key, limit in self.min_task_score.items():
            task, metric = split_key(key)
            scores = ((tasks.get("compressed") or {}).get(task) or {}).get("metrics", {})
            metric = task_metric(scores, metric)
            value = scores.get(metric)
            lower = metric in LOWER_IS_BETTER
            by = None if not _finite(value) else (value - limit if lower else limit - value)
            results.append({"gate": "min_task_score", "task": task, "metric": metric, "limit": limit,
                            "value": value, "passed": by is not None and by <= 0, "by": by})
        for key, limit in self.max_task_drop.items():
            task, metric = split_key(key)
            dense = ((tasks.get("dense") or {}).get(task) or {}).get("metrics", {})
            compressed = ((tasks.get("compressed") or {}).get(task) or {}).get("metrics", {})
            metric = task_metric(compressed or dense, metric)
            a, b = dense.get(metric), compressed.get(metric)
            drop = None if not (_finite(a) and _finite(b)) else ((b - a) if metric in LOWER_IS_BETTER else (a - b))
            results.append({"gate": "max_task_drop", "task": task, "metric": metric, "limit": limit,
                            "value": drop, "passed": drop is not None and drop <= limit,
                            "by": None if drop is None else drop - limit})
        return results


def failed(results: list[dict] | None) -> list[dict]:
    return [r for r in results or [] if not r["passed"]]


def describe(result: dict) -> str:
    """One line for a gate result, e.g. ``max_ppl_ratio: 1.862 > 1.5 (by 0.362)`` or
    ``max_task_drop prune_cloze:acc: 0.08 > 0.05 (by 0.03)``."""
    value = result["value"]
    name = result["gate"] + (f" {result['task']}:{result['metric']}" if "task" in result else "")
    shown = "non-finite" if result["by"] is None else f"{value:.4g}"
    lower_bound = result["gate"] == "min_task_score" and result.get("metric") not in LOWER_IS_BETTER
    ok, bad = (">=", "<") if lower_bound else ("<=", ">")
    if result["passed"]:
        return f"{name}: {shown} {ok} {result['limit']:g}"
    past = "" if result["by"] is None else f" (by {result['by']:.4g})"
    return f"{name}: {shown} {bad} {result['limit']:g}{past}"
