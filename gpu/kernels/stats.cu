// Per-input-channel calibration statistics in one pass over the activations.
//
//   x: (n, in) row-major, fp32 / bf16 / fp16
//   sum[j]    = sum_t x[t, j]          (fp32 accumulation)
//   sum_sq[j] = sum_t x[t, j]^2        (fp32 accumulation)
//
// Two deterministic launches (no atomics, so the result does not depend on scheduling):
//   stats_partial_<dtype>_v<V>: grid (ceil(in / (blockDim.x * V)), chunks). Block (cx, c) reads
//     rows [c * rows_per_chunk, (c + 1) * rows_per_chunk) of its column tile; each thread owns
//     V consecutive columns (one aligned V-wide vector load per row, rows unrolled by 4 so that
//     several loads are in flight) and writes its partial sums to part_*[c, j].
//   stats_reduce: one thread per column adds the `chunks` partials in chunk order.
// V > 1 requires in % V == 0 and a V-element-aligned base pointer (checked by the host).

template <typename T, int V>
__device__ __forceinline__ void pc_stats_partial(const T* __restrict__ x, long long n, int in, long long rows_per_chunk,
                                                 float* __restrict__ part_sum, float* __restrict__ part_sq,
                                                 int want_sum, int want_sq) {
    const long long col0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (col0 >= in) return;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = pc_min_ll(n, r0 + rows_per_chunk);
    float s[V], q[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        s[k] = 0.f;
        q[k] = 0.f;
    }
    typedef pc_vec<T, V> vec_t;
    const T* base = x + col0;
    long long r = r0;
    for (; r + 4 <= r1; r += 4) {
        vec_t a0 = *reinterpret_cast<const vec_t*>(base + (r + 0) * (long long)in);
        vec_t a1 = *reinterpret_cast<const vec_t*>(base + (r + 1) * (long long)in);
        vec_t a2 = *reinterpret_cast<const vec_t*>(base + (r + 2) * (long long)in);
        vec_t a3 = *reinterpret_cast<const vec_t*>(base + (r + 3) * (long long)in);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float f0 = pc_to_f32(a0.v[k]), f1 = pc_to_f32(a1.v[k]);
            float f2 = pc_to_f32(a2.v[k]), f3 = pc_to_f32(a3.v[k]);
            s[k] += f0;
            s[k] += f1;
            s[k] += f2;
            s[k] += f3;
            q[k] = fmaf(f0, f0, q[k]);
            q[k] = fmaf(f1, f1, q[k]);
            q[k] = fmaf(f2, f2, q[k]);
            q[k] = fmaf(f3, f3, q[k]);
        }
    }
    for (; r < r1; ++r) {
        vec_t a = *reinterpret_cast<const vec_t*>(base + r * (long long)in);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float f = pc_to_f32(a.v[k]);
            s[k] += f;
            q[k] = fmaf(f, f, q[k]);
        }
    }
    const long long off = (long long)blockIdx.y * in + col0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        if (want_sum) part_sum[off + k] = s[k];
        if (want_sq) part_sq[off + k] = q[k];
    }
}

#define PC_STATS_PARTIAL(NAME, T, V)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        NAME(const T* __restrict__ x, long long n, int in, long long rows_per_chunk, float* __restrict__ ps, \
             float* __restrict__ pq, int want_sum, int want_sq) {                                            \
        pc_stats_partial<T, V>(x, n, in, rows_per_chunk, ps, pq, want_sum, want_sq);                          \
    }

PC_STATS_PARTIAL(stats_partial_f32_v1, float, 1)
PC_STATS_PARTIAL(stats_partial_f32_v4, float, 4)
PC_STATS_PARTIAL(stats_partial_bf16_v1, pc_bf16, 1)
PC_STATS_PARTIAL(stats_partial_bf16_v8, pc_bf16, 8)
PC_STATS_PARTIAL(stats_partial_f16_v1, pc_f16, 1)
PC_STATS_PARTIAL(stats_partial_f16_v8, pc_f16, 8)

extern "C" __global__ void __launch_bounds__(256)
    stats_reduce(const float* __restrict__ part_sum, const float* __restrict__ part_sq, int chunks, int in,
                 float* __restrict__ out_sum, float* __restrict__ out_sq, int want_sum, int want_sq) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= in) return;
    float s = 0.f, q = 0.f;
    for (int c = 0; c < chunks; ++c) {
        const long long off = (long long)c * in + j;
        if (want_sum) s += part_sum[off];
        if (want_sq) q += part_sq[off];
    }
    if (want_sum) out_sum[j] = s;
    if (want_sq) out_sq[j] = q;
}
