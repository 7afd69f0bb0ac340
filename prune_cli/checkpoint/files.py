"""Cheap integrity checks of a checkpoint folder's files, run before anything loads them.

A damaged checkpoint (an interrupted copy or download, a half-written file) is the user's to
fix: these checks turn it into a :class:`~prune_cli.core.errors.CheckpointError` (exit code 2) with
one line naming the file and what is wrong, instead of an error deep inside ``safetensors`` or
``transformers`` (exit code 1), or a component silently skipped.

The safetensors layout (https://github.com/huggingface/safetensors)::

    bytes [0, 8)          N: the header's length, an unsigned 64-bit little-endian integer
    bytes [8, 8 + N)      the header: a UTF-8 JSON object (possibly padded with spaces)
                            {"__metadata__": {str: str}, (optional)
                             "<tensor name>": {"dtype": "F32", "shape": [4, 4],
                                               "data_offsets": [begin, end]}, ...}
    bytes [8 + N, EOF)    the data section: every tensor's raw bytes, where ``data_offsets``
                          are relative to the data section's start (``end`` exclusive)

The tensors' byte ranges tile the data section, so a complete file's size is exactly
``8 + N + max(end)``. :func:`check_safetensors` reads the 8 bytes and the header only (never
the tensors), so it costs the same on a 100 MB file as on a 100 GB one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader
from tokenizers import Tokenizer

from prune_cli.core.errors import CheckpointError

log = logging.getLogger(__name__)

# The names of prune-cli's own files in a checkpoint folder (defined here only)
ACTIVATION_FILE = "activation_sparsity.safetensors"  # activation sparsifiers, never model weights
REPORT_FILE = "sparsity.json"
REPORT_FORMAT = "prune-cli/sparsity-report"
OWNER_FILE = ".prune-cli-owner.json"
WORK_FOLDER = ".work"  # in a staging folder: resume state and blocks kept between walks, never exported
_CHUNK = 64 << 20  # bytes hashed per read
INDEX_SUFFIX = ".safetensors.index.json"
# the names transformers looks for in a local folder, in its order (modeling_utils:
# _get_resolved_checkpoint_files): the single file first, then the index of the shards
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# The safetensors library refuses headers longer than this; anything longer is garbage.
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of the dtypes whose size is a whole number of bytes (others: unchecked).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

DAMAGED_HINT = "the file is damaged or incomplete (an interrupted copy, download or export?); copy or export it again"


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} has a corrupt header: {why}", hint=DAMAGED_HINT)


_FILE_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def check_regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) after checking it is a regular file: a named pipe
    would block the first ``open`` forever (nobody writes to it), a device could be endless.
    ``stat`` itself never blocks. Raises :class:`CheckpointError` naming the file and its kind."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a {what}", hint="pass a folder of ordinary files")
    return info


def _tensor_range(path: Path, name: str, entry) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, after checking its dtype, shape and offsets agree."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _corrupt(path, f"tensor {name!r} has no valid data_offsets")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _corrupt(path, f"tensor {name!r} has data_offsets [{begin}, {end}]")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has no valid shape")
    if dtype in DTYPE_BYTES:
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != need:
            raise _corrupt(path, f"tensor {name!r} ({dtype} {shape}) needs {need:,} bytes, its data_offsets span {end - begin:,}")
    return begin, end


def check_safetensors(path: str | Path) -> dict:
    """Check that ``path`` is a complete, well-formed safetensors file without loading its
    tensors; returns its header (tensor name -> ``{"dtype", "shape", "data_offsets"}``, and
    ``"__metadata__"`` when present).

    Raises :class:`CheckpointError` naming the file when it is missing or unreadable, shorter
    than its header says ("is truncated: X of Y bytes"), has a header that is not a JSON
    object of tensor entries or offsets outside the data section ("has a corrupt header"), or
    has bytes after its last tensor.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a safetensors file")
    check_regular_file(path, "safetensors file")
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            if size == 0:
                raise CheckpointError(f"{path} is empty (0 bytes)", hint=DAMAGED_HINT)
            if size < 8:
                raise CheckpointError(f"{path} is truncated: {size:,} of at least 8 bytes", hint=DAMAGED_HINT)
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"it declares a {length:,}-byte header")
            if 8 + length > size:
                raise CheckpointError(f"{path} is truncated: {size:,} of at least {8 + length:,} bytes", hint=DAMAGED_HINT)
            raw = handle.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a safetensors file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None

    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _corrupt(path, "it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"not JSON ({exc.msg} at byte {exc.pos})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"it is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not an object")

    data_bytes = 0
    for name, entry in header.items():
        if name != "__metadata__":
            data_bytes = max(data_bytes, _tensor_range(path, name, entry)[1])
    expected = 8 + length + data_bytes
    if size < expected:
        raise CheckpointError(f"{path} is truncated: {size:,} of {expected:,} bytes", hint=DAMAGED_HINT)
    if size > expected:
        raise CheckpointError(
            f"{path} is corrupt: {size:,} bytes, {size - expected:,} bytes more than its header describes ({expected:,})",
            hint=DAMAGED_HINT,
        )
    return header


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON ({what})", hint=DAMAGED_HINT) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _index_shards(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``*.index.json``, checked: an
    object of strings, each a plain file name in the index's own folder (``../x``, ``/x`` or
    ``sub/x`` would read a file outside the checkpoint)."""
    check_regular_file(index, "JSON file")
    data = _read_json(index, "the index of the weight shards")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no valid weight_map", hint=DAMAGED_HINT)
    for shard in sorted(set(weight_map.values())):
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file in {index.parent}",
                                  hint="an index names its shards by file name, in its own folder")
    return weight_map


_SAID: set = set()  # (folder, ignored files) already logged in this process


@dataclass
class WeightFiles:
    """The weight files of a model folder that are read, chosen as transformers chooses them
    (``files``), the index followed (``index``, ``None`` for a single file) and the files left
    alone (``ignored``: strays such as an old shard next to ``model.safetensors``)."""

    files: list[Path]
    index: Path | None = None
    ignored: list[Path] = field(default_factory=list)


def weight_files(folder: str | Path, kind: str = "safetensors") -> WeightFiles:
    """The ``kind`` (``"safetensors"`` or ``"bin"``) weight files of ``folder`` that a load reads,
    as ``transformers``' ``from_pretrained`` picks them in a local folder: ``model.safetensors``
    alone when it is there, else the shards ``model.safetensors.index.json`` names (same for
    ``pytorch_model.bin`` and its index). Every other ``*.safetensors`` (``pytorch_model*.bin``)
    is ignored, as transformers ignores it: reading it too let a stray file (an old shard)
    override the real weights. A folder with neither name (prune-cli's own scratch folders, a
    single oddly named file) reads all of its files; :func:`read_weight_headers` refuses a
    tensor name found in two of them. prune-cli's activation file is never a weight file."""
    folder = Path(folder)
    single, index_name = ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if kind == "safetensors"
                          else (BIN_WEIGHTS_NAME, BIN_WEIGHTS_INDEX_NAME))
    pattern = "*.safetensors" if kind == "safetensors" else "pytorch_model*.bin"
    present = sorted(p for p in folder.glob(pattern) if p.name != ACTIVATION_FILE)
    if os.path.lexists(folder / single):
        chosen, index = [folder / single], None
    elif (folder / index_name).exists():
        index = folder / index_name
        chosen = [folder / name for name in sorted(set(_index_shards(index).values()))]
    else:
        chosen, index = present, None
    ignored = [p for p in present if p not in chosen]
    if ignored and (folder, tuple(ignored)) not in _SAID:
        _SAID.add((folder, tuple(ignored)))
        log.info("reading the weights of %s from %s, as transformers does; ignoring %s", folder,
                 index.name if index else ", ".join(p.name for p in chosen), ", ".join(p.name for p in ignored))
    return WeightFiles(chosen, index, ignored)


