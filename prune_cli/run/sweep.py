"""``prune-cli sweep``: several methods at several sparsities on one model, as a table and a plot.

Each point of the grid (method x sparsity, and method x N:M pattern) is one ``compress`` run of
the same recipe but for its method and sparsity (:func:`points`), without an export unless
``--keep-checkpoints DIR`` (then ``DIR/<method>-<sparsity or pattern>``). The dense model is
scored once: every run's dense perplexity and task scores come from the dense-baseline cache
(:mod:`prune_cli.run.baseline`; with ``--no-baseline-cache``, a cache that lives for the sweep only),
so a grid of ``k`` points costs one dense evaluation, not ``k``. Blocks are read from the model's
files per run (streamed; a GGUF file's dequantised cache makes that cheap).

The plot (:func:`plot`, matplotlib, the ``plot`` extra) draws perplexity against sparsity on a
log scale, one line per method over its unstructured sparsities, N:M points as markers at their
sparsity, and the dense perplexity as a dashed line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from prune_cli.checkpoint.lock import OutputNotWritableError
from prune_cli.checkpoint.output import check_output, output_path, preflight
from prune_cli.core.errors import BadInputError, OutputExistsError, RecipeError
from prune_cli.model.source import offline_requested, resolve_source
from prune_cli.model.structure import check_prunable
from prune_cli.recipe.config import resolve
from prune_cli.recipe.plan import build_plan
from prune_cli.run import baseline
from prune_cli.run.job import CompressRequest
from prune_cli.run.pipeline import compress
from prune_cli.streaming.loader import meta_model

log = logging.getLogger(__name__)

FORMAT = "prune-cli/sweep-report"


def parse_list(text: str | None) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]``."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return list(dict.fromkeys(items))


def points(methods: list[str], sparsities: list[float], patterns: list[str]) -> list[dict]:
    """The grid: every method at every unstructured sparsity, then at every N:M pattern."""
    if not methods:
        raise RecipeError("sweep needs --methods", hint="e.g. --methods wanda,sparsegpt")
    if not sparsities and not patterns:
        raise RecipeError("sweep needs --sparsities or --patterns", hint="e.g. --sparsities 0.3,0.5,0.7 --patterns 2:4")
    for s in sparsities:
        if not 0 < s < 1:
            raise RecipeError(f"sweep sparsities must be in (0, 1), got {s}")
    grid = [{"method": m, "sparsity": s, "pattern": "unstructured"} for m in methods for s in dict.fromkeys(sparsities)]
    grid += [{"method": m, "sparsity": None, "pattern": p} for m in methods for p in patterns]
    return grid  # 0.5 and 0.50 are one point (one checkpoint folder)


def _label(point: dict) -> str:
    return f"{point['method']}-{point['sparsity']:g}" if point["sparsity"] is not None else f"{point['method']}-{point['pattern'].replace(':', 'of')}"


def run_sweep(model: str | None, recipe: dict | None, base_overrides: dict, grid: list[dict], *, offline: bool = False,
              keep: Path | None = None, overwrite: bool = False, baseline_cache: bool = True, events=None,
              max_memory: str | None = None) -> dict:
    """Run every point of ``grid`` (see the module docstring); the sweep report.

    Every point's recipe and, with ``keep``, every point's checkpoint folder are checked before
    the first run (:func:`check_targets`). When a point fails (or the sweep is interrupted) after
    others finished, the exception carries the report of the finished points as
    ``exc.sweep_report``, so that their results are printed, not lost."""

    configs = []
    for point in grid:  # every point validated before the first run
        overrides = {**base_overrides, "method": point["method"], "sparsity": point["sparsity"], "pattern": point["pattern"]}
        configs.append(resolve(recipe, overrides))
    check_plans(model, configs, offline)
    if keep is not None:
        check_targets([keep / _label(point) for point in grid], overwrite)
    scratch = None if baseline_cache and baseline.enabled() else Path(tempfile.mkdtemp(prefix="prune-cli-sweep-"))
    runs: list[dict] = []
    dense: dict = {}
    last: dict | None = None
    started = time.perf_counter()
    try:
        with baseline.scoped(scratch) if scratch is not None else contextlib.nullcontext():
            for point, config in zip(grid, configs, strict=False):
                log.info("sweep: %s", _label(point))
                output = keep / _label(point) if keep is not None else None
                request = CompressRequest(config, model, output, overwrite, offline, max_memory=max_memory)
                last = compress(request, events)
                runs.append(_run_row(point, last, output))
                dense = {"ppl": last["ppl"].get("dense"), "tasks": (last.get("tasks") or {}).get("dense")}
    except BaseException as exc:
        if last is not None and hasattr(exc, "__dict__"):
            exc.sweep_report = {**_report(configs[0], last, dense, runs, started), "points_planned": len(grid)}
        raise
    finally:
        if scratch is not None:

            shutil.rmtree(scratch, ignore_errors=True)
    return _report(configs[0], last, dense, runs, started)


def check_plans(model: str | None, configs: list, offline: bool) -> None:
    """Every point's plan built on the model's structure (meta device, no weights), before the
    first point runs: a pattern that does not fit a layer (``3:7`` on a width of 64) is refused
    at once instead of after the points before it ran."""

    skeleton = meta_model(resolve_source(model), configs[0].dtype, offline_requested(offline))
    for config in configs:
        check_prunable(skeleton, config.targets.include, config.activation is not None)
        if config.method:
            build_plan(skeleton, config)


def check_targets(outputs: list[Path], overwrite: bool) -> None:
    """Every point's ``--keep-checkpoints`` folder as each point's run would check it
    (:func:`~prune_cli.checkpoint.output.preflight`: exists without ``--overwrite``, not prune-cli's to
    replace, locked, not writable), all before the first point runs: a folder found to exist
    only at the fifth point used to cost the four before it."""

    try:
        for check in (check_output, preflight):  # the folder rules of all first: they write nothing
            for output in outputs:
                check(output_path(output), overwrite)
    except BadInputError as exc:
        hint = "choose another --keep-checkpoints folder"
        if isinstance(exc, OutputExistsError) and not overwrite:
            hint = "pass --overwrite to replace a checkpoint prune-cli wrote, or " + hint
        raise type(exc)(f"--keep-checkpoints: {exc.message}", hint=hint) from None


def _run_row(point: dict, report: dict, output: Path | None = None) -> dict:
    """One finished point of the sweep report, from its compress report; ``output``: the point's
    checkpoint folder (its report names the folder only)."""

    return {
        **point,
        "sparsity": report["sparsity"],
        "target_sparsity": report["target_sparsity"],
        "ppl": report["ppl"].get("compressed"),
        "ppl_ratio": report["ppl"].get("ratio"),
        "tasks": (report.get("tasks") or {}).get("compressed"),
        "dense_cached": (report.get("evaluation") or {}).get("dense_cached"),
        "seconds": report["timings"].get("total"),
        "output": str(output_path(output)) if output is not None else report.get("output"),
    }


def _report(first, last: dict, dense: dict, runs: list[dict], started: float) -> dict:
    """The sweep report over the finished ``runs`` (``last``: the compress report of the last)."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "model": last["model"],
        "calibration": last["calibration"],
        "evaluation": {k: v for k, v in (last.get("evaluation") or {}).items() if k not in ("dense", "compressed", "dense_cached")},
        "recipe": {**first.to_recipe(), "method": None, "sparsity": None, "pattern": None},
        "dense": dense,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }


