"""Mixture-of-experts models (prune_cli.model.moe): every expert pruned as its own Linear layers,
calibrated on the tokens its router sends it, with a per-expert fallback for experts that get
too few; routers dense; the export a plain transformers checkpoint. Tiny random Mixtral,
Qwen2-MoE (with a shared expert and its gate Linear) and Qwen3-MoE built in-process."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml

from prune_cli.calibrators import layerwise
from prune_cli.calibrators.stats import Stat
from prune_cli.model.moe import (
    ExpertLinear,
    MoeOptions,
    RoutedExperts,
    complete_expert_stats,
    linearize_experts,
    routed_experts,
    router_names,
)
from prune_cli.model.structure import block_linears
from tests.cli.test_cli import SMALL as PLAIN
from tests.cli.test_cli import assert_one_line_error, run
from tests.integration.test_families import SMALL, _direct_ppl
from tests.tiny_models import save_tiny_model, tiny_model

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
_MODELS: dict[str, object] = {}


def _model_dir(family, factory):
    if family not in _MODELS:
        _MODELS[family] = save_tiny_model(family, factory.mktemp(f"tiny-{family}"))
    return _MODELS[family]


def _experts_of(model) -> torch.nn.Module:
    return model.model.layers[0].mlp.experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_linearized_experts_compute_what_transformers_computes_bit_for_bit(family):
    model = tiny_model(family)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    fused = _experts_of(model)
    assert linearize_experts(model) == 2
    experts = _experts_of(model)
    assert isinstance(experts, RoutedExperts) and experts.gate_up_proj is fused.gate_up_proj  # the same tensors
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    names = set(model.state_dict())  # no new or renamed tensors: the checkpoint layout is unchanged
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any("[" in n for n in names)


def test_an_expert_linear_is_its_slice_of_the_fused_tensor_and_writes_through():
    model = tiny_model("mixtral")
    linearize_experts(model)
    experts = _experts_of(model)
    view = experts.linear("down_proj", 2)
    assert isinstance(view, ExpertLinear) and isinstance(view, torch.nn.Linear)
    assert (view.out_features, view.in_features) == tuple(experts.down_proj.shape[1:])
    with torch.no_grad():
        view.weight.data.copy_(torch.zeros_like(view.weight))
    assert (experts.down_proj[2] == 0).all() and (experts.down_proj[1] != 0).any()
    moved = copy.deepcopy(model.model.layers[0])  # a deep copy's views point into the copy's tensors
    copied = routed_experts(moved)["mlp.experts"]
    assert copied.linear("down_proj", 1).weight.data_ptr() == copied.down_proj[1].data_ptr()


def _block_and_batches(family="mixtral", windows=4, seqlen=32):
    model = tiny_model(family)
    linearize_experts(model)
    ids = torch.randint(0, 200, (windows, seqlen), generator=torch.Generator().manual_seed(1))
    batches = layerwise.capture_block_inputs(model, model.model.layers, ids, 2, torch.device("cpu"))
    return model.model.layers[0], batches


def _routing(block, batches):
    """Per expert: the post-attention, normed hidden states of the tokens routed to it (one entry
    per (token, slot) pair), computed from the block's own parts."""
    routed: dict[int, list[torch.Tensor]] = {}
    seen = []
    handle = block.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            args, kwargs = batch.inputs(block)
            block(batch.hidden, *args, **kwargs)
        handle.remove()
        for x in seen:
            _, _, index = block.mlp.gate(x)
            for e in range(block.mlp.experts.num_experts):
                routed.setdefault(e, []).append(x[(index == e).any(-1)])
    return {e: torch.cat(xs) for e, xs in routed.items()}, torch.cat(seen)


