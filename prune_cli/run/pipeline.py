"""The compress and eval pipelines (library API; no printing, no typer/rich).

compress: config -> open the model (structure + head; blocks are read as walks reach them)
          -> plan -> windows -> block walks (OWL, pruning, activation sparsity; the dense and
          compressed evaluations ride along) -> report -> export (each block written as the last
          walk finishes it, the folder moved into place at the end).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prune_cli.activation import build_activation_method
from prune_cli.activation.modules import SparsityTally
from prune_cli.activation.transform import apply_transform, check_supported, rotations_for, transform_block
from prune_cli.calibrators.sampling import (
    calibration_ids,
    calibration_windows,
    evaluation_ids,
    evaluation_windows,
    fingerprint,
    resolve_bos,
    validation_windows,
)
from prune_cli.calibrators.sources import Text, bundled_text, text_from_dataset, text_from_files
from prune_cli.checkpoint.files import check_checkpoint_folder, file_digest, model_weight_files
from prune_cli.checkpoint.output import (
    REPORT_FILE,
    OutputTarget,
    disk_full_named,
    output_path,
    preflight,
    resumable_staging,
)
from prune_cli.checkpoint.resume import FORMAT_VERSION, ResumeState
from prune_cli.core import distributed, memory
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.errors import BadInputError, CheckpointError, InterruptedRun, NonFiniteError
from prune_cli.core.records import (
    EVAL_SCHEMA_VERSION,
    REPORT_SCHEMA_VERSION,
    LayerRecord,
    Timings,
    masks_digest,
    overall_sparsity,
    versions,
)
from prune_cli.gpu.backend import resolve_backend
from prune_cli.model.source import ModelSource, offline_requested, resolve_source
from prune_cli.model.structure import block_linears, check_prunable, decoder_blocks
from prune_cli.recipe.config import CalibrationConfig, EvaluationConfig, RunConfig
from prune_cli.recipe.plan import Plan, build_plan, with_overrides
from prune_cli.run import baseline
from prune_cli.runtime import ACTIVATION_FILE, BlockActivation
from prune_cli.stages.activation import ActivationStage, activation_targets, allocate
from prune_cli.stages.allocation import allocate_owl
from prune_cli.stages.evaluate import EvalStage, Perplexity
from prune_cli.stages.export import (
    WORK_FOLDER,
    CheckpointWriter,
    RoundStage,
    ScratchBlocks,
    checkpoint_bytes,
    needs_rounding,
    weight_specs,
)
from prune_cli.stages.pruning import CalibrationResult, PruneStage, calibrate_and_prune, check_mask  # noqa: F401 - re-exported
from prune_cli.stages.tasks import TaskRun
from prune_cli.streaming.driver import BlockDriver
from prune_cli.streaming.loader import OpenedModel, load_config, load_tokenizer, local_folder, meta_model, open_model
from prune_cli.streaming.loader import save_dtype as model_save_dtype

log = logging.getLogger(__name__)


class Events:
    """Progress callbacks; the CLI subclasses this with a rich display. All no-ops here."""

    def stage(self, name: str, total: int | None = None) -> None:
        """A stage starts; ``total`` steps if known."""

    def advance(self, name: str, steps: int = 1, detail: str = "") -> None:
        """``steps`` more steps of stage ``name`` are done."""

    def done(self, name: str) -> None:
        """Stage ``name`` finished."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda requested but CUDA is not available", hint="use --device cpu or auto")
    return torch.device(name)


