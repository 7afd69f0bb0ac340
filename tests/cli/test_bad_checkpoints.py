"""Model checkpoints that are not what they seem, and the caches keyed on them: every file read
is checked before it is trusted (exit 2, one line naming the file and the problem), and every
cache key changes when its input does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli.test_bad_input import fingerprint, one_line_error, run

EVAL = ["--eval-windows", "2", "--eval-seqlen", "16", "--device", "cpu"]
FAST = ["--calib-samples", "2", "--seqlen", "16", "--no-eval", "--device", "cpu"]


def _copy(tiny_llama_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_llama_dir, dest)
    return dest


def _eval_ppl(folder: Path) -> float:
    result = run("eval", folder, *EVAL, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["ppl"]


# ----------------------------------------------------------------------------- which files are read


def test_a_stray_file_next_to_model_safetensors_is_ignored_as_transformers_does(tmp_path, tiny_llama_dir):
    """An old file repeating a tensor name with other values: the model's own weights are read."""
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    stray = {"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)}
    save_file(stray, str(folder / "old-copy.safetensors"))
    assert _eval_ppl(folder) == _eval_ppl(tiny_llama_dir)


def _sharded(tmp_path: Path) -> Path:
    from tests.tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    return folder


def test_a_stray_shard_beside_an_index_is_ignored(tmp_path):
    folder = _sharded(tmp_path)
    clean = _eval_ppl(folder)
    save_file({"model.norm.weight": torch.zeros(64)}, str(folder / "zz-leftover.safetensors"))
    assert _eval_ppl(folder) == clean


def test_a_tensor_in_two_shards_the_index_names_is_refused_naming_both(tmp_path):
    folder = _sharded(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.norm.weight"
    other = sorted(set(index.values()) - {index[name]})[0]
    tensors = load_file(str(folder / other))
    tensors[name] = torch.zeros(64)
    save_file(tensors, str(folder / other))
    for args in (["eval", folder, *EVAL], ["compress", folder, "--method", "magnitude", "--sparsity", "0.5", *FAST,
                                           "-o", tmp_path / "out"]):
        before = fingerprint(tmp_path)
        result = run(*args, "--json")
        data = one_line_error(result, 2, f"tensor {name} is in both", as_json=True)
        assert index[name] in data["error"]["message"] and other in data["error"]["message"]
        assert fingerprint(tmp_path) == before


def test_an_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = _sharded(tmp_path)
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.move(folder / shard, tmp_path / shard)
    index["weight_map"] = {k: (f"../{shard}" if v == shard else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    one_line_error(run("eval", folder, *EVAL), 2, f"names the shard '../{shard}'")
