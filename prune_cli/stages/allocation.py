"""Per-layer sparsity: OWL allocation and per-layer overrides.

OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"): for block ``b`` let ``D`` be the
Wanda scores ``|W_ij| * ||X_j||`` of all its targeted Linears (dense model, dense inputs). Its
outlier ratio is ``r_b = #{D > M * mean(D)} / #D``. Ratios are min-max scaled to ``[0, 2 lambda]``,
``r'_b = 2 lambda (r_b - min r) / (max r - min r)``, and the block keeps the density
``d_b = r'_b - mean_P(r') + (1 - s)``, where ``mean_P`` is the mean weighted by each block's
targeted parameter count, so the parameter-weighted mean sparsity equals the target ``s``
exactly. Blocks with more outliers are pruned less.

``M`` and ``lambda`` are options (the paper: M = 5, lambda = 0.08 at 70%). By default both are
chosen on a validation slice of the calibration text (windows disjoint from the calibration
windows): each candidate's one-shot Wanda masks (from the dense statistics of the pre-pass)
are applied and the validation perplexity measured; ``lambda = 0`` (uniform) is always a
candidate, so the choice is never worse than uniform on that slice (for that proxy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from prune_cli.calibrators import layerwise
from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core import distributed
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.methods import select
from prune_cli.model.moe import MoeOptions, complete_expert_stats, routed_experts
from prune_cli.model.structure import block_linears
from prune_cli.recipe.config import OwlSettings
from prune_cli.recipe.plan import Plan
from prune_cli.stages.evaluate import Perplexity, head_nll
from prune_cli.streaming.driver import HiddenStage, Stage, as_driver, restore_hidden

log = logging.getLogger(__name__)


def owl_sparsities(ratios: torch.Tensor, params: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    """Per-block sparsity, ``(n_blocks,)`` float64, parameter-weighted mean exactly ``target``."""
    ratios = ratios.double()
    weights = params.double() / params.double().sum()
    span = float(ratios.max() - ratios.min())
    scaled = torch.zeros_like(ratios) if span == 0 or lam == 0 else (ratios - ratios.min()) / span * (2 * lam)
    density = scaled - (weights * scaled).sum() + (1 - target)
    sparsity = 1 - density
    if bool((sparsity < 0).any() or (sparsity >= 1).any()):
        raise RecipeError(
            f"OWL lambda {lam} spreads sparsity {target} outside [0, 1)",
            hint="lower --owl-lambda or the target sparsity",
        )
    return sparsity


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of entries of all ``scores`` above ``m`` times their common mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


@dataclass
class Allocation:
    """Result of an OWL allocation (for the report)."""

    m: float
    lam: float
    ratios: list[float]
    sparsities: list[float]
    chosen_by: str  # "options" or "validation"
    grid: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "method": "owl", "m": self.m, "lambda": self.lam, "chosen_by": self.chosen_by,
            "outlier_ratios": [round(r, 6) for r in self.ratios],
            "block_sparsity": [round(s, 6) for s in self.sparsities], "grid": self.grid,
        }


def with_block_sparsities(plan: Plan, sparsities: list[float]) -> Plan:
    layers = tuple(replace(lp, pattern=Unstructured(float(sparsities[lp.block]))) for lp in plan.layers)
    return replace(plan, layers=layers)


class OwlScoresStage(HiddenStage):
    """OWL's dense pre-pass: per block, the Wanda scores ``|W_ij| * ||X_j||`` of its targeted
    Linears and their outlier ratio for every ``M`` in ``ms``. Only the input norms are kept
    (``in_features`` floats per Linear), so the scores can be recomputed per block later."""

    timing_key = "allocation"

    def __init__(self, plan: Plan, windows: torch.Tensor, batch_size: int, ms: tuple[float, ...],
                 moe: MoeOptions = MoeOptions()):
        super().__init__(windows, batch_size)
        self.plan, self.ms, self.moe = plan, ms, moe
        self.norms: list[dict[str, torch.Tensor]] = []
        self.ratios: dict[float, list[float]] = {m: [] for m in ms}

    def on_block(self, index: int, block) -> None:
        linears = block_linears(block)
        wanted = {lp.local_name: frozenset({Stat.SQ_NORM}) for lp in self.plan.for_block(index)}
        name = self.driver.name(index)
        if not routed_experts(block):
            stats: dict[str, InputStats] = layerwise.collect_input_stats(
                block, self.batches, linears, wanted, update_hidden=True, name=name)
            norms = {n: stats[n].norm for n in wanted}
        else:  # experts: routed-token norms, or the fallback's (on the block's inputs, before propagating)
            stats = layerwise.collect_input_stats(block, self.batches, linears, wanted, name=name)
            stats, by_magnitude, _ = complete_expert_stats(block, self.batches, linears, wanted, stats, self.moe, name)
            norms = {n: torch.ones(linears[n].in_features) if n in by_magnitude else stats[n].norm for n in wanted}
            layerwise.propagate(block, self.batches, name=name)
        scores = block_scores(linears, norms)
        self.norms.append({n: norm.cpu() for n, norm in norms.items()})
        for m in self.ms:
            self.ratios[m].append(outlier_ratio(list(scores.values()), m) if scores else 0.0)

    def extra_state(self) -> dict:
        return {"norms": self.norms, "ratios": self.ratios}

    def load_extra_state(self, state: dict) -> None:
        self.norms, self.ratios = state["norms"], state["ratios"]


def block_scores(linears: dict, norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wanda scores ``|W| * ||X||`` (fp32) of the Linears named in ``norms``."""
    return {name: linears[name].weight.float().abs() * norm.to(linears[name].weight.device) for name, norm in norms.items()}


