// <kernel>/<impl>/<tokens>/<d>/<k> for kernel = dispatch, combine, dispatch_backward,
// combine_backward: tokens routed to 16 experts (top-k, dropless), rows of d floats. flexmoe is
// fm_<kernel>; peak is one memcpy of half the bytes the kernel must move, so that it reads and
// writes those bytes in all and the ratio of items_per_second (tokens per second) is the ratio of
// bandwidths.
//
// The bytes a kernel must move: every distinct float it has to read, once, plus every float it
// writes (rows = tokens * k):
//   dispatch          reads x (tokens x d), writes xe (rows x d)          (tokens + rows) * d
//   combine           reads ye (rows x d), writes y (tokens x d)          (rows + tokens) * d
//   dispatch_backward reads dxe (rows x d), writes dx (tokens x d)        (rows + tokens) * d
//   combine_backward  reads dy and ye, writes dye (rows x d) and d_gates  (tokens + 2 rows) * d
// The index and gate arrays (tokens x k) are left out: 1/d of a row each. A kernel that reads a
// row twice (combine_backward reads dy in two passes) pays for it. memcpy splits the bytes evenly
// between reads and writes where the kernels read more than they write (combine at k = 4 reads 4
// floats per float written); its footprint, source plus destination, equals the kernel's.
// glibc 2.36 streams (non-temporal stores) only copies past its threshold (127 MB on the Zen 4
// VM of bench/RESULTS.md); below it memcpy's stores read each line first.
//
// Shapes: 4096 tokens x d = 128 (Flex-MoE's batch of 64 samples x 4 modalities x 16 tokens) is
// 4-10 MB, inside a 32 MB L3; 16384 tokens x d = 1024 is 128-640 MB, from DRAM; the others lie
// between.
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr int kExperts = 16;
const int kTokens[] = {4096, 16384};
const int kDims[] = {128, 1024};
const int kTopK[] = {1, 4};

enum Kernel { kDispatch, kCombine, kDispatchBackward, kCombineBackward };
const char *const kKernelNames[] = {"dispatch", "combine", "dispatch_backward", "combine_backward"};

// Inputs and outputs of one shape, shared by the kernels: each writes only its own outputs, and
// reads inputs whose values do not matter to its time.
struct Routed {
    int tokens, d, k;
    std::vector<int32_t> idx, counts, offsets, order, position;
    fmbench::Floats x, xe, ye, y, gates, d_gates, scratch_in, scratch_out;
    fm_routing_plan plan;
    Routed(int tokens_, int d_, int k_)
        : tokens(tokens_), d(d_), k(k_), idx(size_t(tokens_) * k_), counts(kExperts), offsets(kExperts + 1),
          order(idx.size()), position(idx.size()), x(fmbench::normal_floats(size_t(tokens_) * d_, 1.0f, 5)),
          xe(idx.size() * d_), ye(fmbench::normal_floats(idx.size() * d_, 1.0f, 6)), y(size_t(tokens_) * d_),
          gates(fmbench::normal_floats(idx.size(), 0.3f, 7)), d_gates(idx.size()),
          scratch_in(bytes(kCombineBackward) / 8), scratch_out(scratch_in.size()) {
        uint64_t s = 99;
        for (int t = 0; t < tokens; t++) { /* k distinct experts per token */
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            for (int i = 0; i < k; i++) idx[size_t(t) * k + i] = int32_t((s >> 33) % kExperts + i) % kExperts;
        }
        fm_plan_desc desc;
        std::memset(&desc, 0, sizeof desc);
        desc.tokens = tokens, desc.top_k = k, desc.experts = kExperts;
        std::memset(&plan, 0, sizeof plan);
        plan.counts = counts.data(), plan.offsets = offsets.data(), plan.order = order.data(), plan.position = position.data();
        fm_routing_plan_build(&desc, idx.data(), k, nullptr, 0, &plan);
    }
    // The bytes `kernel` must move (the table above); the plan is dropless, rows = tokens * k.
    size_t bytes(Kernel kernel) const {
        const size_t rows = size_t(tokens) * k, floats = kernel == kCombineBackward ? tokens + 2 * rows : tokens + rows;
        return floats * d * sizeof(float);
    }
    fm_status run(Kernel kernel) {
        switch (kernel) {
        case kDispatch: return fm_dispatch_forward(&plan, d, x.data(), d, xe.data(), d);
        case kCombine: return fm_combine_forward(&plan, d, ye.data(), d, gates.data(), k, y.data(), d);
        case kDispatchBackward: return fm_dispatch_backward(&plan, d, ye.data(), d, y.data(), d);
        default: return fm_combine_backward(&plan, d, ye.data(), d, gates.data(), k, x.data(), d, xe.data(), d, d_gates.data(), k);
        }
    }
};

void timed(benchmark::State &state, const Routed &r, size_t bytes, const std::function<void()> &step) {
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * r.tokens);
    state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
}

void flexmoe(benchmark::State &state, Kernel kernel, int tokens, int d, int k) {
    Routed &r = fmbench::cached<Routed>(tokens, d, k);
    if (r.run(kernel) != FM_OK ||
        (kernel == kDispatch && std::memcmp(r.xe.data(), r.x.data() + size_t(r.order[0] / k) * d, size_t(d) * 4) != 0)) {
        state.SkipWithError("kernel failed");
        return;
    }
    timed(state, r, r.bytes(kernel), [&] { r.run(kernel); });
}

// memcpy reading half the bytes `kernel` must move and writing the other half.
void peak(benchmark::State &state, Kernel kernel, int tokens, int d, int k) {
    Routed &r = fmbench::cached<Routed>(tokens, d, k);
    const size_t bytes = r.bytes(kernel);
    timed(state, r, bytes, [&] { std::memcpy(r.scratch_out.data(), r.scratch_in.data(), bytes / 2); });
}

int register_dispatch() {
    for (int tokens : kTokens)
        for (int d : kDims)
            for (int k : kTopK)
                for (Kernel kernel : {kDispatch, kCombine, kDispatchBackward, kCombineBackward}) {
                    const std::string name = kKernelNames[kernel], shape =
                        "/" + std::to_string(tokens) + "/" + std::to_string(d) + "/" + std::to_string(k);
                    benchmark::RegisterBenchmark((name + "/flexmoe" + shape).c_str(), flexmoe, kernel, tokens, d, k);
                    benchmark::RegisterBenchmark((name + "/peak" + shape).c_str(), peak, kernel, tokens, d, k);
                }
    return 0;
}

const int registered = register_dispatch();

}  // namespace