def test_expert_statistics_come_from_the_tokens_routed_to_it():
    block, batches = _block_and_batches()
    routed, everything = _routing(block, batches)
    linears = block_linears(block)
    wanted = {f"mlp.experts.gate_up_proj[{e}]": frozenset({Stat.SQ_NORM}) for e in range(4)}
    stats = layerwise.collect_input_stats(block, batches, linears, wanted)
    for e in range(4):
        got = stats[f"mlp.experts.gate_up_proj[{e}]"]
        assert got.count == routed[e].shape[0] < everything.shape[0]
        torch.testing.assert_close(got.sum_sq, routed[e].square().sum(0))

    kept, by_magnitude, records = complete_expert_stats(block, batches, linears, wanted, stats, MoeOptions(0), "b")
    assert kept == stats and not by_magnitude
    assert [(r.routed_tokens, r.calibration) for r in records] == [(routed[e].shape[0], "routed") for e in range(4)]


def test_an_expert_with_too_few_routed_tokens_is_calibrated_on_every_token():
    block, batches = _block_and_batches()
    routed, everything = _routing(block, batches)
    linears = block_linears(block)
    wanted = {n: frozenset({Stat.SQ_NORM}) for n in linears if "experts" in n}
    stats = layerwise.collect_input_stats(block, batches, linears, wanted)
    counts = sorted(routed[e].shape[0] for e in range(4))
    threshold = counts[1] + 1  # the two least-routed experts fall back
    out, by_magnitude, records = complete_expert_stats(block, batches, linears, wanted, stats,
                                                       MoeOptions(threshold, "all-tokens"), "b")
    assert not by_magnitude
    for e, record in enumerate(records):
        gate_up, down = out[f"mlp.experts.gate_up_proj[{e}]"], out[f"mlp.experts.down_proj[{e}]"]
        if routed[e].shape[0] < threshold:
            assert record.calibration == "all-tokens" and record.routed_tokens == routed[e].shape[0]
            assert gate_up.count == down.count == everything.shape[0]
            torch.testing.assert_close(gate_up.sum_sq, everything.square().sum(0))
        else:
            assert record.calibration == "routed" and gate_up is stats[f"mlp.experts.gate_up_proj[{e}]"]
    assert not any(m.all_tokens for m in routed_experts(block).values())  # the mode is switched off after

    _, by_magnitude, records = complete_expert_stats(block, batches, linears, wanted, stats,
                                                     MoeOptions(threshold, "magnitude"), "b")
    short = [e for e in range(4) if routed[e].shape[0] < threshold]
    assert by_magnitude == {f"mlp.experts.{t}[{e}]" for e in short for t in ("gate_up_proj", "down_proj")}
    assert [r.calibration for r in records if r.calibration != "routed"] == ["magnitude"] * len(short)


def test_routers_and_the_shared_expert_gate_are_never_targets():
    model = tiny_model("qwen2_moe")
    linearize_experts(model)
    block = model.model.layers[0]
    assert router_names(block) == {"mlp.shared_expert_gate"}  # Qwen2-MoE's router is not a Linear


def _recipe(tmp_path, **extra) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **extra}))
    return str(path)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", [["--method", "wanda", "--sparsity", "0.5"], ["--method", "sparsegpt", "--pattern", "2:4"]],
                         ids=["wanda", "sparsegpt-2:4"])
