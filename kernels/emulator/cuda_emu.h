// Minimal CPU emulator for the subset of CUDA used by kernels/ (see README.md here).
// Each CUDA thread is a ucontext fiber; the blocks of a grid run one after another (in a random
// order); inside a block the fibers are resumed in a random order at each barrier phase, and
// optionally preempted at atomics. __syncthreads is a block barrier; warp intrinsics exchange
// values through a per-warp array guarded by warp barriers. Misuse (a FULL-mask warp op with a lane
// missing, deadlock, mixing warp and block barriers) aborts with a message.
#pragma once
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>
#include <algorithm>
#include <type_traits>
#include <array>
#include <string>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
// Shared memory: statics placed in section "emushm" (works for statics of kernels and of inline
// functions; GCC ignores the section for statics of function templates, i.e. compact_tile's).
// Concurrent-block mode swaps this section's contents per block on every block switch.
#define __shared__ __attribute__((section("emushm"))) static
extern "C" char __start_emushm[], __stop_emushm[];

struct uint3_ { unsigned x, y, z; };
struct dim3_ { unsigned x, y, z; };

namespace emu {
enum State { RUN, WAIT_BLOCK, WAIT_WARP, DONE };
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State st = RUN;
    uint3_ tid{0, 0, 0};
    int warp = 0;
    unsigned bid = 0;
    uint3_ bidx() const { return uint3_{bid, 0, 0}; }
};
inline ucontext_t sched_ctx;
inline Fiber* cur = nullptr;
inline std::vector<Fiber*> fibers;
inline uint3_ block_idx{0, 0, 0};
inline dim3_ block_dim{1, 1, 1}, grid_dim{1, 1, 1};
inline std::mt19937_64 rng(12345);
inline int preempt_pct = 0;  // chance (percent) of yielding at an atomic
inline std::vector<std::array<uint64_t, 32>> warp_slot(64);
inline std::function<void()> body;
inline const char* kernel_name = "";

[[noreturn]] inline void fail(const char* msg) {
    fprintf(stderr, "EMU ERROR in %s: %s\n", kernel_name, msg);
    abort();
}
inline void yield_to_sched() { swapcontext(&cur->ctx, &sched_ctx); }
inline void maybe_preempt() {
    if (preempt_pct && cur && (int)(rng() % 100) < preempt_pct) yield_to_sched();
}
inline void block_barrier() {
    cur->st = WAIT_BLOCK;
    yield_to_sched();
}
inline void warp_barrier() {
    cur->st = WAIT_WARP;
    yield_to_sched();
}
inline void trampoline() {
    body();
    cur->st = DONE;
    swapcontext(&cur->ctx, &sched_ctx);
}

// A fresh fiber for thread `tid` of block `bid`, starting at the kernel body.
inline void start_fiber(Fiber* f, unsigned tid, unsigned bid) {
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack.data();
    f->ctx.uc_stack.ss_size = f->stack.size();
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, trampoline, 0);
    f->st = RUN;
    f->tid = {tid, 0, 0};
    f->warp = tid / 32;
    f->bid = bid;
}

inline void run_block(unsigned nthreads) {
    // reuse fibers
    while (fibers.size() < nthreads) {
        auto* f = new Fiber;
        f->stack.resize(256 * 1024);
        fibers.push_back(f);
    }
    for (unsigned t = 0; t < nthreads; ++t) start_fiber(fibers[t], t, block_idx.x);
    // Random scheduling: a random runnable fiber runs until it yields; a barrier releases as soon as
    // it is complete, so one warp may run far ahead of another (exposes missing __syncthreads).
    std::vector<unsigned> runnable(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) runnable[t] = t;
    unsigned nwarps = (nthreads + 31) / 32;
    std::vector<unsigned> warp_wait(nwarps, 0), warp_alive(nwarps, 0);
    for (unsigned t = 0; t < nthreads; ++t) warp_alive[t / 32]++;
    unsigned alive = nthreads, block_wait = 0;
    auto release_block = [&]() {
        for (unsigned t = 0; t < nthreads; ++t)
            if (fibers[t]->st == WAIT_BLOCK) { fibers[t]->st = RUN; runnable.push_back(t); }
        block_wait = 0;
    };
    // Strategy per block: uniform random picks, or warp-greedy (warps ranked at random; the
    // best-ranked runnable warp runs as far as it can, e.g. through warp barriers, before others).
    const bool greedy = rng() % 2;
    std::vector<unsigned> rank(nwarps);
    for (unsigned w = 0; w < nwarps; ++w) rank[w] = w;
    std::shuffle(rank.begin(), rank.end(), rng);
    while (alive) {
        if (runnable.empty()) fail("deadlock (threads of a warp split between a warp op and __syncthreads, or an exited lane)");
        size_t r = rng() % runnable.size();
        if (greedy) {
            unsigned best = ~0u;
            for (unsigned w : runnable) best = std::min(best, rank[w / 32]);
            while (rank[runnable[r] / 32] != best) r = rng() % runnable.size();
        }
        unsigned t = runnable[r];
        runnable[r] = runnable.back();
        runnable.pop_back();
        Fiber* f = fibers[t];
        cur = f;
        swapcontext(&sched_ctx, &f->ctx);
        cur = nullptr;
        unsigned w = t / 32;
        switch (f->st) {
        case RUN: runnable.push_back(t); break;  // preempted
        case WAIT_WARP:
            if (warp_alive[w] != 32) fail("warp-synchronous op (FULL mask) with an exited lane");
            if (++warp_wait[w] == 32) {
                for (unsigned u = w * 32; u < w * 32 + 32; ++u) { fibers[u]->st = RUN; runnable.push_back(u); }
                warp_wait[w] = 0;
            }
            break;
        case WAIT_BLOCK:
            if (++block_wait == alive) release_block();
            break;
        case DONE:
            --alive;
            --warp_alive[w];
            if (warp_wait[w]) fail("a lane exited while its warp waits in a FULL-mask warp op");
            if (alive && block_wait == alive) release_block();
            break;
        }
    }
}

