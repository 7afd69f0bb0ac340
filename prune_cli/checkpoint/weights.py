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
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from prune_cli.checkpoint.files import ACTIVATION_FILE, check_regular_file, read_weight_headers, weight_files
from prune_cli.core.errors import CheckpointError, NonFiniteError, UnsupportedArchitectureError
from prune_cli.core.finite import WEIGHTS_HINT, describe_nonfinite, is_finite
from prune_cli.model.conv1d import from_stored, stored_shape
from prune_cli.model.structure import linearize

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

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages)."""
        return self.description

    def close(self) -> None:
        """Release open files (also done when the source is garbage collected)."""

    def layout(self) -> dict[str, "str | MergedTensor"]:
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
        return {name: piece[e] for part, piece in zip(self.parts, pieces) for e, name in enumerate(part)}

    def part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each stored part of a tensor of ``shape``."""
        out = list(shape[1:])
        if self.concat_dim is not None:
            if shape[self.concat_dim] % len(self.parts):
                raise ValueError(f"cannot split {list(shape)} into {len(self.parts)} equal parts")
            out[self.concat_dim - 1] //= len(self.parts)
        return tuple(out)


class RenamedWeights(WeightSource):
    """A source whose stored names differ from the model's ``state_dict`` names by transformers'
    load-time renamings (GPT-NeoX stores ``embed_out.weight`` for the model's ``lm_head.weight``;
    old checkpoints store LayerNorm ``gamma``/``beta``; Mixtral's ``block_sparse_moe`` is the
    model's ``mlp``) and merges (:class:`MergedTensor`: per-expert weights into the fused
    experts tensors). Tensors are asked for by model name; a merged one is built from its parts
    when it is read (one block's experts at a time)."""

    def __init__(self, inner: WeightSource, stored_by_model: dict[str, "str | MergedTensor"]):
        super().__init__()
        self.inner = inner
        self.description = inner.description
        self.private_tensors = inner.private_tensors
        consumed = {v for v in stored_by_model.values() if isinstance(v, str)}
        consumed |= {n for v in stored_by_model.values() if isinstance(v, MergedTensor) for part in v.parts for n in part}
        self._names = {name: name for name in inner.names() if name not in consumed}
        self._names.update(stored_by_model)

    @property
    def stored_dtype(self) -> torch.dtype | None:
        return self.inner.stored_dtype

    def layout(self) -> dict[str, "str | MergedTensor"]:
        return {name: stored for name, stored in self._names.items() if stored != name}

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        entry = self._names[name]
        if not isinstance(entry, MergedTensor):
            return self.inner.stored_shape(entry)
        stacks = []
        for part in entry.parts:
            shapes = {self.inner.stored_shape(n) for n in part}
            if None in shapes:
                return None
            if len(shapes) != 1:  # experts of different shapes cannot be stacked
                raise CheckpointError(f"{self.inner.file_of(part[0])}: the experts {part[0]} ... {part[-1]} have "
                                      f"different shapes ({sorted(shapes)})", hint="the checkpoint does not match its config.json")
            stacks.append((len(part), *shapes.pop()))
        if entry.concat_dim is None:
            return stacks[0]
        out = list(stacks[0])
        out[entry.concat_dim] = sum(stack[entry.concat_dim] for stack in stacks)
        return tuple(out)

    def file_of(self, name: str) -> str:
        entry = self._names[name]
        return self.inner.file_of(entry if isinstance(entry, str) else entry.parts[0][0])

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        wanted = []
        for n in names:
            entry = self._names[n]
            wanted += [x for part in entry.parts for x in part] if isinstance(entry, MergedTensor) else [entry]
        stored = self.inner.read(wanted)
        out = {}
        for n in names:
            entry = self._names[n]
            out[n] = entry.build(stored) if isinstance(entry, MergedTensor) else stored[entry]
        return out

    def close(self) -> None:
        self.inner.close()


def _merge_operations(converter) -> int | None | str:
    """``concat_dim`` of a converter that stacks experts along dim 0 and then (with two or more
    source patterns) concatenates the stacks along one dim; ``"unsupported"`` for any other."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops == [("MergeModulelist", 0)] and len(converter.source_patterns) == 1:
        return None
    if len(ops) == 2 and ops[0] == ("MergeModulelist", 0) and ops[1][0] == "Concatenate" \
            and isinstance(ops[1][1], int) and len(converter.source_patterns) >= 2:
        return ops[1][1]
    return "unsupported"


def _pattern_regex(pattern: str) -> "re.Pattern":
    """A converter source pattern (``.experts.*.w1.weight``) as a regex capturing the index."""
    import re

    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def checkpoint_renames(model: nn.Module, stored: Iterable[str]) -> dict[str, "str | MergedTensor"] | None:
    """Model name -> stored name (or :class:`MergedTensor`) for the stored tensors transformers
    renames or merges on load, ``{}`` when none is, or ``None`` when some stored tensor is
    converted in another way than stacking experts (then the checkpoint cannot be read tensor
    by tensor, and is loaded whole).

    Uses transformers' own conversion list for ``model`` (by class name, model type and the
    legacy renamings), so the names are the ones ``from_pretrained`` would give."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # another transformers: no load-time renaming known
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out: dict = {}
    merged: dict[str, dict] = {}  # target -> {"converter", "parts": {pattern index: {expert: stored}}}
    for name in stored:
        renamed, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            if renamed != name:
                out[renamed] = name
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        found = _pattern_regex(pattern).search(name)
        if found is None or _merge_operations(converter) == "unsupported":
            return None
        entry = merged.setdefault(renamed, {"converter": converter, "parts": {}})
        entry["parts"].setdefault(converter.source_patterns.index(pattern), {})[int(found.group(1))] = name
    for target, entry in merged.items():
        converter, parts = entry["converter"], entry["parts"]
        if sorted(parts) != list(range(len(converter.source_patterns))):
            return None  # a pattern with no stored tensor
        experts = sorted(parts[0])
        if experts != list(range(len(experts))) or any(sorted(p) != experts for p in parts.values()):
            return None  # experts missing in one of the parts
        out[target] = MergedTensor(tuple(tuple(parts[i][e] for e in experts) for i in sorted(parts)),
                                   _merge_operations(converter))
    return out


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
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

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
        import numpy as np
        from gguf import dequantize

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
        import mmap

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


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory) and its
    buffers real (rotary frequencies are computed in ``__init__``), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

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

    skip = set(skip)
    wanted = {}
    for name in state_names(module):
        current = module.get_parameter(name) if _is_param(module, name) else module.get_buffer(name)
        if name in skip or (current is not None and current.device.type != "meta"):
            continue
        found = source_name(source, _key(prefix, name), base_prefix)
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

    def layout(self) -> dict[str, "str | MergedTensor"]:
        return self.base.layout()

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        return self._names[name].stored_shape(name)

    def file_of(self, name: str) -> str:
        return self._names[name].file_of(name)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        out = self.top.read([n for n in names if self._names[n] is self.top])
        out.update(self.base.read([n for n in names if self._names[n] is self.base]))
        return out
