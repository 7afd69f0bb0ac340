"""CPU checks of the kernels' algorithms (through the line-by-line models in kernel_model.py)
and of the launch geometry (prune_cli.gpu.launch): no GPU needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.selection import select
from prune_cli.gpu import launch
from tests.gpu import dsnot_cases as dc
from tests.gpu import kernel_model as km


def special_values(n: int, seed: int) -> torch.Tensor:
    """Scores full of ties and edge cases: +-0, +-inf, NaN, subnormals, repeats."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-40, 3.5, 3.5, 0.25],
        dtype=torch.float32,
    )
    return pool[torch.randint(0, len(pool), (n,), generator=g)]


def test_order_key_sorts_like_torch_stable_sort():
    for seed in range(5):
        values = torch.cat([special_values(3000, seed), torch.randn(3000, generator=torch.Generator().manual_seed(seed))])
        keys = km.order_key(values.numpy())
        ours = np.argsort(keys, kind="stable")
        theirs = torch.sort(values, stable=True).indices.numpy()
        assert np.array_equal(ours, theirs)


def tie_heavy(out_features: int, in_features: int, seed: int, levels: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (out_features, in_features), generator=g).float() * 0.5


@pytest.mark.parametrize("width", [1, 2, 31, 511, 512, 513, 1000, 1537])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_radix_select_model_matches_select(width, sparsity):
    for seed, score in enumerate(
        [tie_heavy(3, width, 0), torch.randn(3, width), special_values(3 * width, 7).reshape(3, width),
         torch.full((2, width), 2.0)]
    ):
        want = select(score, Unstructured(sparsity))
        got = km.select_rows_keep(km.order_key(score.numpy()), int(width * sparsity))
        assert np.array_equal(got, want.numpy()), (seed, width, sparsity)


@pytest.mark.parametrize("n_keep,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 3), (5, 7), (16, 32), (1, 32), (31, 32)])
def test_nm_model_matches_select(n_keep, m):
    width = m * 37  # crosses tiles of (256 // m) * m elements unevenly
    for score in (tie_heavy(2, width, m), torch.randn(2, width), special_values(2 * width, m).reshape(2, width)):
        want = select(score, NM(n_keep, m))
        got = km.select_nm_keep(km.order_key(score.numpy()), m, m - n_keep)
        assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wanda_key_model_matches_torch_score(dtype):
    g = torch.Generator().manual_seed(3)
    weight = (torch.randint(-3, 4, (4, 300), generator=g).float() * 0.125).to(dtype)
    weight[0, :10] = torch.tensor(1e-30).to(dtype) if dtype == torch.float32 else 0.0
    norm = torch.randint(0, 3, (300,), generator=g).float()
    norm[:10] = 1e-10  # subnormal products for the fp32 rows: no flush to zero
    norm[10] = float("inf")
    torch_score = weight.abs().float() * norm.unsqueeze(0)
    assert np.array_equal(km.wanda_keys(weight.float().numpy(), norm.numpy()), km.order_key(torch_score.numpy()))
    if dtype == torch.float32:
        assert (torch_score[0, :10] > 0).all() and (torch_score[0, :10] < 1.2e-38).all()  # subnormal, kept
    for pattern in (Unstructured(0.5), NM(2, 4)):
        want = select(torch_score, pattern)
        keys = km.wanda_keys(weight.float().numpy(), norm.numpy())
        if isinstance(pattern, NM):
            got = km.select_nm_keep(keys, 4, 2)
        else:
            got = km.select_rows_keep(keys, int(300 * 0.5))
        assert np.array_equal(got, want.numpy())


def test_half_conversions_match_torch():
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [torch.randn(20000, generator=g) * 100, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                                                                1.00390625, 1.01171875, 3e-39, -3e-39])]
    )
    bits = km.f32_to_bf16_bits(values.numpy())
    theirs = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = values.isnan().numpy()
    # NaN payloads differ even between torch's own CPU paths (0x7FC0 scalar, 0xFFFF vectorised)
    assert np.array_equal(bits[~nan], theirs[~nan])
    assert np.isnan(km.bf16_bits_to_f32(bits[nan])).all()
    bf = values.to(torch.bfloat16)
    widened = km.bf16_bits_to_f32(bf.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(widened.view(np.uint32), bf.float().numpy().view(np.uint32))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099, 100003])
