// Routing gates over 4096 tokens, fused against the same chain of separate flexmoe kernels.
// gate/<impl>/<E>/<k>: the noisy top-k gate in training, as Flex-MoE runs it every step (FastMoE's
// gate: indices, gates, and the importance and load its balancing loss needs), from clean and
// noise logits.
//   flexmoe        fm_noisy_gate_forward: noise, top-(k+1), gates, importance and load in one
//                  pass over tiles of tokens, with its workspace (3 x 16 floats per expert) so
//                  every expert's noise is drawn once, as the chain draws it once into its
//                  tokens x experts noisy and std matrices
//   flexmoe_chain  fm_gate_noise_forward (noisy logits and std, tokens x experts each) -> fm_topk
//                  (k + 1 values and indices) -> fm_softmax_forward over the first k values ->
//                  importance (a scatter-add of the gates) -> fm_gate_load_forward
// gate_inference/<impl>/<E>/<k>: softmax-then-top-k routing with renormalised weights (Mixtral).
//   flexmoe        fm_softmax_topk_forward: top-k of the logits, then k exponentials per token
//   flexmoe_chain  what ggml runs: fm_softmax_forward over all experts -> fm_topk of the
//                  probabilities -> divide the k weights by their sum
// Each impl must give the fused path's indices exactly and its gates to 1e-5.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr int kTokens = 4096;
const int kExperts[] = {16, 64, 256};  // k < E everywhere: the load is FastMoE's probability
const int kTopK[] = {1, 2, 4, 8};

struct GateData {
    int experts, k;
    fmbench::Floats clean, noise, noisy, std, top_values, gates, want_gates, importance, load, want_load, workspace;
    std::vector<int32_t> indices, want_indices, top_indices;
    GateData(int e, int k_)
        : experts(e), k(k_), clean(fmbench::normal_floats(size_t(kTokens) * e, 1.0f, 300 + e)),
          noise(fmbench::normal_floats(size_t(kTokens) * e, 1.0f, 700 + e)), noisy(clean.size()), std(clean.size()),
          top_values(size_t(kTokens) * (k_ + 1)), gates(size_t(kTokens) * k_), want_gates(gates.size()), importance(e),
          load(e), want_load(e), indices(gates.size()), want_indices(gates.size()), top_indices(top_values.size()) {
        fm_gate_desc desc = describe();
        workspace.resize(fm_gate_workspace_floats(&desc));
        fm_gate_tensors t = tensors(want_indices.data(), want_gates.data());
        t.load = want_load.data();
        fm_noisy_gate_forward(&desc, &t);
    }
    fm_gate_desc describe() const {
        fm_gate_desc desc;
        std::memset(&desc, 0, sizeof desc);
        desc.tokens = kTokens, desc.experts = experts, desc.top_k = k, desc.training = 1, desc.seed = 2024;
        return desc;
    }
    fm_gate_tensors tensors(int32_t *idx, float *g) const {
        fm_gate_tensors t;
        std::memset(&t, 0, sizeof t);
        t.clean_logits = clean.data(), t.noise_logits = noise.data(), t.indices = idx, t.gates = g;
        return t;
    }
};

void timed(benchmark::State &state, GateData &d, const std::function<void()> &step, bool with_load = false) {
    std::fill(d.indices.begin(), d.indices.end(), -1);
    step();
    if (d.indices != d.want_indices || !(fmbench::max_abs_diff(d.gates, d.want_gates) <= 1e-5) ||
        (with_load && !(fmbench::max_abs_diff(d.load, d.want_load) <= 1e-5 * kTokens))) {
        state.SkipWithError("indices, gates or load differ from the fused gate on the default path");
        return;
    }
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * kTokens);
}

void fused(benchmark::State &state, fm_isa isa, int e, int k) {
    GateData &d = fmbench::cached<GateData>(e, k);
    if (!fmbench::use_isa(state, isa)) return;
    const fm_gate_desc desc = d.describe();
    fm_gate_tensors t = d.tensors(d.indices.data(), d.gates.data());
    t.importance = d.importance.data(), t.load = d.load.data(), t.workspace = d.workspace.data();
    timed(state, d, [&] { fm_noisy_gate_forward(&desc, &t); }, true);
}