def model_weight_files(folder: str | Path) -> WeightFiles:
    """The weight files a load of ``folder`` reads: its safetensors when it has any (or their
    index), else its ``pytorch_model*.bin`` (transformers prefers safetensors the same way)."""
    folder = Path(folder)
    if any(p.name != ACTIVATION_FILE for p in folder.glob("*.safetensors")) or list(folder.glob(f"*{INDEX_SUFFIX}")):
        return weight_files(folder)
    return weight_files(folder, "bin")


def read_weight_headers(folder: str | Path) -> tuple[WeightFiles, dict[Path, dict]]:
    """The safetensors weight files a load reads (:func:`weight_files`) and their headers, each
    file checked (:func:`check_safetensors`), the index's shards present and holding what it
    places in them, and no tensor name in two of the files (which one a reader takes would
    depend on the order it reads them in). Raises :class:`CheckpointError` naming the files."""
    folder = Path(folder)
    chosen = weight_files(folder)
    headers: dict[Path, dict] = {}
    for path in chosen.files:
        if chosen.index is not None and not os.path.lexists(path):
            raise CheckpointError(f"{chosen.index.name} names {path.name}, which is missing from {folder}",
                                  hint="the checkpoint is incomplete; copy or download every shard")
        headers[path] = check_safetensors(path)
    if chosen.index is not None:
        for name, shard in _index_shards(chosen.index).items():
            if name not in headers[folder / shard]:
                raise CheckpointError(f"{chosen.index.name} places {name} in {shard}, which does not hold it",
                                      hint=DAMAGED_HINT)
    first: dict[str, Path] = {}
    for path, header in headers.items():
        for name in header:
            if name == "__metadata__":
                continue
            if name in first:
                raise CheckpointError(
                    f"tensor {name} is in both {first[name]} and {path}: which one is the model's is ambiguous",
                    hint="remove the stray file (an old shard or a leftover copy) from the folder")
            first[name] = path
    return chosen, headers


