"""Writing a checkpoint's weights as blocks finish, never holding the whole model.

Every tensor's name, shape and dtype is known before the first block is touched (from the
model's structure and the save dtype), so the shard files are laid out up front: each shard's
safetensors header is written at once, the file is sized to its final length, and each finished
block's tensors are written straight to their byte ranges (``os.pwrite``). The result is
byte-for-byte an ordinary safetensors file (``safe_open``, ``transformers`` and every other
reader load it), written with O(one block) memory, in any order, and resumable: a block is
simply written again.

The layout (https://github.com/huggingface/safetensors)::

    u64 little-endian N | N bytes of JSON header, padded with spaces to a multiple of 8 | data

and the header maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative
to the data section. Shards: one file ``model.safetensors`` when everything fits in
``max_shard_bytes``, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {name: file}}``),
the names ``save_pretrained`` uses.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def shard_files(specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive groups of ``specs``, each at most ``max_shard_bytes`` (a tensor larger than that
    gets a shard of its own), in order."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return [g for g in groups if g]


def _header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    entries: dict = {"__metadata__": {"format": "pt"}}
    ranges = {}
    offset = 0
    for spec in specs:
        ranges[spec.name] = (offset, offset + spec.nbytes)
        entries[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges


class StreamingCheckpoint:
    """The weight files of one checkpoint in ``folder``, laid out for ``specs`` (see the module
    docstring). ``resume=True`` reopens files an interrupted run laid out (their headers must be
    the same) instead of creating them."""

    def __init__(self, folder: str | Path, specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 resume: bool = False):
        self.folder = Path(folder)
        groups = shard_files(specs, max_shard_bytes)
        n = len(groups)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.specs = {s.name: s for s in specs}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file index, absolute offset)
        self._fds: list[int] = []
        for index, (name, group) in enumerate(zip(self.files, groups, strict=False)):
            head, ranges = _header(group)
            path = self.folder / name
            if resume:
                fd = os.open(path, os.O_RDWR)
                if os.pread(fd, len(head), 0) != head:
                    os.close(fd)
                    raise ValueError(f"{path} was laid out for other tensors")
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + sum(s.nbytes for s in group))
            self._fds.append(fd)
            for spec_name, (begin, _) in ranges.items():
                self._where[spec_name] = (index, len(head) + begin)
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor, chunk_bytes: int = 64 << 20) -> None:
        """Write ``tensor`` (the planned shape; a floating tensor is cast to the planned dtype)
        at its place, ``chunk_bytes`` at a time: a cast never copies the whole tensor."""
        spec = self.specs[name]
        same_kind = tensor.dtype == spec.dtype or (tensor.is_floating_point() and spec.dtype.is_floating_point)
        if tuple(tensor.shape) != spec.shape or not same_kind:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} {list(spec.shape)}")
        flat = tensor.detach().reshape(-1)
        per_chunk = max(1, chunk_bytes // max(1, torch.empty((), dtype=spec.dtype).element_size()))
        index, offset = self._where[name]
        for start in range(0, flat.numel(), per_chunk):
            part = flat[start : start + per_chunk].to(device="cpu", dtype=spec.dtype).contiguous()
            data = memoryview(part.view(torch.uint8).numpy())
            done = 0
            while done < len(data):
                done += os.pwrite(self._fds[index], data[done:], offset + done)
            offset += len(data)
        self.written.add(name)

    def missing(self) -> list[str]:
        return [name for name in self.specs if name not in self.written]

    def finish(self) -> list[str]:
        """Flush the files, write the index when sharded; returns the files written."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[0]}")
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        if len(self.files) > 1:
            file_of = {name: self.files[index] for name, (index, _) in self._where.items()}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                     "weight_map": {name: file_of[name] for name in self.specs}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            return [*self.files, INDEX_FILE]
        return list(self.files)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()