void chain(benchmark::State &state, int e, int k) {
    GateData &d = fmbench::cached<GateData>(e, k);
    const fm_gate_desc desc = d.describe();
    timed(state, d, [&] {
        fm_gate_noise_forward(&desc, d.clean.data(), e, d.noise.data(), e, d.noisy.data(), e, d.std.data(), e);
        fm_topk(kTokens, e, k + 1, d.noisy.data(), e, d.top_indices.data(), k + 1, d.top_values.data(), k + 1);
        fm_softmax_forward(kTokens, k, d.top_values.data(), k + 1, d.gates.data(), k);
        std::fill(d.importance.begin(), d.importance.end(), 0.0f);
        for (int t = 0; t < kTokens; t++)
            for (int i = 0; i < k; i++) {
                d.indices[size_t(t) * k + i] = d.top_indices[size_t(t) * (k + 1) + i];
                d.importance[d.indices[size_t(t) * k + i]] += d.gates[size_t(t) * k + i];
            }
        fm_gate_load_forward(&desc, d.clean.data(), e, d.noisy.data(), e, d.std.data(), e, d.top_values.data(), k + 1,
                             nullptr, d.load.data());
    }, true);
}

// gate_inference impls are checked against fm_softmax_topk_forward's output.
void timed_inference(benchmark::State &state, GateData &d, const std::function<void()> &step) {
    std::vector<int32_t> want(d.indices.size());
    fmbench::Floats want_gates(d.gates.size());
    fm_softmax_topk_forward(kTokens, d.experts, d.k, 1, d.clean.data(), d.experts, want.data(), d.k, want_gates.data(), d.k);
    std::swap(want, d.want_indices), std::swap(want_gates, d.want_gates);
    timed(state, d, step);
    std::swap(want, d.want_indices), std::swap(want_gates, d.want_gates);
}

void fused_inference(benchmark::State &state, int e, int k) {
    GateData &d = fmbench::cached<GateData>(e, k);
    timed_inference(state, d, [&] { fm_softmax_topk_forward(kTokens, e, k, 1, d.clean.data(), e, d.indices.data(), k, d.gates.data(), k); });
}

void chain_inference(benchmark::State &state, int e, int k) {
    GateData &d = fmbench::cached<GateData>(e, k);
    timed_inference(state, d, [&] {
        fm_softmax_forward(kTokens, e, d.clean.data(), e, d.noisy.data(), e);
        fm_topk(kTokens, e, k, d.noisy.data(), e, d.indices.data(), k, d.gates.data(), k);
        for (int t = 0; t < kTokens; t++) {
            float *g = &d.gates[size_t(t) * k], sum = 0.0f;
            for (int i = 0; i < k; i++) sum += g[i];
            for (int i = 0; i < k; i++) g[i] /= sum;
        }
    });
}

int register_gate() {
    for (int e : kExperts)
        for (int k : kTopK) {
            const std::string tail = "/" + std::to_string(e) + "/" + std::to_string(k);
            benchmark::RegisterBenchmark(("gate/flexmoe" + tail).c_str(), fused, FM_ISA_AUTO, e, k);
            benchmark::RegisterBenchmark(("gate/flexmoe_chain" + tail).c_str(), chain, e, k);
            benchmark::RegisterBenchmark(("gate_inference/flexmoe" + tail).c_str(), fused_inference, e, k);
            benchmark::RegisterBenchmark(("gate_inference/flexmoe_chain" + tail).c_str(), chain_inference, e, k);
            for (fm_isa isa : fmbench::forced_isas())
                if (isa != FM_ISA_SCALAR)
                    benchmark::RegisterBenchmark(("gate/" + fmbench::impl_name(isa) + tail).c_str(), fused, isa, e, k);
        }
    return 0;
}

const int registered = register_gate();

}  // namespace