def check_weight_files(folder: str | Path) -> None:
    """Check the weight files of a model folder: the ones a load reads
    (:func:`read_weight_headers`: complete, consistent with their index, no tensor in two of
    them), and every other top-level ``*.safetensors`` file and ``*.safetensors.index.json``
    there, which must be whole too (a damaged file in a model folder is a damaged copy, even
    where the load would not read it). Folders without safetensors (``pytorch_model.bin``,
    GGUF) pass untouched."""
    folder = Path(folder)
    stored = [p for p in sorted(folder.glob("*.safetensors")) if p.name != ACTIVATION_FILE]
    read: set[Path] = set()
    if stored or (folder / SAFE_WEIGHTS_INDEX_NAME).exists():
        _, headers = read_weight_headers(folder)  # the files a load reads, each header parsed once
        read = set(headers)
        log.debug("checked %d safetensors weight file(s) in %s", len(headers), folder)
    for path in stored:
        if path not in read and not path.is_dir():  # a broken link: "is missing"
            check_safetensors(path)
    for index in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
        weight_map = _index_shards(index)
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"{index.name} names {shard}, which is missing from {folder}",
                    hint="the checkpoint is incomplete; copy or download every shard",
                )


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer_files(folder: str | Path) -> None:
    """Check the tokenizer files of a model folder before transformers reads them: each JSON file
    present is a regular file holding a UTF-8 JSON object, and ``tokenizer.json`` is one the
    ``tokenizers`` library parses, with the ``added_tokens`` list transformers reads from it.
    Damaged ones were a ``KeyError`` or a decoding error deep inside transformers (exit 1, or a
    message naming neither the file nor the problem). Raises :class:`CheckpointError`."""
    folder = Path(folder)
    for name in TOKENIZER_JSON_FILES:
        path = folder / name
        if not os.path.lexists(path):
            continue
        check_regular_file(path, "JSON file")
        data = _read_json(path, "the tokenizer")
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is a JSON {type(data).__name__}, not an object", hint=DAMAGED_HINT)
        if name != "tokenizer.json":
            continue
        if not isinstance(data.get("added_tokens"), list) or not isinstance(data.get("model"), dict):
            missing = "added_tokens" if not isinstance(data.get("added_tokens"), list) else "model"
            raise CheckpointError(f"{path} has no valid {missing!r} entry: not a complete tokenizers file", hint=DAMAGED_HINT)

        try:
            Tokenizer.from_str(json.dumps(data))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path} is not a tokenizer the tokenizers library can read: {first}",
                                  hint=DAMAGED_HINT) from None


