// Test driver: mirrors src/gpu/select.rs, merge.rs, scatter.rs launch sequences and compares
// against brute-force references of the spec.
#include "kernels_all.cpp"
#include <cmath>
#include <map>
#include <numeric>
#include <string>

static unsigned SMS = 4;
static constexpr unsigned THR = 256;
static unsigned MAXGRID = 0;  // overrides SMS*8 when nonzero
static unsigned grid_of(size_t units, size_t per_block) {
    size_t want = std::max<size_t>((units + per_block - 1) / per_block, 1);
    return (unsigned)std::min<size_t>(want, MAXGRID ? MAXGRID : SMS * 8);
}
static unsigned fkey(float v) { return __float_as_uint(v) & 0x7fffffffu; }
static int failures = 0, checks = 0;
static std::string ctx;
#define CHECK(c, ...) do { ++checks; if (!(c)) { ++failures; if (failures < 60) { fprintf(stderr, "FAIL [%s] ", ctx.c_str()); fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } return false; } } while (0)

struct Selector {
    size_t max_n, cap;
    Workspace ws;
    std::vector<unsigned> cand_key, cand_idx, tile_above, tile_tied;
    Selector(size_t max_n_, long cap_override = -1) : max_n(max_n_) {
        cap = std::max(max_n / 32, std::min<size_t>(max_n, 1 << 16));
        if (cap_override >= 0) cap = cap_override;
        size_t tiles = (max_n + TILE - 1) / TILE;
        cand_key.assign(std::max<size_t>(cap, 1), 0xdeadbeef);
        cand_idx.assign(std::max<size_t>(cap, 1), 0xdeadbeef);
        tile_above.assign(tiles, 0xdeadbeef);
        tile_tied.assign(tiles, 0);
        memset(&ws, 0xab, sizeof ws);
    }
    void reset() {
        memset(&ws, 0, sizeof ws);
        std::fill(tile_tied.begin(), tile_tied.end(), 0);
    }
    // pass1: 0 = values, 1 = accumulate, 2 = accumulate with momentum
    void passes(float* x, size_t xlen, int pass1, const float* grad, float* mom, float m, unsigned* oi, float* ov,
                unsigned* di, float* dv, const unsigned* map, bool zero_kept) {
        size_t n = std::min(max_n, xlen);
        unsigned per_elem = grid_of(n, THR * 4), per_tile = grid_of((n + TILE - 1) / TILE, 1);
        Workspace* w = &ws;
        unsigned* ck = cand_key.data(); unsigned* ci = cand_idx.data(); unsigned c = (unsigned)cap;
        unsigned* ta = tile_above.data(); unsigned* tt = tile_tied.data();
        if (pass1 == 0) emu::launch("hist1", per_elem, THR, gtopk_hist1, (const float*)x, w);
        else emu::launch("accumulate", per_elem, THR, gtopk_accumulate, grad, x, pass1 == 2 ? mom : (float*)nullptr,
                         pass1 == 2 ? m : 0.0f, w);
        emu::launch("pass2", per_tile, THR, gtopk_pass2, (const float*)x, w, ck, ci, c, ta);
        emu::launch("pass3", per_elem, THR, gtopk_pass3, (const float*)x, w, (const unsigned*)ck, (const unsigned*)ci, c);
        emu::launch("tile_count", per_elem, THR, gtopk_tile_count, (const float*)x, w, (const unsigned*)ck,
                    (const unsigned*)ci, c, ta, tt);
        emu::launch("tile_scan", 1, THR, gtopk_tile_scan, (const Workspace*)w, ta, tt);
        emu::launch("compact", per_tile, THR, gtopk_compact, x, map, (const Workspace*)w, (const unsigned*)ta,
                    (const unsigned*)tt, oi, ov, di, dv, (int)zero_kept);
    }
    void select(float* x, size_t xlen, unsigned n, unsigned k, int pass1, const float* grad, float* mom, float m,
                unsigned* oi, float* ov, bool zero_kept) {
        reset();
        emu::launch("select_init", 1, THR, gtopk_select_init, &ws, n, k);
        passes(x, xlen, pass1, grad, mom, m, oi, ov, nullptr, nullptr, nullptr, zero_kept);
    }
};

