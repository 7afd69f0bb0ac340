"""RIA (prune_cli/methods/ria.py) and its N:M channel permutation (prune_cli/methods/permutation.py):
the score, the patterns, the search, the exact folding into the checkpoint, and the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from prune_cli.cli import app
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.methods import build_method
from prune_cli.methods.permutation import (
    LAYOUTS,
    Fold,
    _assignment_pass,
    block_folds,
    kept_score,
    layout_for,
    permutation_from_orders,
    permute_in_place,
    reallocated,
    search_order,
    text_config,
)
from tests.methods.helpers import correlated_inputs, recon_error, stats_for

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]
FOLDED_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "opt", "gpt_neox"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def layer(seed=0, out_f=48, in_f=64):
    x = correlated_inputs(400, in_f, seed=seed, mean_shift=1.0)
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(out_f, in_f, generator=g), x, stats_for(x, tokens_per_window=8)


def foldable(stats, in_f):
    """The statistics of an input whose channels may be permuted freely (an MLP intermediate)."""
    stats.channel_groups = torch.arange(in_f).view(1, 1, in_f)
    return stats


# ------------------------------------------------------------------ the score


def test_score_is_relative_importance_times_norm_to_the_a():
    """W = [[1, -2, 3], [4, 0, -6]], ||X|| = [1, 4, 9], a = 0.5: row sums 6, 10, column sums 5, 2, 9,
    so S_00 = (1/6 + 1/5) * 1, S_01 = (2/6 + 2/2) * 2, S_02 = (3/6 + 3/9) * 3, S_10 = (4/10 + 4/5) * 1,
    S_11 = 0, S_12 = (6/10 + 6/9) * 3."""
    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.0, -6.0]])
    stats = stats_for(torch.diag(torch.tensor([1.0, 4.0, 9.0])))  # sum of squares 1, 16, 81
    expected = torch.tensor([[11 / 30, 8 / 3, 2.5], [1.2, 0.0, 3.8]])
    assert torch.allclose(build_method("ria").score(w, stats), expected, atol=1e-6)
    # a = 1: the norms themselves; a = 0: relative importance alone
    assert torch.allclose(build_method("ria", {"a": 1.0}).score(w, stats)[0, 2], torch.tensor(5 / 6 * 9))
    assert torch.allclose(build_method("ria", {"a": 0.0}).score(w, stats)[1, 0], torch.tensor(1.2))
    # one weight per row pruned: row 0 drops column 0 (11/30), row 1 drops column 1 (0)
    mask = build_method("ria").prune(w, stats, Unstructured(1 / 3 + 1e-9)).mask
    assert mask.tolist() == [[False, True, True], [True, False, True]]


def test_an_all_zero_row_or_column_scores_zero_not_nan():
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    score = build_method("ria").score(w, stats_for(torch.ones(3, 2)))
    assert torch.isfinite(score).all() and score[0].eq(0).all() and score[:, 1].eq(0).all()


@pytest.mark.parametrize("options", [{"a": -1}, {"a": float("nan")}, {"scope": "layer"}, {"lsa_groups": 1},
                                     {"permute": "yes"}])
def test_bad_options_are_recipe_errors(options):
    with pytest.raises(RecipeError, match="ria"):
        build_method("ria", options).validate()


# ------------------------------------------------------------------ patterns, dtype, determinism


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8), NM(1, 4)])
@pytest.mark.parametrize("permutable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patterns_are_exact_and_the_dtype_is_kept(pattern, permutable, dtype):
    w, _, stats = layer()
    if permutable:
        foldable(stats, w.shape[1])
    res = build_method("ria").prune(w.to(dtype), stats, pattern)
    assert res.weight.dtype == dtype and res.mask.dtype == torch.bool
    if isinstance(pattern, NM):
        assert (res.mask.reshape(w.shape[0], -1, pattern.m).sum(-1) == pattern.n_keep).all()
    else:
        assert (res.mask.sum(1) == w.shape[1] - int(w.shape[1] * pattern.sparsity)).all()
    perm = res.input_permutation
    assert (perm is not None) == (permutable and isinstance(pattern, NM))
    order = perm if perm is not None else torch.arange(w.shape[1])
    assert torch.equal(res.weight, w.to(dtype)[:, order] * res.mask)  # the weights themselves, reordered


def test_the_same_inputs_give_the_same_mask_and_permutation():
    w, _, stats = layer(seed=3)
    first = build_method("ria").prune(w, foldable(stats, 64), NM(2, 4))
    again = build_method("ria").prune(w.clone(), foldable(stats_for(correlated_inputs(400, 64, seed=3, mean_shift=1.0)), 64), NM(2, 4))
    assert torch.equal(first.input_permutation, again.input_permutation)
    assert torch.equal(first.mask, again.mask) and torch.equal(first.weight, again.weight)


def test_without_permute_or_channel_groups_the_order_is_kept():
    w, _, stats = layer()
    plain = build_method("ria").prune(w, stats, NM(2, 4))
    off = build_method("ria", {"permute": False}).prune(w, foldable(stats, 64), NM(2, 4))
    assert plain.input_permutation is None and off.input_permutation is None
    assert torch.equal(plain.mask, off.mask) and plain.info == {"inputs_permuted": False}


# ------------------------------------------------------------------ the search


def test_reallocation_gives_every_group_one_channel_of_each_band_in_snake_order():
    """8 channels ranked r0 < ... < r7 by column sum, M = 4: bands (r0 r1) (r2 r3) (r4 r5) (r6 r7);
    positions 0 and 2 take their band in order, 1 and 3 reversed: groups (r0 r3 r4 r7), (r1 r2 r5 r6)."""
    ranks = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])  # channel j has rank ranks[j]
    score = ranks.float().unsqueeze(0).repeat(3, 1)
    by_rank = torch.argsort(ranks)
    expected = by_rank[torch.tensor([0, 3, 4, 7, 1, 2, 5, 6])]
    assert torch.equal(reallocated(score, 4), expected)


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(3, 4)])
@pytest.mark.parametrize("slot", [0, 2])
def test_an_assignment_pass_finds_the_best_reassignment_of_its_position(pattern, slot):
    """Four groups: every way of redistributing the channels at one position among them (4! = 24)
    is tried by brute force; the pass reaches the best kept score."""
    g = torch.Generator().manual_seed(slot)
    score = torch.rand(6, 16, generator=g)
    start = torch.randperm(16, generator=g)
    found = _assignment_pass(score, start.clone(), pattern, slot, max_groups=128)
    best = -1.0
    for assignment in itertools.permutations(range(4)):
        order = start.view(4, 4).clone()
        order[:, slot] = start.view(4, 4)[list(assignment), slot]
        best = max(best, kept_score(score[:, order.reshape(-1)], pattern))
    assert kept_score(score[:, found], pattern) == pytest.approx(best, rel=1e-9)
    assert sorted(found.tolist()) == list(range(16))


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(4, 8), NM(1, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_groups", [128, 3])
def test_the_permutation_never_lowers_the_kept_score(pattern, seed, max_groups):
    w, _, stats = layer(seed, in_f=96)
    score = build_method("ria").score(w, stats)
    order, kept = search_order(score, pattern, max_groups)
    assert sorted(order.tolist()) == list(range(96))
    assert kept["final"] >= kept["identity"]
    assert kept_score(score[:, order], pattern) == pytest.approx(kept["final"], rel=1e-12)
    if max_groups == 128:  # on random layers the search finds a real gain
        assert kept["final"] > kept["identity"] * 1.005


def test_an_ordered_layer_that_cannot_improve_keeps_the_identity():
    score = torch.tensor([[4.0, 3.0, 2.0, 1.0] * 2])  # every group already keeps the two best of all
    order, kept = search_order(score, NM(2, 4))
    assert torch.equal(order, torch.arange(8)) and kept["final"] == kept["identity"]


# ------------------------------------------------------------------ folding into the checkpoint


def _random_permutation(fold: Fold, in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P, R, W = fold.groups.shape
    return permutation_from_orders(fold.groups, torch.stack([torch.randperm(W, generator=g) for _ in range(P)]), in_features)


@pytest.mark.parametrize("family", FOLDED_FAMILIES)
def test_a_folded_permutation_leaves_the_model_function_unchanged(family):
    """Every block's MLP intermediate and attention output permuted at random (within key/value
    heads), producers' rows and biases reordered: the logits are the same to float tolerance, and
    the permutation really moved weights."""
    from prune_cli.model.structure import block_linears, decoder_blocks
    from tests.tiny_models import tiny_model

    model = tiny_model(family, layers=2)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    config = text_config(model)
    consumers = set()
    for index, block in enumerate(decoder_blocks(model).modules):
        linears = block_linears(block)
        folds = block_folds(linears, config)
        assert len(folds) == 2, family  # the MLP and the attention output
        for fold in folds.values():
            old = linears[fold.consumer].weight.detach().clone()
            perm = _random_permutation(fold, old.shape[1], seed=index)
            assert not torch.equal(perm, torch.arange(old.shape[1]))
            permute_in_place(fold, perm, linears)
            assert torch.equal(linears[fold.consumer].weight, old[:, perm])
            consumers.add(fold.consumer)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5), (after - before).abs().max()
    assert config.model_type in LAYOUTS and len(consumers) == 2


def test_gqa_attention_output_is_permuted_alike_within_each_key_value_head():
    """Tiny Llama: 4 query heads of 16 channels, 2 key/value heads: o_proj's input permutation is
    one sigma per key/value head applied to both of its query heads; a permutation that moves a
    channel to another head, or treats two query heads of one group differently, does not fold."""
    from prune_cli.model.structure import block_linears, decoder_blocks
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", layers=1)
    linears = block_linears(decoder_blocks(model).modules[0])
    fold = block_folds(linears, text_config(model))["self_attn.o_proj"]
    assert fold.groups.shape == (2, 2, 16)
    assert fold.groups[1, 0, 0] == 32 and fold.producers[0][1][1, 0] == 16  # head 2 reads v rows 16..31
    across = torch.arange(64)
    across[[0, 16]] = across[[16, 0]]  # a channel of head 0 swapped with one of head 1 (same kv head)
    with pytest.raises(ValueError, match="does not fold"):
        fold.sigmas(across)
    across = torch.arange(64)
    across[[0, 32]] = across[[32, 0]]  # across key/value heads
    with pytest.raises(ValueError, match="does not fold"):
        fold.sigmas(across)


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_unverified_layouts_get_no_folds(family):
    from tests.tiny_models import tiny_config

    assert layout_for(tiny_config(family)) is None
    assert block_folds({}, tiny_config(family)) == {}


def test_input_statistics_permute_with_the_channels():
    x = correlated_inputs(200, 8, seed=1)
    stats = stats_for(x)
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 5, 4])
    moved, direct = stats.permuted(perm), stats_for(x[:, perm])
    for name in ("norm", "mean", "var"):
        assert torch.allclose(getattr(moved, name), getattr(direct, name), atol=1e-5)
    assert torch.allclose(moved.xtx, direct.xtx, atol=1e-3)


# ------------------------------------------------------------------ as DSnoT's base


@pytest.mark.parametrize("pattern", [NM(2, 4), Unstructured(0.5)])
def test_dsnot_on_ria_keeps_its_permutation_and_never_raises_the_error(pattern):
    w, x, stats = layer(seed=2)
    foldable(stats, 64)
    base = build_method("ria").prune(w, stats, pattern)
    res = build_method("dsnot", {"base": "ria"}).prune(w, stats, pattern)
    perm = base.input_permutation
    assert (perm is not None) == isinstance(pattern, NM)
    order = perm if perm is not None else torch.arange(64)
    if perm is not None:
        assert torch.equal(res.input_permutation, perm)
        assert (res.mask.reshape(48, -1, 4).sum(-1) == 2).all()
    assert (res.info or {}).get("base") == base.info  # None under unstructured: nothing to say
    w_p, x_p = w[:, order], x[:, order]
    assert recon_error(w_p, res.weight, x_p) <= recon_error(w_p, base.weight, x_p) * (1 + 1e-6)
    assert ((res.weight != 0) <= res.mask).all()


# ------------------------------------------------------------------ through the CLI


def _direct_ppl(folder, report) -> float:
    """Perplexity of a plain transformers forward of the export on the report's evaluation windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prune_cli.calibrators.sources import bundled_text

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    n, seqlen = report["evaluation"]["windows"]
    ids = torch.tensor(tokenizer(bundled_text("evaluation").text, add_special_tokens=False)["input_ids"][: n * seqlen])
    windows = ids.reshape(n, seqlen)
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return float(torch.exp(nll))


