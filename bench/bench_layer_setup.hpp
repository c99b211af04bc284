// The SMoE layer of the per-mix benchmarks, set up once: the modality-combination mixes, tokens
// routed by a trained-looking S-Router, the weights, and the buffers of a forward + backward.
// Shared by bench_layer.cpp and the schedule tracer (trace_schedule.cpp).
#pragma once

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "bench_common.hpp"
#ifdef FLEXMOE_BENCH_TORCH
#include "torch_moe.hpp"
#endif

namespace fmbench {

constexpr int kTokensPerSample = 16;
const char *const kMixes[] = {"full", "single", "uniform", "skewed", "realistic"};

// Flex-MoE's combination order: by size M .. 1, each size in lexicographic order of positions.
inline std::vector<unsigned> combinations(int M) {
    std::vector<unsigned> order;
    for (int size = M; size >= 1; size--) {
        std::vector<int> pick(size);
        for (int i = 0; i < size; i++) pick[i] = i;
        while (true) {
            unsigned mask = 0;
            for (int i : pick) mask |= 1u << i;
            order.push_back(mask);
            int i = size - 1;
            while (i >= 0 && pick[i] == M - size + i) i--;
            if (i < 0) break;
            pick[i]++;
            for (int j = i + 1; j < size; j++) pick[j] = pick[j - 1] + 1;
        }
    }
    return order;
}

struct Rng {
    uint64_t s;
    uint64_t next() {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
    int below(int n) { return int(next() % uint64_t(n)); }
};

// The combination index of each sample of a mix.
inline int draw_combination(const std::string &mix, int M, const std::vector<unsigned> &order, Rng &rng) {
    auto index_of = [&](unsigned mask) { return int(std::find(order.begin(), order.end(), mask) - order.begin()); };
    const unsigned all = (1u << M) - 1;
    if (mix == "full") return 0;
    if (mix == "single") return index_of(1u);
    if (mix == "uniform") return rng.below(int(order.size()));
    if (mix == "skewed") {
        const double u = rng.uniform();
        int missing = u < 0.6 ? 0 : u < 0.9 ? 1 : 2;
        if (missing >= M) missing = M - 1;
        unsigned mask = all;
        while (__builtin_popcount(mask) > M - missing) mask &= ~(1u << rng.below(M));
        return index_of(mask);
    }
    unsigned mask = 0; // realistic
    while (!mask)
        for (int m = 0; m < M; m++)
            if (rng.uniform() >= 0.3) mask |= 1u << m;
    return index_of(mask);
}

struct Layer {
    static constexpr int D = 128, H = 256, E = 16, K = 4;
    int T, M;
    std::string mix;
    fm_moe_desc desc{};
    std::vector<int32_t> combination, group;
    fmbench::Floats x, dy, w_gate, w_noise, w1, b1, w2, b2, w1_packed, w2_packed, noise;
    fmbench::Floats y, dx, g_gate, g_noise, g_w1, g_b1, g_w2, g_b2;
    void *saved = nullptr, *workspace = nullptr;
    fm_moe_params params{};
    fm_moe_grads grads{};
    fm_moe_batch batch{};
    std::vector<int32_t> expert_rows;
    int rows = 0;
    double imbalance = 0.0;
    // the routed rows, for the openblas experts
    fmbench::Floats xe, he, ye;
    std::vector<int32_t> offsets;

