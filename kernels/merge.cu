// The paper's merge (eq. 6) of two index-sorted sparse sets: the union with values summed on equal
// indices, then exactly k kept by the selection order, the rest returned for the residual. Twin:
// merge::merge_into.
//
// Launch order (src/gpu/merge.rs): memset(ws, tiles) -> merge_place -> union_count -> union_scan
// -> union_write -> select_init_device_n -> hist1 -> pass2 -> pass3 -> tile_count -> tile_scan
// -> compact (with the union's indices as the map and the dropped outputs).
#include "compact.cuh"

using namespace gtopk;

__device__ __forceinline__ unsigned lower_bound(const unsigned* a, unsigned n, unsigned v) {
    unsigned lo = 0, hi = n;
    while (lo < hi) {
        const unsigned mid = (lo + hi) / 2;
        if (a[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ unsigned upper_bound(const unsigned* a, unsigned n, unsigned v) {
    unsigned lo = 0, hi = n;
    while (lo < hi) {
        const unsigned mid = (lo + hi) / 2;
        if (a[mid] <= v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Every pair finds its place in the merged sequence by one binary search in the other set; on an
// equal index a's pair comes first and b's is marked as its tail (the sets' indices are unique).
extern "C" __global__ void gtopk_merge_place(const unsigned* __restrict__ ai, const float* __restrict__ av,
                                             unsigned na, const unsigned* __restrict__ bi,
                                             const float* __restrict__ bv, unsigned nb, unsigned* mi, float* mv,
                                             unsigned char* tail) {
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g < na) {
        const unsigned pos = g + lower_bound(bi, nb, ai[g]);
        mi[pos] = ai[g];
        mv[pos] = av[g];
        tail[pos] = 0;
    } else if (g < na + nb) {
        const unsigned q = g - na;
        const unsigned p = upper_bound(ai, na, bi[q]);
        mi[p + q] = bi[q];
        mv[p + q] = bv[q];
        tail[p + q] = p > 0 && ai[p - 1] == bi[q];
    }
}

struct UnionSrc {
    const unsigned* mi;
    const float* mv;
    const unsigned char* tail;
    unsigned n;
    __device__ __forceinline__ bool above(unsigned j) const { return !tail[j]; }
    __device__ __forceinline__ bool tied(unsigned) const { return false; }
    __device__ __forceinline__ unsigned index(unsigned j) const { return mi[j]; }
    // a's value plus b's, in that order, as the twin adds them.
    __device__ __forceinline__ float value(unsigned j) const {
        return (j + 1 < n && tail[j + 1]) ? __fadd_rn(mv[j], mv[j + 1]) : mv[j];
    }
    __device__ __forceinline__ void kept(unsigned) const {}
};

// Heads (first pair of each index) per tile of the merged sequence of n = na + nb pairs.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_union_count(const unsigned char* tail, unsigned n, unsigned* tile_heads) {
    for (unsigned t = blockIdx.x; t < tiles_of(n); t += gridDim.x) {
        unsigned heads = 0;
        for (int it = 0; it < ITEMS; ++it) {
            const unsigned j = t * TILE + it * THREADS + threadIdx.x;
            heads += j < n && !tail[j];
        }
        heads = block_sum(heads);
        if (threadIdx.x == 0) tile_heads[t] = heads;
    }
}

// One block: prefix over tiles; the union's length goes to the selection state. `tile_zero` is an
// all-zero array standing in for the tie counts.
extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_union_scan(unsigned n, unsigned* tile_heads, unsigned* tile_zero, Workspace* ws) {
    tile_scan(tile_heads, tile_zero, tiles_of(n), &ws->s.n);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    gtopk_union_write(const unsigned* mi, const float* mv, const unsigned char* tail, unsigned n,
                      const unsigned* tile_heads, const unsigned* tile_zero, unsigned* ui, float* uv) {
    const UnionSrc src{mi, mv, tail, n};
    for (unsigned t = blockIdx.x; t < tiles_of(n); t += gridDim.x)
        compact_tile(src, n, t, 0, tile_heads[t], tile_zero[t], ui, uv, nullptr, nullptr);
}
