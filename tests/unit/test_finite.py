"""NaN / +-inf in weights, calibration activations, statistics and activation sparsifiers are
reported where they first appear (NonFiniteError, exit code 2, naming the module), never exported."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from prune_cli.calibrators import layerwise
from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.cli import app
from prune_cli.core.errors import BadInputError, NonFiniteError
from prune_cli.core.finite import (
    all_finite,
    check_finite_parameters,
    check_finite_tensor,
    check_finite_tensors,
    count_nonfinite,
    describe_nonfinite,
    is_finite,
    nonfinite_parameters,
)
from prune_cli.model.structure import block_linears, decoder_blocks
from tests.cli.test_cli import assert_one_line_error
from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer

NAN, INF = float("nan"), float("inf")
CPU = torch.device("cpu")


def windows(n=4, seqlen=16, seed=1):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value,counts", [(NAN, (1, 0, 0)), (INF, (0, 1, 0)), (-INF, (0, 0, 1))])
def test_one_bad_value_is_found_in_every_float_dtype(dtype, value, counts):
    t = torch.randn(1000, 7).to(dtype)
    assert is_finite(t) and all_finite([t, t[:3]])
    t[517, 3] = value
    assert not is_finite(t) and not all_finite([torch.zeros(3), t])
    assert count_nonfinite(t) == counts
    assert not is_finite(t[517:518])  # views too


def test_empty_integer_and_none_count_as_finite():
    assert is_finite(torch.empty(0)) and is_finite(torch.arange(5)) and is_finite(None)
    assert all_finite([]) and all_finite([torch.empty(0, 3), torch.ones(2, dtype=torch.long)])


def test_check_finite_tensor_message_counts_each_kind():
    t = torch.tensor([1.0, NAN, NAN, INF, -INF, -INF, -INF])
    with pytest.raises(NonFiniteError) as info:
        check_finite_tensor(t, "the thing", hint="fix it")
    assert str(info.value) == "non-finite values in the thing: 2 NaN, 1 +inf, 3 -inf"
    assert info.value.hint == "fix it"
    assert isinstance(info.value, BadInputError) and info.value.exit_code == 2
    check_finite_tensor(torch.ones(3), "fine")


def test_check_finite_tensors_sums_counts_over_all():
    with pytest.raises(NonFiniteError, match="in batches: 1 NaN, 1 \\+inf, 0 -inf"):
        check_finite_tensors([torch.tensor([NAN]), torch.ones(2), torch.tensor([INF])], "batches")
    check_finite_tensors([torch.ones(2), torch.zeros(1)], "batches")
    assert describe_nonfinite([torch.tensor([NAN, -INF])]) == "1 NaN, 0 +inf, 1 -inf"


def test_check_finite_parameters_names_the_first_tensor_by_full_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    check_finite_parameters(model)
    with torch.no_grad():
        model[2].weight[1, 3] = NAN
        model[2].bias[0] = -INF
    model[1].running_var[2] = INF
    assert nonfinite_parameters(model, "net") == ["net.2.weight", "net.2.bias", "net.1.running_var"]
    with pytest.raises(NonFiniteError) as info:
        check_finite_parameters(model, prefix="net")
    assert str(info.value) == (
        "non-finite weights in net.2.weight: 1 NaN, 0 +inf, 0 -inf "
        "(and 2 more non-finite tensors: net.2.bias, net.1.running_var)"
    )
    assert "checkpoint" in info.value.hint
    with torch.no_grad():
        model[2].weight.fill_(1.0)
        model[2].bias.fill_(1.0)
    with pytest.raises(NonFiniteError, match=r"^non-finite buffer in 1\.running_var: 0 NaN, 1 \+inf, 0 -inf$"):
        check_finite_parameters(model)
    check_finite_parameters(model[2], recurse=False)


def test_tied_embedding_is_named_once():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 0] = INF
    assert nonfinite_parameters(model) == ["model.embed_tokens.weight"]


# ----------------------------------------------------------------------------- statistics


def test_nan_input_makes_statistics_raise_naming_the_consumers():
    stats = InputStats(
        4, frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM}), consumers=["mlp.gate_proj", "mlp.up_proj"],
        block="model.layers.3",
    )
    stats.update(torch.randn(10, 4))
    stats.check_finite()
    assert torch.isfinite(stats.norm).all()
    x = torch.randn(6, 4)
    x[2, 1] = NAN
    stats.update(x)  # the accumulation itself does not check (no host sync per batch)
    for read in (stats.check_finite, lambda: stats.norm, lambda: stats.mean, lambda: stats.var, lambda: stats.hessian):
        with pytest.raises(NonFiniteError) as info:
            read()
        message = str(info.value)
        assert message.startswith("non-finite input statistics of model.layers.3.mlp.gate_proj, model.layers.3.mlp.up_proj")
        assert "sq_norm: 1 NaN, 0 +inf, 0 -inf" in message and "mean: 1 NaN" in message and "gram:" in message
        assert "--dtype float32" in info.value.hint
    merged = stats.merge(InputStats(4, stats.wanted, consumers=["mlp.gate_proj"]))
    with pytest.raises(NonFiniteError, match="model.layers.3.mlp.gate_proj"):
        merged.norm


def test_finite_activations_whose_float32_sums_overflow_raise():
    stats = InputStats(3, frozenset({Stat.SQ_NORM}), consumers=["self_attn.o_proj"])
    stats.update(torch.full((4, 3), 3e19))  # finite, but 3e19 ** 2 > float32 max
    with pytest.raises(NonFiniteError, match=r"of self_attn\.o_proj \(sq_norm: 0 NaN, 3 \+inf, 0 -inf\)"):
        stats.norm


# ----------------------------------------------------------------------------- layer-wise calibrator


def _poison_output(module: nn.Module, value: float):
    """A forward hook that puts ``value`` into one element of ``module``'s output."""

    def hook(mod, args, output):
        out = output.clone()
        out.view(-1)[0] = value
        return out

    return module.register_forward_hook(hook)


