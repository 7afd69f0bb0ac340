"""A cache of dequantised GGUF weights, so a GGUF model loads like a safetensors folder.

Reading a GGUF file means parsing its metadata (the tokenizer's whole vocabulary, in Python:
seconds, and ~170 MB of objects for the bundled 135M model) and dequantising every tensor of a
block each time a walk reads it. The first run of a GGUF file therefore writes its dequantised
weights once, tensor by tensor, as float32 safetensors (exactly the values transformers'
loader builds; GGUF's dequantised values need float32's mantissa), with ``config.json``,
``generation_config.json`` and the tokenizer, into

    $PRUNE_CLI_CACHE (default: $XDG_CACHE_HOME/prune-cli, else ~/.cache/prune-cli) /gguf/<name>-<digest>/

keyed by :func:`~prune_cli.checkpoint.files.file_digest` of the GGUF file (its identity: device,
inode, size, modification and change times; and a sha256 of its content up to 1 GiB), so a file
changed in any byte, or replaced, gets a folder of its own; every later run reads that folder
(``pread``, one tensor at a time; its headers checked first, a damaged cache is rebuilt, and its
use said in the log). ``PRUNE_CLI_GGUF_CACHE=0`` turns the cache off. A cache
that would leave less than its own size free on the disk is not written (said in the log). The
model stays a GGUF source for everything else: its report, its resume fingerprint, and its save
dtype (``auto``: bfloat16).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from prune_cli.checkpoint.files import check_weight_files, file_digest
from prune_cli.checkpoint.model_state import empty_model, state_names, tied_names
from prune_cli.checkpoint.shards import StreamingCheckpoint, TensorSpec
from prune_cli.checkpoint.weights import GGUFWeights
from prune_cli.core.errors import CheckpointError

log = logging.getLogger(__name__)

DONE = "prune-cli-gguf-cache.json"


def cache_root() -> Path:
    if os.environ.get("PRUNE_CLI_CACHE"):
        return Path(os.environ["PRUNE_CLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "prune-cli"


def enabled() -> bool:
    return os.environ.get("PRUNE_CLI_GGUF_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def folder_for(gguf: Path) -> Path:
    return cache_root() / "gguf" / f"{gguf.stem}-{file_digest(gguf)}"


_SAID: set[Path] = set()  # cache folders checked in this process


def _damage(folder: Path) -> str | None:
    """What is wrong with a cache folder whose done-marker is there (``None``: nothing): the
    marker, ``config.json`` and the weight files' headers are checked (not the tensors' bytes,
    so it costs milliseconds). Only damage from outside (a disk error, a hand edit) can do this:
    the folder is renamed into place complete."""


    try:
        marker = json.loads((folder / DONE).read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if not isinstance(marker, dict) or not isinstance(config, dict):
        return f"{DONE} or config.json is not a JSON object"
    try:
        check_weight_files(folder)
    except CheckpointError as exc:
        return exc.message
    return None


def cached(gguf: Path) -> Path | None:
    """The cache folder of ``gguf`` if it is complete and intact (checked once per process), else
    None (a damaged one is said in the log and rebuilt by :func:`build`)."""
    folder = folder_for(gguf)
    if not (folder / DONE).is_file():
        return None
    if folder not in _SAID:
        damage = _damage(folder)
        if damage is not None:
            log.warning("the dequantised-weights cache %s is damaged (%s): it is rebuilt from %s", folder, damage, gguf.name)
            return None
        _SAID.add(folder)
    return folder


def build(gguf: Path, config, tokenizer) -> Path | None:
    """Write the cache of ``gguf`` (see the module docstring); returns its folder, or None when
    it was not written (disabled, too little disk, an unwritable cache folder)."""


    if not enabled():
        return None
    folder = folder_for(gguf)
    if cached(gguf) is not None:
        return folder
    model = empty_model(config, torch.float32)
    weights = GGUFWeights(gguf, model)
    tied = tied_names(model)
    params = dict(model.named_parameters())
    specs = [TensorSpec(n, tuple((params[n] if n in params else model.get_buffer(n)).shape), torch.float32)
             for n in state_names(model) if n not in tied and n in weights]
    size = sum(s.nbytes for s in specs)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder.parent).free
    except OSError as exc:
        log.info("not caching the dequantised GGUF weights (%s: %s)", folder.parent, exc.strerror or exc)
        return None
    if free < 2 * size:
        log.info("not caching the dequantised GGUF weights: %.1f GB needed, %.1f GB free in %s", size / 1e9, free / 1e9,
                 folder.parent)
        return None
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        files = StreamingCheckpoint(staging, specs, max_shard_bytes=2 << 30)
        for spec in specs:
            files.write(spec.name, weights.read([spec.name])[spec.name])
        files.finish()
        plain = config.__class__.from_dict(config.to_dict())
        if hasattr(plain, "quantization_config"):
            del plain.quantization_config
        plain.dtype = "float32"
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / DONE).write_text(json.dumps({"gguf": str(gguf), "bytes": size}) + "\n")
        if folder.exists():  # a damaged cache (cached() said so): ours to replace
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if (folder / DONE).is_file():  # another run finished it first
            return folder
        log.info("not caching the dequantised GGUF weights (%s)", exc.strerror or exc)
        return None
    finally:
        weights.close()
    log.info("cached the dequantised weights of %s in %s (%.2f GB): later runs read them from there", gguf.name, folder,
             size / 1e9)
    return folder
