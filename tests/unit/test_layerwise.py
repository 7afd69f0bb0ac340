"""The layer-wise calibrator against slow full-model references."""

import pytest
import torch

from prune_cli.calibrators import layerwise
from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.methods import build_method
from prune_cli.model.structure import block_linears, decoder_blocks
from prune_cli.recipe.config import resolve
from prune_cli.recipe.plan import build_plan
from prune_cli.stages.pruning import calibrate_and_prune
from tests.tiny_models import VOCAB, tiny_model


def windows(n=6, seqlen=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_captured_inputs_reproduce_the_model(family):
    model = tiny_model(family)
    ids = windows()
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, ids, 4, torch.device("cpu"))
    assert [b.hidden.shape[0] for b in batches] == [4, 2]
    for block in blocks:
        layerwise.propagate(block, batches)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        final_norm = model.model.norm if family == "llama" else model.model.decoder.final_layer_norm
        ours = final_norm(torch.cat([b.hidden for b in batches]))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_shared_inputs_collected_once():
    model = tiny_model("llama")
    block = decoder_blocks(model).modules[0]
    batches = layerwise.capture_block_inputs(model, decoder_blocks(model).modules, windows(), 3, torch.device("cpu"))
    linears = block_linears(block)
    stats = layerwise.collect_input_stats(block, batches, linears, {n: frozenset({Stat.SQ_NORM}) for n in linears})
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    assert stats["self_attn.q_proj"].count == 6 * 32
    assert stats["self_attn.q_proj"].consumers == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


@torch.no_grad()
def slow_reference(model, ids, config):
    """Prune block by block with FULL model forwards: stats of block i's Linears come from
    running the whole model (blocks < i already pruned) with hooks on block i."""
    method = build_method(config.method)
    blocks = decoder_blocks(model).modules
    for block in blocks:
        linears = block_linears(block)
        acc = {n: InputStats(l.in_features, frozenset({Stat.SQ_NORM})) for n, l in linears.items()}
        handles = [l.register_forward_pre_hook(lambda m, a, n=n: acc[n].update(a[0])) for n, l in linears.items()]
        for start in range(0, ids.shape[0], 3):
            model(input_ids=ids[start : start + 3], use_cache=False)
        for h in handles:
            h.remove()
        for name, linear in linears.items():
            linear.weight.data.copy_(method.prune(linear.weight.data, acc[name], config.pattern).weight)
    return model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_next_block_sees_pruned_outputs(family):
    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    ids = windows()
    ours = tiny_model(family)
    calibrate_and_prune(ours, build_plan(ours, config), ids, 3, torch.device("cpu"))
    ref = slow_reference(tiny_model(family), ids, config)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b)


def test_stats_from_pruned_predecessor_differ_from_dense():
    """Guard for the test above: pruning earlier blocks does change later masks."""
    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    ids = windows()
    sequential = tiny_model("llama")
    calibrate_and_prune(sequential, build_plan(sequential, config), ids, 3, torch.device("cpu"))
    # dense-input variant: stats for every block from the dense model
    dense = tiny_model("llama")
    acc = {}
    handles = []
    for name, mod in dense.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            acc[name] = InputStats(mod.in_features, frozenset({Stat.SQ_NORM}))
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: acc[n].update(a[0])))
    with torch.no_grad():
        dense(input_ids=ids, use_cache=False)
    masks_differ = False
    method = build_method("wanda")
    for name, mod in dense.named_modules():
        if name in acc and ".layers.1." in name:
            dense_mask = method.prune(mod.weight.data, acc[name], config.pattern).mask
            seq_mask = sequential.get_submodule(name).weight.data != 0
            masks_differ |= not torch.equal(dense_mask, seq_mask)
    assert masks_differ


def test_plan_rejects_nm_not_dividing_width():
    from prune_cli.core.errors import PatternError

    config = resolve(None, {"method": "wanda", "pattern": "3:5"})
    with pytest.raises(PatternError, match="does not divide"):
        build_plan(tiny_model("llama"), config)


def test_plan_targets_regex():
    config = resolve(None, {"method": "wanda", "sparsity": 0.5, "targets": {"include": [r"mlp\."], "exclude": ["down_proj"]}})
    plan = build_plan(tiny_model("llama"), config)
    assert {l.local_name for l in plan.layers} == {"mlp.gate_proj", "mlp.up_proj"}
    assert all("lm_head" not in l.name and "embed" not in l.name for l in plan.layers)