def test_moe_compress_export_reload_eval_verify(tmp_path, tmp_path_factory, family, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _model_dir(family, tmp_path_factory)
    out = tmp_path / "out"
    result = run("compress", model_dir, *method, *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["streamed"] is True  # per-expert stored tensors stacked as each block is read
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert report["ppl"]["dense"] == pytest.approx(_direct_ppl(dense, tokenizer, False), rel=1e-4)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert report["ppl"]["compressed"] == pytest.approx(_direct_ppl(exported, tokenizer, False), rel=1e-4)

    names = [l["name"] for l in report["layers"]]
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 2 * 2 * 4  # 2 blocks x 4 experts x (gate_up, down)
    assert not any("gate." in n or n.endswith("_gate") for n in names)  # routers stay dense
    if family == "qwen2_moe":
        assert any(".shared_expert.gate_proj" in n for n in names)  # the shared expert is an ordinary MLP
    for layer in report["layers"]:
        owner, _, leaf = layer["name"].rpartition(".")
        if "[" in leaf:
            tensor, index = leaf.rstrip("]").split("[")
            weight = exported.get_submodule(owner).get_parameter(tensor)[int(index)]
        else:
            weight = exported.get_submodule(layer["name"]).weight
        assert (weight == 0).float().mean().item() == pytest.approx(layer["achieved_sparsity"], abs=1e-6)
        assert layer["achieved_sparsity"] == pytest.approx(0.5)
        if "2:4" in layer["pattern"]:  # N:M along each expert's input dimension
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all(), layer["name"]
    for name, value in dense.state_dict().items():
        if "gate.weight" in name or name.endswith("shared_expert_gate.weight"):
            assert torch.equal(value, exported.state_dict()[name]), name
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # stored as transformers saves it: per expert, original names

    per_expert = report["experts"]["per_expert"]
    assert len(per_expert) == 2 * 4 and report["experts"]["min_tokens"] == 128
    # 4 windows x 32 tokens x top-2 = 256 routed tokens per block over 4 experts: all under 128
    assert sum(e["routed_tokens"] for e in per_expert) == 2 * 4 * 32 * 2
    assert {e["calibration"] for e in per_expert} <= {"routed", "all-tokens"}

    evaluated = run("eval", out, "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(report["ppl"]["compressed"], rel=1e-6)
    verified = run("verify", out)
    assert verified.exit_code == 0, verified.output


def test_moe_fallback_rule_is_the_recipes_and_reported_per_expert(tmp_path, tmp_path_factory):
    model_dir = _model_dir("mixtral", tmp_path_factory)
    runs = {}
    for fallback, min_tokens in (("magnitude", 100000), ("all-tokens", 0)):
        recipe = _recipe(tmp_path, method="wanda", sparsity=0.5, moe={"min_tokens": min_tokens, "fallback": fallback})
        result = run("compress", model_dir, "--recipe", recipe, *SMALL, "--no-eval", "-o", tmp_path / fallback)
        assert result.exit_code == 0, result.output
        runs[fallback] = json.loads(result.stdout)
    magnitude = runs["magnitude"]
    assert {e["calibration"] for e in magnitude["experts"]["per_expert"]} == {"magnitude"}
    assert magnitude["experts"]["fallbacks"] == 8
    assert {l["method"] for l in magnitude["layers"] if ".experts." in l["name"]} == {"magnitude"}
    assert {l["method"] for l in magnitude["layers"] if ".self_attn." in l["name"]} == {"wanda"}
    assert {e["calibration"] for e in runs["all-tokens"]["experts"]["per_expert"]} == {"routed"}

    bad = run("compress", model_dir, "--recipe", _recipe(tmp_path, method="wanda", sparsity=0.5, moe={"fallback": "magnitde"}),
              *PLAIN, "-o", tmp_path / "bad")
    assert_one_line_error(bad)
    assert "moe.fallback must be one of all-tokens, magnitude" in bad.stderr and "magnitude" in bad.stderr


def test_experts_of_a_non_standard_layout_are_refused_and_activation_sparsity_on_experts_too(tmp_path, tmp_path_factory):
    """GPT-OSS's experts (biases, interleaved gate/up) are not the standard forward: refused
    before any work, one line naming the module type. Activation sparsity on routed experts is
    refused too; with the targets named, the attention is handled and the experts stay exact."""
    oss = save_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    refused = run("compress", oss, "--method", "wanda", "--sparsity", "0.5", *PLAIN, "-o", tmp_path / "o1")
    assert_one_line_error(refused)
    assert "GptOssExperts holds fused mixture-of-experts weights" in refused.stderr
    assert not (tmp_path / "o1").exists()

    mixtral = _model_dir("mixtral", tmp_path_factory)
    teal = run("compress", mixtral, "--method", "teal", "--sparsity", "0.5", *PLAIN, "-o", tmp_path / "o2")
    assert_one_line_error(teal)
    assert "activation sparsity on mixture-of-experts experts is not supported" in teal.stderr

    recipe = _recipe(tmp_path, method="wanda", sparsity=0.5, targets={"include": [r"self_attn\."]})
    result = run("compress", mixtral, "--recipe", recipe, *SMALL, "-o", tmp_path / "o3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layers"] and all(".self_attn." in l["name"] for l in report["layers"])
    assert report["experts"] is None  # no expert was a target
    from safetensors.torch import load_file

    source, exported = load_file(str(mixtral / "model.safetensors")), load_file(str(tmp_path / "o3" / "model.safetensors"))
    assert set(exported) == set(source)  # the source's layout: one tensor per expert and projection
    experts = [n for n in source if ".experts." in n]
    assert experts and all(torch.equal(exported[n], source[n]) for n in experts)


def test_moe_models_are_refused_under_several_ranks():
    from types import SimpleNamespace

    from prune_cli.core.errors import BadInputError
    from prune_cli.run.claim import check_data_parallel

    request = SimpleNamespace(config=SimpleNamespace(activation=None), resume=False)
    with pytest.raises(BadInputError, match="mixture-of-experts models run in one process"):
        check_data_parallel(request, SimpleNamespace(num_local_experts=8))
    check_data_parallel(request, SimpleNamespace(num_local_experts=None))


def test_stored_per_expert_weights_are_stacked_into_the_fused_tensors_as_transformers_does(tmp_path):
    """A Mixtral checkpoint stores ``block_sparse_moe.experts.E.w1/w2/w3``; transformers renames
    ``block_sparse_moe`` to ``mlp`` and stacks them into ``gate_up_proj`` / ``down_proj``. The
    streamed source gives every tensor exactly as ``from_pretrained`` builds it."""
    from transformers import AutoModelForCausalLM

    from prune_cli.checkpoint.model_state import empty_model
    from prune_cli.checkpoint.renames import RenamedWeights, checkpoint_renames
    from prune_cli.checkpoint.weights import MergedTensor, open_weights
    from prune_cli.model.source import ModelSource
    from prune_cli.streaming.loader import load_config

    for family in ("mixtral", "qwen2_moe"):
        folder = save_tiny_model(family, tmp_path / family)
        probe = empty_model(load_config(ModelSource("folder", str(folder)), offline=True), torch.float32)
        weights = open_weights(folder, None, probe)
        renames = checkpoint_renames(probe, weights.names())
        assert isinstance(renames["model.layers.1.mlp.experts.gate_up_proj"], MergedTensor)
        source = RenamedWeights(weights, renames)
        loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        assert set(source.names()) == set(loaded) - {"lm_head.weight"} or set(source.names()) == set(loaded)
        for name in source.names():
            assert torch.equal(source.read([name])[name], loaded[name]), name
        source.close()


def test_a_checkpoint_missing_an_expert_is_not_streamed_as_if_whole(tmp_path):
    from prune_cli.checkpoint.model_state import empty_model
    from prune_cli.checkpoint.renames import checkpoint_renames

    model = tiny_model("mixtral")
    names = [n for n in save_names(model) if ".experts.1." not in n or "layers.1" not in n]
    assert checkpoint_renames(empty_model(model.config, torch.float32), names) is None


def save_names(model) -> list[str]:
    """The names ``save_pretrained`` writes for ``model`` (its checkpoint layout)."""
    import tempfile

    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            return list(f.keys())


def test_a_checkpoint_short_of_its_last_expert_is_refused_naming_the_tensor(tmp_path, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "cut"
    shutil.copytree(_model_dir("mixtral", tmp_path_factory), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not ("layers.1." in k and ".experts.3." in k)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = run("compress", folder, "--method", "wanda", "--sparsity", "0.5", *PLAIN, "-o", tmp_path / "out")
    assert_one_line_error(result)
    # found from the headers before any tensor is read (the stacked experts declare 3 of 4)
    assert "tensor model.layers.1.mlp.experts.gate_up_proj is declared [3, 256, 64], the model (its config.json) expects [4, 256, 64]" in result.stderr
    assert not (tmp_path / "out").exists()
