"""The compress report (``sparsity.json``, ``compress --json``; its schema is
``prune_cli/schemas/sparsity-report.v1.schema.json``), assembled section by section from what the
stages of a run made (:class:`ReportBuilder`). Key order is part of the output: the sections
come in the order the report has always listed them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

from prune_cli.activation.modules import SparsityTally
from prune_cli.calibrators.sampling import fingerprint as tokens_fingerprint
from prune_cli.core import distributed
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.records import REPORT_SCHEMA_VERSION, masks_digest, overall_sparsity, versions
from prune_cli.model.moe import ExpertRecord, MoeOptions
from prune_cli.run.state import Evaluation, Pruned, Run
from prune_cli.stages.evaluate import Perplexity

log = logging.getLogger(__name__)

T = TypeVar("T")


def _given(value: T | None) -> T:
    """``value``, which a valid recipe always has here (a run prunes weights, activations or both)."""
    if value is None:
        raise RuntimeError("a run without weight pruning must have activation sparsity")
    return value


def ppl_section(dense: Perplexity | None, compressed: Perplexity | None) -> dict:
    """``{"dense", "compressed"}`` perplexities, and their ``ratio`` when both were measured."""
    out: dict = {"dense": dense.ppl if dense else None, "compressed": compressed.ppl if compressed else None}
    if dense and compressed:
        out["ratio"] = compressed.ppl / dense.ppl
    return out


def experts_section(experts: list[ExpertRecord], options: MoeOptions) -> dict | None:
    """How each expert of a mixture-of-experts model was calibrated (:mod:`prune_cli.model.moe`);
    ``None`` for a model without routed experts."""
    if not experts:
        return None
    fell_back = [e for e in experts if e.calibration != "routed"]
    if fell_back:
        log.info("%d of %d experts had fewer than %d routed calibration tokens: calibrated by %s",
                 len(fell_back), len(experts), options.min_tokens, options.fallback)
    return {**options.to_dict(), "fallbacks": len(fell_back), "per_expert": [e.to_dict() for e in experts]}


def add_achieved(activation: dict, tally: SparsityTally) -> None:
    """Achieved activation sparsity on the held-out tokens (parameter-weighted over the wrapped
    Linears), into the report's ``activation`` section and its per-layer records."""
    activation["achieved_sparsity"] = tally.overall("compute")
    activation["achieved_input_sparsity"] = tally.overall("input")
    per_layer = tally.per_layer()
    for record in activation["layers"]:
        record.update({f"achieved_{k}": round(v, 6) for k, v in per_layer.get(record["name"], {}).items()})


@dataclass
class ReportBuilder:
    """The report of ``run`` from what its stages made: the weight pruning (``pruned``), the
    activation sparsity (``activation``, the report's section, or ``None``), the evaluation plan
    and the dense and compressed perplexities. :meth:`build` gives the whole report, gates not
    yet checked (the ``gates`` key is added after it)."""

    run: Run
    pruned: Pruned
    activation: dict | None
    evaluation: Evaluation
    dense: Perplexity | None
    compressed: Perplexity | None

    def build(self) -> dict:
        return {
            **self.identity(),
            **self.outcome(),
            **self.recipe(),
            **self.data(),
            **self.environment(),
            **self.layers(),
            **self.provenance(),
            **self.tasks(),
        }

    def identity(self) -> dict:
        """What this report is, and of which model."""
        source = self.run.source
        return {
            "format": "prune-cli/sparsity-report",
            "format_version": 1,
            "schema_version": REPORT_SCHEMA_VERSION,  # prune_cli/schemas/sparsity-report.v1.schema.json
            "model": source.describe(),
            "model_source": source.to_dict(),
        }

    def outcome(self) -> dict:
        """The method and pattern, the sparsity reached against the target, the perplexities."""
        config, pruned, layers = self.run.config, self.pruned, self.pruned.layers
        weights_pruned = pruned.plan is not None
        return {
            "method": config.method or _given(config.activation).method,
            "pattern": config.pattern.describe() if config.pattern else f"activation {_given(config.activation).allocation}",
            "sparsity": overall_sparsity(layers) if weights_pruned else _given(self.activation).get("achieved_sparsity"),
            "target_sparsity": config.pattern.target_sparsity if config.pattern else _given(config.activation).sparsity,
            "weight_sparsity": overall_sparsity(layers) if weights_pruned else 0.0,
            "ppl": ppl_section(self.dense, self.compressed),
        }

    def recipe(self) -> dict:
        """The resolved recipe, the method's options, OWL's allocation, the activation sparsity."""
        config = self.run.config
        return {
            "recipe": config.to_recipe(),
            "method_options": config.method_options,
            "allocation": self.pruned.allocation.to_dict() if self.pruned.allocation else None,
            "activation": self.activation,
        }

    def data(self) -> dict:
        """The calibration and evaluation texts and their token windows."""
        job, cal = self.run.job, self.run.config.calibration
        calibration = {
            "source": job.cal_text.source,
            "text_sha256": job.cal_text.sha256,
            "windows": list(job.cal_windows.shape),
            "seed": cal.seed,
            "bos": job.bos is not None,
            "chat_template": cal.chat_template,
            "tokens_sha256": tokens_fingerprint(job.cal_windows),
        }
        evaluation = None
        if job.eval_windows is not None and job.eval_text is not None:
            evaluation = {
                "source": job.eval_text.source,
                "text_sha256": job.eval_text.sha256,
                "windows": list(job.eval_windows.shape),
                "bos": job.bos is not None,
                "tokens_sha256": tokens_fingerprint(job.eval_windows),
                "dense": self.dense.to_dict() if self.dense else None,
                "compressed": self.compressed.to_dict() if self.compressed else None,
                "dense_cached": self.evaluation.cached is not None,
            }
        return {"calibration": calibration, "evaluation": evaluation}

    def environment(self) -> dict:
        """Where and how it ran: device, dtypes, streamed or whole, backend."""
        run, job = self.run, self.run.job
        compute = job.opened.compute_dtype
        return {
            "device": str(run.device),
            "dtype": DTYPE_NAMES_BY_DTYPE.get(compute, str(compute)),
            "save_dtype": DTYPE_NAMES_BY_DTYPE.get(job.save_dtype, str(job.save_dtype)),
            "streamed": job.driver.streamed,
            "backend": run.backend.name,
        }

    def layers(self) -> dict:
        """One record per pruned Linear, the hash of all masks, the experts' calibration."""
        layers = self.pruned.layers
        return {
            "layers": [r.to_dict() for r in layers],
            "masks_sha256": masks_digest(layers),
            "experts": experts_section(self.pruned.experts, self.run.config.moe),
        }

    def provenance(self) -> dict:
        """Timings, versions, the run resumed from, the processes, the output (set at export)."""
        run, job = self.run, self.run.job
        resume = job.driver.resume
        return {
            "timings": run.timings.values,
            "versions": versions(),
            "resumed": resume.resumed_from if resume is not None else None,
            "world_size": distributed.size(),
            "rank_windows": job.shares() if distributed.active() else None,
            "output": None,
        }

    def tasks(self) -> dict:
        """lm-eval's results, dense and compressed (``baseline_cached``: the dense ones from the cache)."""
        tasks = self.run.job.tasks.report() if self.run.job.tasks is not None else None
        if tasks is not None:
            tasks["baseline_cached"] = self.evaluation.cached is not None
        return {"tasks": tasks}
