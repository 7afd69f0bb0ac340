"""Resuming an interrupted compress run from its last finished block.

A run's staging folder holds everything a later ``--resume`` needs, in ``.work/resume``:

* ``state.json``: the run's fingerprint (model files, resolved recipe, token windows, devices and
  dtypes, versions), the walks already finished with their stages' results, and the walk in
  progress with the position of the next block;
* ``state-N.safetensors``: the tensors of that state (every stream's hidden states, kept
  inputs, statistics, the sampling generators' states);
* next to it, what the walks already wrote: the finished blocks' bytes in the laid-out weight
  shards, blocks kept for a later walk (``.work/blocks``), activation-sparsity tensors.

The state is written after a block once ``interval`` seconds have passed since the last write
(``0``: after every block), when a stop was asked for (Ctrl-C, SIGTERM), and after a walk's last
block; each write is a new tensor file and an atomic rename of ``state.json``, so a crash at any
moment leaves the previous state whole. A resumed run replays the same walks: finished ones are
skipped (their stages get their results back), the one in progress restarts at its next block
with its streams restored bit for bit, so the checkpoint is bit-identical to an uninterrupted
run's.

Stage state: ``stage.state_dict()`` returns JSON-able data in which tensors (or lists / dicts of
them) may appear; ``stage.load_state_dict(state)`` puts it back (after ``begin`` for the walk in
progress, instead of the walk for a finished one).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prune_cli.calibrators.spill import FileTensor
from prune_cli.checkpoint.files import WORK_FOLDER
from prune_cli.core.errors import BadInputError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT = "prune-cli/resume-state"
FORMAT_VERSION = 1


class ResumeMismatchError(BadInputError):
    """The interrupted run was started with another model, recipe or data."""


def _flatten(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def differences(old: dict, new: dict, limit: int = 3) -> list[str]:
    """``key: old -> new`` for the first ``limit`` settings that differ between two fingerprints."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def changed_model_files(old: dict, new: dict) -> list[str]:
    """The model files (by path) whose digest differs between two run fingerprints, or that one
    of them lacks; ``[]`` when the model's files are the same (or it is another model)."""
    a, b = old.get("model") or {}, new.get("model") or {}
    if {k: v for k, v in a.items() if k != "files"} != {k: v for k, v in b.items() if k != "files"}:
        return []  # another model altogether: said as a difference of the fingerprints
    before, now = a.get("files") or {}, b.get("files") or {}
    folder = Path(b.get("location") or ".")
    return [str(folder / name) for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]


class _Tensors:
    """Splits tensors out of nested state data (into ``{"__tensor__": key}`` markers) and back."""

    def __init__(self, folder: Path | None = None, stamp: str = "") -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.folder, self.stamp = folder, stamp
        self.files: list[str] = []  # spilled tensors linked into the state folder

    def pack(self, data):

        if isinstance(data, FileTensor):  # spilled hidden states: linked, never read
            name = f"{self.stamp}-f{len(self.files)}.safetensors"
            data.link(self.folder / name)
            self.files.append(name)
            return {"__file__": name, "__shape__": list(data.shape), "__dtype__": str(data.dtype), "__device__": data.device}
        if isinstance(data, torch.Tensor):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = data.detach().cpu().contiguous().clone()
            return {"__tensor__": key, "__device__": str(data.device)}
        if isinstance(data, torch.Generator):
            return {"__generator__": self.pack(data.get_state())}
        if isinstance(data, dict):
            return {"__dict__": [[k, self.pack(v)] for k, v in data.items()]}
        if isinstance(data, (list, tuple)):
            return [self.pack(v) for v in data]
        return data

    @staticmethod
    def unpack(data, tensors: dict[str, torch.Tensor], folder: Path | None = None):
        if isinstance(data, dict):
            if "__file__" in data:

                dtype = getattr(torch, data["__dtype__"].split(".")[-1])
                saved = FileTensor(Path(folder) / data["__file__"], tuple(data["__shape__"]), dtype, data["__device__"])
                # a link of its own: the state's files are replaced by the next write, a restored
                # handle (the Fisher pass's kept inputs) must outlive that
                return saved.link(Path(folder) / f"live-{time.time_ns()}-{data['__file__']}")
            if "__tensor__" in data:
                return tensors[data["__tensor__"]].to(data["__device__"])
            if "__generator__" in data:
                generator = torch.Generator()
                generator.set_state(_Tensors.unpack(data["__generator__"], tensors, folder).cpu())
                return generator
            if "__dict__" in data:
                return {k: _Tensors.unpack(v, tensors, folder) for k, v in data["__dict__"]}
        if isinstance(data, list):
            return [_Tensors.unpack(v, tensors, folder) for v in data]
        return data


