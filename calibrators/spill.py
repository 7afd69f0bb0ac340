"""Calibration activations on disk when they exceed the memory budget (``--max-memory``).

A :class:`SpilledBatch` is a :class:`~prune_cli.calibrators.layerwise.BlockBatch` whose hidden
states live in a safetensors file: reading ``batch.hidden`` loads them (onto the batch's
device), assigning it writes them (to a new file, renamed over the old one), so a pass over the
batches holds one batch in memory at a time instead of all of them. The block arguments
(rotary embeddings, masks) stay in memory: they are shared by every batch of one shape.

:class:`FileTensor` is the handle of such a file; resume states and the Fisher pass's kept
inputs link (``os.link``) to the files instead of reading them, so keeping them costs no memory.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prune_cli.calibrators.layerwise import BlockBatch

_KEY = "t"
_counter = itertools.count()


@dataclass(frozen=True)
class FileTensor:
    """A tensor in a safetensors file (under the key ``"t"``), loaded onto ``device`` on demand."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str

    @classmethod
    def write(cls, path: Path, tensor: torch.Tensor) -> FileTensor:

        tmp = path.with_name(path.name + ".tmp")
        save_file({_KEY: tensor.detach().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return cls(Path(path), tuple(tensor.shape), tensor.dtype, str(tensor.device))

    def load(self) -> torch.Tensor:

        return load_file(str(self.path), device=self.device)[_KEY]

    def link(self, path: Path) -> FileTensor:
        """The same tensor under another name (a hard link; a copy across file systems)."""
        path = Path(path)
        try:
            os.link(self.path, path)
        except OSError:
            shutil.copyfile(self.path, path)
        return FileTensor(path, self.shape, self.dtype, self.device)


def value(x):
    """``x`` as a tensor (a :class:`FileTensor` is loaded)."""
    return x.load() if isinstance(x, FileTensor) else x


class SpilledBatch(BlockBatch):
    """A batch whose hidden states are kept in a file in ``folder`` (see the module docstring)."""

    def __init__(self, hidden, args: tuple, kwargs: dict, folder: Path, layer_kwargs: dict | None = None):
        self._folder = Path(folder)
        self._path = self._folder / f"batch-{os.getpid()}-{next(_counter)}.safetensors"
        self._held: FileTensor | None = None
        self.args = args
        self.kwargs = kwargs
        self.layer_kwargs = layer_kwargs
        self.hidden = hidden

    @property
    def hidden(self) -> torch.Tensor:
        return self._held.load()

    @hidden.setter
    def hidden(self, new) -> None:
        if isinstance(new, FileTensor):
            tmp = self._path.with_name(self._path.name + ".link")
            held = new.link(tmp)
            os.replace(tmp, self._path)
            self._held = FileTensor(self._path, held.shape, held.dtype, held.device)
        else:
            self._held = FileTensor.write(self._path, new)

    @property
    def tokens(self) -> int:
        return self._held.shape[0] * self._held.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._held.dtype

    def held(self):
        """A handle that outlives later assignments (a link to the current file)."""
        return self._held.link(self._folder / f"kept-{os.getpid()}-{next(_counter)}.safetensors")

    def copy(self) -> SpilledBatch:
        return SpilledBatch(self.held(), self.args, self.kwargs, self._folder, self.layer_kwargs)

    def __del__(self) -> None:
        try:
            self._path.unlink(missing_ok=True)
        except (OSError, AttributeError, TypeError):
            pass


def spill(batch: BlockBatch, folder: Path) -> SpilledBatch:
    """``batch`` with its hidden states moved to a file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return SpilledBatch(batch.hidden, batch.args, batch.kwargs, folder, batch.layer_kwargs)
