"""The command line: the Typer app and its commands (the display, the error lines and exit codes,
logging and signals are :mod:`prune_cli.console`'s).

Results go to stdout (a table, or one JSON object with ``--json``); logs and progress go to
stderr. Exit codes: 0 done, 2 bad input (one line + hint), 1 internal error, 3 a quality gate
failed (the checkpoint and report are written; prune_cli.core.gates), 130 interrupted (Ctrl-C), 143
stopped by SIGTERM. With ``--json`` an error is one JSON object on stdout too:
``{"error": {"type", "message", "hint"}, "exit_code": N}`` (:mod:`prune_cli.console.error_lines`).

stdout that cannot take the results is the user's to fix (exit code 2, one stderr line): closed
at start (``>&-``) it is refused before anything runs (a file opened later would get its
descriptor); full, or a pipe whose reader left, when the results are printed, the line says where
the written report is (the checkpoint stays; :mod:`prune_cli.console.streams`).

The modules that import torch (the recipe resolution, the pipeline, the sweep) are imported inside
the commands, so that ``prune-cli --help`` starts without them.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import typer

import prune_cli
from prune_cli.console.display import RichEvents
from prune_cli.console.error_lines import cli_boundary, emit_error, exit_on_failed_gates
from prune_cli.console.flags import auto_number, eval_option, parse_limits, parse_options, recipe_option
from prune_cli.console.interrupts import remember_arguments, signals_as_interrupts
from prune_cli.console.logs import launcher_rank, setup_logging
from prune_cli.console.streams import emit_json, one_line, printing_results, stdout, stdout_closed
from prune_cli.console.tables import fmt as _fmt  # noqa: F401 - tests read prune_cli.cli._fmt
from prune_cli.console.tables import print_compress_table, print_eval_report, print_plan, print_sweep, sweep_stopped
from prune_cli.core.errors import RecipeError
from prune_cli.core.memory import parse_size
from prune_cli.recipe.settings import check_value, cli_help, nest, setting
from prune_cli.recipe.tasks import parse_tasks

app = typer.Typer(
    name="prune-cli",
    help="Training-free compression of causal language models: prune, evaluate, export.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    # click's plain help: it wraps long option names at any width, where rich's panels cut
    # them (`--calib-chat-te…` at 80 columns) and read `[...]` in help texts as markup
    rich_markup_mode=None,
)

DISTRIBUTION = "llm-prune-cli"  # the name on PyPI (`prune-cli` there is another project)


def version_line() -> str:
    """``prune-cli X.Y.Z (llm-prune-cli; torch A, transformers B, Python C)``: the installed
    distribution's version, and the libraries that decide a run's numbers."""
    try:
        ours = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = prune_cli.__version__
    libs = []
    for lib in ("torch", "transformers"):
        try:
            libs.append(f"{lib} {version(lib)}")
        except PackageNotFoundError:
            libs.append(f"{lib} missing")
    return f"prune-cli {ours} ({DISTRIBUTION}; {', '.join(libs)}, Python {platform.python_version()})"


def _show_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", help="Print the version and exit.",
                                 is_eager=True, callback=_show_version),
) -> None:
    """Training-free compression of causal language models: prune, evaluate, export."""


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="Hub id, local HF folder, .gguf file; omit for the bundled SmolLM2-135M."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML (flags override it)."),
    method: Optional[str] = recipe_option("method", "--method", "-m"),
    base: Optional[str] = typer.Option(None, "--base", help="Base method of dsnot: magnitude, wanda, sparsegpt, alps or ria."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-O", help="Method option KEY=VALUE (repeatable), e.g. -O mode=reference."),
    layerwise: Optional[str] = recipe_option("layerwise.method", "--layerwise"),
    owl_m: Optional[str] = recipe_option("layerwise.m", "--owl-m", callback=auto_number, metavar="auto|<float>"),
    owl_lambda: Optional[str] = recipe_option("layerwise.lambda", "--owl-lambda", callback=auto_number, metavar="auto|<float>"),
    sparsity: Optional[float] = recipe_option("sparsity", "--sparsity", "-s"),
    pattern: Optional[str] = recipe_option("pattern", "--pattern", "-p"),
    calib_text: Optional[list[Path]] = recipe_option("calibration.text", "--calib-text"),
    calib_dataset: Optional[str] = recipe_option("calibration.dataset", "--calib-dataset"),
    calib_split: Optional[str] = recipe_option("calibration.split", "--calib-split"),
    calib_column: Optional[str] = recipe_option("calibration.column", "--calib-column"),
    calib_chat_template: bool = typer.Option(False, "--calib-chat-template", help=cli_help("calibration.chat_template")),
    calib_samples: Optional[int] = recipe_option("calibration.samples", "--calib-samples"),
    seqlen: Optional[int] = recipe_option("calibration.seqlen", "--seqlen"),
    seed: Optional[int] = recipe_option("calibration.seed", "--seed"),
    eval_text: Optional[list[Path]] = recipe_option("evaluation.text", "--eval-text"),
    eval_windows: Optional[int] = recipe_option("evaluation.windows", "--eval-windows"),
    eval_seqlen: Optional[int] = recipe_option("evaluation.seqlen", "--eval-seqlen"),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity evaluation."),
    max_ppl_ratio: Optional[float] = recipe_option("gates.max_ppl_ratio", "--max-ppl-ratio"),
    eval_tasks: Optional[str] = recipe_option("evaluation.tasks", "--tasks", "--eval-tasks"),
    task_limit: Optional[int] = recipe_option("evaluation.task_limit", "--task-limit", "--limit", min=1),
    num_fewshot: Optional[int] = recipe_option("evaluation.num_fewshot", "--num-fewshot", min=0),
    include_path: Optional[list[Path]] = recipe_option("evaluation.task_include_path", "--include-path"),
    min_task_score: Optional[list[str]] = typer.Option(None, "--min-task-score", help="Quality gate TASK[:METRIC]=V (repeatable): exit 3 when the compressed score is below V."),
    max_task_drop: Optional[list[str]] = typer.Option(None, "--max-task-drop", help="Quality gate TASK[:METRIC]=D (repeatable): exit 3 when the score falls more than D below the dense model's."),
    bos: Optional[str] = recipe_option("bos", "--bos"),
    device: Optional[str] = recipe_option("device", "--device"),
    dtype: Optional[str] = recipe_option("dtype", "--dtype"),
    save_dtype: Optional[str] = recipe_option("save_dtype", "--save-dtype"),
    backend: Optional[str] = recipe_option("backend", "--backend"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Checkpoint folder to write (required unless --dry-run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output folder that prune-cli wrote (others are refused)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue an interrupted run to the same --output from its last finished block (--no-resume: discard its state and start over)."),
    checkpoint_interval: float = typer.Option(30.0, "--checkpoint-interval", min=0, help="Seconds between writes of the resume state (0: after every block)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory for the calibration activations, e.g. 8GB; beyond it they are kept on disk (default: 40% of the RAM or cgroup limit)."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (like HF_HUB_OFFLINE=1)."),
    baseline_cache: bool = typer.Option(True, "--baseline-cache/--no-baseline-cache", help="Reuse the dense model's perplexity and task scores from an earlier run with the same model, tokens and settings (~/.cache/prune-cli/baselines)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit without calibrating."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error before its line (same exit code)."),
) -> None:
    """Prune MODEL with a training-free method, evaluate it against the dense model, export it.

    Exit codes: 0 done, 1 internal error, 2 bad input, 3 a quality gate failed (checkpoint and
    report written), 130 Ctrl-C, 143 SIGTERM."""
    setup_logging(verbose)
    with cli_boundary(debug, as_json):
        from prune_cli.checkpoint.output import REPORT_FILE, output_path  # noqa: PLC0415 - imports torch; --help must not
        from prune_cli.recipe.config import load_recipe, resolve  # noqa: PLC0415 - imports torch; --help must not
        from prune_cli.run.dry_run import dry_run as run_dry  # noqa: PLC0415 - imports torch; --help must not
        from prune_cli.run.job import CompressRequest  # noqa: PLC0415 - imports torch; --help must not
        from prune_cli.run.pipeline import compress as run_compress  # noqa: PLC0415 - imports torch; --help must not

        recipe_data = load_recipe(recipe) if recipe else None
        method_options = parse_options(option or [])
        if base is not None:
            method_options["base"] = base
        overrides = nest({  # the recipe keys the flags set; None: not given
            "method": method,
            "method_options": method_options or None,
            "layerwise.method": layerwise, "layerwise.m": owl_m, "layerwise.lambda": owl_lambda,
            "sparsity": sparsity,
            "pattern": pattern,
            "calibration.text": [str(p) for p in calib_text] if calib_text else None,
            "calibration.dataset": calib_dataset,
            "calibration.split": calib_split,
            "calibration.column": calib_column,
            "calibration.chat_template": True if calib_chat_template else None,
            "calibration.samples": calib_samples,
            "calibration.seqlen": seqlen,
            "calibration.seed": seed,
            "evaluation.text": [str(p) for p in eval_text] if eval_text else None,
            "evaluation.windows": eval_windows,
            "evaluation.seqlen": eval_seqlen,
            "evaluation.enabled": False if no_eval else None,
            "evaluation.tasks": list(parse_tasks(eval_tasks)) or None,
            "evaluation.task_limit": task_limit,
            "evaluation.num_fewshot": num_fewshot,
            "evaluation.task_include_path": [str(p) for p in include_path] if include_path else None,
            "device": device,
            "dtype": dtype,
            "save_dtype": save_dtype,
            "backend": backend,
            "bos": bos,
            "gates.max_ppl_ratio": max_ppl_ratio,
            "gates.min_task_score": parse_limits(min_task_score, "--min-task-score") or None,
            "gates.max_task_drop": parse_limits(max_task_drop, "--max-task-drop") or None,
        })
        if max_memory is not None:
            parse_size(max_memory)  # a bad size is a usage error now, not after loading
        if output is not None and not output.strip():
            raise typer.BadParameter("must not be empty", param_hint="--output")
        config = resolve(recipe_data, overrides)
        if not dry_run and output is None:
            raise typer.BadParameter("--output DIR is required (or pass --dry-run)", param_hint="--output")
        request = CompressRequest(config, model, Path(output) if output is not None else None, overwrite, offline,
                                  resume, checkpoint_interval, max_memory, baseline_cache)
        if dry_run:
            plan = run_dry(request)
            with printing_results():
                emit_json(plan) if as_json else print_plan(plan)
            return
        with signals_as_interrupts(), RichEvents() as events:
            report = run_compress(request, events)
        written = output_path(request.output) if report.get("output") else None  # the report names the folder only
        with printing_results(written / REPORT_FILE if written is not None else None):
            if as_json:
                emit_json(report)  # every rank's, under torchrun (they hold the same masks)
            elif launcher_rank() == 0:
                print_compress_table(report, written)
        exit_on_failed_gates(report, written)


@app.command("eval")
def eval_command(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint folder, .gguf file or hub id; omit for the bundled model."),
    eval_text: Optional[list[Path]] = typer.Option(None, "--eval-text", help=setting("evaluation.text").help),
    eval_windows: int = eval_option("evaluation.windows", "--eval-windows"),
    eval_seqlen: int = eval_option("evaluation.seqlen", "--eval-seqlen"),
    bos: str = eval_option("bos", "--bos", text="Start every window with the BOS token: auto (when the tokenizer adds one by default), always or never."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "--eval-tasks", help="lm-eval tasks to score, comma-separated (offline: prune_cloze, prune_lastword)."),
    limit: Optional[int] = eval_option("evaluation.task_limit", "--task-limit", "--limit", text="Examples per task (default: all)."),
    num_fewshot: Optional[int] = eval_option("evaluation.num_fewshot", "--num-fewshot", text="Few-shot examples per task prompt (default: the task's)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Task requests per batch (grouped by length)."),
    include_path: Optional[list[Path]] = typer.Option(None, "--include-path", help="Folder of lm-eval task YAML (repeatable)."),
    no_ppl: bool = typer.Option(False, "--no-ppl", help="Score the tasks only (no perplexity)."),
    device: str = eval_option("device", "--device", text="auto, cpu or cuda."),
    dtype: str = eval_option("dtype", "--dtype", text="Compute dtype: auto (the checkpoint's; float32 on a CPU without fast bfloat16), float32, bfloat16 or float16."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Evaluate any checkpoint: perplexity on held-out text, lm-eval tasks (--tasks), measured sparsity."""
    setup_logging(verbose)
    with cli_boundary(debug, as_json):
        from prune_cli.recipe.config import EvaluationConfig  # noqa: PLC0415 - imports torch; --help must not
        from prune_cli.run.evaluation import evaluate_checkpoint  # noqa: PLC0415 - imports torch; --help must not

        for key, value in (("device", device), ("dtype", dtype), ("bos", bos)):
            check_value(setting(key), value)  # as compress checks them: the choices, did you mean
        names = parse_tasks(tasks)
        if no_ppl and not names:
            raise RecipeError("--no-ppl leaves nothing to evaluate", hint="give --tasks, or drop --no-ppl")
        ev = EvaluationConfig(windows=eval_windows, seqlen=eval_seqlen, text=tuple(eval_text or ()), batch_size=4,
                              tasks=names, task_limit=limit, num_fewshot=num_fewshot,
                              task_include_path=tuple(include_path or ()))
        with signals_as_interrupts(), RichEvents() as events:
            report = evaluate_checkpoint(checkpoint, ev, device, dtype, offline, events, bos_mode=bos,
                                         perplexity=not no_ppl, task_batch_size=batch_size)
        with printing_results():
            emit_json(report) if as_json else print_eval_report(report)


