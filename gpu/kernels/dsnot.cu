// DSnoT prune-and-grow cycles (prune_cli.methods.dsnot): every cycle of every row in one launch.
//
// Rows never interact, so one warp owns one row and runs its cycles serially; the scalar
// decisions are computed redundantly by all 32 lanes (same reads, same results, warp-uniform
// branches), lane 0 writes What / keep / used, and the lanes share the guarded-mode row update
// of G d. A row stops at its first exhausted list or, as the torch loop's `active` flag says,
// when (reference) a swap is refused or (guarded) |e| <= threshold; after that the torch loop
// changes nothing of that row either, so stopping early is exact.
//
// Tensors, R = stacked rows, n = in_features, L = list_len = max(1, min(max_cycles, n)):
//   W, regrow, prune           (R, n) fp32   dense W, W*mu (regrow effect), What*mu (prune effect)
//   What                       (R, n) fp32   updated in place
//   keep                       (R, n) uint8  updated in place (1 = kept)
//   err                        (R,)   fp32   e_i, updated in place (the final e)
//   grow_hi, grow_lo           (R, L) int64  regrow candidates, ranking descending / ascending
//   n_grow                     (R,)   int64  number of regrow candidates (pruned weights)
//   unstructured: prune_pos, prune_neg (R, L) int64 (lowest Wanda first), n_pos, n_neg (R,) int64
//   N:M: score (R, n) fp32 base score, used (R, n) uint8 scratch (zeros on entry), m
//   guarded: G (n_g, n, n) fp32, gid (R,) int64, Gd (R, n) fp32 = (W - What) G, updated in place
//
// One cycle of a row (torch: DSnoT._swap_unstructured / _swap_nm and _SwapState.step):
//   up = e > 0; j = up ? grow_hi[p_hi] : grow_lo[p_lo]; exhausted = p_hi + p_lo >= n_grow
//   unstructured: k = e < 0 ? prune_pos[p_pos] : prune_neg[p_neg];
//                 exhausted |= (e < 0 ? p_pos : p_neg) >= min(e < 0 ? n_pos : n_neg, max_cycles)
//   N:M: in the M-group of j, k = first argmin of (keep & !used ? score : +inf), NaN first;
//        exhausted |= no keep & !used entry in the group
//   e' = (e + prune[k]) - regrow[j]; take = |e| > threshold [&& sign(e') == sign(e_0)]
//   reference: the row stops unless take.  guarded: a = -W[j], b = What[k],
//     dE = (((2 (a Gd[j] + b Gd[k]) + (a a) G[j,j]) + (b b) G[k,k]) + ((2 a) b) G[j,k]),
//     take &= dE < 0; the row stops when |e| <= threshold; if take, Gd += (a G[j,:]) + (b G[k,:]).
//   take: e = e', What[j] = W[j], What[k] = 0, keep[j] = 1, keep[k] = 0 (N:M: used[j] = 1);
//   N:M: used[k] = 1 whether taken or not; the pointers used advance.
//
// Bit-identical to torch: every fp32 operation is one explicit PTX instruction in torch's
// order (mul.rn / add.rn / sub.rn / setp without .ftz, so neither CuPy's -ftz=true nor FMA
// contraction changes a result), negation and |x| are sign-bit operations, sign() tests use
// the bits. The threshold arrives as fp32, as torch casts the Python float for `abs(e) > t`.
// The G d update adds with atomicAdd, the operation torch's CUDA index_add_ performs (each
// element has one writer, so the result is deterministic).
//
// Launch: blockDim 128 (4 rows per block), grid ceil(R / 4).

#define PC_DSNOT_THREADS 128

