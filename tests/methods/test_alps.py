"""ALPS (prune_cli/methods/alps.py) against slow, obviously correct references: the ADMM iterates
of a plain loop with a fresh linear solve per step, a dense least-squares solve on the final
support, and SparseGPT's layer error on the same statistics."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from prune_cli.cli import app
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.methods import build_method
from tests.methods.helpers import correlated_inputs, recon_error, stats_for

PATTERNS = [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8)]


def layer(seed: int = 0, out_f: int = 32, in_f: int = 64, tokens: int = 512, correlated: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = correlated_inputs(tokens, in_f, seed=seed) if correlated else torch.randn(tokens, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    return w, x, stats_for(x)


# ------------------------------------------------------------------ the pattern and the result


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_is_exact(pattern):
    w, _, stats = layer()
    res = build_method("alps").prune(w, stats, pattern)
    assert ((res.weight != 0) <= res.mask).all() and (res.weight[~res.mask] == 0).all()
    if isinstance(pattern, NM):
        assert (res.mask.reshape(32, -1, pattern.m).sum(-1) == pattern.n_keep).all()
    else:  # the paper's scope: the whole layer, exactly floor(numel * s) removed
        assert int((~res.mask).sum()) == int(w.numel() * pattern.sparsity)
        assert len(set(res.mask.sum(1).tolist())) > 1  # rows differ: not a per-row selection


def test_row_scope_keeps_the_same_count_in_every_row():
    w, _, stats = layer()
    res = build_method("alps", {"scope": "row"}).prune(w, stats, Unstructured(0.6))
    assert (res.mask.sum(1) == 64 - int(64 * 0.6)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_kept(dtype):
    w, _, stats = layer()
    res = build_method("alps").prune(w.to(dtype), stats, NM(2, 4))
    assert res.weight.dtype == dtype and res.mask.dtype == torch.bool
    assert (res.weight[~res.mask] == 0).all()


def test_deterministic_bit_for_bit():
    w, x, stats = layer(seed=5)
    a = build_method("alps").prune(w, stats, Unstructured(0.6))
    b = build_method("alps").prune(w, stats, Unstructured(0.6))  # cached eigendecomposition
    c = build_method("alps").prune(w, stats_for(x), Unstructured(0.6))  # computed again
    for other in (b, c):
        assert torch.equal(a.weight, other.weight) and torch.equal(a.mask, other.mask) and a.info == other.info


def test_nothing_to_prune_returns_the_weight():
    w, _, stats = layer()
    res = build_method("alps").prune(w, stats, NM(4, 4))
    assert torch.equal(res.weight, w) and res.mask.all()


def test_dead_inputs_stay_finite():
    w, x, _ = layer()
    x[:, 3] = 0
    res = build_method("alps").prune(w, stats_for(x), Unstructured(0.5))
    assert torch.isfinite(res.weight).all()


@pytest.mark.parametrize("options", [
    {"max_iter": -1}, {"max_iter": 2.5}, {"check_every": 0}, {"rho": 0}, {"rho": float("nan")}, {"rho_max": -1},
    {"percdamp": 1.0}, {"pcg_steps": True}, {"pcg_rtol": -1e-3}, {"scope": "column"}, {"precision": "half"},
    {"compare_sparsegpt": "yes"},
])
def test_bad_options(options):
    with pytest.raises(RecipeError):
        build_method("alps", options)


def test_every_wrong_option_value_is_a_recipe_error():
    """As tests/unit/test_config.py does for the other methods: every wrongly typed value of every
    option is a one-line recipe error, never a crash."""
    from prune_cli.methods.alps import ALPS
    from tests.unit.test_config import WRONG_VALUES, _resolve_only_bad_input

    for field in [f.name for f in dataclasses.fields(ALPS)] + ["nope"]:
        for value in WRONG_VALUES:
            _resolve_only_bad_input({"version": 1, "method": "alps", "sparsity": 0.5,
                                     "method_options": {field: copy.deepcopy(value)}})


# ------------------------------------------------------------------ against slow references


def reference_alps(w: torch.Tensor, xtx: torch.Tensor, tokens: int, pattern, max_iter: int, rho: float = 0.1, switch_iter: int = 30,
                   percdamp: float = 0.01):
    """The paper's ADMM written out plainly in float64 (no eigendecomposition: a linear solve
    with ``G + rho I`` at every step; projection by a full argsort of the layer or of each group),
    with its rho schedule; returns ``P(B) / s`` (no refinement), the iterations run, the final
    rho, the restarts and which schedule branches ran. ``xtx``: the statistics' ``X^T X``
    (summed in float32, so both sides start from the same numbers)."""
    G = xtx.double() * (2.0 / tokens)
    G = G + percdamp * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    s = G.diagonal().sqrt()
    Gn = G / s[:, None] / s[None, :]
    B0 = w.double() * s
    C = B0 @ Gn

    def proj(z):
        keep = torch.zeros_like(z, dtype=torch.bool)
        if isinstance(pattern, NM):
            groups = z.abs().reshape(z.shape[0], -1, pattern.m)
            top = torch.argsort(groups, dim=2, descending=True)[..., : pattern.n_keep]
            keep.view(z.shape[0], -1, pattern.m).scatter_(2, top, True)
        else:
            n_keep = z.numel() - int(z.numel() * pattern.sparsity)
            keep.view(-1)[torch.argsort(z.abs().reshape(-1), descending=True)[:n_keep]] = True
        return keep

    keep0 = proj(B0)
    D0 = B0 * keep0
    B, D, V, last, kept = B0.clone(), D0.clone(), torch.zeros_like(B0), keep0, int(keep0.sum())
    raised, restarts, branches, it = False, 0, set(), 0
    eye = torch.eye(Gn.shape[0], dtype=Gn.dtype)
    for it in range(1, max_iter + 1):
        B = torch.linalg.solve(Gn + rho * eye, (C - V + rho * D).T).T
        keep = proj(B + V / rho)
        D = (B + V / rho) * keep
        V = V + rho * (B - D)
        if it % 3 == 0:
            flipped = int((keep != last).sum())
            last = keep
            if flipped / kept > 0.1:
                rho, raised = rho * 1.3, True
                branches.add("x1.3")
            elif flipped / kept > 0.005:
                rho, raised = rho * 1.2, True
                branches.add("x1.2")
            elif flipped > 0 and raised:
                rho *= 1.1
                branches.add("x1.1")
            elif flipped > 0:
                rho /= 5
                B, D, V = B0.clone(), D0.clone(), torch.zeros_like(B0)
                restarts += 1
                branches.add("restart")
            elif raised:
                branches.add("stop: support fixed")
                break
            else:
                rho /= 5
                branches.add("/5")
            rho = min(rho, 1e6)
            if it > switch_iter and flipped / kept < 3e-4:
                branches.add("stop: small change")
                break
    return (B * proj(B)) / s, it, rho, restarts, branches


# (seed, (out, in, tokens), correlated inputs, initial rho, switch_iter): chosen so that every
# branch of the schedule runs in some case
ADMM_CASES = [
    (0, (6, 8, 12), True, 0.1, 30),
    (1, (4, 16, 200), True, 0.1, 30),
    (0, (16, 64, 400), False, 0.1, 30),
    (0, (16, 64, 400), False, 10.0, 30),
    (1, (16, 64, 400), True, 10.0, 0),
]


def test_admm_iterates_equal_the_plain_loop():
    """After 1, 4 and 10 iterations, and run to its stopping rule, the ADMM state
    (projected, unnormalised, no refinement) equals the plain float64 loop's: mask, weights,
    iteration count, rho and restarts. Over the cases every branch of the schedule runs."""
    seen = set()
    for pattern in (Unstructured(0.5), NM(2, 4)):
        for seed, (out_f, in_f, tokens), correlated, rho, switch_iter in ADMM_CASES:
            w, x, stats = layer(seed=seed, out_f=out_f, in_f=in_f, tokens=tokens, correlated=correlated)
            for max_iter in (1, 4, 10, 300):
                options = {"max_iter": max_iter, "rho": rho, "switch_iter": switch_iter, "pcg_steps": 0,
                           "precision": "float64"}
                res = build_method("alps", options).prune(w.double(), stats, pattern)
                ref, iterations, ref_rho, restarts, branches = reference_alps(w, stats.xtx, tokens, pattern, max_iter, rho, switch_iter)
                seen |= branches
                assert res.info["iterations"] == iterations and res.info["restarts"] == restarts
                assert res.info["rho"] == pytest.approx(ref_rho, rel=1e-12)
                assert torch.equal(res.mask, ref != 0)
                torch.testing.assert_close(res.weight, ref, rtol=1e-9, atol=1e-11)
    assert seen == {"x1.3", "x1.2", "x1.1", "restart", "/5", "stop: support fixed", "stop: small change"}, seen


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_refinement_equals_least_squares_on_the_support(pattern):
    """With enough conjugate-gradient steps the weights on the final support are the dense
    least-squares solution of the damped layer problem restricted to each row's support:
    ``min ||A (What_i - W_i)||`` over the support, ``A = [R; sqrt(lambda) I]`` with ``R^T R = H``
    (``H = 2/n X^T X`` from the statistics, ``lambda`` = 1% of its mean diagonal)."""
    w, x, stats = layer(seed=2, out_f=8, in_f=24, tokens=300)
    res = build_method("alps", {"pcg_steps": 24, "pcg_rtol": 0.0, "precision": "float64"}).prune(w.double(), stats, pattern)
    H = stats.xtx.double() * (2.0 / x.shape[0])
    lam = 0.01 * H.diagonal().mean()
    x_aug = torch.cat([torch.linalg.cholesky(H).T, lam.sqrt() * torch.eye(24, dtype=torch.float64)])
    for i in range(8):
        support = res.mask[i]
        y = x_aug @ w[i].double()
        solution = torch.linalg.lstsq(x_aug[:, support], y.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(res.weight[i, support], solution, rtol=1e-7, atol=1e-9)
    assert res.info["pcg_steps"] <= 24


@pytest.mark.parametrize("correlated", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_layer_error_never_worse_than_sparsegpt(pattern, seed, correlated):
    w, x, stats = layer(seed=seed, correlated=correlated)
    alps = build_method("alps").prune(w, stats, pattern)
    sparsegpt = build_method("sparsegpt").prune(w, stats, pattern)
    assert recon_error(w, alps.weight, x) <= recon_error(w, sparsegpt.weight, x)


@pytest.mark.parametrize("pcg_steps", [0, 10])
def test_diagnostics(pcg_steps):
    """The layer errors reported (from the CG's residuals, no extra product) are the direct
    ``||(W - What) X^T||^2 / ||W X^T||^2`` before and after the refinement; the refinement never
    hurts, and with 0 steps (the default) the two are the same."""
    w, x, stats = layer(seed=1)
    res = build_method("alps", {"compare_sparsegpt": True, "pcg_steps": pcg_steps}).prune(w, stats, Unstructured(0.7))
    info = res.info
    assert info["iterations"] >= 3 and info["rho"] > 0 and 0 <= info["pcg_steps"] <= pcg_steps
    dense = float((w @ x.T).pow(2).sum())
    assert info["objective"] == pytest.approx(recon_error(w, res.weight, x) / dense, rel=1e-3)
    assert info["objective"] <= info["objective_admm"]  # the refinement never hurts
    if pcg_steps:
        assert info["pcg_steps"] >= 1 and info["objective"] < info["objective_admm"]
    else:
        assert info["objective"] == info["objective_admm"]
    sparsegpt = build_method("sparsegpt").prune(w, stats, Unstructured(0.7))
    assert info["objective_sparsegpt"] == pytest.approx(recon_error(w, sparsegpt.weight, x) / dense, rel=1e-3)
    assert info["vs_sparsegpt"] == pytest.approx(info["objective"] / info["objective_sparsegpt"])
    json.dumps(info, allow_nan=False)


def test_as_dsnot_base():
    w, _, stats = layer()
    base = build_method("alps").prune(w, stats, Unstructured(0.5))
    res = build_method("dsnot", {"base": "alps", "max_cycles": 5}).prune(w, stats, Unstructured(0.5))
    untouched = base.mask & res.mask
    assert torch.equal(res.weight[untouched], base.weight[untouched])  # ALPS's updated weights kept
    assert res.info == {"base": base.info}


# ------------------------------------------------------------------ from the command line

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]
FAST = ["--calib-samples", "2", "--seqlen", "16", "--no-eval", "--device", "cpu"]


def compress(tmp_path, tiny_llama_dir, *args) -> dict:
    window_args = SMALL if args[1] == "alps" and "--sparsity" in args and "--layerwise" not in args else FAST
    result = runner.invoke(app, ["compress", str(tiny_llama_dir), *args, *window_args, "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("args", [
    ["--method", "alps", "--sparsity", "0.5"],
    ["--method", "alps", "--pattern", "2:4"],
    ["--method", "dsnot", "--base", "alps", "--sparsity", "0.5"],
    ["--method", "alps", "--sparsity", "0.6", "--layerwise", "owl", "--owl-m", "3", "--owl-lambda", "0.1"],
])
def test_compress(tmp_path, tiny_llama_dir, args):
    report = compress(tmp_path, tiny_llama_dir, *args)
    assert report["layers"]
    if "--pattern" not in args and args[1] == "alps" and "--layerwise" not in args:  # the one run that evaluates
        assert 0 < report["ppl"]["compressed"] < 10 * report["ppl"]["dense"]
    for layer_report in report["layers"]:
        info = layer_report["diagnostics"]
        info = info["base"] if args[1] == "dsnot" else info
        assert info["iterations"] >= 1 and info["objective"] >= 0
        if "--pattern" not in args:  # the whole layer at its (OWL: own) sparsity, exactly
            numel = layer_report["shape"][0] * layer_report["shape"][1]
            assert abs(layer_report["achieved_sparsity"] - layer_report["target_sparsity"]) <= 1 / numel + 1e-6
    if "--layerwise" in args:
        assert len({r["target_sparsity"] for r in report["layers"]}) > 1


@pytest.mark.slow  # three compress runs; ALPS has no randomness and a fixed schedule
def test_a_stopped_run_resumes_to_the_same_checkpoint(tmp_path, tiny_llama_dir, monkeypatch):
    from tests.cli.test_resume import assert_same_checkpoint, stop_at_block

    args = ["--method", "alps", "--sparsity", "0.5", *SMALL]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert runner.invoke(app, ["compress", str(tiny_llama_dir), *args, "-o", str(reference)]).exit_code == 0
    with monkeypatch.context() as m:
        stop_at_block(m, 2)
        stopped = runner.invoke(app, ["compress", str(tiny_llama_dir), *args, "-o", str(out), "--checkpoint-interval", "0"])
    assert stopped.exit_code == 130, stopped.output
    resumed = runner.invoke(app, ["compress", str(tiny_llama_dir), *args, "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_checkpoint(out, reference)  # weights bit for bit, and the layers' diagnostics
