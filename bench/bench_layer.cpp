// The headline: the SMoE layer per modality-combination mix, at one thread, side by side with
// what a user would otherwise run.
//   moe_layer/<impl>/<mix>/<M>/<tokens>        forward (inference: no noise)
//   moe_layer_train/<impl>/<mix>/<M>/<tokens>  forward in training (noise, gate loss) + backward
//   routing/<impl>/<mix>/<M>/<tokens>          gate -> plan -> dispatch -> combine, no experts
// impls:
//   flexmoe   fm_moe_forward / fm_moe_backward (routing: the public kernels in a row)
//   torch     the same layer as the Flex-MoE reference code runs it, through libtorch in this
//             process (bench/torch_moe.cpp), on the same weights, inputs and noise; its output is
//             checked against flexmoe's before it is timed
//   openblas  the experts alone: per expert cblas_sgemm (x W1 + b1), GELU, cblas_sgemm (h W2 + b2)
//             on rows already dispatched, with flexmoe's GELU kernel (a libm erf per element would
//             cost more than the GEMMs), so flexmoe / openblas measures the layer against the
//             GEMMs of the experts alone
//   peak      the layer's FLOPs at the FMA peak measured in this process, as tokens per second
// Mixes over the 2^M - 1 modality combinations (Flex-MoE's order, 0 = all modalities), one
// combination per sample of 16 tokens:
//   full       every sample has every modality
//   single     every sample has modality 0 only
//   uniform    combinations uniformly
//   skewed     60 % full, 30 % one modality missing, 10 % two missing
//   realistic  each modality dropped with probability 0.3, at least one kept
// Tokens are routed by a trained-looking S-Router: each combination's tokens carry a direction
// that the gate weights map to the expert (combination mod E), so most of them go to it first;
// full-modality tokens spread over all experts (balanced by the G-Router). Counters: GFLOPs,
// peak_pct (% of the FMA peak), imbalance (the busiest expert's rows over the mean), dropped.
// FLOPs: 2 T d E per gate projection (two in training), 4 d h per expert row forward, twice that
// backward, and twice the projections backward; softmax, GELU and the data movement count none.
#include <cblas.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_layer_setup.hpp"

namespace {

using fmbench::Layer;
using fmbench::kMixes;

Layer &layer_of(const std::string &mix, int M, int T) { return fmbench::cached<Layer>(mix, M, T); }

void counters(benchmark::State &state, const Layer &l, double flops_per_call) {
    state.SetItemsProcessed(int64_t(state.iterations()) * l.T);
    const double flops = flops_per_call * double(state.iterations());
    state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
    state.counters["peak_pct"] =
        benchmark::Counter(flops * 1e-9 * 100.0 / fmbench::fma_peak_gflops(), benchmark::Counter::kIsRate);
    state.counters["imbalance"] = l.imbalance;
    state.counters["dropped"] = 0;
}

void flexmoe_forward(benchmark::State &state, std::string mix, int M, int T) {
    Layer &l = layer_of(mix, M, T);
    l.batch.training = 0;
    for (auto _ : state) {
        if (fm_moe_forward(&l.desc, &l.params, &l.batch, l.y.data(), 0, nullptr, l.workspace, nullptr) != FM_OK)
            return state.SkipWithError("fm_moe_forward failed");
        benchmark::ClobberMemory();
    }
    counters(state, l, l.forward_flops());
}

// threads 0: as set process-wide (one, bench_main's OpenMP setting); else fm_set_threads for this run
void flexmoe_train(benchmark::State &state, std::string mix, int M, int T, int threads) {
    Layer &l = layer_of(mix, M, T);
    const fm_moe_loss_weights weights = {0.01f, 0.0f, 0.0f, nullptr};
    const fmbench::ThreadScope scope(threads);
    l.batch.training = 1;
    for (auto _ : state) {
        if (fm_moe_forward(&l.desc, &l.params, &l.batch, l.y.data(), 0, l.saved, l.workspace, nullptr) != FM_OK ||
            fm_moe_backward(&l.desc, &l.params, &l.batch, l.saved, l.dy.data(), 0, &weights, l.dx.data(), 0, &l.grads,
                            l.workspace) != FM_OK)
            return state.SkipWithError("fm_moe_forward/backward failed");
        benchmark::ClobberMemory();
    }
    l.batch.training = 0;
    counters(state, l, l.train_flops());
}

// The experts alone, the way a per-expert loop of nn.Linear runs them on OpenBLAS.
void openblas_experts(benchmark::State &state, std::string mix, int M, int T) {
    Layer &l = layer_of(mix, M, T);
    const int D = Layer::D, H = Layer::H;
    for (auto _ : state) {
        for (int e = 0; e < Layer::E; e++) {
            const int m = l.offsets[e + 1] - l.offsets[e];
            if (!m) continue;
            float *xe = &l.xe[size_t(l.offsets[e]) * D], *he = &l.he[size_t(l.offsets[e]) * H];
            float *ye = &l.ye[size_t(l.offsets[e]) * D];
            for (int r = 0; r < m; r++) std::memcpy(he + size_t(r) * H, &l.b1[size_t(e) * H], H * sizeof(float));
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, H, D, 1.0f, xe, D, &l.w1[size_t(e) * D * H], H, 1.0f,
                        he, H);
            fm_gelu_forward(m, H, FM_GELU_ERF, he, H, he, H); // flexmoe's GELU: the ratio measures the GEMMs
            for (int r = 0; r < m; r++) std::memcpy(ye + size_t(r) * D, &l.b2[size_t(e) * D], D * sizeof(float));
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, D, H, 1.0f, he, H, &l.w2[size_t(e) * H * D], D, 1.0f,
                        ye, D);
        }
        benchmark::ClobberMemory();
    }
    counters(state, l, l.expert_flops());
}

