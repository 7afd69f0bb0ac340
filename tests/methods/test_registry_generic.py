"""Properties every registered method must have, read from what each method declares. The tests
iterate the registries, so a new method is covered by registering it (no list of names here).

Weight methods (default options): the declared patterns come out exact (N:M: ``n`` kept in every
group of ``m``; unstructured: the count of the declared ``unstructured_scope``), the weight's
dtype is kept, the result is the same twice, a method that declares no weight update changes
no kept weight, the (emulated) CuPy backend gives the torch masks, an undeclared pattern is
refused, DSnoT accepts exactly the declared bases, and the export loads in plain transformers.
Activation methods: fitted on a tiny layer, the module holds what the declared runtime form says
(and the activation file exactly its buffers), the fit is deterministic, the report record has
the declared fields, and an N:M pattern is refused with the recipe's wording.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_cli.activation import ACTIVATION_METHODS, build_activation_method
from prune_cli.activation.modules import SparseInputLinear
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.methods import WEIGHT_METHODS, build_method
from prune_cli.methods.base import dsnot_bases
from prune_cli.methods.catalog import dsnot_base_help, method_help
from prune_cli.runtime import activation_tensors
from tests.gpu.test_cupy_host_emulated import emulated  # noqa: F401 - the emulated CuPy backend fixture
from tests.methods.helpers import correlated_inputs, stats_for

WEIGHT_NAMES = WEIGHT_METHODS.names()
ACTIVATION_NAMES = ACTIVATION_METHODS.names()
PATTERNS = [Unstructured(0.6), NM(2, 4), NM(4, 8)]
OUT, IN = 16, 64


def layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = correlated_inputs(256, IN, seed=seed)
    return torch.randn(OUT, IN, generator=g), stats_for(x, tokens_per_window=32)


def supported(method) -> list:
    return [p for p in PATTERNS if isinstance(p, method.patterns)]


# ------------------------------------------------------------------ weight methods


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_every_declared_pattern_is_exact(name):
    method = build_method(name)
    w, stats = layer()
    assert supported(method), name
    for pattern in supported(method):
        res = method.prune(w, stats, pattern)
        assert res.mask.shape == w.shape and res.mask.dtype == torch.bool
        assert (res.weight[~res.mask] == 0).all(), pattern
        if isinstance(pattern, NM):
            assert (res.mask.reshape(OUT, -1, pattern.m).sum(-1) == pattern.n_keep).all(), pattern
        elif method.unstructured_scope == "row":
            assert ((~res.mask).sum(1) == int(IN * pattern.sparsity)).all(), pattern
        else:
            assert method.unstructured_scope == "matrix"
            assert int((~res.mask).sum()) == int(OUT * IN * pattern.sparsity), pattern


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_dtype_kept_and_deterministic(name, dtype):
    method = build_method(name)
    w, stats = layer(1)
    w = w.to(dtype)
    for pattern in supported(method):
        first = method.prune(w, stats, pattern)
        again = method.prune(w, stats, pattern)
        assert first.weight.dtype == dtype and first.mask.dtype == torch.bool
        assert torch.equal(first.mask, again.mask) and torch.equal(first.weight, again.weight), pattern
        if not method.updates_weights:  # declared a mask only: kept weights are the dense ones
            assert torch.equal(first.weight[first.mask], w[first.mask]), pattern


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_emulated_cupy_backend_gives_the_torch_masks(emulated, name):  # noqa: F811
    backend, _ = emulated
    method = build_method(name)
    w, stats = layer(2)
    for pattern in supported(method):
        want = method.prune(w, stats, pattern)
        got = method.prune(w, stats, pattern, backend)
        assert torch.equal(got.mask, want.mask), pattern
        assert torch.equal(got.weight, want.weight), pattern


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_an_undeclared_pattern_is_refused(name):
    method = build_method(name)
    for pattern in PATTERNS:
        if isinstance(pattern, method.patterns):
            method.check_pattern(pattern)
        else:
            with pytest.raises(RecipeError, match=f"{name} has no"):
                method.check_pattern(pattern)


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_dsnot_accepts_exactly_the_declared_bases(name):
    if WEIGHT_METHODS.get(name).dsnot_base:
        assert build_method("dsnot", {"base": name}).base == name
    else:
        with pytest.raises(RecipeError, match=f"dsnot base must be one of {', '.join(dsnot_bases())}, got '{name}'"):
            build_method("dsnot", {"base": name})


def test_help_texts_name_every_registered_method():
    text = method_help(ACTIVATION_METHODS)
    assert all(name in text for name in [*WEIGHT_NAMES, *ACTIVATION_NAMES])
    assert all(name in dsnot_base_help() for name in dsnot_bases())


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_the_export_loads_in_plain_transformers(tmp_path, tiny_llama_dir, name):
    from transformers import AutoModelForCausalLM

    from prune_cli.recipe.config import resolve
    from prune_cli.run.pipeline import CompressRequest, compress

    method = build_method(name)
    pattern = "2:4" if NM in method.patterns else "unstructured"
    overrides = {"method": name, "pattern": pattern, "device": "cpu", "backend": "torch",
                 "calibration": {"samples": 2, "seqlen": 16}, "evaluation": {"enabled": False}}
    if pattern == "unstructured":
        overrides["sparsity"] = 0.5
    out = tmp_path / "out"
    report = compress(CompressRequest(resolve(None, overrides), str(tiny_llama_dir), str(out)))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert report["layers"]
    for record in report["layers"]:
        weight = model.get_submodule(record["name"]).weight.detach()
        zeros = float((weight == 0).float().mean())
        assert zeros == pytest.approx(record["achieved_sparsity"]), record["name"]
        if pattern == "2:4":
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all(), record["name"]


# ------------------------------------------------------------------ activation methods


def tiny_linear(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, 48)
    return linear, correlated_inputs(300, IN, seed=seed)


def fit(name: str, sparsity: float = 0.5, seed: int = 0) -> tuple[object, SparseInputLinear]:
    method = build_activation_method(name)
    linear, x = tiny_linear(seed)
    cache = {"local": "self_attn.q_proj", "linears": {"self_attn.q_proj": linear, "self_attn.k_proj": linear}}
    return method, method.fit(linear, x, sparsity, cache)


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_fitted_module_holds_the_declared_runtime_form(name):
    method, module = fit(name)
    form = method.runtime_form
    assert isinstance(module, SparseInputLinear)
    if not form.scaled:
        assert torch.equal(module.channel_scale, torch.ones(IN))
    else:
        assert not torch.equal(module.channel_scale, torch.ones(IN))
    if not form.lowrank:
        assert module.lowrank_u is None and module.lowrank_v is None and module.rank == 0
    assert (int(module.keep_count) > 0) == form.per_token_topk
    exported = {key.rsplit(".", 1)[1] for key in activation_tensors({"layer": module})}
    low_rank = {"lowrank_u", "lowrank_v"}
    assert exported == set(form.buffers) - (set() if module.rank else low_rank)
    record = method.fit_record(module)
    assert {"threshold", "rank"} <= set(record) <= {"threshold", "rank", *form.reported}


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_activation_fit_is_deterministic(name):
    _, first = fit(name, 0.6, seed=3)
    _, again = fit(name, 0.6, seed=3)
    a, b = dict(first.named_buffers()), dict(again.named_buffers())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), name


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_activation_pattern_check(name):
    cls = ACTIVATION_METHODS.get(name)
    cls.check_pattern_text(None)
    cls.check_pattern_text(" Unstructured ")
    if NM not in cls.patterns:
        with pytest.raises(RecipeError, match="^activation methods have no N:M pattern$") as info:
            cls.check_pattern_text("2:4")
        assert info.value.hint == "drop --pattern"
