"""Writing a checkpoint into a run's staging folder.

The checkpoint is a plain Hugging Face folder (safetensors with real zeros, config, tokenizer)
plus ``sparsity.json``, prune-cli's report. The report is written last and lists every other
file with its size, so a later ``--overwrite`` can tell a folder prune-cli wrote from one it
did not (:mod:`prune_cli.output`), and so a folder whose report is missing was never finished.
Moving the folder into place is :meth:`prune_cli.output.OutputTarget.commit`'s job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from torch import nn

from prune_cli.model_io import prepare_for_save
from prune_cli.output import OWNER_FILE, REPORT_FILE, fix_modes
from prune_cli.report import json_ready

log = logging.getLogger(__name__)


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes the weights take on disk: every parameter and persistent buffer once (tied
    weights are one tensor), at its dtype."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def file_list(folder: Path) -> list[dict]:
    """Every file under ``folder`` (but the report and the owner record): name and bytes."""
    out = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name not in (REPORT_FILE, OWNER_FILE):
            out.append({"name": name, "bytes": path.stat().st_size})
    return out


def write_report(folder: Path, report: dict) -> dict:
    """Write ``report`` as strict JSON (non-finite numbers as null, flagged) into ``folder``;
    returns what was written."""
    data = json_ready(report)
    (Path(folder) / REPORT_FILE).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return data


def write_checkpoint(
    model: nn.Module, tokenizer, folder: Path, report: dict, extra: Callable[[Path], None] | None = None
) -> dict:
    """Write ``model`` + ``tokenizer`` (+ whatever ``extra(folder)`` writes) into the staging
    ``folder``, then the report listing those files; returns the report as written."""
    folder = Path(folder)
    prepare_for_save(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if extra is not None:
        extra(folder)
    fix_modes(folder)
    report["files"] = file_list(folder)
    return write_report(folder, report)
