"""GPT-2's ``Conv1D`` pruned as the Linear layer it is.

transformers' ``Conv1D(nf, nx)`` computes ``y = x W + b`` with ``W`` of shape ``(nx, nf)`` =
``(in, out)``: a Linear layer whose weight is stored transposed. Every method here reads a
Linear's weight as ``(out, in)`` (Wanda's ``|W_ij| · ‖X_j‖``, SparseGPT's rows, N:M groups along
the input dimension), so a model's ``Conv1D`` modules are replaced, in its structure, by
:class:`Conv1DLinear`: an ``nn.Linear`` with weight ``Wᵀ`` (``(out, in)``), computing the same
``y = x Wᵀᵀ + b``. Only the *stored* form is transposed: the weight is read from the checkpoint
as ``(in, out)`` and transposed (:func:`from_stored`), and ``state_dict()`` gives it back as
``(in, out)``, so an export is a plain GPT-2 checkpoint that transformers loads as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class Conv1DLinear(nn.Linear):
    """A ``Conv1D`` as ``nn.Linear``: ``weight`` is ``(out, in)`` in memory, ``(in, out)`` in
    ``state_dict()`` and in checkpoints (see the module docstring)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination:
            destination[key] = destination[key].t() if keep_vars else destination[key].t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


@torch.no_grad()
def linearize_conv1d(model: nn.Module) -> int:
    """Replace every ``Conv1D`` in ``model`` by a :class:`Conv1DLinear` (meta stays meta; real
    weights are transposed into a copy, the bias is shared). Returns how many were replaced."""
    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if not _is_conv1d(child):
                continue
            weight = child.weight
            linear = Conv1DLinear(child.nx, child.nf, device="meta" if weight.is_meta else weight.device,
                                  dtype=weight.dtype)
            if not weight.is_meta:
                linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
            linear.bias = child.bias
            setattr(owner, name, linear)
            replaced += 1
    return replaced


def stored_transposed(module: nn.Module, name: str) -> bool:
    """Whether tensor ``name`` (relative to ``module``) is stored transposed: a
    :class:`Conv1DLinear`'s weight."""
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    return leaf == "weight" and isinstance(holder, Conv1DLinear)


def from_stored(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """A stored tensor in the layout ``module``'s parameter ``name`` has in memory."""
    return value.t() if stored_transposed(module, name) else value


def stored_shape(module: nn.Module, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape tensor ``name`` of in-memory ``shape`` has in a checkpoint."""
    return tuple(reversed(shape)) if stored_transposed(module, name) else tuple(shape)
