"""Layer-wise pruning, a stage of the block walk: per block, collect the statistics the methods
need from the block's calibration inputs, prune its planned Linears (weights replaced in place),
check every mask against its pattern, then push the calibration batches through the pruned
block, so the next block's statistics come from the pruned model's activations (as in Wanda's
and SparseGPT's reference code)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from prune_cli.calibrators import layerwise
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.records import LayerRecord, tensor_sha256
from prune_cli.methods.magnitude import Magnitude
from prune_cli.methods.permutation import block_folds, fold_into_producers, layout_for, text_config
from prune_cli.model.moe import ExpertRecord, MoeOptions, complete_expert_stats, routed_experts
from prune_cli.model.structure import block_linears
from prune_cli.recipe.plan import LayerPlan, Plan
from prune_cli.streaming.driver import BlockDriver, HiddenStage, as_driver

log = logging.getLogger(__name__)


def check_mask(mask: torch.Tensor, pattern, name: str) -> None:
    """Verify an N:M mask exactly (per group) and an unstructured one per matrix."""
    out_features, in_features = mask.shape
    if isinstance(pattern, NM):
        kept = mask.reshape(out_features, in_features // pattern.m, pattern.m).sum(-1)
        if not bool((kept == pattern.n_keep).all()):
            raise RuntimeError(f"{name}: mask violates {pattern.describe()}")
    elif isinstance(pattern, Unstructured):
        pruned = mask.numel() - int(mask.sum())
        expected = pattern.sparsity * mask.numel()
        if abs(pruned - expected) > out_features + 1:
            raise RuntimeError(f"{name}: pruned {pruned} weights, expected about {expected:.0f}")


def _may_permute(lp: LayerPlan) -> bool:
    return lp.method.permutes_inputs and isinstance(lp.pattern, NM)


def _permuted(diagnostics: dict | None) -> bool:
    """Whether a layer's diagnostics say its input channels were permuted (also under DSnoT's ``base``)."""
    diagnostics = diagnostics or {}
    return bool(diagnostics.get("inputs_permuted") or (diagnostics.get("base") or {}).get("inputs_permuted"))


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
        for lp, result in zip(group, method.prune_group(jobs, backend), strict=False):
            results[lp.local_name] = result
    return results


class PruneStage(HiddenStage):
    """Prune every block by ``plan`` on the calibration ``windows`` (see the module docstring).

    ``finalize(block)`` runs after a block is pruned and before its outputs are propagated (the
    export's rounding to the save dtype, so the next block is calibrated on what is shipped).
    :attr:`records` holds one :class:`LayerRecord` per pruned Linear."""

    timing_key = "calibration"

    def __init__(self, plan: Plan, windows: torch.Tensor, batch_size: int, backend=None,
                 finalize: Callable[[nn.Module], None] | None = None, moe: MoeOptions = MoeOptions()):
        super().__init__(windows, batch_size)
        self.plan = plan
        self.backend = backend
        self.finalize = finalize
        self.moe = moe
        self.records: list[LayerRecord] = []
        self.experts: list[ExpertRecord] = []  # mixture-of-experts blocks: how each expert was calibrated

    def begin(self, driver: BlockDriver) -> None:
        super().begin(driver)
        self.model_config = text_config(driver.model)
        if any(_may_permute(lp) for lp in self.plan.layers) and layout_for(self.model_config) is None:
            log.info("input-channel permutation not folded for model type %s (layout not verified): "
                     "N:M groups are chosen in the stored channel order",
                     getattr(self.model_config, "model_type", "unknown"))

    def _offer_permutations(self, layer_plans: list[LayerPlan], linears: dict, stats: dict) -> dict:
        """The block's folds (:mod:`prune_cli.methods.permutation`) for the N:M Linears whose method may
        reorder input channels; their (unshared) input statistics get the fold's channel groups."""
        wanted = {lp.local_name for lp in layer_plans if _may_permute(lp)}
        if not wanted:
            return {}
        folds = {c: f for c, f in block_folds(linears, self.model_config).items() if c in wanted}
        for consumer, fold in folds.items():
            if consumer in stats and len(stats[consumer].consumers) <= 1:
                stats[consumer].channel_groups = fold.groups
        return folds

    @torch.no_grad()
    def on_block(self, index: int, block: nn.Module) -> None:
        name = self.driver.name(index)
        layer_plans = self.plan.for_block(index)
        if layer_plans:
            linears = block_linears(block)
            wanted = {lp.local_name: lp.method.required_stats for lp in layer_plans}
            stats = layerwise.collect_input_stats(block, self.batches, linears, wanted, backend=self.backend, name=name)
            if routed_experts(block):  # experts with too few routed tokens follow the fallback rule
                stats, by_magnitude, experts = complete_expert_stats(
                    block, self.batches, linears, wanted, stats, self.moe, name, self.backend)
                self.experts.extend(experts)
                layer_plans = [replace(lp, method=Magnitude()) if lp.local_name in by_magnitude else lp
                               for lp in layer_plans]
            folds = self._offer_permutations(layer_plans, linears, stats)
            results = _prune_block(layer_plans, linears, stats, self.backend)
            del stats
            fold_into_producers(folds, results, linears)  # producers' rows follow permuted inputs
            for lp in layer_plans:
                linear = linears[lp.local_name]
                result = results.pop(lp.local_name)
                check_mask(result.mask, lp.pattern, lp.name)
                linear.weight.data.copy_(result.weight)
                zeros = float(linear.weight.numel() - torch.count_nonzero(linear.weight.data)) / linear.weight.numel()
                self.records.append(
                    LayerRecord(lp.name, (lp.out_features, lp.in_features), lp.method.name, lp.pattern.describe(),
                                lp.pattern.target_sparsity, zeros, tensor_sha256(result.mask), tensor_sha256(linear.weight),
                                result.info)
                )
        if self.finalize is not None:
            self.finalize(block)
        if index + 1 < self.driver.n_blocks:
            layerwise.propagate(block, self.batches, name=name)

    def finish(self, driver: BlockDriver) -> None:
        super().finish(driver)
        permuted = [r.name for r in self.records if _permuted(r.diagnostics)]
        if permuted:
            log.info("input channels permuted in %d Linears (rows of their producers reordered to match; "
                     "each layer's report diagnostics say which): %s ... %s", len(permuted), permuted[0], permuted[-1])

    def extra_state(self) -> dict:
        return {"records": [[r.name, list(r.shape), r.method, r.pattern, r.target_sparsity, r.achieved_sparsity,
                             r.mask_sha256, r.weight_sha256, r.diagnostics] for r in self.records],
                "experts": [[e.name, e.routed_tokens, e.calibration] for e in self.experts]}

    def load_extra_state(self, state: dict) -> None:
        self.records = [LayerRecord(n, tuple(shape), *rest) for n, shape, *rest in state["records"]]
        self.experts = [ExpertRecord(*e) for e in state.get("experts", [])]


@torch.no_grad()
def calibrate_and_prune(
    model, plan: Plan, windows: torch.Tensor, batch_size: int, device: torch.device, events=None, backend=None,
) -> CalibrationResult:
    """Prune ``model`` (a model in memory, or a :class:`~prune_cli.streaming.driver.BlockDriver`) by
    ``plan``, block by block; the weights are replaced in place."""
    driver = as_driver(model, device)
    stage = PruneStage(plan, windows, batch_size, backend)
    progress = None
    if events is not None:
        events.stage("calibration", driver.n_blocks)
        progress = lambda i: events.advance("calibration", 1, f"block {i + 1}/{driver.n_blocks}")  # noqa: E731
    driver.walk([stage], progress=progress)
    if events is not None:
        events.done("calibration")
    return CalibrationResult(stage.records)