@contextmanager
def _timed(timings: Timings, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings.add(key, time.perf_counter() - start)


def calibration_text(cal: CalibrationConfig, offline: bool, tokenizer=None) -> Text:
    """The calibration text; ``.jsonl`` rows with ``messages`` rendered by ``tokenizer``'s chat
    template when ``cal.chat_template`` (see calibrators.sources)."""
    if cal.text:
        return text_from_files(list(cal.text), cal.column, _chat_renderer(tokenizer) if cal.chat_template else None)
    if cal.dataset:
        return text_from_dataset(cal.dataset, cal.split, cal.column, offline)
    return bundled_text("calibration")


def _chat_renderer(tokenizer):
    """``messages -> str`` by the tokenizer's own chat template (no generation prompt)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadInputError("--calib-chat-template: this model's tokenizer has no chat template",
                            hint="calibrate on plain text (a .txt file or a jsonl text field)")
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)


def evaluation_text(ev: EvaluationConfig) -> Text:
    return text_from_files(list(ev.text)) if ev.text else bundled_text("evaluation")


@dataclass
class CompressRequest:
    config: RunConfig
    model: str | None  # MODEL argument (None = bundled default)
    output: Path | None
    overwrite: bool = False
    offline: bool = False
    resume: bool | None = None  # True: continue an interrupted run; False: discard its state; None: keep it
    checkpoint_interval: float = 30.0  # seconds between resume-state writes (0: after every block)
    max_memory: str | None = None  # budget of the calibration activations ("8GB"); None: a share of the RAM
    baseline_cache: bool = True  # reuse the dense scores of an earlier run (prune_cli.run.baseline)


def context_length(model_config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``, GPT-2's
    ``n_positions`` maps onto it), or None when its config does not say."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_context(model_config, lengths: dict[str, int]) -> None:
    """Refuse window lengths beyond the model's context, before any weight is loaded."""
    limit = context_length(model_config)
    for flag, length in lengths.items():
        if limit is not None and length > limit:
            raise BadInputError(
                f"{flag} {length} is longer than the model's context ({limit} tokens, max_position_embeddings)",
                hint=f"pass {flag} {min(limit, 512)} or less",
            )


def _window_lengths(config: RunConfig) -> dict[str, int]:
    lengths = {"--seqlen": config.calibration.seqlen}
    if config.evaluation.enabled:
        lengths["--eval-seqlen"] = config.evaluation.seqlen
    return lengths


def dry_run(request: CompressRequest) -> dict:
    """The plan without loading weights (structure built on the meta device), after the checks
    a real run makes before its first block: the device and backend, window lengths against the
    model's context, the launcher's limits, --output (exists without --overwrite, not ours to
    replace, locked by a live run, not writable), the model's structure (prunable, WINA's
    transform), the calibration and evaluation texts and their windows, the task requests, and
    with ``--resume`` that the interrupted run's state matches this command
    (:func:`_check_resumable`)."""
    source = resolve_source(request.model)
    offline = offline_requested(request.offline)
    config = request.config
    device = resolve_device(config.device)

    backend, _ = resolve_backend(config.backend, device)
    hf_config = load_config(source, offline)
    check_context(hf_config, _window_lengths(config))
    if distributed.requested():
        _check_data_parallel(request, hf_config)
    if request.output is not None:
        preflight(output_path(request.output), request.overwrite)
    model = meta_model(source, request.config.dtype, offline)
    check_prunable(model, config.targets.include, config.activation is not None)
    if config.activation is not None:

        if getattr(build_activation_method(config.activation.method, config.activation.options), "transform", False):

            check_supported(model)
    if not _check_resumable(request, source, device, backend):

        tokens = _tokens(config, load_tokenizer(source, offline), hf_config, offline)
        if tokens.tasks is not None:
            tokens.tasks.suite.close()
    out: dict = {"model": source.describe(), "method": config.method, "method_options": config.method_options, "layers": []}
    if config.method:
        plan = build_plan(model, config)
        out.update(blocks=f"{plan.blocks_path} x{plan.n_blocks}", target_params=plan.target_params, layers=plan.rows())
    if config.activation:

        targets = activation_targets(model, config.targets)
        blocks = decoder_blocks(model)
        out["activation"] = config.activation.to_dict()
        out.setdefault("blocks", f"{blocks.path} x{len(blocks)}")
        out.setdefault("target_params", sum(t.params for t in targets))
        out["layers"] += [
            {"module": t.name, "shape": list(model.get_submodule(t.name).weight.shape), "method": config.activation.method,
             "pattern": f"activation {config.activation.allocation}", "sparsity": config.activation.sparsity}
            for t in targets
        ]
    return out


def _check_resumable(request: CompressRequest, source: ModelSource, device, backend) -> bool:
    """With ``--resume`` and an interrupted run's state to continue (the staging folder the run
    would adopt, :func:`~prune_cli.checkpoint.output.resumable_staging`), check that state against this
    command's fingerprint as the run does (:class:`~prune_cli.checkpoint.resume.ResumeState`): the model is
    opened (its head, not its blocks) and the windows made, since the fingerprint holds the
    dtypes and the token ids. Returns whether it checked (the windows were then made)."""

    if not request.resume or request.output is None or distributed.requested():
        return False
    staging = resumable_staging(output_path(request.output))
    if staging is None:
        return False
    job = _load(request, source, device, None)
    try:
        fingerprint = run_fingerprint(source, request.config, job, device, backend)
    finally:
        if job.tasks is not None:
            job.tasks.suite.close()
    saved = ResumeState.saved_progress(staging) or {}
    if saved.get("format_version") != FORMAT_VERSION or saved.get("fingerprint") != fingerprint:
        ResumeState(staging, fingerprint).load()  # raises ResumeMismatchError, saying what differs
    log.info("--resume would continue the interrupted run in %s", staging.name)
    return True


def _ppl_dict(dense: Perplexity | None, compressed: Perplexity | None) -> dict:
    out: dict = {"dense": dense.ppl if dense else None, "compressed": compressed.ppl if compressed else None}
    if dense and compressed:
        out["ratio"] = compressed.ppl / dense.ppl
    return out


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

    source: ModelSource = resolve_source(request.model)
    backend, backend_note = resolve_backend(config.backend, device)  # an explicit cupy fails here, early
    hf_config = load_config(source, offline)
    check_context(hf_config, _window_lengths(config))
    if distributed.requested():
        _check_data_parallel(request, hf_config)
        distributed.init(device)
    if request.output is None or distributed.rank() != 0:
        if distributed.active():
            _claimed_on_rank_0(None)
        import tempfile

        with disk_full_named(Path(tempfile.gettempdir())):  # the work folder (spilled activations)
            return _compress(request, source, device, backend, backend_note, None, events)
    with _claim(request) as target:
        try:
            with disk_full_named(target.output.parent, target.output):  # the staging folder is there
                return _compress(request, source, device, backend, backend_note, target, events)
        except BaseException as exc:
            # an interrupted run's state is kept for --resume; so is one adopted from another run
            if target.adopted or (isinstance(exc, InterruptedRun) and target.staging is not None
                                  and ResumeState.saved_progress(target.staging)):
                target.keep_for_resume = True
                exc.staging = target.staging
            raise


def _check_data_parallel(request: CompressRequest, hf_config) -> None:
    if any(getattr(hf_config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise BadInputError("mixture-of-experts models run in one process (which experts a rank's tokens reach "
                            "differs between ranks)", hint="run it without torchrun / accelerate launch")
    if request.config.activation is not None:
        raise BadInputError("activation sparsity runs in one process (its thresholds are quantiles over all tokens)",
                            hint="run it without torchrun / accelerate launch")
    if request.resume:
        raise BadInputError("--resume runs in one process (each rank holds part of the state)",
                            hint="run without torchrun, or without --resume")


def _claimed_on_rank_0(error: BaseException | None) -> None:
    """All ranks learn whether rank 0 could claim --output (so none waits forever for it)."""
    (failed,) = distributed.sum_numbers(0.0 if error is None else 1.0)
    if failed and error is None:
        raise BadInputError("rank 0 could not claim --output (see its error)")


@contextmanager
def _claim(request: CompressRequest):
    """:class:`OutputTarget` for this run; with several ranks, the others are told whether it worked."""
    target = OutputTarget(request.output, request.overwrite, request.resume)
    try:
        target.__enter__()
    except BaseException as exc:
        if distributed.active():
            _claimed_on_rank_0(exc)
        raise
    if distributed.active():
        _claimed_on_rank_0(None)
    try:
        yield target
    except BaseException as exc:
        target.__exit__(type(exc), exc, exc.__traceback__)
        raise
    target.__exit__(None, None, None)


@dataclass
class _Job:
    """What one compress run works with, gathered at load time."""

    opened: OpenedModel
    save_dtype: torch.dtype
    plan: Plan | None
    act_method: object
    act_targets: list | None
    cal_text: Text
    cal_windows: torch.Tensor
    val_windows: torch.Tensor | None
    eval_text: Text | None
    eval_windows: torch.Tensor | None
    bos: int | None = None  # the token id every window starts with (calibrators.sampling.resolve_bos)
    tasks: object = None  # a prune_cli.stages.tasks.TaskRun: the lm-eval requests, tokenised

    @property
    def driver(self) -> BlockDriver:
        return self.opened.driver

    # this process's share of the windows (all of them but under torchrun)
    @property
    def local_cal(self) -> torch.Tensor:
        return distributed.shard(self.cal_windows, "calibration")

    @property
    def local_val(self) -> torch.Tensor | None:
        return distributed.shard(self.val_windows, "validation")

    @property
    def local_eval(self) -> torch.Tensor | None:
        return distributed.shard(self.eval_windows, "evaluation")

    def shares(self) -> dict:
        """Windows per rank, by kind (for the report)."""
        n = distributed.size()
        kinds = {"calibration": self.cal_windows, "validation": self.val_windows, "evaluation": self.eval_windows}
        return {k: [b - a for a, b in (distributed.bounds(w.shape[0], n, r) for r in range(n))]
                for k, w in kinds.items() if w is not None}


def _load(request: CompressRequest, source: ModelSource, device, target) -> _Job:
    """Open the model for streaming, build the plan and the token windows."""
    config = request.config
    offline = offline_requested(request.offline)
    opened = open_model(source, config.dtype, device, offline)
    if opened.note:
        log.info(opened.note)
    model = opened.model
    saved = model_save_dtype(config.save_dtype, opened.stored_dtype)
    if target is not None:
        target.check_free_space(checkpoint_bytes(weight_specs(opened.driver, saved)))
    check_prunable(model, config.targets.include, config.activation is not None)
    plan = build_plan(model, config) if config.method else None
    act_targets = act_method = None
    if config.activation is not None:

        act_method = build_activation_method(config.activation.method, config.activation.options)
        act_targets = activation_targets(model, config.targets)
        if getattr(act_method, "transform", False):

            check_supported(model)  # fail before any walk, not after
    t = _tokens(config, opened.tokenizer, opened.config, offline)
    return _Job(opened, saved, plan, act_method, act_targets, t.cal_text, t.cal_windows, t.val_windows, t.eval_text,
                t.eval_windows, t.bos, t.tasks)


@dataclass
class _Tokens:
    """What a run reads besides the weights: the texts, their token windows, the BOS token every
    window starts with, and lm-eval's requests (a ``TaskRun``; None without tasks)."""

    cal_text: Text
    cal_windows: torch.Tensor
    val_windows: torch.Tensor | None
    eval_text: Text | None
    eval_windows: torch.Tensor | None
    bos: int | None
    tasks: object = None


def _tokens(config: RunConfig, tokenizer, model_config, offline: bool) -> _Tokens:
    """Read the calibration and evaluation texts and make the token windows and the task
    requests (with the tokenizer alone: a real run and ``--dry-run`` refuse the same texts)."""
    cal = config.calibration
    cal_text = calibration_text(cal, offline, tokenizer)
    bos = resolve_bos(tokenizer, config.bos)
    if bos is not None:
        log.info("every window starts with the BOS token (id %d), as this tokenizer does by default", bos)
    validating = config.owl is not None and (config.owl.m is None or config.owl.lam is None)
    n_val = config.owl.validation_windows if validating else 0
    cal_ids = calibration_ids(tokenizer, cal_text, cal.samples + n_val, cal.seqlen, bos)
    cal_windows = calibration_windows(cal_ids, cal.samples, cal.seqlen, cal.seed, bos)
    val_windows = None
    if validating:
        val_windows = validation_windows(cal_ids, cal.samples, config.owl.validation_windows, cal.seqlen, cal.seed, bos)
    ev = config.evaluation
    eval_text = eval_windows = None
    if ev.enabled:
        eval_text = evaluation_text(ev)
        eval_windows = evaluation_windows(evaluation_ids(tokenizer, eval_text, ev.windows, ev.seqlen, bos), ev.windows, ev.seqlen, bos)
    tasks = None
    if ev.enabled and ev.task_settings() is not None:

        tasks = TaskRun(ev.task_settings(), tokenizer, model_config, bos)  # lm-eval's requests, before any walk
    return _Tokens(cal_text, cal_windows, val_windows, eval_text, eval_windows, bos, tasks)


class _Progress:
    """One progress stage per walk, advanced per block."""

    def __init__(self, events: Events, driver: BlockDriver):
        self.events, self.n = events, driver.n_blocks

    @contextmanager
    def walk(self, name: str, walks: int = 1):
        self.events.stage(name, self.n * walks)
        yield lambda index: self.events.advance(name, 1, f"block {index + 1}/{self.n}")
        self.events.done(name)


@dataclass
class _Evaluation:
    """The evaluation stages of a run (dense and compressed perplexity and tasks) and the walks
    they ride along: ``pending`` the next walk over the dense weights, ``finishing`` the walk
    that makes the last change (after it). ``cached``: the dense results came from the baseline
    cache (:mod:`prune_cli.run.baseline`), so no dense stage rides along."""

    dense_eval: EvalStage | None = None
    compressed_eval: EvalStage | None = None
    dense_tasks: object = None
    tally: SparsityTally | None = None
    pending: list = field(default_factory=list)
    finishing: list = field(default_factory=list)
    baseline: object = None
    cached: dict | None = None


@dataclass
class _Output:
    """Where the run writes: the checkpoint writer (``None`` without ``--output``), the work
    folder (spilled activations, blocks kept between walks) and whether to remove it after."""

    writer: CheckpointWriter | None = None
    work: Path | None = None
    temporary_work: bool = False

    def work_folder(self) -> Path:
        if self.work is None:
            import tempfile

            self.work, self.temporary_work = Path(tempfile.mkdtemp(prefix="prune-cli-work-")), True
        return self.work


@dataclass
class _Pruned:
    """What the weight-pruning stage did: the final plan, OWL's allocation, one record per
    pruned Linear and per mixture-of-experts expert."""

    plan: Plan | None = None
    allocation: object = None
    layers: list = field(default_factory=list)
    experts: list = field(default_factory=list)


def _compress(request: CompressRequest, source: ModelSource, device, backend, backend_note, target, events) -> dict:
    """One compress run as a sequence of named stages, each a function of what the earlier ones
    made: load -> plan the evaluation -> prepare the output -> prune (weights) -> activation
    sparsity -> evaluate -> report -> gate -> export.

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
    timings = Timings()
    started = time.perf_counter()
    job = _stage_load(request, source, device, target, events, timings)
    if backend_note:
        log.info(backend_note)
    progress = _Progress(events, job.driver)
    evaluation = _stage_plan_evaluation(request, source, job, device, target)
    output = _stage_prepare_output(request, source, job, device, backend, target, timings)
    pruned = _stage_prune(request.config, job, backend, evaluation, output, progress, timings)
    activation_report = None
    if request.config.activation is not None:
        activation_report = _activation_walks(job.driver, request.config, job, backend, evaluation.pending,
                                              evaluation.finishing, output.writer, progress, timings)
    dense_ppl, compressed_ppl = _stage_evaluate(job, evaluation, activation_report)
    report = _stage_report(request.config, source, job, device, backend, pruned, activation_report, evaluation,
                           dense_ppl, compressed_ppl, timings)
    report["gates"] = _stage_gate(request.config, report)
    if output.temporary_work or (target is None and output.work is not None):
        import shutil

        shutil.rmtree(output.work, ignore_errors=True)
    return _stage_export(report, job, output, target, events, timings, started)


def _stage_load(request: CompressRequest, source: ModelSource, device, target, events, timings: Timings) -> _Job:
    """Load: the model opened for streaming, the plan, the token windows, the task requests."""
    events.stage("load")
    with _timed(timings, "load"):
        job = _load(request, source, device, target)
    events.done("load")
    return job


def _stage_plan_evaluation(request: CompressRequest, source: ModelSource, job: _Job, device, target) -> _Evaluation:
    """The evaluation stages and the walks they ride along; dense results from the baseline
    cache when it holds them (not for a resumed run: its walks must match the interrupted one's)."""
    config, ev = request.config, request.config.evaluation
    rounding = needs_rounding(job.save_dtype, job.opened.compute_dtype)
    head_dtype = job.save_dtype if rounding else None
    out = _Evaluation(tally=SparsityTally() if config.activation is not None else None)
    if job.eval_windows is not None:
        out.dense_eval = EvalStage(job.local_eval, ev.batch_size, check_finite=True)
        out.compressed_eval = EvalStage(job.local_eval, ev.batch_size, tally=out.tally, head_dtype=head_dtype)
    out.pending = [out.dense_eval] if out.dense_eval else []
    out.finishing = ([RoundStage(job.save_dtype)] if rounding else []) + ([out.compressed_eval] if out.compressed_eval else [])
    if job.tasks is not None:
        out.dense_tasks = job.tasks.dense_stage()
        out.pending.append(out.dense_tasks)
        out.finishing.append(job.tasks.compressed_stage(head_dtype))
    out.baseline = None if target is not None and target.adopted else _dense_baseline(request, source, job, device)
    out.cached = out.baseline.load() if out.baseline is not None else None
    if out.cached is not None:  # the dense numbers of an earlier run with the same model, tokens and settings
        log.info("dense baseline from the cache (%s)", out.baseline.path)
        if out.dense_eval is not None:
            out.dense_eval.result = Perplexity(*out.cached["ppl"])
        if out.dense_tasks is not None:
            out.dense_tasks.answers = [tuple(a) for a in out.cached["answers"]]
        out.pending = []
    return out


def _stage_prepare_output(request: CompressRequest, source: ModelSource, job: _Job, device, backend, target,
                          timings: Timings) -> _Output:
    """The resume state, the checkpoint writer (everything outside the blocks written now), and
    the spill folder for calibration activations beyond ``--max-memory``."""
    driver = job.driver
    out = _Output()
    spill_to = _plan_memory(request, job, target)
    if target is not None and not distributed.active():
        resume = ResumeState(target.staging, run_fingerprint(source, request.config, job, device, backend),
                             request.checkpoint_interval)
        if target.adopted and not resume.load():
            raise CheckpointError(f"{target.staging} holds no resume state", hint="pass --no-resume to start over")
        driver.resume = resume
    if target is not None:
        out.writer = CheckpointWriter(target.staging, driver, job.save_dtype, resume=target.adopted)
        with _timed(timings, "export"):
            out.writer.write_head()
        out.work = target.staging / WORK_FOLDER
    if spill_to is not None:
        import shutil

        work = out.work_folder()
        shutil.rmtree(work / "activations", ignore_errors=True)  # an interrupted run's (its resume state links what it needs)
        driver.spill_folder = work / "activations"
    return out


def _stage_prune(config: RunConfig, job: _Job, backend, evaluation: _Evaluation, output: _Output, progress: _Progress,
                 timings: Timings) -> _Pruned:
    """Weight pruning: OWL's walks when asked for, then the pruning walk (with the stages that
    ride along it); a streamed model's pruned blocks kept for the activation walks."""
    driver, cal = job.driver, config.calibration
    out = _Pruned(plan=job.plan)
    if config.owl is not None:
        with progress.walk("allocation", walks=2 if job.val_windows is not None else 1) as step:
            out.plan, out.allocation = allocate_owl(
                driver, out.plan, config.owl, job.local_cal, job.local_val, cal.batch_size, driver.device,
                config.pattern.target_sparsity, also=evaluation.pending, moe=config.moe, progress=step, timings=timings,
            )
        evaluation.pending = []
        out.plan = with_overrides(out.plan, config.overrides)
    if out.plan is None:
        return out
    last = config.activation is None
    pruning = PruneStage(out.plan, job.local_cal, cal.batch_size, backend, moe=config.moe)
    after, scratch = [], None
    if last and output.writer is not None:
        after = [output.writer.write_block]
    elif not last and driver.streamed:
        scratch = ScratchBlocks(output.work_folder() / "blocks", driver)
        after = [scratch.write_block]
    with progress.walk("calibration") as step:
        driver.walk([*evaluation.pending, pruning, *(evaluation.finishing if last else [])], after_block=after,
                    progress=step, timings=timings)
    evaluation.pending = []
    out.layers, out.experts = pruning.records, pruning.experts
    if scratch is not None:
        driver.weights = scratch.source(driver.weights)
    return out


def _stage_evaluate(job: _Job, evaluation: _Evaluation, activation_report: dict | None):
    """The dense and compressed perplexities the walks measured (the dense ones stored in the
    baseline cache); a non-finite dense loss is an error (its activations overflow)."""
    dense_ppl = evaluation.dense_eval.result if evaluation.dense_eval else None
    compressed_ppl = evaluation.compressed_eval.result if evaluation.compressed_eval else None
    if evaluation.baseline is not None and evaluation.cached is None:
        evaluation.baseline.store(dense_ppl, evaluation.dense_tasks.answers if evaluation.dense_tasks is not None else None)
    if dense_ppl is not None:
        _check_dense_loss(dense_ppl, DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype, "float32"))
    if activation_report is not None and evaluation.tally is not None and compressed_ppl is not None:
        _add_achieved(activation_report, evaluation.tally)
    return dense_ppl, compressed_ppl


def _stage_report(config: RunConfig, source: ModelSource, job: _Job, device, backend, pruned: _Pruned,
                  activation_report: dict | None, evaluation: _Evaluation, dense_ppl, compressed_ppl,
                  timings: Timings) -> dict:
    """The report (prune_cli/schemas/sparsity-report.v1.schema.json), gates not yet checked."""
    cal, driver, layers, cached = config.calibration, job.driver, pruned.layers, evaluation.cached
    report = {
        "format": "prune-cli/sparsity-report",
        "format_version": 1,
        "schema_version": REPORT_SCHEMA_VERSION,  # prune_cli/schemas/sparsity-report.v1.schema.json
        "model": source.describe(),
        "model_source": source.to_dict(),
        "method": config.method or config.activation.method,
        "pattern": config.pattern.describe() if config.pattern else f"activation {config.activation.allocation}",
        "sparsity": overall_sparsity(layers) if pruned.plan is not None else activation_report.get("achieved_sparsity"),
        "target_sparsity": config.pattern.target_sparsity if config.pattern else config.activation.sparsity,
        "weight_sparsity": overall_sparsity(layers) if pruned.plan is not None else 0.0,
        "ppl": _ppl_dict(dense_ppl, compressed_ppl),
        "recipe": config.to_recipe(),
        "method_options": config.method_options,
        "allocation": pruned.allocation.to_dict() if pruned.allocation else None,
        "activation": activation_report,
        "calibration": {
            "source": job.cal_text.source,
            "text_sha256": job.cal_text.sha256,
            "windows": list(job.cal_windows.shape),
            "seed": cal.seed,
            "bos": job.bos is not None,
            "chat_template": cal.chat_template,
            "tokens_sha256": fingerprint(job.cal_windows),
        },
        "evaluation": None
        if job.eval_windows is None
        else {
            "source": job.eval_text.source,
            "text_sha256": job.eval_text.sha256,
            "windows": list(job.eval_windows.shape),
            "bos": job.bos is not None,
            "tokens_sha256": fingerprint(job.eval_windows),
            "dense": dense_ppl.to_dict() if dense_ppl else None,
            "compressed": compressed_ppl.to_dict() if compressed_ppl else None,
            "dense_cached": cached is not None,
        },
        "device": str(device),
        "dtype": DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype, str(job.opened.compute_dtype)),
        "save_dtype": DTYPE_NAMES_BY_DTYPE.get(job.save_dtype, str(job.save_dtype)),
        "streamed": driver.streamed,
        "backend": backend.name,
        "layers": [r.to_dict() for r in layers],
        "masks_sha256": masks_digest(layers),
        "experts": _experts_report(pruned.experts, config.moe),
        "timings": timings.values,
        "versions": versions(),
        "resumed": driver.resume.resumed_from if driver.resume is not None else None,
        "world_size": distributed.size(),
        "rank_windows": job.shares() if distributed.active() else None,
        "output": None,
    }
    report["tasks"] = job.tasks.report() if job.tasks is not None else None
    if report["tasks"] is not None:
        report["tasks"]["baseline_cached"] = cached is not None
    return report


def _stage_gate(config: RunConfig, report: dict) -> list[dict] | None:
    """The quality gates' results (:mod:`prune_cli.core.gates`); a failed one exits 3 in the CLI."""
    return config.gates.check(report["ppl"], report["tasks"]) if config.gates.active else None


def _stage_export(report: dict, job: _Job, output: _Output, target, events, timings: Timings, started: float) -> dict:
    """Export: config, tokenizer and report written, the staging folder moved into place. The
    written report is the one returned (and printed by --json): its timings end before the
    config, tokenizer and report files are written and the folder is moved into place."""
    if target is None:
        timings.add("total", time.perf_counter() - started)
        report["timings"] = dict(timings.values)
        return report
    events.stage("export")
    report["output"] = str(target.output)
    timings.add("total", time.perf_counter() - started)
    report["timings"] = dict(timings.values)
    output.writer.finish(job.opened.tokenizer, report)
    target.commit()
    events.done("export")
    log.info("wrote %s", target.output)
    return report


def _activation_walks(driver: BlockDriver, config: RunConfig, job: _Job, backend, pending, finishing, writer,
                      progress: _Progress, timings: Timings) -> dict:
    """Calibrate and install the activation sparsifiers of ``job.act_method`` on the (pruned)
    model: a dense evaluation not yet done gets a walk of its own first (it must see the blocks
    before WINA's transform), then the greedy allocation's walks if asked for, then the
    calibration walk, which carries the compressed evaluation and the export. The transform is
    applied to each block as it is read (streamed) or once to the whole model (in memory)."""

    act, cal = config.activation, config.calibration
    method = job.act_method
    if pending:
        with progress.walk("eval dense") as step:
            driver.walk(pending, progress=step, timings=timings)
    prepare = None
    if getattr(method, "transform", False):

        if driver.streamed:
            prepare = lambda index, block: transform_block(block, driver.name(index))  # noqa: E731
        else:
            apply_transform(driver.model, rotations_for(driver.model))
    if act.allocation == "greedy":
        with progress.walk("activation allocation", walks=3) as step:
            sparsity, _ = allocate(
                driver, job.act_targets, method, act.allocation, act.sparsity, job.cal_windows, cal.batch_size,
                driver.device, act.max_tokens, cal.seed, prepare=prepare, timings=timings, progress=step,
            )
    else:
        sparsity, _ = allocate(driver, job.act_targets, method, act.allocation, act.sparsity, job.cal_windows,
                               cal.batch_size, driver.device, act.max_tokens, cal.seed)
    stage = ActivationStage(job.act_targets, method, sparsity, job.cal_windows, cal.batch_size, act.max_tokens, cal.seed, backend)
    with progress.walk("activation") as step:
        driver.walk([stage, *finishing], after_block=[writer.write_block] if writer is not None else [], progress=step,
                    prepare=prepare, timings=timings)
    return {**act.to_dict(), "target_sparsity": act.sparsity, "tokens": "all", "layers": stage.ordered_records()}


def _plan_memory(request: CompressRequest, job: "_Job", target) -> bool | None:
    """Whether the job's calibration activations go to disk: their estimate (every stream of
    hidden states the walks keep) against ``--max-memory`` (default: a share of the machine's or
    cgroup's memory). Returns True to spill, None to keep them in memory; says which."""

    config, driver = request.config, job.driver
    text = driver.model.config.get_text_config() if hasattr(driver.model.config, "get_text_config") else driver.model.config
    cal, ev = config.calibration, config.evaluation
    streams = {
        "calibration": cal.samples * cal.seqlen,
        "evaluation": 2 * ev.windows * ev.seqlen if job.eval_windows is not None else 0,
        "OWL candidates": 0 if job.val_windows is None else
        len(config.owl.m_grid) * len(config.owl.lambda_grid) * job.val_windows.numel(),
        "fisher inputs": 8 * cal.seqlen if config.activation is not None and config.activation.allocation == "greedy" else 0,
    }
    element = torch.empty((), dtype=job.opened.compute_dtype).element_size()
    sizes = memory.activation_bytes(text.hidden_size, element, driver.n_blocks, streams)
    total = sum(sizes.values())
    budget = memory.parse_size(request.max_memory) if request.max_memory else int(memory.memory_limit() * memory.DEFAULT_FRACTION)
    detail = ", ".join(f"{k} {memory.human(v)}" for k, v in sizes.items())
    if total <= budget:
        log.debug("calibration activations %s (%s) fit in --max-memory %s", memory.human(total), detail, memory.human(budget))
        return None
    log.info("calibration activations need about %s (%s), more than --max-memory %s: they are kept on disk",
             memory.human(total), detail, memory.human(budget))
    return True


def _model_files(source: ModelSource) -> dict[str, str]:
    """Digest (:func:`file_digest`: identity, and content when small) of each file the model is
    read from: its ``config.json`` and the weight files a load reads (the index and its shards,
    or ``model.safetensors`` alone, as :func:`model_weight_files` picks them), or its GGUF file;
    ``{}`` for a hub id (its files are not known without the network)."""

    folder = local_folder(source, offline=True) if source.kind != "hub" else None
    if folder is None:
        return {}
    if source.gguf_file:
        names = [source.gguf_file]
    else:
        chosen = model_weight_files(Path(folder))
        names = sorted({"config.json", *(p.name for p in chosen.files), *([chosen.index.name] if chosen.index else [])})
    return {name: file_digest(Path(folder) / name) for name in names}


def _dense_baseline(request: CompressRequest, source: ModelSource, job: "_Job", device):
    """The cache entry of this run's dense scores (:mod:`prune_cli.run.baseline`), or ``None`` when
    there is nothing to cache or the cache is off."""

    if not request.baseline_cache or not baseline.enabled() or distributed.requested():
        return None
    if job.eval_windows is None and job.tasks is None:
        return None
    files = _model_files(source)
    if not files:
        return None
    parts = {
        "model": {**source.to_dict(), "files": files},
        "evaluation_tokens": None if job.eval_windows is None else fingerprint(job.eval_windows),
        "evaluation_batch_size": request.config.evaluation.batch_size,
        "tasks": None if job.tasks is None else job.tasks.fingerprint(),
        "dtype": DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype),
        "device": device.type,
        "versions": {k: v for k, v in versions().items() if k != "python"},
    }
    return baseline.DenseBaseline(baseline.baseline_key(parts), parts)


def run_fingerprint(source: ModelSource, config: RunConfig, job: "_Job", device, backend) -> dict:
    """What a resumed run must share with the interrupted one: the model's files, the resolved
    recipe, the token windows, devices, dtypes and versions."""
    return {
        "model": {**source.to_dict(), "files": _model_files(source)},
        "recipe": config.to_recipe(),
        "calibration_tokens": fingerprint(job.cal_windows),
        "bos": job.bos,
        "evaluation_tokens": None if job.eval_windows is None else fingerprint(job.eval_windows),
        "device": str(device),
        "backend": backend.name,
        "dtype": DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype),
        "save_dtype": DTYPE_NAMES_BY_DTYPE.get(job.save_dtype),
        "versions": {k: v for k, v in versions().items() if k != "python"},
    }


