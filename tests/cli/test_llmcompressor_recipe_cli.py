"""llm-compressor recipes through the real CLI on the tiny Llama: what they ignore stays dense,
``mask_structure`` keeps the right count per group, and what prune-cli cannot honour is exit 2
with one line naming the key (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.cli.test_bad_input import FAST, fingerprint, one_line_error, run

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write_recipe(folder: Path, modifier: str, **args) -> Path:
    path = folder / "llmc.yaml"
    path.write_text(yaml.safe_dump({"sparsity_stage": {"sparsity_modifiers": {modifier: args}}}))
    return path


def compress(model_dir, recipe: Path, out: Path, *extra):
    result = run("compress", model_dir, "--recipe", recipe, *FAST, "-o", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout)


def block_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The Linear weights inside the decoder blocks, by module name."""
    return {k.removesuffix(".weight"): v for k, v in load_file(folder / "model.safetensors").items()
            if k.startswith("model.layers.") and k.endswith("_proj.weight")}


def test_ignored_layers_stay_dense(tmp_path, tiny_llama_dir):
    """The issue's case: ignore: ["re:.*down_proj"] was taken literally and down_proj pruned."""
    recipe = write_recipe(tmp_path, "SparseGPTModifier", sparsity=0.5, targets=["Linear"],
                          ignore=["re:.*lm_head", "re:.*down_proj"])
    result, report = compress(tiny_llama_dir, recipe, tmp_path / "out")
    assert "read as an llm-compressor recipe: SparseGPTModifier sparsity 0.5" in result.stderr
    assert "'re:.*down_proj' -> targets.exclude[0]" in result.stderr
    assert report["method"] == "sparsegpt" and report["recipe"]["targets"]["exclude"] == ["^(?:.*down_proj)"]
    pruned = {layer["name"] for layer in report["layers"]}
    before, after = block_weights(tiny_llama_dir), block_weights(tmp_path / "out")
    assert set(after) == set(before) and len(after) == 14
    for name, weight in after.items():
        if name.endswith("down_proj"):
            assert name not in pruned
            assert torch.equal(weight, before[name]) and bool((weight != 0).all()), name  # dense, untouched
        else:
            assert name in pruned
            assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
    for layer in report["layers"]:
        assert layer["target_sparsity"] == pytest.approx(0.5)


def test_shipped_recipe_keeps_2_of_every_4(tmp_path, tiny_llama_dir):
    """mask_structure "2:4" prunes 2 of every 4 (llm-compressor's meaning): exactly 2 kept per group."""
    result, report = compress(tiny_llama_dir, RECIPES / "llmcompressor-sparsegpt-2of4.yaml", tmp_path / "out")
    assert "mask_structure 2:4 (prune 2 of 4 = prune-cli pattern 2:4" in result.stderr
    assert report["pattern"] == "2:4"
    before, after = block_weights(tiny_llama_dir), block_weights(tmp_path / "out")
    for name, weight in after.items():
        if name.endswith("down_proj"):  # ignored by the recipe
            assert torch.equal(weight, before[name]), name
            continue
        kept = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert bool((kept == 2).all()), name


@pytest.mark.parametrize("mask,keep", [("1:4", "3:4"), ("3:4", "1:4"), ("4:8", "4:8")])
def test_mask_structure_is_converted_in_the_plan(tmp_path, tiny_llama_dir, mask, keep):
    recipe = write_recipe(tmp_path, "WandaPruningModifier", sparsity=None, mask_structure=mask)
    result = run("compress", tiny_llama_dir, "--recipe", recipe, *FAST, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert {layer["pattern"] for layer in json.loads(result.stdout)["layers"]} == {keep}


def test_per_layer_sparsity_list(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, "WandaPruningModifier", sparsity=[0.3, 0.6], targets=["re:model.layers.\\d+$"])
    result = run("compress", tiny_llama_dir, "--recipe", recipe, *FAST, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert len(layers) == 14
    for layer in layers:
        assert layer["sparsity"] == (0.3 if layer["module"].startswith("model.layers.0.") else 0.6)


def _refused(tmp_path, tiny_llama_dir, recipe: Path, needle: str, dry_run: bool = False) -> None:
    """Exit 2, one line naming ``needle``, nothing written (with and without --json)."""
    for as_json in (False, True):
        before = fingerprint(tmp_path)
        extra = (["--json"] if as_json else []) + (["--dry-run"] if dry_run else ["-o", tmp_path / "out"])
        result = run("compress", tiny_llama_dir, "--recipe", recipe, *FAST, *extra)
        one_line_error(result, 2, needle, as_json=as_json)
        assert fingerprint(tmp_path) == before


def test_quantization_is_refused_by_name(tmp_path, tiny_llama_dir):
    path = tmp_path / "quant.yaml"
    path.write_text(yaml.safe_dump({"quant_stage": {"quant_modifiers": {"GPTQModifier": {"scheme": "W4A16", "targets": "Linear"}}}}))
    _refused(tmp_path, tiny_llama_dir, path, "quant_stage.quant_modifiers.GPTQModifier: GPTQModifier quantizes")


def test_schedule_argument_is_refused_by_name(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, "MagnitudePruningModifier", targets=["Linear"], init_sparsity=0.05, final_sparsity=0.5)
    _refused(tmp_path, tiny_llama_dir, recipe, "MagnitudePruningModifier.final_sparsity: init_sparsity 0.05 -> final_sparsity 0.5")


def test_ignore_matching_nothing_is_refused(tmp_path, tiny_llama_dir):
    """A misspelt ignore would prune what it meant to keep: refused, not dropped."""
    recipe = write_recipe(tmp_path, "SparseGPTModifier", sparsity=0.5, ignore=["re:.*lm_head", "re:.*down_prj"])
    _refused(tmp_path, tiny_llama_dir, recipe, "targets.exclude[0] '^(?:.*down_prj)' excludes nothing")


def test_sparsity_list_longer_than_the_model_is_refused(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, "WandaPruningModifier", sparsity=[0.3, 0.6, 0.5], targets="LlamaDecoderLayer")
    _refused(tmp_path, tiny_llama_dir, recipe, "overrides[2].blocks: the model has no block 2", dry_run=True)