// ---------- references ----------
struct Ref { std::vector<unsigned> idx; std::vector<float> val; unsigned key = 0, greater = 0, ties = 0; };
static Ref ref_topk(const std::vector<float>& x, size_t k) {
    size_t n = x.size();
    std::vector<unsigned> o(n);
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](unsigned a, unsigned b) { return fkey(x[a]) > fkey(x[b]); });
    Ref r;
    std::vector<unsigned> kept(o.begin(), o.begin() + k);
    std::sort(kept.begin(), kept.end());
    for (unsigned i : kept) { r.idx.push_back(i); r.val.push_back(x[i]); }
    if (k > 0) {
        r.key = fkey(x[o[k - 1]]);
        for (float v : x) r.greater += fkey(v) > r.key;
        r.ties = k - r.greater;
    }
    return r;
}
static bool same_bits(float a, float b) { return __float_as_uint(a) == __float_as_uint(b); }

static std::mt19937_64 trng(777);
static float draw(int mode) {
    // mode 0: small set with ties; 1: continuous; 2: tiny spread in one top digit (forces deep refine)
    std::uniform_int_distribution<int> sgn(0, 1);
    float s = sgn(trng) ? -1.f : 1.f;
    if (mode == 0) { static const float vals[] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 0.25f, 7.f}; return s * vals[trng() % 8]; }
    if (mode == 1) return s * std::uniform_real_distribution<float>(0, 10)(trng);
    if (mode == 3) return s * 1.25f;  // one magnitude: all ties
    if (mode == 4) return s * 0.0f;   // zeros and negative zeros
    if (mode == 5) {                   // denormals, huge values, infinities, zeros
        switch (trng() % 6) {
        case 0: return s * __uint_as_float((unsigned)(trng() % 5));
        case 1: return s * 3.4028235e38f;
        case 2: return s * INFINITY;
        case 3: return s * __uint_as_float(0x7f7fff00u | (unsigned)(trng() % 3));
        case 4: return 0.0f * s;
        default: return s * __uint_as_float((unsigned)(trng() % 0x800000));
        }
    }
    // same top 11 bits; various lower bits with ties
    unsigned b = 0x3f800000u | (unsigned)(trng() % 64) << 8 | (unsigned)(trng() % 4);
    return s * __uint_as_float(b);
}

static bool test_select(unsigned n, unsigned k, int mode, int pass1, size_t max_n, long cap, int nonfinite) {
    std::vector<float> x(max_n + 3, 1e30f), grad(max_n + 3), mom(max_n + 3), x0;
    for (unsigned i = 0; i < n; ++i) { x[i] = draw(mode); grad[i] = draw(mode); mom[i] = draw(mode); }
    unsigned nan_at = NONE, inf_at = NONE;
    if (nonfinite) {
        unsigned a = trng() % n, b = trng() % n;
        if (nonfinite & 1) { x[a] = NAN; if (b != a) x[b] = -NAN; nan_at = std::min(a, b); }
        if (nonfinite & 2) { unsigned c = trng() % n; if (!(nonfinite & 1) || (c != a && c != b)) { x[c] = -INFINITY; inf_at = c; } }
    }
    x0 = x;
    float m = 0.9f;
    std::vector<float> accx(x.begin(), x.begin() + n), mom_ref(mom.begin(), mom.begin() + n);
    if (pass1 >= 1) {
        for (unsigned i = 0; i < n; ++i) {
            float g = grad[i];
            if (pass1 == 2) { g = __fadd_rn(__fmul_rn(m, mom[i]), g); mom_ref[i] = g; }
            accx[i] = __fadd_rn(x[i], g);
        }
    }
    {   // expected nonfinite positions, on the values the selection sees
        nan_at = inf_at = NONE;
        {
            for (unsigned i = 0; i < n; ++i) {
                unsigned kk = fkey(accx[i]);
                if (kk > INF_KEY && nan_at == NONE) nan_at = i;
                if (kk == INF_KEY && inf_at == NONE) inf_at = i;
            }
        }
    }
    if (cap <= -2) {  // exactly the k-th's top-digit bin (fits), or one less (overflows by one)
        Ref r0 = ref_topk(accx, k);
        long cnt = 0;
        for (float v : accx) cnt += (fkey(v) >> 21) == (r0.key >> 21);
        cap = cap == -2 ? cnt : std::max(0L, cnt - 1);
    }
    Selector s(max_n, cap);
    std::vector<unsigned> oi(k + 2, 0xdeadbeef);
    std::vector<float> ov(k + 2, -12345.f);
    bool zero = pass1 >= 1;
    s.select(x.data(), x.size() - 3 > max_n ? max_n : max_n, n, k, pass1, grad.data(), mom.data(), m, oi.data(), ov.data(), zero);
    SelectState& st = s.ws.s;
    CHECK(st.nan_at == nan_at, "nan_at %u want %u", st.nan_at, nan_at);
    CHECK(st.inf_at == inf_at, "inf_at %u want %u", st.inf_at, inf_at);
    if (nan_at != NONE) return true;  // the twin bails; nothing else defined
    Ref r = ref_topk(accx, k);
    CHECK(st.n == n && st.k == k && st.dropped == n - k, "state n/k/dropped %u %u %u", st.n, st.k, st.dropped);
    CHECK(st.key == r.key && st.greater == r.greater && st.ties == r.ties, "threshold key %08x/%08x greater %u/%u ties %u/%u",
          st.key, r.key, st.greater, r.greater, st.ties, r.ties);
    for (unsigned j = 0; j < k; ++j)
        CHECK(oi[j] == r.idx[j] && same_bits(ov[j], r.val[j]), "out[%u] = (%u, %g) want (%u, %g)", j, oi[j], ov[j], r.idx[j], r.val[j]);
    CHECK(oi[k] == 0xdeadbeef, "wrote past k");
    if (pass1 >= 1) {
        std::vector<float> resid = accx;
        for (unsigned i : r.idx) resid[i] = 0.f;
        for (unsigned i = 0; i < n; ++i) CHECK(same_bits(x[i], resid[i]), "residual[%u] = %g want %g", i, x[i], resid[i]);
        if (pass1 == 2) for (unsigned i = 0; i < n; ++i) CHECK(same_bits(mom[i], mom_ref[i]), "mom[%u]", i);
    }
    for (size_t i = n; i < x.size(); ++i) CHECK(same_bits(x[i], x0[i]), "x[%zu] past n modified", i);
    return true;
}