def _gguf_value(reader, key: str):
    """A GGUF metadata value (a scalar, a string or a list), or None when absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _positive_ints(path: Path, key: str, value, required: bool) -> list[int]:
    """``value`` (an int, or a list of per-layer ints) as a list, each checked to be >= 1."""
    if value is None:
        if required:
            raise CheckpointError(f"{path}: its metadata has no {key}", hint=DAMAGED_HINT)
        return []
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise CheckpointError(f"{path}: its metadata says {key} = {value!r}, it must be a positive whole number",
                              hint=DAMAGED_HINT)
    return values


def check_gguf(path: str | Path) -> None:
    """Check a GGUF file before transformers parses it into a config and a name map: that it is
    a regular, readable GGUF file (a truncated one, or a corrupt key/value count, failed deep in
    the reader with ``unpack_from`` or a NumPy error naming neither the file nor the problem),
    and that its metadata agrees with its tensors: ``<arch>.block_count`` equals the number of
    ``blk.N`` blocks it holds (3000 declared with 30 held hung transformers' name map for
    minutes), ``embedding_length``, ``head_count`` (``head_count_kv``, ``feed_forward_length``,
    ``context_length`` where present) are positive (0 ended in a ``ZeroDivisionError``), and
    ``embedding_length`` is the width of ``token_embd.weight``. Parses the metadata once
    (seconds for a large vocabulary). Raises :class:`CheckpointError` naming the file."""

    path = Path(path)
    check_regular_file(path, "GGUF file")

    try:
        reader = GGUFReader(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - struct.error, ValueError, IndexError, MemoryError of a damaged file
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable GGUF file: truncated or corrupt ({why})",
                              hint=DAMAGED_HINT) from None
    arch = _gguf_value(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"{path}: its metadata has no general.architecture", hint=DAMAGED_HINT)
    blocks = _positive_ints(path, f"{arch}.block_count", _gguf_value(reader, f"{arch}.block_count"), True)[0]
    held = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if held != set(range(blocks)):
        holds = f"{len(held)} (blk.{min(held)} to blk.{max(held)})" if held else "none"
        raise CheckpointError(f"{path}: its metadata says {arch}.block_count = {blocks}, its tensors hold blocks: {holds}",
                              hint=DAMAGED_HINT)
    width = _positive_ints(path, f"{arch}.embedding_length", _gguf_value(reader, f"{arch}.embedding_length"), True)[0]
    heads = _positive_ints(path, f"{arch}.attention.head_count", _gguf_value(reader, f"{arch}.attention.head_count"), True)
    for key in ("attention.head_count_kv", "feed_forward_length", "context_length"):
        _positive_ints(path, f"{arch}.{key}", _gguf_value(reader, f"{arch}.{key}"), False)
    if _gguf_value(reader, f"{arch}.attention.key_length") is None and any(width % h for h in heads):
        raise CheckpointError(f"{path}: its metadata says {arch}.embedding_length = {width}, which "
                              f"{arch}.attention.head_count = {heads[0]} does not divide", hint=DAMAGED_HINT)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is not None and int(embedding.shape[0]) != width:
        raise CheckpointError(f"{path}: its metadata says {arch}.embedding_length = {width}, its token_embd.weight "
                              f"is {int(embedding.shape[0])} wide", hint=DAMAGED_HINT)


def check_checkpoint_folder(folder: str | Path, report: dict | None = None) -> None:
    """Check a checkpoint folder before loading it: its weight files (:func:`check_weight_files`),
    that ``sparsity.json`` parses when present, and that every component the report declares is
    there and intact (``"activation"`` -> ``activation_sparsity.safetensors``). ``report`` is the
    parsed ``sparsity.json``; ``None`` reads it from the folder. Raises :class:`CheckpointError`."""
    folder = Path(folder)
    check_weight_files(folder)
    if report is None and (folder / REPORT_FILE).exists():
        report = _read_json(folder / REPORT_FILE, "prune-cli's sparsity report")
        if not isinstance(report, dict):
            raise CheckpointError(f"{folder / REPORT_FILE} is not a JSON object", hint=DAMAGED_HINT)
    activation = folder / ACTIVATION_FILE
    declared = bool(report and report.get("activation"))
    if declared and not activation.exists():
        raise CheckpointError(
            f"{ACTIVATION_FILE} is missing from {folder}, but its {REPORT_FILE} declares activation sparsity",
            hint="the checkpoint is incomplete; copy or export it again (without the file it would evaluate dense)",
        )
    if activation.exists():
        check_safetensors(activation)


# Files up to this size are hashed whole (sha256, 8 MiB at a time): at hashlib's ~1 GB/s on one
# core that costs at most about a second, less than parsing the model's config and tokenizer,
# and nothing next to a run that reads every weight at least once. Larger files are keyed by
# their identity alone (see file_digest).
FULL_HASH_BYTES = 1 << 30
_HASH_CHUNK = 8 << 20
_DIGESTS: dict[tuple, str] = {}  # (path, identity) -> digest, for this process


def file_identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    """``(device, inode, size, mtime_ns, ctime_ns)`` of a file's ``stat``."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def file_digest(path: str | Path) -> str:
    """First 16 hex digits of a sha256 that changes whenever the file at ``path`` changes: it
    keys the dense-baseline cache, the resume fingerprint's model files and the dequantised
    GGUF cache, which must never hand back results computed from other bytes.

    What goes in, and why:

    * always the file's identity (:func:`file_identity`): device, inode, size, and the
      modification and status-change times in nanoseconds. Every write to a file moves its
      mtime and ctime; a file replaced by another (a new download, ``rsync``, ``cp`` over it
      into a new file) has a new inode; ``touch -d`` / ``cp -p`` can set the mtime back, but
      nothing short of changing the clock sets the ctime back. A copy elsewhere, a ``chmod``
      or a new hard link give another digest too: a cache miss (a resume refused, naming the
      file), never a stale hit;
    * and, for a file of at most :data:`FULL_HASH_BYTES` (config, tokenizer, index, the weights
      of small models), a sha256 of its whole content: timestamps move in clock ticks (a few
      ms; whole seconds on FAT, some network file systems), so a small file rewritten within
      one tick of the state a cache saw could keep its identity; a multi-GB file cannot be
      rewritten that fast, and hashing it whole would cost seconds to minutes on every run.

    (It used to hash the size and the first and last MiB, so a same-size edit in the middle of
    a file kept its digest and every cache above served stale results.) Computed once per
    process per file identity. Raises :class:`CheckpointError` for a missing or non-regular
    file (a named pipe would block the read forever)."""

    path = Path(path)
    info = check_regular_file(path)
    identity = file_identity(info)
    key = (str(path.absolute()), identity)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256(json.dumps(identity).encode())
    if info.st_size <= FULL_HASH_BYTES:
        digest.update(content_sha256(path).encode())
    _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


