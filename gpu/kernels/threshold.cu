// Exact k-th smallest activation score: the threshold of the activation-sparsity methods
// (TEAL, WINA), equal to torch.kthvalue on the same scores.
//
//   x:     (n, in) row-major, fp32 / bf16 / fp16 (numel = n * in entries)
//   scale: (in,) fp32, optional (use_scale = 0: none)
//   s[t, j] = |x[t, j]| * scale[j]     exact widening of |x| to fp32, then one IEEE fp32 multiply
//                                      (pc_mul_rn: round to nearest even, subnormals kept), which
//                                      is torch's `x.abs() * scale`; s = |x| without a scale.
//   result: the k-th smallest s, 1 <= k <= numel, in the order of pc_order_key (every NaN
//           last, -0 == +0), i.e. `s.flatten().kthvalue(k).values`.
//
// Radix select on the 32-bit key, most significant digit first, in 3 passes of 11 / 11 / 10
// bits (digits key[31:21], key[20:10], key[9:0]). Each pass is two launches on one stream, so
// there is no host synchronisation between passes:
//   threshold_hist_<dtype>: grid-stride over all entries (one 16-byte vector per thread and
//     iteration when vec > 1). An entry whose higher digits equal the prefix found so far
//     (state[0]) counts into a 2048-bin shared-memory histogram of the current digit
//     (warp-aggregated shared atomics, __match_any_sync, as in select.cu). Each block then adds
//     its non-zero bins into the pass's global histogram hist[pass, :] with 64-bit atomicAdd:
//     integer counts, so the result does not depend on scheduling.
//   threshold_pick: one warp scans hist[pass, :] (64 bins per lane), finds the bin b holding the
//     need-th counted entry (need = k on the first pass, else state[1]) and stores
//     state = {prefix | b << shift, need - (entries in lower bins)}.
// After the third pass state[0] is the key of the k-th smallest score; the host reads it once
// and decodes it to the float. The host zeroes hist (3 x 2048) before the first pass; state
// needs no initial value (pass 0 takes k as an argument and reads no state).
// vec > 1 requires a 16-byte aligned x and numel % vec == 0 (in % vec == 0 when scaled, so that
// one vector never crosses a row); the host checks both.

#define PC_THRESHOLD_THREADS 256
#define PC_THRESHOLD_BINS 2048
#define PC_THRESHOLD_NO_BIN 0xffffffffu  // the bin of an entry outside the prefix

// Lowest key bit of each pass's digit, and the mask of the digits above it.
__device__ __forceinline__ int pc_threshold_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ unsigned int pc_threshold_higher(int pass) {
    return pass == 0 ? 0u : (pass == 1 ? 0xffe00000u : 0xfffffc00u);
}
__device__ __forceinline__ unsigned int pc_threshold_digit_mask(int pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

template <typename T>
__device__ __forceinline__ unsigned int pc_threshold_key(T v, const float* __restrict__ scale, long long col,
                                                         int use_scale) {
    float s = pc_abs(pc_to_f32(v));
    if (use_scale) s = pc_mul_rn(s, scale[col]);
    return pc_order_key(s);
}

// 64-bit inclusive warp scan (counts may exceed 2^32 in total).
__device__ __forceinline__ unsigned long long pc_warp_inclusive_scan_u64(unsigned long long v) {
    const unsigned int lane = pc_lane_id();
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const unsigned int lo = __shfl_up_sync(PC_FULL_MASK, (unsigned int)v, d);
        const unsigned int hi = __shfl_up_sync(PC_FULL_MASK, (unsigned int)(v >> 32), d);
        if (lane >= (unsigned int)d) v += ((unsigned long long)hi << 32) | lo;
    }
    return v;
}