def _check_dense_loss(dense: Perplexity, dtype: str) -> None:
    """The dense model's loss on the evaluation windows must be finite (its weights are): a NaN
    or inf here means its activations overflow in ``dtype``, and every later number would be
    garbage. A compressed model's diverged perplexity, by contrast, is a result (reported as
    null and flagged in JSON)."""
    import math

    if not math.isfinite(dense.nll):
        raise NonFiniteError(
            f"the dense model's loss on the evaluation text is {dense.nll} in {dtype}: its activations overflow",
            hint="rerun with --dtype float32" if dtype != "float32" else "check the model's weights and config",
        )


def _add_achieved(report: dict, tally: SparsityTally) -> None:
    """Achieved sparsity on the held-out tokens (parameter-weighted over the wrapped Linears)."""
    report["achieved_sparsity"] = tally.overall("compute")
    report["achieved_input_sparsity"] = tally.overall("input")
    per_layer = tally.per_layer()
    for record in report["layers"]:
        record.update({f"achieved_{k}": round(v, 6) for k, v in per_layer.get(record["name"], {}).items()})


def _experts_report(experts: list, options) -> dict | None:
    """How each expert of a mixture-of-experts model was calibrated (:mod:`prune_cli.model.moe`);
    ``None`` for a model without routed experts."""
    if not experts:
        return None
    fell_back = [e for e in experts if e.calibration != "routed"]
    if fell_back:
        log.info("%d of %d experts had fewer than %d routed calibration tokens: calibrated by %s",
                 len(fell_back), len(experts), options.min_tokens, options.fallback)
    return {**options.to_dict(), "fallbacks": len(fell_back), "per_expert": [e.to_dict() for e in experts]}


