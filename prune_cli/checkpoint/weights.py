"""Where a model's weights come from: read lazily, a few tensors at a time, never the whole model.

A :class:`WeightSource` answers "give me these tensors" by their names in the model's
``state_dict`` (``model.layers.3.self_attn.q_proj.weight``), as CPU tensors in the stored dtype:

* :class:`SafetensorsWeights`: a folder of ``*.safetensors`` files (one, or shards with
  ``model.safetensors.index.json``), read through ``safe_open`` one tensor at a time;
* :class:`TorchBinWeights`: ``pytorch_model*.bin`` files, memory-mapped (``torch.load(mmap=True,
  weights_only=True)``) so only the tensors read are paged in;
* :class:`GGUFWeights`: a ``.gguf`` file through the ``gguf`` reader (memory-mapped), each tensor
  dequantised when it is read, with transformers' own GGUF name map and per-architecture value
  conversion (``TENSOR_PROCESSORS``: Llama's q/k permutation, Gemma's ``norm - 1``, ...), so the
  values equal what ``from_pretrained(gguf_file=...)`` builds, bit for bit (tested).

:func:`empty_model` builds the model's structure on the meta device (buffers such as rotary
frequencies stay real); :func:`materialize` fills one submodule (a decoder block, or everything
outside the blocks) from a source, in the compute dtype, on a device.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from torch import nn
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

from prune_cli.checkpoint.files import ACTIVATION_FILE, check_regular_file, read_weight_headers, weight_files
from prune_cli.core.errors import CheckpointError, UnsupportedArchitectureError

log = logging.getLogger(__name__)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightSource:
    """Tensors by ``state_dict`` name, read on demand. Subclasses fill ``_names``."""

    description = "weights"
    # True when read() returns tensors nobody else holds (no copy needed before changing them)
    private_tensors = False

    def __init__(self) -> None:
        self._names: dict[str, object] = {}  # name -> where it lives (file, reader tensor, ...)

    def names(self) -> set[str]:
        return set(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The floating dtype most of the stored weights have (None: quantised, e.g. GGUF)."""
        return None

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` as CPU tensors (stored dtype; GGUF: dequantised float32)."""
        raise NotImplementedError

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape tensor ``name`` has in the checkpoint, known without reading its bytes (a
        header), or ``None`` when the source cannot tell before reading it."""
        return None

    def prefetch(self, names: Iterable[str]) -> int:
        """Ask for the bytes of ``names`` to be read ahead, without waiting and without holding
        them in this process (a hint: nothing happens where the source cannot); returns the
        bytes asked for."""
        return 0

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages)."""
        return self.description

    def close(self) -> None:
        """Release open files (also done when the source is garbage collected)."""

    def layout(self) -> dict[str, str | MergedTensor]:
        """Model name -> stored name (or :class:`MergedTensor`) where the checkpoint stores a
        tensor under another name or in parts (:class:`RenamedWeights`); an export writes
        them back that way, as ``save_pretrained`` does. ``{}``: stored as named."""
        return {}


class SafetensorsWeights(WeightSource):
    """The ``*.safetensors`` files of a model folder (prune-cli's activation file excluded).

    Tensors are read with ``os.pread`` into memory of their own, not through a memory map: a map
    would leave every page of the checkpoint a walk has read resident in this process (the
    resident size would grow with the model, and in-place changes would reach the map)."""

    private_tensors = True

    def __init__(self, folder: str | Path):
        super().__init__()

        self.folder = Path(folder)
        self.description = str(self.folder)
        # the files transformers would read (the index, or model.safetensors alone), each checked
        # (truncated / corrupt: CheckpointError naming the file), no tensor in two of them
        chosen, headers = read_weight_headers(self.folder)
        if not chosen.files:
            raise CheckpointError(f"no .safetensors weight files in {self.folder}")
        counts: dict[str, int] = {}
        self._headers: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        for path, header in headers.items():
            self._headers[path.name] = header
            with path.open("rb") as handle:
                self._data_start[path] = 8 + int.from_bytes(handle.read(8), "little")
            for name, entry in header.items():
                if name != "__metadata__":
                    self._names[name] = path
                    counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
        self._dtype_counts = counts
        self._fds: dict[Path, int] = {}

    @property
    def stored_dtype(self) -> torch.dtype | None:
        floating = {k: v for k, v in self._dtype_counts.items() if k in ("F64", "F32", "F16", "BF16")}
        return SAFETENSORS_DTYPES[max(floating, key=floating.get)] if floating else None

    def shape(self, name: str) -> list[int]:
        return list(self._headers[self._names[name].name][name]["shape"])

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self.shape(name))

    def file_of(self, name: str) -> str:
        return str(self._names[name])

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def prefetch(self, names: Iterable[str]) -> int:
        """``posix_fadvise(WILLNEED)`` on each tensor's byte range: the kernel starts reading it
        into the page cache and returns at once, so the next block's tensors arrive from disk
        while this one computes, with no memory of this process spent on them (a later
        :meth:`read` copies them from the page cache). A platform without ``posix_fadvise``, or
        a refused advice, reads as before."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return 0
        asked = 0
        for name in names:
            path = self._names.get(name)
            if path is None:
                continue
            begin, end = self._headers[path.name][name]["data_offsets"]
            try:
                advise(self._fd(path), self._data_start[path] + begin, end - begin, os.POSIX_FADV_WILLNEED)
            except OSError:
                return asked
            asked += end - begin
        return asked

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            path = self._names[name]
            entry = self._headers[path.name][name]
            begin, end = entry["data_offsets"]
            buffer = bytearray(end - begin)
            view, done = memoryview(buffer), 0
            try:
                while done < len(buffer):
                    n = os.preadv(self._fd(path), [view[done:]], self._data_start[path] + begin + done)
                    if n == 0:
                        raise OSError("unexpected end of file")
                    done += n
            except OSError as exc:
                raise CheckpointError(f"cannot read {name} from {path}: {exc}") from None
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
            out[name] = flat.view(dtype).reshape(entry["shape"])
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


class TorchBinWeights(WeightSource):
    """``pytorch_model*.bin`` files (pickled state dicts), memory-mapped and read lazily; only
    plain tensors are accepted (``weights_only=True``: no code runs on load)."""

    def __init__(self, folder: str | Path):
        super().__init__()
        self.folder = Path(folder)
        self.description = str(self.folder)

        # pytorch_model.bin alone, else the shards its index names (as transformers reads them)
        self._files = weight_files(self.folder, "bin").files
        if not self._files:
            raise CheckpointError(f"no pytorch_model*.bin weight files in {self.folder}")
        self._loaded: dict[Path, dict] = {}
        for path in self._files:
            check_regular_file(path, "PyTorch weight file")
            for name in self._state(path):
                if name in self._names:
                    raise CheckpointError(
                        f"tensor {name} is in both {self._names[name]} and {path}: which one is the model's is ambiguous",
                        hint="remove the stray file (an old shard or a leftover copy) from the folder")
                self._names[name] = path

    def _state(self, path: Path) -> dict:
        if path not in self._loaded:
            try:
                self._loaded[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - pickle / zip errors of a damaged file
                raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        return self._loaded[path]

    @property
    def stored_dtype(self) -> torch.dtype | None:
        dtypes = [t.dtype for state in self._loaded.values() for t in state.values() if t.is_floating_point()]
        return max(set(dtypes), key=dtypes.count) if dtypes else None

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self._state(self._names[name])[name] for name in names}

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self._state(self._names[name])[name]  # memory-mapped: its shape costs no read
        return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None

    def file_of(self, name: str) -> str:
        return str(self._names[name])


# GGUF tensor processors that map one GGUF tensor to one HF tensor (others merge experts).
_ONE_TO_ONE_PROCESSORS = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "BloomTensorProcessor",
                          "GPT2TensorProcessor", "NemotronTensorProcessor", "Lfm2TensorProcessor", "MambaTensorProcessor"}


class GGUFWeights(WeightSource):
    """One ``.gguf`` file, dequantised a tensor at a time (see the module docstring).

    ``model`` is the model's structure (meta is fine): transformers derives the GGUF -> HF name
    map from its ``state_dict`` names."""

    private_tensors = True  # dequantised into fresh arrays

    def __init__(self, path: str | Path, model: nn.Module):
        super().__init__()

        self.path = Path(path)
        self.description = str(self.path)
        try:
            self._reader = GGUFReader(str(self.path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read GGUF file {self.path}: {exc}") from None
        arch = read_field(self._reader, "general.architecture")[0]
        processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if processor_class.__name__ not in _ONE_TO_ONE_PROCESSORS:
            raise UnsupportedArchitectureError(
                f"streaming GGUF tensors of architecture {arch!r} is not supported (its experts are merged on load)",
                hint="convert the GGUF file to a safetensors folder first",
            )
        # the processors read head counts and such from the config: the model's own, already parsed
        # from this file (parsing the GGUF metadata again costs seconds)
        self._config = model.config.to_dict()
        self._processor = processor_class(config=self._config)
        self._map = get_gguf_hf_weights_map(model, self._processor)
        for tensor in self._reader.tensors:
            hf = self._map.get(tensor.name)
            if hf is not None:
                self._names[hf] = tensor

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:

        out = {}
        for name in names:
            tensor = self._names[name]
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = self._processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=self._map,
                parsed_parameters={"tensors": {}, "config": self._config},
            )
            if self._map.get(result.name) != name:
                raise RuntimeError(f"GGUF tensor {tensor.name} was renamed to {result.name} on conversion")
            out[name] = torch.from_numpy(np.copy(result.weights))
            self._release_pages()
        return out

    def _release_pages(self) -> None:
        """Drop the file's pages this process has read from its resident set (``MADV_DONTNEED``
        on the reader's read-only map; a later read faults them in again from the page cache).
        Without it, reading every tensor once (the cache build, a walk) leaves the whole GGUF
        file in the resident set: 98 MB for the bundled model, tens of GB for a 70B one."""

        handle = getattr(self._reader.data, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                handle.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # a closed map, or a platform without it
                pass


def open_weights(folder: str | Path, gguf_file: str | None, model: nn.Module) -> WeightSource:
    """The weight source of a local model folder (or GGUF file in it)."""
    folder = Path(folder)
    if gguf_file:
        return GGUFWeights(folder / gguf_file, model)
    if any(p.name != ACTIVATION_FILE for p in folder.glob("*.safetensors")) or list(folder.glob("*.safetensors.index.json")):
        return SafetensorsWeights(folder)
    if list(folder.glob("pytorch_model*.bin")):
        return TorchBinWeights(folder)
    raise CheckpointError(f"no weight files in {folder} (*.safetensors or pytorch_model*.bin)",
                          hint="a model folder holds config.json and its weight files")


# ----------------------------------------------------------------------------- structure


class LayeredWeights(WeightSource):
    """Tensors from ``top`` where it has them, else from ``base``: the blocks a previous walk
    modified (written to a work folder) over the original checkpoint."""

    def __init__(self, top: WeightSource, base: WeightSource):
        super().__init__()
        self.top, self.base = top, base
        self.description = f"{top.description} over {base.description}"
        self.private_tensors = top.private_tensors and base.private_tensors
        self._names = {**{n: base for n in base.names()}, **{n: top for n in top.names()}}

    @property
    def stored_dtype(self) -> torch.dtype | None:
        return self.base.stored_dtype

    def layout(self) -> dict[str, str | MergedTensor]:
        return self.base.layout()

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        return self._names[name].stored_shape(name)

    def file_of(self, name: str) -> str:
        return self._names[name].file_of(name)

    def prefetch(self, names: Iterable[str]) -> int:
        names = [n for n in names if n in self._names]
        return self.top.prefetch([n for n in names if self._names[n] is self.top]) + self.base.prefetch(
            [n for n in names if self._names[n] is self.base])

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        out = self.top.read([n for n in names if self._names[n] is self.top])
        out.update(self.base.read([n for n in names if self._names[n] is self.base]))
        return out


@dataclass(frozen=True)
class MergedTensor:
    """A model tensor that transformers builds on load from several stored ones: for each source
    pattern, one stored tensor per expert, stacked along dim 0 (``MergeModulelist(dim=0)``), and
    the stacks concatenated along ``concat_dim`` (``Concatenate(dim=1)``; ``None``: one pattern).
    Mixtral's ``experts.gate_up_proj`` ``(E, 2F, H)`` is ``[w1 of experts 0..E-1], [w3 of 0..E-1]``."""

    parts: tuple[tuple[str, ...], ...]
    concat_dim: int | None = None

    def build(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        stacks = [torch.stack([stored[name] for name in part]) for part in self.parts]
        return stacks[0] if self.concat_dim is None else torch.cat(stacks, dim=self.concat_dim)

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored parts of ``tensor`` (the inverse of :meth:`build`): views, by stored name."""
        pieces = [tensor] if self.concat_dim is None else tensor.chunk(len(self.parts), dim=self.concat_dim)
        return {name: piece[e] for part, piece in zip(self.parts, pieces, strict=False) for e, name in enumerate(part)}

    def part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each stored part of a tensor of ``shape``."""
        out = list(shape[1:])
        if self.concat_dim is not None:
            if shape[self.concat_dim] % len(self.parts):
                raise ValueError(f"cannot split {list(shape)} into {len(self.parts)} equal parts")
            out[self.concat_dim - 1] //= len(self.parts)
        return tuple(out)