// ---------- merge ----------
struct Merger {
    size_t max_len;
    std::vector<unsigned> mi, ui, th, tz;
    std::vector<float> mv, uv;
    std::vector<unsigned char> tail;
    Selector sel;
    Merger(size_t ml, long cap) : max_len(ml), sel(2 * std::max<size_t>(ml, 1), cap) {
        size_t n = 2 * std::max<size_t>(ml, 1);
        mi.assign(n, 0xdeadbeef); mv.assign(n, -999.f); tail.assign(n, 7); ui.assign(n, 0xdeadbeef); uv.assign(n, -999.f);
        th.assign((n + TILE - 1) / TILE, 0xdeadbeef); tz.assign((n + TILE - 1) / TILE, 0xdeadbeef);
    }
    void merge(const unsigned* ai, const float* av, unsigned na, const unsigned* bi, const float* bv, unsigned nb, unsigned k,
               unsigned* ki, float* kv, unsigned* di, float* dv) {
        unsigned n = na + nb;
        sel.reset();
        std::fill(tz.begin(), tz.end(), 0);
        unsigned place = std::max<unsigned>((n + THR - 1) / THR, 1);
        emu::launch("merge_place", place, THR, gtopk_merge_place, ai, av, na, bi, bv, nb, mi.data(), mv.data(), tail.data());
        unsigned per_tile = grid_of((n + TILE - 1) / TILE, 1);
        emu::launch("union_count", per_tile, THR, gtopk_union_count, (const unsigned char*)tail.data(), n, th.data());
        emu::launch("union_scan", 1, THR, gtopk_union_scan, n, th.data(), tz.data(), &sel.ws);
        emu::launch("union_write", per_tile, THR, gtopk_union_write, (const unsigned*)mi.data(), (const float*)mv.data(),
                    (const unsigned char*)tail.data(), n, (const unsigned*)th.data(), (const unsigned*)tz.data(), ui.data(), uv.data());
        emu::launch("select_init_device_n", 1, THR, gtopk_select_init_device_n, &sel.ws, k);
        sel.passes(uv.data(), uv.size(), 0, nullptr, nullptr, 0.f, ki, kv, di, dv, ui.data(), false);
    }
};

static std::vector<unsigned> rand_indices(unsigned cnt, unsigned dom) {
    std::vector<unsigned> all(dom);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), trng);
    all.resize(cnt);
    std::sort(all.begin(), all.end());
    return all;
}

