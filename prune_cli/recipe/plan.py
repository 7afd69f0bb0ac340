"""The plan: which Linear modules get pruned, by which method, with which pattern."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import SparsityPattern, Unstructured
from prune_cli.methods import WeightMethod, build_method
from prune_cli.model.moe import router_names
from prune_cli.model.structure import Blocks, as_blocks, block_linears
from prune_cli.recipe.config import Override, RunConfig


@dataclass(frozen=True)
class LayerPlan:
    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    block: int
    local_name: str  # relative to the block, e.g. self_attn.q_proj
    in_features: int
    out_features: int
    pattern: SparsityPattern
    method: WeightMethod

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Plan:
    method: WeightMethod
    blocks_path: str
    n_blocks: int
    layers: tuple[LayerPlan, ...]

    def for_block(self, index: int) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.block == index]

    @property
    def target_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def rows(self) -> list[dict]:
        return [
            {
                "module": layer.name,
                "shape": [layer.out_features, layer.in_features],
                "method": layer.method.name,
                "pattern": layer.pattern.describe(),
                "sparsity": round(layer.pattern.target_sparsity, 6),
            }
            for layer in self.layers
        ]


def build_plan(model: nn.Module | Blocks, config: RunConfig) -> Plan:
    """Select the target Linears inside the decoder blocks (``model``'s, or the driver's
    :class:`Blocks`) and check the pattern fits each."""
    blocks = as_blocks(model)
    method = build_method(config.method, config.method_options)
    config.targets.check_selections(linear_names(blocks))
    layers = []
    for index, block in enumerate(blocks.modules):
        routers = router_names(block)  # MoE routers stay dense
        for local, linear in block_linears(block).items():
            full = f"{blocks.path}.{index}.{local}"
            if local in routers or not config.targets.selects(full):
                continue
            config.pattern.check_fits(linear.in_features, full)
            layers.append(
                LayerPlan(
                    full, index, local, linear.in_features, linear.out_features, config.pattern, method.for_layer(local)
                )
            )
    if not layers:
        raise RecipeError("the targets select no Linear module", hint="check targets.include / targets.exclude")
    plan = Plan(method, blocks.path, len(blocks), tuple(layers))
    check_overrides(config.overrides, plan)

    return with_overrides(plan, config.overrides)


def linear_names(blocks: Blocks) -> list[str]:
    """The full names of every Linear inside the decoder blocks (what target patterns search)."""
    return [f"{blocks.path}.{index}.{local}" for index, block in enumerate(blocks.modules) for local in block_linears(block)]


def check_overrides(overrides: tuple[Override, ...], plan: Plan) -> None:
    """Every override entry must select: its ``blocks`` must exist and, with its ``match``,
    apply to at least one targeted Linear. An entry that selects nothing (block 40 of a
    30-block model, a misspelt ``match``, a Linear the targets leave out) would otherwise be
    dropped without a word, and those Linears pruned at the run's sparsity."""
    for i, override in enumerate(overrides):
        missing = [b for b in override.blocks if b >= plan.n_blocks]
        if missing:
            raise RecipeError(f"overrides[{i}].blocks: the model has no block {missing[0]} "
                              f"(its {plan.n_blocks} blocks are 0-{plan.n_blocks - 1})")
        if not any(override.applies(layer.block, layer.name) for layer in plan.layers):
            hint = None if override.match is None else \
                f"match is a regular expression searched in the targeted Linears' full names, such as {plan.layers[0].name!r}"
            raise RecipeError(f"overrides[{i}] ({_describe(override)}) selects no targeted Linear module", hint=hint)


def _describe(override: Override) -> str:
    """``blocks [0, 1], match 'mlp'``: how an override entry selects."""
    parts = ([f"blocks {list(override.blocks)}"] if override.blocks else []) + \
        ([f"match {override.match!r}"] if override.match is not None else [])
    return ", ".join(parts)


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
