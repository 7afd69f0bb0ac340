import pytest
import torch

from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import Unstructured
from prune_cli.recipe.config import OwlSettings, resolve
from prune_cli.recipe.plan import build_plan
from prune_cli.stages.allocation import allocate_owl, outlier_ratio, owl_sparsities
from tests.tiny_models import VOCAB, tiny_model


def test_owl_ratios_average_exactly_to_target():
    ratios = torch.tensor([0.01, 0.05, 0.02, 0.09, 0.03])
    params = torch.tensor([100.0, 100.0, 300.0, 50.0, 100.0])
    s = owl_sparsities(ratios, params, 0.7, 0.08)
    assert float((s * params).sum() / params.sum()) == pytest.approx(0.7, abs=1e-12)
    assert float(s.max() - s.min()) == pytest.approx(0.16)
    # more outliers -> less pruning
    assert int(s.argmin()) == 3 and int(s.argmax()) == 0


def test_owl_lambda_zero_or_flat_ratios_is_uniform():
    params = torch.ones(4)
    assert torch.allclose(owl_sparsities(torch.tensor([0.1, 0.2, 0.3, 0.4]), params, 0.5, 0.0), torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.allclose(owl_sparsities(torch.full((4,), 0.2), params, 0.5, 0.1), torch.full((4,), 0.5, dtype=torch.float64))


def test_owl_lambda_too_large():
    with pytest.raises(RecipeError):
        owl_sparsities(torch.tensor([0.0, 1.0]), torch.ones(2), 0.9, 0.2)


def test_outlier_ratio():
    scores = [torch.tensor([1.0, 1.0, 1.0, 10.0]), torch.tensor([1.0, 1.0])]
    # mean = 15/6 = 2.5; above 2 * 2.5 = 5: one of six
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)


def _windows(n, seed):
    return torch.randint(0, VOCAB, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_allocate_with_fixed_options_and_restores_nothing_else():
    model = tiny_model("llama", layers=3)
    config = resolve(None, {"method": "wanda", "sparsity": 0.6, "layerwise": {"method": "owl", "m": 3, "lambda": 0.1}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, alloc = allocate_owl(model, build_plan(model, config), config.owl, _windows(4, 0), None, 2, torch.device("cpu"), 0.6)
    assert alloc.chosen_by == "options" and alloc.m == 3 and alloc.lam == 0.1
    sparsities = {l.block: l.pattern.sparsity for l in plan.layers}
    assert sum(sparsities.values()) / 3 == pytest.approx(0.6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_allocate_auto_never_worse_than_uniform_on_validation():
    model = tiny_model("llama", layers=3)
    config = resolve(None, {"method": "wanda", "sparsity": 0.6, "layerwise": {"method": "owl"}})
    settings = OwlSettings(m_grid=(3.0, 5.0), lambda_grid=(0.0, 0.05, 0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, alloc = allocate_owl(model, build_plan(model, config), settings, _windows(4, 0), _windows(2, 1), 2, torch.device("cpu"), 0.6)
    assert alloc.chosen_by == "validation"
    uniform = [g for g in alloc.grid if g["lambda"] == 0]
    assert len(uniform) == 1 and len(alloc.grid) == 5
    chosen = [g for g in alloc.grid if g["m"] == alloc.m and g["lambda"] == alloc.lam][0]
    assert chosen["validation_ppl"] <= uniform[0]["validation_ppl"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_owl_rejects_nm():
    with pytest.raises(RecipeError):
        resolve(None, {"method": "wanda", "pattern": "2:4", "layerwise": {"method": "owl"}})


def test_overrides_by_block_and_regex():
    config = resolve(
        None,
        {"method": "wanda", "sparsity": 0.5, "overrides": [{"blocks": [0], "sparsity": 0.2}, {"match": r"down_proj", "sparsity": 0.7}]},
    )
    plan = build_plan(tiny_model("llama"), config)
    got = {l.name: l.pattern for l in plan.layers}
    assert got["model.layers.0.self_attn.q_proj"] == Unstructured(0.2)
    assert got["model.layers.0.mlp.down_proj"] == Unstructured(0.7)  # later entries win
    assert got["model.layers.1.self_attn.q_proj"] == Unstructured(0.5)


@pytest.mark.parametrize(
    "entry", [{"sparsity": 0.2}, {"blocks": [0]}, {"blocks": [0], "sparsity": 1.5}, {"block": [0], "sparsity": 0.1}, {"match": "(", "sparsity": 0.1}]
)
def test_bad_overrides(entry):
    with pytest.raises(RecipeError):
        resolve(None, {"method": "wanda", "sparsity": 0.5, "overrides": [entry]})


def test_method_options_merge_and_reset():
    recipe = {"version": 1, "method": "dsnot", "sparsity": 0.5, "method_options": {"mode": "reference"}}
    c = resolve(recipe, {"method_options": {"base": "magnitude"}})
    assert c.method_options["mode"] == "reference" and c.method_options["base"] == "magnitude"
    c = resolve(recipe, {"method": "wanda"})
    assert c.method == "wanda" and c.method_options == {}