@pytest.mark.parametrize("in_features", [1, 7, 256, 1000, 4097])
def test_stats_plan_covers_every_row_once(n, in_features):
    for vec in (1, 4, 8):
        plan = launch.stats_plan(n, in_features, vec, sm_count=132)
        assert plan.col_tiles * launch.STATS_THREADS * vec >= in_features
        assert (plan.col_tiles - 1) * launch.STATS_THREADS * vec < in_features
        assert plan.chunks * plan.rows_per_chunk >= n > (plan.chunks - 1) * plan.rows_per_chunk
        assert 1 <= plan.chunks <= launch.MAX_GRID_Y


@pytest.mark.parametrize("list_len", [0, 1, 31, 32, 33, 2048, 11008, 70001])
@pytest.mark.parametrize("out_features", [1, 3, 1000, 4096, 11009])
def test_gemv_plan_covers_every_position_once(list_len, out_features):
    for vec in (1, 4, 8):
        plan = launch.gemv_plan(list_len, out_features, vec, sm_count=132)
        assert plan.col_tiles * launch.GEMV_THREADS * vec >= out_features
        if list_len:
            assert plan.chunks * plan.per_chunk >= list_len > (plan.chunks - 1) * plan.per_chunk
        else:
            assert plan.chunks == 1
        assert plan.chunks <= launch.MAX_GRID_Y


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 32, 256])
def test_nm_plan_tiles_hold_whole_groups(m):
    for out_features, in_features in ((1, m), (5, m * 3), (4096, m * 1000)):
        plan = launch.nm_plan(out_features, in_features, m, sm_count=132)
        assert plan.tile % m == 0 and 0 < plan.tile <= launch.NM_THREADS
        assert plan.tiles * plan.tile >= in_features
        assert 1 <= plan.grid_y <= plan.tiles


def test_vector_width():
    assert launch.vector_width(4096, 0x1000, 2) == 8
    assert launch.vector_width(4096, 0x1002, 2) == 1  # misaligned base
    assert launch.vector_width(4095, 0x1000, 2) == 1  # rows would be misaligned
    assert launch.vector_width(4096, 0x1000, 4) == 4


# ------------------------------------------------------------------ DSnoT (dsnot.cu)
@pytest.mark.parametrize("case", sorted(dc.CASES))
@pytest.mark.parametrize("mode", dc.MODES)
@pytest.mark.parametrize("threshold,sign_check", [(0.1, "auto"), (0.0, "off"), (0.0, "on")])
def test_dsnot_model_matches_torch_loop(case, mode, threshold, sign_check):
    """The model of dsnot.cu leaves What, keep, e and G d bit-identical to the torch loop."""
    pattern, width = dc.CASES[case]
    dsnot = dc.method(mode, threshold, sign_check=sign_check)
    rows, state, lists, m = dc.swap_state(dsnot, dc.jobs(pattern, width))
    before = rows.keep.clone()
    dc.run_torch_loop(dsnot, rows, state, lists, m)
    want = dc.outputs(rows, state)

    backend = dc.ModelBackend()
    rows, state, lists, m = dc.swap_state(dsnot, dc.jobs(pattern, width))
    dsnot._swap_kernel(backend.dsnot_swap, state, rows, lists, m)
    assert backend.calls == 1
    dc.assert_bit_identical(dc.outputs(rows, state), want)
    if sign_check == "off" or "exhausting" not in case:
        assert not torch.equal(want["keep"], before)  # swaps happened
    if "exhausting" in case and sign_check == "off":
        assert backend.exhausted.sum() >= 5  # rows that ran out of candidates


@pytest.mark.parametrize("case", ["unstructured", "2:4"])
@pytest.mark.parametrize("mode", dc.MODES)
def test_dsnot_dispatch_in_prune_group(case, mode):
    """prune_group calls the backend's dsnot_swap (same device) and gets the torch loop's result."""
    pattern, width = dc.CASES[case]
    dsnot = dc.method(mode)
    job_list = dc.jobs(pattern, width, seed=5)
    want = dsnot.prune_group(job_list)
    backend = dc.ModelBackend()
    got = dsnot.prune_group(job_list, backend)
    assert backend.calls == 1  # one batch: every job has the same width
    for a, b in zip(got, want):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight.view(torch.int32), b.weight.view(torch.int32))
    backend.device = torch.device("meta")  # the kernel's device differs from the tensors': torch loop
    got = dsnot.prune_group(job_list, backend)
    assert backend.calls == 1 and all(torch.equal(a.mask, b.mask) for a, b in zip(got, want))


