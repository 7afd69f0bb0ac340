"""The two fingerprints of a run (prune_cli.run.fingerprint.run_fingerprint): the resume state's and
the dense-baseline cache's. Both dicts must stay exactly what earlier versions wrote (keys, order
and values), or resume states and cached baselines written before stop matching: they are pinned
here against the definitions they replaced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prune_cli.calibrators.sampling import fingerprint
from prune_cli.checkpoint.files import file_digest, model_weight_files
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.records import versions
from prune_cli.gpu.backend import resolve_backend
from prune_cli.model.source import resolve_source
from prune_cli.recipe.config import resolve
from prune_cli.run import baseline
from prune_cli.run.fingerprint import dense_baseline, model_files, run_fingerprint
from prune_cli.run.job import CompressRequest, load_job
from prune_cli.streaming.loader import local_folder

CPU = torch.device("cpu")


# ---- the definitions these fingerprints had before they were one function (kept verbatim)

def _old_model_files(source) -> dict[str, str]:
    folder = local_folder(source, offline=True) if source.kind != "hub" else None
    if folder is None:
        return {}
    if source.gguf_file:
        names = [source.gguf_file]
    else:
        chosen = model_weight_files(Path(folder))
        names = sorted({"config.json", *(p.name for p in chosen.files), *([chosen.index.name] if chosen.index else [])})
    return {name: file_digest(Path(folder) / name) for name in names}


def _old_baseline_parts(request, source, job, device) -> dict:
    files = _old_model_files(source)
    return {
        "model": {**source.to_dict(), "files": files},
        "evaluation_tokens": None if job.eval_windows is None else fingerprint(job.eval_windows),
        "evaluation_batch_size": request.config.evaluation.batch_size,
        "tasks": None if job.tasks is None else job.tasks.fingerprint(),
        "dtype": DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype),
        "device": device.type,
        "versions": {k: v for k, v in versions().items() if k != "python"},
    }


def _old_run_fingerprint(source, config, job, device, backend) -> dict:
    return {
        "model": {**source.to_dict(), "files": _old_model_files(source)},
        "recipe": config.to_recipe(),
        "calibration_tokens": fingerprint(job.cal_windows),
        "bos": job.bos,
        "evaluation_tokens": None if job.eval_windows is None else fingerprint(job.eval_windows),
        "device": str(device),
        "backend": backend.name,
        "dtype": DTYPE_NAMES_BY_DTYPE.get(job.opened.compute_dtype),
        "save_dtype": DTYPE_NAMES_BY_DTYPE.get(job.save_dtype),
        "versions": {k: v for k, v in versions().items() if k != "python"},
    }


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    config = resolve(None, {"method": "wanda", "sparsity": 0.5, "device": "cpu",
                            "calibration": {"samples": 2, "seqlen": 16}, "evaluation": {"windows": 1, "seqlen": 16}})
    request = CompressRequest(config, str(tiny_llama_dir), None)
    source = resolve_source(request.model)
    job = load_job(request, source, CPU, None)
    yield request, source, job
    job.close()


def test_the_resume_fingerprint_is_the_one_earlier_runs_wrote(loaded):
    request, source, job = loaded
    backend, _ = resolve_backend("torch", CPU)
    new = run_fingerprint("resume", source, request.config, job, CPU, backend)
    assert list(new) == ["model", "recipe", "calibration_tokens", "bos", "evaluation_tokens", "device", "backend",
                         "dtype", "save_dtype", "versions"]
    assert list(new["model"]) == [*source.to_dict(), "files"]
    assert sorted(new["model"]["files"]) == ["config.json", "model.safetensors"]
    assert new["device"] == "cpu" and new["backend"] == "torch" and new["dtype"] == "float32"
    assert new["calibration_tokens"] == fingerprint(job.cal_windows)
    assert new["evaluation_tokens"] == fingerprint(job.eval_windows)
    assert "python" not in new["versions"]
    old = _old_run_fingerprint(source, request.config, job, CPU, backend)
    assert new == old and list(new) == list(old)


def test_the_baseline_fingerprint_is_the_one_earlier_caches_are_keyed_by(loaded, tmp_path):
    request, source, job = loaded
    new = run_fingerprint("baseline", source, request.config, job, CPU)
    assert list(new) == ["model", "evaluation_tokens", "evaluation_batch_size", "tasks", "dtype", "device", "versions"]
    assert new["model"]["files"] == model_files(source)
    assert new["evaluation_batch_size"] == request.config.evaluation.batch_size
    assert new["tasks"] is None and new["device"] == "cpu" and new["dtype"] == "float32"
    old = _old_baseline_parts(request, source, job, CPU)
    assert new == old and list(new) == list(old)
    with baseline.scoped(tmp_path):
        entry = dense_baseline(request, source, job, CPU)
    assert entry is not None
    assert entry.key == baseline.baseline_key(old) and entry.parts == old


def test_a_resume_fingerprint_needs_the_backend(loaded):
    request, source, job = loaded
    with pytest.raises(ValueError, match="backend"):
        run_fingerprint("resume", source, request.config, job, CPU)
