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

from tests.cli.test_bad_input import checkpoint, fingerprint, one_line_error, run  # noqa: F401 - a fixture

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


# ----------------------------------------------------------------------------- cache keys


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """A tiny Llama whose model.safetensors is over 2 MiB (a wide MLP), so that its middle lies
    outside its first and last MiB."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.intermediate_size = 2048
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide") / "wide"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size > 3 << 20
    return folder


def edit_in_the_middle(path: Path) -> None:
    """Change 4 bytes in the middle of ``path`` (a float32 weight's value), same size, and set its
    modification time back to what it was (as ``cp -p`` or ``touch -d`` can)."""
    import os
    import time

    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, as any real edit is
    with path.open("r+b") as handle:
        middle = before.st_size // 2 // 4 * 4
        handle.seek(middle)
        value = handle.read(4)
        handle.seek(middle)
        handle.write(bytes(b ^ 0x01 for b in value[:3]) + value[3:])  # a small change in the mantissa
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_a_same_size_edit_in_the_middle_misses_the_baseline_cache(tmp_path, wide_llama_dir, monkeypatch):
    monkeypatch.setenv("PRUNE_CLI_BASELINE_CACHE", "1")
    monkeypatch.setenv("PRUNE_CLI_CACHE", str(tmp_path / "cache"))
    model = _copy(wide_llama_dir, tmp_path / "model")
    args = ["compress", model, "--method", "magnitude", "--sparsity", "0.5", "--calib-samples", "2", "--seqlen", "16",
            *EVAL, "--json"]
    first = run(*args, "-o", tmp_path / "a")
    again = run(*args, "-o", tmp_path / "b")
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert json.loads(again.stdout)["evaluation"]["dense_cached"] is True
    assert "dense baseline from the cache" in again.stderr  # said in the log
    edit_in_the_middle(model / "model.safetensors")
    edited = run(*args, "-o", tmp_path / "c")
    assert edited.exit_code == 0, edited.output
    assert json.loads(edited.stdout)["evaluation"]["dense_cached"] is False
    assert "dense baseline from the cache" not in edited.stderr


def test_resume_is_refused_when_a_model_file_changed_since_the_stop(tmp_path, wide_llama_dir, monkeypatch):
    from tests.cli.test_resume import stop_at_block

    model = _copy(wide_llama_dir, tmp_path / "model")
    out = tmp_path / "out"
    args = ["compress", model, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", out]
    with monkeypatch.context() as m:
        stop_at_block(m, 1)
        assert run(*args).exit_code == 130
    edit_in_the_middle(model / "model.safetensors")
    state = [p for p in tmp_path.glob(".out.partial-*/.work/resume/*")]
    before = {p: p.read_bytes() for p in state}
    refused = run(*args, "--resume", "--json")
    one_line_error(refused, 2, f"{model / 'model.safetensors'} changed since the interrupted run", as_json=True)
    assert state and {p: p.read_bytes() for p in state} == before  # the resume state is kept as it was


def test_an_unchanged_model_resumes_and_says_so(tmp_path, tiny_llama_dir, monkeypatch):
    from tests.cli.test_resume import stop_at_block

    out = tmp_path / "out"
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", out]
    with monkeypatch.context() as m:
        stop_at_block(m, 1)
        assert run(*args).exit_code == 130
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "adopting the resume state" in resumed.stderr and "model files unchanged" in resumed.stderr


# ----------------------------------------------------------------------------- export


def test_an_export_drops_auto_map_and_custom_pipelines(tmp_path, tiny_llama_dir):
    """prune-cli never runs remote code nor exports code files: references to them are dropped."""
    model = _copy(tiny_llama_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    config["custom_pipelines"] = {"text-generation": {"impl": "pipeline_custom.Pipe"}}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = run("compress", model, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    exported = json.loads((out / "config.json").read_text())
    assert "auto_map" not in exported and "custom_pipelines" not in exported
    assert exported["architectures"] == ["LlamaForCausalLM"]
    assert "dropped auto_map and custom_pipelines" in result.stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads without remote code


# ----------------------------------------------------------------------------- headers checked before reading


def _with_declared_shape(folder: Path, name: str, shape: list[int]) -> int:
    """Rewrite ``folder``'s model.safetensors so that tensor ``name`` is declared ``shape`` (float32,
    placed last, offsets consistent) and the file is as long as the header says: a sparse file
    (``truncate``), so a 70 GB declaration costs no disk. Returns the declared bytes."""
    import os
    import struct

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[name]
    header, blobs, offset = {}, [], 0
    for key, tensor in tensors.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    declared = 4 * int(torch.tensor(shape).prod())
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + declared]}
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    os.truncate(path, 8 + len(head) + offset + declared)
    return declared


@pytest.mark.parametrize("command", ["eval", "compress"])
def test_a_header_declaring_a_70_gb_tensor_is_refused_before_reading(tmp_path, tiny_llama_dir, command):
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    name = "model.layers.1.mlp.down_proj.weight"
    assert _with_declared_shape(folder, name, [64, 280_000_000]) > 70e9
    args = ["eval", folder, *EVAL] if command == "eval" else \
        ["compress", folder, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", tmp_path / "out"]
    before = fingerprint(tmp_path)
    result = run(*args, "--json")
    data = one_line_error(result, 2, f"tensor {name} is declared [64, 280000000]", as_json=True)
    assert "expects [64, 128]" in data["error"]["message"] and "model.safetensors" in data["error"]["message"]
    assert fingerprint(tmp_path) == before


def test_verify_refuses_a_header_declaring_another_shape_before_reading(tmp_path, checkpoint):  # noqa: F811 - the fixture
    import shutil as _shutil

    folder = tmp_path / "ckpt"
    _shutil.copytree(checkpoint, folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    _with_declared_shape(folder, name, [64, 280_000_000])
    one_line_error(run("verify", folder), 2, f"tensor {name} is declared [64, 280000000]")


# ----------------------------------------------------------------------------- damaged files: one line, exit 2


def _tokenizer_without_added_tokens(folder: Path) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    del data["added_tokens"]
    (folder / "tokenizer.json").write_text(json.dumps(data))


DAMAGED = {
    # id: (damage the copied folder, needle)
    "tokenizer-without-added-tokens": (_tokenizer_without_added_tokens, "tokenizer.json has no valid 'added_tokens'"),
    "tokenizer-random-bytes": (lambda f: (f / "tokenizer.json").write_bytes(bytes(range(256)) * 8),
                               "tokenizer.json is not valid JSON"),
    "tokenizer-not-a-tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"model": {"type": "Nope"}, "added_tokens": []}'),
                                  "tokenizer.json is not a tokenizer the tokenizers library can read"),
    "fifo-weights": (lambda f: ((f / "model.safetensors").unlink(), __import__("os").mkfifo(f / "model.safetensors")),
                     "model.safetensors is a named pipe (FIFO)"),
}


@pytest.mark.parametrize("command", ["eval", "compress"])
@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_model_files_are_named_in_one_line(tmp_path, tiny_llama_dir, case, command):
    from tests.unit.test_checkpoint_files import within_seconds

    damage, needle = DAMAGED[case]
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    damage(folder)
    args = ["eval", folder, *EVAL] if command == "eval" else \
        ["compress", folder, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", tmp_path / "out"]
    before = fingerprint(tmp_path)
    with within_seconds(60):  # a FIFO must not block the run
        result = run(*args, "--json")
    data = one_line_error(result, 2, needle, as_json=True)
    assert str(folder) in data["error"]["message"]
    assert fingerprint(tmp_path) == before


# ----------------------------------------------------------------------------- GGUF files


def tiny_gguf(path: Path, block_count: int | None = None, width: int = 64, heads: int = 4, layers: int = 2) -> Path:
    """A tiny Llama as a GGUF file (float32 tensors, a byte-level BPE tokenizer) written with the
    ``gguf`` package's GGUFWriter; ``block_count``, ``width`` (embedding_length) and ``heads``
    (head_count) are what its metadata says, whatever its tensors hold."""
    from gguf import GGUFWriter

    from tests.tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model("llama", layers)
    tok = tiny_tokenizer()
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]; tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(layers if block_count is None else block_count)
    w.add_context_length(1024); w.add_embedding_length(width); w.add_feed_forward_length(128)
    w.add_head_count(heads); w.add_head_count_kv(2); w.add_layer_norm_rms_eps(1e-6); w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2"); w.add_token_list(tokens); w.add_token_types([1] * len(tokens)); w.add_token_merges(merges)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, gg in per.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        w.add_tensor(gg, sd[hf].float().numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def _set_kv_count(path: Path, count: int) -> None:
    """Overwrite the header's key/value count (bytes 16-24: after magic, version, tensor count)."""
    with path.open("r+b") as handle:
        handle.seek(16)
        handle.write(count.to_bytes(8, "little"))