class OwlCandidatesStage(Stage):
    """Validation perplexity of every candidate allocation (per-block sparsities) in one walk:
    each candidate's one-shot Wanda masks (from the dense pre-pass' norms) are applied to the
    block in turn and its own copy of the validation windows pushed through; the block's dense
    weights are put back after. :attr:`ppl` after the walk, in candidate order."""

    timing_key = "allocation"

    def __init__(self, plan: Plan, norms: list[dict[str, torch.Tensor]], candidates: list[torch.Tensor],
                 validation: torch.Tensor, batch_size: int = 4):
        self.plan, self.norms, self.candidates = plan, norms, candidates
        self.validation, self.batch_size = validation, batch_size
        self.ppl: list[float] = []
        self.streams: list[list] = []

    def begin(self, driver) -> None:
        self.driver = driver
        first = driver.capture(self.validation, self.batch_size)
        self.streams = [first] + [[b.copy() for b in first] for _ in self.candidates[1:]]

    @torch.no_grad()
    def on_block(self, index: int, block) -> None:
        linears = block_linears(block)
        mine = self.plan.for_block(index)
        dense = {lp.local_name: linears[lp.local_name].weight.detach().clone() for lp in mine}
        scores = block_scores(linears, self.norms[index])
        try:
            for sparsities, stream in zip(self.candidates, self.streams, strict=False):
                for layer in mine:
                    weight = linears[layer.local_name].weight
                    keep = select(scores[layer.local_name], Unstructured(float(sparsities[layer.block])))
                    weight.data.copy_(dense[layer.local_name] * keep.to(weight.dtype))
                layerwise.propagate(block, stream, name=self.driver.name(index), check=False)
        finally:
            for layer in mine:
                linears[layer.local_name].weight.data.copy_(dense[layer.local_name])

    def finish(self, driver) -> None:

        with driver.head_on_device(), torch.no_grad():
            for stream in self.streams:
                total, tokens = 0.0, 0
                for k, start in enumerate(range(0, self.validation.shape[0], self.batch_size)):
                    ids = self.validation[start : start + self.batch_size].to(driver.device)
                    nll, n = head_nll(driver, stream[k].hidden, ids)
                    total, tokens = total + nll, tokens + n

                total, tokens = distributed.sum_numbers(total, tokens)
                self.ppl.append(Perplexity.from_sums(total, int(tokens)).ppl)
        self.streams = []

    def state_dict(self) -> dict:
        return {"streams": [[b.held() for b in stream] for stream in self.streams], "ppl": self.ppl}

    def load_state_dict(self, state: dict) -> None:
        for stream, hidden in zip(self.streams, state["streams"], strict=False):
            restore_hidden(stream, hidden)
        self.ppl = state["ppl"]