void peak(benchmark::State &state, std::string mix, int M, int T, bool train) {
    Layer &l = layer_of(mix, M, T);
    double flops = 0.0;
    for (auto _ : state) flops += fmbench::fma_loop();
    const double per_token = (train ? l.train_flops() : l.forward_flops()) / T;
    state.SetItemsProcessed(int64_t(flops / per_token));
    state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}

// gate -> plan -> dispatch -> combine with the public kernels, the experts left out (combine
// reads the dispatched rows back).
struct Routing {
    Layer &l;
    fmbench::Floats clean, gates, xe;
    std::vector<int32_t> indices, counts, offsets, order, position;
    fm_routing_plan plan{};
    explicit Routing(Layer &l_)
        : l(l_), clean(size_t(l_.T) * Layer::E), gates(size_t(l_.T) * Layer::K), xe(size_t(l_.T) * Layer::K * Layer::D),
          indices(size_t(l_.T) * Layer::K), counts(Layer::E), offsets(Layer::E + 1), order(size_t(l_.T) * Layer::K),
          position(size_t(l_.T) * Layer::K) {
        plan.counts = counts.data(), plan.offsets = offsets.data(), plan.order = order.data();
        plan.position = position.data();
    }
    bool run() {
        const int T = l.T, D = Layer::D, E = Layer::E, K = Layer::K;
        fm_gate_desc gate{};
        gate.tokens = T, gate.experts = E, gate.top_k = K;
        fm_gate_tensors tensors{};
        tensors.clean_logits = clean.data(), tensors.indices = indices.data(), tensors.gates = gates.data();
        fm_plan_desc plan_desc{};
        plan_desc.tokens = T, plan_desc.top_k = K, plan_desc.experts = E;
        return fm_gate_logits_forward(T, D, E, l.x.data(), D, l.w_gate.data(), nullptr, clean.data(), nullptr) == FM_OK &&
               fm_noisy_gate_forward(&gate, &tensors) == FM_OK &&
               fm_routing_plan_build(&plan_desc, indices.data(), K, gates.data(), K, &plan) == FM_OK &&
               fm_dispatch_forward(&plan, D, l.x.data(), D, xe.data(), D) == FM_OK &&
               fm_combine_forward(&plan, D, xe.data(), D, gates.data(), K, l.y.data(), D) == FM_OK;
    }
};

void flexmoe_routing(benchmark::State &state, std::string mix, int M, int T) {
    Layer &l = layer_of(mix, M, T);
    Routing r(l);
    for (auto _ : state) {
        if (!r.run()) return state.SkipWithError("routing failed");
        benchmark::ClobberMemory();
    }
    counters(state, l, 2.0 * T * Layer::D * Layer::E);
}

#ifdef FLEXMOE_BENCH_TORCH
// max |a - b| / max |b|
double relative_error(const float *a, const float *b, size_t n) {
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        worst = std::max(worst, double(std::fabs(a[i] - b[i])));
        scale = std::max(scale, double(std::fabs(b[i])));
    }
    return worst / (scale > 0 ? scale : 1.0);
}

// Tokens whose output differs from flexmoe's by more than 1e-4 of the largest value: a token
// whose top k + 1 logits nearly tie may choose another expert in torch's rounding; more than
// one in a thousand means the peer computes something else.
bool torch_agrees(benchmark::State &state, const float *mine, const float *theirs, int T, int D) {
    double scale = 0.0;
    for (size_t i = 0; i < size_t(T) * D; i++) scale = std::max(scale, double(std::fabs(mine[i])));
    int differ = 0;
    for (int t = 0; t < T; t++) {
        double worst = 0.0;
        for (int d = 0; d < D; d++) worst = std::max(worst, double(std::fabs(mine[size_t(t) * D + d] - theirs[size_t(t) * D + d])));
        differ += worst > 1e-4 * scale;
    }
    state.counters["tokens_differ"] = differ;
    if (differ * 1000 > T) {
        state.SkipWithError(("torch and flexmoe disagree on " + std::to_string(differ) + " tokens").c_str());
        return false;
    }
    return true;
}

