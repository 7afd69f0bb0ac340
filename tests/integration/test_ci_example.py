"""The CI example (docs/ci/compress.yml), run as a GitHub runner would: its shell steps, parsed
from the YAML, in order, against a tiny model, each with the files a runner gives a step
($GITHUB_OUTPUT, $GITHUB_ENV, $GITHUB_STEP_SUMMARY), so the example cannot rot. A passing run, a
failed gate (exit 3) and a bad input (exit 2) go through the same steps.

What only GitHub or the network can run is checked, not run: the install step (pip; this
environment already has the package) for what it installs, the cache and artifact actions for
what they keep, the Hub push for its guard and, offline, for reaching the Hub."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

import prune_cli
from prune_cli.checkpoint.gguf_cache import cache_root

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "docs" / "ci" / "compress.yml"
CHECKED_NOT_RUN = ("Install", "Push the checkpoint")  # pip and the Hub: no network here
ALLOWED_ACTIONS = {"actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact"}
TASK_LIMIT = 4


def _job():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    return job


def _step(name):
    (step,) = [s for s in _job()["steps"] if s.get("name") == name]
    return step


def _uses(action):
    """The steps that use ``action`` (any version, any sub-action such as actions/cache/save)."""
    return [s for s in _job()["steps"] if s.get("uses", "").split("@")[0].startswith(action)]


def _key_values(path):
    """KEY=VALUE lines a step appended to its $GITHUB_OUTPUT or $GITHUB_ENV file."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def _run(script, env, cwd):
    """One `run:` step as the runner runs it (`bash -e`)."""
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _run_job(cwd, env):
    """Every shell step of the job in order, skipping a step after a failure unless it is
    `if: always()`, as the runner does. Returns ({step name: result} of the steps that ran,
    {step id: its outputs}, the step summary written)."""
    summary = cwd / "step_summary.md"
    summary.write_text("")
    env = dict(env, GITHUB_STEP_SUMMARY=str(summary))
    ran, outputs, failed = {}, {}, False
    for step in _job()["steps"]:
        if "run" not in step or step["name"] in CHECKED_NOT_RUN:
            continue
        condition = step.get("if", "success()")
        assert condition in ("success()", "always()"), f"{step['name']}: a condition this test cannot follow"
        if failed and condition != "always()":
            continue
        files = {kind: cwd / f"{step['name']}.{kind}" for kind in ("output", "env")}  # fresh per step
        for path in files.values():
            path.write_text("")
        result = _run(step["run"], {**env, "GITHUB_OUTPUT": str(files["output"]), "GITHUB_ENV": str(files["env"])}, cwd)
        ran[step["name"]] = result
        failed |= result.returncode != 0
        outputs[step.get("id", step["name"])] = _key_values(files["output"])
        env.update(_key_values(files["env"]))
    return ran, outputs, summary.read_text()


@pytest.fixture(scope="module")
def baseline_cache(tmp_path_factory):
    """One prune-cli cache for this file's runs (as the workflow's cached ~/.cache/prune-cli)."""
    return tmp_path_factory.mktemp("prune-cli-cache")