def _zero_fractions(prefix: str, block) -> list[LayerRecord]:
    records = []
    for local, linear in block_linears(block).items():
        w = linear.weight.data
        zeros = float((w == 0).sum()) / w.numel()
        records.append(LayerRecord(f"{prefix}.{local}", tuple(w.shape), "-", "measured", 0.0, zeros))
    return records


def measure_checkpoint_sparsity(model) -> list[LayerRecord]:
    """Zero fractions of the Linears inside the decoder blocks of a loaded model."""
    blocks = decoder_blocks(model)
    return [r for index, block in enumerate(blocks.modules) for r in _zero_fractions(f"{blocks.path}.{index}", block)]


def _recorded_dtype(saved: dict | None, requested: str) -> str:
    """``--dtype auto`` on a prune-cli checkpoint computes in the dtype its compress run measured
    the compressed perplexity in (``sparsity.json``'s ``dtype``), so that ``eval`` gives the
    report's number: a bfloat16 export of a float32 run would otherwise be computed in bfloat16
    on a CPU or GPU with fast bfloat16 kernels, and score differently."""
    recorded = (saved or {}).get("dtype")
    if requested != "auto" or recorded not in ("float32", "bfloat16", "float16"):
        return requested
    log.info("computing in %s, as the compress run that wrote this checkpoint did (--dtype to change)", recorded)
    return recorded


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
    with _timed(timings, "load"):
        if source.kind == "folder":

            check_checkpoint_folder(source.location)  # damaged or missing files: one line, not a crash
            if (Path(source.location) / REPORT_FILE).is_file():
                import json

                try:
                    saved = json.loads((Path(source.location) / REPORT_FILE).read_text())
                except json.JSONDecodeError:
                    raise CheckpointError(f"{REPORT_FILE} in {source.location} is not valid JSON") from None
        dtype = _recorded_dtype(saved, dtype)
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
        if ev.task_settings() is not None:
            from dataclasses import replace as _replace


            tasks = TaskRun(_replace(ev.task_settings(), batch_size=task_batch_size), opened.tokenizer, opened.config, bos)

    tally = SparsityTally()
    stages = []
    stage = None
    if windows is not None:
        stage = EvalStage(windows, ev.batch_size, tally=tally)
        stages.append(stage)
    if tasks is not None:
        stages.append(tasks.stage("results", tally=None if stage is not None else tally))
    layers: list[LayerRecord] = []
    progress = _Progress(events, driver)
    with progress.walk("eval") as step:
        driver.walk(stages, after_block=[lambda i, block: layers.extend(_zero_fractions(driver.name(i), block))],
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
        "evaluation": None if windows is None else {
            "source": text.source, "text_sha256": text.sha256, "windows": list(windows.shape),
            "bos": bos is not None, "tokens_sha256": fingerprint(windows)},
        "tasks": tasks.report() if tasks is not None else None,
        "recorded": None if saved is None else {"method": saved.get("method"), "pattern": saved.get("pattern"), "ppl": saved.get("ppl")},
        "device": str(device),
        "dtype": DTYPE_NAMES_BY_DTYPE.get(opened.compute_dtype, str(opened.compute_dtype)),
        "timings": timings.values,
        "versions": versions(),
    }
