// Shared pieces of the benchmark programs: deterministic inputs, result checks, and running a
// body under a forced flexmoe ISA path.
#pragma once

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <new>
#include <string>
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

}  // namespace fmbench
