"""Parity of every CuPy kernel with the torch backend on the same GPU (marked ``gpu``).

Masks must be equal bit for bit (also to the CPU ``select``); statistics and GEMVs within float
tolerance of a float64 reference. Inputs carry deliberate ties and edge values, and shapes are
not multiples of the block sizes. Skipped cleanly without CUDA; without CuPy on a CUDA machine
they skip with the install hint, while a kernel that fails to compile fails.
"""

from __future__ import annotations

import pytest
import torch

from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.selection import select
from tests.gpu import dsnot_cases as dc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def cupy_backend():
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"CuPy is not installed (pip install 'prune-cli[gpu]'): {exc}")
    from prune_cli.gpu.backend import resolve_backend

    backend, _ = resolve_backend("cupy", DEV)  # a compile error fails here, loudly
    return backend


@pytest.fixture(scope="module")
def torch_backend():
    from prune_cli.gpu.torch_backend import TorchBackend

    return TorchBackend()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def special_scores(shape, seed):
    pool = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-40, 3.5, 0.25],
        device=DEV,
    )
    return pool[torch.randint(0, len(pool), shape, generator=gen(seed), device=DEV)]


def score_cases(out_features, in_features, seed):
    g = gen(seed)
    yield "ties", torch.randint(0, 5, (out_features, in_features), generator=g, device=DEV).float() * 0.5
    yield "randn", torch.randn(out_features, in_features, generator=g, device=DEV)
    yield "special", special_scores((out_features, in_features), seed)
    yield "constant", torch.full((out_features, in_features), 3.0, device=DEV)


WIDTHS = [1, 7, 511, 512, 513, 1000, 4097, 11008]


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 1000), (1000, 4097), (4099, 768), (2, 3, 130), (20000, 64)])
def test_input_stats(cupy_backend, torch_backend, dtype, shape):
    x = (torch.randn(shape, generator=gen(1), device=DEV) * 2 + 0.5).to(dtype)
    for want_sum, want_sq in ((True, True), (False, True), (True, False)):
        got = cupy_backend.input_stats(x, want_sum, want_sq)
        ref = torch_backend.input_stats(x, want_sum, want_sq)
        x64 = x.double().reshape(-1, shape[-1])
        exact = (x64.sum(0), x64.square().sum(0))
        scale = (x64.abs().sum(0), x64.square().sum(0))
        for a, b, e, s, wanted in zip(got, ref, exact, scale, (want_sum, want_sq)):
            if not wanted:
                assert a is None and b is None
                continue
            assert a.dtype == torch.float32 and a.shape == (shape[-1],) and a.device == DEV
            assert ((a.double() - e).abs() <= 2e-5 * s + 1e-30).all()
            assert ((b.double() - e).abs() <= 2e-5 * s + 1e-30).all()


def test_input_stats_odd_layouts_and_determinism(cupy_backend):
    base = torch.randn(3001, 1025, generator=gen(2), device=DEV)
    misaligned = base.view(-1)[1 : 1 + 1500 * 2048].view(1500, 2048)  # 4-byte offset: scalar loads
    for x in (base[:, 1:], base.t()[:700], misaligned):
        ref = x.double().square().sum(0)
        _, sq = cupy_backend.input_stats(x)
        assert ((sq.double() - ref).abs() <= 2e-5 * ref + 1e-30).all()
    a = cupy_backend.input_stats(base, True, True)
    b = cupy_backend.input_stats(base, True, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_select_rows_bit_identical(cupy_backend, torch_backend, width, sparsity):
    pattern = Unstructured(sparsity)
    for name, score in score_cases(5, width, width):
        got = cupy_backend.select_mask(score, pattern)
        assert got.dtype == torch.bool and got.shape == score.shape
        assert torch.equal(got, torch_backend.select_mask(score, pattern)), name
        assert torch.equal(got.cpu(), select(score.cpu(), pattern)), name


def test_select_rows_wider_than_shared_memory(cupy_backend):
    # 70,000 fp32 keys = 280 KB: more than any block's shared memory -> the global-memory path
    for name, score in score_cases(3, 70_000, 5):
        for sparsity in (0.5, 0.01):
            got = cupy_backend.select_mask(score, Unstructured(sparsity))
            assert torch.equal(got.cpu(), select(score.cpu(), Unstructured(sparsity))), name


@pytest.mark.parametrize("n_keep,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 3), (5, 7), (16, 32), (1, 32), (31, 32), (1, 1)])
def test_select_nm_bit_identical(cupy_backend, n_keep, m):
    pattern = NM(n_keep, m)
    for in_features in (m, m * 37, m * 257):
        for name, score in score_cases(6, in_features, in_features + m):
            got = cupy_backend.select_mask(score, pattern)
            assert torch.equal(got.cpu(), select(score.cpu(), pattern)), (name, in_features)


def test_select_other_inputs(cupy_backend):
    score = torch.randint(0, 3, (9, 1000), generator=gen(3), device=DEV).float()
    for s in (score.to(torch.bfloat16), score.to(torch.float16), score.double(), score.t().contiguous().t()):
        assert torch.equal(cupy_backend.select_mask(s, Unstructured(0.5)).cpu(), select(s.cpu(), Unstructured(0.5)))
    for scope in ("matrix",):  # delegated to torch: same answer by construction
        assert torch.equal(cupy_backend.select_mask(score, Unstructured(0.3), scope).cpu(),
                           select(score.cpu(), Unstructured(0.3), scope))
    empty = torch.empty(0, 8, device=DEV)
    assert cupy_backend.select_mask(empty, Unstructured(0.5)).shape == (0, 8)


def wanda_inputs(out_features, in_features, dtype, seed):
    g = gen(seed)
    weight = (torch.randint(-3, 4, (out_features, in_features), generator=g, device=DEV).float() * 0.125).to(dtype)
    norm = torch.randint(0, 3, (in_features,), generator=g, device=DEV).float()
    if in_features > 12:
        norm[:5] = 1e-10  # with tiny weights: subnormal fp32 products must not be flushed
        norm[5] = float("inf")  # inf * 0 = NaN: sorted last, as torch.sort does
        if dtype == torch.float32:
            weight[:, :5] = 1e-30 * torch.sign(torch.randn(out_features, 5, generator=g, device=DEV))
    return weight, norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8), NM(1, 32)])