def test_dsnot_model_special_values():
    """Exact zeros in e (neither list side), +-0 and subnormal effects, ties everywhere."""
    pattern, width = dc.CASES["unstructured"]
    for mode in dc.MODES:
        dsnot = dc.method(mode, 0.0, sign_check="on")
        results = []
        for use_model in (False, True):
            rows, state, lists, m = dc.swap_state(dsnot, dc.jobs(pattern, width, seed=9))
            state.err[::3] = 0.0
            state.err[1::7] = -0.0
            state.err[2::5] = 1e-42
            state.sign0 = torch.sign(state.err)
            rows.regrow_metric[:, ::4] = 1e-41
            if use_model:
                dsnot._swap_kernel(dc.ModelBackend().dsnot_swap, state, rows, lists, m)
            else:
                dc.run_torch_loop(dsnot, rows, state, lists, m)
            results.append(dc.outputs(rows, state))
        dc.assert_bit_identical(results[1], results[0])


def test_dsnot_delta_e_rounds_like_torch():
    """dE and the G d update, bit for bit against the expressions of _SwapState.step, on values
    whose sums cancel (where a fused or reordered operation would show)."""
    g = torch.Generator().manual_seed(11)
    n = 20000
    a, b, gdj, gdk, gjj, gkk, gjk = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
                                     for _ in range(7))
    gdk = -gdj * a / b * (1 + torch.randn(n, generator=g) * 1e-6)  # a gd_j + b gd_k close to 0
    want = 2 * (a * gdj + b * gdk) + a * a * gjj + b * b * gkk + 2 * a * b * gjk
    with np.errstate(all="ignore"):
        got = km.dsnot_delta_e(*(t.numpy() for t in (a, b, gdj, gdk, gjj, gkk, gjk)))
        delta = km.dsnot_gd_delta(a[:1].numpy(), b[:1].numpy(), gjj.numpy(), gkk.numpy())
    assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), want.numpy().view(np.int32))
    torch_delta = a[:1] * gjj + b[:1] * gkk
    assert np.array_equal(delta.view(np.int32), torch_delta.numpy().view(np.int32))
    # and the scalar path the per-row model takes
    for i in range(0, n, 997):
        s = km.dsnot_delta_e(*(np.float32(t[i].item()) for t in (a, b, gdj, gdk, gjj, gkk, gjk)))
        assert np.float32(s).view(np.int32) == want[i:i + 1].numpy().view(np.int32)[0]


# ------------------------------------------------------------------ activation threshold (threshold.cu)
def threshold_inputs(shape, dtype, seed):
    """Activation-like inputs with deliberate ties and zeros: (name, x) pairs in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    yield "randn", (torch.randn(shape, generator=g) * 3).to(dtype)
    yield "ties", (torch.randint(-4, 5, shape, generator=g).float() * 0.5).to(dtype)  # 1/9 zeros, +-ties
    sparse = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)
    yield "mostly zeros", sparse.to(dtype)  # 70% of the scores 0 (+0 and -0 inputs)
    yield "constant", torch.full(shape, -1.5).to(dtype)


def threshold_scale(in_features, seed):
    """Per-channel fp32 scales: column-norm-like values, a dead column (0) and tiny values whose
    products with small inputs are fp32 subnormals (they must not be flushed)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(in_features, generator=g) * 4 + 0.1
    scale[::7] = 0.0
    scale[3::11] = 1e-38
    return scale