static bool test_merge(unsigned max_len, unsigned na, unsigned nb, unsigned dom, unsigned k, int mode, long cap) {
    auto ai = rand_indices(na, dom), bi = rand_indices(nb, dom);
    std::vector<float> av(na), bv(nb);
    for (auto& v : av) v = draw(mode);
    for (auto& v : bv) v = draw(mode);
    // reference union
    std::vector<unsigned> ri; std::vector<float> rv;
    { size_t p = 0, q = 0;
      while (p < na || q < nb) {
          if (q == nb || (p < na && ai[p] < bi[q])) { ri.push_back(ai[p]); rv.push_back(av[p]); ++p; }
          else if (p == na || bi[q] < ai[p]) { ri.push_back(bi[q]); rv.push_back(bv[q]); ++q; }
          else { ri.push_back(ai[p]); rv.push_back(__fadd_rn(av[p], bv[q])); ++p; ++q; }
      } }
    unsigned un = ri.size(), kk = std::min(k, un);
    Ref r = ref_topk(rv, kk);
    std::vector<char> keep(un, 0);
    for (unsigned p : r.idx) keep[p] = 1;
    Merger mg(max_len, cap);
    std::vector<unsigned> ki(k + 2, 0xdeadbeef), di(na + nb + 2, 0xdeadbeef);
    std::vector<float> kv(k + 2, -7.f), dv(na + nb + 2, -7.f);
    mg.merge(ai.data(), av.data(), na, bi.data(), bv.data(), nb, k, ki.data(), kv.data(), di.data(), dv.data());
    SelectState& st = mg.sel.ws.s;
    CHECK(st.n == un && st.k == kk && st.dropped == un - kk, "merge state n %u/%u k %u/%u dropped %u", st.n, un, st.k, kk, st.dropped);
    unsigned a = 0, d = 0;
    for (unsigned p = 0; p < un; ++p) {
        if (keep[p]) { CHECK(ki[a] == ri[p] && same_bits(kv[a], rv[p]), "merge kept[%u] = (%u,%g) want (%u,%g)", a, ki[a], kv[a], ri[p], rv[p]); ++a; }
        else { CHECK(di[d] == ri[p] && same_bits(dv[d], rv[p]), "merge dropped[%u] = (%u,%g) want (%u,%g)", d, di[d], dv[d], ri[p], rv[p]); ++d; }
    }
    CHECK(ki[kk] == 0xdeadbeef, "merge kept wrote past k");
    CHECK(di[un - kk] == 0xdeadbeef, "merge dropped wrote past n-k");
    return true;
}

static bool test_scatter(unsigned cnt, unsigned dom, bool device_count) {
    auto idx = rand_indices(cnt, dom);
    std::shuffle(idx.begin(), idx.end(), trng);
    std::vector<float> val(cnt + 1), dense(dom), ref;
    for (auto& v : val) v = draw(1);
    for (auto& v : dense) v = draw(1);
    ref = dense;
    float div = 3.f;
    for (unsigned j = 0; j < cnt; ++j) ref[idx[j]] = __fadd_rn(ref[idx[j]], __fdiv_rn(val[j], div));
    unsigned cnt_dev = cnt;
    unsigned max = device_count ? cnt + 5 : cnt;
    emu::launch("scatter_add", grid_of(max, THR), THR, gtopk_scatter_add, (const unsigned*)idx.data(), (const float*)val.data(),
                max, device_count ? (const unsigned*)&cnt_dev : (const unsigned*)nullptr, div, dense.data());
    for (unsigned i = 0; i < dom; ++i) CHECK(same_bits(dense[i], ref[i]), "scatter dense[%u] %g want %g", i, dense[i], ref[i]);
    return true;
}

