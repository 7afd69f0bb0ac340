"""The compress and eval pipelines (library API; no printing, no typer/rich).

compress: config -> load -> plan -> windows -> dense ppl -> layer-wise calibrate & prune
          -> compressed ppl -> report -> atomic export.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from prune_cli.calibrators import layerwise
from prune_cli.allocation import allocate_owl, with_overrides
from prune_cli.calibrators.sampling import (
    calibration_windows,
    evaluation_windows,
    fingerprint,
    tokenize,
    validation_windows,
)
from prune_cli.calibrators.sources import Text, bundled_text, text_from_dataset, text_from_files
from prune_cli.config import CalibrationConfig, EvaluationConfig, RunConfig
from prune_cli.errors import BadInputError, CheckpointError, NonFiniteError
from prune_cli.finite import check_finite_parameters
from prune_cli.evaluate import Perplexity, perplexity
from prune_cli.export import checkpoint_bytes, write_checkpoint
from prune_cli.model_io import (
    ModelSource,
    block_linears,
    decoder_blocks,
    load_config,
    load_model,
    meta_model,
    offline_requested,
    resolve_source,
)
from prune_cli.output import REPORT_FILE, OutputTarget, output_path, preflight
from prune_cli.patterns import NM, Unstructured
from prune_cli.plan import LayerPlan, Plan, build_plan
from prune_cli.report import LayerRecord, Timings, overall_sparsity, versions

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


def calibration_text(cal: CalibrationConfig, offline: bool) -> Text:
    if cal.text:
        return text_from_files(list(cal.text), cal.column)
    if cal.dataset:
        return text_from_dataset(cal.dataset, cal.split, cal.column, offline)
    return bundled_text("calibration")


def evaluation_text(ev: EvaluationConfig) -> Text:
    return text_from_files(list(ev.text)) if ev.text else bundled_text("evaluation")


def check_mask(mask: torch.Tensor, pattern, name: str) -> None:
    """Verify an N:M mask exactly (per group) and an unstructured one per matrix."""
    out_features, in_features = mask.shape
    if isinstance(pattern, NM):
        kept = mask.reshape(out_features, in_features // pattern.m, pattern.m).sum(-1)
        if not bool((kept == pattern.n_keep).all()):
            raise RuntimeError(f"{name}: mask violates {pattern.describe()}")
    elif isinstance(pattern, Unstructured):
        pruned = int((~mask).sum())
        expected = pattern.sparsity * mask.numel()
        if abs(pruned - expected) > out_features + 1:
            raise RuntimeError(f"{name}: pruned {pruned} weights, expected about {expected:.0f}")


@dataclass
class CalibrationResult:
    layers: list[LayerRecord]


def _prune_block(layer_plans: list[LayerPlan], linears: dict, stats: dict, backend) -> dict:
    """Prune a block's planned Linears, handing those with the same method over together
    (:meth:`WeightMethod.prune_group`); results by local name."""
    by_method: dict[int, tuple] = {}  # by identity: options may hold dicts (unhashable)
    for lp in layer_plans:
        by_method.setdefault(id(lp.method), (lp.method, []))[1].append(lp)
    results = {}
    for method, group in by_method.values():
        jobs = [(linears[lp.local_name].weight.data, stats.get(lp.local_name), lp.pattern) for lp in group]
        for lp, result in zip(group, method.prune_group(jobs, backend)):
            results[lp.local_name] = result
    return results


@torch.no_grad()
def calibrate_and_prune(
    model, plan: Plan, windows: torch.Tensor, batch_size: int, device: torch.device, events: Events | None = None,
    backend=None,
) -> CalibrationResult:
    """Layer-wise: per block, collect the statistics the method needs, prune the planned
    Linears (weights replaced in place), then propagate the pruned block's outputs."""
    events = events or Events()
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows, batch_size, device)
    records: list[LayerRecord] = []
    events.stage("calibration", len(blocks))
    for index, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        layer_plans: list[LayerPlan] = plan.for_block(index)
        if layer_plans:
            linears = block_linears(block)
            wanted = {lp.local_name: lp.method.required_stats for lp in layer_plans}
            stats = layerwise.collect_input_stats(block, batches, linears, wanted, backend=backend)
            results = _prune_block(layer_plans, linears, stats, backend)
            for lp in layer_plans:
                linear = linears[lp.local_name]
                result = results[lp.local_name]
                check_mask(result.mask, lp.pattern, lp.name)
                linear.weight.data.copy_(result.weight)
                zeros = float((linear.weight.data == 0).sum()) / linear.weight.numel()
                records.append(
                    LayerRecord(
                        lp.name, (lp.out_features, lp.in_features), lp.method.name, lp.pattern.describe(),
                        lp.pattern.target_sparsity, zeros,
                    )
                )
            del stats
        if index + 1 < len(blocks):
            layerwise.propagate(block, batches, name=f"{decoder_blocks(model).path}.{index}")
        block.to(home)
        events.advance("calibration", 1, f"block {index + 1}/{len(blocks)}")
    events.done("calibration")
    return CalibrationResult(records)


