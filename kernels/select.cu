// Exact top-k by magnitude: radix select on the 31-bit key (digits of 11, 11 and 10 bits), then an
// ordered compaction that emits exactly k (index, value) pairs sorted by index, ties going to the
// smaller index. Twins: radix::top_digit (pass 1), radix::refine (passes 2 and 3), topk::top_k
// (candidates and compaction), compressor's accumulate (the fused error-feedback pass).
//
// Launch order, all on one stream and with no host round trip (src/gpu/select.rs):
//   memset(ws) -> select_init -> hist1 | accumulate -> pass2 -> pass3 -> tile_count -> tile_scan
//   -> compact
// Full reads of the input: pass 1, pass 2 and the compaction. Pass 2 buffers the candidates (keys
// whose top digit is the k-th's) when they fit, so pass 3 and the tile count read only those.
#include "compact.cuh"

using namespace gtopk;

extern "C" __global__ void gtopk_select_init(Workspace* ws, unsigned n, unsigned k) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        ws->s.n = n;
        ws->s.k = min(k, n);
        ws->s.dropped = n - min(k, n);
        ws->s.nan_at = NONE;
        ws->s.inf_at = NONE;
    }
}

// Same, for a length already on the device (the merge's union).
extern "C" __global__ void gtopk_select_init_device_n(Workspace* ws, unsigned k) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        const unsigned n = ws->s.n;
        ws->s.k = min(k, n);
        ws->s.dropped = n - min(k, n);
        ws->s.nan_at = NONE;
        ws->s.inf_at = NONE;
    }
}

__device__ __forceinline__ void finish_pass1(Workspace* ws, const unsigned* h, unsigned nan_at, unsigned inf_at) {
    publish_nonfinite(&ws->s, nan_at, inf_at);
    shared_flush(h, ws->hist[0]);
    if (last_block(&ws->s.done[0]) && ws->s.k > 0) choose_bin(ws->hist[0], ws->s.k, &ws->s.bin1, &ws->s.above1);
}

// Pass 1 over a vector: the histogram of top digits, and the bin of the k-th largest key.
extern "C" __global__ void __launch_bounds__(THREADS) gtopk_hist1(const float* __restrict__ x, Workspace* ws) {
    __shared__ unsigned h[BINS];
    shared_zero(h);
    const unsigned n = ws->s.n;
    unsigned nan_at = NONE, inf_at = NONE;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned key = key_of(x[i]);
        note_nonfinite(key, i, &nan_at, &inf_at);
        atomicAdd(&h[digit1(key)], 1u);
    }
    finish_pass1(ws, h, nan_at, inf_at);
}

// Error feedback fused into pass 1: acc = residual + g, where g is the gradient or, with momentum
// correction, u = m * u + grad. `acc` holds the residual on entry and the accumulator on exit; the
// compaction later zeroes the sent entries in place, leaving the new residual. Explicit _rn
// operations keep nvcc from contracting into an FMA, so the bits match the CPU twin.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_accumulate(const float* __restrict__ grad, float* __restrict__ acc, float* __restrict__ mom, float m,
                     Workspace* ws) {
    __shared__ unsigned h[BINS];
    shared_zero(h);
    const unsigned n = ws->s.n;
    unsigned nan_at = NONE, inf_at = NONE;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = grad[i];
        if (mom) {
            g = __fadd_rn(__fmul_rn(m, mom[i]), g);
            mom[i] = g;
        }
        const float a = __fadd_rn(acc[i], g);
        acc[i] = a;
        const unsigned key = key_of(a);
        note_nonfinite(key, i, &nan_at, &inf_at);
        atomicAdd(&h[digit1(key)], 1u);
    }
    finish_pass1(ws, h, nan_at, inf_at);
}

__device__ __forceinline__ bool buffered(const Workspace* ws, unsigned cap) {
    return __ldcg(&ws->hist[0][ws->s.bin1]) <= cap;
}

// Pass 2: histogram of the middle digit among the candidates; per tile, the count of keys whose top
// digit is above the k-th's (all kept); the candidates into the buffer when they all fit.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_pass2(const float* __restrict__ x, Workspace* ws, unsigned* cand_key, unsigned* cand_idx, unsigned cap,
                unsigned* tile_above) {
    __shared__ unsigned h[BINS];
    shared_zero(h);
    const unsigned n = ws->s.n, bin1 = ws->s.bin1;
    const bool buffer = buffered(ws, cap);
    for (unsigned t = blockIdx.x; t < tiles_of(n); t += gridDim.x) {
        unsigned above = 0;
        for (int it = 0; it < ITEMS; ++it) {
            const unsigned i = t * TILE + it * THREADS + threadIdx.x;
            unsigned key = 0;
            bool cand = false;
            if (i < n) {
                key = key_of(x[i]);
                above += digit1(key) > bin1;
                cand = digit1(key) == bin1;
                if (cand) atomicAdd(&h[digit2(key)], 1u);
            }
            // One atomic per warp reserves the warp's slots in the buffer.
            const unsigned mask = __ballot_sync(FULL, cand && buffer);
            if (mask) {
                const unsigned leader = __ffs(mask) - 1;
                unsigned base = 0;
                if (lane_id() == leader) base = atomicAdd(&ws->s.cand_written, __popc(mask));
                base = __shfl_sync(FULL, base, leader);
                if (cand) {
                    const unsigned p = base + __popc(mask & lanes_below());
                    cand_key[p] = key;
                    cand_idx[p] = i;
                }
            }
        }
        above = block_sum(above);
        if (threadIdx.x == 0) tile_above[t] = above;
    }
    shared_flush(h, ws->hist[1]);
    if (last_block(&ws->s.done[1]) && ws->s.k > 0)
        choose_bin(ws->hist[1], ws->s.k - ws->s.above1, &ws->s.bin2, &ws->s.above2);
}

