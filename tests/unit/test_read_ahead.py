"""Read-ahead: while a streamed walk holds block i, the source is asked to start reading block
i+1's tensors (``posix_fadvise(WILLNEED)`` on their byte ranges of the safetensors files), and
nothing else changes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from prune_cli.checkpoint.weights import LayeredWeights, SafetensorsWeights
from prune_cli.model.source import ModelSource
from prune_cli.stages.evaluate import EvalStage
from prune_cli.streaming.driver import Stage
from prune_cli.streaming.loader import open_model
from tests.random_checkpoints import write_random_llama
from tests.tiny_models import VOCAB, tiny_tokenizer

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/Unix only")


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("three-blocks")
    write_random_llama(folder, layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, tokenizer=tiny_tokenizer())
    return folder


@pytest.fixture
def advice(monkeypatch):
    """Every posix_fadvise call: (file name, offset, length, advice)."""
    calls = []
    real = os.posix_fadvise

    def record(fd, offset, length, what):
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length, what))
        return real(fd, offset, length, what)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def _header(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return 8 + size, json.loads(raw[8 : 8 + size])


def test_prefetch_advises_each_tensors_exact_byte_range(three_blocks, advice):
    source = SafetensorsWeights(three_blocks)
    start, header = _header(three_blocks)
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"]
    asked = source.prefetch([*names, "not.a.tensor"])
    want = []
    for name in names:
        begin, end = header[name]["data_offsets"]
        want.append(("model.safetensors", start + begin, end - begin, os.POSIX_FADV_WILLNEED))
    assert advice == want
    assert asked == sum(length for _, _, length, _ in want)
    # what is read afterwards is the stored tensor, untouched by the advice
    assert torch.equal(source.read(names[:1])[names[0]], SafetensorsWeights(three_blocks).read(names[:1])[names[0]])


def test_refused_advice_is_only_a_hint(three_blocks, monkeypatch):
    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    source = SafetensorsWeights(three_blocks)
    assert source.prefetch(["model.layers.0.mlp.up_proj.weight"]) == 0
    assert source.read(["model.layers.0.mlp.up_proj.weight"])["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)


def test_layered_source_asks_the_layer_that_holds_each_tensor(three_blocks, tmp_path):
    base = SafetensorsWeights(three_blocks)
    top = SafetensorsWeights(three_blocks)
    asked = {"top": [], "base": []}
    top.prefetch = lambda names: asked["top"].extend(names) or 0
    base.prefetch = lambda names: asked["base"].extend(names) or 0
    layered = LayeredWeights(top, base)
    layered._names["model.layers.0.mlp.up_proj.weight"] = base  # as if only the base held it
    layered.prefetch(["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "missing"])
    assert asked == {"top": ["model.layers.0.mlp.down_proj.weight"], "base": ["model.layers.0.mlp.up_proj.weight"]}


class _Held(Stage):
    def __init__(self, advice):
        self.advice, self.at_block = advice, []

    def on_block(self, index, block):
        self.at_block.append(len(self.advice))


def test_a_streamed_walk_reads_the_next_block_ahead(three_blocks, advice):
    """Entering block i asks for exactly block i+1's tensors (none after the last block); the
    walk's results are those of a walk without read-ahead."""
    opened = open_model(ModelSource("folder", str(three_blocks)), "float32", CPU)
    driver = opened.driver
    start, header = _header(three_blocks)
    by_offset = {start + entry["data_offsets"][0]: name for name, entry in header.items() if name != "__metadata__"}
    advice.clear()
    held = _Held(advice)
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    evaluation = EvalStage(windows, 2)
    driver.walk([held, evaluation])
    asked = [by_offset[offset] for _, offset, _, _ in advice]
    blocks = sorted({name.split(".")[2] for name in asked})
    assert blocks == ["1", "2"]  # block 0 is read when the walk starts, nothing after block 2
    for index in (1, 2):
        want = sorted(n for n in header if n.startswith(f"model.layers.{index}."))
        assert sorted(n for n in asked if n.startswith(f"model.layers.{index}.")) == want
    assert held.at_block == [len(want), 2 * len(want), 2 * len(want)]  # each block's advice before it computes

    ahead = evaluation.result
    plain = open_model(ModelSource("folder", str(three_blocks)), "float32", CPU).driver
    plain.read_ahead = lambda index: 0
    again = EvalStage(windows, 2)
    plain.walk([again])
    assert ahead is not None and ahead == again.result