def _block_params(plan: Plan) -> torch.Tensor:
    params = torch.zeros(plan.n_blocks, dtype=torch.float64)
    for layer in plan.layers:
        params[layer.block] += layer.params
    return params


@torch.no_grad()
def allocate_owl(
    model, plan: Plan, settings: OwlSettings, windows: torch.Tensor, validation: torch.Tensor | None,
    batch_size: int, device, target: float, also: Sequence[Stage] = (), moe: MoeOptions = MoeOptions(), **walk,
) -> tuple[Plan, Allocation]:
    """Per-block sparsities by OWL; ``M`` / ``lambda`` from ``settings`` or the validation slice.
    ``model``: a model in memory or a :class:`~prune_cli.streaming.driver.BlockDriver` (two walks: the
    dense pre-pass, then all candidates at once). ``also``: stages that ride along the dense
    pre-pass (the dense evaluation); ``walk``: options of both walks (progress, timings)."""
    if any(isinstance(lp.pattern, NM) for lp in plan.layers):
        raise RecipeError("OWL allocates unstructured sparsity; it cannot be combined with an N:M pattern")
    driver = as_driver(model, device)
    ms = (settings.m,) if settings.m is not None else settings.m_grid
    lams = (settings.lam,) if settings.lam is not None else settings.lambda_grid
    scores = OwlScoresStage(plan, windows, batch_size, ms, moe)
    driver.walk([*also, scores], **walk)
    params = _block_params(plan)
    ratios = {m: torch.tensor(scores.ratios[m]) for m in ms}
    if len(ms) == 1 and len(lams) == 1:
        m, lam = ms[0], lams[0]
        sparsities = owl_sparsities(ratios[m], params, target, lam)
        return with_block_sparsities(plan, sparsities.tolist()), Allocation(m, lam, ratios[m].tolist(), sparsities.tolist(), "options")
    if validation is None:
        raise RecipeError("OWL needs validation windows to choose M and lambda", hint="set --owl-m and --owl-lambda")

    candidates: list[tuple[float, float, torch.Tensor]] = []
    for m in ms:
        for lam in lams:
            if lam == 0 and any(c[1] == 0 for c in candidates):
                continue  # uniform does not depend on M
            try:
                candidates.append((m, lam, owl_sparsities(ratios[m], params, target, lam)))
            except RecipeError:
                continue
    evaluated = OwlCandidatesStage(plan, scores.norms, [c[2] for c in candidates], validation)
    driver.walk([evaluated], **walk)
    grid: list[dict] = []
    best = None
    for (m, lam, sparsities), ppl in zip(candidates, evaluated.ppl, strict=False):
        grid.append({"m": m, "lambda": lam, "validation_ppl": ppl})
        log.info("OWL M=%s lambda=%s: validation ppl %.3f", m, lam, ppl)
        if best is None or ppl < best[0] or (math.isclose(ppl, best[0]) and lam < best[2]):
            best = (ppl, m, lam, sparsities)
    assert best is not None
    _, m, lam, sparsities = best
    allocation = Allocation(m, lam, ratios[m].tolist(), sparsities.tolist(), "validation", grid)
    return with_block_sparsities(plan, sparsities.tolist()), allocation