def test_wanda_mask_bit_identical(cupy_backend, torch_backend, dtype, pattern):
    for width in (32, 1024, 4096 + 32, 11008):
        weight, norm = wanda_inputs(7, width, dtype, width)
        got = cupy_backend.wanda_mask(weight, norm, pattern)
        want = select(weight.abs().float().cpu() * norm.cpu().unsqueeze(0), pattern)
        assert torch.equal(got.cpu(), want), width
        assert torch.equal(got, torch_backend.wanda_mask(weight, norm, pattern)), width


# ------------------------------------------------------------------ GEMV
UNIT = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def gemv_check(y, x, weight_t, mask, u=None, sv=None):
    m = mask.double()
    ref = (x.double() * m) @ weight_t.double()
    mag = (x.double().abs() * m) @ weight_t.double().abs()
    if u is not None:
        ref = ref + u.double() @ (sv.double() @ (x.double() * (1 - m)))
        mag = mag + u.double().abs() @ (sv.double().abs() @ (x.double().abs() * (1 - m)))
    # fp32 accumulation + one rounding (the kernels) stays far inside this; the torch path in
    # 16-bit rounds intermediate products too, hence the magnitude term for 16-bit types
    unit = UNIT[weight_t.dtype]
    tol = 2 * unit * ref.abs() + max(2e-6, unit / 2) * mag + 1e-30
    bad = (y.double() - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {y.numel()} outputs off"


def keep_variants(in_features, seed, density=0.5):
    mask = torch.rand(in_features, generator=gen(seed), device=DEV) < density
    idx = mask.nonzero().squeeze(1)
    return mask, {"bool": mask, "uint8": mask.to(torch.uint8), "int64": idx, "int32": idx.int()}


GEMV_SHAPES = [(1, 1), (5, 3), (1000, 1001), (777, 4099), (4096, 4096), (4096, 11008), (11008, 4096)]


@pytest.mark.parametrize("dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", GEMV_SHAPES)
def test_sparse_gemv(cupy_backend, torch_backend, dtype, x_dtype, shape):
    in_features, out_features = shape
    weight_t = torch.randn(shape, generator=gen(4), device=DEV).to(dtype)
    x = torch.randn(in_features, generator=gen(5), device=DEV).to(x_dtype)
    mask, variants = keep_variants(in_features, 6)
    for name, keep in variants.items():
        y = cupy_backend.sparse_gemv(x, weight_t, keep)
        assert y.dtype == dtype and y.shape == (out_features,), name
        gemv_check(y, x, weight_t, mask)
        gemv_check(torch_backend.sparse_gemv(x, weight_t, keep), x, weight_t, mask)


def test_sparse_gemv_edges(cupy_backend):
    in_features, out_features = 513, 1003  # out not a multiple of the vector width -> scalar path
    weight_t = torch.randn(in_features, out_features, generator=gen(7), device=DEV).to(torch.bfloat16)
    x = torch.randn(in_features, generator=gen(8), device=DEV).to(torch.bfloat16)
    for density in (0.0, 0.01, 1.0):
        mask, variants = keep_variants(in_features, 9, density)
        for keep in variants.values():
            gemv_check(cupy_backend.sparse_gemv(x, weight_t, keep), x, weight_t, mask)
    # misaligned base address (storage offset of one element) -> scalar path
    flat = torch.randn(in_features * 1024 + 1, generator=gen(10), device=DEV).to(torch.bfloat16)
    shifted = flat[1:].view(in_features, 1024)
    mask, variants = keep_variants(in_features, 11)
    gemv_check(cupy_backend.sparse_gemv(x, shifted, variants["bool"]), x, shifted, mask)
    with pytest.raises(ValueError, match="contiguous"):
        cupy_backend.sparse_gemv(x, weight_t.t().contiguous().t(), mask)


@pytest.mark.parametrize("dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("rank", [1, 8, 64, 300, 1100])
def test_rsparse_gemv(cupy_backend, torch_backend, dtype, x_dtype, rank):
    for in_features, out_features in ((777, 1001), (4096, 4096)):
        weight_t = torch.randn(in_features, out_features, generator=gen(12), device=DEV).to(dtype)
        u = (torch.randn(out_features, rank, generator=gen(13), device=DEV) / rank**0.5).to(dtype)
        sv = (torch.randn(rank, in_features, generator=gen(14), device=DEV) / in_features**0.5).to(dtype)
        x = torch.randn(in_features, generator=gen(15), device=DEV).to(x_dtype)
        mask, variants = keep_variants(in_features, 16)
        for name, keep in variants.items():
            y = cupy_backend.rsparse_gemv(x, weight_t, keep, u, sv)
            assert y.dtype == dtype and y.shape == (out_features,), name
            gemv_check(y, x, weight_t, mask, u, sv)


# ------------------------------------------------------------------ streams
def test_kernels_run_on_torchs_current_stream(cupy_backend):
    """Work queued on a side stream is seen by the kernels without any synchronisation."""
    stream = torch.cuda.Stream(device=DEV)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        big = torch.randn(8192, 4096, device=DEV)
        x = big * 2.0  # still running on `stream` when the kernel is queued behind it
        _, sq = cupy_backend.input_stats(x)
        score = x[:64]
        keep = cupy_backend.select_mask(score, Unstructured(0.5))
    stream.synchronize()
    ref = x.double().square().sum(0)
    assert ((sq.double() - ref).abs() <= 2e-5 * ref + 1e-30).all()
    assert torch.equal(keep.cpu(), select(score.cpu(), Unstructured(0.5)))


# ------------------------------------------------------------------ DSnoT swap loop
@pytest.mark.parametrize("case", sorted(dc.CASES))
@pytest.mark.parametrize("mode", dc.MODES)
@pytest.mark.parametrize("threshold,sign_check", [(0.1, "auto"), (0.0, "off"), (0.0, "on")])
def test_dsnot_swap_bit_identical(cupy_backend, case, mode, threshold, sign_check):
    """dsnot.cu vs the torch loop on the same GPU: What, keep, e and G d equal bit for bit."""
    pattern, width = dc.CASES[case]
    dsnot = dc.method(mode, threshold, sign_check=sign_check)
    job_list = dc.jobs(pattern, width, device=DEV)
    rows, state, lists, m = dc.swap_state(dsnot, job_list)
    before = rows.keep.clone()
    dc.run_torch_loop(dsnot, rows, state, lists, m)
    want = dc.outputs(rows, state)
    rows, state, lists, m = dc.swap_state(dsnot, job_list)
    dsnot._swap_kernel(cupy_backend.dsnot_swap, state, rows, lists, m)
    dc.assert_bit_identical(dc.outputs(rows, state), want)
    if sign_check == "off":
        assert not torch.equal(want["keep"], before.cpu())


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)])
@pytest.mark.parametrize("mode", dc.MODES)
@pytest.mark.parametrize("width", [576, 1000])
def test_dsnot_swap_wide_rows(cupy_backend, pattern, mode, width):
    """Llama-like widths (and one that is no multiple of 32), random weights, through prune_group:
    the CuPy backend (kernel) and the torch loop give the same weights and masks."""
    g = gen(width)
    x = torch.randn(1024, width, generator=g, device=DEV) @ (torch.eye(width, device=DEV) + 0.05 * torch.randn(
        width, width, generator=g, device=DEV)) + torch.randn(width, generator=g, device=DEV)
    shared, own = dc.stats_of(x), dc.stats_of(x[::2] * 1.5)
    job_list = [(torch.randn(r, width, generator=g, device=DEV) * 0.02, s, pattern)
                for r, s in ((300, shared), (77, own), (129, shared))]
    dsnot = dc.method(mode)
    want = dsnot.prune_group(job_list)
    got = dsnot.prune_group(job_list, cupy_backend)
    for a, b in zip(got, want):
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.weight.view(torch.int32), b.weight.view(torch.int32))


