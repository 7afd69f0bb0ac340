// KEEP-mask selection, bit-identical to prune_cli.methods.base.select (torch's stable sort).
//
// Scores come from a "key source": either a fp32 score matrix (out, in), or the Wanda score
// |W_ij| * norm_j fused in (W in fp32 / bf16 / fp16, norm fp32 (in,)), computed exactly as
// torch's `weight.abs().float() * norm` (exact widening, then one IEEE fp32 multiply).
// Each score becomes pc_order_key(score); the total order is (key, index). Removing the k
// smallest in that order is removing the first k of a stable ascending sort.
//
// Unstructured, per row (select_rows_*): one thread block per row, any width.
//   k = floor(in * sparsity) is given. Radix select on the 32-bit key, 8 bits per pass from
//   the top (4 passes), finds K*, the k-th smallest key, and `need`, how many elements equal
//   to K* are removed (1 <= need <= ties). Then one pass in index order removes every key < K*
//   and the first `need` keys == K* (a block-wide prefix count of the ties: lower index first).
//   Keys live in dynamic shared memory when the host grants in * 4 bytes (use_smem = 1);
//   otherwise each pass recomputes them from global memory (rows of any width work).
//   Histograms use warp-aggregated shared atomics (__match_any_sync) since most keys of a row
//   share their top bits.
//
// N:M (select_nm_*): every group of m consecutive inputs (m <= 32) keeps m - prune entries.
//   grid (out, tiles); a block of 256 threads handles (256 / m) whole groups of one row per
//   tile: keys go to shared memory, then each thread ranks its own element inside its group,
//   rank = #{q : key_q < key or (key_q == key and q < pos)}, and is removed iff rank < prune.
//
// Output: uint8 keep mask (out, in), 1 = kept (viewed as torch.bool by the host).

#define PC_SELECT_THREADS 512
#define PC_NM_THREADS 256

struct pc_score_keys {
    const float* __restrict__ score;
    int in;
    __device__ __forceinline__ unsigned int key(long long row_off, int col) const {
        return pc_order_key(score[row_off + col]);
    }
};

template <typename T>
struct pc_wanda_keys {
    const T* __restrict__ weight;
    const float* __restrict__ norm;
    int in;
    __device__ __forceinline__ unsigned int key(long long row_off, int col) const {
        return pc_order_key(pc_mul_rn(pc_abs(pc_to_f32(weight[row_off + col])), norm[col]));
    }
};

template <class Src>
__device__ __forceinline__ void pc_select_row(const Src& src, int in, int k, int use_smem,
                                              unsigned char* __restrict__ keep) {
    extern __shared__ unsigned int s_keys[];
    __shared__ unsigned int s_hist[256];
    __shared__ unsigned int s_warp[32];
    __shared__ unsigned int s_prefix, s_need, s_ties;

    const long long row_off = (long long)blockIdx.x * in;
    unsigned char* out = keep + row_off;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;

    if (k <= 0 || k >= in) {  // nothing or everything removed (the host avoids these)
        const unsigned char v = k <= 0 ? 1 : 0;
        for (int j = tid; j < in; j += nthreads) out[j] = v;
        return;
    }
    if (use_smem) {
        for (int j = tid; j < in; j += nthreads) s_keys[j] = src.key(row_off, j);
        // the first __syncthreads below publishes them
    }

    unsigned int prefix = 0u, prefix_mask = 0u, need = (unsigned int)k, ties = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += nthreads) s_hist[b] = 0u;
        __syncthreads();
        // All lanes of a warp run the same number of iterations (uniform `base`), so the
        // full-mask __match_any_sync is legal; out-of-row lanes use the sentinel bin 256.
        for (int base = 0; base < in; base += nthreads) {
            const int j = base + tid;
            unsigned int bin = 256u;
            if (j < in) {
                const unsigned int kv = use_smem ? s_keys[j] : src.key(row_off, j);
                if ((kv & prefix_mask) == prefix) bin = (kv >> shift) & 0xffu;
            }
            const unsigned int peers = __match_any_sync(PC_FULL_MASK, bin);
            if (bin != 256u && (int)pc_lane_id() == __ffs(peers) - 1) atomicAdd(&s_hist[bin], (unsigned int)__popc(peers));
        }
        __syncthreads();
        if (tid < 32) {
            // Warp 0 scans the 256 bins (8 per lane) and finds the bin holding the need-th key.
            unsigned int c[8];
            unsigned int local = 0u;
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                c[q] = s_hist[tid * 8 + q];
                local += c[q];
            }
            const unsigned int incl = pc_warp_inclusive_scan(local);
            const unsigned int excl = incl - local;
            if (excl < need && need <= incl) {  // exactly one lane
                unsigned int run = excl;
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    if (run < need && need <= run + c[q]) {
                        s_prefix = prefix | ((unsigned int)(tid * 8 + q) << shift);
                        s_need = need - run;
                        s_ties = c[q];
                    }
                    run += c[q];
                }
            }
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        ties = s_ties;
        prefix_mask |= 0xffu << shift;
    }
    // K* = prefix: `ties` keys equal it, the first `need` of them (by index) are removed.
    const unsigned int kstar = prefix;
    if (need == ties) {
        for (int j = tid; j < in; j += nthreads) {
            const unsigned int kv = use_smem ? s_keys[j] : src.key(row_off, j);
            out[j] = kv > kstar ? 1 : 0;
        }
        return;
    }
    unsigned int carry = 0u;
    for (int base = 0; base < in; base += nthreads) {
        const int j = base + tid;
        unsigned int kv = 0xffffffffu;
        if (j < in) kv = use_smem ? s_keys[j] : src.key(row_off, j);
        const bool tie = j < in && kv == kstar;
        unsigned int total;
        const unsigned int rank = carry + pc_block_rank(tie, s_warp, &total);
        if (j < in) out[j] = (kv < kstar || (tie && rank < need)) ? 0 : 1;
        carry += total;
    }
}