def threshold_ks(numel):
    return sorted({1, numel, max(1, numel // 2), max(1, round(0.3 * numel)), max(1, numel - 1)})


def model_threshold(x, scale, k, blocks=1, vec=1):
    keys = km.threshold_keys(x.float().numpy(), None if scale is None else scale.numpy())
    return km.key_to_float(km.threshold_select(keys, k, blocks, vec))


def same_float(a, b) -> bool:
    """Equal bits, or both NaN."""
    a, b = np.float32(a), np.float32(b)
    return bool(np.isnan(a) and np.isnan(b)) or a.view(np.uint32) == b.view(np.uint32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 257), (129, 1000), (600, 77)])
def test_threshold_model_matches_kthvalue(dtype, scaled, shape):
    """The 3-pass radix select of threshold.cu gives torch's kthvalue of |x| (* scale) bit for
    bit, for k = 1, numel and in between, on shapes that are no multiple of the block size."""
    scale = threshold_scale(shape[1], shape[1]) if scaled else None
    plan = launch.threshold_plan(shape[0] * shape[1], 1, sm_count=2)  # several blocks for the big shapes
    for name, x in threshold_inputs(shape, dtype, sum(shape)):
        scores = x.abs() if scale is None else x.abs() * scale
        for k in threshold_ks(x.numel()):
            want = float(scores.reshape(-1).kthvalue(k).values)
            got = model_threshold(x, scale, k, plan.blocks, plan.vec)
            assert same_float(got, want), (name, k, got, want)


def test_threshold_model_special_values_and_subnormals():
    """+-0, +-inf, NaN (last, as kthvalue), subnormal inputs and subnormal products (no flush)."""
    x = special_values(4000, 3).reshape(40, 100)
    x[0, :20] = torch.tensor(1e-30)  # with a scale of 1e-10: products ~1e-40, fp32 subnormals
    scale = threshold_scale(100, 4)
    scale[:20] = 1e-10
    scale[50] = float("inf")  # inf * 0 = NaN, inf * x = inf
    for s in (None, scale):
        scores = x.abs() if s is None else x.abs() * s
        if s is not None:
            assert (scores[0, :20] > 0).all() and (scores[0, :20] < 1.2e-38).all()
        n_nan = int(scores.isnan().sum())
        assert n_nan > 0
        for k in (1, 17, 20, 1000, 2000, x.numel() - n_nan, x.numel() - n_nan + 1, x.numel()):
            want = float(scores.reshape(-1).kthvalue(k).values)
            assert same_float(model_threshold(x, s, k), want), (k, want)


@pytest.mark.parametrize("blocks,vec", [(1, 1), (1, 4), (3, 8), (7, 4), (1000, 1)])
def test_threshold_model_does_not_depend_on_the_grid(blocks, vec):
    """Any split of the entries among blocks and vectors gives the same histograms, hence key."""
    x = torch.randint(0, 7, (123, 64), generator=torch.Generator().manual_seed(5)).float() * 0.25
    keys = km.threshold_keys(x.numpy(), threshold_scale(64, 1).numpy())
    for k in (1, 500, x.numel()):
        assert km.threshold_select(keys, k, blocks, vec) == km.threshold_select(keys, k)
    total = km.threshold_hist(keys, 0, 0, blocks, vec)
    assert total.sum() == x.numel()  # pass 0 counts every entry once


def test_key_to_float_inverts_order_key():
    values = torch.cat([special_values(3000, 1), torch.randn(3000) * 1e3, torch.randn(100) * 1e-40])
    keys = km.order_key(values.numpy())
    back = np.array([km.key_to_float(int(k)) for k in keys], dtype=np.float32)
    finite = ~values.isnan().numpy()
    plain = values.numpy().copy()
    plain[plain == 0] = 0.0  # -0 shares +0's key
    assert np.array_equal(back[finite].view(np.uint32), plain[finite].view(np.uint32))
    assert np.isnan(back[~finite]).all()


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 4096 * 11008, 16384 * 4096 + 8])
@pytest.mark.parametrize("vec", [1, 4, 8])
def test_threshold_plan(numel, vec):
    if numel % vec:
        with pytest.raises(ValueError):
            launch.threshold_plan(numel, vec, sm_count=132)
        return
    plan = launch.threshold_plan(numel, vec, sm_count=132)
    assert plan.vec == vec
    assert 1 <= plan.blocks <= max(1, 8 * 132)
    assert (plan.blocks - 1) * launch.THRESHOLD_THREADS < numel // vec  # no block without work
    # a huge problem on a tiny GPU: blocks are added so that no 32-bit shared counter overflows
    big = launch.threshold_plan((1 << 44) // vec * vec, vec, sm_count=1)
    per_block = -(-((1 << 44) // vec) // (big.blocks * launch.THRESHOLD_THREADS)) * launch.THRESHOLD_THREADS * vec
    assert per_block < 2**32


def test_threshold_constants_match_the_cuda_source():
    from prune_cli.gpu.kernel_source import module_source

    src = module_source("threshold")
    assert f"#define PC_THRESHOLD_THREADS {launch.THRESHOLD_THREADS}" in src
    assert f"#define PC_THRESHOLD_BINS {launch.THRESHOLD_BINS}" in src
    assert km.THRESHOLD_PASSES == launch.THRESHOLD_PASSES
    assert sum(bits for _, bits in launch.THRESHOLD_PASSES) == 32
    assert 32 * 64 == launch.THRESHOLD_BINS  # threshold_pick: 32 lanes x 64 bins
