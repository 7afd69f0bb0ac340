"""Public runtime API: load a prune-cli checkpoint with its activation sparsity applied.

    from prune_cli.runtime import load
    model, tokenizer = load("out/wina-40")      # an ordinary transformers model object
    model.generate(**tokenizer("def f(x):", return_tensors="pt"), max_new_tokens=20)

The checkpoint's weights are plain safetensors (``transformers`` loads them alone, dense
activations); the activation sparsifiers' buffers live in ``activation_sparsity.safetensors``
and are described in ``sparsity.json`` under ``"activation"``. With WINA's transform the
weights are saved folded (norm weights 1, same dense function) and the file also holds the
rotations, which :func:`load` applies before wrapping the Linears.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from prune_cli.activation.modules import SparseInputLinear, sparsifiers
from prune_cli.activation.transform import apply_transform, transform_block
from prune_cli.checkpoint.files import ACTIVATION_FILE, REPORT_FILE, check_checkpoint_folder
from prune_cli.core.errors import CheckpointError
from prune_cli.core.finite import all_finite, check_finite_tensor

ROTATION_PREFIX = "wina_rotation."  # + norm name: WINA's transform (prune_cli.activation.transform)
ACTIVATION_HINT = ("the activation file is damaged or was edited: export the checkpoint again "
                   "(prune-cli never writes non-finite thresholds, scales or factors)")


def check_activation_buffers(tensors: dict[str, torch.Tensor], where: str | Path = ACTIVATION_FILE) -> None:
    """Raise :class:`~prune_cli.core.errors.NonFiniteError` (exit 2) naming ``where`` (the activation
    file) and its first buffer, in name order, that holds NaN or +-inf: a NaN threshold or scale
    keeps or drops every input without any error, and the perplexity is garbage."""

    if all_finite(tensors.values()):
        return
    for name in sorted(tensors):
        check_finite_tensor(tensors[name], f"{where}, buffer {name}", hint=ACTIVATION_HINT)


def activation_tensors(wrappers: dict, rotations: dict | None = None) -> dict[str, torch.Tensor]:
    """The activation file's tensors for ``wrappers`` (full name -> SparseInputLinear) and the
    rotations ``Q`` of WINA's transform (norm full name -> ``(hidden, hidden)``)."""
    tensors = {f"{ROTATION_PREFIX}{name}": q.detach().cpu().contiguous() for name, q in (rotations or {}).items()}
    for name, module in wrappers.items():
        tensors[f"{name}.threshold"] = module.threshold.detach().cpu().reshape(1)
        tensors[f"{name}.channel_scale"] = module.channel_scale.detach().cpu().contiguous()
        tensors[f"{name}.keep_count"] = module.keep_count.detach().cpu().reshape(1)
        if module.lowrank_u is not None:
            tensors[f"{name}.lowrank_u"] = module.lowrank_u.detach().cpu().contiguous()
            tensors[f"{name}.lowrank_v"] = module.lowrank_v.detach().cpu().contiguous()
    return tensors


def save_activation(wrappers: dict, folder: Path, rotations: dict | None = None) -> None:
    """Write the buffers of ``wrappers`` (name -> SparseInputLinear) to ``folder``, and the
    rotations ``Q`` of WINA's transform (norm name -> ``(hidden, hidden)``) when there are any."""

    save_file(activation_tensors(wrappers, rotations), str(Path(folder) / ACTIVATION_FILE))


