// Ordered compaction: elements are classified as "above" (always kept) or "tied" (kept while fewer
// than `ties` tied elements precede them in index order); kept elements land at
//     position = above_before + min(tied_before, ties)
// and the rest, when asked for, at index - position. Both outputs stay in index order without any
// sort. Used by the top-k selection (twin: topk::top_k's final merge of `above` and the cutoff)
// and by the union step of the merge (every head kept, no ties).
//
// Tiles of TILE elements; within a tile each warp owns WARP_SPAN consecutive elements. The host runs
//   count (per tile, into tile_above / tile_tied) -> tile_scan (exclusive, in place) -> write.
#pragma once
#include "common.cuh"

namespace gtopk {

__device__ __forceinline__ unsigned tiles_of(unsigned n) { return (n + TILE - 1) / TILE; }

// Exclusive prefix over tiles of both counts, in place, by one block. `total_above` (nullable)
// receives the sum of tile_above: the union's length for the merge.
__device__ __forceinline__ void tile_scan(unsigned* tile_above, unsigned* tile_tied, unsigned ntiles,
                                          unsigned* total_above) {
    const unsigned per = (ntiles + THREADS - 1) / THREADS;
    const unsigned lo = min(ntiles, threadIdx.x * per), hi = min(ntiles, lo + per);
    unsigned sa = 0, st = 0;
    for (unsigned t = lo; t < hi; ++t) {
        sa += tile_above[t];
        st += tile_tied[t];
    }
    unsigned all_above, all_tied;
    unsigned ba = block_exclusive_sum(sa, &all_above);
    unsigned bt = block_exclusive_sum(st, &all_tied);
    for (unsigned t = lo; t < hi; ++t) {
        unsigned a = tile_above[t], d = tile_tied[t];
        tile_above[t] = ba;
        tile_tied[t] = bt;
        ba += a;
        bt += d;
    }
    if (threadIdx.x == 0 && total_above) *total_above = all_above;
}

// One tile of the write step. `Src` answers, for an element index below n:
//   above(i), tied(i)      the classification
//   index(i), value(i)     what to emit
//   kept(i)                called for each kept element (the selection zeroes the residual there)
template <class Src>
__device__ __forceinline__ void compact_tile(const Src& src, unsigned n, unsigned t, unsigned ties,
                                             unsigned above_base, unsigned tied_base, unsigned* out_idx,
                                             float* out_val, unsigned* drop_idx, float* drop_val) {
    __shared__ unsigned warp_above[WARPS], warp_tied[WARPS];
    const unsigned warp = threadIdx.x / 32;
    const unsigned start = t * TILE + warp * WARP_SPAN;
    unsigned ca = 0, ct = 0;
    for (int it = 0; it < ITEMS; ++it) {
        const unsigned i = start + it * 32 + lane_id();
        const bool in = i < n;
        ca += __popc(__ballot_sync(FULL, in && src.above(i)));
        ct += __popc(__ballot_sync(FULL, in && src.tied(i)));
    }
    __syncthreads();
    if (lane_id() == 0) {
        warp_above[warp] = ca;
        warp_tied[warp] = ct;
    }
    __syncthreads();
    unsigned ra = above_base, rt = tied_base;
    for (unsigned w = 0; w < warp; ++w) {
        ra += warp_above[w];
        rt += warp_tied[w];
    }
    for (int it = 0; it < ITEMS; ++it) {
        const unsigned i = start + it * 32 + lane_id();
        const bool in = i < n;
        const bool a = in && src.above(i);
        const bool d = in && src.tied(i);
        const unsigned ma = __ballot_sync(FULL, a), md = __ballot_sync(FULL, d);
        const unsigned above_before = ra + __popc(ma & lanes_below());
        const unsigned tied_before = rt + __popc(md & lanes_below());
        ra += __popc(ma);
        rt += __popc(md);
        if (!in) continue;
        const unsigned pos = above_before + min(tied_before, ties);
        if (a || (d && tied_before < ties)) {
            out_idx[pos] = src.index(i);
            out_val[pos] = src.value(i);
            src.kept(i);
        } else if (drop_idx) {
            drop_idx[i - pos] = src.index(i);
            drop_val[i - pos] = src.value(i);
        }
    }
}

}  // namespace gtopk
