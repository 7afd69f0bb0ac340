"""End-to-end CLI runs on tiny random models of two families, and the bad-input contract."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from prune_cli.cli import app

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def run(*args):
    """The CLI in-process; a ``--json`` report it prints is checked against its JSON Schema."""
    result = runner.invoke(app, [str(a) for a in args])
    if "--json" in args and result.exit_code in (0, 3) and args and args[0] in ("compress", "eval"):
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = None
        if isinstance(report, dict) and report.get("format") in ("prune-cli/sparsity-report", "prune-cli/eval-report"):
            from prune_cli.core.records import json_ready, validate_report

            validate_report(json_ready(report))
    return result


def assert_one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    errors = [i for i, l in enumerate(lines) if l.startswith(("error:", "internal error:"))]
    assert len(errors) == 1, result.stderr
    # the one-line message is last but for its hint; only progress and log lines come before it
    assert lines[errors[0] + 1 :] == [] or (len(lines) == errors[0] + 2 and lines[-1].startswith("hint:"))
    assert all(l.startswith(("[prune-cli]", "INFO")) for l in lines[: errors[0]]), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("family_dir", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("method,pattern_args", [("wanda", ["--sparsity", "0.5"]), ("magnitude", ["--pattern", "2:4"])])
def test_compress_then_eval(request, tmp_path, family_dir, method, pattern_args):
    model_dir = request.getfixturevalue(family_dir)
    out = tmp_path / "out"
    result = run("compress", model_dir, "--method", method, *pattern_args, *SMALL, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["timings"]) >= {"load", "calibration", "eval", "export"}
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["ppl"]["dense"] > 1 and report["ppl"]["compressed"] > 1
    saved = json.loads((out / "sparsity.json").read_text())
    assert saved == report  # --json prints the very report written into the checkpoint
    assert saved["method"] == method and saved["calibration"]["windows"] == [4, 32]
    assert saved["recipe"]["calibration"]["seed"] == 0

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in saved["layers"]:
        w = model.get_submodule(layer["name"]).weight
        assert (w == 0).float().mean().item() == pytest.approx(layer["achieved_sparsity"], abs=1e-6)
    assert not list(tmp_path.glob(".out.partial-*"))

    result = run("eval", out, "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)
    assert ev["ppl"] == pytest.approx(report["ppl"]["compressed"], rel=1e-4)
    assert ev["sparsity"] == pytest.approx(0.5)


def test_same_seed_same_result(tmp_path, tiny_llama_dir):
    outs = []
    for name in ("a", "b"):
        result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--seed", "7", "-o", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        outs.append(json.loads(result.stdout))
    assert outs[0]["calibration"]["tokens_sha256"] == outs[1]["calibration"]["tokens_sha256"]
    assert outs[0]["ppl"] == outs[1]["ppl"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_with_override(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--recipe", RECIPES / "wanda-2of4.yaml", *SMALL, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pattern"] == "2:4" and report["method"] == "wanda"


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, tiny_opt_dir):
    result = run("compress", tiny_opt_dir, "--method", "wanda", "--pattern", "4:8", "--dry-run", "--json", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert len(plan["layers"]) == 12 and plan["layers"][0]["pattern"] == "4:8"
    assert not (tmp_path / "o").exists()
    result = run("compress", tiny_opt_dir, "--method", "wanda", "--sparsity", "0.5", "--dry-run")
    assert result.exit_code == 0 and "fc1" in result.stdout


def test_progress_and_table_human_output(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "compressed" in result.stdout
    assert "calibrating" in result.stderr  # progress goes to stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["./no/such/model", "--method", "wanda", "--sparsity", "0.5"], "not found"),
        (["{llama}", "--method", "wandda", "--sparsity", "0.5"], "unknown method"),
        (["{llama}", "--method", "wanda", "--sparsity", "1.2"], "sparsity"),
        (["{llama}", "--method", "wanda", "--pattern", "3:5"], "does not divide"),
        (["{llama}", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "100000"], "room for"),
        (["{llama}", "--method", "wanda", "--sparsity", "0.5", "--calib-text", "missing.txt"], "not found"),
        (["{llama}", "--sparsity", "0.5"], "no method"),
        (["{llama}", "--method", "wanda", "--sparsity", "0.5", "--recipe", "{badrecipe}"], "unknown key"),
    ],
)
def test_bad_input_exit_2(tmp_path, tiny_llama_dir, args, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"version": 1, "method": "wanda", "sparsity": 0.5, "calibraton": {}}))
    args = [a.format(llama=tiny_llama_dir, badrecipe=bad) for a in args]
    result = run("compress", *args, *SMALL[4:], "-o", tmp_path / "out")
    assert_one_line_error(result)
    assert needle in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_method_suggests(tiny_llama_dir, tmp_path):
    result = run("compress", tiny_llama_dir, "--method", "wandaa", "--sparsity", "0.5", "-o", tmp_path / "o")
    assert "did you mean 'wanda'" in result.stderr


def test_output_exists_needs_overwrite(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out)
    assert_one_line_error(result)
    assert "--overwrite" in result.stderr and (out / "keep.txt").exists()
    # a folder prune-cli did not write is never replaced, --overwrite or not
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out, "--overwrite")
    assert_one_line_error(result)
    assert "not a prune-cli checkpoint" in result.stderr and (out / "keep.txt").read_text() == "mine"
    # one it wrote is
    (out / "keep.txt").unlink()
    out.rmdir()
    for _ in range(2):
        result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out, "--overwrite")
        assert result.exit_code == 0, result.output
        assert (out / "sparsity.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, trash or lock left


def test_failed_export_leaves_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    out = tmp_path / "out"
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out)
    assert_one_line_error(result, code=1)
    assert "internal error" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from prune_cli.recipe.config import resolve
    from prune_cli.run.pipeline import CompressRequest, compress

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupt)
    config = resolve(None, {"method": "magnitude", "sparsity": 0.5, "calibration": {"samples": 2, "seqlen": 16}, "evaluation": {"enabled": False}})
    with pytest.raises(KeyboardInterrupt):
        compress(CompressRequest(config, str(tiny_llama_dir), tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_exit_2(tmp_path):
    from tests.tiny_models import save_tiny_model

    folder = save_tiny_model("gpt2", tmp_path / "gpt2")
    result = run("compress", folder, "--method", "teal", "--sparsity", "0.5", "--dry-run")
    assert_one_line_error(result)
    assert "activation sparsity on Conv1D layers (GPT-2) is not supported yet" in result.stderr
    planned = run("compress", folder, "--method", "wanda", "--sparsity", "0.5", "--dry-run", "--json")
    assert planned.exit_code == 0, planned.output  # weight pruning plans GPT-2's Conv1D as Linears
    assert any(row["module"].endswith("attn.c_attn") for row in json.loads(planned.stdout)["layers"])


def test_methods_and_help():
    assert run("methods").exit_code == 0
    result = run("compress", "--help")
    assert result.exit_code == 0 and "--sparsity" in result.stdout


def test_help_does_not_import_heavy_modules():
    import subprocess
    import sys

    code = "import sys, prune_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'cupy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(
    "extra,method",
    [
        (["--method", "sparsegpt", "--sparsity", "0.5"], "sparsegpt"),
        (["--method", "sparsegpt", "--pattern", "2:4"], "sparsegpt"),
        (["--method", "dsnot", "--base", "sparsegpt", "--sparsity", "0.6"], "dsnot"),
        (["--method", "dsnot", "--base", "wanda", "-O", "mode=reference", "--pattern", "4:8"], "dsnot"),
        (["--method", "wanda", "--sparsity", "0.6", "--layerwise", "owl", "--owl-m", "5", "--owl-lambda", "0.05"], "wanda"),
    ],
)
def test_frontier_methods_from_the_command_line(tmp_path, tiny_llama_dir, extra, method):
    result = run("compress", tiny_llama_dir, *extra, *SMALL, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == method
    assert report["sparsity"] == pytest.approx(report["target_sparsity"], abs=0.01)
    if "--layerwise" in extra:
        assert report["allocation"]["m"] == 5.0 and report["allocation"]["chosen_by"] == "options"
        assert len(set(l["target_sparsity"] for l in report["layers"])) == 2


def test_owl_auto_from_the_command_line(tmp_path, tiny_opt_dir):
    result = run("compress", tiny_opt_dir, "--method", "wanda", "--sparsity", "0.5", "--layerwise", "owl", *SMALL, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["allocation"]["chosen_by"] == "validation" and len(report["allocation"]["grid"]) > 1
    assert "allocation" in report["timings"]


def test_owl_with_dsnot_on_sparsegpt(tmp_path, tiny_llama_dir):
    """OWL gives every block its own sparsity; DSnoT's grouped swap loop keeps each exact."""
    result = run("compress", tiny_llama_dir, "--method", "dsnot", "--base", "sparsegpt", "--sparsity", "0.6",
                 "--layerwise", "owl", "--owl-m", "3", "--owl-lambda", "0.1", *SMALL, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    targets = {layer["target_sparsity"] for layer in report["layers"]}
    assert len(targets) > 1
    for layer in report["layers"]:
        assert layer["method"] == "dsnot"
        assert abs(layer["achieved_sparsity"] - layer["target_sparsity"]) < 0.02
    assert report["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_bad_method_option(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "dsnot", "-O", "mod=reference", "--sparsity", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result)
    assert "did you mean 'mode'" in result.stderr


def test_backend_flag(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--backend", "torch", "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["backend"] == "torch"
    # an explicit cupy that cannot run is bad input, never a silent fallback
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--backend", "cupy", "-o", tmp_path / "p")
    assert_one_line_error(result)
    assert "cupy" in result.stderr and not (tmp_path / "p").exists()


def test_backend_auto_on_cpu_says_why(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "backend auto: torch" in result.stderr


def test_torch_backend_gives_the_same_checkpoint(tmp_path, tiny_llama_dir):
    from prune_cli.recipe.config import resolve
    from prune_cli.run.pipeline import CompressRequest, compress

    reports = []
    for name, backend in (("a", "torch"), ("b", "auto")):
        config = resolve(None, {"method": "wanda", "sparsity": 0.5, "backend": backend, "calibration": {"samples": 2, "seqlen": 16}, "evaluation": {"enabled": False}})
        reports.append(compress(CompressRequest(config, str(tiny_llama_dir), tmp_path / name)))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_parent_folders_are_created(tmp_path, tiny_llama_dir):
    out = tmp_path / "new" / "nested" / "o"
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "sparsity.json").is_file()