// All blocks' threads as fibers at once (random interleaving across blocks), shared memory swapped
// per block. Strategy per launch: 0 uniform, 1 block-greedy, 2 a random tenth of the fibers lazy.
inline std::vector<Fiber*> cfibers;
inline void run_grid_concurrent(unsigned grid, unsigned nthreads) {
    const unsigned total = grid * nthreads, wpb = (nthreads + 31) / 32;
    while (cfibers.size() < total) {
        auto* f = new Fiber;
        f->stack.resize(64 * 1024);
        cfibers.push_back(f);
    }
    const size_t shm = __stop_emushm - __start_emushm;
    std::vector<std::vector<char>> save(grid, std::vector<char>(__start_emushm, __stop_emushm));
    for (auto& v : save) for (auto& c : v) c = (char)rng();  // garbage, as on a GPU
    unsigned resident = ~0u;
    for (unsigned g = 0; g < total; ++g) {
        Fiber* f = cfibers[g];
        start_fiber(f, g % nthreads, g / nthreads);
    }
    std::vector<unsigned> runnable(total), lazy_run;
    for (unsigned g = 0; g < total; ++g) runnable[g] = g;
    std::vector<unsigned> warp_wait(grid * wpb, 0), warp_alive(grid * wpb, 0), alive(grid, nthreads), block_wait(grid, 0);
    for (unsigned g = 0; g < total; ++g) warp_alive[(g / nthreads) * wpb + (g % nthreads) / 32]++;
    const int strategy = (int)(rng() % 3);
    std::vector<unsigned> rank(grid);
    for (unsigned b = 0; b < grid; ++b) rank[b] = b;
    std::shuffle(rank.begin(), rank.end(), rng);
    std::vector<char> lazy(total, 0);
    if (strategy == 2) for (auto& l : lazy) l = rng() % 10 == 0;
    unsigned left = total;
    auto make_runnable = [&](unsigned g) { cfibers[g]->st = RUN; runnable.push_back(g); };
    while (left) {
        if (runnable.empty()) fail("deadlock (concurrent mode)");
        size_t r = rng() % runnable.size();
        if (strategy == 1) {
            unsigned best = ~0u;
            for (unsigned g : runnable) best = std::min(best, rank[g / nthreads]);
            while (rank[runnable[r] / nthreads] != best) r = rng() % runnable.size();
        } else if (strategy == 2) {
            bool any = false;
            for (unsigned g : runnable) if (!lazy[g]) { any = true; break; }
            if (any) while (lazy[runnable[r]]) r = rng() % runnable.size();
        }
        unsigned g = runnable[r];
        runnable[r] = runnable.back();
        runnable.pop_back();
        Fiber* f = cfibers[g];
        const unsigned b = f->bid;
        if (b != resident) {
            if (resident != ~0u) memcpy(save[resident].data(), __start_emushm, shm);
            memcpy(__start_emushm, save[b].data(), shm);
            resident = b;
        }
        cur = f;
        swapcontext(&sched_ctx, &f->ctx);
        cur = nullptr;
        const unsigned w = b * wpb + f->warp;
        switch (f->st) {
        case RUN: runnable.push_back(g); break;
        case WAIT_WARP:
            if (warp_alive[w] != 32) fail("warp-synchronous op (FULL mask) with an exited lane");
            if (++warp_wait[w] == 32) {
                for (unsigned u = b * nthreads + f->warp * 32; u < b * nthreads + f->warp * 32 + 32; ++u) make_runnable(u);
                warp_wait[w] = 0;
            }
            break;
        case WAIT_BLOCK:
            if (++block_wait[b] == alive[b]) {
                for (unsigned u = b * nthreads; u < (b + 1) * nthreads; ++u)
                    if (cfibers[u]->st == WAIT_BLOCK) make_runnable(u);
                block_wait[b] = 0;
            }
            break;
        case DONE:
            --left;
            --alive[b];
            --warp_alive[w];
            if (warp_wait[w]) fail("a lane exited while its warp waits in a FULL-mask warp op");
            if (alive[b] && block_wait[b] == alive[b]) {
                for (unsigned u = b * nthreads; u < (b + 1) * nthreads; ++u)
                    if (cfibers[u]->st == WAIT_BLOCK) make_runnable(u);
                block_wait[b] = 0;
            }
            break;
        }
    }
}
inline bool concurrent = getenv("CONC") != nullptr;  // set by the driver for kernels without template __shared__

template <class F, class... A>
void launch(const char* name, unsigned grid, unsigned block, F f, A... args) {
    kernel_name = name;
    grid_dim = {grid, 1, 1};
    block_dim = {block, 1, 1};
    body = [&]() { f(args...); };
    if (warp_slot.size() < (size_t)grid * ((block + 31) / 32) + 8) warp_slot.resize((size_t)grid * ((block + 31) / 32) + 8);
    // compact_tile's __shared__ live in a function template, outside the swapped section
    if (concurrent && std::string(name) != "compact" && std::string(name) != "union_write") {
        run_grid_concurrent(grid, block);
        return;
    }
    std::vector<unsigned> border(grid);
    for (unsigned b = 0; b < grid; ++b) border[b] = b;
    std::shuffle(border.begin(), border.end(), rng);
    for (unsigned b : border) {
        block_idx = {b, 0, 0};
        run_block(block);
    }
}

// warp exchange: every lane posts v, gets the whole warp's values
inline void warp_exchange(uint64_t v, uint64_t out[32]) {
    const size_t w = (size_t)cur->bid * 8 + cur->warp;
    if (w >= warp_slot.size()) fail("warp_slot too small");
    unsigned lane = cur->tid.x & 31;
    warp_barrier();  // everyone arrived (previous readers done)
    warp_slot[w][lane] = v;
    warp_barrier();
    memcpy(out, warp_slot[w].data(), sizeof(uint64_t) * 32);
}
}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::cur->bidx())
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier(); }
inline void __threadfence() { emu::maybe_preempt(); }

template <class T, class U>
inline T atomicAdd(T* p, U v_) {
    T v = (T)v_;
    emu::maybe_preempt();
    T o = *p;
    *p = o + v;
    return o;
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
    emu::maybe_preempt();
    unsigned o = *p;
    *p = (o >= lim) ? 0 : o + 1;
    return o;
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
    emu::maybe_preempt();
    unsigned o = *p;
    if (v < o) *p = v;
    return o;
}
template <class T>
inline T __ldcg(const T* p) { return *p; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

inline void check_full(unsigned mask) {
    if (mask != 0xffffffffu) emu::fail("non-FULL mask not supported by the emulator");
}
inline unsigned __ballot_sync(unsigned mask, bool pred) {
    check_full(mask);
    uint64_t all[32];
    emu::warp_exchange(pred ? 1 : 0, all);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= (unsigned)all[l] << l;
    return r;
}
template <class T>
inline uint64_t to_bits(T v) { uint64_t b = 0; memcpy(&b, &v, sizeof(T)); return b; }
template <class T>
inline T from_bits(uint64_t b) { T v; memcpy(&v, &b, sizeof(T)); return v; }
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
    check_full(mask);
    uint64_t all[32];
    emu::warp_exchange(to_bits(v), all);
    return from_bits<T>(all[src & 31]);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d) {
    check_full(mask);
    uint64_t all[32];
    emu::warp_exchange(to_bits(v), all);
    unsigned lane = threadIdx.x & 31;
    return lane >= d ? from_bits<T>(all[lane - d]) : v;
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int x) {
    check_full(mask);
    uint64_t all[32];
    emu::warp_exchange(to_bits(v), all);
    unsigned lane = threadIdx.x & 31;
    return from_bits<T>(all[(lane ^ x) & 31]);
}
// CUDA's integer min overloads
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
