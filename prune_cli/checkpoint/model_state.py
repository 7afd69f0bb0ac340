"""A model's state and its weight source: the empty (meta) model built from a config, its state
names, tied parameters, and filling a module's tensors from a :class:`WeightSource`
(:func:`materialize`) after checking every stored shape against the model
(:func:`check_stored_shapes`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from prune_cli.checkpoint.weights import WeightSource
from prune_cli.core.errors import CheckpointError, NonFiniteError, UnsupportedArchitectureError
from prune_cli.core.finite import WEIGHTS_HINT, describe_nonfinite, is_finite
from prune_cli.model.conv1d import from_stored, stored_shape
from prune_cli.model.structure import linearize


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory) and its
    buffers real (rotary frequencies are computed in ``__init__``), in eval mode."""

    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (KeyError, ValueError) as exc:
            raise UnsupportedArchitectureError(f"transformers cannot build this model ({exc})") from None
    model.tie_weights()  # from_config leaves tied parameters (lm_head -> embeddings) as two

    linearize(model)  # GPT-2's Conv1D, fused MoE experts: as Linear layers
    return model.eval()


def state_names(module: nn.Module) -> list[str]:
    """Names of the tensors ``module.state_dict()`` would hold: parameters (each Parameter once,
    under its first name) and persistent buffers."""
    names, seen = [], set()
    for name, param in module.named_parameters():
        if id(param) not in seen:
            seen.add(id(param))
            names.append(name)
    for name, buf in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        if buf is not None and leaf not in holder._non_persistent_buffers_set:
            names.append(name)
    return names


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def source_name(source: WeightSource, full: str, base_prefix: str) -> str | None:
    """The name ``full`` (a model ``state_dict`` name) has in ``source``: the same, or without /
    with the base model's prefix (a checkpoint saved from ``LlamaModel`` lacks ``model.``)."""
    if full in source:
        return full
    if base_prefix:
        stripped = full[len(base_prefix) + 1:] if full.startswith(base_prefix + ".") else None
        if stripped is not None and stripped in source:
            return stripped
        if f"{base_prefix}.{full}" in source:
            return f"{base_prefix}.{full}"
    return None


def _meta_tensors(module: nn.Module, prefix: str, source: WeightSource, base_prefix: str, skip: Iterable[str] = ()):
    """``(name, source name or None, tensor)`` of every meta parameter / persistent buffer of
    ``module`` not in ``skip`` (names relative to ``module``): what :func:`materialize` fills."""
    skip = set(skip)
    for name in state_names(module):
        current = module.get_parameter(name) if _is_param(module, name) else module.get_buffer(name)
        if name in skip or (current is not None and current.device.type != "meta"):
            continue
        yield name, source_name(source, _key(prefix, name), base_prefix), current


def stored_names(module: nn.Module, prefix: str, source: WeightSource, base_prefix: str = "") -> list[str]:
    """The source names :func:`materialize` would read for ``module``'s meta tensors (those the
    source has; a missing one is materialize's error to raise)."""
    return [found for _, found, _ in _meta_tensors(module, prefix, source, base_prefix) if found is not None]


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    if leaf in holder._parameters:
        holder._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        holder._buffers[leaf] = value


@torch.no_grad()
def materialize(
    module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype, device: torch.device,
    base_prefix: str = "", skip: Iterable[str] = (), check_finite: bool = True,
) -> list[str]:
    """Fill every meta parameter / persistent buffer of ``module`` (``prefix``: its name in the
    model, e.g. ``model.layers.3``) from ``source``: floating tensors cast to ``dtype``, all on
    ``device``. Names in ``skip`` (relative) are left alone (tied weights). Returns the names
    (relative to ``module``) it filled. Raises :class:`CheckpointError` for a tensor the source
    lacks or of the wrong shape, and :class:`~prune_cli.core.errors.NonFiniteError` for NaN / inf."""

    wanted = {}
    for name, found, current in _meta_tensors(module, prefix, source, base_prefix, skip):
        if found is None:
            raise CheckpointError(f"{source.description} has no tensor {_key(prefix, name)}",
                                  hint="the checkpoint does not match its config.json")
        wanted[name] = (found, current)
    for name, (found, current) in wanted.items():
        # one at a time: one stored copy in memory at once (a Conv1D weight: read transposed)
        value = from_stored(module, name, source.read([found])[found])
        if tuple(value.shape) != tuple(current.shape):
            raise CheckpointError(
                f"{source.description}: {found} has shape {list(value.shape)}, the model expects {list(current.shape)}",
                hint="the checkpoint does not match its config.json",
            )
        if check_finite and value.is_floating_point() and not is_finite(value):
            raise NonFiniteError(f"non-finite weights in {_key(prefix, name)}: {describe_nonfinite(value)}",
                                 hint=WEIGHTS_HINT)
        # a copy unless the source's tensor is ours alone: mmap'd tensors (.bin, GGUF) share memory
        # with the file's mapping, where a stage's in-place change (pruning) would outlive the block
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype,
                         copy=not source.private_tensors)
        _set_tensor(module, name, value.contiguous())
    return list(wanted)


def check_stored_shapes(model: nn.Module, source: WeightSource, base_prefix: str = "") -> int:
    """Before any tensor's bytes are read: every tensor ``model`` (built from its config, on the
    meta device) will read from ``source`` is there, with the shape the model expects (a
    Conv1D weight transposed), as the checkpoint's headers declare it. A header is a promise
    about bytes not yet read: one declaring a 70 GB tensor (with consistent offsets) would
    otherwise be read into memory first, and only then found not to fit. Returns how many
    shapes were checked (a source that cannot tell a shape before reading it, GGUF, is checked
    from its metadata instead). Raises :class:`CheckpointError` naming the file, the tensor,
    the expected and the declared shape."""

    tied = tied_names(model)
    checked = 0
    for name in state_names(model):
        current = model.get_parameter(name) if _is_param(model, name) else model.get_buffer(name)
        if name in tied or current is None or current.device.type != "meta":
            continue
        found = source_name(source, name, base_prefix)
        if found is None:
            raise CheckpointError(f"{source.description} has no tensor {name}",
                                  hint="the checkpoint does not match its config.json")
        declared = source.stored_shape(found)
        if declared is None:
            continue
        expected = stored_shape(model, name, tuple(current.shape))
        if tuple(declared) != tuple(expected):
            raise CheckpointError(
                f"{source.file_of(found)}: tensor {found} is declared {list(declared)}, the model (its config.json) "
                f"expects {list(expected)}",
                hint="the checkpoint does not match its config.json, or its header is damaged",
            )
        checked += 1
    return checked


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


def tied_names(model: nn.Module) -> dict[str, str]:
    """Tied parameters: each later name -> the first name of the same Parameter (``lm_head.weight``
    -> ``model.embed_tokens.weight`` for tied embeddings)."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied
