// Sparse scatter-add: dense[idx[j]] += val[j] / divisor. Twin: scatter::scatter_add_div. The
// indices of one set are unique, so no two threads touch the same element and no atomics are
// needed; several sets are added one launch after another, which keeps the sum's order (and its
// bits) the twin's. Division rather than a multiply by 1/P, so the result is bit-identical to the
// CPU path for every P.
#include "common.cuh"

using namespace gtopk;

// `count_at` (nullable) reads the number of pairs from the device, where an earlier kernel wrote it
// (the merge's dropped pairs).
extern "C" __global__ void gtopk_scatter_add(const unsigned* __restrict__ idx, const float* __restrict__ val,
                                             unsigned count, const unsigned* count_at, float divisor,
                                             float* dense) {
    const unsigned n = count_at ? *count_at : count;
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        const unsigned i = idx[j];
        dense[i] = __fadd_rn(dense[i], __fdiv_rn(val[j], divisor));
    }
}