@app.command("sweep")
def sweep_command(
    model: Optional[str] = typer.Argument(None, help="Hub id, local HF folder, .gguf file; omit for the bundled SmolLM2-135M."),
    methods: str = typer.Option(..., "--methods", help="Weight methods, comma-separated, e.g. wanda,sparsegpt."),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help="Unstructured sparsities, comma-separated, e.g. 0.3,0.5,0.7."),
    patterns: Optional[str] = typer.Option(None, "--patterns", help="N:M patterns, comma-separated, e.g. 2:4,4:8."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML for everything but the method and sparsity."),
    calib_text: Optional[list[Path]] = recipe_option("calibration.text", "--calib-text"),
    calib_samples: Optional[int] = recipe_option("calibration.samples", "--calib-samples"),
    seqlen: Optional[int] = recipe_option("calibration.seqlen", "--seqlen"),
    seed: Optional[int] = recipe_option("calibration.seed", "--seed"),
    eval_text: Optional[list[Path]] = recipe_option("evaluation.text", "--eval-text"),
    eval_windows: Optional[int] = recipe_option("evaluation.windows", "--eval-windows"),
    eval_seqlen: Optional[int] = recipe_option("evaluation.seqlen", "--eval-seqlen"),
    eval_tasks: Optional[str] = recipe_option("evaluation.tasks", "--tasks", "--eval-tasks"),
    task_limit: Optional[int] = recipe_option("evaluation.task_limit", "--task-limit", "--limit", min=1),
    device: Optional[str] = recipe_option("device", "--device"),
    dtype: Optional[str] = recipe_option("dtype", "--dtype"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of perplexity against sparsity here."),
    keep_checkpoints: Optional[Path] = typer.Option(None, "--keep-checkpoints", help="Export every point's checkpoint under this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace checkpoints prune-cli wrote under --keep-checkpoints."),
    baseline_cache: bool = typer.Option(True, "--baseline-cache/--no-baseline-cache", help="Keep the dense scores in ~/.cache/prune-cli/baselines (off: for this sweep only)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory for the calibration activations, e.g. 8GB."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Compress MODEL with several methods at several sparsities: a table, --json, a --plot PNG.

    The dense model is scored once for the whole sweep. Exit codes as for compress (no gates)."""
    setup_logging(verbose)
    with cli_boundary(debug, as_json):
        from prune_cli.recipe.config import load_recipe  # noqa: PLC0415 - imports torch; --help must not
        from prune_cli.run.sweep import check_plot_path, parse_list, plot, points, run_sweep  # noqa: PLC0415 - imports torch; --help must not

        try:
            values = [float(x) for x in parse_list(sparsities)]
        except ValueError:
            raise typer.BadParameter(f"expected numbers, got {sparsities!r}", param_hint="--sparsities") from None
        grid = points(parse_list(methods), values, parse_list(patterns))
        base = nest({  # the recipe keys the flags set; None: not given
            "calibration.text": [str(p) for p in calib_text] if calib_text else None, "calibration.samples": calib_samples,
            "calibration.seqlen": seqlen, "calibration.seed": seed,
            "evaluation.text": [str(p) for p in eval_text] if eval_text else None, "evaluation.windows": eval_windows,
            "evaluation.seqlen": eval_seqlen, "evaluation.tasks": list(parse_tasks(eval_tasks)) or None,
            "evaluation.task_limit": task_limit,
            "device": device, "dtype": dtype,
        })
        recipe_data = load_recipe(recipe) if recipe else None
        if plot_path is not None:
            check_plot_path(plot_path)
        try:
            with signals_as_interrupts(), RichEvents() as events:
                report = run_sweep(model, recipe_data, base, grid, offline=offline, keep=keep_checkpoints,
                                   overwrite=overwrite, baseline_cache=baseline_cache, events=events, max_memory=max_memory)
        except BaseException as exc:  # noqa: BLE001 - the points that finished are printed, then the error
            if getattr(exc, "sweep_report", None) is None:
                raise
            sweep_stopped(exc.sweep_report, exc, as_json, debug)
        if plot_path is not None:
            try:
                report["plot"] = str(plot(report, plot_path))
            except Exception as exc:  # noqa: BLE001 - the sweep's results are printed all the same
                sweep_stopped(report, exc, as_json, debug)
        print_sweep(report, as_json)


@app.command("verify")
def verify_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder written by prune-cli compress."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check a checkpoint against its report: every tensor's bytes against its recorded sha256,
    every pruned layer's zeros and N:M pattern recomputed from the stored weights.

    Exit codes: 0 it matches, 2 a mismatch (the first tensor or layer named), 1 internal error."""
    setup_logging(False)
    with cli_boundary(debug, as_json):
        from prune_cli.run.verify import verify_checkpoint  # noqa: PLC0415 - imports torch; --help must not

        summary = verify_checkpoint(checkpoint)
        with printing_results():
            if as_json:
                emit_json({"ok": True, **summary})
            else:
                note = "" if summary["hashes_recorded"] else " (no tensor hashes recorded: an older prune-cli wrote it)"
                stdout.print(f"{checkpoint}: ok, {summary['tensors_checked']} tensors and {summary['layers_checked']} "
                             f"pruned layers match its report{note}", highlight=False, soft_wrap=True)


@app.command("methods")
def methods_command() -> None:
    """List every weight and activation method, with its options (-O KEY=VALUE)."""
    from prune_cli.activation import ACTIVATION_METHODS  # noqa: PLC0415 - imports torch; --help must not
    from prune_cli.methods import WEIGHT_METHODS  # noqa: PLC0415 - imports torch; --help must not
    from prune_cli.methods.catalog import ACTIVATION_TITLE, WEIGHT_TITLE, catalog_lines  # noqa: PLC0415 - likewise

    sections = ((WEIGHT_TITLE, WEIGHT_METHODS), (ACTIVATION_TITLE, ACTIVATION_METHODS))
    for line in catalog_lines(sections, max(40, stdout.width)):
        stdout.print(line, markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """The ``prune-cli`` entry point. Usage errors found by the option parser (before a command
    runs) keep their message and exit code 2, and with ``--json`` are a JSON object too."""
    from prune_cli.core.allocator import keep_freed_memory  # noqa: PLC0415 - only when a command runs

    keep_freed_memory()  # a CLI run owns its process: no page-fault storms (see prune_cli.core.allocator)
    args = sys.argv[1:] if argv is None else list(argv)
    remember_arguments(args)
    if stdout_closed():  # nowhere for the results; and a file opened later would get its descriptor
        if sys.stderr is not None:
            sys.stderr.write("error: stdout is closed: prune-cli prints its results there (nothing was run)\n"
                             "hint: send it to a file or to /dev/null (> report.json) instead of closing it (>&-)\n")
        sys.exit(2)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="prune-cli", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors, as Typer vendors them
        exc.show()
        code = getattr(exc, "exit_code", 2)
        if "--json" in args:
            emit_json({"error": {"type": "UsageError", "message": one_line(exc.format_message()), "hint": "see --help"},
                       "exit_code": code})
    except typer.Abort:
        emit_error("Interrupted", "interrupted by SIGINT: nothing was written to --output", None, 130, "--json" in args, label="stopped")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
