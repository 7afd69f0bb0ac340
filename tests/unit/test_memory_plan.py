"""The predicted peak of ``--dry-run``: its parts from the model's structure, as a streamed run
holds them (an untied lm_head only when used, an untied embedding in its stored dtype)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

from prune_cli.checkpoint.model_state import empty_model
from prune_cli.cli import app
from prune_cli.model.structure import decoder_blocks
from prune_cli.recipe.config import resolve
from prune_cli.run.memory_plan import SLACK, activation_streams, predicted_peak
from tests.random_checkpoints import write_random_llama
from tests.tiny_models import tiny_tokenizer

HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 2


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untied-plan")
    write_random_llama(folder, layers=LAYERS, hidden=HIDDEN, intermediate=INTERMEDIATE, heads=4, kv_heads=2,
                       tokenizer=tiny_tokenizer(), tie=False, dtype=torch.bfloat16)
    return folder


def _model(folder):
    return empty_model(AutoConfig.from_pretrained(folder), torch.float32)


def test_parts_of_an_untied_bfloat16_model(untied):
    model = _model(untied)
    vocab = model.config.vocab_size
    config = resolve(None, {"method": "wanda", "sparsity": 0.5, "calibration": {"samples": 2, "seqlen": 16},
                            "evaluation": {"enabled": False}})
    parts = predicted_peak(model, decoder_blocks(model), config, torch.float32, torch.bfloat16, evaluates=False,
                           libraries=1000)
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    assert parts["outside_blocks"] == vocab * HIDDEN * 2 + HIDDEN * 4  # bf16 embedding, fp32 final norm, no lm_head
    assert parts["lm_head_when_used"] == vocab * HIDDEN * 2  # only the export reads it, as stored
    assert parts["two_blocks"] == 2 * block
    assert parts["activations"] == 2 * 16 * HIDDEN * 4
    total = 1000 + parts["outside_blocks"] + max(2 * block, parts["lm_head_when_used"]) + parts["activations"]
    assert parts["predicted_peak"] == int(SLACK * total)


def test_an_evaluation_reads_the_lm_head_in_the_compute_dtype_with_a_windows_logits(untied):
    model = _model(untied)
    config = resolve(None, {"method": "wanda", "sparsity": 0.5, "evaluation": {"windows": 2, "seqlen": 32}})
    parts = predicted_peak(model, decoder_blocks(model), config, torch.float32, torch.bfloat16, evaluates=True,
                           libraries=0)
    vocab = model.config.vocab_size
    assert parts["lm_head_when_used"] == vocab * HIDDEN * 4 + 32 * vocab * 4
    assert activation_streams(config, True)["evaluation"] == 2 * 2 * 32


def test_float32_storage_keeps_everything_in_float32(untied):
    model = _model(untied)
    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    parts = predicted_peak(model, decoder_blocks(model), config, torch.float32, torch.float32, evaluates=False,
                           libraries=0)
    assert parts["outside_blocks"] == model.config.vocab_size * HIDDEN * 4 + HIDDEN * 4


def test_the_dry_run_prints_the_prediction(untied):
    result = CliRunner().invoke(app, ["compress", str(untied), "--method", "wanda", "--sparsity", "0.5", "--no-eval",
                                      "--calib-samples", "2", "--seqlen", "16", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    memory = json.loads(result.stdout)["memory"]
    assert memory["predicted_peak"] > memory["libraries"] > 0
    assert memory["outside_blocks"] < memory["lm_head_when_used"] * 2  # the embedding counted in bfloat16
