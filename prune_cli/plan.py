"""The plan: which Linear modules get pruned, by which method, with which pattern."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prune_cli.config import RunConfig
from prune_cli.errors import RecipeError
from prune_cli.methods import WeightMethod, build_method
from prune_cli.model_io import Blocks, block_linears, decoder_blocks
from prune_cli.moe import router_names
from prune_cli.patterns import SparsityPattern


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


def build_plan(model: nn.Module, config: RunConfig) -> Plan:
    """Select the target Linears inside the decoder blocks and check the pattern fits each."""
    blocks: Blocks = decoder_blocks(model)
    method = build_method(config.method, config.method_options)
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
    from prune_cli.allocation import with_overrides

    return with_overrides(plan, config.overrides)
