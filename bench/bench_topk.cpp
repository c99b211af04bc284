// topk/<impl>/<E>/<k> on 4096 rows of E logits: flexmoe's paths against std::partial_sort over
// (value, index) pairs, the per-row selection ggml, SGLang and vLLM use on the CPU. Every impl's
// indices must equal the scalar path's before it is timed.
#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr int kRows = 4096;
const int kExperts[] = {16, 64, 256};
const int kTopK[] = {1, 2, 4, 8};

struct TopkData {
    int experts, k;
    fmbench::Floats x, values;
    std::vector<int32_t> indices, want;
    TopkData(int e, int k_)
        : experts(e), k(k_), x(fmbench::normal_floats(size_t(kRows) * e, 1.0f, 1000 + e)), values(size_t(kRows) * k_),
          indices(size_t(kRows) * k_), want(size_t(kRows) * k_) {
        fm_set_isa(FM_ISA_SCALAR);
        fm_topk(kRows, e, k, x.data(), e, want.data(), k, values.data(), k);
        fm_set_isa(FM_ISA_AUTO);
    }
};

void timed(benchmark::State &state, TopkData &d, const std::function<void()> &step) {
    std::fill(d.indices.begin(), d.indices.end(), -1);
    step();
    if (d.indices != d.want) {
        state.SkipWithError("indices differ from the scalar path");
        return;
    }
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * kRows);
}

void flexmoe_topk(benchmark::State &state, fm_isa isa, int e, int k) {
    TopkData &d = fmbench::cached<TopkData>(e, k);
    if (!fmbench::use_isa(state, isa)) return;
    timed(state, d, [&] { fm_topk(kRows, e, k, d.x.data(), e, d.indices.data(), k, d.values.data(), k); });
}

// The usual C++ way: pairs, then std::partial_sort with "larger value, then lower index".
void partial_sort_topk(benchmark::State &state, int e, int k) {
    TopkData &d = fmbench::cached<TopkData>(e, k);
    std::vector<std::pair<float, int32_t>> row(e);
    timed(state, d, [&] {
        for (int r = 0; r < kRows; r++) {
            const float *x = &d.x[size_t(r) * e];
            for (int j = 0; j < e; j++) row[j] = {x[j], j};
            std::partial_sort(row.begin(), row.begin() + k, row.end(), [](const auto &a, const auto &b) {
                return a.first > b.first || (a.first == b.first && a.second < b.second);
            });
            for (int i = 0; i < k; i++) {
                d.values[size_t(r) * k + i] = row[i].first;
                d.indices[size_t(r) * k + i] = row[i].second;
            }
        }
    });
}

int register_topk() {
    std::vector<fm_isa> isas = {FM_ISA_AUTO};
    for (fm_isa isa : fmbench::forced_isas()) isas.push_back(isa);
    for (int e : kExperts)
        for (int k : kTopK) {
            const std::string tail = "/" + std::to_string(e) + "/" + std::to_string(k);
            for (fm_isa isa : isas)
                benchmark::RegisterBenchmark(("topk/" + fmbench::impl_name(isa) + tail).c_str(), flexmoe_topk, isa, e, k);
            benchmark::RegisterBenchmark(("topk/partial_sort" + tail).c_str(), partial_sort_topk, e, k);
        }
    return 0;
}

const int registered = register_topk();

}  // namespace