def check_plot_path(path: Path) -> None:
    """Refuse a ``--plot`` path that cannot be written, and a missing matplotlib, before the
    sweep runs (both were found after every point had run)."""


    if importlib.util.find_spec("matplotlib") is None:
        raise RecipeError("the sweep plot needs matplotlib", hint="pip install 'prune-cli[plot]', or drop --plot")
    path = Path(path)
    if path.is_dir():
        raise OutputNotWritableError(f"--plot {path} is a folder", hint="give the PNG file to write, e.g. --plot sweep.png")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is not a folder" if not ancestor.is_dir() else "is not writable"
        raise OutputNotWritableError(f"cannot write --plot {path}: {ancestor} {why}", hint="choose another --plot path")


def plot(report: dict, path: Path, title: str | None = None) -> Path:
    """Perplexity against sparsity (see the module docstring) as a PNG at ``path``."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency (the plot extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - likewise
    except ImportError:
        raise RecipeError("the sweep plot needs matplotlib", hint="pip install 'prune-cli[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in report["runs"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    finite = []
    for i, method in enumerate(methods):
        color = colors[i % len(colors)]
        line = sorted((r["target_sparsity"], r["ppl"]) for r in report["runs"]
                      if r["method"] == method and r["pattern"] == "unstructured" and _ok(r["ppl"]))
        if line:
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", color=color, label=method)
            finite += [y for _, y in line]
        for r in report["runs"]:
            if r["method"] == method and r["pattern"] != "unstructured" and _ok(r["ppl"]):
                ax.scatter([r["target_sparsity"]], [r["ppl"]], marker="s", s=60, color=color, edgecolor="black", zorder=3,
                           label=f"{method} {r['pattern']}")
                finite.append(r["ppl"])
    dense = report["dense"]["ppl"]
    if _ok(dense):
        ax.axhline(dense, color="gray", linestyle="--", label=f"dense ({dense:.2f})")
    if finite:
        from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: PLC0415 - optional dependency (the plot extra)

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity (fraction of weights removed in the pruned Linears)")
    ax.set_ylabel("held-out perplexity (log scale)")
    windows = (report.get("evaluation") or {}).get("windows")
    ax.set_title(title or f"{report['model']}" + (f"  ({windows[0]}x{windows[1]} eval tokens)" if windows else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plan_summary(report: dict) -> list[list[str]]:
    """Rows of the sweep table: method, pattern or sparsity, achieved sparsity, ppl, ratio, seconds."""
    rows = []
    for r in report["runs"]:
        rows.append([r["method"], r["pattern"] if r["pattern"] != "unstructured" else f"{r['target_sparsity']:g}",
                     r["sparsity"], r["ppl"], r["ppl_ratio"], r["seconds"]])
    return rows