_CONTENT: dict[tuple, str] = {}  # (path, identity) -> sha256 of the bytes, for this process


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, all 64 hex digits (what ``sha256sum`` and the hub show),
    read 8 MiB at a time; computed once per process per file identity, so the cache keys
    (:func:`file_digest`) and the model card's GGUF hash read a file once between them.
    Raises :class:`CheckpointError` for a missing, non-regular or unreadable file."""

    path = Path(path)
    key = (str(path.absolute()), file_identity(check_regular_file(path)))
    if key not in _CONTENT:
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        _CONTENT[key] = digest.hexdigest()
    return _CONTENT[key]


def tensor_digests(folder: str | Path, files: list[str] | None = None) -> dict[str, str]:
    """``name -> first 16 hex digits of sha256(stored bytes)`` for every tensor of the weight
    files in ``folder`` (``files``: which; default the weight files a load reads, as
    :func:`~prune_cli.checkpoint.files.weight_files` picks them), read ``64 MiB`` at a time with ``pread``."""

    folder = Path(folder)
    paths = [folder / f for f in files] if files is not None else weight_files(folder).files
    out = {}
    for path in paths:
        header = check_safetensors(path)
        with path.open("rb") as handle:
            start = 8 + int.from_bytes(handle.read(8), "little")
            fd = handle.fileno()
            for name, entry in sorted(header.items(), key=lambda item: item[0]):
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                digest = hashlib.sha256()
                for offset in range(begin, end, _CHUNK):
                    digest.update(os.pread(fd, min(_CHUNK, end - offset), start + offset))
                out[name] = digest.hexdigest()[:16]
    return out
