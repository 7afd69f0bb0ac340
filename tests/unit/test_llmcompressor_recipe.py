"""llm-compressor recipes read unchanged: the translation into prune-cli's recipe, argument by
argument, and the refusals of what prune-cli cannot honour (each naming its key)."""

from __future__ import annotations

import logging
import re

import pytest
import yaml

from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.recipe.config import Override, load_recipe, resolve
from prune_cli.recipe.llmcompressor import (
    ignore_regex,
    is_llmcompressor_recipe,
    keep_pattern,
    module_boundary,
    target_regex,
    to_prune_cli,
)

LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NAMES = [f"model.layers.{b}.{local}" for b in range(12) for local in LLAMA_BLOCK]


def recipe(modifier: str = "SparseGPTModifier", **args) -> dict:
    return {"sparsity_stage": {"sparsity_modifiers": {modifier: args}}}


def read(modifier: str = "SparseGPTModifier", **args):
    """The resolved prune-cli configuration of a one-modifier llm-compressor recipe."""
    return resolve(to_prune_cli(recipe(modifier, **args), "r.yaml"), {})


def selected(config) -> list[str]:
    return [n for n in NAMES if config.targets.selects(n)]


def refused(match: str, modifier: str = "SparseGPTModifier", data: dict | None = None, **args) -> RecipeError:
    with pytest.raises(RecipeError, match=match) as info:
        to_prune_cli(data if data is not None else recipe(modifier, **args), "r.yaml")
    return info.value


# ----------------------------------------------------------------------------- the modifiers


def test_sparsegpt_arguments_and_defaults():
    config = read(sparsity=0.5)
    assert config.method == "sparsegpt" and config.pattern == Unstructured(0.5)
    assert config.method_options == {"percdamp": 0.01, "blocksize": 128}  # llm-compressor's defaults
    config = read(sparsity=0.6, block_size=64, dampening_frac=0.05, sequential_update=True, offload_hessians=True,
                  preserve_sparsity_mask=False)
    assert config.method_options == {"percdamp": 0.05, "blocksize": 64} and config.pattern == Unstructured(0.6)


def test_wanda_and_magnitude():
    config = read("WandaPruningModifier", sparsity=0.4, mask_structure="0:0")
    assert config.method == "wanda" and config.pattern == Unstructured(0.4) and config.method_options == {}
    config = read("MagnitudePruningModifier", targets=["Linear"], init_sparsity=0.3, final_sparsity=0.3, start=0, end=1)
    assert config.method == "magnitude" and config.pattern == Unstructured(0.3)
    assert config.method_options == {"scope": "matrix"}  # llm-compressor ranks the whole matrix
    assert selected(config) == NAMES


def test_a_recipe_saved_by_llm_compressor_is_read():
    """What ``Recipe.yaml()`` writes: every argument that is not None, defaults included."""
    saved = {"default_stage": {"default_modifiers": {"WandaPruningModifier": {
        "sparsity": 0.5, "mask_structure": "2:4", "sequential_update": True, "targets": ["Linear"],
        "ignore": ["lm_head"]}}}}
    config = resolve(to_prune_cli(saved, "recipe.yaml"), {})
    assert config.method == "wanda" and config.pattern == NM(2, 4) and config.targets.exclude == ()


# ----------------------------------------------------------------------------- mask_structure: N PRUNED of M


@pytest.mark.parametrize("mask,keep", [("2:4", "2:4"), ("4:8", "4:8"), ("1:4", "3:4"), ("3:4", "1:4"), ("1:8", "7:8"),
                                       (" 2 : 4 ", "2:4"), ("0:0", None), ("0:4", None)])
def test_mask_structure_prunes_n_of_m(mask, keep):
    assert keep_pattern(mask, "k") == keep


def test_mask_structure_converted_into_the_pattern():
    assert read(sparsity=0.25, mask_structure="1:4").pattern == NM(3, 4)  # prune 1 of 4 = keep 3 of 4
    assert read(sparsity=None, mask_structure="3:4").pattern == NM(1, 4)
    assert read(sparsity=0.5, mask_structure="4:8").pattern == NM(4, 8)
    assert read(sparsity=[0.5, 0.5], mask_structure="2:4").pattern == NM(2, 4)


@pytest.mark.parametrize("mask,needle", [("4:4", "prunes 4 of every 4"), ("5:4", "prunes 5 of every 4"),
                                         ("2:0", "prunes 2 of every 0"), ("2-4", "must be"), (124, "124")])
def test_bad_mask_structure_is_refused(mask, needle):
    error = refused(re.escape(needle), sparsity=0.5, mask_structure=mask)
    assert "SparseGPTModifier.mask_structure" in error.message
    if mask == 124:  # YAML reads an unquoted 2:4 as the sexagesimal number 124
        assert "quote" in error.hint


