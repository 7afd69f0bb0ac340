"""WINA's tensor transform (Chen et al. 2025, Sec. 3.3): make the columns of the Linears that read
a normalized hidden state orthogonal, without changing what the dense model computes.

For a block's norm ``x_hat * gamma`` (RMSNorm, ``x_hat = x / rms(x)``, ``(hidden,)`` weight ``gamma``)
read by Linears ``W_r`` (``(out_r, hidden)``: q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``):

1. fold: ``F_r = W_r diag(gamma)`` and the norm's weight becomes 1 (so ``W_r (x_hat * gamma) = F_r x_hat``);
2. rotate: ``Q = V`` from the SVD ``F_k = U S V^T`` of one reader (``k_proj`` / ``gate_proj`` as in
   the paper), ``(hidden, hidden)`` orthogonal; the norm now outputs ``u = x_hat Q`` (row vectors) and
   every reader's weight becomes ``W'_r = F_r Q``, so ``W'_r u = F_r Q Q^T x_hat = F_r x_hat``. The
   key reader's columns ``F_k Q = U S`` are orthogonal, which is what WINA's error bound assumes.

The residual stream is never rotated (the release rotates it between sublayers with extra
"shortcut" matrices instead); the rotation sits in the norm module (:class:`RotatedNorm`), one
``hidden x hidden`` product per sublayer per token, the same cost as the release's shortcuts.

Export keeps checkpoints loadable by plain ``transformers``: the readers are saved as ``F_r``
with the norm weight 1 (the dense function, up to folding's rounding) and ``Q`` goes into the
activation-sparsity file; :func:`prune_cli.runtime.load` re-applies step 2 with the stored ``Q``,
which gives bit-identical ``W'_r`` (both sides compute ``(F_r @ Q)`` in float64 from the same
``F_r``). Supported: Llama-style blocks (``input_layernorm`` -> ``self_attn.{q,k,v}_proj``,
``post_attention_layernorm`` -> ``mlp.{gate,up}_proj``) with weight-only RMS norms.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from prune_cli.activation.modules import SparseInputLinear
from prune_cli.core.errors import RecipeError
from prune_cli.model.structure import decoder_blocks

# norm attribute -> (readers, the reader whose columns are made orthogonal)
SITES = {
    "input_layernorm": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.k_proj"),
    "post_attention_layernorm": (("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj"),
}


class RotatedNorm(nn.Module):
    """``norm(x) @ Q``: a weight-1 RMS norm followed by the orthogonal ``rotation`` ``(hidden,
    hidden)`` (float32, whatever the model's dtype). Keeps references to its readers and their
    folded weights ``F_r`` (on the CPU) so the plain form can be restored for export
    (:func:`plain_norms`)."""

    def __init__(self, norm: nn.Module, rotation: torch.Tensor, readers: list[nn.Linear], folded: list[torch.Tensor]):
        super().__init__()
        self.norm = norm
        self.register_buffer("rotation", rotation)
        self._readers = readers  # plain list: not submodules (they stay where they are)
        self._folded = folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y.float() @ self.rotation).to(y.dtype)


def _reader(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    return module.linear if isinstance(module, SparseInputLinear) else module  # a sparsifier wraps it


def block_sites(block: nn.Module, prefix: str):
    """The transform's sites in one decoder block (``prefix``: its full name): ``(norm full
    name, block, norm attribute, norm, readers, index of the key reader)``. Raises
    :class:`RecipeError` for a block the transform does not support."""
    for attr, (reader_names, key) in SITES.items():
        norm = getattr(block, attr, None)
        try:
            readers = [_reader(block, n) for n in reader_names]
        except AttributeError:
            readers = None
        if norm is None or readers is None or not all(isinstance(r, nn.Linear) for r in readers):
            raise RecipeError(
                "the WINA transform supports Llama-style blocks (input_layernorm -> q/k/v_proj, "
                "post_attention_layernorm -> gate/up_proj)", hint="drop the wina option transform",
            )
        if isinstance(norm, RotatedNorm):
            raise RecipeError("the model already carries the WINA transform")
        if getattr(norm, "bias", None) is not None or getattr(norm, "weight", None) is None:
            raise RecipeError(f"the WINA transform needs weight-only RMS norms; {attr} is {type(norm).__name__}")
        yield f"{prefix}.{attr}", block, attr, norm, readers, reader_names.index(key)


def _sites(model: nn.Module):
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks.modules):
        yield from block_sites(block, f"{blocks.path}.{index}")


def check_supported(model: nn.Module) -> int:
    """Raise :class:`RecipeError` (before any work) unless every block has the norms and
    readers the transform needs; returns the number of norms it would transform."""
    return sum(1 for _ in _sites(model))


def _rotations(sites) -> dict[str, torch.Tensor]:
    out = {}
    for name, _, _, norm, readers, key in sites:
        folded = readers[key].weight.detach().double() * norm.weight.detach().double()
        _, _, vh = torch.linalg.svd(folded, full_matrices=True)
        out[name] = vh.T.contiguous()
    return out


def rotations_for(model: nn.Module) -> dict[str, torch.Tensor]:
    """``Q`` per norm (full name -> ``(hidden, hidden)`` float64): the right singular vectors of
    the key reader's folded weight ``F_k = W_k diag(gamma)``."""
    return _rotations(_sites(model))


