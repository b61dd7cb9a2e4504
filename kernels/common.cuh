// Shared pieces of the sparsification kernels: the magnitude key and its digits, the selection
// state that lives in device memory between launches, and the block-level helpers.
//
// Every kernel here has a CPU twin in src/sparse/ that is its specification; comments name it.
#pragma once
#include <stdint.h>

namespace gtopk {

constexpr int BINS = 2048;
constexpr unsigned INF_KEY = 0x7f800000u;
constexpr unsigned NONE = 0xffffffffu;
// Launch shape shared by the host (src/gpu/launch.rs) and the kernels: the ordered compaction
// needs every block to own whole tiles of TILE consecutive elements.
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int ITEMS = 16;
constexpr int WARP_SPAN = 32 * ITEMS;
constexpr int TILE = THREADS * ITEMS;
constexpr unsigned FULL = 0xffffffffu;

// Twin: radix::magnitude_key. For non-NaN floats it orders like |v|.
__device__ __forceinline__ unsigned key_of(float v) { return __float_as_uint(v) & 0x7fffffffu; }
__device__ __forceinline__ unsigned digit1(unsigned key) { return key >> 21; }
__device__ __forceinline__ unsigned digit2(unsigned key) { return (key >> 10) & 0x7ffu; }
__device__ __forceinline__ unsigned digit3(unsigned key) { return key & 0x3ffu; }

// The state of one selection, zeroed by the host before the first launch and filled pass by pass,
// so no pass needs the host to read anything back. Mirrors src/gpu/select.rs.
struct SelectState {
    unsigned n;        // values to select from
    unsigned k;        // how many to keep, min(k requested, n)
    unsigned dropped;  // n - k: the pairs a merge hands back to the residual
    unsigned bin1, above1;
    unsigned bin2, above2;
    unsigned key, greater, ties;  // the threshold, as radix::Threshold
    unsigned nan_at, inf_at;      // smallest index of a NaN / an infinity; NONE if there is none
    unsigned cand_written;        // candidates pass 2 put into the buffer
    unsigned done[4];             // last-block counters, one per pass
    unsigned pad;
};

struct Workspace {
    SelectState s;
    unsigned hist[3][BINS];
};

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ unsigned lanes_below() { return (1u << lane_id()) - 1u; }

// Sum over the block; every thread gets the total.
__device__ __forceinline__ unsigned block_sum(unsigned v) {
    __shared__ unsigned warp_total[WARPS];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    __syncthreads();
    if (lane_id() == 0) warp_total[threadIdx.x / 32] = v;
    __syncthreads();
    unsigned total = 0;
    for (int w = 0; w < WARPS; ++w) total += warp_total[w];
    return total;
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
__device__ __forceinline__ unsigned block_exclusive_sum(unsigned v, unsigned* total) {
    __shared__ unsigned warp_total[WARPS];
    unsigned incl = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned up = __shfl_up_sync(FULL, incl, o);
        if (lane_id() >= (unsigned)o) incl += up;
    }
    __syncthreads();
    if (lane_id() == 31) warp_total[threadIdx.x / 32] = incl;
    __syncthreads();
    unsigned before = 0, sum = 0;
    for (int w = 0; w < WARPS; ++w) {
        if (w < (int)(threadIdx.x / 32)) before += warp_total[w];
        sum += warp_total[w];
    }
    *total = sum;
    return before + incl - v;
}

// The last block to finish a pass (AIR top-k's trick): each block publishes its histogram with
// atomics, fences, and counts itself in; the one that completes the count sees every histogram.
// The __syncthreads between the fence and the counter is what keeps the other threads' atomics
// ordered before it (CCCL #10627). atomicInc wraps, so the counter is ready for the next call.
__device__ __forceinline__ bool last_block(unsigned* counter) {
    __shared__ bool is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
    __syncthreads();
    return is_last;
}

// Twin: radix::find_bin. Scanning bins from the top, the bin holding the `need`-th largest key and
// the count in the bins above it. Run by one whole block; exactly one thread writes the answer.
__device__ __forceinline__ void choose_bin(const unsigned* hist, unsigned need, unsigned* bin, unsigned* above) {
    constexpr int PER = BINS / THREADS;
    const int first = threadIdx.x * PER;
    unsigned mine = 0;
    for (int b = 0; b < PER; ++b) mine += __ldcg(hist + first + b);
    unsigned total;
    unsigned lower = block_exclusive_sum(mine, &total);
    // Keys in bins above this thread's bins are counted by the threads above it.
    unsigned acc = total - lower - mine;
    for (int b = PER - 1; b >= 0; --b) {
        unsigned c = __ldcg(hist + first + b);
        if (acc < need && need <= acc + c) {
            *bin = first + b;
            *above = acc;
        }
        acc += c;
    }
}

__device__ __forceinline__ void shared_zero(unsigned* h) {
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) h[b] = 0;
    __syncthreads();
}

__device__ __forceinline__ void shared_flush(const unsigned* h, unsigned* global) {
    __syncthreads();
    for (int b = threadIdx.x; b < BINS; b += blockDim.x)
        if (h[b]) atomicAdd(global + b, h[b]);
}

// Twin: the NaN check of radix::digit1_histogram, extended to infinities for the caller.
__device__ __forceinline__ void note_nonfinite(unsigned key, unsigned i, unsigned* nan_at, unsigned* inf_at) {
    if (key > INF_KEY) *nan_at = min(*nan_at, i);
    else if (key == INF_KEY) *inf_at = min(*inf_at, i);
}

__device__ __forceinline__ void publish_nonfinite(SelectState* s, unsigned nan_at, unsigned inf_at) {
    if (nan_at != NONE) atomicMin(&s->nan_at, nan_at);
    if (inf_at != NONE) atomicMin(&s->inf_at, inf_at);
}

}  // namespace gtopk