def test_sparsity_contradicting_the_mask_is_refused():
    error = refused("contradicts", sparsity=0.7, mask_structure="2:4")
    assert "SparseGPTModifier.sparsity 0.7" in error.message and "prunes 2 of every 4" in error.message
    refused(r"sparsity\[1\] 0\.3 contradicts", sparsity=[0.5, 0.3], mask_structure="2:4")
    refused("needs a sparsity", sparsity=None)
    refused("sparsity is required")


# ----------------------------------------------------------------------------- OWL


def test_owl_profile():
    config = read("WandaPruningModifier", sparsity=0.7, sparsity_profile="OWL", owl_m=5, owl_lmbda=0.08)
    assert config.owl is not None and (config.owl.m, config.owl.lam) == (5.0, 0.08)
    assert config.pattern == Unstructured(0.7)


@pytest.mark.parametrize("args,needle", [
    ({"sparsity_profile": "owl", "owl_m": 5}, "owl_lmbda: OWL needs"),
    ({"owl_m": 5, "owl_lmbda": 0.1}, "sparsity_profile: OWL needs"),
    ({"sparsity_profile": "flat"}, "sparsity_profile must be 'owl'"),
    ({"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.9}, r"owl_lmbda must be a number in \[0, 0.5\]"),
    ({"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.1, "mask_structure": "2:4", "sparsity": None}, "unstructured"),
    ({"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.1, "sparsity": [0.5, 0.6],
      "targets": ["re:model.layers.\\d+$"]}, "not a list"),
])
def test_owl_refusals(args, needle):
    refused(needle, "WandaPruningModifier", **{"sparsity": 0.5, **args})


# ----------------------------------------------------------------------------- per-layer sparsity lists


def test_per_layer_list_for_every_decoder_layer():
    config = read("WandaPruningModifier", sparsity=[0.3, 0.6], targets=["re:model.layers.\\d+$"])
    assert config.overrides == (Override(0.3, (0,)), Override(0.6, (1,)))
    # the list covers blocks 0 and 1: the targets are limited to them
    assert selected(config) == [n for n in NAMES if n.startswith(("model.layers.0.", "model.layers.1."))]
    config = read("WandaPruningModifier", sparsity=[0.3, 0.6, 0.4], targets="LlamaDecoderLayer")
    assert [o.blocks for o in config.overrides] == [(0,), (1,), (2,)]


def test_per_layer_list_for_named_layers_in_module_order():
    config = read(sparsity=[0.2, 0.4], targets=["model.layers.3", "model.layers.1"])
    assert config.overrides == (Override(0.2, (1,)), Override(0.4, (3,)))  # paired in the model's order
    assert selected(config) == [n for n in NAMES if n.startswith(("model.layers.1.", "model.layers.3."))]


@pytest.mark.parametrize("args,needle", [
    ({"sparsity": [0.2, 0.4, 0.5], "targets": ["model.layers.0", "model.layers.1"]}, r"sparsity has 3 values for 2 target layers"),
    ({"sparsity": [0.2, 0.4]}, r"per-layer list needs targets that are the decoder layers, got \['Linear'\]"),
    ({"sparsity": [0.2, 0.4], "targets": ["re:.*mlp.*"]}, "per-layer list needs targets"),
    ({"sparsity": [0.2, 1.0], "targets": ["model.layers.0", "model.layers.1"]}, r"sparsity\[1\] must be a number in \[0, 1\)"),
    ({"sparsity": []}, "empty list"),
])
def test_per_layer_list_refusals(args, needle):
    refused(needle, **args)


# ----------------------------------------------------------------------------- targets and ignore


def test_targets_select_as_llm_compressor_selects():
    assert target_regex("Linear", "k") is None and target_regex("Qwen2DecoderLayer", "k") is None
    assert target_regex("model.layers.1", "k") == r"^model\.layers\.1(?:\.|$)"
    assert target_regex("model.layers.1", "k", inside=False) == r"^model\.layers\.1$"
    assert selected(read(sparsity=0.5, targets=["Linear"])) == NAMES
    assert selected(read(sparsity=0.5, targets="__ALL_PRUNABLE__")) == NAMES
    assert selected(read(sparsity=0.5, targets=["LlamaDecoderLayer"])) == NAMES
    # old recipes name the decoder layers by a regex ending in $: the Linears inside are selected
    assert selected(read(sparsity=0.5, targets=["re:model.layers.\\d+$"])) == NAMES
    assert selected(read(sparsity=0.5, targets=["re:.*model.layers.0$"])) == [n for n in NAMES if n.startswith("model.layers.0.")]
    # a bare name is the module of exactly that name (and what is inside it), not a substring
    assert selected(read(sparsity=0.5, targets=["model.layers.1"])) == [n for n in NAMES if n.startswith("model.layers.1.")]
    assert selected(read(sparsity=0.5, targets=["model.layers.1.mlp.up_proj"])) == ["model.layers.1.mlp.up_proj"]
    # re: is re.match: anchored at the start of the name
    assert selected(read(sparsity=0.5, targets=["re:mlp"])) == []
    assert selected(read(sparsity=0.5, targets=["re:.*mlp"])) == [n for n in NAMES if ".mlp." in n]


def test_ignore_matches_each_linear_as_llm_compressor_does():
    config = read(sparsity=0.5, ignore=["re:.*lm_head", "re:.*down_proj"])
    assert config.targets.exclude == ("^(?:.*down_proj)",)
    assert selected(config) == [n for n in NAMES if not n.endswith("down_proj")]
    config = read(sparsity=0.5, ignore=["model.layers.0.mlp.down_proj", "lm_head"])
    assert selected(config) == [n for n in NAMES if n != "model.layers.0.mlp.down_proj"]
    # a bare name is exact: "down_proj" is no module's full name (refused when the plan finds it excludes nothing)
    config = read(sparsity=0.5, ignore=["down_proj"])
    assert config.targets.exclude == ("^down_proj$",) and selected(config) == NAMES


def test_lm_head_entries_are_no_ops():
    for entry in ("lm_head", "re:.*lm_head", "re:lm_head$", "re:^lm_head$", "re:.*embed_tokens"):
        assert ignore_regex(entry, "k") is None
    assert ignore_regex("re:.*(lm_head|down_proj)", "k") == "^(?:.*(lm_head|down_proj))"  # it also names block Linears


@pytest.mark.parametrize("regex,boundary", [(r"model.layers.\d+$", r"model.layers.\d+(?=\.|$)"), (r"a[$]b\$c$", r"a[$]b\$c(?=\.|$)"),
                                            (r"x\Z", r"x(?=\.|\Z)"), (r"[]$]$", r"[]$](?=\.|$)"), (r"[^]$]x", r"[^]$]x")])
def test_end_anchors_also_end_at_a_module_boundary(regex, boundary):
    assert module_boundary(regex) == boundary


@pytest.mark.parametrize("target,needle", [("LlamaMLP", "class name 'LlamaMLP' cannot be mapped"), ("Conv2d", "no Conv2d"),
                                           ("__ALL__", "__ALL__"), ("re:(", "bad regular expression"), ("re:", "empty pattern")])
def test_targets_that_cannot_be_mapped_are_refused(target, needle):
    error = refused(re.escape(needle), sparsity=0.5, targets=["Linear", target])
    assert "SparseGPTModifier.targets[1]" in error.message


@pytest.mark.parametrize("entry,needle", [("Linear", "ignores every Linear"), ("LlamaRMSNorm", "class name"), ("re:[", "bad regular")])
def test_ignores_that_cannot_be_mapped_are_refused(entry, needle):
    error = refused(needle, sparsity=0.5, ignore=["re:.*lm_head", entry])
    assert "SparseGPTModifier.ignore[1]" in error.message


def test_magnitude_targets_are_the_linears_themselves():
    config = read("MagnitudePruningModifier", targets=["re:.*_proj$"], init_sparsity=0.5, final_sparsity=0.5)
    assert selected(config) == NAMES
    config = read("MagnitudePruningModifier", targets=["model.layers.0.mlp.up_proj"], init_sparsity=0.5, final_sparsity=0.5)
    assert selected(config) == ["model.layers.0.mlp.up_proj"]
    refused("has no weight of its own", "MagnitudePruningModifier", targets=["LlamaDecoderLayer"], init_sparsity=0.5, final_sparsity=0.5)


# ----------------------------------------------------------------------------- refused by name


@pytest.mark.parametrize("modifier,args,needle", [
    ("SparseGPTModifier", {"sparsity": 0.5, "blocksize": 64}, r"SparseGPTModifier.blocksize: SparseGPTModifier has no argument 'blocksize'"),
    ("WandaPruningModifier", {"sparsity": 0.5, "block_size": 64}, "WandaPruningModifier has no argument 'block_size'"),
    ("SparseGPTModifier", {"sparsity": 0.5, "preserve_sparsity_mask": True}, "preserve_sparsity_mask: True is not supported"),
    ("SparseGPTModifier", {"sparsity": 0.5, "dampening_frac": None}, r"dampening_frac must be a number"),
    ("SparseGPTModifier", {"sparsity": 0.5, "block_size": 0}, "block_size must be a positive integer"),
    ("SparseGPTModifier", {"sparsity": 0.5, "start": 2}, r"\.start: 2 starts a training schedule"),
    ("WandaPruningModifier", {"sparsity": 0.5, "end": 5}, r"\.end: a training schedule argument"),
    ("WandaPruningModifier", {"sparsity": 0.5, "sequential_targets": ["Linear"]}, "sequential_targets: 'Linear'"),
    ("MagnitudePruningModifier", {"targets": "Linear", "init_sparsity": 0.1, "final_sparsity": 0.5},
     r"final_sparsity: init_sparsity 0.1 -> final_sparsity 0.5 is a training schedule"),
    ("MagnitudePruningModifier", {"targets": "Linear", "init_sparsity": 0.5}, "final_sparsity is required"),
    ("MagnitudePruningModifier", {"targets": "Linear", "init_sparsity": 0.5, "final_sparsity": 0.5, "mask_structure": "2:4"},
     "mask_structure: '2:4' is not supported"),
    ("MagnitudePruningModifier", {"targets": "Linear", "init_sparsity": 0.5, "final_sparsity": 0.5, "update_scheduler": "calc(0.5)"},
     "update_scheduler"),
    ("MagnitudePruningModifier", {"targets": "Linear", "init_sparsity": 0.5, "final_sparsity": 0.5, "ignore": ["lm_head"]},
     "MagnitudePruningModifier has no argument 'ignore'"),
    ("MagnitudePruningModifier", {"targets": "Linear", "init_sparsity": 0.5, "final_sparsity": 0.5, "end": 0}, r"\.end: 0 ends"),
])
def test_arguments_prune_cli_cannot_honour_are_refused_by_name(modifier, args, needle):
    error = refused(needle, modifier, **args)
    assert error.message.startswith(f"r.yaml: sparsity_stage.sparsity_modifiers.{modifier}")


def test_recipe_structure_refusals():
    quant = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "W4A16"}}}}
    error = refused("quant_stage.quant_modifiers.QuantizationModifier: QuantizationModifier quantizes", data=quant)
    assert "SparseGPTModifier" in error.hint
    two_stages = {**recipe(sparsity=0.5), **quant}
    refused(r"quant_stage: prune-cli runs one stage, the recipe has 2", data=two_stages)
    together = {"s_stage": {"s_modifiers": {"SparseGPTModifier": {"sparsity": 0.5}, "GPTQModifier": {"scheme": "W4A16"}}}}
    refused("GPTQModifier quantizes", data=together)
    both = {"s_stage": {"s_modifiers": {"SparseGPTModifier": {"sparsity": 0.5}, "WandaPruningModifier": {"sparsity": 0.5}}}}
    refused(r"s_stage.s_modifiers.WandaPruningModifier: prune-cli runs one pruning modifier", data=both)
    error = refused("SparseGPTModifer is not a modifier", data=recipe("SparseGPTModifer", sparsity=0.5))
    assert "did you mean 'SparseGPTModifier'" in error.hint
    refused("unknown top-level key 'version'", data={**recipe(sparsity=0.5), "version": 1})
    refused("args: recipe variables", data={**recipe(sparsity="eval(s)"), "args": {"s": 0.5}})
    refused("unknown key 'sparsity'", data={"s_stage": {"sparsity": 0.5}})
    refused("run_type: prune-cli runs one shot", data={"s_stage": {"run_type": "train", "s_modifiers": {"SparseGPTModifier": {"sparsity": 0.5}}}})


