// One training step of the Flex-MoE model (forward + backward, no optimiser), at one thread:
//   model_step/<impl>/<M>/<batch>
// impls:
//   flexmoe  fm_model_forward + fm_model_backward
//   torch    the same model in libtorch (bench/torch_moe.cpp) in this process, on the same
//            parameters, batch and gate noise; its loss and two gradients are checked against
//            flexmoe's before it is timed
//   peak     the step's FLOPs at the FMA peak measured in this process, as samples per second
// and the scaling study (impl flexmoe_t<threads>), beside its control fma_loop/peak_t<threads>.
// The model is the reference's configuration (d 128, 4 heads, 16 patches per modality, 16
// experts, top-4, hidden 256) over the first M views of the handwritten digits (feature counts
// 76, 216, 64, 240, 47, 6; 10 classes), each view of a sample missing with probability 0.3 (at
// least one kept), dropout off in both. items_per_second counts samples.
// FLOPs (forward; the step counts three times that): 2 P P_m d per observed modality of a sample
// (its encoder), 2 R d (d + 2d + d) for the attention's projections over R = samples * M * 16
// tokens, 4 N^2 d per sample for its scores and their weighted sum, per chunk 4 T d E for the
// gate's two projections and 4 d h per routed row for the experts, 2 M d C for the head;
// LayerNorm, softmax, GELU and the data movement count nothing.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "bench_common.hpp"
#ifdef FLEXMOE_BENCH_TORCH
#include "torch_moe.hpp"
#endif

namespace {

constexpr int kViews[6] = {76, 216, 64, 240, 47, 6};
constexpr int kClasses = 10;
constexpr double kMissing = 0.3;

// A model, its batch and the FLOPs of one step.
struct Problem {
    fm_model model{};
    fm_model_batch batch{};
    std::vector<std::vector<float>> features;
    std::vector<uint8_t> observed;
    std::vector<int32_t> labels, combination;
    double flops = 0.0;

