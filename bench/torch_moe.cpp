// The PyTorch peer of the SMoE layer (bench/torch_moe.hpp): Flex-MoE's layer as its reference code
// runs it (FastMoE's NoisyGate, then the experts of FastMoE's dispatch), with FastMoE's CUDA
// kernels replaced by plain torch ops, on one thread. The only file that includes torch/torch.h.
#include "torch_moe.hpp"

#include <torch/torch.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cmath>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace fmbench {

namespace {

torch::Tensor float_tensor(const float *data, std::vector<int64_t> shape) {
    // from_blob does not own or copy; clone makes a tensor that owns its copy.
    return torch::from_blob(const_cast<float *>(data), shape, torch::kFloat32).clone();
}

// The standard normal CDF, as torch.distributions.Normal(0, 1).cdf in FastMoE's _prob_in_top_k.
torch::Tensor normal_cdf(const torch::Tensor &z) { return 0.5 * torch::erfc(z * -0.70710678118654752); }

// FastMoE's cv_squared per row (over the experts): unbiased variance / (mean^2 + 1e-10), 0 with one expert.
torch::Tensor cv_squared(const torch::Tensor &v) {
    if (v.size(1) == 1) return torch::zeros({v.size(0)}, v.options());
    return v.var({1}, /*unbiased=*/true, /*keepdim=*/false) / (v.mean({1}).pow(2) + 1e-10);
}

void copy_out(float *dst, const torch::Tensor &t) {
    if (!dst || !t.defined()) return;
    std::memcpy(dst, t.contiguous().data_ptr<float>(), size_t(t.numel()) * sizeof(float));
}

// A gradient (undefined when the parameter got none, e.g. an expert no token chose) into dst.
void copy_grad(float *dst, const torch::Tensor &param) {
    if (!dst) return;
    const torch::Tensor &g = param.grad();
    if (g.defined())
        std::memcpy(dst, g.contiguous().data_ptr<float>(), size_t(g.numel()) * sizeof(float));
    else
        std::memset(dst, 0, size_t(param.numel()) * sizeof(float));
}

void zero_grad(torch::Tensor &param) {
    torch::Tensor &g = param.mutable_grad();
    if (g.defined()) g.zero_();
}

// The SMoE layer's parameters as autograd leaves. The experts are separate leaves (one Linear pair
// per expert, as an expert list), so that each one's gradient accumulates in place.
struct MoeLeaves {
    int experts = 0, top_k = 0;
    float noise_epsilon = 0.01f;
    torch::Tensor w_gate, w_noise;              // dim x experts
    std::vector<torch::Tensor> w1, b1, w2, b2;  // per expert: dim x hidden, hidden, hidden x dim, dim