// The candidates: from the buffer when pass 2 filled it, else the whole input again.
struct Candidates {
    const float* x;
    const unsigned* key;
    const unsigned* idx;
    bool buffered;
    unsigned count;
    __device__ __forceinline__ Candidates(const float* x_, const Workspace* ws, const unsigned* key_,
                                          const unsigned* idx_, unsigned cap)
        : x(x_), key(key_), idx(idx_), buffered(::buffered(ws, cap)) {
        count = buffered ? __ldcg(&ws->hist[0][ws->s.bin1]) : ws->s.n;
    }
    __device__ __forceinline__ unsigned key_at(unsigned j) const { return buffered ? key[j] : key_of(x[j]); }
    __device__ __forceinline__ unsigned index_at(unsigned j) const { return buffered ? idx[j] : j; }
};

// Pass 3: histogram of the last digit among keys sharing the k-th's top two digits; the last block
// fixes the threshold key, how many keys lie above it and how many ties to take.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_pass3(const float* __restrict__ x, Workspace* ws, const unsigned* cand_key, const unsigned* cand_idx,
                unsigned cap) {
    __shared__ unsigned h[BINS];
    shared_zero(h);
    const Candidates c(x, ws, cand_key, cand_idx, cap);
    const unsigned bin1 = ws->s.bin1, bin2 = ws->s.bin2;
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < c.count; j += gridDim.x * blockDim.x) {
        const unsigned key = c.key_at(j);
        if (digit1(key) == bin1 && digit2(key) == bin2) atomicAdd(&h[digit3(key)], 1u);
    }
    shared_flush(h, ws->hist[2]);
    if (last_block(&ws->s.done[2]) && ws->s.k > 0) {
        __shared__ unsigned bin3, above3;
        choose_bin(ws->hist[2], ws->s.k - ws->s.above1 - ws->s.above2, &bin3, &above3);
        __syncthreads();
        if (threadIdx.x == 0) {
            ws->s.key = (bin1 << 21) | (bin2 << 10) | bin3;
            ws->s.greater = ws->s.above1 + ws->s.above2 + above3;
            ws->s.ties = ws->s.k - ws->s.greater;
        }
    }
}

// Per tile, the candidates above the threshold join pass 2's count; those equal to it are counted
// as ties. `tile_tied` must be zero on entry.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_tile_count(const float* __restrict__ x, Workspace* ws, const unsigned* cand_key, const unsigned* cand_idx,
                     unsigned cap, unsigned* tile_above, unsigned* tile_tied) {
    const Candidates c(x, ws, cand_key, cand_idx, cap);
    const unsigned bin1 = ws->s.bin1, t = ws->s.key;
    if (ws->s.k == 0) return;
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < c.count; j += gridDim.x * blockDim.x) {
        const unsigned key = c.key_at(j);
        if (digit1(key) != bin1) continue;
        if (key > t) atomicAdd(&tile_above[c.index_at(j) / TILE], 1u);
        else if (key == t) atomicAdd(&tile_tied[c.index_at(j) / TILE], 1u);
    }
}

// One block: exclusive prefix over tiles.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_tile_scan(const Workspace* ws, unsigned* tile_above, unsigned* tile_tied) {
    tile_scan(tile_above, tile_tied, tiles_of(ws->s.n), nullptr);
}

struct SelectSrc {
    float* x;
    const unsigned* map;
    unsigned key;
    bool zero_kept;
    __device__ __forceinline__ bool above(unsigned i) const { return key_of(x[i]) > key; }
    __device__ __forceinline__ bool tied(unsigned i) const { return key_of(x[i]) == key; }
    __device__ __forceinline__ unsigned index(unsigned i) const { return map ? map[i] : i; }
    __device__ __forceinline__ float value(unsigned i) const { return x[i]; }
    __device__ __forceinline__ void kept(unsigned i) const {
        if (zero_kept) x[i] = 0.0f;
    }
};

// The ordered compaction: exactly k pairs sorted by index into out_*; the rest into drop_* when
// given (the merge's dropped pairs); kept entries of x zeroed when zero_kept (the residual).
// `map` (nullable) turns positions into the indices to emit (the union's indices for the merge).
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_compact(float* x, const unsigned* map, const Workspace* ws, const unsigned* tile_above,
                  const unsigned* tile_tied, unsigned* out_idx, float* out_val, unsigned* drop_idx, float* drop_val,
                  int zero_kept) {
    const unsigned n = ws->s.n;
    if (ws->s.k == 0) return;
    const SelectSrc src{x, map, ws->s.key, zero_kept != 0};
    for (unsigned t = blockIdx.x; t < tiles_of(n); t += gridDim.x)
        compact_tile(src, n, t, ws->s.ties, tile_above[t], tile_tied[t], out_idx, out_val, drop_idx, drop_val);
}