void torch_forward(benchmark::State &state, std::string mix, int M, int T) {
    Layer &l = layer_of(mix, M, T);
    fmbench::TorchMoe &torch = l.torch_peer();
    fmbench::Floats y_torch(l.y.size());
    l.batch.training = 0;
    fm_moe_forward(&l.desc, &l.params, &l.batch, l.y.data(), 0, nullptr, l.workspace, nullptr);
    torch.forward(y_torch.data());
    if (!torch_agrees(state, y_torch.data(), l.y.data(), T, Layer::D)) return;
    for (auto _ : state) {
        torch.forward(y_torch.data());
        benchmark::ClobberMemory();
    }
    counters(state, l, l.forward_flops());
}

void torch_train(benchmark::State &state, std::string mix, int M, int T) {
    Layer &l = layer_of(mix, M, T);
    fmbench::TorchMoe &torch = l.torch_peer();
    const fm_moe_loss_weights weights = {0.01f, 0.0f, 0.0f, nullptr};
    fmbench::Floats y_torch(l.y.size()), dx_torch(l.dx.size()), g_gate(l.g_gate.size()), g_w1(l.w1.size());
    fmbench::Floats g_w1_mine(l.w1.size());
    float gate_loss = 0.0f;
    fmbench::TorchMoe::Grads g;
    g.dx = dx_torch.data(), g.w_gate = g_gate.data(), g.w1 = g_w1.data();
    l.batch.training = 1;
    fm_moe_stats stats{};
    fm_moe_forward(&l.desc, &l.params, &l.batch, l.y.data(), 0, l.saved, l.workspace, &stats);
    fm_moe_backward(&l.desc, &l.params, &l.batch, l.saved, l.dy.data(), 0, &weights, l.dx.data(), 0, &l.grads, l.workspace);
    l.batch.training = 0;
    torch.train_step(l.dy.data(), 0.01f, y_torch.data(), &gate_loss, g);
    fm_unpack_weights(Layer::E, Layer::D, Layer::H, FM_WEIGHTS_IN_BY_OUT, l.g_w1.data(), g_w1_mine.data(), Layer::H);
    if (!torch_agrees(state, y_torch.data(), l.y.data(), T, Layer::D)) return;
    const double errors[] = {relative_error(dx_torch.data(), l.dx.data(), l.dx.size()),
                             relative_error(g_gate.data(), l.g_gate.data(), g_gate.size()),
                             relative_error(g_w1.data(), g_w1_mine.data(), g_w1.size()),
                             std::fabs(gate_loss - stats.gate_loss) / std::max(1.0f, std::fabs(stats.gate_loss))};
    const double worst = *std::max_element(std::begin(errors), std::end(errors));
    state.counters["torch_grad_err"] = worst;
    if (worst > 1e-3)
        return state.SkipWithError(("torch's gradients differ from flexmoe's by " + std::to_string(worst)).c_str());
    for (auto _ : state) {
        torch.train_step(l.dy.data(), 0.01f, y_torch.data(), nullptr, fmbench::TorchMoe::Grads{});
        benchmark::ClobberMemory();
    }
    counters(state, l, l.train_flops());
}
#endif

const bool registered = [] {
    openblas_set_num_threads(1);
    for (int M : {3, 4, 6})
        for (const char *mix : kMixes)
            for (int T : {1024, 4096}) {
                const std::string tail = std::string("/") + mix + "/" + std::to_string(M) + "/" + std::to_string(T);
                benchmark::RegisterBenchmark(("moe_layer/flexmoe" + tail).c_str(), flexmoe_forward, mix, M, T);
#ifdef FLEXMOE_BENCH_TORCH
                benchmark::RegisterBenchmark(("moe_layer/torch" + tail).c_str(), torch_forward, mix, M, T);
#endif
                benchmark::RegisterBenchmark(("moe_layer/openblas" + tail).c_str(), openblas_experts, mix, M, T);
                benchmark::RegisterBenchmark(("moe_layer/peak" + tail).c_str(), peak, mix, M, T, false);
                benchmark::RegisterBenchmark(("moe_layer_train/flexmoe" + tail).c_str(), flexmoe_train, mix, M, T, 0);
#ifdef FLEXMOE_BENCH_TORCH
                benchmark::RegisterBenchmark(("moe_layer_train/torch" + tail).c_str(), torch_train, mix, M, T);
#endif
                benchmark::RegisterBenchmark(("moe_layer_train/peak" + tail).c_str(), peak, mix, M, T, true);
                benchmark::RegisterBenchmark(("routing/flexmoe" + tail).c_str(), flexmoe_routing, mix, M, T);
            }
    // the scaling study: forward + backward at 1, 2 and every thread of the machine
    for (const char *mix : kMixes)
        for (int threads : fmbench::thread_counts())
            benchmark::RegisterBenchmark(("moe_layer_train/flexmoe_t" + std::to_string(threads) + "/" + mix + "/6/4096").c_str(),
                                         flexmoe_train, mix, 6, 4096, threads)
                ->UseRealTime();
    return true;
}();

}  // namespace
