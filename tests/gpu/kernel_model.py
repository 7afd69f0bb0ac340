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


def _warp0_bin_search(hist: np.ndarray, need: int) -> tuple[int, int, int]:
    """The warp-0 scan of select.cu: 32 lanes x 8 bins; returns (bin, new need, ties)."""
    lanes = hist.reshape(32, 8)
    local = lanes.sum(axis=1)
    incl = np.cumsum(local)
    excl = incl - local
    hits = [lane for lane in range(32) if excl[lane] < need <= incl[lane]]
    assert len(hits) == 1, "exactly one lane holds the need-th key"
    lane = hits[0]
    run = int(excl[lane])
    found = None
    for q in range(8):
        c = int(lanes[lane, q])
        if run < need <= run + c:
            assert found is None
            found = (lane * 8 + q, need - run, c)
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