@dataclass
class CompressRequest:
    config: RunConfig
    model: str | None  # MODEL argument (None = bundled default)
    output: Path | None
    overwrite: bool = False
    offline: bool = False


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
    a real run would make first: window lengths against the model's context, and --output
    (exists without --overwrite, not ours to replace, locked by a live run, not writable)."""
    source = resolve_source(request.model)
    offline = offline_requested(request.offline)
    config = request.config
    check_context(load_config(source, offline), _window_lengths(config))
    if request.output is not None:
        preflight(output_path(request.output), request.overwrite)
    model = meta_model(source, request.config.dtype, offline)
    out: dict = {"model": source.describe(), "method": config.method, "method_options": config.method_options, "layers": []}
    if config.method:
        plan = build_plan(model, config)
        out.update(blocks=f"{plan.blocks_path} x{plan.n_blocks}", target_params=plan.target_params, layers=plan.rows())
    if config.activation:
        from prune_cli.activation.calibrate import activation_targets

        targets = activation_targets(model, config.targets.selects)
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


def _ppl_dict(dense: Perplexity | None, compressed: Perplexity | None) -> dict:
    out: dict = {"dense": dense.ppl if dense else None, "compressed": compressed.ppl if compressed else None}
    if dense and compressed:
        out["ratio"] = compressed.ppl / dense.ppl
    return out


def compress(request: CompressRequest, events: Events | None = None) -> dict:
    """Run the whole compress job; returns the report (also written as sparsity.json).

    Everything that can be checked cheaply is checked before the output folder is claimed
    (device, backend, model source, window lengths against the model's context); the output is
    then claimed for the whole run (:class:`~prune_cli.output.OutputTarget`: lock, staging
    folder), so a second run or an unwritable folder fails in the first seconds."""
    events = events or Events()
    config = request.config
    offline = offline_requested(request.offline)
    device = resolve_device(config.device)
    from prune_cli.gpu.backend import resolve_backend

    source: ModelSource = resolve_source(request.model)
    backend, backend_note = resolve_backend(config.backend, device)  # an explicit cupy fails here, early
    check_context(load_config(source, offline), _window_lengths(config))
    if request.output is None:
        return _compress(request, source, device, backend, backend_note, None, events)
    with OutputTarget(request.output, request.overwrite) as target:
        return _compress(request, source, device, backend, backend_note, target, events)


def _compress(request: CompressRequest, source: ModelSource, device, backend, backend_note, target, events) -> dict:
    config = request.config
    offline = offline_requested(request.offline)
    timings = Timings()
    started = time.perf_counter()

    events.stage("load")
    with _timed(timings, "load"):
        model, tokenizer = load_model(source, config.dtype, offline)
        if target is not None:
            target.check_free_space(checkpoint_bytes(model))
        plan = build_plan(model, config) if config.method else None
        act_targets = act_method = None
        if config.activation is not None:
            from prune_cli.activation import build_activation_method
            from prune_cli.activation.calibrate import activation_targets

            act_method = build_activation_method(config.activation.method, config.activation.options)
            act_targets = activation_targets(model, config.targets.selects)
            if getattr(act_method, "transform", False):
                from prune_cli.activation.transform import check_supported

                check_supported(model)  # fail before the dense evaluation, not after
        cal = config.calibration
        cal_text = calibration_text(cal, offline)
        cal_ids = tokenize(tokenizer, cal_text.text)
        cal_windows = calibration_windows(cal_ids, cal.samples, cal.seqlen, cal.seed)
        val_windows = None
        if config.owl is not None and (config.owl.m is None or config.owl.lam is None):
            val_windows = validation_windows(cal_ids, cal.samples, config.owl.validation_windows, cal.seqlen, cal.seed)
        ev = config.evaluation
        eval_windows = None
        if ev.enabled:
            eval_text = evaluation_text(ev)
            eval_windows = evaluation_windows(tokenize(tokenizer, eval_text.text), ev.windows, ev.seqlen)
    events.done("load")

    dense_ppl = compressed_ppl = None
    if eval_windows is not None:
        events.stage("eval dense", eval_windows.shape[0])
        with _timed(timings, "eval"):
            dense_ppl = perplexity(model, eval_windows, ev.batch_size, device, lambda n: events.advance("eval dense", n))
        events.done("eval dense")
        _check_dense_loss(dense_ppl, config.dtype)

    allocation = None
    if config.owl is not None:
        events.stage("allocation")
        with _timed(timings, "allocation"):
            plan, allocation = allocate_owl(
                model, plan, config.owl, cal_windows, val_windows, cal.batch_size, device, config.pattern.target_sparsity
            )
            plan = with_overrides(plan, config.overrides)
        events.done("allocation")

    layers: list[LayerRecord] = []
    if backend_note:
        log.info(backend_note)
    if plan is not None:
        with _timed(timings, "calibration"):
            layers = calibrate_and_prune(model, plan, cal_windows, cal.batch_size, device, events, backend).layers

    activation_report = None
    if config.activation is not None:
        activation_report = _activation_stage(
            model, config, act_method, act_targets, cal_windows, cal, device, timings, events, backend
        )

    if eval_windows is not None:
        from prune_cli.activation.modules import count_sparsity

        events.stage("eval compressed", eval_windows.shape[0])
        with _timed(timings, "eval"), count_sparsity(model) as counted:
            compressed_ppl = perplexity(model, eval_windows, ev.batch_size, device, lambda n: events.advance("eval compressed", n))
        events.done("eval compressed")
        if activation_report is not None:
            _add_achieved(activation_report, counted)

    report = {
        "format": "prune-cli/sparsity-report",
        "format_version": 1,
        "model": source.describe(),
        "model_source": source.to_dict(),
        "method": config.method or config.activation.method,
        "pattern": config.pattern.describe() if config.pattern else f"activation {config.activation.allocation}",
        "sparsity": overall_sparsity(layers) if plan is not None else activation_report.get("achieved_sparsity"),
        "target_sparsity": config.pattern.target_sparsity if config.pattern else config.activation.sparsity,
        "weight_sparsity": overall_sparsity(layers) if plan is not None else 0.0,
        "ppl": _ppl_dict(dense_ppl, compressed_ppl),
        "recipe": config.to_recipe(),
        "method_options": config.method_options,
        "allocation": allocation.to_dict() if allocation else None,
        "activation": activation_report,
        "calibration": {
            "source": cal_text.source,
            "text_sha256": cal_text.sha256,
            "windows": list(cal_windows.shape),
            "seed": cal.seed,
            "tokens_sha256": fingerprint(cal_windows),
        },
        "evaluation": None
        if eval_windows is None
        else {
            "source": eval_text.source,
            "text_sha256": eval_text.sha256,
            "windows": list(eval_windows.shape),
            "tokens_sha256": fingerprint(eval_windows),
            "dense": dense_ppl.to_dict() if dense_ppl else None,
            "compressed": compressed_ppl.to_dict() if compressed_ppl else None,
        },
        "device": str(device),
        "dtype": config.dtype,
        "backend": backend.name,
        "layers": [r.to_dict() for r in layers],
        "timings": timings.values,
        "versions": versions(),
        "output": None,
    }
    if target is not None:
        events.stage("export")
        with _timed(timings, "export"):
            report["output"] = str(target.output)
            report["timings"] = dict(timings.values)  # export itself is not yet timed here
            check_finite_parameters(model, hint="a pruning or activation stage produced it; please report it")
            _export(model, tokenizer, target.staging, report)
            target.commit()
        events.done("export")
        log.info("wrote %s", target.output)
    timings.add("total", time.perf_counter() - started)
    report["timings"] = timings.values
    return report


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


def _activation_stage(
    model, config: RunConfig, method, targets, cal_windows, cal, device, timings, events, backend=None
) -> dict:
    """Calibrate and install the activation sparsifiers of ``method`` (built from
    ``config.activation``) on the pruned model, if a weight method ran; ``backend`` computes the
    thresholds."""
    from prune_cli.activation.calibrate import allocate, calibrate_activation

    act = config.activation
    with _timed(timings, "activation"):
        if getattr(method, "transform", False):
            from prune_cli.activation.transform import apply_transform, rotations_for

            apply_transform(model, rotations_for(model))
        sparsity, _ = allocate(
            model, targets, method, act.allocation, act.sparsity, cal_windows, cal.batch_size, device, act.max_tokens, cal.seed
        )
        records = calibrate_activation(
            model, targets, method, sparsity, cal_windows, cal.batch_size, device, act.max_tokens, cal.seed, events,
            backend=backend,
        )
    return {**act.to_dict(), "target_sparsity": act.sparsity, "tokens": "all", "layers": records}


def _add_achieved(report: dict, counted) -> None:
    """Achieved sparsity on the held-out tokens (parameter-weighted over the wrapped Linears)."""
    report["achieved_sparsity"] = counted.overall("compute")
    report["achieved_input_sparsity"] = counted.overall("input")
    per_layer = counted.per_layer()
    for record in report["layers"]:
        record.update({f"achieved_{k}": round(v, 6) for k, v in per_layer.get(record["name"], {}).items()})


def _export(model, tokenizer, folder: Path, report: dict) -> None:
    """Write the checkpoint into the staging ``folder``, the activation sparsifiers' buffers
    beside the plain weights."""
    from prune_cli.activation.modules import rewrap_all, unwrap_all
    from prune_cli.runtime import save_activation

    from prune_cli.activation.transform import plain_norms

    wrappers = unwrap_all(model)
    try:
        with plain_norms(model) as rotations:
            extra = (lambda folder: save_activation(wrappers, folder, rotations)) if wrappers else None
            write_checkpoint(model, tokenizer, folder, report, extra)
    finally:
        rewrap_all(model, wrappers)


def measure_checkpoint_sparsity(model) -> list[LayerRecord]:
    """Zero fractions of the Linears inside the decoder blocks of a loaded model."""
    blocks = decoder_blocks(model)
    records = []
    for index, block in enumerate(blocks.modules):
        for local, linear in block_linears(block).items():
            w = linear.weight.data
            zeros = float((w == 0).sum()) / w.numel()
            records.append(LayerRecord(f"{blocks.path}.{index}.{local}", tuple(w.shape), "-", "measured", 0.0, zeros))
    return records


def evaluate_checkpoint(
    checkpoint: str | None, ev: EvaluationConfig, device_name: str = "auto", dtype: str = "float32",
    offline: bool = False, events: Events | None = None,
) -> dict:
    """Perplexity and measured sparsity of any checkpoint (folder, .gguf, hub id, bundled)."""
    events = events or Events()
    timings = Timings()
    device = resolve_device(device_name)
    source = resolve_source(checkpoint)
    offline = offline_requested(offline)
    check_context(load_config(source, offline), {"--eval-seqlen": ev.seqlen})
    with _timed(timings, "load"):
        if source.kind == "folder":
            from prune_cli.finite import check_finite_parameters
            from prune_cli.model_io import DTYPES
            from prune_cli.runtime import load as load_checkpoint

            model, tokenizer = load_checkpoint(source.location, DTYPES[dtype])
            check_finite_parameters(model)
        else:
            model, tokenizer = load_model(source, dtype, offline_requested(offline))
        text = evaluation_text(ev)
        windows = evaluation_windows(tokenize(tokenizer, text.text), ev.windows, ev.seqlen)
    from prune_cli.activation.modules import count_sparsity

    events.stage("eval", windows.shape[0])
    with _timed(timings, "eval"), count_sparsity(model) as counted:
        ppl = perplexity(model, windows, ev.batch_size, device, lambda n: events.advance("eval", n))
    events.done("eval")
    layers = measure_checkpoint_sparsity(model)
    saved = None
    if source.kind == "folder" and (Path(source.location) / REPORT_FILE).is_file():
        import json

        try:
            saved = json.loads((Path(source.location) / REPORT_FILE).read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{REPORT_FILE} in {source.location} is not valid JSON") from None
    return {
        "format": "prune-cli/eval-report",
        "format_version": 1,
        "model": source.describe(),
        "ppl": ppl.ppl,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "sparsity": overall_sparsity(layers),
        "activation_sparsity": counted.overall("compute") if counted.modules else None,
        "evaluation": {"source": text.source, "text_sha256": text.sha256, "windows": list(windows.shape), "tokens_sha256": fingerprint(windows)},
        "recorded": None if saved is None else {"method": saved.get("method"), "pattern": saved.get("pattern"), "ppl": saved.get("ppl")},
        "device": str(device),
        "timings": timings.values,
        "versions": versions(),
    }
