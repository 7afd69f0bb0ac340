"""The block driver: streamed blocks equal resident ones, sources are never changed by a walk,
placement goes through one policy and is undone, and the streamed export is what
``save_pretrained`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from prune_cli.checkpoint.model_state import empty_model
from prune_cli.checkpoint.shards import StreamingCheckpoint, TensorSpec
from prune_cli.checkpoint.weights import SafetensorsWeights
from prune_cli.model.source import ModelSource
from prune_cli.recipe.config import resolve
from prune_cli.recipe.plan import build_plan
from prune_cli.stages.evaluate import EvalStage, perplexity
from prune_cli.stages.pruning import PruneStage, calibrate_and_prune
from prune_cli.streaming.driver import BlockDriver, Placement, Stage
from prune_cli.streaming.loader import load_model, open_model
from tests.tiny_models import VOCAB, save_tiny_model, tiny_config

CPU = torch.device("cpu")


def windows(n=6, seqlen=32, seed=1):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def opened(folder: Path, placement=None):
    return open_model(ModelSource("folder", str(folder)), "auto", CPU, placement=placement)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama3"), layers=3)


def test_streamed_perplexity_equals_the_whole_model_forward(llama3):
    model, _ = load_model(ModelSource("folder", str(llama3)))
    ids = windows()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    streamed = perplexity(opened(llama3).driver, ids, batch_size=4)
    resident = perplexity(model, ids, batch_size=4)
    assert streamed == resident
    assert streamed.nll == pytest.approx(float(ref), rel=1e-6)


def test_streamed_pruning_equals_resident_pruning(llama3):
    config = resolve(None, {"method": "sparsegpt", "sparsity": 0.5})
    model, _ = load_model(ModelSource("folder", str(llama3)))
    ids = windows()
    calibrate_and_prune(model, build_plan(model, config), ids, 4, CPU)
    opened_model = opened(llama3)
    driver = opened_model.driver
    stage = PruneStage(build_plan(driver.model, config), ids, 4)
    seen = {}
    driver.walk([stage], after_block=[lambda i, b: seen.update({f"{driver.name(i)}.{k}": v.clone() for k, v in b.state_dict().items()})])
    reference = model.state_dict()
    assert seen and all(torch.equal(v, reference[k]) for k, v in seen.items())


class _ScaleWeights(Stage):
    """Changes every block in place (as pruning does)."""

    def on_block(self, index, block):
        for p in block.parameters():
            p.data.mul_(0.5)


def test_a_walk_never_changes_the_source(llama3):
    """safetensors may hand out tensors that share memory with the file's mapping: a stage's
    in-place change must not leak into the next walk's read of the same block."""
    driver = opened(llama3).driver
    original = load_file(str(llama3 / "model.safetensors"))
    driver.walk([_ScaleWeights()])
    seen = {}
    driver.walk([], after_block=[lambda i, b: seen.update({f"{driver.name(i)}.{k}": v.clone() for k, v in b.state_dict().items()})])
    assert all(torch.equal(v, original[k]) for k, v in seen.items())


def test_streamed_blocks_are_dropped_after_the_walk(llama3):
    driver = opened(llama3).driver
    driver.walk([_ScaleWeights()])
    assert all(p.device.type == "meta" for p in driver.found.modules.parameters())
    assert all(p.device.type == "cpu" for n, p in driver.model.named_parameters() if not n.startswith("model.layers."))


class RecordingPlacement(Placement):
    """Tracks where each tensor is supposed to be: a tensor moved by :meth:`move` is "device"
    until its token is restored. (On a CPU-only machine the device is the CPU too, so the
    bookkeeping, not the device, is what is checked.)"""

    def __init__(self):
        self.on_device: dict[int, int] = {}  # id(tensor owner, key) -> times moved
        self.log: list[tuple[str, int]] = []

    def move(self, module, device, exclude=()):
        token = super().move(module, device, exclude)
        skip = {id(m) for root in exclude for m in root.modules()}
        keys = [(id(owner), key) for owner in module.modules() if id(owner) not in skip
                for key, t in list(owner._parameters.items()) + list(owner._buffers.items()) if t is not None]
        for key in keys:
            self.on_device[key] = self.on_device.get(key, 0) + 1
        self.log.append(("move", len(keys)))
        return (token, keys)

    def restore(self, token):
        inner, keys = token
        super().restore(inner)
        self.drop(token)

    def drop(self, token):
        for key in token[1]:
            self.on_device[key] -= 1
            if not self.on_device[key]:
                del self.on_device[key]
        self.log.append(("restore", len(token[1])))


