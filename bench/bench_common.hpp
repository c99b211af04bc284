// Shared pieces of the benchmark programs: deterministic inputs, result checks, and running a
// body under a forced flexmoe ISA path.
#pragma once

#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>

#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "flexmoe.h"

namespace fmbench {

// 64-byte aligned floats from fm_alloc: full-width vector loads never split a cache line, as in
// a program that allocates its activations with fm_alloc (std::vector gives 16 bytes).
template <class T>
struct AlignedAllocator {
    using value_type = T;
    AlignedAllocator() = default;
    template <class U>
    AlignedAllocator(const AlignedAllocator<U> &) {}
    T *allocate(size_t n) {
        if (void *p = fm_alloc(n * sizeof(T))) return static_cast<T *>(p);
        throw std::bad_alloc();
    }
    void deallocate(T *p, size_t) { fm_free(p); }
    bool operator==(const AlignedAllocator &) const { return true; }
    bool operator!=(const AlignedAllocator &) const { return false; }
};
using Floats = std::vector<float, AlignedAllocator<float>>;

// flexmoe's threads for one benchmark (0: leave the process-wide setting), restored after it.
struct ThreadScope {
    explicit ThreadScope(int threads) : set(threads > 0) {
        if (set) fm_set_threads(threads);
    }
    ~ThreadScope() {
        if (set) fm_set_threads(0);
    }
    ThreadScope(const ThreadScope &) = delete;
    ThreadScope &operator=(const ThreadScope &) = delete;
    bool set;
};

// The thread counts of the scaling benchmarks: 1, 2 and every hardware thread of the machine.
inline std::vector<int> thread_counts() {
    std::vector<int> counts = {1, 2};
    const int all = int(std::thread::hardware_concurrency());
    if (all > 2) counts.push_back(all);
    return counts;
}

// Normal(0, scale) floats from a fixed seed: every impl sees the same data.
inline Floats normal_floats(size_t n, float scale, uint64_t seed) {
    Floats v(n);
    uint64_t s = seed;
    auto uniform = [&s] {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return ((s >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    };
    for (auto &x : v) x = float(std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform()) * scale);
    return v;
}

inline double max_abs_diff(const Floats &a, const Floats &b) {
    double worst = 0.0;
    for (size_t i = 0; i < a.size(); i++) worst = std::fmax(worst, std::fabs(double(a[i]) - b[i]));
    return worst;
}

// One T per distinct constructor arguments, built on first use and kept for the whole run, so
// that every impl of a shape works on the same data.
template <class T, class... Args>
T &cached(Args... args) {
    static std::vector<std::pair<std::tuple<Args...>, T *>> all;
    const std::tuple<Args...> key(args...);
    for (auto &entry : all)
        if (entry.first == key) return *entry.second;
    all.emplace_back(key, new T(args...));
    return *all.back().second;
}

// Selects a path for the duration of one benchmark; false (and the benchmark skipped) when this
// machine cannot run it.
inline bool use_isa(benchmark::State &state, fm_isa isa) {
    if (fm_set_isa(isa) != FM_OK) {
        state.SkipWithError((std::string(fm_isa_name(isa)) + " is not supported here").c_str());
        return false;
    }
    return true;
}

// The impl name of a flexmoe path: "flexmoe" for the best one, "flexmoe_<isa>" for forced ones.
inline std::string impl_name(fm_isa isa) {
    return isa == FM_ISA_AUTO ? "flexmoe" : std::string("flexmoe_") + fm_isa_name(isa);
}

// The forced paths worth listing on this machine.
inline std::vector<fm_isa> forced_isas() {
    std::vector<fm_isa> isas;
    for (int i = FM_ISA_SCALAR; i < FM_ISA_COUNT; i++)
        if (fm_isa_supported(fm_isa(i))) isas.push_back(fm_isa(i));
    return isas;
}

// ---- the FMA peak (impl `peak`) ----
// Twelve independent accumulator chains cover the FMA latency on both pipes. The empty asm
// ties each chain to a register, so the compiler neither folds nor spills it.
#define FM_BENCH_FMA_LOOP(V, FMADD, ADD, CONSTRAINT)                                                       \
    V a0 = a, a1 = a, a2 = a, a3 = a, a4 = a, a5 = a, a6 = a, a7 = a, a8 = a, a9 = a, a10 = a, a11 = a; \
    for (int64_t s = 0; s < steps; s++) {                                                                 \
        a0 = FMADD(a0, m, c), a1 = FMADD(a1, m, c), a2 = FMADD(a2, m, c), a3 = FMADD(a3, m, c);           \
        a4 = FMADD(a4, m, c), a5 = FMADD(a5, m, c), a6 = FMADD(a6, m, c), a7 = FMADD(a7, m, c);           \
        a8 = FMADD(a8, m, c), a9 = FMADD(a9, m, c), a10 = FMADD(a10, m, c), a11 = FMADD(a11, m, c);       \
        __asm__ volatile("" : "+" CONSTRAINT(a0), "+" CONSTRAINT(a1), "+" CONSTRAINT(a2), "+" CONSTRAINT(a3), \
                         "+" CONSTRAINT(a4), "+" CONSTRAINT(a5), "+" CONSTRAINT(a6), "+" CONSTRAINT(a7),   \
                         "+" CONSTRAINT(a8), "+" CONSTRAINT(a9), "+" CONSTRAINT(a10), "+" CONSTRAINT(a11)); \
    }                                                                                                     \
    const V sum = ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))),                  \
                      ADD(ADD(a8, a9), ADD(a10, a11)))
constexpr int kPeakChains = 12;
__attribute__((target("avx512f"))) inline float fma_loop_avx512(int64_t steps) {
    const __m512 a = _mm512_set1_ps(1.0f), m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    FM_BENCH_FMA_LOOP(__m512, _mm512_fmadd_ps, _mm512_add_ps, "v");
    float lanes[16];
    _mm512_storeu_ps(lanes, sum);
    return lanes[0];
}
__attribute__((target("avx2,fma"))) inline float fma_loop_avx2(int64_t steps) {
    const __m256 a = _mm256_set1_ps(1.0f), m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    FM_BENCH_FMA_LOOP(__m256, _mm256_fmadd_ps, _mm256_add_ps, "x");
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    return lanes[0];
}

// One run of the widest FMA loop this CPU has; returns the flops it did.
inline double fma_loop() {
    static const bool wide = __builtin_cpu_supports("avx512f");
    const int64_t steps = 1 << 16;
    const float sink = wide ? fma_loop_avx512(steps) : fma_loop_avx2(steps);
    benchmark::DoNotOptimize(sink);
    return double(steps) * kPeakChains * (wide ? 16 : 8) * 2;
}

// The FMA peak of one core in GFLOP/s, measured once per process (the best of 20 short runs),
// for the counters that say what fraction of it a benchmark reached.
inline double fma_peak_gflops() {
    static const double peak = [] {
        double best = 0.0;
        for (int run = 0; run < 20; run++) {
            const auto start = std::chrono::steady_clock::now();
            double flops = 0.0;
            for (int i = 0; i < 8; i++) flops += fma_loop();
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            best = std::max(best, flops / seconds * 1e-9);
        }
        return best;
    }();
    return peak;
}

}  // namespace fmbench
