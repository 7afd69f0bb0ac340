"""prune-cli verify: a checkpoint against its report (tensor hashes, zeros, N:M groups)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli.test_cli import SMALL, assert_one_line_error, run


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "out"
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--pattern", "2:4", *SMALL, "--no-eval", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _copy(checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def test_an_untouched_checkpoint_verifies(checkpoint):
    result = run("verify", checkpoint, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    report = json.loads((checkpoint / "sparsity.json").read_text())
    assert summary["ok"] is True and summary["hashes_recorded"] is True
    assert summary["tensors_checked"] == len(report["tensors_sha256"]) == len(load_file(str(checkpoint / "model.safetensors")))
    assert summary["layers_checked"] == len(report["layers"]) > 0
    plain = run("verify", checkpoint)
    assert plain.exit_code == 0 and "match its report" in plain.stdout


def test_a_tampered_weight_is_named(checkpoint, tmp_path):
    target = _copy(checkpoint, tmp_path)
    tensors = load_file(str(target / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[tensors[name].view(-1).nonzero()[0]] += 1e-3  # one kept value, same size on disk
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    result = run("verify", target)
    assert_one_line_error(result)
    assert f"tensor {name} differs from the report" in result.stderr


def test_a_broken_pattern_and_a_wrong_zero_count_are_named(checkpoint, tmp_path):
    target = _copy(checkpoint, tmp_path)
    report = json.loads((target / "sparsity.json").read_text())
    report.pop("tensors_sha256")  # as an older prune-cli wrote it: the layer checks still run
    tensors = load_file(str(target / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    weight = tensors[name + ".weight"].clone()
    weight[weight == 0] = 0.5  # every pruned weight back
    tensors[name + ".weight"] = weight
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for entry in report["files"]:
        entry["bytes"] = (target / entry["name"]).stat().st_size
    (target / "sparsity.json").write_text(json.dumps(report))
    result = run("verify", target)
    assert_one_line_error(result)
    assert f"layer {name} holds 0.000000 zeros, the report says 0.500000" in result.stderr
    assert "and 1 more problems" in result.stderr  # the 2:4 groups too


def test_a_missing_file_and_another_checkpoints_report(checkpoint, tmp_path, tiny_llama_dir):
    target = _copy(checkpoint, tmp_path)
    (target / "tokenizer.json").unlink()
    missing = run("verify", target)
    assert_one_line_error(missing)
    assert "file tokenizer.json is missing" in missing.stderr

    other = tmp_path / "other"
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--pattern", "2:4", *SMALL, "--no-eval", "-o", other)
    assert result.exit_code == 0, result.output
    swapped = _copy(checkpoint, tmp_path / "swapped")
    for name in ("sparsity.json", "README.md"):  # the report and the card made from it: every file's size matches
        shutil.copy(other / name, swapped / name)
    result = run("verify", swapped)
    assert_one_line_error(result)
    assert "differs from the report" in result.stderr


def test_not_a_prune_cli_checkpoint(tiny_llama_dir):
    result = run("verify", tiny_llama_dir)
    assert_one_line_error(result)
    assert "not a prune-cli checkpoint" in result.stderr


def test_two_runs_with_the_same_inputs_give_the_same_hashes(checkpoint, tiny_llama_dir, tmp_path):
    again = tmp_path / "again"
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--pattern", "2:4", *SMALL, "--no-eval", "-o", again)
    assert result.exit_code == 0, result.output
    first, second = (json.loads((p / "sparsity.json").read_text()) for p in (checkpoint, again))
    assert first["tensors_sha256"] == second["tensors_sha256"]
    assert [l["mask_sha256"] for l in first["layers"]] == [l["mask_sha256"] for l in second["layers"]]
    assert first["masks_sha256"] == second["masks_sha256"] and len(first["masks_sha256"]) == 16
    other = run("compress", tiny_llama_dir, "--method", "wanda", "--pattern", "2:4", *SMALL, "--no-eval", "--seed", "1",
                "-o", tmp_path / "seed1")
    assert other.exit_code == 0, other.output
    assert json.loads((tmp_path / "seed1" / "sparsity.json").read_text())["masks_sha256"] != first["masks_sha256"]
    assert torch.equal(load_file(str(checkpoint / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"],
                       load_file(str(again / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])