class CheckPlacement(Stage):
    """Asserts, at every block, that the block is on the device and the rest of the model is not."""

    def __init__(self, placement: RecordingPlacement):
        self.placement = placement
        self.checked = 0

    def begin(self, driver):
        self.driver = driver

    def on_block(self, index, block):
        inside = {(id(o), k) for o in block.modules() for k, t in list(o._parameters.items()) + list(o._buffers.items())
                  if t is not None}
        for key in inside:
            assert key in self.placement.on_device, f"a tensor of block {index} is not on the device"
        head = self.driver.model
        outside = [(id(o), k) for o in head.modules() if not any(o is m for m in block.modules())
                   for k in o._parameters if o._parameters[k] is not None and o._parameters[k].device.type != "meta"]
        assert not any(key in self.placement.on_device for key in outside), "the head stayed on the device"
        self.checked += 1


@pytest.mark.parametrize("streamed", [True, False])
def test_every_stage_sees_its_block_on_the_device_and_everything_goes_home(llama3, streamed):
    placement = RecordingPlacement()
    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    if streamed:
        driver = opened(llama3, placement).driver
    else:
        model, _ = load_model(ModelSource("folder", str(llama3)))
        driver = BlockDriver(model, CPU, placement=placement)
    ids = windows()
    check = CheckPlacement(placement)
    stages = [EvalStage(ids, 4), PruneStage(build_plan(driver.model, config), ids, 4), check, EvalStage(ids, 4)]
    driver.walk(stages)
    assert check.checked == driver.n_blocks
    assert placement.on_device == {}, "some tensors were never moved back"
    assert any(kind == "move" and n > 0 for kind, n in placement.log)
    assert stages[0].result is not None and stages[-1].result is not None


@pytest.mark.report_edited  # the writer is given a minimal hand-made report
def test_streamed_export_equals_save_pretrained(llama3, tmp_path):
    """Names, values and dtypes of the export written block by block equal what
    ``save_pretrained`` writes of the same pruned model; tied lm_head left out; plain
    transformers loads it."""
    from transformers import AutoModelForCausalLM

    from prune_cli.stages.export import CheckpointWriter

    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    ids = windows()
    model, tokenizer = load_model(ModelSource("folder", str(llama3)))
    calibrate_and_prune(model, build_plan(model, config), ids, 4, CPU)
    model.save_pretrained(tmp_path / "reference")
    driver = opened(llama3).driver
    out = tmp_path / "streamed"
    out.mkdir()
    writer = CheckpointWriter(out, driver, torch.float32)
    writer.write_head()
    driver.walk([PruneStage(build_plan(driver.model, config), ids, 4)], after_block=[writer.write_block])
    report = {"format": "prune-cli/sparsity-report", "model": str(llama3), "method": "wanda", "pattern": "unstructured",
              "model_source": {"kind": "folder", "location": str(llama3), "gguf_file": None}}  # what the card reads
    written = writer.finish(tokenizer, report)
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(reference) and "lm_head.weight" not in ours
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert {f["name"] for f in written["files"]} >= {"model.safetensors", "config.json", "tokenizer.json", "README.md"}
    assert not any(f["name"].startswith(".work") for f in written["files"])  # removed by the commit, never listed
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert perplexity(reloaded, ids) == perplexity(model, ids)


def test_untied_lm_head_is_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    from prune_cli.stages.export import CheckpointWriter

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    source = SafetensorsWeights(tmp_path / "src")
    skeleton = empty_model(cfg, torch.float32)
    driver = BlockDriver(skeleton, CPU, source, torch.float32)
    driver.load_head()
    assert skeleton.lm_head.weight is not skeleton.model.embed_tokens.weight
    out = tmp_path / "out"
    out.mkdir()
    writer = CheckpointWriter(out, driver, torch.bfloat16)
    writer.write_head()
    driver.walk([], after_block=[writer.write_block])
    writer.weights.finish()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in f.keys()
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("lm_head.weight"), source.read(["lm_head.weight"])["lm_head.weight"].bfloat16())


def test_shards_written_in_any_order_are_ordinary_safetensors(tmp_path):
    specs = [TensorSpec(f"t{i}", (3, i + 1), dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.int64, torch.float16])]
    values = {s.name: (torch.randn(s.shape) * 10).to(s.dtype) for s in specs}
    files = StreamingCheckpoint(tmp_path, specs, max_shard_bytes=40)
    for s in reversed(specs):
        files.write(s.name, values[s.name])
    names = files.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(names) > 2 and set(index["weight_map"]) == set(values)
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), values[name])