template <typename T, int V>
__device__ __forceinline__ void pc_threshold_count(const T* __restrict__ x, const float* __restrict__ scale,
                                                   long long numel, int in, int use_scale, int shift,
                                                   unsigned int higher, unsigned int digit_mask, unsigned int prefix,
                                                   unsigned int* s_hist) {
    typedef pc_vec<T, V> vec_t;
    const long long nvec = numel / V;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x;
    // Column of this thread's vector; it moves by `step` columns per iteration (no division in
    // the loop: col, step < in, so one conditional subtraction wraps it).
    long long col = 0, step = 0;
    if (use_scale) {
        col = ((first + threadIdx.x) * V) % in;
        step = (stride * V) % in;
    }
    // Every lane of a warp runs the same iterations (`base` is uniform), so the full-mask
    // __match_any_sync is legal; lanes past the end carry PC_THRESHOLD_NO_BIN.
    for (long long base = first; base < nvec; base += stride) {
        const long long v = base + threadIdx.x;
        unsigned int bin[V];
#pragma unroll
        for (int e = 0; e < V; ++e) bin[e] = PC_THRESHOLD_NO_BIN;
        if (v < nvec) {
            const vec_t a = *reinterpret_cast<const vec_t*>(x + v * V);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const unsigned int key = pc_threshold_key(a.v[e], scale, col + e, use_scale);
                if ((key & higher) == prefix) bin[e] = (key >> shift) & digit_mask;
            }
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
            // Later passes count few entries: skip the match when no lane of the warp has one
            // (a warp-uniform branch, so the match below still sees every lane).
            if (!__any_sync(PC_FULL_MASK, bin[e] != PC_THRESHOLD_NO_BIN)) continue;
            const unsigned int peers = __match_any_sync(PC_FULL_MASK, bin[e]);
            if (bin[e] != PC_THRESHOLD_NO_BIN && (int)pc_lane_id() == __ffs(peers) - 1)
                atomicAdd(&s_hist[bin[e]], (unsigned int)__popc(peers));
        }
        if (use_scale) {
            col += step;
            if (col >= in) col -= in;
        }
    }
}

template <typename T>
__device__ __forceinline__ void pc_threshold_hist(const T* __restrict__ x, const float* __restrict__ scale,
                                                  long long numel, int in, int use_scale, int vec, int pass,
                                                  const unsigned long long* __restrict__ state,
                                                  unsigned long long* __restrict__ hist) {
    __shared__ unsigned int s_hist[PC_THRESHOLD_BINS];
    for (int b = threadIdx.x; b < PC_THRESHOLD_BINS; b += blockDim.x) s_hist[b] = 0u;
    __syncthreads();
    const int shift = pc_threshold_shift(pass);
    const unsigned int higher = pc_threshold_higher(pass);
    const unsigned int digit_mask = pc_threshold_digit_mask(pass);
    const unsigned int prefix = pass == 0 ? 0u : (unsigned int)state[0];
    if (vec > 1) {
        pc_threshold_count<T, 16 / sizeof(T)>(x, scale, numel, in, use_scale, shift, higher, digit_mask, prefix, s_hist);
    } else {
        pc_threshold_count<T, 1>(x, scale, numel, in, use_scale, shift, higher, digit_mask, prefix, s_hist);
    }
    __syncthreads();
    unsigned long long* out = hist + (long long)pass * PC_THRESHOLD_BINS;
    for (int b = threadIdx.x; b < PC_THRESHOLD_BINS; b += blockDim.x) {
        const unsigned int c = s_hist[b];
        if (c) atomicAdd(out + b, (unsigned long long)c);
    }
}

#define PC_THRESHOLD_HIST(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(PC_THRESHOLD_THREADS)                                          \
        threshold_hist_##SUFFIX(const T* __restrict__ x, const float* __restrict__ scale, long long numel, int in, \
                                int use_scale, int vec, int pass, const unsigned long long* __restrict__ state,   \
                                unsigned long long* __restrict__ hist) {                                          \
        pc_threshold_hist<T>(x, scale, numel, in, use_scale, vec, pass, state, hist);                             \
    }

PC_THRESHOLD_HIST(f32, float)
PC_THRESHOLD_HIST(bf16, pc_bf16)
PC_THRESHOLD_HIST(f16, pc_f16)

// One warp: lane l owns bins [64 l, 64 l + 64) of hist[pass, :].
extern "C" __global__ void __launch_bounds__(32)
    threshold_pick(const unsigned long long* __restrict__ hist, unsigned long long* state, int pass, long long k) {
    const unsigned int lane = pc_lane_id();
    const unsigned long long* h = hist + (long long)pass * PC_THRESHOLD_BINS + lane * 64u;
    const unsigned long long need = pass == 0 ? (unsigned long long)k : state[1];
    const unsigned int prefix = pass == 0 ? 0u : (unsigned int)state[0];
    const int shift = pc_threshold_shift(pass);
    unsigned long long local = 0ull;
    for (int q = 0; q < 64; ++q) local += h[q];
    const unsigned long long incl = pc_warp_inclusive_scan_u64(local);
    const unsigned long long excl = incl - local;
    __syncwarp();  // every lane has read state before one of them overwrites it
    if (excl < need && need <= incl) {  // exactly one lane: 1 <= need <= the entries counted
        unsigned long long run = excl;
        for (int q = 0; q < 64; ++q) {
            const unsigned long long c = h[q];
            if (run < need && need <= run + c) {
                state[0] = (unsigned long long)(prefix | ((lane * 64u + (unsigned int)q) << shift));
                state[1] = need - run;
            }
            run += c;
        }
    }
}