template <class Src>
__device__ __forceinline__ void pc_select_nm(const Src& src, int in, int m, int prune,
                                             unsigned char* __restrict__ keep) {
    __shared__ unsigned int s_key[PC_NM_THREADS];
    const int tid = threadIdx.x;
    const int groups_per_tile = PC_NM_THREADS / m;
    const int tile_elems = groups_per_tile * m;
    const int tiles = (in + tile_elems - 1) / tile_elems;
    const long long row_off = (long long)blockIdx.x * in;
    const int pos = tid % m;
    const int g0 = tid - pos;
    for (int tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
        const int col = tile * tile_elems + tid;
        const bool active = tid < tile_elems && col < in;  // in % m == 0: groups are whole
        if (active) s_key[tid] = src.key(row_off, col);
        __syncthreads();
        if (active) {
            const unsigned int mine = s_key[tid];
            int rank = 0;
            for (int q = 0; q < m; ++q) {
                const unsigned int other = s_key[g0 + q];
                rank += (other < mine || (other == mine && q < pos)) ? 1 : 0;
            }
            keep[row_off + col] = rank < prune ? 0 : 1;
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(PC_SELECT_THREADS)
    select_rows_score(const float* __restrict__ score, int in, int k, int use_smem, unsigned char* __restrict__ keep) {
    const pc_score_keys src = {score, in};
    pc_select_row(src, in, k, use_smem, keep);
}

extern "C" __global__ void __launch_bounds__(PC_NM_THREADS)
    select_nm_score(const float* __restrict__ score, int in, int m, int prune, unsigned char* __restrict__ keep) {
    const pc_score_keys src = {score, in};
    pc_select_nm(src, in, m, prune, keep);
}

#define PC_WANDA_KERNELS(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(PC_SELECT_THREADS)                                               \
        select_rows_wanda_##SUFFIX(const T* __restrict__ weight, const float* __restrict__ norm, int in, int k,   \
                                   int use_smem, unsigned char* __restrict__ keep) {                              \
        const pc_wanda_keys<T> src = {weight, norm, in};                                                          \
        pc_select_row(src, in, k, use_smem, keep);                                                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(PC_NM_THREADS)                                                   \
        select_nm_wanda_##SUFFIX(const T* __restrict__ weight, const float* __restrict__ norm, int in, int m,     \
                                 int prune, unsigned char* __restrict__ keep) {                                   \
        const pc_wanda_keys<T> src = {weight, norm, in};                                                          \
        pc_select_nm(src, in, m, prune, keep);                                                                    \
    }

PC_WANDA_KERNELS(f32, float)
PC_WANDA_KERNELS(bf16, pc_bf16)
PC_WANDA_KERNELS(f16, pc_f16)
