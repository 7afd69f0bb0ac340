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
from dataclasses import dataclass, field, replace

import torch

from prune_cli.calibrators import layerwise
from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.config import Override, OwlSettings
from prune_cli.errors import RecipeError
from prune_cli.evaluate import perplexity
from prune_cli.methods import select
from prune_cli.model_io import block_linears, decoder_blocks
from prune_cli.patterns import NM, Unstructured
from prune_cli.plan import Plan

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
    layers = tuple(replace(l, pattern=Unstructured(float(sparsities[l.block]))) for l in plan.layers)
    return replace(plan, layers=layers)


def with_overrides(plan: Plan, overrides: tuple[Override, ...]) -> Plan:
    """Later overrides win over earlier ones and over OWL."""
    if not overrides:
        return plan
    layers = []
    for layer in plan.layers:
        for override in overrides:
            if override.applies(layer.block, layer.name):
                layer = replace(layer, pattern=Unstructured(override.sparsity))
        layers.append(layer)
    return replace(plan, layers=tuple(layers))


@torch.no_grad()
def dense_block_scores(model, plan: Plan, windows: torch.Tensor, batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """One dense layer-wise pass: the Wanda scores of every targeted Linear, per block."""
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows, batch_size, device)
    out = []
    for index, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        linears = block_linears(block)
        wanted = {l.local_name: frozenset({Stat.SQ_NORM}) for l in plan.for_block(index)}
        stats: dict[str, InputStats] = layerwise.collect_input_stats(block, batches, linears, wanted, update_hidden=True)
        out.append({
            name: linears[name].weight.float().abs() * stats[name].norm.to(linears[name].weight.device)
            for name in wanted
        })
        block.to(home)
    return out


def _block_params(plan: Plan) -> torch.Tensor:
    params = torch.zeros(plan.n_blocks, dtype=torch.float64)
    for layer in plan.layers:
        params[layer.block] += layer.params
    return params


@torch.no_grad()
def allocate_owl(
    model, plan: Plan, settings: OwlSettings, windows: torch.Tensor, validation: torch.Tensor | None,
    batch_size: int, device, target: float,
) -> tuple[Plan, Allocation]:
    """Per-block sparsities by OWL; ``M`` / ``lambda`` from ``settings`` or the validation slice."""
    if any(isinstance(l.pattern, NM) for l in plan.layers):
        raise RecipeError("OWL allocates unstructured sparsity; it cannot be combined with an N:M pattern")
    scores = dense_block_scores(model, plan, windows, batch_size, device)
    params = _block_params(plan)
    ms = (settings.m,) if settings.m is not None else settings.m_grid
    lams = (settings.lam,) if settings.lam is not None else settings.lambda_grid
    ratios = {m: torch.tensor([outlier_ratio(list(s.values()), m) if s else 0.0 for s in scores]) for m in ms}
    if len(ms) == 1 and len(lams) == 1:
        m, lam = ms[0], lams[0]
        sparsities = owl_sparsities(ratios[m], params, target, lam)
        return with_block_sparsities(plan, sparsities.tolist()), Allocation(m, lam, ratios[m].tolist(), sparsities.tolist(), "options")
    if validation is None:
        raise RecipeError("OWL needs validation windows to choose M and lambda", hint="set --owl-m and --owl-lambda")

    blocks = decoder_blocks(model).modules
    dense = {l.name: blocks[l.block].get_submodule(l.local_name).weight.detach().clone() for l in plan.layers}
    grid: list[dict] = []
    best = None
    try:
        for m in ms:
            for lam in lams:
                if lam == 0 and any(g["lambda"] == 0 for g in grid):
                    continue  # uniform does not depend on M
                try:
                    sparsities = owl_sparsities(ratios[m], params, target, lam)
                except RecipeError:
                    continue
                for layer in plan.layers:
                    weight = blocks[layer.block].get_submodule(layer.local_name).weight
                    keep = select(scores[layer.block][layer.local_name], Unstructured(float(sparsities[layer.block])))
                    weight.data.copy_(dense[layer.name] * keep.to(weight.dtype))
                ppl = perplexity(model, validation, batch_size=4, device=device).ppl
                grid.append({"m": m, "lambda": lam, "validation_ppl": ppl})
                log.info("OWL M=%s lambda=%s: validation ppl %.3f", m, lam, ppl)
                if best is None or ppl < best[0] or (math.isclose(ppl, best[0]) and lam < best[2]):
                    best = (ppl, m, lam, sparsities)
    finally:
        for layer in plan.layers:
            blocks[layer.block].get_submodule(layer.local_name).weight.data.copy_(dense[layer.name])
    assert best is not None
    _, m, lam, sparsities = best
    allocation = Allocation(m, lam, ratios[m].tolist(), sparsities.tolist(), "validation", grid)
    return with_block_sparsities(plan, sparsities.tolist()), allocation
