// The PyTorch peer of the SMoE layer (bench/torch_moe.hpp): Flex-MoE's layer as its reference code
// runs it (FastMoE's NoisyGate, then the experts of FastMoE's dispatch), with FastMoE's CUDA
// kernels replaced by plain torch ops, on one thread. The only file that includes torch/torch.h.
#include "torch_moe.hpp"

#include <torch/torch.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
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

}  // namespace

struct TorchMoe::Impl {
    int tokens, dim, hidden, experts, top_k;
    static constexpr int kGroups = 2;
    float noise_epsilon;

    // Inputs, built once.
    torch::Tensor x;                    // tokens x dim, requires grad (dx)
    torch::Tensor noise;                // tokens x experts, the fixed N(0, 1) draws
    torch::Tensor group;                // tokens, int64 in [0, 2)
    torch::Tensor ce_rows, ce_targets;  // the tokens with combination > 0 and combination mod experts
    // Parameters, built once. The experts are separate leaves (one Linear pair per expert, as an
    // expert list), so that each one's gradient accumulates in place.
    torch::Tensor w_gate, w_noise;            // dim x experts
    std::vector<torch::Tensor> w1, b1, w2, b2;  // per expert: dim x hidden, hidden, hidden x dim, dim

    // The experts of FastMoE's dispatch with plain ops: the (token, slot) assignments stably
    // sorted by expert, each expert's rows gathered, Linear -> exact GELU -> Linear, each row
    // scaled by its gate and added back to its token.
    torch::Tensor run_experts(const torch::Tensor &indices, const torch::Tensor &gates) const {
        const torch::Tensor flat = indices.reshape({-1});  // assignment a = token * top_k + slot
        const torch::Tensor order = std::get<1>(torch::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
        const torch::Tensor counts = torch::bincount(flat, {}, experts);
        const torch::Tensor token_of = order.div(top_k, "floor");
        const torch::Tensor rows = x.index_select(0, token_of);
        const torch::Tensor row_gates = gates.reshape({-1}).index_select(0, order);
        const int64_t *count = counts.data_ptr<int64_t>();
        std::vector<torch::Tensor> outs;
        outs.reserve(size_t(experts));
        int64_t offset = 0;
        for (int e = 0; e < experts; e++) {
            const int64_t n = count[e];
            if (n == 0) continue;
            const torch::Tensor xe = rows.narrow(0, offset, n);
            const torch::Tensor h = torch::gelu(torch::addmm(b1[size_t(e)], xe, w1[size_t(e)]));  // exact (erf)
            outs.push_back(torch::addmm(b2[size_t(e)], h, w2[size_t(e)]));
            offset += n;
        }
        const torch::Tensor out = torch::cat(outs, 0) * row_gates.unsqueeze(1);
        return torch::zeros({tokens, dim}, x.options().requires_grad(false)).index_add_(0, token_of, out);
    }
};

TorchMoe::TorchMoe(const TorchMoeWeights &w, const TorchMoeBatch &b) : impl_(new Impl) {
    if (w.dim <= 0 || w.hidden <= 0 || w.experts <= 0 || w.top_k <= 0 || w.top_k > w.experts || b.tokens <= 0 ||
        !w.w_gate || !w.w_noise || !w.w1 || !w.b1 || !w.w2 || !w.b2 || !b.x)
        throw std::invalid_argument("TorchMoe: bad shape or missing array");
    at::set_num_threads(1);
    // Torch calls sgemm_ of the BLAS it was linked with (Debian: libblas.so.3, the alternative in
    // use); when that is OpenBLAS, at::set_num_threads leaves OpenBLAS's own pool alone.
    using set_threads_fn = void (*)(int);
    if (auto set_threads = reinterpret_cast<set_threads_fn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
        set_threads(1);

    Impl &m = *impl_;
    m.tokens = b.tokens;
    m.dim = w.dim;
    m.hidden = w.hidden;
    m.experts = w.experts;
    m.top_k = w.top_k;
    m.noise_epsilon = w.noise_epsilon;
    const int64_t T = b.tokens, D = w.dim, H = w.hidden, E = w.experts;

    m.x = float_tensor(b.x, {T, D}).requires_grad_(true);
    m.noise = b.noise ? float_tensor(b.noise, {T, E}) : torch::zeros({T, E});
    std::vector<int64_t> group(static_cast<size_t>(T)), ce_rows, ce_targets;
    for (int64_t t = 0; t < T; t++) {
        const int32_t c = b.combination ? b.combination[t] : 0;
        const int32_t g = b.group ? b.group[t] : (c == 0 ? 0 : 1);
        if (c < 0 || g < 0 || g >= Impl::kGroups) throw std::invalid_argument("TorchMoe: bad combination or group");
        group[size_t(t)] = g;
        if (c > 0) {
            ce_rows.push_back(t);
            ce_targets.push_back(c % E);
        }
    }
    const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    m.group = torch::tensor(group, i64);
    m.ce_rows = torch::tensor(ce_rows, i64);
    m.ce_targets = torch::tensor(ce_targets, i64);

    m.w_gate = float_tensor(w.w_gate, {D, E}).requires_grad_(true);
    m.w_noise = float_tensor(w.w_noise, {D, E}).requires_grad_(true);
    for (int64_t e = 0; e < E; e++) {
        m.w1.push_back(float_tensor(w.w1 + e * D * H, {D, H}).requires_grad_(true));
        m.b1.push_back(float_tensor(w.b1 + e * H, {H}).requires_grad_(true));
        m.w2.push_back(float_tensor(w.w2 + e * H * D, {H, D}).requires_grad_(true));
        m.b2.push_back(float_tensor(w.b2 + e * D, {D}).requires_grad_(true));
    }
}

TorchMoe::~TorchMoe() = default;

void TorchMoe::forward(float *y) {
    const Impl &m = *impl_;
    c10::InferenceMode guard;
    // FastMoE's NoisyGate in eval: the noise term is multiplied by self.training = 0, so the
    // routing logits are the clean ones (x W_noise, which only scales the noise, is not computed).
    const torch::Tensor clean = m.x.mm(m.w_gate);
    const auto top = clean.topk(m.top_k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
    const torch::Tensor gates = torch::softmax(std::get<0>(top), 1);
    copy_out(y, m.run_experts(std::get<1>(top), gates));
}

void TorchMoe::train_step(const float *dy, float gate_loss_weight, float *y, float *gate_loss, const Grads &grads) {
    if (!dy) throw std::invalid_argument("TorchMoe::train_step: dy is required");
    Impl &m = *impl_;
    zero_grad(m.x);
    zero_grad(m.w_gate);
    zero_grad(m.w_noise);
    for (auto *params : {&m.w1, &m.b1, &m.w2, &m.b2})
        for (torch::Tensor &p : *params) zero_grad(p);

    const int E = m.experts, k = m.top_k;
    // FastMoE's NoisyGate in training, with the batch's fixed draws for torch.randn_like.
    const torch::Tensor clean = m.x.mm(m.w_gate);
    const torch::Tensor raw = m.x.mm(m.w_noise);
    const torch::Tensor stddev = torch::softplus(raw) + m.noise_epsilon;
    const torch::Tensor noisy = clean + m.noise * stddev;
    const auto top = noisy.topk(k < E ? k + 1 : k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
    const torch::Tensor &top_values = std::get<0>(top);
    const torch::Tensor top_k_values = top_values.narrow(1, 0, k);
    const torch::Tensor top_k_indices = std::get<1>(top).narrow(1, 0, k);
    const torch::Tensor gates = torch::softmax(top_k_values, 1);
    const torch::Tensor gates_full = torch::zeros_like(noisy).scatter(1, top_k_indices, gates);

    // Flex-MoE's G-Router balance: importance and load per token group.
    const torch::Tensor group_zeros = torch::zeros({Impl::kGroups, E}, noisy.options().requires_grad(false));
    const torch::Tensor importance = group_zeros.index_add(0, m.group, gates_full);
    torch::Tensor load;
    if (k < E) {  // FastMoE's _prob_in_top_k
        const torch::Tensor threshold_if_in = top_values.select(1, k).unsqueeze(1);
        const torch::Tensor threshold_if_out = top_values.select(1, k - 1).unsqueeze(1);
        const torch::Tensor is_in = noisy > threshold_if_in;
        const torch::Tensor prob_if_in = normal_cdf((clean - threshold_if_in) / stddev);
        const torch::Tensor prob_if_out = normal_cdf((clean - threshold_if_out) / stddev);
        load = group_zeros.index_add(0, m.group, torch::where(is_in, prob_if_in, prob_if_out));
    } else {  // FastMoE's _gates_to_load: the tokens routed to each expert, no gradient
        const torch::Tensor routed = torch::zeros_like(noisy).scatter(1, top_k_indices.detach(), 1.0);
        load = group_zeros.index_add(0, m.group, routed);
    }
    const torch::Tensor balance = (cv_squared(importance) + cv_squared(load)).sum();
    // Flex-MoE's S-Router: cross-entropy of the noisy logits toward combination mod experts.
    const torch::Tensor router_ce = m.ce_rows.numel() > 0
                                        ? torch::nn::functional::cross_entropy(noisy.index_select(0, m.ce_rows),
                                                                               m.ce_targets)
                                        : torch::zeros({}, noisy.options().requires_grad(false));
    const torch::Tensor loss = router_ce + balance;

    const torch::Tensor out = m.run_experts(top_k_indices, gates);
    const torch::Tensor dy_tensor = torch::from_blob(const_cast<float *>(dy), {m.tokens, m.dim}, torch::kFloat32);
    const torch::Tensor objective = (dy_tensor * out).sum() + gate_loss_weight * loss;
    objective.backward();

    copy_out(y, out.detach());
    if (gate_loss) *gate_loss = loss.item<float>();
    copy_grad(grads.dx, m.x);
    copy_grad(grads.w_gate, m.w_gate);
    copy_grad(grads.w_noise, m.w_noise);
    const int64_t D = m.dim, H = m.hidden;
    for (int64_t e = 0; e < E; e++) {
        copy_grad(grads.w1 ? grads.w1 + e * D * H : nullptr, m.w1[size_t(e)]);
        copy_grad(grads.b1 ? grads.b1 + e * H : nullptr, m.b1[size_t(e)]);
        copy_grad(grads.w2 ? grads.w2 + e * H * D : nullptr, m.w2[size_t(e)]);
        copy_grad(grads.b2 ? grads.b2 + e * D : nullptr, m.b2[size_t(e)]);
    }
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
