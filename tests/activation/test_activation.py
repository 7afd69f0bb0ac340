import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from prune_cli.activation import ACTIVATION_METHODS, build_activation_method
from prune_cli.activation.base import quantile_threshold
from prune_cli.activation.modules import SparseInputLinear, count_sparsity
from prune_cli.activation.rsparse import RSparse
from prune_cli.cli import app
from prune_cli.stages.activation import GRID, greedy_allocation
from tests.methods.helpers import correlated_inputs

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]


def linear(in_f=64, out_f=48, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def test_sparsity_zero_wrapper_equals_original_exactly():
    lin = linear()
    x = torch.randn(5, 7, 64)
    for name in ("teal", "wina", "rsparse"):
        wrapped = build_activation_method(name).fit(lin, x.reshape(-1, 64), 0.0)
        assert torch.equal(wrapped(x), lin(x)), name


@pytest.mark.parametrize("name", ["teal", "wina"])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.7])
def test_threshold_hits_target_on_held_out_activations(name, target):
    lin = linear()
    x = correlated_inputs(8000, 64, seed=1)
    x_cal, x_held = x[:4000], x[4000:]  # same distribution, disjoint tokens
    wrapped = build_activation_method(name).fit(lin, x_cal, target)
    achieved = 1 - wrapped.mask(x_held).float().mean().item()
    assert abs(achieved - target) < 0.01


def test_quantile_threshold_exact():
    scores = torch.arange(1, 101, dtype=torch.float32)
    tau = quantile_threshold(scores, 0.3)
    assert (scores <= tau).sum() == 30


def test_rsparse_full_rank_equals_dense():
    lin = linear(32, 24)
    x = correlated_inputs(500, 32)
    module = SparseInputLinear(lin, 1e9, None, *_full_factors(lin))  # every channel to the low-rank path
    torch.testing.assert_close(module(x), lin(x), atol=1e-4, rtol=1e-4)


def _full_factors(lin):
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    return U * S, Vh


@pytest.mark.parametrize("svd", ["activation", "weight"])
def test_rsparse_beats_pure_sparse_at_same_budget(svd):
    lin = linear(64, 64)
    x = correlated_inputs(3000, 64, seed=2)
    dense = lin(x)
    teal_like = build_activation_method("wina").fit(lin, x, 0.5)
    rs = build_activation_method("rsparse", {"svd": svd}).fit(lin, x, 0.5)
    err = lambda m: float((m(x) - dense).detach().pow(2).sum())  # noqa: E731
    assert err(rs) <= err(teal_like) * 1.0001
    assert RSparse.rank(0.5, 0.5, 64, 64) == 8


