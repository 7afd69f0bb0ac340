// Shared device helpers, prepended to every kernel module by prune_cli.gpu.kernel_source.
//
// No CUDA header is included anywhere: 16-bit floats are carried as raw bits and converted
// with explicit PTX, so every module compiles with NVRTC alone (no toolkit headers, no driver).
//
// Floating-point rules that keep masks bit-identical to the torch path:
// * CuPy compiles with -ftz=true. Every multiply whose result decides a mask is therefore
//   written as explicit PTX `mul.rn.f32` (IEEE round-to-nearest-even, subnormals kept), which
//   is what torch's `a * b` does on CPU and CUDA.
// * Scores are ranked through pc_order_key: an unsigned key whose order is the float order,
//   with -0 == +0 and every NaN above +inf (where torch.sort puts NaN); ties are then broken by
//   index, lower index removed first (a stable ascending sort).

#define PC_FULL_MASK 0xffffffffu

struct pc_bf16 {
    unsigned short bits;
};
struct pc_f16 {
    unsigned short bits;
};

// Aligned vector of V elements: one 4/8/16-byte load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) pc_vec {
    T v[V];
};

__device__ __forceinline__ float pc_to_f32(float v) { return v; }
__device__ __forceinline__ float pc_to_f32(pc_bf16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);  // exact
}
__device__ __forceinline__ float pc_to_f32(pc_f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));  // exact, subnormals included
    return f;
}

template <typename T>
__device__ __forceinline__ T pc_from_f32(float f);
template <>
__device__ __forceinline__ float pc_from_f32<float>(float f) {
    return f;
}
template <>
__device__ __forceinline__ pc_bf16 pc_from_f32<pc_bf16>(float f) {
    // Round to nearest even, NaN -> canonical quiet NaN (as c10::BFloat16 does).
    unsigned int u = __float_as_uint(f);
    pc_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)0x7fc0u;
    } else {
        r.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return r;
}
template <>
__device__ __forceinline__ pc_f16 pc_from_f32<pc_f16>(float f) {
    pc_f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}

// IEEE single multiply, round to nearest even, no flush to zero (immune to -ftz=true).
__device__ __forceinline__ float pc_mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float pc_abs(float a) { return __uint_as_float(__float_as_uint(a) & 0x7fffffffu); }

// Monotone unsigned key of a float: a < b (as floats) <=> key(a) < key(b); -0 and +0 share a
// key; every NaN maps to the largest key (torch.sort puts NaN last, ties among them by index).
__device__ __forceinline__ unsigned int pc_order_key(float f) {
    unsigned int u = __float_as_uint(f);
    unsigned int mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return 0xffffffffu;
    if (mag == 0u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned int pc_lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ unsigned int pc_lanemask_lt() { return (1u << pc_lane_id()) - 1u; }

__device__ __forceinline__ unsigned int pc_warp_inclusive_scan(unsigned int v) {
    const unsigned int lane = pc_lane_id();
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        unsigned int n = __shfl_up_sync(PC_FULL_MASK, v, d);
        if (lane >= (unsigned int)d) v += n;
    }
    return v;
}

__device__ __forceinline__ float pc_warp_sum(float v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(PC_FULL_MASK, v, d);
    return v;
}

// Block-wide stream compaction helper: thread `flag`s are ranked in thread order.
// Returns this thread's rank among the flagged threads of the block and writes the block's
// total to *total. `s_warp` needs blockDim.x / 32 entries. Contains two __syncthreads().
__device__ __forceinline__ unsigned int pc_block_rank(bool flag, unsigned int* s_warp, unsigned int* total) {
    const unsigned int lane = pc_lane_id();
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int nwarps = (blockDim.x + 31u) >> 5;
    unsigned int ballot = __ballot_sync(PC_FULL_MASK, flag);
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    unsigned int before = 0, all = 0;
    for (unsigned int w = 0; w < nwarps; ++w) {
        unsigned int c = s_warp[w];
        before += (w < warp) ? c : 0u;
        all += c;
    }
    __syncthreads();
    *total = all;
    return before + __popc(ballot & pc_lanemask_lt());
}

__device__ __forceinline__ int pc_min_i(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ long long pc_min_ll(long long a, long long b) { return a < b ? a : b; }
