"""A causal LM's structure, found generically: its decoder blocks, each block's Linears, what
prune-cli can prune, and the config keys dropped before saving. Nothing here loads or reads.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from prune_cli.core.errors import UnsupportedArchitectureError
from prune_cli.model.conv1d import Conv1DLinear, linearize_conv1d
from prune_cli.model.moe import RoutedExperts, expert_of, linearize_experts

log = logging.getLogger(__name__)


# Attribute paths of the decoder block list of known families, tried before the generic search.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, SmolLM, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.h",  # GPT-2 (Conv1D, linearized by prune_cli.model.conv1d), Falcon, BLOOM
    "transformer.blocks",  # MPT
)


def linearize(model: nn.Module) -> None:
    """The structure prune-cli prunes: GPT-2's ``Conv1D`` as the Linear it is
    (:mod:`prune_cli.model.conv1d`), fused MoE experts as one Linear view per expert
    (:mod:`prune_cli.model.moe`). Parameter names and values are unchanged."""

    linearize_conv1d(model)
    linearize_experts(model)


@dataclass(frozen=True)
class Blocks:
    """The decoder block list of a model and its attribute path (e.g. ``model.layers``)."""

    path: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_blocks(model: nn.Module) -> Blocks:
    """Find the list of decoder blocks: known paths first, else the largest homogeneous
    ``nn.ModuleList``. Raises :class:`UnsupportedArchitectureError` if none holds Linears."""
    found: Blocks | None = None
    for path in KNOWN_BLOCK_PATHS:
        obj = _get_path(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            found = Blocks(path, obj)
            break
    if found is None:
        best = None
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 1:
                if len({type(m) for m in module}) == 1:
                    size = _param_count(module)
                    if best is None or size > best[0]:
                        best = (size, name, module)
        if best is not None:
            found = Blocks(best[1], best[2])
    name = type(model).__name__
    if found is None:
        raise UnsupportedArchitectureError(
            f"{name}: no decoder block list found", hint="supported: Llama-like, OPT, GPT-NeoX and similar layouts"
        )
    if not block_linears(found.modules[0]):
        raise UnsupportedArchitectureError(
            f"{name}: its decoder blocks have no torch.nn.Linear layers (e.g. GPT-2's Conv1D)",
            hint="supported: Llama, Mistral, Qwen2, SmolLM, OPT, GPT-NeoX and other nn.Linear-based decoders",
        )
    return found


def as_blocks(model_or_blocks: nn.Module | Blocks) -> Blocks:
    """``model_or_blocks`` if it is already the :class:`Blocks` (a walk passes the driver's),
    else the decoder blocks found in the model."""
    return model_or_blocks if isinstance(model_or_blocks, Blocks) else decoder_blocks(model_or_blocks)


def fused_weights(block: nn.Module) -> dict[str, str]:
    """Weight tensors of ``block`` with three or more dimensions held outside ``nn.Linear``:
    ``name -> module type``. These are mixture-of-experts weights that transformers fuses into one
    tensor per block whose forward is not transformers' standard one (GPT-OSS, Llama 4, DBRX):
    the standard ones are linearized (:class:`~prune_cli.model.moe.RoutedExperts`) and pruned per
    expert. A router (a 2-D weight) is not listed: it stays dense by design."""

    return {
        f"{owner}.{name}" if owner else name: type(module).__name__
        for owner, module in block.named_modules()
        if not isinstance(module, (nn.Linear, RoutedExperts))
        for name, param in module.named_parameters(recurse=False)
        if param.dim() >= 3
    }


def check_prunable(model: nn.Module, include: tuple[str, ...], activation: bool = False) -> None:
    """Refuse, before any work, a model whose blocks hold weights no method prunes (fused MoE
    experts) unless the recipe names its targets (``targets.include``): pruning "50% of the
    model" would otherwise leave most of its weights dense and say nothing. Activation sparsity
    on GPT-2's Conv1D layers is refused too (its runtime wraps ``nn.Linear`` modules only)."""

    blocks = decoder_blocks(model)
    block = blocks.modules[0]
    if activation and any(isinstance(m, Conv1DLinear) for m in block.modules()):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: activation sparsity on Conv1D layers (GPT-2) is not supported yet",
            hint="weight pruning (wanda, sparsegpt, magnitude, dsnot) works on this model",
        )

    experts = [f"{blocks.path}.0.{n}" for n in block_linears(block) if expert_of(block, n) is not None]
    if activation and any(not include or any(re.search(p, n) for p in include) for n in experts):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: activation sparsity on mixture-of-experts experts is not supported yet",
            hint="weight pruning works on this model; to sparsify other layers' activations, name them: "
            "targets: {include: ['self_attn']}",
        )
    fused = fused_weights(block)
    if fused and not include:
        kinds = ", ".join(sorted(set(fused.values())))
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: {kinds} holds fused mixture-of-experts weights "
            f"({', '.join(sorted(fused))}), which prune-cli does not prune yet",
            hint="to prune the other Linear layers only, name them in the recipe: targets: {include: ['self_attn']}",
        )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one block, by name relative to the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


# config.json keys that point transformers at code files of the model's repository (loaded with
# trust_remote_code): prune-cli never runs such code and does not export those files
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def drop_remote_code(config) -> list[str]:
    """Remove from ``config`` the keys naming remote code files (:data:`REMOTE_CODE_KEYS`); returns
    the ones removed. An export keeping ``auto_map`` without the ``.py`` files it names would
    fail to load with ``trust_remote_code=True``, or silently run other code where such files
    are found; the model prune-cli wrote is the transformers class its ``architectures`` names."""
    removed = []
    for key in REMOTE_CODE_KEYS:
        if getattr(config, key, None) is not None:
            try:
                delattr(config, key)
            except AttributeError:
                setattr(config, key, None)
            removed.append(key)
    if removed:
        log.info("dropped %s from the exported config.json: prune-cli runs no remote code and exports no code files "
                 "(the checkpoint loads as %s)", " and ".join(removed), getattr(config, "architectures", None))
    return removed


def prepare_for_save(model: nn.Module) -> None:
    """Drop GGUF quantizer state so ``save_pretrained`` writes plain dense safetensors, and the
    config's references to remote code (:func:`drop_remote_code`)."""
    drop_remote_code(model.config)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
