"""Step-by-step NumPy models of the selection and conversion logic of ``gpu/kernels/*.cu``.

The kernels cannot run without a GPU, but their algorithms can: these functions follow the
CUDA code line by line (same key mapping, same radix passes and bin search, same block-wise
tie ranking, same N:M rank rule, same rounding), so the CPU tests check the logic against
``prune_cli.methods.base.select`` and torch's conversions. The GPU parity tests then check
that the CUDA code does what these models do.
"""

from __future__ import annotations

import numpy as np

SELECT_THREADS = 512  # PC_SELECT_THREADS
NM_THREADS = 256  # PC_NM_THREADS


def order_key(values: np.ndarray) -> np.ndarray:
    """pc_order_key: float32 -> uint32 with the float order, -0 == +0, NaN above +inf."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).copy()
    mag = u & np.uint32(0x7FFFFFFF)
    u[mag == 0] = 0
    neg = (u & np.uint32(0x80000000)) != 0
    key = np.where(neg, ~u, u | np.uint32(0x80000000)).astype(np.uint32)
    key[mag > np.uint32(0x7F800000)] = np.uint32(0xFFFFFFFF)
    return key


def wanda_keys(weight_f32: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """pc_wanda_keys: key(|W_ij| (exact fp32) * norm_j), one IEEE fp32 multiply (no FTZ)."""
    with np.errstate(all="ignore"):
        score = np.abs(weight_f32.astype(np.float32)) * norm.astype(np.float32)[None, :]
    return order_key(score)


def _warp0_bin_search(hist: np.ndarray, need: int, per_lane: int = 8) -> tuple[int, int, int]:
    """The one-warp bin scan of select.cu (32 lanes x 8 bins) and threshold.cu (32 x 64): the
    lane whose exclusive..inclusive prefix sum holds ``need`` walks its own bins to the bin
    holding the ``need``-th entry. Returns (bin, need within that bin, entries in that bin)."""
    lanes = hist.astype(np.int64).reshape(32, per_lane)
    local = lanes.sum(axis=1)
    incl = np.cumsum(local)
    excl = incl - local
    hits = [lane for lane in range(32) if excl[lane] < need <= incl[lane]]
    assert len(hits) == 1, "exactly one lane holds the need-th key"
    lane = hits[0]
    run = int(excl[lane])
    found = None
    for q in range(per_lane):
        c = int(lanes[lane, q])
        if run < need <= run + c:
            assert found is None
            found = (lane * per_lane + q, need - run, c)
        run += c
    assert found is not None
    return found


def select_row_keep(keys: np.ndarray, k: int, threads: int = SELECT_THREADS) -> np.ndarray:
    """pc_select_row for one row of uint32 keys: KEEP mask removing the k smallest (key, index)."""
    width = keys.shape[0]
    if k <= 0 or k >= width:
        return np.full(width, k <= 0)
    prefix, prefix_mask, need, ties = 0, 0, k, 0
    for shift in (24, 16, 8, 0):
        hist = np.zeros(256, dtype=np.int64)
        for base in range(0, width, threads):  # the block's strided passes
            chunk = keys[base : base + threads].astype(np.int64)
            match = (chunk & prefix_mask) == prefix
            np.add.at(hist, (chunk[match] >> shift) & 0xFF, 1)
        b, need, ties = _warp0_bin_search(hist, need)
        prefix |= b << shift
        prefix_mask |= 0xFF << shift
    kstar = prefix
    k64 = keys.astype(np.int64)
    if need == ties:
        return k64 > kstar
    keep = np.empty(width, dtype=bool)
    carry = 0
    for base in range(0, width, threads):
        chunk = k64[base : base + threads]
        tie = np.zeros(threads, dtype=bool)
        tie[: chunk.shape[0]] = chunk == kstar
        # pc_block_rank: ballot per warp, popc of lower lanes, plus the warps before
        warps = tie.reshape(-1, 32)
        warp_counts = warps.sum(axis=1)
        before = np.concatenate([[0], np.cumsum(warp_counts)[:-1]])
        lower = np.cumsum(warps, axis=1) - warps
        rank = (before[:, None] + lower).reshape(-1)[: chunk.shape[0]] + carry
        removed = (chunk < kstar) | (tie[: chunk.shape[0]] & (rank < need))
        keep[base : base + chunk.shape[0]] = ~removed
        carry += int(warp_counts.sum())
    return keep


def select_rows_keep(keys: np.ndarray, k: int) -> np.ndarray:
    return np.stack([select_row_keep(row, k) for row in keys]) if keys.shape[0] else np.ones(keys.shape, bool)


def select_nm_keep(keys: np.ndarray, m: int, prune: int) -> np.ndarray:
    """pc_select_nm: per tile of (256 // m) whole groups, rank inside the group, remove rank < prune."""
    out_features, in_features = keys.shape
    keep = np.empty(keys.shape, dtype=bool)
    tile = (NM_THREADS // m) * m
    k64 = keys.astype(np.int64)
    for row in range(out_features):
        for start in range(0, in_features, tile):
            s_key = k64[row, start : start + tile]
            for t in range(s_key.shape[0]):
                pos = t % m
                g0 = t - pos
                mine = s_key[t]
                rank = sum(
                    1 for q in range(m) if s_key[g0 + q] < mine or (s_key[g0 + q] == mine and q < pos)
                )
                keep[row, start + t] = rank >= prune
    return keep


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """pc_to_f32(pc_bf16): the bits shifted into the top half of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """pc_from_f32<pc_bf16>: round to nearest even, NaN -> 0x7FC0."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


# ---------------------------------------------------------------------------- dsnot.cu
def _sign_code(x: np.float32) -> int:
    """pc_sign_code: torch.sign as 1, -1, 0 (either zero) or 2 (NaN), from the bits."""
    u = int(np.float32(x).view(np.uint32))
    mag = u & 0x7FFFFFFF
    if mag > 0x7F800000:
        return 2
    if mag == 0:
        return 0
    return -1 if u & 0x80000000 else 1


def dsnot_delta_e(a, b, gd_j, gd_k, g_jj, g_kk, g_jk):
    """pc_dsnot_step's dE, fp32, one rounding per operation in the kernel's (= torch's) order:
    ``((2 (a gd_j + b gd_k) + (a a) g_jj) + (b b) g_kk) + ((2 a) b) g_jk``. Scalars or arrays."""
    f32 = np.float32
    lin = f32(a * gd_j) + f32(b * gd_k)
    dE = f32(2) * lin
    dE = dE + f32(a * a) * g_jj
    dE = dE + f32(b * b) * g_kk
    return dE + f32(f32(f32(2) * a) * b) * g_jk


def dsnot_gd_delta(a, b, g_j, g_k):
    """The guarded row update ``(a G[j, :]) + (b G[k, :])`` (fp32, two products then one add)."""
    return a * g_j + b * g_k


def _dsnot_step(c: dict, r: int, j: int, k: int, sign0: int, e: np.float32, gram: int | None):
    """pc_dsnot_step for row ``r``: returns ``(take, e, active)``; applies a taken swap.

    Every fp32 operation is one NumPy float32 scalar operation in the kernel's order (IEEE
    round to nearest even, subnormals kept, never fused). The ``G d`` row update is a plain
    fp32 add here (torch's CPU index_add_); the kernel's atomicAdd is torch's CUDA index_add_.
    """
    f32 = np.float32
    w_j = c["W"][r, j]
    what_k = c["What"][r, k]
    err_after = f32(f32(e + c["prune"][r, k]) - c["regrow"][r, j])
    over = bool(c["threshold"] < abs(e))
    take = over
    if c["check_sign"]:
        s = _sign_code(err_after)
        take = take and s == sign0 and s != 2
    if not c["guarded"]:
        active = take
    else:
        active = over
        a, b = -w_j, what_k
        G, gd = c["G"][gram], c["Gd"][r]
        if take:
            take = bool(dsnot_delta_e(a, b, gd[j], gd[k], G[j, j], G[k, k], G[j, k]) < 0)
        if take:
            gd += dsnot_gd_delta(a, b, G[j], G[k])
    if take:
        e = err_after
        c["What"][r, j] = w_j
        c["What"][r, k] = 0.0
        c["keep"][r, j] = 1
        c["keep"][r, k] = 0
    return take, e, active


def dsnot_swap(
    W, What, keep, regrow, prune, err, grow_hi, grow_lo, n_grow, *, max_cycles: int, threshold,
    guarded: bool, check_sign: bool, prune_pos=None, n_pos=None, prune_neg=None, n_neg=None,
    m: int = 0, score=None, used=None, G=None, Gd=None, gid=None,
) -> None:
    """dsnot_swap_unstructured (``m == 0``) / dsnot_swap_nm (``m > 0``), one warp's row at a time.

    NumPy arrays with the kernels' shapes and dtypes (fp32 ``(R, n)``, uint8 ``keep``/``used``,
    int64 lists ``(R, L)`` and counts ``(R,)``, ``G`` ``(n_g, n, n)``); ``What``, ``keep``,
    ``err``, ``Gd`` and ``used`` are updated in place. Returns, per row, how many cycles ran and
    whether the row stopped on an exhausted list (for the tests; the kernel returns nothing).
    """
    f32 = np.float32
    c = {"W": W, "What": What, "keep": keep, "regrow": regrow, "prune": prune, "G": G, "Gd": Gd,
         "threshold": f32(threshold), "guarded": guarded, "check_sign": check_sign}
    rows = W.shape[0]
    last = grow_hi.shape[1] - 1
    cycles_run = np.zeros(rows, dtype=np.int64)
    exhausted = np.zeros(rows, dtype=bool)
    for r in range(rows):
        gram = int(gid[r]) if guarded else None
        e = f32(err[r])
        sign0 = _sign_code(e)
        ng = int(n_grow[r])
        p_hi = p_lo = p_pos = p_neg = 0
        active = True
        if not m:
            lim_pos, lim_neg = min(int(n_pos[r]), max_cycles), min(int(n_neg[r]), max_cycles)
        cycle = 0
        while cycle < max_cycles and active:
            s = _sign_code(e)
            grow_up = s == 1
            j = int(grow_hi[r, min(p_hi, last)] if grow_up else grow_lo[r, min(p_lo, last)])
            if not m:
                prune_up = s == -1
                k = int(prune_pos[r, min(p_pos, last)] if prune_up else prune_neg[r, min(p_neg, last)])
                if p_hi + p_lo >= ng or (p_pos >= lim_pos if prune_up else p_neg >= lim_neg):
                    exhausted[r] = True
                    break
                _, e, active = _dsnot_step(c, r, j, k, sign0, e, gram)
                p_pos += 1 if prune_up else 0
                p_neg += 0 if prune_up else 1
            else:
                g0 = j - j % m
                any_cand, best, best_s = False, 0, f32(np.inf)
                for q in range(m):
                    cand = keep[r, g0 + q] != 0 and used[r, g0 + q] == 0
                    any_cand = any_cand or cand
                    sq = score[r, g0 + q] if cand else f32(np.inf)
                    if q == 0 or (not np.isnan(best_s) and (np.isnan(sq) or sq < best_s)):
                        best, best_s = q, sq
                if p_hi + p_lo >= ng or not any_cand:
                    exhausted[r] = True
                    break
                k = g0 + best
                take, e, active = _dsnot_step(c, r, j, k, sign0, e, gram)
                used[r, k] = 1
                if take:
                    used[r, j] = 1
            p_hi += 1 if grow_up else 0
            p_lo += 0 if grow_up else 1
            cycle += 1
        err[r] = e
        cycles_run[r] = cycle
    return cycles_run, exhausted


# ---------------------------------------------------------------------------- threshold.cu
THRESHOLD_THREADS = 256  # PC_THRESHOLD_THREADS
THRESHOLD_BINS = 2048  # PC_THRESHOLD_BINS
THRESHOLD_PASSES = ((21, 11), (10, 11), (0, 10))  # (shift, digit bits): pc_threshold_shift / _digit_mask
_THRESHOLD_HIGHER = (0x00000000, 0xFFE00000, 0xFFFFFC00)  # pc_threshold_higher


def threshold_keys(x_f32: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """pc_threshold_key for every entry of ``x`` ``(n, in)`` (already widened exactly to fp32):
    ``key(|x[t, j]| * scale[j])``, ``|x|`` by clearing the sign bit (pc_abs), the product one
    IEEE fp32 multiply (NumPy float32: round to nearest even, subnormals kept, as pc_mul_rn)."""
    bits = np.ascontiguousarray(x_f32, dtype=np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
    mag = bits.view(np.float32)
    if scale is not None:
        with np.errstate(all="ignore"):
            mag = mag * np.ascontiguousarray(scale, dtype=np.float32)  # broadcast over the last axis
    return order_key(mag)


def threshold_hist(keys: np.ndarray, pass_index: int, prefix: int, blocks: int, vec: int,
                   threads: int = THRESHOLD_THREADS) -> np.ndarray:
    """threshold_hist_* for one pass over the flat uint32 ``keys``: returns the 2048 counts the
    pass adds into ``hist[pass, :]``.

    Entry ``i`` belongs to vector ``i // vec``; the grid-stride loop gives vector ``v`` to thread
    ``v % threads`` of block ``(v // threads) % blocks``. Each block counts the entries whose
    higher digits equal ``prefix`` into its own 32-bit shared histogram (checked not to
    overflow), and the blocks' histograms are then added (the 64-bit atomicAdd merge)."""
    shift, bits = THRESHOLD_PASSES[pass_index]
    flat = keys.reshape(-1).astype(np.int64)
    assert flat.size % vec == 0
    block = (np.arange(flat.size, dtype=np.int64) // vec // threads) % blocks
    match = (flat & _THRESHOLD_HIGHER[pass_index]) == prefix
    digit = (flat[match] >> shift) & ((1 << bits) - 1)
    per_block = np.bincount(block[match] * THRESHOLD_BINS + digit, minlength=blocks * THRESHOLD_BINS)
    per_block = per_block.reshape(blocks, THRESHOLD_BINS)
    assert per_block.max(initial=0) < 2**32, "a block's shared counter would overflow"
    return per_block.sum(axis=0).astype(np.uint64)


def threshold_pick(hist: np.ndarray, pass_index: int, prefix: int, need: int) -> tuple[int, int]:
    """threshold_pick: one warp, lane ``l`` owns bins ``[64 l, 64 l + 64)``; the lane whose
    exclusive..inclusive prefix sum holds ``need`` walks its bins to the bin ``b`` holding it.
    Returns the new state ``(prefix | b << shift, need - entries in lower bins)``."""
    shift, _ = THRESHOLD_PASSES[pass_index]
    b, need, _ = _warp0_bin_search(hist, need, per_lane=64)
    return prefix | (b << shift), need


def threshold_select(keys: np.ndarray, k: int, blocks: int = 1, vec: int = 1) -> int:
    """The 3-pass radix select of threshold.cu: the key of the ``k``-th smallest (1-based) entry,
    with the device state ``{prefix, need}`` carried from pass to pass (pass 0 starts from k)."""
    assert 1 <= k <= keys.size
    prefix, need = 0, k
    for p in range(len(THRESHOLD_PASSES)):
        hist = threshold_hist(keys, p, 0 if p == 0 else prefix, blocks, vec)
        prefix, need = threshold_pick(hist, p, prefix if p else 0, need)
    # the key found is present, and `need` of the entries equal to it are within the first k
    assert 1 <= need <= int((keys.reshape(-1).astype(np.int64) == prefix).sum())
    return prefix


def key_to_float(key: int) -> np.float32:
    """Inverse of order_key on non-NaN floats (the shared zero key gives +0; the NaN key a NaN)."""
    key = np.uint32(key)
    bits = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]
