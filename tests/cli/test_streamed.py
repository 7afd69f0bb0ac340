"""The streamed compress through the CLI: dtypes, what is written, and that the reported
perplexity is the exported checkpoint's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from prune_cli.cli import app

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("method_args", [["--method", "wanda", "--sparsity", "0.5"], ["--method", "teal", "--sparsity", "0.5"]])
@pytest.mark.parametrize("fast_bfloat16", [False, True])
def test_a_bfloat16_export_evaluates_to_exactly_the_reported_perplexity(tmp_path, tiny_llama_dir, method_args,
                                                                        fast_bfloat16, monkeypatch):
    """The compressed evaluation runs on the weights rounded as they are saved, so `prune-cli
    eval` of the export gives the very number the compress report gave, also on a CPU with fast
    bfloat16 kernels (where `--dtype auto` of a bfloat16 checkpoint would compute in bfloat16:
    eval follows the compress run's recorded compute dtype instead)."""
    import prune_cli.streaming.loader as model_io

    monkeypatch.setattr(model_io, "fast_low_precision_on_cpu", lambda dtype: fast_bfloat16)
    out = tmp_path / "out"
    result = run("compress", tiny_llama_dir, *method_args, *SMALL, "--save-dtype", "bfloat16", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["save_dtype"] == "bfloat16" and report["dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    evaluated = run("eval", out, "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == report["ppl"]["compressed"]
    assert json.loads(evaluated.stdout)["dtype"] == "float32"


def test_the_default_save_dtype_is_the_checkpoints(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *SMALL, "--no-eval", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["save_dtype"] == "float32" and report["streamed"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_a_bfloat16_checkpoint_is_computed_in_float32_on_a_cpu_without_fast_bfloat16(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    import prune_cli.streaming.loader as model_io

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_llama_dir / name).read_bytes())
    monkeypatch.setattr(model_io, "fast_low_precision_on_cpu", lambda dtype: False)
    result = run("compress", src, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["dtype"], report["save_dtype"]) == ("float32", "bfloat16")
    assert "computing in float32" in result.stderr


RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("method_args", [
    ["--method", "sparsegpt", "--sparsity", "0.5"],
    ["--method", "wanda", "--sparsity", "0.6", "--layerwise", "owl"],
    ["-r", RECIPES / "wanda-2of4-wina-40.yaml"],
], ids=["sparsegpt", "owl", "wanda-2of4-wina-greedy"])
def test_activations_kept_on_disk_give_the_same_checkpoint(tmp_path, tiny_llama_dir, method_args):
    """Beyond --max-memory the calibration activations live in files: same bytes out, and the
    files are gone after the run."""
    from safetensors.torch import load_file

    outs = []
    for name, extra in (("ram", []), ("disk", ["--max-memory", "1"])):
        out = tmp_path / name
        result = run("compress", tiny_llama_dir, *method_args, *SMALL, *extra, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        assert ("kept on disk" in result.stderr) == bool(extra)
        outs.append((out, json.loads(result.stdout)))
    (a, ra), (b, rb) = outs
    for name in ("model.safetensors", "activation_sparsity.safetensors"):
        if (a / name).exists():
            wa, wb = load_file(str(a / name)), load_file(str(b / name))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra["ppl"] == rb["ppl"] and ra["layers"] == rb["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "ram"]


def test_a_bad_max_memory_is_a_usage_error(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", "--max-memory", "lots", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "--max-memory must be a size" in result.stderr