def test_nonfinite_embedding_weight_is_named_at_capture():
    model = tiny_model("llama")
    ids = windows()
    with torch.no_grad():
        model.model.embed_tokens.weight[int(ids[0, 0]), 5] = NAN
    with pytest.raises(NonFiniteError, match=r"^non-finite weights in model\.embed_tokens\.weight: 1 NaN"):
        layerwise.capture_block_inputs(model, decoder_blocks(model).modules, ids, 2, CPU)


def test_nonfinite_block_inputs_from_finite_weights_name_block_0():
    model = tiny_model("llama")
    _poison_output(model.model.embed_tokens, INF)
    with pytest.raises(NonFiniteError) as info:
        layerwise.capture_block_inputs(model, decoder_blocks(model).modules, windows(), 2, CPU)
    assert str(info.value).startswith("non-finite calibration activations at the input of model.layers.0")
    assert "0 NaN, 2 +inf, 0 -inf" in str(info.value)  # one per batch of two


@pytest.mark.parametrize("name,expected", [(None, "model.layers.1"), ("custom.blocks.7", "custom.blocks.7")])
def test_propagate_names_the_block(name, expected):
    model = tiny_model("llama")
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows(), 2, CPU)
    _poison_output(blocks[1].mlp.down_proj, NAN)
    layerwise.propagate(blocks[0], batches)
    with pytest.raises(NonFiniteError) as info:
        layerwise.propagate(blocks[1], batches, name=name)
    assert str(info.value).startswith(f"non-finite calibration activations at the output of {expected}: ")
    assert "mis-scaled" in info.value.hint  # float32: not an fp16 overflow


def test_propagate_after_pruning_names_a_nonfinite_weight():
    model = tiny_model("llama")
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows(), 2, CPU)
    with torch.no_grad():
        blocks[0].self_attn.o_proj.weight[3, 3] = NAN  # as a broken pruning step would
    with pytest.raises(NonFiniteError, match=r"^non-finite weights in model\.layers\.0\.self_attn\.o_proj\.weight: 1 NaN") as info:
        layerwise.propagate(blocks[0], batches)
    assert "pruning" in info.value.hint


def test_fp16_overflow_in_a_block_suggests_float32():
    model = tiny_model("llama")
    with torch.no_grad():
        for linear in (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj):
            linear.weight.mul_(1e3)
    model = model.half()
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows(), 2, CPU)
    with pytest.raises(NonFiniteError, match=r"at the output of model\.layers\.0: ") as info:
        layerwise.propagate(blocks[0], batches)
    assert "--dtype float32" in info.value.hint


def test_collect_input_stats_names_the_linear_whose_input_is_not_finite():
    model = tiny_model("llama")
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows(), 2, CPU)
    _poison_output(blocks[0].mlp.up_proj, INF)  # down_proj reads act(gate) * up
    linears = block_linears(blocks[0])
    with pytest.raises(NonFiniteError, match=r"^non-finite input statistics of model\.layers\.0\.mlp\.down_proj \(sq_norm"):
        layerwise.collect_input_stats(blocks[0], batches, linears, {n: frozenset({Stat.SQ_NORM}) for n in linears})


def test_collect_input_stats_checks_the_hidden_states_it_updates():
    model = tiny_model("llama")
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows(), 2, CPU)
    _poison_output(blocks[0].mlp.down_proj, NAN)
    linears = block_linears(blocks[0])
    wanted = {"self_attn.q_proj": frozenset({Stat.SQ_NORM})}  # its input is fine
    with pytest.raises(NonFiniteError, match=r"at the output of model\.layers\.0: "):
        layerwise.collect_input_stats(blocks[0], batches, linears, wanted, update_hidden=True)


