"""What a streamed run holds outside the blocks: an untied ``lm_head`` is read when the head is
used and dropped after; an untied plain input embedding stays in the checkpoint's bfloat16
while the blocks compute in float32. Neither changes a number: perplexities, rounded heads
and the export are those of the float32 model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prune_cli.model.source import ModelSource
from prune_cli.stages.evaluate import EvalStage, perplexity
from prune_cli.stages.export import CheckpointWriter
from prune_cli.streaming.driver import Stage
from prune_cli.streaming.loader import load_model, open_model
from tests.random_checkpoints import write_random_llama
from tests.tiny_models import VOCAB, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def untied_bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untied")
    write_random_llama(folder, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, tokenizer=tiny_tokenizer(),
                       tie=False, dtype=torch.bfloat16)
    return folder


def _windows(n=4, seqlen=24):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(3))


def _driver(folder):
    opened = open_model(ModelSource("folder", str(folder)), "float32", CPU)
    return opened.driver


class _LmHeadSeen(Stage):
    """Records whether the lm_head is in memory while each block is."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_block(self, index, block):
        self.seen.append(self.model.lm_head.weight.device.type)


def test_the_lm_head_is_read_on_use_and_the_embedding_kept_in_bfloat16(untied_bf16):
    driver = _driver(untied_bf16)
    model = driver.model
    assert model.lm_head.weight.device.type == "meta"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and driver.dtype == torch.float32
    seen = _LmHeadSeen(model)
    driver.walk([seen, EvalStage(_windows(), 2)])
    assert seen.seen == ["meta", "meta"]  # never beside a block
    assert model.lm_head.weight.device.type == "meta"  # dropped after the evaluation used it


def test_streamed_perplexity_is_the_float32_models(untied_bf16):
    resident, _ = load_model(ModelSource("folder", str(untied_bf16)), "float32")
    ids = _windows()
    assert perplexity(_driver(untied_bf16), ids, batch_size=2) == perplexity(resident, ids, batch_size=2)


@pytest.mark.parametrize("head_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_rounded_head_is_the_rounded_float32_head(untied_bf16, head_dtype):
    """The evaluation "as saved" in ``head_dtype``: the same as rounding the float32 model's
    head tensors to ``head_dtype`` (and the embedding back in bfloat16 after)."""
    resident, _ = load_model(ModelSource("folder", str(untied_bf16)), "float32")
    with torch.no_grad():
        for module in (resident.model.embed_tokens, resident.lm_head, resident.model.norm):
            module.weight.copy_(module.weight.to(head_dtype))
    ids = _windows()
    want = perplexity(resident, ids, batch_size=2)
    driver = _driver(untied_bf16)
    stage = EvalStage(ids, 2, head_dtype=head_dtype)
    driver.walk([stage])
    assert stage.result == want
    assert driver.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_the_export_holds_the_stored_head(untied_bf16, tmp_path):
    driver = _driver(untied_bf16)
    writer = CheckpointWriter(tmp_path, driver, torch.bfloat16)
    writer.write_head()
    driver.walk([], after_block=[writer.write_block])
    writer.weights.close()
    source = {}
    for f in untied_bf16.glob("*.safetensors"):
        source.update(load_file(str(f)))
    written = {}
    for f in tmp_path.glob("*.safetensors"):
        written.update(load_file(str(f)))
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(written[name], source[name]), name
    assert driver.model.lm_head.weight.device.type == "meta"
