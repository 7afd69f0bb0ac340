"""The results on stdout as tables: compress (dense against compressed), the --dry-run plan,
eval, the lm-eval tasks, sweep. A terminal too narrow for a table gets its cells as plain
``column: value`` lines (:func:`print_table`), never a cut number."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from prune_cli.console.error_lines import error_fields, fail
from prune_cli.console.streams import emit_json, printing_results, stdout
from prune_cli.core.errors import StdoutError


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1e5 else f"{value:.3e}"
    return str(value)


def print_table(table: Table) -> None:
    """``table`` on stdout, or where the terminal is narrower than the table needs (rich would
    cut its cells to ``3…``) the same cells as plain lines, ``column: value, ...`` per row (a row
    label first when the first column has no header), never wrapped inside a value."""
    if Measurement.get(stdout, stdout.options.update_width(1 << 16), table).maximum <= stdout.width:  # its natural width
        stdout.print(table)
        return
    if table.title:
        stdout.print(str(table.title), highlight=False, markup=False, soft_wrap=True)
    headers = [str(c.header) for c in table.columns]
    columns = [[str(cell) for cell in c.cells] for c in table.columns]
    for r in range(table.row_count):
        values = [column[r] for column in columns]
        if headers[0]:
            line = ", ".join(f"{h}: {v}" for h, v in zip(headers, values, strict=False))
        else:  # a row label: "perplexity: dense 12.3, compressed 14.5"
            line = f"{values[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(headers[1:], values[1:], strict=False))
        stdout.print(escape(line), highlight=False, soft_wrap=True)


def print_tasks_table(tasks: dict) -> None:
    """Per task and metric: dense and compressed scores (± lm-eval's standard error) and the change."""
    table = Table(title="lm-eval tasks" + (f" (limit {tasks['limit']})" if tasks.get("limit") else ""))
    table.add_column("task")
    table.add_column("metric")
    which = [w for w in ("dense", "compressed", "results") if tasks.get(w)]  # "results": eval's one model
    for w in which:
        table.add_column("score" if w == "results" else w, justify="right")
    if tasks.get("change"):
        table.add_column("change", justify="right")
    first = tasks[which[0]] if which else {}
    for task, scores in first.items():
        for metric in scores["metrics"]:
            if metric.endswith("_stderr"):
                continue
            cells = []
            for w in which:
                m = tasks[w][task]["metrics"]
                err = m.get(f"{metric}_stderr")
                cells.append(fmt(m.get(metric)) + (f" ± {fmt(err)}" if isinstance(err, float) else ""))
            if tasks.get("change"):
                cells.append(fmt(tasks["change"][task].get(metric)))
            table.add_row(task, metric, *cells)
    print_table(table)


def print_compress_table(report: dict, checkpoint: Path | None = None) -> None:
    table = Table(title=f"prune-cli: {report['method']} {report['pattern']} on {report['model']}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    ppl = report["ppl"]
    table.add_row("perplexity", fmt(ppl.get("dense")), fmt(ppl.get("compressed")))
    table.add_row("sparsity (targeted Linears)", "0.000", fmt(report.get("sparsity")))
    print_table(table)
    if report.get("tasks"):
        print_tasks_table(report["tasks"])
    if report.get("sparsity") is None:
        stdout.print("sparsity: not measured (activation sparsity is measured on the evaluation tokens; --no-eval)", highlight=False, soft_wrap=True)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
    stdout.print(f"timings: {timings}", highlight=False, soft_wrap=True)
    if report.get("output"):
        stdout.print(f"checkpoint: {checkpoint or report['output']}", highlight=False, soft_wrap=True)


def print_plan(plan: dict) -> None:
    table = Table(title=f"plan: {plan['method']} on {plan['model']} ({plan['blocks']})")
    table.add_column("module", overflow="fold")  # full names, never truncated
    for col in ("shape", "method", "pattern", "sparsity"):
        table.add_column(col)
    for row in plan["layers"]:
        table.add_row(row["module"], "x".join(map(str, row["shape"])), row["method"], row["pattern"], f"{row['sparsity']:.3f}")
    print_table(table)
    stdout.print(f"{len(plan['layers'])} Linear modules, {plan['target_params']:,} weights targeted", highlight=False, soft_wrap=True)
    if plan.get("memory"):
        m = plan["memory"]
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        stdout.print(f"predicted peak memory {gb(m['predicted_peak'])} ({m['slack']} x: libraries {gb(m['libraries'])}, outside the "
                     f"blocks {gb(m['outside_blocks'])}, two blocks {gb(m['two_blocks'])} or lm_head when used "
                     f"{gb(m['lm_head_when_used'])}, activations {gb(m['activations'])})", highlight=False, soft_wrap=True)


def print_eval_report(report: dict) -> None:
    """eval's results: perplexity, measured sparsity and tokens, then the tasks' table."""
    table = Table(title=f"prune-cli eval: {report['model']}")
    table.add_column("perplexity", justify="right")
    table.add_column("sparsity (block Linears)", justify="right")
    table.add_column("tokens", justify="right")
    table.add_row(fmt(report["ppl"]), fmt(report["sparsity"]), str(report["tokens"]))
    print_table(table)
    if report.get("tasks"):
        print_tasks_table(report["tasks"])


def print_sweep(report: dict, as_json: bool) -> None:
    """The sweep report: one JSON object, or the table of its points."""
    with printing_results():
        print_sweep_report(report, as_json)


def print_sweep_report(report: dict, as_json: bool) -> None:
    from prune_cli.run.sweep import plan_summary  # noqa: PLC0415 - imports torch; --help must not

    if as_json:
        emit_json(report)
        return
    table = Table(title=f"prune-cli sweep: {report['model']} (dense perplexity {fmt(report['dense']['ppl'])})")
    for col in ("method", "sparsity / pattern", "achieved", "perplexity", "ratio", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in plan_summary(report):
        table.add_row(*[fmt(v) for v in row])
    print_table(table)
    if report.get("points_planned"):
        stdout.print(f"stopped after {len(report['runs'])} of {report['points_planned']} points", highlight=False, soft_wrap=True)
    if report.get("plot"):
        stdout.print(f"plot: {report['plot']}", highlight=False, soft_wrap=True)


def sweep_stopped(partial: dict, exc: BaseException, as_json: bool, debug: bool) -> None:
    """A sweep point failed (or the sweep was stopped) after others finished: their results on
    stdout (under ``--json`` the one JSON object, with the error and exit code in it), then the
    error's one line on stderr and its exit code."""
    kind, message, hint, code, _ = error_fields(exc)
    if as_json:
        partial = {**partial, "error": {"type": kind, "message": message, "hint": hint}, "exit_code": code}
    with contextlib.suppress(StdoutError):  # the point's own error is the one to say
        print_sweep(partial, as_json)
    fail(exc, debug, as_json=False)