@torch.no_grad()
def _apply(sites, rotations: dict[str, torch.Tensor]) -> int:
    count = 0
    for name, block, attr, norm, readers, _ in sites:
        if name not in rotations:
            raise RecipeError(f"no WINA rotation for {name}")
        gamma = norm.weight.detach().double()
        folded = []
        # Q is kept in float32 (what the checkpoint stores); weights are rotated by exactly it
        Q32 = rotations[name].to(device=gamma.device, dtype=torch.float32)
        Q = Q32.double()
        for linear in readers:
            dtype = linear.weight.dtype
            f = (linear.weight.detach().double() * gamma).to(dtype)
            folded.append(f.cpu().clone())
            linear.weight.copy_((f.double() @ Q).to(dtype))
        norm.weight.fill_(1.0)
        setattr(block, attr, RotatedNorm(norm, Q32, readers, folded))
        count += 1
    return count


def apply_transform(model: nn.Module, rotations: dict[str, torch.Tensor]) -> int:
    """Fold every norm's weight into its readers and rotate them by the given ``Q`` (steps 1 and
    2 of the module docstring); returns the number of norms transformed."""
    return _apply(list(_sites(model)), rotations)


def transform_block(block: nn.Module, prefix: str, rotations: dict[str, torch.Tensor] | None = None) -> int:
    """:func:`apply_transform` on one block (``prefix``: its full name), with its own rotations
    (computed from the block when ``rotations`` is None)."""
    sites = list(block_sites(block, prefix))
    return _apply(sites, _rotations(sites) if rotations is None else rotations)


@torch.no_grad()
def round_transformed(block: nn.Module, dtype: torch.dtype) -> None:
    """Round a transformed block's stored folded weights ``F_r`` to ``dtype`` and rotate them
    again, ``W'_r = F_r Q`` in float64 as :func:`prune_cli.runtime.load` does: the block then
    computes exactly what its export in ``dtype`` computes after loading."""
    for module in rotated_norms(block).values():
        Q = module.rotation.double()
        for i, reader in enumerate(module._readers):
            f = module._folded[i].to(dtype).to(module._folded[i].dtype)
            module._folded[i] = f
            reader.weight.copy_((f.to(reader.weight.device).double() @ Q.to(reader.weight.device)).to(reader.weight.dtype))


def rotated_norms(model: nn.Module) -> dict[str, RotatedNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RotatedNorm)}


@torch.no_grad()
def strip_transform(model: nn.Module) -> dict[str, RotatedNorm]:
    """Put the plain form in place for good (weight-1 norms, readers ``F_r``: the dense
    function); returns the :class:`RotatedNorm` modules taken out, by name."""
    found = rotated_norms(model)
    for name, module in found.items():
        model.set_submodule(name, module.norm)
        for reader, f in zip(module._readers, module._folded, strict=False):
            reader.weight.copy_(f.to(reader.weight.device))
    return found


@contextmanager
def plain_norms(model: nn.Module):
    """For export: the plain form (weight-1 norms, readers ``F_r``) inside the block, the
    transformed form again after it. Yields ``Q`` per norm name."""
    with torch.no_grad():
        rotated = {name: [r.weight.detach().clone() for r in m._readers] for name, m in rotated_norms(model).items()}
        found = strip_transform(model)
    try:
        yield {name: module.rotation for name, module in found.items()}
    finally:
        with torch.no_grad():
            for name, module in found.items():
                model.set_submodule(name, module)
                for reader, w in zip(module._readers, rotated[name], strict=False):
                    reader.weight.copy_(w)
