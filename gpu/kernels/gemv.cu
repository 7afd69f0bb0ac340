// Activation-sparse batch-1 GEMV for decode, and the fused R-Sparse sparse + low-rank product.
//
//   x:   (in,)       fp32, or the weight's dtype
//   W^T: (in, out)   input-major, contiguous (row i = the weights that input channel i feeds)
//   keep: a uint8 mask (in,) or an index list (nnz,) (int32 or int64) of the kept inputs;
//         `mode` 0 = mask (list_len = in), 1 = int32 indices, 2 = int64 indices (list_len = nnz);
//         the unused pointer is any valid buffer
//   y[j] = sum_{i kept} x_i * W^T[i, j]                          (fp32 accumulation)
//   R-Sparse adds the low-rank branch on the dropped inputs, with U (out, r), SV (r, in):
//   y[j] += sum_q U[j, q] * z_q,   z_q = sum_{i not kept} SV[q, i] * x_i
//
// Launches (deterministic: fixed summation order, no atomics):
//   gemv_partial_<w>_<x>_v<V>: grid (ceil(out / (blockDim.x * V)), chunks), 128 threads (bounds
//     ask for 8 blocks per SM so ptxas keeps 64 registers and does not spill on sm_80). Block (cx, c) owns the
//     list positions [c * per_chunk, (c + 1) * per_chunk) (mask positions or index-list entries).
//     It compacts the kept rows of each blockDim-sized slice into shared memory (rows ascending,
//     x_i widened to fp32), then every thread streams those rows of W^T over its V consecutive
//     output columns (one aligned V-wide load per row, 4 rows in flight) and accumulates in
//     fp32. Only the kept rows of W^T are read. Partials go to part[c, j].
//   lowrank_z_<w>_<x>: one block per q: z_q over the dropped inputs (mask = 0), fp32.
//   gemv_reduce_<w>: one thread per output: sum of the chunk partials in chunk order (+ U z when
//     rank > 0), rounded once to the weight's dtype.

#define PC_GEMV_THREADS 128

template <typename TW, typename TX, int V>
__device__ __forceinline__ void pc_gemv_partial(const TX* __restrict__ x, const TW* __restrict__ wt, int in, int out,
                                                const unsigned char* __restrict__ mask, const void* __restrict__ idx,
                                                int mode, int list_len, int per_chunk, float* __restrict__ part) {
    __shared__ int s_rows[PC_GEMV_THREADS];
    __shared__ float s_x[PC_GEMV_THREADS];
    __shared__ unsigned int s_warp[PC_GEMV_THREADS / 32];

    const int tid = threadIdx.x;
    const long long col0 = ((long long)blockIdx.x * blockDim.x + tid) * V;
    const bool has_cols = col0 < out;
    const int p0 = blockIdx.y * per_chunk;
    const int p1 = pc_min_i(list_len, p0 + per_chunk);

    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.f;
    typedef pc_vec<TW, V> vec_t;
    const TW* wcol = wt + col0;

    for (int base = p0; base < p1; base += blockDim.x) {
        const int p = base + tid;
        int row = 0;
        bool kept = false;
        if (p < p1) {
            if (mode == 0) {
                row = p;
                kept = mask[p] != 0;
            } else {
                row = mode == 2 ? (int)((const long long*)idx)[p] : ((const int*)idx)[p];
                kept = true;
            }
        }
        unsigned int count;
        const unsigned int slot = pc_block_rank(kept, s_warp, &count);
        if (kept) {
            s_rows[slot] = row;
            s_x[slot] = pc_to_f32(x[row]);
        }
        __syncthreads();
        if (has_cols) {
            int q = 0;
#pragma unroll 1
            for (; q + 4 <= (int)count; q += 4) {  // 4 rows in flight per thread, by hand
                const vec_t a0 = *reinterpret_cast<const vec_t*>(wcol + (long long)s_rows[q + 0] * out);
                const vec_t a1 = *reinterpret_cast<const vec_t*>(wcol + (long long)s_rows[q + 1] * out);
                const vec_t a2 = *reinterpret_cast<const vec_t*>(wcol + (long long)s_rows[q + 2] * out);
                const vec_t a3 = *reinterpret_cast<const vec_t*>(wcol + (long long)s_rows[q + 3] * out);
                const float x0 = s_x[q + 0], x1 = s_x[q + 1], x2 = s_x[q + 2], x3 = s_x[q + 3];
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    acc[k] = fmaf(x0, pc_to_f32(a0.v[k]), acc[k]);
                    acc[k] = fmaf(x1, pc_to_f32(a1.v[k]), acc[k]);
                    acc[k] = fmaf(x2, pc_to_f32(a2.v[k]), acc[k]);
                    acc[k] = fmaf(x3, pc_to_f32(a3.v[k]), acc[k]);
                }
            }
            for (; q < (int)count; ++q) {
                const vec_t a = *reinterpret_cast<const vec_t*>(wcol + (long long)s_rows[q] * out);
                const float xv = s_x[q];
#pragma unroll
                for (int k = 0; k < V; ++k) acc[k] = fmaf(xv, pc_to_f32(a.v[k]), acc[k]);
            }
        }
        __syncthreads();  // s_rows / s_x are rewritten by the next slice
    }
    if (has_cols) {
        float* dst = part + (long long)blockIdx.y * out + col0;
#pragma unroll
        for (int k = 0; k < V; ++k) dst[k] = acc[k];
    }
}