    Problem(int M, int samples) {
        fm_model_desc desc{};
        desc.modalities = M, desc.classes = kClasses, desc.dropout = -1.0f;
        for (int m = 0; m < M; m++) desc.features[m] = kViews[m];
        if (fm_model_create(&desc, samples, &model) != FM_OK || fm_model_init(&model, 1) != FM_OK) return;
        uint64_t rng = 42;
        auto uniform = [&rng] {
            rng += 0x9E3779B97F4A7C15ull;
            uint64_t z = rng;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            return double((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0);
        };
        observed.assign(size_t(samples) * M, 0);
        labels.resize(size_t(samples));
        combination.resize(size_t(samples));
        for (int s = 0; s < samples; s++) {
            uint32_t mask = 0;
            while (!mask)
                for (int m = 0; m < M; m++)
                    if (uniform() >= kMissing) mask |= 1u << m;
            for (int m = 0; m < M; m++) observed[size_t(s) * M + m] = uint8_t((mask >> m) & 1u);
            labels[size_t(s)] = int32_t(uniform() * kClasses);
            combination[size_t(s)] = fm_combination_index(M, mask);
        }
        features.resize(size_t(M));
        for (int m = 0; m < M; m++) {
            features[size_t(m)].resize(size_t(samples) * kViews[m]);
            for (float &v : features[size_t(m)]) v = float(2.0 * uniform() - 1.0);
            batch.features[m] = features[size_t(m)].data();
        }
        batch.samples = samples, batch.observed = observed.data(), batch.labels = labels.data();
        batch.training = 1, batch.seed = 7, batch.step = 1;
        count_flops();
    }
    ~Problem() { fm_model_destroy(&model); }
    bool ok() const { return model.params != nullptr; }

    void count_flops() {
        const fm_model_desc &c = model.config;
        const double S = batch.samples, M = c.modalities, P = c.patches, d = c.dim, R = S * M * P, N = M * P;
        double forward = 0.0;
        for (size_t i = 0; i < observed.size(); i++)
            if (observed[i]) forward += 2.0 * P * std::ceil(double(c.features[i % c.modalities]) / P) * d;
        forward += 2.0 * R * d * 4.0 * d + 4.0 * S * N * N * d;
        forward += M * (4.0 * S * P * d * c.experts + S * P * c.top_k * 4.0 * d * c.hidden);
        forward += 2.0 * S * M * d * c.classes;
        flops = 3.0 * forward;
    }
};

void report(benchmark::State &state, const Problem &p) {
    state.SetItemsProcessed(int64_t(state.iterations()) * p.batch.samples);
    state.counters["GFLOPs"] = benchmark::Counter(p.flops * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
    state.counters["peak_pct"] = benchmark::Counter(p.flops * 1e-9 * 100.0 / fmbench::fma_peak_gflops() * double(state.iterations()),
                                                    benchmark::Counter::kIsRate);
}

void flexmoe_step(benchmark::State &state, int M, int samples, int threads) {
    Problem p(M, samples);
    const fmbench::ThreadScope scope(threads);
    if (!p.ok()) return state.SkipWithError("fm_model_create failed");
    // one step before timing, as torch_step's check: the first touches every page of the model's
    // fresh state (tens of MB; over 100 ms on a VM whose page faults are slow), which a run of a
    // few iterations would otherwise average in
    if (fm_model_forward(&p.model, &p.batch, nullptr, nullptr) != FM_OK || fm_model_backward(&p.model, &p.batch) != FM_OK)
        return state.SkipWithError("fm_model_forward/backward failed");
    for (auto _ : state)
        if (fm_model_forward(&p.model, &p.batch, nullptr, nullptr) != FM_OK || fm_model_backward(&p.model, &p.batch) != FM_OK)
            return state.SkipWithError("fm_model_forward/backward failed");
    report(state, p);
}

// The scaling study's control: a fixed amount of the FMA loop (kFmaItems runs) split over
// `threads` threads of the same OpenMP runtime, so that its efficiency is what the machine
// delivered to a perfectly parallel loop in this run (a shared VM may not give every core).
constexpr int kFmaItems = 60; // divisible by 1 to 6, 10, 12, 15, 20, 30 and 60 threads
void fma_threads(benchmark::State &state, int threads) {
    double flops = 0.0;
    for (auto _ : state) {
        int item;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : flops)
        for (item = 0; item < kFmaItems; item++) flops += fmbench::fma_loop();
    }
    state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}

void peak(benchmark::State &state, int M, int samples) {
    Problem p(M, samples);
    if (!p.ok()) return state.SkipWithError("fm_model_create failed");
    double flops = 0.0;
    for (auto _ : state) flops += fmbench::fma_loop();
    state.SetItemsProcessed(int64_t(flops / p.flops * samples));
    state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}

#ifdef FLEXMOE_BENCH_TORCH
// max |a - b| / max |b|
double relative_error(const std::vector<float> &a, const std::vector<float> &b) {
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < a.size(); i++) {
        worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
        scale = std::max(scale, std::fabs(double(b[i])));
    }
    return scale > 0.0 ? worst / scale : worst;
}

void torch_step(benchmark::State &state, int M, int samples) {
    Problem p(M, samples);
    if (!p.ok()) return state.SkipWithError("fm_model_create failed");
    const fm_model_desc &c = p.model.config;
    fmbench::TorchModelConfig tc;
    tc.modalities = M, tc.classes = c.classes, tc.patches = c.patches, tc.dim = c.dim, tc.heads = c.heads;
    tc.experts = c.experts, tc.top_k = c.top_k, tc.hidden = c.hidden;
    for (int m = 0; m < M; m++) tc.features[m] = c.features[m];
    // the expert weights unpacked, everything else read in place from flexmoe's arena
    std::vector<std::vector<float>> unpacked;
    auto parameter = [&](const std::string &name) -> const float * {
        const fm_tensor_info *t = fm_model_tensor(&p.model, name.c_str());
        if (!t) return nullptr;
        if (!t->packed) return p.model.params + t->offset;
        unpacked.emplace_back(size_t(t->shape[0]) * t->shape[1] * t->shape[2]);
        fm_unpack_weights(t->shape[0], t->shape[1], t->shape[2], FM_WEIGHTS_IN_BY_OUT, p.model.params + t->offset,
                          unpacked.back().data(), t->shape[2]);
        return unpacked.back().data();
    };
    const int T = samples * c.patches;
    std::vector<float> noise(size_t(M) * T * c.experts);
    for (int m = 0; m < M; m++)
        for (int t = 0; t < T; t++)
            for (int e = 0; e < c.experts; e++)
                noise[(size_t(m) * T + t) * c.experts + e] = fm_gate_noise(fm_model_noise_seed(&p.batch), uint64_t(m) * T + uint64_t(t), e);
    fmbench::TorchModelBatch tb;
    tb.samples = samples, tb.observed = p.observed.data(), tb.combination = p.combination.data();
    tb.labels = p.labels.data(), tb.noise = noise.data();
    for (int m = 0; m < M; m++) tb.features[m] = p.batch.features[m];
    fmbench::TorchModel torch_model(tc, parameter, tb);
    // the same step in both before timing: the loss and two gradients, through the whole model
    fm_model_losses losses{};
    if (fm_model_forward(&p.model, &p.batch, nullptr, &losses) != FM_OK || fm_model_backward(&p.model, &p.batch) != FM_OK)
        return state.SkipWithError("fm_model_forward/backward failed");
    const float torch_loss = torch_model.train_step();
    double worst = std::fabs(double(torch_loss) - losses.loss) / std::max(1e-3, std::fabs(double(losses.loss)));
    for (const char *name : {"encoder.0.weight", "moe.w1"}) {
        const fm_tensor_info *t = fm_model_tensor(&p.model, name);
        const size_t n = t->packed ? size_t(t->shape[0]) * t->shape[1] * t->shape[2] : t->floats;
        std::vector<float> ours(n), theirs(n);
        if (t->packed)
            fm_unpack_weights(t->shape[0], t->shape[1], t->shape[2], FM_WEIGHTS_IN_BY_OUT, p.model.grads + t->offset,
                              ours.data(), t->shape[2]);
        else
            std::memcpy(ours.data(), p.model.grads + t->offset, n * sizeof(float));
        torch_model.gradient(name, theirs.data());
        worst = std::max(worst, relative_error(ours, theirs));
    }
    state.counters["torch_err"] = worst;
    if (!(worst < 1e-3))
        return state.SkipWithError(("torch's loss or gradients differ from flexmoe's by " + std::to_string(worst)).c_str());
    for (auto _ : state) benchmark::DoNotOptimize(torch_model.train_step());
    report(state, p);
}
#endif

const bool registered = [] {
    for (int M : {3, 4, 6})
        for (int samples : {16}) {
            const std::string tail = "/" + std::to_string(M) + "/" + std::to_string(samples);
            benchmark::RegisterBenchmark(("model_step/flexmoe" + tail).c_str(), flexmoe_step, M, samples, 0);
#ifdef FLEXMOE_BENCH_TORCH
            benchmark::RegisterBenchmark(("model_step/torch" + tail).c_str(), torch_step, M, samples);
#endif
            benchmark::RegisterBenchmark(("model_step/peak" + tail).c_str(), peak, M, samples);
        }
    for (int threads : fmbench::thread_counts()) { // the scaling study
        benchmark::RegisterBenchmark(("model_step/flexmoe_t" + std::to_string(threads) + "/6/16").c_str(), flexmoe_step, 6, 16,
                                     threads)
            ->UseRealTime();
        benchmark::RegisterBenchmark(("fma_loop/peak_t" + std::to_string(threads)).c_str(), fma_threads, threads)->UseRealTime();
    }
    return true;
}();

}  // namespace