CLI_CASES = {
    "llama-2:4": ("tiny_llama_dir", ["--method", "ria", "--pattern", "2:4"]),
    "llama-50%": ("tiny_llama_dir", ["--method", "ria", "--sparsity", "0.5"]),
    "llama-dsnot-2:4": ("tiny_llama_dir", ["--method", "dsnot", "--base", "ria", "--pattern", "2:4"]),
    "opt-2:4": ("tiny_opt_dir", ["--method", "ria", "--pattern", "2:4"]),  # fc1 and v_proj biases move too
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_compress_exports_a_plain_checkpoint_with_the_reported_perplexity(tmp_path, request, case):
    """The export loads in plain transformers and gives the report's perplexity; under 2:4 the
    MLP and attention-output inputs are permuted (the report's diagnostics say so, and name the
    producers whose rows moved) and every pruned weight has real 2:4 zeros in storage order;
    `prune-cli verify` passes."""
    from safetensors.torch import load_file

    model_fixture, args = CLI_CASES[case]
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "out"
    result = run("compress", model_dir, *args, *SMALL, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ppl"]["compressed"] == pytest.approx(_direct_ppl(out, report), rel=1e-4)
    assert run("verify", out).exit_code == 0
    weights = load_file(str(out / "model.safetensors"))
    nm = "2:4" in args
    for record in report["layers"]:
        diagnostics = record.get("diagnostics") or {}
        own = diagnostics.get("base", diagnostics)
        consumer = record["name"].endswith(("o_proj", "down_proj", "out_proj", "fc2"))
        if nm:
            weight = weights[record["name"] + ".weight"]
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all(), record["name"]
            assert own["inputs_permuted"] is consumer, record["name"]
            if consumer:
                assert own["kept_score"]["final"] > own["kept_score"]["identity"]
            if record["name"].endswith(("v_proj", "gate_proj", "up_proj", "fc1")):
                assert diagnostics["rows_permuted_for"] in ("self_attn.o_proj", "mlp.down_proj", "self_attn.out_proj", "fc2")
        else:
            assert "inputs_permuted" not in own
    assert "channels permuted in" in result.stderr if nm else "channels permuted" not in result.stderr


def test_owl_ratios_with_ria(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "ria", "--sparsity", "0.6", "--layerwise", "owl",
                 "--owl-m", "5", "--owl-lambda", "0.05", *SMALL, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["allocation"] is not None and report["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert len({round(layer["target_sparsity"], 4) for layer in report["layers"]}) > 1
    assert {layer["method"] for layer in report["layers"]} == {"ria"}


def test_a_stopped_ria_2of4_run_resumes_to_the_same_checkpoint(tmp_path, tiny_llama_dir, monkeypatch):
    """The permutation is decided per block from that block's statistics: a run stopped after
    block 0 and resumed gives the uninterrupted run's checkpoint and diagnostics bit for bit."""
    from tests.cli.test_resume import assert_same_checkpoint, stop_at_block

    args = ["--method", "ria", "--pattern", "2:4", *SMALL]
    reference = tmp_path / "reference"
    assert run("compress", tiny_llama_dir, *args, "-o", reference).exit_code == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_at_block(m, 2)
        assert run("compress", tiny_llama_dir, *args, "-o", out, "--checkpoint-interval", "3600").exit_code == 130
    resumed = run("compress", tiny_llama_dir, *args, "-o", out, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed"]["blocks_done"] >= 1
    assert_same_checkpoint(out, reference)
