// dispatch/<impl>/<d>/<k> and combine/<impl>/<d>/<k>: 4096 tokens routed to 16 experts (top-k),
// rows of d floats. flexmoe is fm_dispatch_forward / fm_combine_forward on a dropless plan;
// peak is one memcpy that reads and writes as many bytes as the flexmoe call does (dispatch:
// rows x d floats in and out; combine: tokens x k rows in, tokens rows out), so the ratio of
// their items_per_second (tokens per second) is the ratio of their bandwidths.
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr int kTokens = 4096, kExperts = 16;
const int kDims[] = {128, 512};
const int kTopK[] = {1, 4};

struct Routed {
    int d, k;
    std::vector<int32_t> idx, counts, offsets, order, position;
    fmbench::Floats x, xe, ye, y, gates, scratch_in, scratch_out;
    fm_routing_plan plan;
    Routed(int d_, int k_)
        : d(d_), k(k_), idx(size_t(kTokens) * k_), counts(kExperts), offsets(kExperts + 1), order(idx.size()),
          position(idx.size()), x(fmbench::normal_floats(size_t(kTokens) * d_, 1.0f, 5)), xe(idx.size() * d_),
          ye(fmbench::normal_floats(idx.size() * d_, 1.0f, 6)), y(size_t(kTokens) * d_),
          gates(fmbench::normal_floats(idx.size(), 0.3f, 7)), scratch_in((idx.size() + kTokens) * d_),
          scratch_out(scratch_in.size()) {
        uint64_t s = 99;
        for (int t = 0; t < kTokens; t++)
            for (int i = 0; i < k; i++) { /* k distinct experts per token */
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                idx[size_t(t) * k + i] = int32_t((s >> 33) % kExperts + i) % kExperts;
            }
        for (int t = 0; t < kTokens; t++)
            for (int i = 1; i < k; i++) idx[size_t(t) * k + i] = (idx[size_t(t) * k] + i) % kExperts;
        fm_plan_desc desc;
        std::memset(&desc, 0, sizeof desc);
        desc.tokens = kTokens, desc.top_k = k, desc.experts = kExperts;
        std::memset(&plan, 0, sizeof plan);
        plan.counts = counts.data(), plan.offsets = offsets.data(), plan.order = order.data(), plan.position = position.data();
        fm_routing_plan_build(&desc, idx.data(), k, nullptr, 0, &plan);
    }
};

void timed(benchmark::State &state, size_t bytes_moved, const std::function<void()> &step) {
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * kTokens);
    state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes_moved));
}

void dispatch(benchmark::State &state, int d, int k) {
    Routed &r = fmbench::cached<Routed>(d, k);
    if (fm_dispatch_forward(&r.plan, d, r.x.data(), d, r.xe.data(), d) != FM_OK ||
        std::memcmp(r.xe.data(), r.x.data() + size_t(r.order[0] / k) * d, size_t(d) * 4) != 0) {
        state.SkipWithError("dispatch failed");
        return;
    }
    timed(state, 2 * size_t(r.plan.rows) * d * 4, [&] { fm_dispatch_forward(&r.plan, d, r.x.data(), d, r.xe.data(), d); });
}

void combine(benchmark::State &state, int d, int k) {
    Routed &r = fmbench::cached<Routed>(d, k);
    if (fm_combine_forward(&r.plan, d, r.ye.data(), d, r.gates.data(), k, r.y.data(), d) != FM_OK) {
        state.SkipWithError("combine failed");
        return;
    }
    timed(state, (size_t(r.plan.rows) + kTokens) * d * 4,
          [&] { fm_combine_forward(&r.plan, d, r.ye.data(), d, r.gates.data(), k, r.y.data(), d); });
}

// memcpy moving the bytes `kernel` moves (half read, half written).
void peak(benchmark::State &state, int d, int k, bool is_combine) {
    Routed &r = fmbench::cached<Routed>(d, k);
    const size_t moved = is_combine ? (size_t(r.plan.rows) + kTokens) * d * 4 : 2 * size_t(r.plan.rows) * d * 4;
    timed(state, moved, [&] { std::memcpy(r.scratch_out.data(), r.scratch_in.data(), moved / 2); });
}

int register_dispatch() {
    for (int d : kDims)
        for (int k : kTopK) {
            const std::string tail = "/" + std::to_string(d) + "/" + std::to_string(k);
            benchmark::RegisterBenchmark(("dispatch/flexmoe" + tail).c_str(), dispatch, d, k);
            benchmark::RegisterBenchmark(("dispatch/peak" + tail).c_str(), peak, d, k, false);
            benchmark::RegisterBenchmark(("combine/flexmoe" + tail).c_str(), combine, d, k);
            benchmark::RegisterBenchmark(("combine/peak" + tail).c_str(), peak, d, k, true);
        }
    return 0;
}

const int registered = register_dispatch();

}  // namespace