def _environment(tmp_path, model, ratio, cache):
    """The job's env for a tiny run: secrets and variables unset (GitHub gives them as '')."""
    job_env = {key: "" if "${{" in str(value) else str(value) for key, value in _job()["env"].items()}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "method": "wanda", "sparsity": 0.5,
        "calibration": {"samples": 2, "seqlen": 16}, "evaluation": {"windows": 2, "seqlen": 16}, "device": "cpu",
    }))
    return {**os.environ, **job_env, "MODEL": str(model), "RECIPE": str(recipe), "MAX_PPL_RATIO": str(ratio),
            "TASK_LIMIT": str(TASK_LIMIT), "MAX_TASK_DROP": "1.0", "HF_HUB_OFFLINE": "1", "PRUNE_CLI_CACHE": str(cache),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _log(ran):
    return {name: result.stdout[-1500:] + result.stderr[-1500:] for name, result in ran.items()}


def _pip_installs(script):
    """{distribution name: (its Requirement, the pip command's words)} of each `pip install` line."""
    installs = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if words[:2] == ["pip", "install"]:
            requirement = Requirement(words[2])
            installs[requirement.name] = (requirement, words)
    return installs


def test_the_install_step_installs_the_published_package_and_a_cpu_torch_in_range(tmp_path):
    script = _step("Install")["run"]
    assert "github.repository" not in script and "git+" not in script
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installs = _pip_installs(script)
    package, _ = installs[project["name"]]
    assert project["name"] == "llm-prune-cli" and package.extras == {"eval"} <= set(project["optional-dependencies"])
    assert package.specifier and package.specifier.contains(prune_cli.__version__)
    torch, words = installs["torch"]
    (declared,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch"]
    assert torch.specifier == declared.specifier
    assert words[words.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert list(installs) == ["torch", project["name"]]  # the CPU torch first, so it is kept
    rest = "\n".join(line for line in script.splitlines() if not line.startswith("pip install"))
    shown = _run(rest, _environment(tmp_path, tmp_path, 1, tmp_path), tmp_path)  # `prune-cli --version`
    assert shown.returncode == 0 and f"prune-cli {prune_cli.__version__} (llm-prune-cli" in shown.stdout


def test_a_passing_run_compresses_verifies_summarises_and_reaches_the_hub(tmp_path, tiny_llama_dir, baseline_cache):
    env = _environment(tmp_path, tiny_llama_dir, 1000, baseline_cache)
    ran, outputs, summary = _run_job(tmp_path, env)
    assert list(ran) == ["Compress", "Verify", "Summary", "Result"]
    assert all(result.returncode == 0 for result in ran.values()), _log(ran)
    assert outputs["compress"] == {"exit_code": "0"}
    report = json.loads((tmp_path / "reports" / "compress.json").read_text())
    assert [g["gate"] for g in report["gates"]] == ["max_ppl_ratio", "max_task_drop"]
    assert all(g["passed"] for g in report["gates"]) and report["tasks"]["compressed"]["prune_cloze"]["samples"] == TASK_LIMIT
    assert json.loads((tmp_path / "reports" / "verify.json").read_text())["ok"] is True
    assert (tmp_path / env["OUT"] / "model.safetensors").is_file()
    ppl = report["ppl"]
    assert f"| perplexity | {ppl['dense']:.4g} | {ppl['compressed']:.4g} | ratio {ppl['ratio']:.4g} |" in summary
    assert "| prune_cloze acc |" in summary and "All quality gates passed." in summary and "Verify: ok" in summary
    # The push's guard holds here (exit 0; set a token and a repo): offline, `hf upload` accepts
    # the command and the folder (a missing one fails first) and stops only at the network.
    pushed = _run(_step("Push the checkpoint")["run"], {**env, "HF_TOKEN": "hf_test", "HF_REPO": "someone/tiny-pruned"}, tmp_path)
    assert pushed.returncode == 1 and "offline" in (pushed.stdout + pushed.stderr).lower(), pushed.stderr[-2000:]


def test_a_failed_gate_still_verifies_summarises_and_fails_the_job_with_exit_3(tmp_path, tiny_llama_dir, baseline_cache):
    env = _environment(tmp_path, tiny_llama_dir, 1e-3, baseline_cache)
    ran, outputs, summary = _run_job(tmp_path, env)
    assert list(ran) == ["Compress", "Verify", "Summary", "Result"]
    assert outputs["compress"] == {"exit_code": "3"} and "gate failed: max_ppl_ratio" in ran["Compress"].stderr
    assert [ran[name].returncode for name in ("Compress", "Verify", "Summary")] == [0, 0, 0], _log(ran)
    assert ran["Result"].returncode == 3
    assert json.loads((tmp_path / "reports" / "verify.json").read_text())["ok"] is True  # the checkpoint is whole
    assert (tmp_path / env["OUT"] / "sparsity.json").is_file()  # kept as an artifact
    assert "**Quality gate failed: max_ppl_ratio**" in summary and "| **failed** |" in summary
    assert "Verify: ok" in summary


def test_a_bad_input_is_summarised_from_its_error_object_and_skips_verify(tmp_path, baseline_cache):
    env = _environment(tmp_path, tmp_path / "no-such-model", 1000, baseline_cache)
    ran, outputs, summary = _run_job(tmp_path, env)
    assert list(ran) == ["Compress", "Verify", "Summary", "Result"]
    assert outputs["compress"] == {"exit_code": "2"} and ran["Result"].returncode == 2
    assert [ran[name].returncode for name in ("Compress", "Verify", "Summary")] == [0, 0, 0], _log(ran)
    assert "verify skipped" in ran["Verify"].stdout and not (tmp_path / "reports" / "verify.json").exists()
    error = json.loads((tmp_path / "reports" / "compress.json").read_text())["error"]
    assert error["message"] in summary and "exit 2 (bad input)" in summary and "Verify: not run" in summary
    assert not any("Traceback" in r.stderr or "KeyError" in r.stderr for r in ran.values()), _log(ran)
    assert not (tmp_path / env["OUT"]).exists()


def test_the_caches_artifacts_and_push_are_configured_as_documented(monkeypatch):
    used = {s["uses"].split("@")[0] for s in _job()["steps"] if "uses" in s}
    assert {"/".join(action.split("/")[:2]) for action in used} <= ALLOWED_ACTIONS
    # The Hugging Face cache and prune-cli's own (where it keeps the dense baselines by default),
    # restored before and saved after the run, even after a failed gate; keyed by model and recipe.
    monkeypatch.delenv("PRUNE_CLI_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    (restore,) = _uses("actions/cache/restore")
    (save,) = _uses("actions/cache/save")
    paths = restore["with"]["path"].split()
    assert paths == save["with"]["path"].split() == ["~/.cache/huggingface", "~/.cache/prune-cli"]
    assert os.path.expanduser(paths[1]) == str(cache_root())
    key = restore["with"]["key"]
    assert all(part in key for part in ("runner.os", "env.MODEL", "hashFiles(env.RECIPE)"))
    restore_keys = restore["with"]["restore-keys"].splitlines()
    assert restore_keys and all(key.startswith(prefix) and "env.MODEL" in prefix for prefix in restore_keys)
    assert save["with"]["key"] == f"${{{{ steps.{restore['id']}.outputs.cache-primary-key }}}}"
    assert "!cancelled()" in save["if"]
    # Only the reports are artifacts; the checkpoint goes to the Hub, and only when it passed.
    (artifact,) = _uses("actions/upload-artifact")
    assert artifact["if"] == "always()"
    assert artifact["with"]["path"].splitlines() == ["reports/", "${{ env.OUT }}/sparsity.json"]
    push = _step("Push the checkpoint")
    assert push["run"].startswith('hf upload "$HF_REPO" "$OUT"')
    guard = push["if"]
    assert all(part in guard for part in ("steps.compress.outputs.exit_code == '0'", "env.HF_TOKEN != ''", "env.HF_REPO != ''"))
    assert "secrets." not in guard  # GitHub refuses secrets in `if:`; they come through the job's env
    assert _job()["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert _step("Result") == {"name": "Result", "if": "always()", "run": 'exit "${COMPRESS_EXIT:-1}"'}
