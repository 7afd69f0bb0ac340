"""The CuPy backend's host code on CPU, with every kernel emulated (tests/gpu/fake_cupy.py).

This runs the real ``CupyBackend`` methods (dtype dispatch, launch geometry, argument lists,
scratch buffers, fallbacks) against Python emulations of the kernels, and checks each launch
against the kernel's PTX signature when NVRTC is installed. What it cannot check (the CUDA
code itself) is covered by test_kernel_model.py on CPU and test_cupy_parity.py on a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

import prune_cli.gpu
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.selection import select
from prune_cli.gpu.torch_backend import TorchBackend
from tests.gpu import dsnot_cases as dc
from tests.gpu.fake_cupy import FakeTorchStream, make_fake_cupy

REF = TorchBackend()


@pytest.fixture
def emulated(monkeypatch):
    log: list[str] = []
    monkeypatch.delitem(sys.modules, "prune_cli.gpu.cupy_backend", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy(log))
    from prune_cli.gpu import cupy_backend

    backend = cupy_backend.CupyBackend(0)
    backend.device = torch.device("cpu")  # tensors stay on the CPU; kernels are emulated
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeTorchStream())
    yield backend, log
    sys.modules.pop("prune_cli.gpu.cupy_backend", None)
    if hasattr(prune_cli.gpu, "cupy_backend"):
        delattr(prune_cli.gpu, "cupy_backend")


@pytest.mark.parametrize("dtype,suffix", [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")])
@pytest.mark.parametrize("shape,vec", [((3, 5), False), ((37, 1000), True), ((300, 2048), True), ((4, 3, 130), False)])
def test_input_stats(emulated, dtype, suffix, shape, vec):
    backend, log = emulated
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    for want in ((True, True), (False, True), (True, False)):
        log.clear()
        got = backend.input_stats(x, *want)
        ref = REF.input_stats(x, *want)
        for a, b in zip(got, ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        width = {"f32": 4, "bf16": 8, "f16": 8}[suffix] if vec else 1
        assert log[0] == f"stats_partial_{suffix}_v{width}"
    assert backend.input_stats(torch.empty(0, 7, dtype=dtype))[1].tolist() == [0.0] * 7
    assert backend.input_stats(x, False, False) == (None, None)


@pytest.mark.parametrize("width", [1, 7, 513, 1000])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_select_rows(emulated, width, sparsity):
    backend, log = emulated
    score = torch.randint(0, 4, (3, width)).float()
    for s in (score, score.to(torch.bfloat16)):
        got = backend.select_mask(s, Unstructured(sparsity))
        assert got.dtype == torch.bool and torch.equal(got, select(s, Unstructured(sparsity)))
    assert log == ([] if int(width * sparsity) == 0 else ["select_rows_score"] * 2)


def test_select_rows_too_wide_for_shared_memory(emulated):
    backend, _ = emulated
    score = torch.randint(0, 50, (2, 70_000)).float()
    assert torch.equal(backend.select_mask(score, Unstructured(0.5)), select(score, Unstructured(0.5)))


@pytest.mark.parametrize("n_keep,m", [(2, 4), (1, 3), (4, 8), (1, 32), (1, 1)])
def test_select_nm(emulated, n_keep, m):
    backend, log = emulated
    score = torch.randint(0, 3, (3, m * 37)).float()
    assert torch.equal(backend.select_mask(score, NM(n_keep, m)), select(score, NM(n_keep, m)))
    assert log == ([] if n_keep == m else ["select_nm_score"])


def test_select_fallbacks_launch_nothing(emulated):
    backend, log = emulated
    score = torch.randint(0, 3, (4, 64)).float()
    assert torch.equal(backend.select_mask(score, Unstructured(0.5), "matrix"), select(score, Unstructured(0.5), "matrix"))
    assert torch.equal(backend.select_mask(score.double(), Unstructured(0.5)), select(score.double(), Unstructured(0.5)))
    assert log == []


@pytest.mark.parametrize("dtype,suffix", [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16"),
                                          (torch.float64, "f32")])
@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_wanda_mask(emulated, dtype, suffix, pattern):
    backend, log = emulated
    weight = (torch.randint(-3, 4, (5, 96)).float() * 0.125).to(dtype)
    norm = torch.randint(0, 3, (96,)).float()
    norm[:4] = 1e-10
    assert torch.equal(backend.wanda_mask(weight, norm, pattern), REF.wanda_mask(weight, norm, pattern))
    kind = "rows" if isinstance(pattern, Unstructured) else "nm"
    assert log == [f"select_{kind}_wanda_{suffix}"]


def _keeps(in_features):
    mask = torch.rand(in_features) < 0.5
    idx = mask.nonzero().squeeze(1)
    return {"bool": mask, "uint8": mask.to(torch.uint8), "int64": idx, "int32": idx.int(),
            "none": torch.zeros(in_features, dtype=torch.bool)}


@pytest.mark.parametrize("dtype,x_dtype,suffix", [(torch.float32, torch.float32, "f32_f32"),
                                                  (torch.bfloat16, torch.bfloat16, "bf16_bf16"),
                                                  (torch.bfloat16, torch.float32, "bf16_f32"),
                                                  (torch.float16, torch.float64, "f16_f32")])
@pytest.mark.parametrize("shape", [(1, 1), (97, 61), (300, 1024)])
def test_sparse_gemv(emulated, dtype, x_dtype, suffix, shape):
    backend, log = emulated
    weight_t = torch.randn(shape).to(dtype)
    x = torch.randn(shape[0]).to(x_dtype)
    for name, keep in _keeps(shape[0]).items():
        log.clear()
        y = backend.sparse_gemv(x, weight_t, keep)
        assert y.dtype == dtype and y.shape == (shape[1],), name
        torch.testing.assert_close(y.float(), REF.sparse_gemv(x, weight_t, keep).float(), rtol=2e-2, atol=2e-2)
        assert log[-1] == f"gemv_reduce_{suffix.split('_')[0]}", name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 7, 1100])
def test_rsparse_gemv(emulated, dtype, rank):
    backend, log = emulated
    in_features, out_features = 97, 64
    weight_t = torch.randn(in_features, out_features).to(dtype)
    u = (torch.randn(out_features, rank) / rank**0.5).to(dtype)
    sv = (torch.randn(rank, in_features) / in_features**0.5).to(dtype)
    x = torch.randn(in_features).to(dtype)
    for name, keep in _keeps(in_features).items():
        log.clear()
        y = backend.rsparse_gemv(x, weight_t, keep, u, sv)
        ref = REF.rsparse_gemv(x, weight_t, keep, u, sv)
        torch.testing.assert_close(y.float(), ref.float(), rtol=3e-2, atol=3e-2)
        if rank <= 1024:
            assert any(k.startswith("lowrank_z_") for k in log), name
        else:
            assert log == [], name  # above the kernel's rank limit: the torch path


def test_gemv_rejects_strided_weights_and_foreign_devices(emulated):
    backend, _ = emulated
    weight_t = torch.randn(8, 4).t().contiguous().t()
    with pytest.raises(ValueError, match="contiguous"):
        backend.sparse_gemv(torch.randn(8), weight_t, torch.ones(8, dtype=torch.bool))
    backend.device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="got a tensor on cpu"):
        backend.sparse_gemv(torch.randn(8), torch.randn(8, 4), torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("case", ["unstructured", "unstructured-exhausting", "2:4", "3:4-exhausting"])
@pytest.mark.parametrize("mode", ["guarded", "reference"])
def test_dsnot_swap(emulated, case, mode):
    """DSnoT.prune_group through CupyBackend.dsnot_swap (argument lists checked against the PTX
    signature) gives the torch loop's weights and masks exactly; a direct call also updates e
    and G d as the torch loop does."""
    backend, log = emulated
    pattern, width = dc.CASES[case]
    dsnot = dc.method(mode, 0.0 if "exhausting" in case else 0.1, sign_check="off" if "exhausting" in case else "auto")
    job_list = dc.jobs(pattern, width, seed=2)
    want = dsnot.prune_group(job_list)
    log.clear()
    got = dsnot.prune_group(job_list, backend)
    kernel = "dsnot_swap_nm" if isinstance(pattern, NM) else "dsnot_swap_unstructured"
    assert log.count(kernel) == 1
    for a, b in zip(got, want):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight.view(torch.int32), b.weight.view(torch.int32))

    rows, state, lists, m = dc.swap_state(dsnot, job_list)
    dc.run_torch_loop(dsnot, rows, state, lists, m)
    ref = dc.outputs(rows, state)
    rows, state, lists, m = dc.swap_state(dsnot, job_list)
    dsnot._swap_kernel(backend.dsnot_swap, state, rows, lists, m)
    dc.assert_bit_identical(dc.outputs(rows, state), ref)


def test_dsnot_swap_copies_back_non_contiguous_outputs(emulated):
    backend, _ = emulated
    dsnot = dc.method("guarded")
    rows, state, lists, m = dc.swap_state(dsnot, dc.jobs(Unstructured(0.6), 37))
    dc.run_torch_loop(dsnot, rows, state, lists, m)
    ref = dc.outputs(rows, state)
    rows, state, lists, m = dc.swap_state(dsnot, dc.jobs(Unstructured(0.6), 37))
    rows.What = rows.What.t().contiguous().t()  # same values, column-major
    rows.keep = rows.keep.to(torch.uint8)
    dsnot._swap_kernel(backend.dsnot_swap, state, rows, lists, m)
    assert not rows.What.is_contiguous()
    out = dc.outputs(rows, state)
    out["keep"] = out["keep"].bool()
    dc.assert_bit_identical(out, ref)
    with pytest.raises(ValueError, match="prune_lists"):
        backend.dsnot_swap(rows.W, rows.What, rows.keep, state.regrow_metric, state.prune_metric, state.err,
                           state.grow_hi, state.grow_lo, state.n_grow, max_cycles=5, update_threshold=0.1,
                           guarded=False, check_sign=True)


# ------------------------------------------------------------------ activation threshold
def _same_float(a: float, b: float) -> bool:
    a32, b32 = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return bool(a32.isnan() and b32.isnan()) or a32.view(torch.int32) == b32.view(torch.int32)


def threshold_launches(suffix: str) -> list[str]:
    """The launches of one activation_threshold call: (histogram, pick) per radix pass."""
    return [f"threshold_hist_{suffix}", "threshold_pick"] * 3


@pytest.mark.parametrize("dtype,suffix", [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 1024), (300, 77), (2, 5, 96)])
def test_activation_threshold(emulated, dtype, suffix, scaled, shape):
    """CupyBackend.activation_threshold (argument lists checked against the PTX, 3 x (histogram,
    pick) launches, the key decoded on the host) equals the torch reference bit for bit."""
    backend, log = emulated
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randint(-4, 5, shape, generator=g).float() * 0.5 + (torch.rand(shape, generator=g) < 0.5) * 0.125)
    x = x.to(dtype)
    scale = None
    if scaled:
        scale = torch.rand(shape[-1], generator=g) * 3
        scale[::5] = 0.0
    numel = x.numel()
    for k in sorted({1, numel, max(1, numel // 2), max(1, numel // 3)}):
        log.clear()
        got = backend.activation_threshold(x, scale, k)
        want = REF.activation_threshold(x, scale, k)
        assert isinstance(got, float) and _same_float(got, want), (k, got, want)
        assert log == threshold_launches(suffix)


def test_activation_threshold_layouts_and_special_values(emulated):
    backend, log = emulated
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan"), 1e-45, 3.5])
    base = pool[torch.randint(0, len(pool), (65, 130), generator=torch.Generator().manual_seed(1))]
    scale = torch.rand(129) + 0.5
    scale[7] = float("inf")
    for x in (base[:, 1:], base.t().contiguous().t()[:, :129], base.view(-1)[1:1 + 64 * 129].view(64, 129)):
        for s in (None, scale):
            for k in (1, 100, x.numel() // 2, x.numel() - 3, x.numel()):
                assert _same_float(backend.activation_threshold(x, s, k), REF.activation_threshold(x, s, k)), k
    assert log and all(name.startswith("threshold_") for name in log)


def test_activation_threshold_fallbacks_and_errors(emulated):
    backend, log = emulated
    x = torch.randn(20, 33)
    scale = torch.rand(33)
    for args in ((x.double(), scale), (x, scale.double()), (x.double(), None)):
        assert _same_float(backend.activation_threshold(*args, 100), REF.activation_threshold(*args, 100))
    assert log == []  # float64 goes to the torch reference
    for k in (0, -1, x.numel() + 1):
        with pytest.raises(ValueError, match="outside"):
            backend.activation_threshold(x, scale, k)
    with pytest.raises(ValueError, match="outside"):
        backend.activation_threshold(torch.empty(0, 33), None, 1)
    with pytest.raises(TypeError):
        backend.activation_threshold(x, None, 3.0)
    assert log == []


def test_key_to_float_inverts_the_order_key(emulated):
    from prune_cli.gpu.cupy_backend import key_to_float
    from tests.gpu import kernel_model as km

    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3e38, -3e38, float("inf"), float("-inf"), 0.1])
    keys = km.order_key(values.numpy())
    back = torch.tensor([key_to_float(int(k)) for k in keys])
    assert torch.equal(back.view(torch.int32)[2:], values.view(torch.int32)[2:])
    assert back.view(torch.int32)[:2].tolist() == [0, 0]  # -0 shares +0's key and comes back as +0
    assert torch.isnan(torch.tensor(key_to_float(0xFFFFFFFF)))


@pytest.mark.parametrize("name,options", [("teal", {}), ("wina", {}), ("wina", {"variant": "released"})])
def test_activation_fit_uses_the_kernel(emulated, name, options):
    """TEAL / WINA fit with the (emulated) CuPy backend: the threshold comes from the kernels and
    equals the torch path's; R-Sparse keeps its sort (no kernel launch)."""
    from torch import nn

    from prune_cli.activation import build_activation_method

    backend, log = emulated
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(300, 64) * torch.rand(64) * 3
    method = build_activation_method(name, options)
    cache = {"local": "self_attn.o_proj", "linears": {"self_attn.o_proj": lin}}
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        log.clear()
        got = method.fit(lin, x, sparsity, cache, backend=backend)
        want = method.fit(lin, x, sparsity, cache)
        assert got.threshold == want.threshold
        assert log == ([] if sparsity == 0 else threshold_launches("f32")), sparsity
    log.clear()
    build_activation_method("rsparse").fit(lin, x, 0.5, backend=backend)
    assert log == []


