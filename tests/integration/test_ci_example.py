"""The CI example (docs/ci/compress.yml): its own shell steps, parsed from the YAML, run against
a tiny model, so the example cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / "docs" / "ci" / "compress.yml"
RUN_STEPS = ("Compress", "Verify", "Summary")  # "Install" is what this environment already is


def _steps():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    steps = {s["name"]: s for s in job["steps"] if "name" in s}
    assert set(RUN_STEPS) <= set(steps), "the example lost a step the test runs"
    return job["env"], [steps[name] for name in RUN_STEPS]


def _run(step, env, cwd):
    return subprocess.run(["bash", "-e", "-c", step["run"]], cwd=cwd, env=env, capture_output=True, text=True)


def _environment(tmp_path, tiny_llama_dir, ratio, task_drop=1.0):
    job_env, _ = _steps()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "method": "wanda", "sparsity": 0.5,
        "calibration": {"samples": 4, "seqlen": 32}, "evaluation": {"windows": 2, "seqlen": 32}, "device": "cpu",
    }))
    env = {**os.environ, **job_env, "MODEL": str(tiny_llama_dir), "RECIPE": str(recipe), "MAX_PPL_RATIO": str(ratio),
           "TASK_LIMIT": "8", "MAX_TASK_DROP": str(task_drop),
           "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return env


def test_the_workflow_steps_compress_gate_and_verify(tmp_path, tiny_llama_dir):
    env = _environment(tmp_path, tiny_llama_dir, 1000)
    _, steps = _steps()
    for step in steps:
        result = _run(step, env, tmp_path)
        assert result.returncode == 0, f"{step['name']}: {result.stderr[-2000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert [g["gate"] for g in report["gates"]] == ["max_ppl_ratio", "max_task_drop"]
    assert all(g["passed"] for g in report["gates"]) and report["tasks"]["compressed"]["prune_cloze"]["samples"] == 8
    assert json.loads((tmp_path / "verify.json").read_text())["ok"] is True
    assert (tmp_path / env["OUT"] / "model.safetensors").is_file()


def test_a_failed_gate_fails_the_compress_step_and_keeps_the_artifacts(tmp_path, tiny_llama_dir):
    env = _environment(tmp_path, tiny_llama_dir, 1e-3)
    _, (compress, verify, summary) = _steps()
    result = _run(compress, env, tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "gate failed: max_ppl_ratio" in result.stderr
    assert _run(verify, env, tmp_path).returncode == 0  # the written checkpoint is still whole
    shown = _run(summary, env, tmp_path)  # `if: always()`: runs after the failure
    assert shown.returncode == 0 and "'passed': False" in shown.stdout
