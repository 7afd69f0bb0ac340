"""``prune-cli verify CHECKPOINT``: does a checkpoint hold what its report says?

A prune-cli checkpoint's report (``sparsity.json``) records, at export, the sha256 of every
stored tensor's bytes (``tensors_sha256``; first 16 hex digits, :func:`tensor_digests`) and, per
pruned layer, its pattern and the fraction of exact zeros. ``verify`` re-reads the weight
files, one tensor at a time, and checks:

1. the files the report lists are there and whole (the checks ``eval`` makes too);
2. every stored tensor's bytes against its recorded hash, and no tensor missing or extra;
3. per pruned layer, recomputed from the stored weight: the fraction of zeros equals the
   recorded one (within ``ZERO_TOLERANCE``: rounding to a narrower save dtype may flush a few
   tiny kept values), and an N:M layer keeps at most N of every M weights along each row's
   input dimension (GPT-2's Conv1D weights are stored ``(in, out)``; read as the Linear they are;
   a mixture-of-experts expert's weight is its slice of the fused experts tensor).

Any mismatch is a :class:`~prune_cli.core.errors.CheckpointError` naming the first tensor or layer
(exit 2), with the number of problems found; a checkpoint without recorded hashes (written by
an older prune-cli) is checked on 1 and 3 and says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from prune_cli.checkpoint.files import check_checkpoint_folder, tensor_digests
from prune_cli.checkpoint.model_state import check_stored_shapes, empty_model
from prune_cli.checkpoint.output import REPORT_FILE, REPORT_FORMAT
from prune_cli.checkpoint.renames import RenamedWeights, checkpoint_renames
from prune_cli.checkpoint.weights import SafetensorsWeights
from prune_cli.core.errors import CheckpointError
from prune_cli.core.records import REPORT_SCHEMA_VERSION
from prune_cli.model.conv1d import stored_transposed
from prune_cli.model.moe import ExpertLinear
from prune_cli.model.source import ModelSource
from prune_cli.runtime import ACTIVATION_FILE, check_activation_buffers
from prune_cli.streaming.loader import load_config

ZERO_TOLERANCE = 1e-4
_NM = re.compile(r"^(\d+):(\d+)$")


def verify_checkpoint(folder: str | Path) -> dict:
    """Check ``folder`` against its report (see the module docstring); returns a summary
    ``{"checkpoint", "tensors_checked", "layers_checked", "hashes_recorded"}``."""

    folder = Path(folder)
    report_path = folder / REPORT_FILE
    if not report_path.is_file():
        raise CheckpointError(f"{folder} has no {REPORT_FILE}: not a prune-cli checkpoint",
                              hint="verify checks a checkpoint written by prune-cli compress")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{report_path} is not valid JSON") from None
    check_report(report, report_path)
    check_checkpoint_folder(folder, report)  # weight files whole, declared components present
    _check_declared_shapes(folder)  # before any tensor is read or hashed
    _check_activation_file(folder)
    problems: list[str] = []
    for entry in report.get("files") or []:
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"file {entry['name']} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"file {entry['name']} has {path.stat().st_size} bytes, the report says {entry['bytes']}")
    digests = tensor_digests(folder)
    recorded = report.get("tensors_sha256")
    if recorded is not None:
        for name, digest in recorded.items():
            if name not in digests:
                problems.append(f"tensor {name} is missing from the weight files")
            elif digests[name] != digest:
                problems.append(f"tensor {name} differs from the report (sha256 {digests[name]}, recorded {digest})")
        problems += [f"tensor {name} is not in the report" for name in sorted(set(digests) - set(recorded))]
    layers = report.get("layers") or []
    if layers:
        problems += _check_layers(folder, layers)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"{folder}: {problems[0]}{more}",
                              hint="the checkpoint was changed after prune-cli wrote it, or the report belongs to another one")
    return {"checkpoint": str(folder), "tensors_checked": len(digests) if recorded is not None else 0,
            "layers_checked": len(layers), "hashes_recorded": recorded is not None}


def check_report(report, path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the key unless ``report`` is a
    prune-cli sparsity report this version reads, with the fields verify checks against in
    their types: a list, another tool's ``sparsity.json``, a newer schema version or ``{}``
    used to crash or to "verify" with nothing checked. Reports of older prune-cli versions
    (no ``schema_version``, no ``tensors_sha256``) pass."""

    hint = "verify checks the sparsity.json prune-cli compress wrote next to the weights"
    if not isinstance(report, dict):
        raise CheckpointError(f"{path} is not a JSON object but a {type(report).__name__}", hint=hint)
    if report.get("format") != REPORT_FORMAT:
        raise CheckpointError(f"{path} is not a prune-cli sparsity report (format {report.get('format')!r})", hint=hint)
    version = report.get("schema_version", REPORT_SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > REPORT_SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema_version {version!r}; this prune-cli reads up to {REPORT_SCHEMA_VERSION}",
                              hint="verify it with the prune-cli version that wrote it (see its versions.prune_cli)")
    fields = {
        "files": (list, lambda e: isinstance(e, dict) and isinstance(e.get("name"), str)
                  and isinstance(e.get("bytes"), int) and not isinstance(e.get("bytes"), bool)),
        "layers": (list, lambda e: isinstance(e, dict) and isinstance(e.get("name"), str)
                   and isinstance(e.get("achieved_sparsity"), (int, float)) and not isinstance(e.get("achieved_sparsity"), bool)),
        "tensors_sha256": (dict, None),
    }
    for key, (kind, entry_ok) in fields.items():
        value = report.get(key)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not a {kind.__name__}", hint=hint)
        if entry_ok is not None:
            bad = next((i for i, e in enumerate(value) if not entry_ok(e)), None)
            if bad is not None:
                raise CheckpointError(f"{path}: {key}[{bad}] is not a valid entry ({json.dumps(value[bad])[:80]})", hint=hint)
        elif not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise CheckpointError(f"{path}: {key} must map tensor names to hashes", hint=hint)