# ----------------------------------------------------------------------------- loading a file


def test_load_recipe_reads_an_llm_compressor_file(tmp_path, caplog):
    path = tmp_path / "sparse_24.yaml"
    path.write_text('pruning_stage:\n  obcq_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n      mask_structure: "2:4"\n'
                    '      targets: ["Linear"]\n      ignore: ["re:.*lm_head"]\n')
    with caplog.at_level(logging.INFO, logger="prune_cli"):
        data = load_recipe(path)
    notes = [r.getMessage() for r in caplog.records if "llm-compressor" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("read as an llm-compressor recipe: SparseGPTModifier sparsity 0.5 mask_structure 2:4")
    assert "prune 2 of 4 = prune-cli pattern 2:4" in notes[0]
    config = resolve(data, {})
    assert config.method == "sparsegpt" and config.pattern == NM(2, 4) and config.name == "sparse_24"
    assert config.description == notes[0]  # recorded with the recipe in sparsity.json


def test_prune_cli_recipes_are_not_llm_compressor_recipes():
    assert not is_llmcompressor_recipe({"version": 1, "method": "wanda", "sparsity": 0.5})
    assert not is_llmcompressor_recipe(["a_stage"])
    assert is_llmcompressor_recipe(yaml.safe_load("x_stage: {y_modifiers: {WandaPruningModifier: {sparsity: 0.5}}}"))