@pytest.mark.parametrize(
    "overrides,launched",
    [
        ({"method": "wanda", "sparsity": 0.5}, {"stats_partial_f32_v4", "select_rows_wanda_f32"}),
        ({"method": "wanda", "pattern": "2:4"}, {"stats_partial_f32_v4", "select_nm_wanda_f32"}),
        ({"method": "magnitude", "sparsity": 0.5}, {"select_rows_score"}),
        ({"method": "dsnot", "sparsity": 0.6, "method_options": {"base": "wanda"}}, {"select_rows_wanda_f32", "dsnot_swap_unstructured"}),
        ({"method": "dsnot", "pattern": "2:4", "method_options": {"base": "wanda"}}, {"select_nm_wanda_f32", "dsnot_swap_nm"}),
        ({"method": "teal", "sparsity": 0.5}, {"threshold_hist_f32", "threshold_pick"}),
    ],
)
def test_whole_compress_with_the_emulated_backend(emulated, monkeypatch, tiny_llama_dir, tmp_path, overrides, launched):
    """compress() end to end, once with the (emulated) CuPy backend and once with torch: the
    exported checkpoints (or activation thresholds) are the same, and the cupy run went through
    the kernels. The emulated statistics add in the kernel's chunk order, not torch's, so a
    score tied with the cut-off within rounding may differ; on this model none does."""
    from safetensors.torch import load_file

    from prune_cli.recipe.config import resolve
    from prune_cli.run import pipeline
    from prune_cli.run.pipeline import CompressRequest, compress

    backend, log = emulated
    real_resolve = pipeline.resolve_backend
    monkeypatch.setattr(
        pipeline, "resolve_backend",  # where compress() resolves its backend
        lambda name, device: (backend, None) if name == "cupy" else real_resolve(name, device),
    )
    reports, weights = {}, {}
    for name in ("cupy", "torch"):
        log.clear()
        config = resolve(None, {**overrides, "backend": name, "calibration": {"samples": 4, "seqlen": 64},
                                "evaluation": {"windows": 2, "seqlen": 64}})
        out = tmp_path / name
        reports[name] = compress(CompressRequest(config, str(tiny_llama_dir), out))
        weights[name] = load_file(str(out / "model.safetensors"))
        if name == "cupy":
            assert launched <= set(log), set(log)
    assert reports["cupy"]["backend"] == "cupy" and reports["torch"]["backend"] == "torch"
    assert reports["cupy"]["ppl"] == reports["torch"]["ppl"]
    if reports["torch"]["activation"]:
        thresholds = {k: [layer["threshold"] for layer in r["activation"]["layers"]] for k, r in reports.items()}
        assert thresholds["cupy"] == thresholds["torch"]
    assert weights["cupy"].keys() == weights["torch"].keys()
    for key, w in weights["torch"].items():
        assert torch.equal(weights["cupy"][key], w), key