__device__ __forceinline__ float pc_add_rn(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float pc_sub_rn(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// a < b, IEEE (false with a NaN), subnormals compared as they are.
__device__ __forceinline__ bool pc_lt(float a, float b) {
    unsigned int r;
    asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r != 0u;
}

__device__ __forceinline__ float pc_neg(float a) { return __uint_as_float(__float_as_uint(a) ^ 0x80000000u); }

__device__ __forceinline__ bool pc_isnan(float a) { return (__float_as_uint(a) & 0x7fffffffu) > 0x7f800000u; }

// torch.sign as a code: 1, -1, 0 (either zero) or 2 (NaN, equal to nothing).
__device__ __forceinline__ int pc_sign_code(float a) {
    const unsigned int u = __float_as_uint(a);
    const unsigned int mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return 2;
    if (mag == 0u) return 0;
    return (u & 0x80000000u) ? -1 : 1;
}

struct pc_dsnot_common {
    const float* __restrict__ W;
    float* What;
    unsigned char* keep;
    const float* __restrict__ regrow;
    const float* __restrict__ prune;
    const float* __restrict__ G;
    float* Gd;
    long long n;
    float threshold;
    int guarded;
    int check_sign;
};

// One swap decision for row `off` (regrow j, prune k) of a row that is still active and not
// exhausted. Updates e and `active`; applies the swap when taken and returns whether it was.
__device__ __forceinline__ bool pc_dsnot_step(const pc_dsnot_common& c, long long off, long long gram, long long j,
                                              long long k, int sign0, float& e, bool& active) {
    const float w_j = c.W[off + j];
    const float what_k = c.What[off + k];
    const float err_after = pc_sub_rn(pc_add_rn(e, c.prune[off + k]), c.regrow[off + j]);
    const bool over = pc_lt(c.threshold, pc_abs(e));
    bool take = over;
    if (c.check_sign) {
        const int s = pc_sign_code(err_after);
        take = take && s == sign0 && s != 2;
    }
    if (!c.guarded) {
        active = take;  // the first refused swap stops the row
    } else {
        active = over;
        const float a = pc_neg(w_j), b = what_k;
        float* gd = c.Gd + off;
        if (take) {
            const float* g = c.G + gram;
            const float lin = pc_add_rn(pc_mul_rn(a, __ldcg(gd + j)), pc_mul_rn(b, __ldcg(gd + k)));
            float dE = pc_mul_rn(2.0f, lin);
            dE = pc_add_rn(dE, pc_mul_rn(pc_mul_rn(a, a), g[j * (c.n + 1)]));
            dE = pc_add_rn(dE, pc_mul_rn(pc_mul_rn(b, b), g[k * (c.n + 1)]));
            dE = pc_add_rn(dE, pc_mul_rn(pc_mul_rn(pc_mul_rn(2.0f, a), b), g[j * c.n + k]));
            take = pc_lt(dE, 0.0f);
        }
        __syncwarp();  // every lane has read Gd[j], Gd[k] before any lane updates them
        if (take) {
            const float* gj = c.G + gram + j * c.n;
            const float* gk = c.G + gram + k * c.n;
            for (long long q = pc_lane_id(); q < c.n; q += 32) {
                atomicAdd(gd + q, pc_add_rn(pc_mul_rn(a, gj[q]), pc_mul_rn(b, gk[q])));
            }
            __threadfence_block();  // the updates are ordered before the cycle-end __syncwarp
        }
    }
    if (take) {
        e = err_after;
        if (pc_lane_id() == 0u) {
            c.What[off + j] = w_j;
            c.What[off + k] = 0.0f;
            c.keep[off + j] = 1;
            c.keep[off + k] = 0;
        }
    }
    return take;
}

__device__ __forceinline__ long long pc_dsnot_row() {
    return (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
}

// What both swap kernels read once per row: offsets into the (R, n) matrices, the (R, L) lists
// and the row's Gram matrix, the number of regrow candidates, and the error with its sign.
struct pc_dsnot_row_state {
    long long off, loff, last, gram, ng;
    float e;
    int sign0;
};

__device__ __forceinline__ pc_dsnot_row_state pc_dsnot_begin(long long row, int n, int list_len, int guarded,
                                                             const long long* __restrict__ gid,
                                                             const long long* __restrict__ n_grow,
                                                             const float* err) {
    pc_dsnot_row_state r;
    r.off = row * n;
    r.loff = row * list_len;
    r.last = list_len - 1;
    r.gram = guarded ? gid[row] * (long long)n * n : 0;
    r.e = err[row];
    r.sign0 = pc_sign_code(r.e);
    r.ng = n_grow[row];
    return r;
}

// The next regrow candidate: from the high list while e > 0, else from the low list.
__device__ __forceinline__ long long pc_dsnot_grow(const pc_dsnot_row_state& r, const long long* __restrict__ grow_hi,
                                                   const long long* __restrict__ grow_lo, long long p_hi,
                                                   long long p_lo, bool grow_up) {
    return grow_up ? grow_hi[r.loff + pc_min_ll(p_hi, r.last)] : grow_lo[r.loff + pc_min_ll(p_lo, r.last)];
}

extern "C" __global__ void __launch_bounds__(PC_DSNOT_THREADS)
    dsnot_swap_unstructured(const float* __restrict__ W, float* What, unsigned char* keep,
                            const float* __restrict__ regrow, const float* __restrict__ prune, float* err,
                            const long long* __restrict__ grow_hi, const long long* __restrict__ grow_lo,
                            const long long* __restrict__ n_grow, const long long* __restrict__ prune_pos,
                            const long long* __restrict__ n_pos, const long long* __restrict__ prune_neg,
                            const long long* __restrict__ n_neg, int list_len, const float* __restrict__ G,
                            float* Gd, const long long* __restrict__ gid, long long rows, int n, int max_cycles,
                            float threshold, int guarded, int check_sign) {
    const long long row = pc_dsnot_row();
    if (row >= rows) return;  // the whole warp
    const pc_dsnot_common c = {W, What, keep, regrow, prune, G, Gd, (long long)n, threshold, guarded, check_sign};
    pc_dsnot_row_state r = pc_dsnot_begin(row, n, list_len, guarded, gid, n_grow, err);
    const long long lim_pos = pc_min_ll(n_pos[row], max_cycles), lim_neg = pc_min_ll(n_neg[row], max_cycles);
    long long p_hi = 0, p_lo = 0, p_pos = 0, p_neg = 0;
    bool active = true;
    for (int cycle = 0; cycle < max_cycles && active; ++cycle) {
        const int s = pc_sign_code(r.e);
        const bool grow_up = s == 1, prune_up = s == -1;  // e > 0, e < 0
        const long long j = pc_dsnot_grow(r, grow_hi, grow_lo, p_hi, p_lo, grow_up);
        const long long k =
            prune_up ? prune_pos[r.loff + pc_min_ll(p_pos, r.last)] : prune_neg[r.loff + pc_min_ll(p_neg, r.last)];
        if (p_hi + p_lo >= r.ng || (prune_up ? p_pos >= lim_pos : p_neg >= lim_neg)) break;  // exhausted
        pc_dsnot_step(c, r.off, r.gram, j, k, r.sign0, r.e, active);
        p_hi += grow_up ? 1 : 0;
        p_lo += grow_up ? 0 : 1;
        p_pos += prune_up ? 1 : 0;
        p_neg += prune_up ? 0 : 1;
        __syncwarp();  // lane 0's writes are seen by every lane in the next cycle
    }
    if (pc_lane_id() == 0u) err[row] = r.e;
}

extern "C" __global__ void __launch_bounds__(PC_DSNOT_THREADS)
    dsnot_swap_nm(const float* __restrict__ W, float* What, unsigned char* keep, const float* __restrict__ regrow,
                  const float* __restrict__ prune, float* err, const long long* __restrict__ grow_hi,
                  const long long* __restrict__ grow_lo, const long long* __restrict__ n_grow, int list_len,
                  const float* __restrict__ score, unsigned char* used, int m, const float* __restrict__ G, float* Gd,
                  const long long* __restrict__ gid, long long rows, int n, int max_cycles, float threshold,
                  int guarded, int check_sign) {
    const long long row = pc_dsnot_row();
    if (row >= rows) return;  // the whole warp
    const pc_dsnot_common c = {W, What, keep, regrow, prune, G, Gd, (long long)n, threshold, guarded, check_sign};
    pc_dsnot_row_state r = pc_dsnot_begin(row, n, list_len, guarded, gid, n_grow, err);
    const long long off = r.off;
    const float inf = __uint_as_float(0x7f800000u);
    long long p_hi = 0, p_lo = 0;
    bool active = true;
    for (int cycle = 0; cycle < max_cycles && active; ++cycle) {
        const bool grow_up = pc_sign_code(r.e) == 1;
        const long long j = pc_dsnot_grow(r, grow_hi, grow_lo, p_hi, p_lo, grow_up);
        const long long g0 = j - j % m;
        // torch.argmin over the group: the first minimum, a NaN before anything else
        bool any = false;
        int best = 0;
        float best_s = inf;
        for (int q = 0; q < m; ++q) {
            const bool cand = c.keep[off + g0 + q] != 0 && used[off + g0 + q] == 0;
            any = any || cand;
            const float s = cand ? score[off + g0 + q] : inf;
            if (q == 0 || (!pc_isnan(best_s) && (pc_isnan(s) || pc_lt(s, best_s)))) {
                best = q;
                best_s = s;
            }
        }
        if (p_hi + p_lo >= r.ng || !any) break;  // exhausted
        const long long k = g0 + best;
        const bool take = pc_dsnot_step(c, off, r.gram, j, k, r.sign0, r.e, active);
        p_hi += grow_up ? 1 : 0;
        p_lo += grow_up ? 0 : 1;
        if (pc_lane_id() == 0u) {
            used[off + k] = 1;
            if (take) used[off + j] = 1;  // a regrown weight is never pruned again
        }
        __syncwarp();  // lane 0's writes are seen by every lane in the next cycle
    }
    if (pc_lane_id() == 0u) err[row] = r.e;
}
