"""--resume: a run stopped (Ctrl-C / SIGTERM after the current block, or killed) continues from
its last finished block, in any walk, to a checkpoint bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from prune_cli.cli import app
from prune_cli.core.errors import InterruptedRun

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    with safe_open(str(folder / name), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "activation_sparsity.safetensors"):
        if (a / name).exists() or (b / name).exists():
            wa, wb = weights(a, name), weights(b, name)
            assert wa.keys() == wb.keys()
            assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    ra, rb = (json.loads((p / "sparsity.json").read_text()) for p in (a, b))
    for key in ("ppl", "layers", "allocation", "activation", "sparsity", "calibration", "evaluation"):
        assert ra[key] == rb[key], key


def stop_at_block(monkeypatch, k: int) -> list[int]:
    """A stop request (as Ctrl-C would make) arrives while the k-th block of the run is worked on."""
    from prune_cli.core import stopping
    from prune_cli.streaming.driver import BlockDriver

    real = BlockDriver.block
    entered = [0]

    def block(self, index):
        entered[0] += 1
        if entered[0] == k:
            stopping.request(InterruptedRun("SIGINT", 130))
        return real(self, index)

    monkeypatch.setattr(BlockDriver, "block", block)
    return entered


CASES = {
    # (method arguments, stop at the k-th block read): tiny Llama of 2 blocks
    "wanda-first-walk": (["--method", "wanda", "--sparsity", "0.5"], 1),
    "sparsegpt-2of4": (["--method", "sparsegpt", "--pattern", "2:4"], 2),
    "owl-prepass": (["--method", "wanda", "--sparsity", "0.6", "--layerwise", "owl"], 1),
    "owl-candidates": (["--method", "wanda", "--sparsity", "0.6", "--layerwise", "owl"], 3),
    "owl-pruning": (["--method", "wanda", "--sparsity", "0.6", "--layerwise", "owl"], 5),
    "wina-greedy-fisher-backward": (["-r", RECIPES / "wina-greedy-50.yaml"], 5),
    "wina-greedy-curves": (["-r", RECIPES / "wina-greedy-50.yaml"], 7),
    "wina-greedy-calibration": (["-r", RECIPES / "wina-greedy-50.yaml"], 10),
    "wanda-2of4-wina-activation": (["-r", RECIPES / "wanda-2of4-wina-40.yaml"], 10),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stopped_run_resumes_to_the_same_checkpoint(tmp_path, tiny_llama_dir, monkeypatch, case):
    method, k = CASES[case]
    reference = tmp_path / "reference"
    assert run("compress", tiny_llama_dir, *method, *SMALL, "-o", reference).exit_code == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        entered = stop_at_block(m, k)
        stopped = run("compress", tiny_llama_dir, *method, *SMALL, "-o", out, "--checkpoint-interval", "3600", "--json")
    assert entered[0] == k, "the run did not stop after the block the request arrived in"
    assert stopped.exit_code == 130, stopped.output
    last = [line for line in stopped.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("stopped:") and "resume state is kept" in last and "--resume" in last, stopped.stderr
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(staging) == 1 and (staging[0] / ".work" / "resume" / "state.json").is_file()
    resumed = run("compress", tiny_llama_dir, *method, *SMALL, "-o", out, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed"]["blocks_done"] >= 1
    assert_same_checkpoint(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]


def test_resuming_with_another_recipe_is_refused_and_keeps_the_state(tmp_path, tiny_llama_dir, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_at_block(m, 1)
        assert run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out).exit_code == 130
    refused = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.6", *SMALL, "-o", out, "--resume")
    assert refused.exit_code == 2
    assert "cannot resume" in refused.stderr and "recipe.sparsity: 0.5 -> 0.6" in refused.stderr
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]) == 1
    resumed = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output


def test_without_resume_the_state_is_kept_until_a_run_supersedes_it(tmp_path, tiny_llama_dir, monkeypatch):
    out = tmp_path / "out"
    args = ["--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out]
    with monkeypatch.context() as m:
        stop_at_block(m, 1)
        assert run("compress", tiny_llama_dir, *args).exit_code == 130
    fresh = run("compress", tiny_llama_dir, *args)
    assert fresh.exit_code == 0, fresh.output
    assert "rerun with --resume to continue it" in fresh.stderr and "supersedes" in fresh.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_resume_discards_the_state(tmp_path, tiny_llama_dir, monkeypatch):
    out = tmp_path / "out"
    args = ["--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out]
    with monkeypatch.context() as m:
        stop_at_block(m, 1)
        assert run("compress", tiny_llama_dir, *args).exit_code == 130
    fresh = run("compress", tiny_llama_dir, *args, "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert "left by a run that ended" in fresh.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resume_with_nothing_to_resume_starts_over(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "o", "--resume")
    assert result.exit_code == 0, result.output
    assert "nothing to resume" in result.stderr


def test_a_run_with_activations_on_disk_resumes_to_the_same_checkpoint(tmp_path, tiny_llama_dir, monkeypatch):
    """Spilled hidden states are linked into the resume state, not read, and come back exactly."""
    method = ["-r", RECIPES / "wina-greedy-50.yaml", "--max-memory", "1"]
    reference = tmp_path / "reference"
    assert run("compress", tiny_llama_dir, *method, *SMALL, "-o", reference).exit_code == 0
    out = tmp_path / "out"
    for k in (3, 7):  # in the Fisher forward walk, then (resumed) in the curves walk
        with monkeypatch.context() as m:
            stop_at_block(m, k)
            stopped = run("compress", tiny_llama_dir, *method, *SMALL, "-o", out, "--resume", "--checkpoint-interval", "3600")
        assert stopped.exit_code == 130, stopped.output
    resumed = run("compress", tiny_llama_dir, *method, *SMALL, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_checkpoint(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]