def _check_activation_file(folder: Path) -> None:
    """Every buffer of the checkpoint's activation file (thresholds, channel scales, low-rank
    factors, WINA's rotations) is finite (:func:`prune_cli.runtime.check_activation_buffers`),
    one tensor in memory at a time."""


    path = folder / ACTIVATION_FILE
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as handle:
        for name in sorted(handle.keys()):
            check_activation_buffers({name: handle.get_tensor(name)}, path)


def _check_declared_shapes(folder: Path) -> None:
    """Every weight's shape as the headers declare it against the model its config.json builds
    (:func:`~prune_cli.checkpoint.weights.check_stored_shapes`), before a byte of a tensor is read: a header
    declaring a 70 GB tensor would otherwise be hashed, then read, in full."""

    skeleton = empty_model(load_config(ModelSource("folder", str(folder)), offline=True), torch.float32)
    weights = SafetensorsWeights(folder)
    try:
        renames = checkpoint_renames(skeleton, weights.names())
        check_stored_shapes(skeleton, RenamedWeights(weights, renames) if renames else weights,
                            getattr(skeleton, "base_model_prefix", "") or "")
    finally:
        weights.close()


def stored_weight_name(model, layer: str) -> tuple[str, int | None]:
    """The stored tensor holding pruned layer ``layer``'s weight, and its index in that tensor:
    ``(layer + ".weight", None)``, or for a mixture-of-experts expert
    (:class:`~prune_cli.model.moe.ExpertLinear`, e.g. ``...mlp.experts.gate_up_proj[3]``) the fused
    tensor ``...mlp.experts.gate_up_proj`` and expert 3."""

    try:
        module = model.get_submodule(layer)
    except AttributeError:
        module = None
    if isinstance(module, ExpertLinear):
        return f"{layer.rpartition('.')[0]}.{module.tensor}", module.index
    return layer + ".weight", None


def _check_layers(folder: Path, layers: list[dict]) -> list[str]:
    """Zeros and N:M groups of every pruned layer's stored weight (one weight in memory at a time)."""

    skeleton = empty_model(load_config(ModelSource("folder", str(folder)), offline=True), torch.float32)
    weights = SafetensorsWeights(folder)
    renames = checkpoint_renames(skeleton, weights.names())  # e.g. per-expert tensors stacked as on load
    if renames:
        weights = RenamedWeights(weights, renames)
    problems = []
    fused: tuple[str, torch.Tensor] | None = None  # the last experts tensor read (its experts come in a row)
    try:
        for layer in layers:
            name, index = stored_weight_name(skeleton, layer["name"])
            if name not in weights:
                problems.append(f"layer {layer['name']} has no stored weight")
                continue
            if index is None:
                weight = weights.read([name])[name]
            else:
                if fused is None or fused[0] != name:
                    fused = (name, weights.read([name])[name])
                weight = fused[1]
                weight = weight[index] if index < weight.shape[0] else None
                if weight is None:
                    problems.append(f"layer {layer['name']}: {name} has no expert {index}")
                    continue
            if stored_transposed(skeleton, name):
                weight = weight.t()
            zeros = float((weight == 0).float().mean())
            if abs(zeros - layer["achieved_sparsity"]) > ZERO_TOLERANCE:
                problems.append(f"layer {layer['name']} holds {zeros:.6f} zeros, the report says {layer['achieved_sparsity']:.6f}")
            match = _NM.match(str(layer.get("pattern", "")))
            if match:
                keep, group = int(match.group(1)), int(match.group(2))
                kept = (weight != 0).reshape(weight.shape[0], -1, group).sum(-1)
                if bool((kept > keep).any()):
                    problems.append(f"layer {layer['name']} breaks its {keep}:{group} pattern in "
                                    f"{int((kept > keep).sum())} groups")
    finally:
        weights.close()
    return problems