def test_sampled_linear_inputs_are_checked():
    model = tiny_model("llama")
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows(), 2, CPU)
    _poison_output(blocks[0].mlp.up_proj, NAN)
    down = {"mlp.down_proj": blocks[0].mlp.down_proj}
    match = r"^non-finite values in the calibration inputs of model\.layers\.0\.mlp\.down_proj: "
    with pytest.raises(NonFiniteError, match=match):
        layerwise.collect_first_input(blocks[0], batches, down, 10_000, torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match=match):
        layerwise.collect_inputs(blocks[0], batches, down, 10_000, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- activation sparsifiers


@pytest.mark.parametrize("buffer", ["threshold", "channel_scale", "lowrank_u"])
def test_nonfinite_sparsifier_is_named_before_it_is_installed(buffer):
    from prune_cli.activation import build_activation_method
    from prune_cli.activation.modules import SparseInputLinear
    from prune_cli.stages.activation import activation_targets, calibrate_activation, uniform_allocation

    model = tiny_model("llama", layers=1)
    targets = activation_targets(model, lambda n: True)
    real = build_activation_method("teal", {})

    class Broken:
        def fit_record(self, module):  # the report fields, as the real method gives them
            return real.fit_record(module)

        def fit(self, linear, x, sparsity, cache=None, backend=None):
            module = real.fit(linear, x, sparsity, cache, backend=backend)
            if cache["local"] != "mlp.down_proj":
                return module
            r = 2
            u = torch.zeros(linear.out_features, r)
            scale = torch.ones(linear.in_features)
            {"threshold": lambda: None, "channel_scale": lambda: scale.__setitem__(5, NAN),
             "lowrank_u": lambda: u.__setitem__((0, 0), INF)}[buffer]()
            threshold = NAN if buffer == "threshold" else float(module.threshold)
            return SparseInputLinear(linear, threshold, scale, u, torch.zeros(r, linear.in_features))

    with pytest.raises(NonFiniteError, match=rf"^non-finite buffer in model\.layers\.0\.mlp\.down_proj\.{buffer}: "):
        calibrate_activation(model, targets, Broken(), uniform_allocation(targets, 0.5), windows(), 2, CPU, 64, 0)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)  # not installed


# ----------------------------------------------------------------------------- end to end

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]


def _saved(folder, edit) -> str:
    model = tiny_model("llama")
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _compress(model_dir, out, *extra):
    return runner.invoke(app, ["compress", model_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", str(out), *extra])


def _set(name: str, index: tuple, value: float):
    return lambda model: model.get_submodule(name).weight.__setitem__(index, value)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (_set("model.layers.1.mlp.down_proj", (3, 7), NAN),
         "non-finite weights in model.layers.1.mlp.down_proj.weight: 1 NaN, 0 +inf, 0 -inf"),
        (_set("model.embed_tokens", (11, 2), INF), "non-finite weights in model.embed_tokens.weight: 0 NaN, 1 +inf, 0 -inf"),
    ],
    ids=["nan-down-proj", "inf-embedding"],
)
def test_cli_refuses_nonfinite_weights_and_exports_nothing(tmp_path, edit, needle):
    model_dir = _saved(tmp_path / "model", edit)
    out = tmp_path / "out"
    result = _compress(model_dir, out)
    assert_one_line_error(result)
    assert needle in result.stderr
    assert "hint:" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _scale_mlp(model):
    for linear in (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj):
        linear.weight.mul_(1e3)  # finite in float16 (|w| < 100), but act(gate) * up overflows it


@pytest.mark.parametrize(
    "method,needle",
    [
        # with evaluation, the dense evaluation (riding along the first walk, before the block is
        # pruned) sees it first, at the block where it happens
        ("wanda", "non-finite activations of the evaluation text at the output of model.layers.0: "),
        # without, calibration: wanda reads down_proj's inputs; magnitude only propagates
        ("wanda --no-eval", "non-finite input statistics of model.layers.0.mlp.down_proj"),
        ("magnitude --no-eval", "non-finite calibration activations at the output of model.layers.0: "),
    ],
)
def test_cli_fp16_activation_overflow_names_the_block_and_suggests_float32(tmp_path, method, needle):
    model_dir = _saved(tmp_path / "model", _scale_mlp)
    out = tmp_path / "out"
    method, *extra = method.split()
    result = runner.invoke(
        app, ["compress", model_dir, "--method", method, "--sparsity", "0.5", *SMALL, *extra, "--dtype", "float16", "-o", str(out)]
    )
    assert_one_line_error(result)
    assert needle in result.stderr
    assert "--dtype float32" in result.stderr
    assert not out.exists()
