"""Mixture-of-experts blocks: every expert pruned as the Linear layers it is, calibrated on the
tokens routed to it.

transformers (5.x) fuses a block's experts into two tensors (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, GLM-4-MoE and most others): ``gate_up_proj`` of shape ``(E, 2F, H)`` and
``down_proj`` of shape ``(E, H, F)``, and computes, for each token ``t`` routed to expert ``e``
with router weight ``r_te``::

    [g, u] = x_t @ gate_up_proj[e]^T          # (2F,) split in two halves
    y_t   += r_te * (act(g) * u) @ down_proj[e]^T

:func:`linearize_experts` replaces such a module, in the model structure, by
:class:`RoutedExperts`: the same two parameters under the same names (so reading, streaming,
rounding and exporting the checkpoint are unchanged), plus, per expert, two
:class:`ExpertLinear` views ``gate_up_proj[e]`` (``(2F, H)``) and ``down_proj[e]`` (``(H, F)``):
``nn.Linear`` modules whose weight *is* that expert's slice of the fused tensor (pruning one writes
into the fused tensor). Its forward is transformers' own, op for op, so a dense model computes
bit for bit what transformers computes, and a Linear's forward hook sees exactly the tokens the
router sent to that expert: Wanda's ``‖X_j‖`` and SparseGPT's ``XᵀX`` of an expert come from its
routed tokens, as each expert sees them in use.

An expert the router sends fewer than ``min_tokens`` calibration tokens has no usable statistics
(SparseGPT's Hessian of a handful of tokens is a low-rank guess; an expert that got none has
none). Its two Linears then follow the ``fallback`` rule, recorded per expert in the report
(:class:`ExpertRecord`):

* ``all-tokens`` (default): its statistics come from *every* calibration token, run through
  that expert alone for the statistics (the block's output still uses the routed tokens only);
  llm-compressor calibrates every expert this way (``moe_calibrate_all_experts``).
* ``magnitude``: pruned by ``|W|`` alone, with the same pattern and sparsity.

Only modules whose forward is transformers' standard fused-experts forward (compared by source,
:func:`is_standard_experts`) are linearized; any other module with 3-D weights (GPT-OSS's biased
and interleaved experts, Llama 4's transposed layout, DBRX) stays refused by
:func:`~prune_cli.streaming.loader.check_prunable`. Routers stay dense: a Linear that is a direct child
of the module holding the experts (Qwen2-MoE's ``shared_expert_gate``, older ``gate`` Linears) is
never a target (:func:`router_names`); Mixtral's router is not a Linear at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from prune_cli.calibrators import layerwise
from prune_cli.core.names import MOE_DEFAULT_FALLBACK, MOE_DEFAULT_MIN_TOKENS, MOE_FALLBACKS


@cache
def _standard_forward_source() -> str:

    return inspect.getsource(MixtralExperts.forward)


@cache
def _forward_source(cls: type) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


def is_standard_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds fused experts computed by transformers' standard forward (see
    the module docstring): 3-D ``gate_up_proj`` ``(E, 2F, H)`` and ``down_proj`` ``(E, H, F)``,
    no other parameters, and a forward whose source is ``MixtralExperts.forward``'s."""
    if isinstance(module, RoutedExperts) or isinstance(module, nn.Linear):
        return False
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"}:
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    experts, two_f, hidden = gate_up.shape
    if tuple(down.shape) != (experts, hidden, two_f // 2) or two_f % 2:
        return False
    if not hasattr(module, "act_fn") or getattr(module, "num_experts", experts) != experts:
        return False
    return _forward_source(type(module)) == _standard_forward_source()


class ExpertLinear(nn.Linear):
    """Expert ``index``'s slice of a fused tensor of :class:`RoutedExperts`, as an ``nn.Linear``
    without parameters of its own: ``weight`` is ``experts.<tensor>[index]`` (``(out, in)``), read
    anew on every access (so it follows the fused tensor when that is moved), and writing into
    it writes into the fused tensor. ``state_dict()`` holds nothing for it (the fused tensor
    is saved by its owner)."""

    def __init__(self, experts: RoutedExperts, tensor: str, index: int, out_features: int, in_features: int):
        nn.Module.__init__(self)  # not nn.Linear's: it would register a weight of its own
        self.in_features, self.out_features = in_features, out_features
        self.tensor, self.index = tensor, index
        object.__setattr__(self, "_experts", experts)  # the owner, not a submodule (no cycle in modules())
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._experts, self.tensor)[self.index]

    def extra_repr(self) -> str:
        return f"{self.tensor}[{self.index}]: in_features={self.in_features}, out_features={self.out_features}"