def test_shards_refuse_a_wrong_tensor_and_report_missing_ones(tmp_path):
    specs = [TensorSpec("a", (2, 2), torch.float32), TensorSpec("b", (2,), torch.float32)]
    files = StreamingCheckpoint(tmp_path, specs)
    with pytest.raises(ValueError, match="planned"):
        files.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="planned"):
        files.write("b", torch.zeros(2, dtype=torch.int64))
    files.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="never written"):
        files.finish()
    reopened = StreamingCheckpoint(tmp_path, specs, resume=True)
    reopened.write("b", torch.ones(2))
    reopened.written.add("a")
    reopened.finish()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["b"], torch.ones(2))
    with pytest.raises(ValueError, match="laid out for other tensors"):
        StreamingCheckpoint(tmp_path, [TensorSpec("a", (3,), torch.float32)], resume=True)


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch-bin"])
def test_other_checkpoint_layouts_stream_to_the_same_result(llama3, tmp_path, layout):
    """A sharded safetensors folder (with its index) and a pickled ``pytorch_model.bin`` folder
    give the same pruned weights as the single safetensors file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama3)
    other = tmp_path / layout
    if layout == "pytorch-bin":
        other.mkdir()
        model.config.save_pretrained(other)  # transformers 5 writes safetensors only: the old format by hand
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, other / "pytorch_model.bin")
    else:
        model.save_pretrained(other, max_shard_size="40KB")
        assert (other / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((llama3 / name).read_bytes())
    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    ids = windows()
    results = []
    for folder in (llama3, other):
        driver = opened(folder).driver
        seen = {}
        driver.walk([PruneStage(build_plan(driver.model, config), ids, 4)],
                    after_block=[lambda i, b, d=driver, s=seen: s.update({f"{d.name(i)}.{k}": v.clone() for k, v in b.state_dict().items()})])
        results.append(seen)
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_capture_keeps_each_blocks_own_keyword_arguments():
    """Gemma 3's sliding-window and global layers get different masks and rotary embeddings;
    the capture records, per block, the ones that differ from block 0's (Llama: none)."""
    from prune_cli.calibrators.layerwise import capture_block_inputs
    from tests.tiny_models import tiny_model

    windows = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    llama = tiny_model("llama", layers=3)
    batches = capture_block_inputs(llama, llama.model.layers, windows, 2, torch.device("cpu"))
    assert batches[0].layer_kwargs == {}

    gemma = tiny_model("gemma3", layers=4)
    types = gemma.config.layer_types
    assert types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    (batch,) = capture_block_inputs(gemma, gemma.model.layers, windows, 2, torch.device("cpu"))
    assert sorted(batch.layer_kwargs) == [1, 3]  # the global layers; block 2 is like block 0
    assert {"attention_mask", "position_embeddings"} <= set(batch.layer_kwargs[1])
    # each block called with its own arguments reproduces the model's hidden states
    hidden = batch.hidden
    for index, block in enumerate(gemma.model.layers):
        args, kwargs = batch.inputs(block)
        hidden = block(hidden, *args, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    with torch.no_grad():
        reference = gemma.model(windows, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(gemma.model.norm(hidden), reference, atol=1e-5)
    # an unregistered block gets block 0's
    stranger = torch.nn.Identity()
    assert batch.inputs(stranger)[1] is batch.kwargs


def test_the_head_sees_one_window_at_a_time(llama3, monkeypatch):
    """Logits are (L, vocab) per window, never (batch, L, vocab): with Gemma 3's 262k vocabulary
    a batch of 4 x 256 tokens is 1 GB of logits per copy (measured: peak RSS of a Gemma 3 270M
    compress 4.61 GB -> 2.36 GB). The perplexity is the same as from whole-batch logits."""
    from prune_cli.stages.evaluate import batch_nll

    driver = opened(llama3).driver
    seen = []
    original = BlockDriver.head_logits

    def spy(self, hidden, ids):
        seen.append(tuple(ids.shape))
        return original(self, hidden, ids)

    monkeypatch.setattr(BlockDriver, "head_logits", spy)
    ids = windows()
    result = perplexity(driver, ids, batch_size=4)
    assert seen and all(shape[0] == 1 for shape in seen) and len(seen) == ids.shape[0]
    model, _ = load_model(ModelSource("folder", str(llama3)))
    with torch.no_grad():
        nll, tokens = batch_nll(model(input_ids=ids, use_cache=False).logits, ids)
    assert result.tokens == tokens and result.nll == pytest.approx(nll / tokens, rel=1e-6)