def test_decode_path_equals_masked_dense():
    lin = linear(64, 48)
    x_cal = correlated_inputs(2000, 64)
    module = build_activation_method("wina").fit(lin, x_cal, 0.5)
    token = correlated_inputs(1, 64, seed=9).reshape(1, 1, 64)
    expected = module(token)
    module.prepare_decode()
    torch.testing.assert_close(module(token), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(expected, lin(token * module.mask(token)), atol=1e-6)


def test_greedy_allocation_meets_target_exactly_and_prefers_cheap_layers():
    curves = {"cheap": [0.001 * i for i in range(len(GRID))], "costly": [0.05 * i for i in range(len(GRID))]}
    params = {"cheap": 100, "costly": 100}
    s = greedy_allocation(curves, params, 0.4)
    assert (s["cheap"] * 100 + s["costly"] * 100) / 200 == pytest.approx(0.4)
    assert s["cheap"] > s["costly"]


def test_count_sparsity_reports_compute_including_low_rank():
    lin = linear(32, 32)
    module = SparseInputLinear(lin, 1e9, None, *[t[:, :4] if i == 0 else t[:4] for i, t in enumerate(_full_factors(lin))])
    holder = nn.Sequential(module)
    with count_sparsity(holder) as counted:
        holder(torch.randn(10, 32))
    assert counted.overall("input") == 1.0
    assert counted.overall("compute") == pytest.approx(1 - 4 * 64 / (32 * 32))


@pytest.mark.parametrize("method", ACTIVATION_METHODS.names())
def test_cli_activation_export_load_eval(tmp_path, tiny_llama_dir, method):
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["compress", str(tiny_llama_dir), "--method", method, "--sparsity", "0.4", *SMALL, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    act = report["activation"]
    assert act["method"] == method and act["tokens"] == "all"
    assert abs(act["achieved_sparsity"] - 0.4) < 0.08  # 64 held-out tokens on a tiny random model
    assert (out / "activation_sparsity.safetensors").is_file()
    # plain transformers still loads the weights alone
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    # the public runtime API applies the sparsifiers; eval gives the in-memory perplexity
    from prune_cli.runtime import load

    model, _ = load(out)
    assert any(isinstance(m, SparseInputLinear) for m in model.modules())
    r = CliRunner().invoke(app, ["eval", str(out), "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["ppl"] == pytest.approx(report["ppl"]["compressed"], rel=1e-4)
    assert ev["activation_sparsity"] == pytest.approx(act["achieved_sparsity"], abs=1e-6)


def test_cli_greedy_allocation_and_composition(tmp_path, tiny_llama_dir):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "method": "wanda", "pattern": "2:4",
        "activation": {"method": "wina", "sparsity": 0.4, "allocation": "greedy"},
    }))
    r = CliRunner().invoke(app, ["compress", str(tiny_llama_dir), "--recipe", str(recipe), *SMALL, "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["weight_sparsity"] == pytest.approx(0.5)
    targets = [layer["target_sparsity"] for layer in report["activation"]["layers"]]
    assert len(set(targets)) > 1  # greedy gives per-layer sparsities


def test_activation_method_with_nm_pattern_is_bad_input(tmp_path, tiny_llama_dir):
    r = CliRunner().invoke(app, ["compress", str(tiny_llama_dir), "--method", "wina", "--pattern", "2:4", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2


def test_wina_topk_keeps_exact_count_per_token():
    lin = linear(64, 32)
    module = build_activation_method("wina", {"selection": "topk"}).fit(lin, correlated_inputs(100, 64), 0.5)
    x = correlated_inputs(20, 64, seed=4)
    assert (module.mask(x).sum(-1) == 32).all()


def test_wina_released_uses_sibling_norms():
    from prune_cli.activation.base import column_norms

    k, q = linear(64, 16, seed=1), linear(64, 64, seed=2)
    method = build_activation_method("wina", {"variant": "released"})
    ctx = {"local": "self_attn.q_proj", "linears": {"self_attn.k_proj": k, "self_attn.q_proj": q}}
    assert torch.equal(method.channel_scale(q, ctx), column_norms(k))
    ctx["local"] = "self_attn.o_proj"
    assert torch.equal(method.channel_scale(q, ctx), torch.ones(64))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_decode_thresholds_give_the_calibrated_mask(sparsity):
    """The one-token path compares |x_i| with tau / c_i; on many tokens it must keep exactly
    the channels that |x_i| c_i > tau keeps, including a dead column (c_i = 0)."""
    lin = linear(64, 48)
    with torch.no_grad():
        lin.weight[:, 5] = 0
    module = build_activation_method("wina").fit(lin, correlated_inputs(2000, 64), sparsity)
    module.prepare_decode()
    tokens = correlated_inputs(500, 64, seed=11)
    assert torch.equal(tokens.abs() > module._channel_threshold, module.mask(tokens))
    outputs = torch.stack([module(t.reshape(1, 1, 64)).reshape(-1) for t in tokens[:20]])
    torch.testing.assert_close(outputs, lin(tokens[:20] * module.mask(tokens[:20])), atol=1e-5, rtol=1e-5)


def test_output_fisher_is_the_summed_squared_loss_gradient_of_each_output():
    from prune_cli.stages.activation import activation_targets, output_fisher
    from tests.tiny_models import tiny_model

    model = tiny_model("llama").eval()
    targets = activation_targets(model, lambda name: True)
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    fisher = output_fisher(model, targets, windows, torch.device("cpu"), n_windows=2)
    assert set(fisher) == {t.name for t in targets}
    assert all(p.requires_grad for p in model.parameters())  # restored after the pass
    name = next(t.name for t in targets if t.local.endswith("v_proj"))
    expected = 0
    for window in windows[:2]:  # by hand: keep the output, take d loss / d output
        captured = {}
        handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.setdefault("y", out))
        loss = model(input_ids=window.unsqueeze(0), labels=window.unsqueeze(0)).loss
        handle.remove()
        (grad,) = torch.autograd.grad(loss, captured["y"])
        expected = expected + grad.reshape(-1, grad.shape[-1]).square().sum(0)
    torch.testing.assert_close(fisher[name], expected, rtol=1e-4, atol=1e-12)
    assert (fisher[name] > 0).all()


def test_cli_shipped_activation_recipe(tmp_path, tiny_llama_dir):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "wina-greedy-50.yaml"
    r = CliRunner().invoke(app, ["compress", str(tiny_llama_dir), "--recipe", str(recipe), *SMALL, "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    act = report["activation"]
    assert act["method"] == "wina" and act["allocation"] == "greedy"
    assert len({layer["target_sparsity"] for layer in act["layers"]}) > 1  # per-layer allocation
    assert abs(act["achieved_sparsity"] - 0.5) < 0.15  # 4 x 32 calibration tokens, 2 x 32 held out


def test_wina_transform_keeps_the_dense_function_and_orthogonalizes_key_columns():
    from prune_cli.activation.transform import RotatedNorm, apply_transform, plain_norms, rotations_for
    from tests.tiny_models import tiny_model

    model = tiny_model("llama").eval()
    with torch.no_grad():  # non-trivial norm weights, so folding matters
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    dense = model(input_ids=ids).logits
    assert apply_transform(model, rotations_for(model)) == 2 * len(model.model.layers)
    torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-4, rtol=1e-4)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, RotatedNorm)
    for key in (layer.self_attn.k_proj, layer.mlp.gate_proj):
        gram = key.weight.double().T @ key.weight.double()
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-4 * gram.diagonal().max()
    with plain_norms(model) as rotations:  # the exported form: plain modules, same function
        assert not any(isinstance(m, RotatedNorm) for m in model.modules()) and len(rotations) == 4
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-4, rtol=1e-4)
    assert isinstance(layer.input_layernorm, RotatedNorm)
    with pytest.raises(Exception, match="already"):
        apply_transform(model, rotations_for(model))


def test_wina_transform_export_load_is_bit_identical(tmp_path, tiny_llama_dir):
    from prune_cli.runtime import load

    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["compress", str(tiny_llama_dir), "--method", "wina", "--sparsity", "0.4", "-O", "transform=true",
                                 *SMALL, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["activation"]["options"]["transform"] is True
    r = CliRunner().invoke(app, ["eval", str(out), "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ppl"] == pytest.approx(report["ppl"]["compressed"], rel=1e-6)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers: the dense function
    model, _ = load(out)
    ids = torch.randint(0, plain.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    from prune_cli.activation.modules import unwrap_all

    unwrap_all(model)  # the loaded, transformed model without sparsifiers equals the plain one
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_wina_transform_refuses_layernorm_models_with_one_line(tmp_path, tiny_opt_dir):
    r = CliRunner().invoke(app, ["compress", str(tiny_opt_dir), "--method", "wina", "--sparsity", "0.4", "-O", "transform=true",
                                 *SMALL, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "Llama-style blocks" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["teal", "wina"])
def test_every_linear_meets_its_sparsity_on_the_calibration_tokens(name):
    """Stages are fitted in forward order on inputs that already pass through the earlier
    stages' sparsifiers, so o_proj and down_proj (whose inputs those sparsifiers change) hit the
    target on the calibration tokens as exactly as q/k/v and gate/up do."""
    from prune_cli.stages.activation import activation_targets, calibrate_activation, uniform_allocation
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", layers=2)
    windows = torch.randint(3, 384, (4, 40), generator=torch.Generator().manual_seed(1))
    targets = activation_targets(model, lambda n: True)
    records = calibrate_activation(
        model, targets, build_activation_method(name, {}), uniform_allocation(targets, 0.5), windows, 2,
        torch.device("cpu"), 10_000, 0,
    )
    assert [r["name"] for r in records] == [t.name for t in targets]  # report order: the targets'
    with count_sparsity(model) as counted, torch.no_grad():
        model(windows)
    achieved = {n: r["input_sparsity"] for n, r in counted.per_layer().items()}
    assert len(achieved) == len(targets) == 14
    assert {n.split(".")[-1] for n in achieved} >= {"o_proj", "down_proj"}
    for n, s in achieved.items():
        assert s == pytest.approx(0.5, abs=1e-3), n


def test_forward_order_stages_sample_the_same_tokens_and_leave_the_generator_as_one_pass():
    """Each stage's pass rewinds the token-sampling generator: every stage reads the same sampled
    tokens, and the next block starts from the state a single pass leaves."""
    from prune_cli.calibrators import layerwise
    from prune_cli.model.structure import decoder_blocks
    from prune_cli.stages.activation import _fit_in_forward_order, activation_targets, uniform_allocation
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", layers=1)
    windows = torch.randint(3, 384, (4, 40), generator=torch.Generator().manual_seed(2))
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows, 2, torch.device("cpu"))
    targets = activation_targets(model, lambda n: True)
    seen = []
    method = build_activation_method("teal", {})
    real_fit = method.fit

    class Spy:
        def fit(self, linear, x, sparsity, cache=None, backend=None):
            seen.append((cache["local"], x.shape[0]))
            return real_fit(linear, x, sparsity, cache, backend=backend)

    generator = torch.Generator().manual_seed(0)
    fitted = [t.local for t, _ in _fit_in_forward_order(
        blocks[0], batches, targets, Spy(), uniform_allocation(targets, 0.5), torch.device("cpu"), 50, generator, None
    )]
    assert fitted == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert {n for _, n in seen} == {50}
    one_pass = torch.Generator().manual_seed(0)
    torch.randperm(160, generator=one_pass)
    assert torch.equal(generator.get_state(), one_pass.get_state())
