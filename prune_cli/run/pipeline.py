"""The compress pipeline (library API; no printing, no typer/rich), read top to bottom:

compress() checks what it can cheaply and claims the output, then one run (:class:`Run`) goes
through its stages: load -> plan the evaluation -> prepare the output -> prune (weights) ->
activation sparsity -> evaluate -> report -> gate -> export. The model is opened as structure
and head; its blocks are read as the walks reach them, and each is written as the last walk
finishes it (the staging folder moved into place at the end).

Elsewhere in :mod:`prune_cli.run`: the request and the loaded job (:mod:`~prune_cli.run.job`),
the texts and windows (:mod:`~prune_cli.run.inputs`), ``--dry-run`` (:mod:`~prune_cli.run.dry_run`),
the report (:mod:`~prune_cli.run.report`), the fingerprints of the resume state and of the
dense-baseline cache (:mod:`~prune_cli.run.fingerprint`), and ``eval``
(:mod:`~prune_cli.run.evaluation`).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_cli.activation.modules import SparsityTally
from prune_cli.activation.transform import apply_transform, rotations_for, transform_block
from prune_cli.checkpoint.output import disk_full_named
from prune_cli.checkpoint.resume import ResumeState
from prune_cli.core import distributed, memory
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.errors import CheckpointError, InterruptedRun, NonFiniteError
from prune_cli.gpu.backend import resolve_backend
from prune_cli.methods.permutation import text_config
from prune_cli.model.source import offline_requested, resolve_source
from prune_cli.recipe.plan import with_overrides
from prune_cli.run.claim import check_data_parallel, claim_output, claimed_on_rank_0
from prune_cli.run.events import Events, timed
from prune_cli.run.fingerprint import dense_baseline, run_fingerprint
from prune_cli.run.inputs import check_context, resolve_device, window_lengths
from prune_cli.run.job import CompressRequest, load_job
from prune_cli.run.memory_plan import activation_streams
from prune_cli.run.report import ReportBuilder, add_achieved
from prune_cli.run.state import Evaluation, Output, Pruned, Run
from prune_cli.stages.activation import ActivationStage, allocate
from prune_cli.stages.allocation import allocate_owl
from prune_cli.stages.evaluate import EvalStage, Perplexity
from prune_cli.stages.export import WORK_FOLDER, CheckpointWriter, RoundStage, ScratchBlocks, needs_rounding
from prune_cli.stages.pruning import PruneStage
from prune_cli.streaming.loader import load_config

log = logging.getLogger(__name__)

__all__ = ["CompressRequest", "Events", "compress"]


def compress(request: CompressRequest, events: Events | None = None) -> dict:
    """Run the whole compress job; returns the report (also written as sparsity.json).

    Everything that can be checked cheaply is checked before the output folder is claimed
    (device, backend, model source, window lengths against the model's context); the output is
    then claimed for the whole run (:class:`~prune_cli.checkpoint.output.OutputTarget`: lock, staging
    folder), so a second run or an unwritable folder fails in the first seconds."""
    events = events or Events()
    config = request.config
    offline = offline_requested(request.offline)
    device = resolve_device(config.device)

    source = resolve_source(request.model)
    backend, backend_note = resolve_backend(config.backend, device)  # an explicit cupy fails here, early
    hf_config = load_config(source, offline)
    check_context(hf_config, window_lengths(config))
    if distributed.requested():
        check_data_parallel(request, hf_config)
        distributed.init(device)
    if request.output is None or distributed.rank() != 0:
        if distributed.active():
            claimed_on_rank_0(None)
        with disk_full_named(Path(tempfile.gettempdir())):  # the work folder (spilled activations)
            return _compress(Run(request, source, device, backend, None, events), backend_note)
    with claim_output(request, request.output) as target:
        try:
            with disk_full_named(target.output.parent, target.output):  # the staging folder is there
                return _compress(Run(request, source, device, backend, target, events), backend_note)
        except BaseException as exc:
            # an interrupted run's state is kept for --resume; so is one adopted from another run
            if target.adopted or (isinstance(exc, InterruptedRun) and target.staging is not None
                                  and ResumeState.saved_progress(target.staging)):
                target.keep_for_resume = True
                exc.staging = target.staging  # type: ignore[attr-defined]
            raise


def _compress(run: Run, backend_note: str | None) -> dict:
    """One compress run as a sequence of named stages, each a function of the run and of what
    the earlier ones made.

    The work happens in block walks (each block read once per walk, written once):

    1. OWL only: the dense pre-pass (with the dense evaluation riding along), then every
       candidate allocation at once;
    2. pruning (with the dense evaluation, unless it already ran, before each block is pruned;
       and, when nothing follows, the compressed evaluation after it and the export);
    3. activation sparsity: the greedy allocation's Fisher and error-curve walks, then the
       calibration walk (with the evaluations and the export).

    A streamed model's blocks pruned in walk 2 are kept in the staging folder's work folder for
    walk 3. Before the compressed evaluation every block is rounded to the save dtype, so the
    reported perplexity is that of the checkpoint as written."""
    _stage_load(run)
    if backend_note:
        log.info(backend_note)
    evaluation = _stage_plan_evaluation(run)
    output = _stage_prepare_output(run)
    pruned = _stage_prune(run, evaluation, output)
    activation = _stage_activation(run, evaluation, output) if run.config.activation is not None else None
    dense, compressed = _stage_evaluate(run, evaluation, activation)
    report = ReportBuilder(run, pruned, activation, evaluation, dense, compressed).build()
    report["gates"] = _stage_gate(run, report)
    output.remove_work(claimed=run.target is not None)
    return _stage_export(run, report, output)


def _stage_load(run: Run) -> None:
    """Load: the model opened for streaming, the plan, the token windows, the task requests."""
    run.events.stage("load")
    with timed(run.timings, "load"):
        run.loaded = load_job(run.request, run.source, run.device, run.target)
    run.events.done("load")


def _stage_plan_evaluation(run: Run) -> Evaluation:
    """The evaluation stages and the walks they ride along; dense results from the baseline
    cache when it holds them (not for a resumed run: its walks must match the interrupted one's)."""
    job, ev, target = run.job, run.config.evaluation, run.target
    rounding = needs_rounding(job.save_dtype, job.opened.compute_dtype)
    head_dtype = job.save_dtype if rounding else None
    out = Evaluation(tally=SparsityTally() if run.config.activation is not None else None)
    local_eval = job.local_eval
    if local_eval is not None:
        out.dense_eval = EvalStage(local_eval, ev.batch_size, check_finite=True)
        out.compressed_eval = EvalStage(local_eval, ev.batch_size, tally=out.tally, head_dtype=head_dtype)
    out.pending = [out.dense_eval] if out.dense_eval else []
    rounds = RoundStage(job.save_dtype)
    out.finishing = ([rounds] if rounding else []) + ([out.compressed_eval] if out.compressed_eval else [])
    if job.tasks is not None:
        out.dense_tasks = job.tasks.dense_stage()
        out.pending.append(out.dense_tasks)
        out.finishing.append(job.tasks.compressed_stage(head_dtype))
    out.baseline = None if target is not None and target.adopted else dense_baseline(run.request, run.source, job, run.device)
    out.cached = out.baseline.load() if out.baseline is not None else None
    if out.baseline is not None and out.cached is not None:  # the dense numbers of an earlier run, same inputs
        log.info("dense baseline from the cache (%s)", out.baseline.path)
        if out.dense_eval is not None:
            out.dense_eval.result = Perplexity(*out.cached["ppl"])
        if out.dense_tasks is not None:
            out.dense_tasks.answers = [tuple(a) for a in out.cached["answers"]]
        out.pending = []
    return out


def _stage_prepare_output(run: Run) -> Output:
    """The resume state, the checkpoint writer (everything outside the blocks written now), and
    the spill folder for calibration activations beyond ``--max-memory``."""
    job, target = run.job, run.target
    driver = job.driver
    out = Output()
    spill = _activations_spill(run)
    staging = target.staging if target is not None else None  # made when the output was claimed
    if target is not None and staging is not None and not distributed.active():
        resume = ResumeState(staging, run_fingerprint("resume", run.source, run.config, job, run.device, run.backend),
                             run.request.checkpoint_interval)
        if target.adopted and not resume.load():
            raise CheckpointError(f"{staging} holds no resume state", hint="pass --no-resume to start over")
        driver.resume = resume
    if target is not None and staging is not None:
        out.writer = CheckpointWriter(staging, driver, job.save_dtype, resume=target.adopted)
        with timed(run.timings, "export"):
            out.writer.write_head()
        out.work = staging / WORK_FOLDER
    if spill:
        work = out.work_folder()
        shutil.rmtree(work / "activations", ignore_errors=True)  # an interrupted run's (its resume state links what it needs)
        driver.spill_folder = work / "activations"
    return out


def _activations_spill(run: Run) -> bool:
    """Whether the job's calibration activations go to disk: their estimate (every stream of
    hidden states the walks keep) against ``--max-memory`` (default: a share of the machine's or
    cgroup's memory); says which."""
    config, job = run.config, run.job
    text: Any = text_config(job.driver.model)
    streams = activation_streams(config, job.eval_windows is not None,
                                 job.val_windows.numel() if job.val_windows is not None else 0)
    element = torch.empty((), dtype=job.opened.compute_dtype).element_size()
    sizes = memory.activation_bytes(text.hidden_size, element, job.driver.n_blocks, streams)
    total = sum(sizes.values())
    max_memory = run.request.max_memory
    budget = memory.parse_size(max_memory) if max_memory else int(memory.memory_limit() * memory.DEFAULT_FRACTION)
    detail = ", ".join(f"{k} {memory.human(v)}" for k, v in sizes.items())
    if total <= budget:
        log.debug("calibration activations %s (%s) fit in --max-memory %s", memory.human(total), detail, memory.human(budget))
        return False
    log.info("calibration activations need about %s (%s), more than --max-memory %s: they are kept on disk",
             memory.human(total), detail, memory.human(budget))
    return True


def _stage_prune(run: Run, evaluation: Evaluation, output: Output) -> Pruned:
    """Weight pruning: OWL's walks when asked for, then the pruning walk (with the stages that
    ride along it); a streamed model's pruned blocks kept for the activation walks."""
    config, job, progress = run.config, run.job, run.progress
    driver, cal = job.driver, config.calibration
    out = Pruned(plan=job.plan)
    if config.owl is not None:
        assert out.plan is not None and config.pattern is not None  # OWL spreads a weight pattern's sparsity
        with progress.walk("allocation", walks=2 if job.val_windows is not None else 1) as step:
            out.plan, out.allocation = allocate_owl(
                driver, out.plan, config.owl, job.local_cal, job.local_val, cal.batch_size, driver.device,
                config.pattern.target_sparsity, also=evaluation.pending, moe=config.moe, progress=step, timings=run.timings,
            )
        evaluation.pending = []
        out.plan = with_overrides(out.plan, config.overrides)
    if out.plan is None:
        return out
    last = config.activation is None
    pruning = PruneStage(out.plan, job.local_cal, cal.batch_size, run.backend, moe=config.moe)
    after, scratch = [], None
    if last and output.writer is not None:
        after = [output.writer.write_block]
    elif not last and driver.streamed:
        scratch = ScratchBlocks(output.work_folder() / "blocks", driver)
        after = [scratch.write_block]
    with progress.walk("calibration") as step:
        driver.walk([*evaluation.pending, pruning, *(evaluation.finishing if last else [])], after_block=after,
                    progress=step, timings=run.timings)
    evaluation.pending = []
    out.layers, out.experts = pruning.records, pruning.experts
    if scratch is not None:
        driver.weights = scratch.source(driver.weights)
    return out


def _stage_activation(run: Run, evaluation: Evaluation, output: Output) -> dict:
    """Calibrate and install the activation sparsifiers of the job's method on the (pruned)
    model: a dense evaluation not yet done gets a walk of its own first (it must see the blocks
    before WINA's transform), then the greedy allocation's walks if asked for, then the
    calibration walk, which carries the compressed evaluation and the export. The transform is
    applied to each block as it is read (streamed) or once to the whole model (in memory).
    Returns the report's ``activation`` section."""
    config, job, progress, timings = run.config, run.job, run.progress, run.timings
    act, cal, driver = config.activation, config.calibration, job.driver
    method, targets = job.act_method, job.act_targets
    assert act is not None and method is not None and targets is not None  # loaded with the activation settings
    if evaluation.pending:
        with progress.walk("eval dense") as step:
            driver.walk(evaluation.pending, progress=step, timings=timings)
    prepare: Callable[[int, nn.Module], None] | None = None
    if method.transforms_model:
        if driver.streamed:
            def prepare(index: int, block: nn.Module) -> None:
                transform_block(block, driver.name(index))
        else:
            apply_transform(driver.model, rotations_for(driver.model))
    if act.allocation == "greedy":
        with progress.walk("activation allocation", walks=3) as step:
            sparsity, _ = allocate(
                driver, targets, method, act.allocation, act.sparsity, job.cal_windows, cal.batch_size,
                driver.device, act.max_tokens, cal.seed, prepare=prepare, timings=timings, progress=step,
            )
    else:
        sparsity, _ = allocate(driver, targets, method, act.allocation, act.sparsity, job.cal_windows,
                               cal.batch_size, driver.device, act.max_tokens, cal.seed)
    stage = ActivationStage(targets, method, sparsity, job.cal_windows, cal.batch_size, act.max_tokens, cal.seed, run.backend)
    writer = output.writer
    with progress.walk("activation") as step:
        driver.walk([stage, *evaluation.finishing], after_block=[writer.write_block] if writer is not None else [],
                    progress=step, prepare=prepare, timings=timings)
    return {**act.to_dict(), "target_sparsity": act.sparsity, "tokens": "all", "layers": stage.ordered_records()}


def _stage_evaluate(run: Run, evaluation: Evaluation,
                    activation: dict | None) -> tuple[Perplexity | None, Perplexity | None]:
    """The dense and compressed perplexities the walks measured (the dense ones stored in the
    baseline cache); a non-finite dense loss is an error (its activations overflow)."""
    dense = evaluation.dense_eval.result if evaluation.dense_eval else None
    compressed = evaluation.compressed_eval.result if evaluation.compressed_eval else None
    if evaluation.baseline is not None and evaluation.cached is None:
        evaluation.baseline.store(dense, evaluation.dense_tasks.answers if evaluation.dense_tasks is not None else None)
    if dense is not None:
        _check_dense_loss(dense, DTYPE_NAMES_BY_DTYPE.get(run.job.opened.compute_dtype, "float32"))
    if activation is not None and evaluation.tally is not None and compressed is not None:
        add_achieved(activation, evaluation.tally)
    return dense, compressed


def _check_dense_loss(dense: Perplexity, dtype: str) -> None:
    """The dense model's loss on the evaluation windows must be finite (its weights are): a NaN
    or inf here means its activations overflow in ``dtype``, and every later number would be
    garbage. A compressed model's diverged perplexity, by contrast, is a result (reported as
    null and flagged in JSON)."""
    if not math.isfinite(dense.nll):
        raise NonFiniteError(
            f"the dense model's loss on the evaluation text is {dense.nll} in {dtype}: its activations overflow",
            hint="rerun with --dtype float32" if dtype != "float32" else "check the model's weights and config",
        )


def _stage_gate(run: Run, report: dict) -> list[dict] | None:
    """The quality gates' results (:mod:`prune_cli.core.gates`); a failed one exits 3 in the CLI."""
    gates = run.config.gates
    return gates.check(report["ppl"], report["tasks"]) if gates.active else None


def _stage_export(run: Run, report: dict, output: Output) -> dict:
    """Export: config, tokenizer and report written, the staging folder moved into place. The
    written report is the one returned (and printed by --json): its timings end before the
    config, tokenizer and report files are written and the folder is moved into place."""
    target, timings = run.target, run.timings
    if target is None or output.writer is None:
        timings.add("total", time.perf_counter() - run.started)
        report["timings"] = dict(timings.values)
        return report
    run.events.stage("export")
    report["output"] = str(target.output)
    timings.add("total", time.perf_counter() - run.started)
    report["timings"] = dict(timings.values)
    output.writer.finish(run.job.opened.tokenizer, report)
    target.commit()
    run.events.done("export")
    log.info("wrote %s", target.output)
    return report