class ResumeState:
    """The resume state of one run in ``staging/.work/resume`` (see the module docstring)."""

    def __init__(self, staging: Path, fingerprint: dict, interval: float = 30.0):
        self.folder = Path(staging) / WORK_FOLDER / "resume"
        self.fingerprint = fingerprint
        self.interval = interval
        self.finished: dict[int, object] = {}  # walk id -> packed finished states
        self.current: dict | None = None  # {"walk", "position", "states"} of the walk in progress
        self.tensor_file: str | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._last_write = time.monotonic()
        self.resumed_from: dict | None = None
        self.blocks_done = 0
        self._files: list[str] = []  # spilled tensors the current state links to

    # -------------------------------------------------------------- reading

    @staticmethod
    def saved_progress(staging: Path) -> dict | None:
        """What an interrupted run in ``staging`` got done: ``{"walks", "position",
        "blocks_done", "fingerprint"}``, or None when it left no resume state."""
        path = Path(staging) / WORK_FOLDER / "resume" / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("format") != FORMAT:
            return None
        return data

    def load(self) -> bool:
        """Read an existing state; True when there was one to resume. Raises
        :class:`ResumeMismatchError` when it belongs to another model, recipe or data."""
        data = self.saved_progress(self.folder.parent.parent)
        if data is None:
            return False
        if data.get("format_version") != FORMAT_VERSION or data.get("fingerprint") != self.fingerprint:
            changed = changed_model_files(data.get("fingerprint") or {}, self.fingerprint)
            if changed:
                raise ResumeMismatchError(
                    f"cannot resume: {', '.join(changed)} changed since the interrupted run started "
                    "(its size, time stamps or content differ); the blocks done so far were computed from the old file",
                    hint="pass --no-resume to start over on the model as it is now",
                )
            diff = differences(data.get("fingerprint") or {}, self.fingerprint)
            raise ResumeMismatchError(
                "cannot resume: the interrupted run used another " + "; ".join(diff),
                hint="rerun the same command with --resume, or pass --no-resume to start over",
            )

        self.tensor_file = data.get("tensors")
        self._files = list(data.get("files", []))
        self._tensors = load_file(str(self.folder / self.tensor_file)) if self.tensor_file else {}
        self.finished = {int(k): v for k, v in data["finished"].items()}
        self.current = data.get("current")
        self.blocks_done = int(data.get("blocks_done", 0))
        self.resumed_from = {"walk": (self.current or {}).get("walk", len(self.finished)),
                             "position": (self.current or {}).get("position", 0), "blocks_done": self.blocks_done}
        files = (self.fingerprint.get("model") or {}).get("files") or {}
        log.info("adopting the resume state written %s (%d blocks done): model files unchanged (%s), same recipe, "
                 "tokens and versions", data.get("written", "?"), self.blocks_done,
                 ", ".join(f"{name} {digest}" for name, digest in sorted(files.items())) or "not local")
        return True

    def finished_states(self, walk: int) -> list | None:
        if walk not in self.finished:
            return None
        return _Tensors.unpack(self.finished[walk], self._tensors, self.folder)

    def current_states(self, walk: int) -> tuple[int, list] | None:
        """``(position of the next block in the walk, the stages' states)`` when ``walk`` is the
        one that was in progress."""
        if self.current is None or self.current["walk"] != walk:
            return None
        return self.current["position"], _Tensors.unpack(self.current["states"], self._tensors, self.folder)

    # -------------------------------------------------------------- writing

    def due(self, force: bool = False) -> bool:
        return force or self.interval <= 0 or time.monotonic() - self._last_write >= self.interval

    def block_done(self, walk: int, position: int, stages, force: bool = False) -> bool:
        """A block of ``walk`` is done (``position``: the next block's place in the walk); writes
        the state when due. Returns whether it wrote."""
        self.blocks_done += 1
        if not self.due(force):
            return False
        self._write(current={"walk": walk, "position": position, "states": [s.state_dict() for s in stages]})
        return True

    def walk_done(self, walk: int, stages) -> None:
        self.finished[walk] = [s.state_dict() for s in stages]
        self._write(current=None, fresh_finished=walk)

    def _write(self, current: dict | None, fresh_finished: int | None = None) -> None:

        self.folder.mkdir(parents=True, exist_ok=True)
        base = f"state-{time.time_ns()}"
        stamp = f"{base}.safetensors"
        packer = _Tensors(self.folder, base)
        # finished walks' tensors are re-packed into each file, so one file holds the whole state
        finished = {}
        for walk, packed in self.finished.items():
            value = packed if walk == fresh_finished else _Tensors.unpack(packed, self._tensors, self.folder)
            finished[str(walk)] = packer.pack(value)
        packed_current = None if current is None else {**current, "states": packer.pack(current["states"])}
        save_file(packer.tensors, str(self.folder / stamp))
        data = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "finished": finished, "current": packed_current, "tensors": stamp, "files": packer.files,
            "blocks_done": self.blocks_done, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.folder / STATE_FILE)
        old, self.tensor_file = self.tensor_file, stamp
        old_files, self._files = self._files, packer.files
        self._tensors = packer.tensors
        self.finished = {int(k): v for k, v in finished.items()}
        if old and old != stamp:
            (self.folder / old).unlink(missing_ok=True)
        for name in old_files:
            (self.folder / name).unlink(missing_ok=True)
        self._last_write = time.monotonic()