    Layer(std::string mix_, int M_, int T_) : T(T_), M(M_), mix(std::move(mix_)) {
        Rng rng{uint64_t(M) * 1000003u + uint64_t(T)};
        const std::vector<unsigned> order = combinations(M);
        combination.resize(T), group.resize(T);
        for (int s = 0; s < T; s += kTokensPerSample) {
            const int c = draw_combination(mix, M, order, rng);
            for (int t = s; t < std::min(T, s + kTokensPerSample); t++) combination[t] = c, group[t] = c > 0;
        }
        // each combination c > 0 has a direction u_c; its tokens lean along it, and the gate
        // column of expert c mod E is the sum of its combinations' directions
        const size_t C = order.size();
        fmbench::Floats directions = fmbench::normal_floats(C * D, 1.0f / std::sqrt(float(D)), 101);
        x = fmbench::normal_floats(size_t(T) * D, 1.0f, 102);
        for (int t = 0; t < T; t++)
            if (combination[t] > 0)
                for (int d = 0; d < D; d++) x[size_t(t) * D + d] += 2.5f * directions[size_t(combination[t]) * D + d];
        w_gate = fmbench::normal_floats(size_t(D) * E, 0.02f, 103);
        for (size_t c = 1; c < C; c++)
            for (int d = 0; d < D; d++) w_gate[size_t(d) * E + c % E] += 2.0f * directions[c * D + d];
        w_noise = fmbench::normal_floats(size_t(D) * E, 0.01f, 104);
        w1 = fmbench::normal_floats(size_t(E) * D * H, 1.0f / std::sqrt(float(D)), 105);
        b1 = fmbench::normal_floats(size_t(E) * H, 0.01f, 106);
        w2 = fmbench::normal_floats(size_t(E) * H * D, 1.0f / std::sqrt(float(H)), 107);
        b2 = fmbench::normal_floats(size_t(E) * D, 0.01f, 108);
        dy = fmbench::normal_floats(size_t(T) * D, 1.0f, 109);
        w1_packed.resize(E * fm_packed_weight_floats(D, H)), w2_packed.resize(E * fm_packed_weight_floats(H, D));
        fm_pack_weights(E, D, H, FM_WEIGHTS_IN_BY_OUT, w1.data(), H, w1_packed.data());
        fm_pack_weights(E, H, D, FM_WEIGHTS_IN_BY_OUT, w2.data(), D, w2_packed.data());
        g_w1.resize(w1_packed.size()), g_w2.resize(w2_packed.size());
        g_gate.resize(w_gate.size()), g_noise.resize(w_noise.size()), g_b1.resize(b1.size()), g_b2.resize(b2.size());
        y.resize(size_t(T) * D), dx.resize(size_t(T) * D);
        noise.resize(size_t(T) * E);
        for (int t = 0; t < T; t++)
            for (int e = 0; e < E; e++) noise[size_t(t) * E + e] = fm_gate_noise(kSeed, uint64_t(t), e);
        fm_moe_sizes sizes;
        fm_moe_buffer_sizes(&desc, T, &sizes);
        saved = fm_alloc(sizes.saved_bytes);
        workspace = fm_alloc(std::max(sizes.workspace_bytes, sizes.inference_workspace_bytes));
        params.w_gate = w_gate.data(), params.w_noise = w_noise.data(), params.w1 = w1_packed.data();
        params.b1 = b1.data(), params.w2 = w2_packed.data(), params.b2 = b2.data();
        grads.w_gate = g_gate.data(), grads.w_noise = g_noise.data(), grads.w1 = g_w1.data(), grads.b1 = g_b1.data();
        grads.w2 = g_w2.data(), grads.b2 = g_b2.data();
        batch.tokens = T, batch.x = x.data(), batch.combination = combination.data(), batch.token_group = group.data();
        batch.seed = kSeed;
        // the routing of an inference forward: loads, and the rows the openblas experts run
        expert_rows.resize(E);
        std::vector<int32_t> indices(size_t(T) * K);
        fm_moe_stats stats{};
        stats.expert_rows = expert_rows.data(), stats.indices = indices.data();
        fm_moe_forward(&desc, &params, &batch, y.data(), 0, nullptr, workspace, &stats);
        rows = stats.rows;
        imbalance = double(*std::max_element(expert_rows.begin(), expert_rows.end())) / (double(rows) / E);
        offsets.assign(E + 1, 0);
        for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + expert_rows[e];
        xe.resize(size_t(rows) * D), he.resize(size_t(rows) * H), ye.resize(size_t(rows) * D);
        std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < K; i++)
                std::memcpy(&xe[size_t(fill[indices[size_t(t) * K + i]]++) * D], &x[size_t(t) * D], D * sizeof(float));
    }
    ~Layer() { fm_free(saved), fm_free(workspace); }
    static constexpr uint64_t kSeed = 7;

    double forward_flops() const { return 2.0 * T * D * E + 4.0 * rows * D * H; }
    double train_flops() const { return 12.0 * T * D * E + 12.0 * rows * D * H; }
    double expert_flops() const { return 4.0 * rows * D * H; }

#ifdef FLEXMOE_BENCH_TORCH
    std::unique_ptr<fmbench::TorchMoe> torch;
    fmbench::TorchMoe &torch_peer() {
        if (!torch) {
            fmbench::TorchMoeWeights w;
            w.dim = D, w.hidden = H, w.experts = E, w.top_k = K;
            w.w_gate = w_gate.data(), w.w_noise = w_noise.data(), w.w1 = w1.data(), w.b1 = b1.data();
            w.w2 = w2.data(), w.b2 = b2.data();
            fmbench::TorchMoeBatch b;
            b.tokens = T, b.x = x.data(), b.noise = noise.data(), b.combination = combination.data();
            b.group = group.data();
            torch = std::make_unique<fmbench::TorchMoe>(w, b);
        }
        return *torch;
    }
#endif
};

}  // namespace fmbench
