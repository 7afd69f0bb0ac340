"""``compress --dry-run``: the plan without loading weights, after the checks a real run makes
before its first block."""

from __future__ import annotations

import logging

import torch

from prune_cli.activation import build_activation_method
from prune_cli.activation.transform import check_supported
from prune_cli.checkpoint.output import output_path, preflight, resumable_staging
from prune_cli.checkpoint.resume import FORMAT_VERSION, ResumeState
from prune_cli.core import distributed
from prune_cli.gpu.backend import Backend, resolve_backend
from prune_cli.model.source import ModelSource, offline_requested, resolve_source
from prune_cli.model.structure import check_prunable, decoder_blocks
from prune_cli.recipe.plan import build_plan
from prune_cli.run.claim import check_data_parallel
from prune_cli.run.fingerprint import run_fingerprint
from prune_cli.run.inputs import check_context, read_tokens, resolve_device, window_lengths
from prune_cli.run.job import CompressRequest, load_job
from prune_cli.run.memory_plan import predicted_peak
from prune_cli.stages.activation import activation_targets
from prune_cli.streaming.loader import compute_dtype, load_config, load_tokenizer, meta_model

log = logging.getLogger(__name__)


def dry_run(request: CompressRequest) -> dict:
    """The plan without loading weights (structure built on the meta device), after the checks
    a real run makes before its first block: the device and backend, window lengths against the
    model's context, the launcher's limits, --output (exists without --overwrite, not ours to
    replace, locked by a live run, not writable), the model's structure (prunable, WINA's
    transform), the calibration and evaluation texts and their windows, the task requests, and
    with ``--resume`` that the interrupted run's state matches this command
    (:func:`check_resumable`)."""
    source = resolve_source(request.model)
    offline = offline_requested(request.offline)
    config = request.config
    device = resolve_device(config.device)

    backend, _ = resolve_backend(config.backend, device)
    hf_config = load_config(source, offline)
    check_context(hf_config, window_lengths(config))
    if distributed.requested():
        check_data_parallel(request, hf_config)
    if request.output is not None:
        preflight(output_path(request.output), request.overwrite)
    model = meta_model(source, request.config.dtype, offline)
    check_prunable(model, config.targets.include, config.activation is not None)
    blocks = decoder_blocks(model)  # found once: the plan, the targets and the summary read it
    if config.activation is not None:
        if build_activation_method(config.activation.method, config.activation.options).transforms_model:
            check_supported(model)
    if not check_resumable(request, source, device, backend):
        tokens = read_tokens(config, load_tokenizer(source, offline), hf_config, offline)
        if tokens.tasks is not None:
            tokens.tasks.suite.close()
    out: dict = {"model": source.describe(), "method": config.method, "method_options": config.method_options, "layers": []}
    if config.method:
        plan = build_plan(blocks, config)
        out.update(blocks=f"{plan.blocks_path} x{plan.n_blocks}", target_params=plan.target_params, layers=plan.rows())
    if config.activation:
        targets = activation_targets(blocks, config.targets)
        out["activation"] = config.activation.to_dict()
        out.setdefault("blocks", f"{blocks.path} x{len(blocks)}")
        out.setdefault("target_params", sum(t.params for t in targets))
        out["layers"] += [
            {"module": t.name, "shape": list(model.get_submodule(t.name).weight.shape), "method": config.activation.method,
             "pattern": f"activation {config.activation.allocation}", "sparsity": config.activation.sparsity}
            for t in targets
        ]
    stored = _stored_dtype(hf_config) if source.kind not in ("gguf", "bundled") else None  # GGUF: dequantised to float32
    compute, _ = compute_dtype(config.dtype, stored, device)
    out["memory"] = predicted_peak(model, blocks, config, compute, stored, config.evaluation.enabled)
    return out


def _stored_dtype(hf_config) -> torch.dtype | None:
    """The checkpoint's dtype as its config declares it (``dtype`` / ``torch_dtype``), if any."""
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else None


def check_resumable(request: CompressRequest, source: ModelSource, device: torch.device, backend: Backend) -> bool:
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
    job = load_job(request, source, device, None)
    try:
        fingerprint = run_fingerprint("resume", source, request.config, job, device, backend)
    finally:
        job.close()
    saved = ResumeState.saved_progress(staging) or {}
    if saved.get("format_version") != FORMAT_VERSION or saved.get("fingerprint") != fingerprint:
        ResumeState(staging, fingerprint).load()  # raises ResumeMismatchError, saying what differs
    log.info("--resume would continue the interrupted run in %s", staging.name)
    return True
