"""The ``eval`` pipeline: perplexity, lm-eval tasks and measured sparsity of any checkpoint
(folder, .gguf, hub id, bundled), block by block."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from prune_cli.activation.modules import SparsityTally
from prune_cli.calibrators.sampling import evaluation_ids, evaluation_windows, fingerprint, resolve_bos
from prune_cli.checkpoint.files import check_checkpoint_folder
from prune_cli.checkpoint.output import REPORT_FILE
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.errors import CheckpointError
from prune_cli.core.records import EVAL_SCHEMA_VERSION, LayerRecord, Timings, overall_sparsity, versions
from prune_cli.model.source import offline_requested, resolve_source
from prune_cli.model.structure import block_linears, decoder_blocks
from prune_cli.recipe.config import EvaluationConfig
from prune_cli.run.events import Events, Progress, timed
from prune_cli.run.inputs import check_context, evaluation_text, resolve_device
from prune_cli.runtime import ACTIVATION_FILE, BlockActivation
from prune_cli.stages.evaluate import EvalStage
from prune_cli.stages.tasks import TaskRun
from prune_cli.streaming.driver import Stage
from prune_cli.streaming.loader import load_config, open_model

log = logging.getLogger(__name__)


def zero_fractions(prefix: str, block: nn.Module) -> list[LayerRecord]:
    """One record per Linear of ``block`` (named under ``prefix``) with its fraction of exact zeros."""
    records = []
    for local, linear in block_linears(block).items():
        w = linear.weight.data
        zeros = float(w.numel() - torch.count_nonzero(w)) / w.numel()
        records.append(LayerRecord(f"{prefix}.{local}", (w.shape[0], w.shape[1]), "-", "measured", 0.0, zeros))
    return records


def measure_checkpoint_sparsity(model: nn.Module) -> list[LayerRecord]:
    """Zero fractions of the Linears inside the decoder blocks of a loaded model."""
    blocks = decoder_blocks(model)
    return [r for index, block in enumerate(blocks.modules) for r in zero_fractions(f"{blocks.path}.{index}", block)]


def recorded_dtype(saved: dict | None, requested: str) -> str:
    """``--dtype auto`` on a prune-cli checkpoint computes in the dtype its compress run measured
    the compressed perplexity in (``sparsity.json``'s ``dtype``), so that ``eval`` gives the
    report's number: a bfloat16 export of a float32 run would otherwise be computed in bfloat16
    on a CPU or GPU with fast bfloat16 kernels, and score differently."""
    recorded = (saved or {}).get("dtype")
    if requested != "auto" or recorded not in ("float32", "bfloat16", "float16"):
        return requested
    log.info("computing in %s, as the compress run that wrote this checkpoint did (--dtype to change)", recorded)
    return recorded


def saved_report(folder: Path) -> dict | None:
    """The ``sparsity.json`` a prune-cli checkpoint folder holds, or ``None``; a damaged or
    missing model file, or a report that is not JSON, is one line (:class:`CheckpointError`)."""
    check_checkpoint_folder(folder)  # damaged or missing files: one line, not a crash
    if not (folder / REPORT_FILE).is_file():
        return None
    try:
        return json.loads((folder / REPORT_FILE).read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{REPORT_FILE} in {folder} is not valid JSON") from None


def evaluate_checkpoint(
    checkpoint: str | None, ev: EvaluationConfig, device_name: str = "auto", dtype: str = "auto",
    offline: bool = False, events: Events | None = None, bos_mode: str = "auto", perplexity: bool = True,
    task_batch_size: int = 8,
) -> dict:
    """Perplexity and measured sparsity of any checkpoint (folder, .gguf, hub id, bundled), block
    by block (a model larger than memory is measured the same way), and the lm-eval tasks of
    ``ev.tasks`` in the same walk (:mod:`prune_cli.stages.tasks`; ``perplexity=False``: the tasks only).
    A prune-cli checkpoint's activation sparsifiers are installed on each block as it is read."""
    events = events or Events()
    timings = Timings()
    device = resolve_device(device_name)
    source = resolve_source(checkpoint)
    offline = offline_requested(offline)
    check_context(load_config(source, offline), {"--eval-seqlen": ev.seqlen} if perplexity else {})
    saved = None
    with timed(timings, "load"):
        if source.kind == "folder":
            saved = saved_report(Path(source.location))
        dtype = recorded_dtype(saved, dtype)
        opened = open_model(source, dtype, device, offline)
        if opened.note:
            log.info(opened.note)
        driver = opened.driver
        if source.kind == "folder" and (Path(source.location) / ACTIVATION_FILE).is_file():
            driver.prepare_block.append(BlockActivation(Path(source.location), driver))
        bos = resolve_bos(opened.tokenizer, bos_mode)
        text = windows = None
        if perplexity:
            text = evaluation_text(ev)
            windows = evaluation_windows(evaluation_ids(opened.tokenizer, text, ev.windows, ev.seqlen, bos), ev.windows, ev.seqlen, bos)
        tasks = None
        settings = ev.task_settings()
        if settings is not None:
            tasks = TaskRun(replace(settings, batch_size=task_batch_size), opened.tokenizer, opened.config, bos)

    tally = SparsityTally()
    stages: list[Stage] = []
    stage = None
    if windows is not None:
        stage = EvalStage(windows, ev.batch_size, tally=tally)
        stages.append(stage)
    if tasks is not None:
        stages.append(tasks.stage("results", tally=None if stage is not None else tally))
    layers: list[LayerRecord] = []
    with Progress(events, driver).walk("eval") as step:
        driver.walk(stages, after_block=[lambda i, block: layers.extend(zero_fractions(driver.name(i), block))],
                    progress=step, timings=timings, after_key="eval")
    ppl = stage.result if stage is not None else None
    return {
        "format": "prune-cli/eval-report",
        "format_version": 1,
        "schema_version": EVAL_SCHEMA_VERSION,  # prune_cli/schemas/eval-report.v1.schema.json
        "model": source.describe(),
        "ppl": ppl.ppl if ppl else None,
        "nll": ppl.nll if ppl else None,
        "tokens": ppl.tokens if ppl else None,
        "sparsity": overall_sparsity(layers),
        "activation_sparsity": tally.overall("compute") if tally.counts else None,
        "evaluation": None if windows is None or text is None else {
            "source": text.source, "text_sha256": text.sha256, "windows": list(windows.shape),
            "bos": bos is not None, "tokens_sha256": fingerprint(windows)},
        "tasks": tasks.report() if tasks is not None else None,
        "recorded": None if saved is None else {"method": saved.get("method"), "pattern": saved.get("pattern"), "ppl": saved.get("ppl")},
        "device": str(device),
        "dtype": DTYPE_NAMES_BY_DTYPE.get(opened.compute_dtype, str(opened.compute_dtype)),
        "timings": timings.values,
        "versions": versions(),
    }