int main(int argc, char** argv) {
    std::string only = argc > 1 ? argv[1] : "all";
    if (argc > 2) emu::preempt_pct = atoi(argv[2]);
    if (getenv("MAXGRID")) MAXGRID = atoi(getenv("MAXGRID"));
    if (argc > 3) { emu::rng.seed(atoll(argv[3])); trng.seed(atoll(argv[3]) * 7 + 1); }
    std::vector<unsigned> ns = {1, 2, 33, 1023, 4097, 5000, 20000};
    const bool quick = getenv("QUICK") != nullptr;
    if (quick) ns = {33, 1023, 9000};
    char buf[256];
    if (only == "all" || only == "select") {
        for (unsigned n : ns) {
            std::vector<unsigned> ks = {1, std::max(1u, n / 100), std::max(1u, n / 2), n};
            std::sort(ks.begin(), ks.end()); ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
            for (unsigned k : ks)
                for (int mode = 0; mode < 3; ++mode)
                    for (int pass1 = 0; pass1 < 3; ++pass1) {
                        if (n >= 20000 && pass1 != (int)(k % 3)) continue;  // keep the run short
                        for (int capc = 0; capc < 2; ++capc) {
                            long cap = capc ? (long)(trng() % 3) : -1;
                            size_t max_n = (mode == 1 && n > 1) ? n + n / 3 : n;
                            snprintf(buf, sizeof buf, "select n=%u k=%u mode=%d pass1=%d max_n=%zu cap=%ld", n, k, mode, pass1, max_n, cap);
                            ctx = buf;
                            test_select(n, k, mode, pass1, max_n, cap, 0);
                        }
                    }
        }
        for (unsigned n : quick ? std::vector<unsigned>{} : std::vector<unsigned>{31u, 32u, 512u, 513u, 4095u, 4096u, 8192u, 12289u})
            for (unsigned k : {1u, 2u, n / 7 + 1, n - 1, n})
                for (int mode = 0; mode < 3; ++mode)
                    for (long cap : {-1L, -2L, -3L}) {
                        if (k == 0 || k > n) continue;
                        snprintf(buf, sizeof buf, "select edge n=%u k=%u mode=%d cap=%ld", n, k, mode, cap);
                        ctx = buf;
                        test_select(n, k, mode, (int)((n + k) % 3), n, cap, 0);
                    }
        for (unsigned n : {1u, 2u, 33u, 5000u})
            for (int nf = 1; nf < 4; ++nf)
                for (int pass1 = 0; pass1 < 2; ++pass1) {
                    snprintf(buf, sizeof buf, "select nonfinite=%d n=%u pass1=%d", nf, n, pass1);
                    ctx = buf;
                    test_select(n, std::max(1u, n / 3), 0, pass1, n, -1, nf);
                }
        fprintf(stderr, "select done: %d failures / %d checks\n", failures, checks);
    }
    if (only == "modes") {
        for (unsigned n : {1u, 2u, 33u, 1023u, 4097u, 9000u})
            for (unsigned k : {1u, n / 3 + 1, n})
                for (int mode = 3; mode < 6; ++mode)
                    for (long cap : {-1L, 1L, -2L, -3L}) {
                        if (k > n) continue;
                        int pass1 = mode == 5 ? 0 : (int)((n + k + cap) % 3 + 3) % 3;
                        snprintf(buf, sizeof buf, "select modes n=%u k=%u mode=%d pass1=%d cap=%ld", n, k, mode, pass1, cap);
                        ctx = buf;
                        test_select(n, k, mode, pass1, n, cap, 0);
                    }
        fprintf(stderr, "modes done: %d failures / %d checks\n", failures, checks);
    }
    if (only == "big") {
        for (unsigned n : {1100000u})
            for (unsigned k : {7u, n / 3})
                for (int mode = 0; mode < 3; mode += 2)
                    for (int capc = 0; capc < 2; ++capc) {
                        long cap = capc ? 1 : -1;
                        snprintf(buf, sizeof buf, "select big n=%u k=%u mode=%d cap=%ld", n, k, mode, cap);
                        ctx = buf;
                        fprintf(stderr, "%s\n", buf);
                        test_select(n, k, mode, (int)(k % 3), n, cap, 0);
                    }
        fprintf(stderr, "big done: %d failures / %d checks\n", failures, checks);
    }
    if (only == "all" || only == "merge") {
        struct M { unsigned ml, na, nb, dom, k; };
        std::vector<M> ms = {{1, 1, 1, 1, 1}, {1, 1, 1, 2, 1}, {1, 0, 1, 3, 1}, {1, 0, 0, 3, 1}, {4, 3, 4, 6, 2},
                             {40, 33, 40, 50, 10}, {40, 33, 40, 50, 100}, {300, 300, 250, 1000, 64},
                             {3000, 2500, 3000, 6000, 2048}, {3000, 3000, 3000, 3000, 3000}, {5000, 5000, 4000, 20000, 5000},
                             {5000, 5000, 4000, 9500, 50}};
        for (auto& c : ms)
            for (int mode = 0; mode < 3; ++mode)
                for (int capc = 0; capc < 2; ++capc) {
                    long cap = capc ? 1 : -1;
                    snprintf(buf, sizeof buf, "merge ml=%u na=%u nb=%u dom=%u k=%u mode=%d cap=%ld", c.ml, c.na, c.nb, c.dom, c.k, mode, cap);
                    ctx = buf;
                    test_merge(c.ml, c.na, c.nb, c.dom, c.k, mode, cap);
                }
        fprintf(stderr, "merge done: %d failures / %d checks\n", failures, checks);
    }
    if (only == "all" || only == "scatter") {
        for (unsigned c : {0u, 1u, 33u, 5000u})
            for (int dc = 0; dc < 2; ++dc) {
                snprintf(buf, sizeof buf, "scatter cnt=%u device_count=%d", c, dc);
                ctx = buf;
                test_scatter(c, c + 100, dc);
            }
        fprintf(stderr, "scatter done: %d failures / %d checks\n", failures, checks);
    }
    printf("TOTAL: %d failures / %d checks\n", failures, checks);
    return failures != 0;
}
