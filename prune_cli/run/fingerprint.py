"""What a run's results depend on, for two purposes, by one function (:func:`run_fingerprint`):

* ``"resume"``: what a resumed run must share with the interrupted one (kept in its resume
  state, :class:`~prune_cli.checkpoint.resume.ResumeState`): the model's files, the resolved
  recipe, the token windows, the device, backend and dtypes, the versions;
* ``"baseline"``: what the dense model's scores depend on (the key of the dense-baseline cache,
  :mod:`prune_cli.run.baseline`): the model's files, the evaluation tokens and batch size, the
  task requests, the compute dtype, the device type, the versions.

The dicts are exactly those the earlier code wrote (key for key, in the same order), so resume
states and cached baselines written before still match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from prune_cli.calibrators.sampling import fingerprint as tokens_fingerprint
from prune_cli.checkpoint.files import file_digest, model_weight_files
from prune_cli.core import distributed
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.records import versions
from prune_cli.gpu.backend import Backend
from prune_cli.model.source import ModelSource
from prune_cli.recipe.config import RunConfig
from prune_cli.run import baseline
from prune_cli.run.job import CompressRequest, Job
from prune_cli.streaming.loader import local_folder

Purpose = Literal["resume", "baseline"]


def model_files(source: ModelSource) -> dict[str, str]:
    """Digest (:func:`file_digest`: identity, and content when small) of each file the model is
    read from: its ``config.json`` and the weight files a load reads (the index and its shards,
    or ``model.safetensors`` alone, as :func:`model_weight_files` picks them), or its GGUF file;
    ``{}`` for a hub id (its files are not known without the network)."""

    folder = local_folder(source, offline=True) if source.kind != "hub" else None
    if folder is None:
        return {}
    if source.gguf_file:
        names = [source.gguf_file]
    else:
        chosen = model_weight_files(Path(folder))
        names = sorted({"config.json", *(p.name for p in chosen.files), *([chosen.index.name] if chosen.index else [])})
    return {name: file_digest(Path(folder) / name) for name in names}


def run_fingerprint(purpose: Purpose, source: ModelSource, config: RunConfig, job: Job, device: torch.device,
                    backend: Backend | None = None) -> dict:
    """The fingerprint of this run for ``purpose`` (see the module docstring); ``backend`` is
    needed for ``"resume"`` only."""
    model = {**source.to_dict(), "files": model_files(source)}
    evaluation_tokens = None if job.eval_windows is None else tokens_fingerprint(job.eval_windows)
    dtype = DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype)
    without_python = {k: v for k, v in versions().items() if k != "python"}
    if purpose == "resume":
        if backend is None:
            raise ValueError("a resume fingerprint names the backend")
        return {
            "model": model,
            "recipe": config.to_recipe(),
            "calibration_tokens": tokens_fingerprint(job.cal_windows),
            "bos": job.bos,
            "evaluation_tokens": evaluation_tokens,
            "device": str(device),
            "backend": backend.name,
            "dtype": dtype,
            "save_dtype": DTYPE_NAMES_BY_DTYPE.get(job.save_dtype),
            "versions": without_python,
        }
    if purpose == "baseline":
        return {
            "model": model,
            "evaluation_tokens": evaluation_tokens,
            "evaluation_batch_size": config.evaluation.batch_size,
            "tasks": None if job.tasks is None else job.tasks.fingerprint(),
            "dtype": dtype,
            "device": device.type,
            "versions": without_python,
        }
    raise ValueError(f"no fingerprint for {purpose!r}")


def dense_baseline(request: CompressRequest, source: ModelSource, job: Job,
                   device: torch.device) -> baseline.DenseBaseline | None:
    """The cache entry of this run's dense scores (:mod:`prune_cli.run.baseline`), or ``None`` when
    there is nothing to cache (no evaluation, or a model without local files) or the cache is off."""

    if not request.baseline_cache or not baseline.enabled() or distributed.requested():
        return None
    if job.eval_windows is None and job.tasks is None:
        return None
    parts = run_fingerprint("baseline", source, request.config, job, device)
    if not parts["model"]["files"]:
        return None
    return baseline.DenseBaseline(baseline.baseline_key(parts), parts)