# ------------------------------------------------------------------ activation threshold
def same_float(a: float, b: float) -> bool:
    a32, b32 = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return bool(a32.isnan() and b32.isnan()) or a32.view(torch.int32) == b32.view(torch.int32)


def activation_cases(shape, dtype, seed):
    g = gen(seed)
    yield "randn", (torch.randn(shape, generator=g, device=DEV) * 3).to(dtype)
    yield "ties", (torch.randint(-4, 5, shape, generator=g, device=DEV).float() * 0.5).to(dtype)
    sparse = torch.randn(shape, generator=g, device=DEV) * (torch.rand(shape, generator=g, device=DEV) < 0.3)
    yield "mostly zeros", sparse.to(dtype)
    yield "constant", torch.full(shape, -1.5, device=DEV).to(dtype)
    yield "special", special_scores(shape, seed).to(dtype)


def activation_scale(in_features, seed):
    scale = torch.rand(in_features, generator=gen(seed), device=DEV) * 4 + 0.1
    scale[::7] = 0.0  # dead columns
    scale[3::11] = 1e-38  # subnormal products: never flushed
    return scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 1000), (2048, 577), (4099, 768), (20000, 64)])
def test_activation_threshold_bit_identical(cupy_backend, torch_backend, dtype, scaled, shape):
    """threshold.cu vs kthvalue of |x| (* scale): the same float as the torch backend on the GPU
    and on the CPU, for k = 1, numel and in between."""
    scale = activation_scale(shape[1], shape[1]) if scaled else None
    for name, x in activation_cases(shape, dtype, sum(shape)):
        x_cpu, scale_cpu = x.cpu(), None if scale is None else scale.cpu()
        numel = x.numel()
        for k in sorted({1, numel, max(1, numel // 2), max(1, round(0.37 * numel)), max(1, numel - 1)}):
            got = cupy_backend.activation_threshold(x, scale, k)
            want = torch_backend.activation_threshold(x, scale, k)
            cpu = torch_backend.activation_threshold(x_cpu, scale_cpu, k)
            assert isinstance(got, float)
            assert same_float(got, want) and same_float(got, cpu), (name, k, got, want, cpu)


def test_activation_threshold_layouts_and_determinism(cupy_backend, torch_backend):
    base = torch.randn(3001, 1025, generator=gen(21), device=DEV)
    misaligned = base.view(-1)[1 : 1 + 1500 * 2048].view(1500, 2048)  # 4-byte offset: scalar loads
    scale = activation_scale(1024, 3)
    for x in (base[:, 1:], base.t()[:700, :1024], misaligned[:, :1024], misaligned.to(torch.bfloat16)[:, 1:1025]):
        for s in (None, scale):
            k = x.numel() // 3
            assert same_float(cupy_backend.activation_threshold(x, s, k), torch_backend.activation_threshold(x, s, k))
    big = (torch.randint(0, 50, (16384, 4096), generator=gen(22), device=DEV).float() * 0.01).to(torch.bfloat16)
    results = {cupy_backend.activation_threshold(big, None, 33_554_432) for _ in range(5)}
    assert len(results) == 1  # integer histograms: no run-to-run difference
    assert same_float(results.pop(), torch_backend.activation_threshold(big, None, 33_554_432))
    with pytest.raises(ValueError, match="outside"):
        cupy_backend.activation_threshold(big, None, big.numel() + 1)


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_activation_fit_through_the_pipeline(cupy_backend, monkeypatch, tiny_llama_dir, method):
    """compress() on CUDA with backend cupy and with backend torch: every layer's TEAL / WINA
    threshold is the same float, and the cupy run took them from the kernels."""
    from prune_cli.recipe.config import resolve
    from prune_cli.run.pipeline import CompressRequest, compress

    calls = []
    kernel = cupy_backend.activation_threshold
    monkeypatch.setattr(cupy_backend, "activation_threshold", lambda *a: calls.append(1) or kernel(*a))
    thresholds = {}
    for backend in ("cupy", "torch"):
        config = resolve(None, {"method": method, "sparsity": 0.4, "backend": backend, "device": "cuda",
                                "calibration": {"samples": 4, "seqlen": 32}, "evaluation": {"enabled": False}})
        report = compress(CompressRequest(config, str(tiny_llama_dir), None))
        assert report["backend"] == backend
        thresholds[backend] = [r["threshold"] for r in report["activation"]["layers"]]
    assert len(calls) == len(thresholds["torch"]) > 0
    assert thresholds["cupy"] == thresholds["torch"]