#define PC_GEMV_PARTIAL(NAME, TW, TX, V)                                                                       \
    extern "C" __global__ void __launch_bounds__(PC_GEMV_THREADS, 8)                                          \
        NAME(const TX* __restrict__ x, const TW* __restrict__ wt, int in, int out,                             \
             const unsigned char* __restrict__ mask, const void* __restrict__ idx, int mode, int list_len,      \
             int per_chunk, float* __restrict__ part) {                                                        \
        pc_gemv_partial<TW, TX, V>(x, wt, in, out, mask, idx, mode, list_len, per_chunk, part);                \
    }

PC_GEMV_PARTIAL(gemv_partial_f32_f32_v1, float, float, 1)
PC_GEMV_PARTIAL(gemv_partial_f32_f32_v4, float, float, 4)
PC_GEMV_PARTIAL(gemv_partial_bf16_bf16_v1, pc_bf16, pc_bf16, 1)
PC_GEMV_PARTIAL(gemv_partial_bf16_bf16_v8, pc_bf16, pc_bf16, 8)
PC_GEMV_PARTIAL(gemv_partial_bf16_f32_v1, pc_bf16, float, 1)
PC_GEMV_PARTIAL(gemv_partial_bf16_f32_v8, pc_bf16, float, 8)
PC_GEMV_PARTIAL(gemv_partial_f16_f16_v1, pc_f16, pc_f16, 1)
PC_GEMV_PARTIAL(gemv_partial_f16_f16_v8, pc_f16, pc_f16, 8)
PC_GEMV_PARTIAL(gemv_partial_f16_f32_v1, pc_f16, float, 1)
PC_GEMV_PARTIAL(gemv_partial_f16_f32_v8, pc_f16, float, 8)

// z_q = sum_{i : mask_i == 0} SV[q, i] * x_i; one block (256 threads) per q.
template <typename TW, typename TX>
__device__ __forceinline__ void pc_lowrank_z(const TX* __restrict__ x, const TW* __restrict__ sv, int in,
                                             const unsigned char* __restrict__ mask, float* __restrict__ z) {
    __shared__ float s_part[32];
    const TW* row = sv + (long long)blockIdx.x * in;
    float acc = 0.f;
    for (int i = threadIdx.x; i < in; i += blockDim.x) {
        if (mask[i] == 0) acc = fmaf(pc_to_f32(row[i]), pc_to_f32(x[i]), acc);
    }
    acc = pc_warp_sum(acc);
    if (pc_lane_id() == 0) s_part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        const int nwarps = (blockDim.x + 31) >> 5;
        float v = (int)threadIdx.x < nwarps ? s_part[threadIdx.x] : 0.f;
        v = pc_warp_sum(v);
        if (threadIdx.x == 0) z[blockIdx.x] = v;
    }
}

#define PC_LOWRANK_Z(NAME, TW, TX)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) NAME(const TX* __restrict__ x, const TW* __restrict__ sv, \
                                                           int in, const unsigned char* __restrict__ mask,     \
                                                           float* __restrict__ z) {                            \
        pc_lowrank_z<TW, TX>(x, sv, in, mask, z);                                                     \
    }

PC_LOWRANK_Z(lowrank_z_f32_f32, float, float)
PC_LOWRANK_Z(lowrank_z_bf16_bf16, pc_bf16, pc_bf16)
PC_LOWRANK_Z(lowrank_z_bf16_f32, pc_bf16, float)
PC_LOWRANK_Z(lowrank_z_f16_f16, pc_f16, pc_f16)
PC_LOWRANK_Z(lowrank_z_f16_f32, pc_f16, float)

// y[j] = sum_c part[c, j] (+ sum_q U[j, q] z_q), rounded once to TW. z has `rank` entries
// (rank <= 1024 is staged in shared memory; the host checks).
template <typename TW>
__device__ __forceinline__ void pc_gemv_reduce(const float* __restrict__ part, int chunks, int out,
                                               const TW* __restrict__ u, const float* __restrict__ z, int rank,
                                               TW* __restrict__ y) {
    __shared__ float s_z[1024];
    for (int q = threadIdx.x; q < rank; q += blockDim.x) s_z[q] = z[q];
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= out) return;
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc += part[(long long)c * out + j];
    if (rank > 0) {
        const TW* urow = u + (long long)j * rank;
        float lr = 0.f;
        for (int q = 0; q < rank; ++q) lr = fmaf(pc_to_f32(urow[q]), s_z[q], lr);
        acc += lr;
    }
    y[j] = pc_from_f32<TW>(acc);
}

#define PC_GEMV_REDUCE(NAME, TW)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                     \
        NAME(const float* __restrict__ part, int chunks, int out, const TW* __restrict__ u,               \
             const float* __restrict__ z, int rank, TW* __restrict__ y) {                                 \
        pc_gemv_reduce<TW>(part, chunks, out, u, z, rank, y);                                             \
    }

PC_GEMV_REDUCE(gemv_reduce_f32, float)
PC_GEMV_REDUCE(gemv_reduce_bf16, pc_bf16)
PC_GEMV_REDUCE(gemv_reduce_f16, pc_f16)