def install_activation(root: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "", where: str = ACTIVATION_FILE) -> int:
    """Apply WINA's rotations and wrap the Linears named in ``tensors`` (activation-file entries
    of the Linears under ``root``; names relative to ``root`` after removing ``prefix.``); returns
    how many Linears were wrapped."""

    dot = f"{prefix}." if prefix else ""
    tensors = dict(tensors)
    check_activation_buffers(tensors, where)
    rotations = {k[len(ROTATION_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(ROTATION_PREFIX)}
    if rotations:  # the checkpoint holds F_r with weight-1 norms: rotate them again (bit-identical W'_r)

        if prefix:
            transform_block(root, prefix, rotations)
        else:
            apply_transform(root, rotations)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for full in names:
        name = full[len(dot):]
        try:
            linear = root.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where} names {full}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{where}: {full} is not a Linear")
        _check_entries(tensors, full, linear, where)
        module = SparseInputLinear(
            linear,
            float(tensors[f"{full}.threshold"][0]),
            tensors[f"{full}.channel_scale"],
            tensors.get(f"{full}.lowrank_u"),
            tensors.get(f"{full}.lowrank_v"),
            int(tensors[f"{full}.keep_count"][0]) if f"{full}.keep_count" in tensors else 0,
        )
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, module)
    return len(names)


def _check_entries(tensors: dict[str, torch.Tensor], full: str, linear: nn.Linear, where: str | Path) -> None:
    """The entries of one wrapped Linear are there and fit it: a threshold of one value and a
    channel scale of one value per input feature (a :class:`CheckpointError` otherwise, not a
    ``KeyError`` or a shape error deep in the forward)."""

    for key, size in (("threshold", 1), ("channel_scale", linear.in_features)):
        tensor = tensors.get(f"{full}.{key}")
        if tensor is None:
            raise CheckpointError(f"{where} has no {full}.{key}", hint=ACTIVATION_HINT)
        if tensor.numel() != size:
            raise CheckpointError(f"{where}: {full}.{key} has {tensor.numel()} values, the Linear needs {size}",
                                  hint=ACTIVATION_HINT)


def apply_activation(model: nn.Module, folder: Path) -> int:
    """Wrap the Linears named in ``folder``'s activation file; returns how many were wrapped."""

    path = Path(folder) / ACTIVATION_FILE
    return install_activation(model, load_file(str(path)), where=str(path))


class BlockActivation:
    """A :class:`~prune_cli.streaming.driver.BlockDriver` ``prepare_block`` hook that installs a
    checkpoint's activation sparsifiers (and WINA rotations) on each block as it is read,
    reading only that block's entries of the activation file."""

    def __init__(self, folder: Path, driver):

        self.path = Path(folder) / ACTIVATION_FILE
        self.driver = driver
        self._file = safe_open(str(self.path), framework="pt")
        self._keys = list(self._file.keys())
        # every Linear's buffers checked now, not after the blocks before it ran (a rotation, one
        # hidden x hidden matrix per norm, is checked as its block is read)
        for key in self._keys:
            if not key.startswith(ROTATION_PREFIX):
                check_activation_buffers({key: self._file.get_tensor(key)}, self.path)

    def __call__(self, index: int, block: nn.Module) -> None:
        prefix = self.driver.name(index)
        mine = [k for k in self._keys if k.startswith(prefix + ".") or k.startswith(f"{ROTATION_PREFIX}{prefix}.")]
        tensors = {k: self._file.get_tensor(k).to(self.driver.device) for k in mine}
        install_activation(block, tensors, prefix, where=str(self.path))


def load(folder: str | Path, dtype: torch.dtype = torch.float32, decode: bool = False):
    """``(model, tokenizer)`` for a prune-cli checkpoint, activation sparsity applied when the
    checkpoint has it. ``decode=True`` also prepares the batch-1 gather path."""


    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no config.json)")
    check_checkpoint_folder(folder)  # damaged / missing files: one-line CheckpointError, not a deep crash
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as exc:  # e.g. no weight file at all, or no tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load the checkpoint in {folder}: {first}") from None
    if (folder / ACTIVATION_FILE).is_file():
        apply_activation(model, folder)
        if decode:
            prepare_decode(model)
    return model, tokenizer


def prepare_decode(model: nn.Module) -> None:

    for module in sparsifiers(model).values():
        module.prepare_decode()


def activation_spec(folder: str | Path) -> dict | None:
    report = Path(folder) / REPORT_FILE
    if not report.is_file():
        return None
    return json.loads(report.read_text()).get("activation")