def expert_linear_name(tensor: str, index: int) -> str:
    """The module name of expert ``index``'s view of ``tensor`` inside :class:`RoutedExperts`."""
    return f"{tensor}[{index}]"


class RoutedExperts(nn.Module):
    """A fused-experts module (see the module docstring) with one :class:`ExpertLinear` per expert
    and fused tensor. ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))
    -> (T, H)`` is transformers' standard experts forward; experts in :attr:`all_tokens` are
    also run on every token (for their statistics; their output still counts routed tokens only)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused_type = type(fused).__name__
        self.num_experts = fused.gate_up_proj.shape[0]
        self.hidden_dim = fused.gate_up_proj.shape[2]
        self.intermediate_dim = fused.gate_up_proj.shape[1] // 2
        self.gate_up_proj = fused.gate_up_proj
        self.down_proj = fused.down_proj
        self.act_fn = fused.act_fn
        self.all_tokens: set[int] = set()
        for e in range(self.num_experts):
            self.add_module(expert_linear_name("gate_up_proj", e),
                            ExpertLinear(self, "gate_up_proj", e, 2 * self.intermediate_dim, self.hidden_dim))
            self.add_module(expert_linear_name("down_proj", e),
                            ExpertLinear(self, "down_proj", e, self.hidden_dim, self.intermediate_dim))

    def linear(self, tensor: str, index: int) -> nn.Module:
        """Expert ``index``'s view of ``tensor`` (or whatever replaced it, e.g. a wrapper)."""
        return self._modules[expert_linear_name(tensor, index)]

    def _expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear("gate_up_proj", index)(x).chunk(2, dim=-1)
        return self.linear("down_proj", index)(self.act_fn(gate) * up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        hit = {int(e) for e in expert_hit[:, 0].tolist()} - {self.num_experts}
        for expert_idx in range(self.num_experts):
            if expert_idx in self.all_tokens:  # statistics over every token, output over the routed ones
                everything = self._expert(expert_idx, hidden_states)
                if expert_idx not in hit:
                    continue
                top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
                current_hidden_states = everything[token_idx]
            elif expert_idx in hit:
                top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
                current_hidden_states = self._expert(expert_idx, hidden_states[token_idx])
            else:
                continue
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def linearize_experts(model: nn.Module) -> int:
    """Replace every standard fused-experts module of ``model`` by :class:`RoutedExperts` (the
    same parameter objects; meta stays meta). Returns how many were replaced."""
    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if is_standard_experts(child):
                setattr(owner, name, RoutedExperts(child))
                replaced += 1
    return replaced


def routed_experts(block: nn.Module) -> dict[str, RoutedExperts]:
    """The :class:`RoutedExperts` modules of ``block``, by name relative to it."""
    return {name: m for name, m in block.named_modules() if isinstance(m, RoutedExperts)}


def router_names(block: nn.Module) -> set[str]:
    """Linears of ``block`` that route tokens (direct Linear children of a module holding
    :class:`RoutedExperts`), by name relative to the block: never pruned."""
    out = set()
    for owner_name, owner in block.named_modules():
        if any(isinstance(c, RoutedExperts) for c in owner.children()):
            for name, child in owner.named_children():
                if isinstance(child, nn.Linear):
                    out.add(f"{owner_name}.{name}" if owner_name else name)
    return out


def expert_of(block: nn.Module, local: str) -> tuple[str, int] | None:
    """``(experts module name, expert index)`` when Linear ``local`` of ``block`` is an expert's
    view (:class:`ExpertLinear`), else ``None``."""
    owner_name, _, leaf = local.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    if not isinstance(owner, RoutedExperts):
        return None
    module = owner._modules.get(leaf)
    index = getattr(module, "index", None)
    return (owner_name, index) if isinstance(index, int) else None


@dataclass(frozen=True)
class ExpertRecord:
    """How one expert of one block was calibrated: ``routed_tokens`` (calibration tokens the
    router sent it, summed over the windows) and ``calibration``: ``routed``, ``all-tokens`` or
    ``magnitude``."""

    name: str  # e.g. model.layers.3.mlp.experts[5]
    routed_tokens: int
    calibration: str

    def to_dict(self) -> dict:
        return {"name": self.name, "routed_tokens": self.routed_tokens, "calibration": self.calibration}


def complete_expert_stats(block: nn.Module, batches, linears: dict, wanted: dict, stats: dict, options: MoeOptions,
                          block_name: str, backend=None) -> tuple[dict, set[str], list[ExpertRecord]]:
    """Apply the fallback rule to the experts of ``block`` whose Linears in ``wanted`` saw fewer
    than ``options.min_tokens`` tokens in ``stats`` (from
    :func:`~prune_cli.calibrators.layerwise.collect_input_stats`, routed tokens).

    Returns ``(stats, magnitude, records)``: the statistics (``all-tokens``: recollected over
    every token for those experts), the Linears to prune by magnitude instead, and one
    :class:`ExpertRecord` per expert with a targeted Linear."""

    by_expert: dict[tuple[str, int], list[str]] = {}
    for local in wanted:
        found = expert_of(block, local)
        if found is not None:
            by_expert.setdefault(found, []).append(local)
    if not by_expert:
        return stats, set(), []
    tokens = {key: max((stats[n].count for n in names if n in stats), default=0) for key, names in by_expert.items()}
    short = {key for key, n in tokens.items() if n < options.min_tokens}
    magnitude: set[str] = set()
    if short and options.fallback == "all-tokens":
        modules = routed_experts(block)
        again = {n: wanted[n] for key in short for n in by_expert[key] if wanted[n]}
        for owner, index in short:
            modules[owner].all_tokens.add(index)
        try:
            redone = layerwise.collect_input_stats(block, batches, linears, again, backend=backend, name=block_name)
        finally:
            for module in modules.values():
                module.all_tokens.clear()
        stats = {**stats, **{n: redone[n] for n in again}}
    elif short:
        magnitude = {n for key in short for n in by_expert[key]}
    records = []
    for key in sorted(by_expert):
        owner, index = key
        how = "routed" if key not in short else options.fallback
        records.append(ExpertRecord(f"{block_name}.{owner}[{index}]", tokens[key], how))
    return stats, magnitude, records


# the recipe's moe keys: what an expert routed too few calibration tokens falls back to
FALLBACKS = MOE_FALLBACKS
DEFAULT_MIN_TOKENS = MOE_DEFAULT_MIN_TOKENS
DEFAULT_FALLBACK = MOE_DEFAULT_FALLBACK


@dataclass(frozen=True)
class MoeOptions:
    """The recipe's ``moe:`` section: experts routed fewer than ``min_tokens`` calibration tokens
    follow ``fallback`` (:mod:`prune_cli.model.moe`)."""

    min_tokens: int = DEFAULT_MIN_TOKENS
    fallback: str = DEFAULT_FALLBACK

    def to_dict(self) -> dict:
        return {"min_tokens": self.min_tokens, "fallback": self.fallback}