    void zero_grads() {
        zero_grad(w_gate);
        zero_grad(w_noise);
        for (auto *params : {&w1, &b1, &w2, &b2})
            for (torch::Tensor &p : *params) zero_grad(p);
    }
};

MoeLeaves moe_leaves(const TorchMoeWeights &w) {
    MoeLeaves p;
    const int64_t D = w.dim, H = w.hidden, E = w.experts;
    p.experts = w.experts, p.top_k = w.top_k, p.noise_epsilon = w.noise_epsilon;
    p.w_gate = float_tensor(w.w_gate, {D, E}).requires_grad_(true);
    p.w_noise = float_tensor(w.w_noise, {D, E}).requires_grad_(true);
    for (int64_t e = 0; e < E; e++) {
        p.w1.push_back(float_tensor(w.w1 + e * D * H, {D, H}).requires_grad_(true));
        p.b1.push_back(float_tensor(w.b1 + e * H, {H}).requires_grad_(true));
        p.w2.push_back(float_tensor(w.w2 + e * H * D, {H, D}).requires_grad_(true));
        p.b2.push_back(float_tensor(w.b2 + e * D, {D}).requires_grad_(true));
    }
    return p;
}

// The experts of FastMoE's dispatch with plain ops: the (token, slot) assignments stably sorted
// by expert, each expert's rows gathered, Linear -> exact GELU -> Linear, each row scaled by its
// gate and added back to its token.
torch::Tensor run_experts(const torch::Tensor &x, const torch::Tensor &indices, const torch::Tensor &gates,
                          const MoeLeaves &p) {
    const torch::Tensor flat = indices.reshape({-1});  // assignment a = token * top_k + slot
    const torch::Tensor order = std::get<1>(torch::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    const torch::Tensor counts = torch::bincount(flat, {}, p.experts);
    const torch::Tensor token_of = order.div(p.top_k, "floor");
    const torch::Tensor rows = x.index_select(0, token_of);
    const torch::Tensor row_gates = gates.reshape({-1}).index_select(0, order);
    const int64_t *count = counts.data_ptr<int64_t>();
    std::vector<torch::Tensor> outs;
    outs.reserve(size_t(p.experts));
    int64_t offset = 0;
    for (int e = 0; e < p.experts; e++) {
        const int64_t n = count[e];
        if (n == 0) continue;
        const torch::Tensor xe = rows.narrow(0, offset, n);
        const torch::Tensor h = torch::gelu(torch::addmm(p.b1[size_t(e)], xe, p.w1[size_t(e)]));  // exact (erf)
        outs.push_back(torch::addmm(p.b2[size_t(e)], h, p.w2[size_t(e)]));
        offset += n;
    }
    const torch::Tensor out = torch::cat(outs, 0) * row_gates.unsqueeze(1);
    return torch::zeros({x.size(0), x.size(1)}, x.options().requires_grad(false)).index_add_(0, token_of, out);
}

// The tokens of each group and the S-Router's rows and targets, from the tokens' combinations.
struct GateTargets {
    static constexpr int kGroups = 2;
    torch::Tensor group;                // tokens, int64 in [0, 2)
    torch::Tensor ce_rows, ce_targets;  // the tokens with combination > 0 and combination mod experts
};

GateTargets gate_targets(int64_t tokens, int experts, const int32_t *combination, const int32_t *groups) {
    std::vector<int64_t> group(static_cast<size_t>(tokens)), ce_rows, ce_targets;
    for (int64_t t = 0; t < tokens; t++) {
        const int32_t c = combination ? combination[t] : 0;
        const int32_t g = groups ? groups[t] : (c == 0 ? 0 : 1);
        if (c < 0 || g < 0 || g >= GateTargets::kGroups) throw std::invalid_argument("torch peer: bad combination or group");
        group[size_t(t)] = g;
        if (c > 0) {
            ce_rows.push_back(t);
            ce_targets.push_back(c % experts);
        }
    }
    const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    return {torch::tensor(group, i64), torch::tensor(ce_rows, i64), torch::tensor(ce_targets, i64)};
}

// FastMoE's NoisyGate in training, with fixed draws for torch.randn_like, and Flex-MoE's gate
// loss; y = the experts' combination.
struct GateOutput {
    torch::Tensor y, loss;
};

GateOutput noisy_moe_train(const torch::Tensor &x, const torch::Tensor &noise, const GateTargets &targets,
                           const MoeLeaves &p) {
    const int E = p.experts, k = p.top_k;
    const torch::Tensor clean = x.mm(p.w_gate);
    const torch::Tensor raw = x.mm(p.w_noise);
    const torch::Tensor stddev = torch::softplus(raw) + p.noise_epsilon;
    const torch::Tensor noisy = clean + noise * stddev;
    const auto top = noisy.topk(k < E ? k + 1 : k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
    const torch::Tensor &top_values = std::get<0>(top);
    const torch::Tensor top_k_values = top_values.narrow(1, 0, k);
    const torch::Tensor top_k_indices = std::get<1>(top).narrow(1, 0, k);
    const torch::Tensor gates = torch::softmax(top_k_values, 1);
    const torch::Tensor gates_full = torch::zeros_like(noisy).scatter(1, top_k_indices, gates);

    // Flex-MoE's G-Router balance: importance and load per token group.
    const torch::Tensor group_zeros = torch::zeros({GateTargets::kGroups, E}, noisy.options().requires_grad(false));
    const torch::Tensor importance = group_zeros.index_add(0, targets.group, gates_full);
    torch::Tensor load;
    if (k < E) {  // FastMoE's _prob_in_top_k
        const torch::Tensor threshold_if_in = top_values.select(1, k).unsqueeze(1);
        const torch::Tensor threshold_if_out = top_values.select(1, k - 1).unsqueeze(1);
        const torch::Tensor is_in = noisy > threshold_if_in;
        const torch::Tensor prob_if_in = normal_cdf((clean - threshold_if_in) / stddev);
        const torch::Tensor prob_if_out = normal_cdf((clean - threshold_if_out) / stddev);
        load = group_zeros.index_add(0, targets.group, torch::where(is_in, prob_if_in, prob_if_out));
    } else {  // FastMoE's _gates_to_load: the tokens routed to each expert, no gradient
        const torch::Tensor routed = torch::zeros_like(noisy).scatter(1, top_k_indices.detach(), 1.0);
        load = group_zeros.index_add(0, targets.group, routed);
    }
    const torch::Tensor balance = (cv_squared(importance) + cv_squared(load)).sum();
    // Flex-MoE's S-Router: cross-entropy of the noisy logits toward combination mod experts.
    const torch::Tensor router_ce =
        targets.ce_rows.numel() > 0
            ? torch::nn::functional::cross_entropy(noisy.index_select(0, targets.ce_rows), targets.ce_targets)
            : torch::zeros({}, noisy.options().requires_grad(false));
    return {run_experts(x, top_k_indices, gates, p), router_ce + balance};
}

// One thread for torch and for the BLAS it calls.
void use_one_thread() {
    at::set_num_threads(1);
    // Torch calls sgemm_ of the BLAS it was linked with (Debian: libblas.so.3, the alternative in
    // use); when that is OpenBLAS, at::set_num_threads leaves OpenBLAS's own pool alone.
    using set_threads_fn = void (*)(int);
    if (auto set_threads = reinterpret_cast<set_threads_fn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
        set_threads(1);
}

}  // namespace

struct TorchMoe::Impl {
    int tokens, dim, hidden;
    torch::Tensor x;      // tokens x dim, requires grad (dx)
    torch::Tensor noise;  // tokens x experts, the fixed N(0, 1) draws
    GateTargets targets;
    MoeLeaves params;
};

TorchMoe::TorchMoe(const TorchMoeWeights &w, const TorchMoeBatch &b) : impl_(new Impl) {
    if (w.dim <= 0 || w.hidden <= 0 || w.experts <= 0 || w.top_k <= 0 || w.top_k > w.experts || b.tokens <= 0 ||
        !w.w_gate || !w.w_noise || !w.w1 || !w.b1 || !w.w2 || !w.b2 || !b.x)
        throw std::invalid_argument("TorchMoe: bad shape or missing array");
    use_one_thread();
    Impl &m = *impl_;
    m.tokens = b.tokens, m.dim = w.dim, m.hidden = w.hidden;
    m.x = float_tensor(b.x, {b.tokens, w.dim}).requires_grad_(true);
    m.noise = b.noise ? float_tensor(b.noise, {b.tokens, w.experts}) : torch::zeros({b.tokens, w.experts});
    m.targets = gate_targets(b.tokens, w.experts, b.combination, b.group);
    m.params = moe_leaves(w);
}

TorchMoe::~TorchMoe() = default;

void TorchMoe::forward(float *y) {
    const Impl &m = *impl_;
    c10::InferenceMode guard;
    // FastMoE's NoisyGate in eval: the noise term is multiplied by self.training = 0, so the
    // routing logits are the clean ones (x W_noise, which only scales the noise, is not computed).
    const torch::Tensor clean = m.x.mm(m.params.w_gate);
    const auto top = clean.topk(m.params.top_k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
    const torch::Tensor gates = torch::softmax(std::get<0>(top), 1);
    copy_out(y, run_experts(m.x, std::get<1>(top), gates, m.params));
}

void TorchMoe::train_step(const float *dy, float gate_loss_weight, float *y, float *gate_loss, const Grads &grads) {
    if (!dy) throw std::invalid_argument("TorchMoe::train_step: dy is required");
    Impl &m = *impl_;
    zero_grad(m.x);
    m.params.zero_grads();
    const GateOutput out = noisy_moe_train(m.x, m.noise, m.targets, m.params);
    const torch::Tensor dy_tensor = torch::from_blob(const_cast<float *>(dy), {m.tokens, m.dim}, torch::kFloat32);
    const torch::Tensor objective = (dy_tensor * out.y).sum() + gate_loss_weight * out.loss;
    objective.backward();

    copy_out(y, out.y.detach());
    if (gate_loss) *gate_loss = out.loss.item<float>();
    copy_grad(grads.dx, m.x);
    copy_grad(grads.w_gate, m.params.w_gate);
    copy_grad(grads.w_noise, m.params.w_noise);
    const int64_t D = m.dim, H = m.hidden;
    for (int64_t e = 0; e < m.params.experts; e++) {
        copy_grad(grads.w1 ? grads.w1 + e * D * H : nullptr, m.params.w1[size_t(e)]);
        copy_grad(grads.b1 ? grads.b1 + e * H : nullptr, m.params.b1[size_t(e)]);
        copy_grad(grads.w2 ? grads.w2 + e * H * D : nullptr, m.params.w2[size_t(e)]);
        copy_grad(grads.b2 ? grads.b2 + e * D : nullptr, m.params.b2[size_t(e)]);
    }
}

struct TorchModel::Impl {
    TorchModelConfig c;
    int samples = 0;
    std::map<std::string, torch::Tensor> leaves;  // every parameter but the SMoE layer's
    MoeLeaves moe;
    std::vector<torch::Tensor> patches;           // per modality: observed samples x patches x P_m
    std::vector<torch::Tensor> observed, missing; // per modality: sample indices (int64)
    torch::Tensor combination, labels, noise;     // samples; samples; modalities x tokens x experts
    GateTargets targets;

    const torch::Tensor &leaf(const std::string &name) const { return leaves.at(name); }

    torch::Tensor layer_norm(const torch::Tensor &x, const std::string &prefix) const {
        return torch::layer_norm(x, {c.dim}, leaf(prefix + ".weight"), leaf(prefix + ".bias"), c.layernorm_eps);
    }

    torch::Tensor loss() const {
        const int64_t S = samples, M = c.modalities, P = c.patches, N = M * P, d = c.dim, heads = c.heads;
        // tokens: the encoders of the observed modalities, the bank for the missing ones
        std::vector<torch::Tensor> blocks;
        for (int64_t m = 0; m < M; m++) {
            torch::Tensor block = torch::zeros({S, P, d});
            const std::string name = "encoder." + std::to_string(m);
            if (observed[size_t(m)].numel() > 0)
                block = block.index_put({observed[size_t(m)]},
                                        torch::matmul(patches[size_t(m)], leaf(name + ".weight")) + leaf(name + ".bias"));
            if (missing[size_t(m)].numel() > 0)
                block = block.index_put({missing[size_t(m)]},
                                        leaf("bank").index({combination.index_select(0, missing[size_t(m)]), m}));
            blocks.push_back(block);
        }
        torch::Tensor x = torch::cat(blocks, 1) + leaf("position");
        // pre-LN multi-head self-attention
        const torch::Tensor h = layer_norm(x, "attention.norm");
        const torch::Tensor q = torch::matmul(h, leaf("attention.q.weight")).view({S, N, heads, d / heads}).transpose(1, 2);
        const torch::Tensor kv = torch::matmul(h, leaf("attention.kv.weight"));
        const torch::Tensor k = kv.narrow(2, 0, d).reshape({S, N, heads, d / heads}).transpose(1, 2);
        const torch::Tensor v = kv.narrow(2, d, d).reshape({S, N, heads, d / heads}).transpose(1, 2);
        const torch::Tensor probs = torch::softmax(torch::matmul(q, k.transpose(2, 3)) / std::sqrt(double(d / heads)), -1);
        const torch::Tensor context = torch::matmul(probs, v).transpose(1, 2).reshape({S, N, d});
        const torch::Tensor a = torch::matmul(context, leaf("attention.out.weight")) + leaf("attention.out.bias");
        x = c.attention_residual ? x + a : a;
        // the SMoE per modality chunk
        std::vector<torch::Tensor> chunks;
        torch::Tensor gate_loss = torch::zeros({});
        for (int64_t m = 0; m < M; m++) {
            const torch::Tensor chunk = x.narrow(1, m * P, P).reshape({S * P, d});
            const GateOutput out = noisy_moe_train(layer_norm(chunk, "moe.norm"), noise[m], targets, moe);
            chunks.push_back((chunk + out.y).view({S, P, d}));
            gate_loss = gate_loss + out.loss;
        }
        x = torch::cat(chunks, 1);
        const torch::Tensor pooled = x.view({S, M, P, d}).mean(2).reshape({S, M * d});
        const torch::Tensor logits = torch::matmul(pooled, leaf("head.weight")) + leaf("head.bias");
        return torch::nn::functional::cross_entropy(logits, labels) + c.gate_loss_weight * gate_loss;
    }
};

TorchModel::TorchModel(const TorchModelConfig &config, const std::function<const float *(const std::string &)> &parameter,
                       const TorchModelBatch &batch)
    : impl_(new Impl) {
    Impl &m = *impl_;
    const TorchModelConfig &c = config;
    if (c.modalities < 1 || c.modalities > 8 || batch.samples < 1 || !batch.observed || !batch.combination ||
        !batch.labels || !batch.noise)
        throw std::invalid_argument("TorchModel: bad configuration or batch");
    use_one_thread();
    m.c = c, m.samples = batch.samples;
    const int64_t M = c.modalities, P = c.patches, d = c.dim, S = batch.samples;
    auto add = [&](const std::string &name, std::vector<int64_t> shape) {
        const float *data = parameter(name);
        if (!data) throw std::invalid_argument("TorchModel: no parameter " + name);
        m.leaves[name] = float_tensor(data, shape).requires_grad_(true);
    };
    const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    for (int64_t mod = 0; mod < M; mod++) {
        const int64_t F = c.features[mod], width = (F + P - 1) / P;
        add("encoder." + std::to_string(mod) + ".weight", {width, d});
        add("encoder." + std::to_string(mod) + ".bias", {d});
        std::vector<int64_t> seen, unseen;
        std::vector<float> padded;
        for (int64_t s = 0; s < S; s++) {
            if (!batch.observed[s * M + mod]) {
                unseen.push_back(s);
                continue;
            }
            seen.push_back(s);
            const size_t at = padded.size();
            padded.resize(at + size_t(P * width), 0.0f);
            std::memcpy(&padded[at], batch.features[mod] + s * F, size_t(F) * sizeof(float));
        }
        m.observed.push_back(torch::tensor(seen, i64));
        m.missing.push_back(torch::tensor(unseen, i64));
        m.patches.push_back(
            padded.empty() ? torch::zeros({0, P, width}) : float_tensor(padded.data(), {int64_t(seen.size()), P, width}));
    }
    add("bank", {(int64_t(1) << M) - 1, M, P, d});
    add("position", {M * P, d});
    for (const char *name : {"attention.norm.weight", "attention.norm.bias", "attention.out.bias", "moe.norm.weight",
                             "moe.norm.bias"})
        add(name, {d});
    add("attention.q.weight", {d, d});
    add("attention.kv.weight", {d, 2 * d});
    add("attention.out.weight", {d, d});
    add("head.weight", {M * d, c.classes});
    add("head.bias", {c.classes});
    TorchMoeWeights w;
    w.dim = c.dim, w.hidden = c.hidden, w.experts = c.experts, w.top_k = c.top_k, w.noise_epsilon = c.noise_epsilon;
    w.w_gate = parameter("moe.gate.weight"), w.w_noise = parameter("moe.noise.weight");
    w.w1 = parameter("moe.w1"), w.b1 = parameter("moe.b1"), w.w2 = parameter("moe.w2"), w.b2 = parameter("moe.b2");
    if (!w.w_gate || !w.w_noise || !w.w1 || !w.b1 || !w.w2 || !w.b2) throw std::invalid_argument("TorchModel: no SMoE parameters");
    m.moe = moe_leaves(w);
    m.combination = torch::tensor(std::vector<int64_t>(batch.combination, batch.combination + S), i64);
    m.labels = torch::tensor(std::vector<int64_t>(batch.labels, batch.labels + S), i64);
    m.noise = float_tensor(batch.noise, {M, S * P, c.experts});
    std::vector<int32_t> token_combination(size_t(S * P));
    for (int64_t t = 0; t < S * P; t++) token_combination[size_t(t)] = batch.combination[t / P];
    m.targets = gate_targets(S * P, c.experts, token_combination.data(), nullptr);
}

TorchModel::~TorchModel() = default;

float TorchModel::train_step() {
    Impl &m = *impl_;
    for (auto &entry : m.leaves) zero_grad(entry.second);
    m.moe.zero_grads();
    const torch::Tensor loss = m.loss();
    loss.backward();
    return loss.item<float>();
}

void TorchModel::gradient(const std::string &name, float *dst) const {
    const Impl &m = *impl_;
    const auto experts = [&](const std::vector<torch::Tensor> &leaves) {
        for (const torch::Tensor &leaf : leaves) {
            copy_grad(dst, leaf);
            dst += leaf.numel();
        }
    };
    if (name == "moe.gate.weight") copy_grad(dst, m.moe.w_gate);
    else if (name == "moe.noise.weight") copy_grad(dst, m.moe.w_noise);
    else if (name == "moe.w1") experts(m.moe.w1);
    else if (name == "moe.b1") experts(m.moe.b1);
    else if (name == "moe.w2") experts(m.moe.w2);
    else if (name == "moe.b2") experts(m.moe.b2);
    else copy_grad(dst, m.leaves.at(name));
}

std::string TorchMoe::describe() {
    // at::show_config() is a multi-line build report: keep the lines and build settings that say
    // which BLAS / LAPACK / MKL / oneDNN torch was built with.
    std::vector<std::string> parts;
    std::istringstream config(at::show_config());
    std::string line;
    while (std::getline(config, line)) {
        const size_t begin = line.find_first_not_of(" \t-");
        if (begin == std::string::npos) continue;
        line = line.substr(begin);
        if (line.compare(0, 15, "Build settings:") == 0) {
            std::istringstream settings(line.substr(15));
            std::string item;
            while (std::getline(settings, item, ',')) {
                const size_t b = item.find_first_not_of(' ');
                if (b == std::string::npos) continue;
                item = item.substr(b);
                for (const char *key : {"BLAS_INFO=", "LAPACK_INFO=", "USE_MKL=", "USE_MKLDNN=", "USE_OPENMP="})
                    if (item.compare(0, std::strlen(key), key) == 0) parts.push_back(item);
            }
        } else if (line.find("MKL") != std::string::npos || line.find("BLAS") != std::string::npos ||
                   line.find("LAPACK") != std::string::npos || line.find("oneDNN") != std::string::npos ||
                   line.find("OpenMP") != std::string::npos || line.find("CPU capability") != std::string::npos) {
            parts.push_back(line);
        }
    }
    // The BLAS torch's sgemm_ resolves to in this process, and OpenBLAS's kernel family if it is.
    if (void *sgemm = dlsym(RTLD_DEFAULT, "sgemm_")) {
        Dl_info info;
        if (dladdr(sgemm, &info) && info.dli_fname) {
            std::string where = info.dli_fname;
            if (char *real = realpath(info.dli_fname, nullptr)) {
                if (where != real) where += std::string(" -> ") + real;
                std::free(real);
            }
            parts.push_back("sgemm_ from " + where);
        }
    }
    using name_fn = char *(*)();
    using threads_fn = int (*)();
    if (auto config_fn = reinterpret_cast<name_fn>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
        std::string s = config_fn();
        while (!s.empty() && s.back() == ' ') s.pop_back();
        parts.push_back(s);
    }
    if (auto core = reinterpret_cast<name_fn>(dlsym(RTLD_DEFAULT, "openblas_get_corename")))
        parts.push_back(std::string("OpenBLAS core ") + core());
    if (auto threads = reinterpret_cast<threads_fn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")))
        parts.push_back("OpenBLAS threads " + std::to_string(threads()));

    std::string s = "torch " TORCH_VERSION ", threads " + std::to_string(at::get_num_threads());
    for (const std::string &p : parts) s += "; " + p;
    return s;
}

}  // namespace fmbench
