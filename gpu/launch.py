"""Launch geometry of the CuPy kernels: pure arithmetic, no CuPy (tested on CPU).

Each plan says how a kernel's work is cut into blocks; the tests check that every plan covers
its whole problem exactly once for awkward sizes (not multiples of the block size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STATS_THREADS = 256  # stats_partial_* blockDim
REDUCE_THREADS = 256  # stats_reduce, gemv_reduce blockDim
SELECT_THREADS = 512  # PC_SELECT_THREADS in select.cu
NM_THREADS = 256  # PC_NM_THREADS in select.cu
GEMV_THREADS = 128  # PC_GEMV_THREADS in gemv.cu
LOWRANK_THREADS = 256  # lowrank_z_* blockDim
MAX_RANK = 1024  # s_z[1024] in gemv_reduce
MAX_NM_M = NM_THREADS  # one group must fit a block
MAX_GRID_Y = 65535
THRESHOLD_THREADS = 256  # PC_THRESHOLD_THREADS in threshold.cu (threshold_hist_* blockDim)
THRESHOLD_BINS = 2048  # PC_THRESHOLD_BINS: one 11-bit digit
THRESHOLD_PASSES = ((21, 11), (10, 11), (0, 10))  # (lowest bit, width) of each radix digit of the key
THRESHOLD_PICK_THREADS = 32  # threshold_pick: one warp, 64 bins per lane
MAX_BLOCK_COUNT = (1 << 32) - 1  # a block's shared-memory counters are 32-bit


@dataclass(frozen=True)
class StatsPlan:
    vec: int  # columns per thread
    col_tiles: int  # grid.x
    chunks: int  # grid.y: row chunks (partials to reduce when > 1)
    rows_per_chunk: int


def stats_plan(n: int, in_features: int, vec: int, sm_count: int) -> StatsPlan:
    """Cut ``x (n, in)`` into column tiles of ``STATS_THREADS * vec`` and row chunks, aiming at
    about 8 blocks per multiprocessor and at least 16 rows per chunk."""
    col_tiles = math.ceil(in_features / (STATS_THREADS * vec))
    target = 8 * max(1, sm_count)
    chunks = max(1, min(math.ceil(n / 16), math.ceil(target / col_tiles), MAX_GRID_Y))
    rows_per_chunk = max(1, math.ceil(n / chunks))
    chunks = max(1, math.ceil(n / rows_per_chunk))
    return StatsPlan(vec, col_tiles, chunks, rows_per_chunk)


@dataclass(frozen=True)
class NMPlan:
    tile: int  # elements per tile (whole groups)
    tiles: int  # tiles per row
    grid_y: int  # blocks per row (each loops over tiles blockIdx.y, +grid_y, ...)


def nm_plan(out_features: int, in_features: int, m: int, sm_count: int) -> NMPlan:
    tile = (NM_THREADS // m) * m
    tiles = math.ceil(in_features / tile)
    per_row = max(math.ceil(tiles / 4), math.ceil(8 * max(1, sm_count) / max(1, out_features)))
    return NMPlan(tile, tiles, max(1, min(tiles, per_row, MAX_GRID_Y)))


@dataclass(frozen=True)
class GemvPlan:
    vec: int  # output columns per thread
    col_tiles: int  # grid.x
    chunks: int  # grid.y: slices of the kept-row list, reduced in order
    per_chunk: int  # list positions per chunk


def gemv_plan(list_len: int, out_features: int, vec: int, sm_count: int) -> GemvPlan:
    """Column tiles of ``GEMV_THREADS * vec`` outputs times chunks of the kept-row list (mask
    positions or index entries), about 4 blocks per multiprocessor, at least 32 list positions
    per chunk so that the partial sums stay small next to the weight rows read."""
    col_tiles = math.ceil(out_features / (GEMV_THREADS * vec))
    target = 4 * max(1, sm_count)
    chunks = max(1, min(math.ceil(target / max(1, col_tiles)), math.ceil(max(list_len, 1) / 32), MAX_GRID_Y))
    per_chunk = max(1, math.ceil(list_len / chunks))
    chunks = max(1, math.ceil(list_len / per_chunk))
    return GemvPlan(vec, col_tiles, chunks, per_chunk)


def vector_width(count: int, data_ptr: int, itemsize: int) -> int:
    """Elements per 16-byte vector access when ``count`` and the base address allow it, else 1."""
    vec = 16 // itemsize
    return vec if count % vec == 0 and data_ptr % 16 == 0 else 1


@dataclass(frozen=True)
class ThresholdPlan:
    vec: int  # entries per thread and iteration (one 16-byte load when > 1)
    blocks: int  # grid.x of threshold_hist_*: a grid-stride loop over numel / vec vectors


def threshold_plan(numel: int, vec: int, sm_count: int) -> ThresholdPlan:
    """Blocks of ``THRESHOLD_THREADS`` for the grid-stride histogram over ``numel`` entries: about
    8 blocks per multiprocessor (each block merges up to 2048 counters into the global
    histogram, so no more than that), never more than there are vectors, and enough that no
    block counts ``2^32`` entries or more (its shared counters are 32-bit)."""
    if numel <= 0 or vec <= 0 or numel % vec:
        raise ValueError(f"threshold_plan: {numel} entries do not split into vectors of {vec}")
    nvec = numel // vec
    blocks = max(1, min(math.ceil(nvec / THRESHOLD_THREADS), 8 * max(1, sm_count)))
    # entries per block <= ceil(nvec / (blocks * threads)) * threads * vec
    while math.ceil(nvec / (blocks * THRESHOLD_THREADS)) * THRESHOLD_THREADS * vec > MAX_BLOCK_COUNT:
        blocks *= 2
    return ThresholdPlan(vec, blocks)