GGUF_CASES = {
    # id: (tiny_gguf arguments, damage after writing, needle)
    "block-count-3000-holds-2": ({"block_count": 3000}, None, "llama.block_count = 3000, its tensors hold blocks: 2"),
    "head-count-0": ({"heads": 0}, None, "llama.attention.head_count = 0"),
    "embedding-length-wrong": ({"width": 32}, None, "llama.embedding_length = 32, its token_embd.weight is 64 wide"),
    "truncated-to-4-kb": ({}, lambda p: p.write_bytes(p.read_bytes()[:4096]), "truncated or corrupt"),
    "corrupt-kv-count": ({}, lambda p: _set_kv_count(p, 1 << 40), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_metadata_is_checked_against_its_tensors_first(tmp_path, case):
    from tests.unit.test_checkpoint_files import within_seconds

    kwargs, damage, needle = GGUF_CASES[case]
    gguf = tiny_gguf(tmp_path / "model.gguf", **kwargs)
    if damage is not None:
        damage(gguf)
    before = fingerprint(tmp_path)
    with within_seconds(60):  # 3000 declared blocks hung transformers' name map for minutes
        result = run("eval", gguf, *EVAL, "--json")
    data = one_line_error(result, 2, needle, as_json=True)
    assert str(gguf) in data["error"]["message"]
    assert fingerprint(tmp_path) == before


def test_a_good_gguf_is_cached_and_its_cache_use_is_said(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_CLI_CACHE", str(tmp_path / "cache"))
    gguf = tiny_gguf(tmp_path / "model.gguf")
    first = run("eval", gguf, *EVAL, "--json")
    assert first.exit_code == 0, first.output
    assert "cached the dequantised weights" in first.stderr
    again = run("eval", gguf, *EVAL, "--json")
    assert again.exit_code == 0, again.output
    assert "from the cache" in again.stderr
    assert json.loads(again.stdout)["ppl"] == json.loads(first.stdout)["ppl"]


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("hidden_size", -64), ("num_hidden_layers", 0),
                                        ("vocab_size", 0), ("intermediate_size", 12.5)])
def test_a_config_size_that_is_not_a_positive_whole_number_is_refused(tmp_path, tiny_llama_dir, key, value):
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    data = one_line_error(run("eval", folder, *EVAL, "--json"), 2, f"says {key} = {value!r}", as_json=True)
    assert str(folder / "config.json") in data["error"]["message"]


def test_a_stray_bin_file_next_to_pytorch_model_bin_is_ignored(tmp_path):
    from tests.tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "bin"
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    clean = _eval_ppl(folder)
    torch.save({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)}, folder / "pytorch_model_old.bin")  # sorts after pytorch_model.bin
    assert _eval_ppl(folder) == clean
