"""Atomic checkpoint export.

The checkpoint is a plain Hugging Face folder (safetensors with real zeros, config, tokenizer)
plus ``sparsity.json``. It is written into a temporary sibling folder and renamed onto the
output path at the very end, so a failed or interrupted run leaves nothing at the output path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from torch import nn

from prune_cli.errors import OutputExistsError
from prune_cli.model_io import prepare_for_save

log = logging.getLogger(__name__)

REPORT_FILE = "sparsity.json"


def check_output(output: Path, overwrite: bool) -> None:
    """Fail fast (before any long work) when ``output`` exists and may not be replaced."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output exists: {output}", hint="pass --overwrite to replace it, or choose another --output")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output exists and is not a folder: {output}", hint="choose another --output")
    ancestor = output.resolve().parent
    while not ancestor.exists():  # missing parents are created at export time
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise OutputExistsError(f"cannot create {output}: {ancestor} is not a writable folder", hint="choose another --output")


def export_checkpoint(
    model: nn.Module, tokenizer, output: Path, report: dict, overwrite: bool, extra: Callable[[Path], None] | None = None
) -> Path:
    """Write ``model`` + ``tokenizer`` + ``sparsity.json`` (+ whatever ``extra(folder)`` writes)
    to ``output`` atomically."""
    output = Path(output).resolve()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; a checkpoint is an ordinary folder
    try:
        prepare_for_save(model)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / "old")
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s", output)
    return output
