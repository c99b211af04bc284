// The PyTorch peer of the SMoE layer (impl `torch`): the layer written the way the Flex-MoE
// reference code runs it, with FastMoE's kernels replaced by plain ops, driven through libtorch's
// C++ API in the benchmark's own process. Only bench/torch_moe.cpp includes torch/torch.h (one
// file of ~20 s to compile); everything else sees this plain interface.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace fmbench {

// The layer's parameters as plain row-major arrays (not packed), the shapes of x W:
struct TorchMoeWeights {
    int dim = 0, hidden = 0, experts = 0, top_k = 0;
    const float *w_gate = nullptr;  // dim x experts
    const float *w_noise = nullptr; // dim x experts
    const float *w1 = nullptr;      // experts x dim x hidden
    const float *b1 = nullptr;      // experts x hidden
    const float *w2 = nullptr;      // experts x hidden x dim
    const float *b2 = nullptr;      // experts x dim
    float noise_epsilon = 0.01f;    // std = softplus(x W_noise) + noise_epsilon
};

// One batch of tokens, as flexmoe's fm_moe_batch carries it.
struct TorchMoeBatch {
    int tokens = 0;
    const float *x = nullptr;             // tokens x dim
    const float *noise = nullptr;         // tokens x experts N(0, 1) draws (fm_gate_noise), training only
    const int32_t *combination = nullptr; // tokens, modality-combination index (0 = all modalities)
    const int32_t *group = nullptr;       // tokens, 0 = full-modality token, 1 = the others
};

class TorchMoe {
public:
    TorchMoe(const TorchMoeWeights &weights, const TorchMoeBatch &batch);
    ~TorchMoe();

    // Inference: y (tokens x dim) = sum over the top k of softmax(top k of x W_gate) * expert(x),
    // under torch::InferenceMode.
    void forward(float *y);

    // Training: the noisy gate with the batch's noise, the Flex-MoE gate loss (S-Router cross-
    // entropy toward combination mod experts over tokens with combination > 0, plus cv^2 of
    // importance and load per group), then autograd of sum(dy * y) + gate_loss_weight * gate_loss.
    // Writes y, the gate loss, dx and every parameter gradient (plain layouts as the weights),
    // each output optional (nullptr: not copied out).
    struct Grads {
        float *dx = nullptr, *w_gate = nullptr, *w_noise = nullptr, *w1 = nullptr, *b1 = nullptr, *w2 = nullptr,
              *b2 = nullptr;
    };
    void train_step(const float *dy, float gate_loss_weight, float *y, float *gate_loss, const Grads &grads);

    // What ran: torch version, threads, the BLAS torch was built with.
    static std::string describe();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// The Flex-MoE model (flexmoe.h section 9, tests/model_reference.py) in libtorch: encoders,
// missing-modality bank, position, pre-LN attention, the SMoE per modality chunk (the layer
// above), head, cross-entropy + gate_loss_weight * the chunks' gate losses; dropout off.
struct TorchModelConfig {
    int modalities = 0, features[8] = {}, classes = 0, patches = 16, dim = 128, heads = 4, experts = 16, top_k = 4,
        hidden = 256;
    bool attention_residual = true;
    float gate_loss_weight = 0.01f, layernorm_eps = 1e-5f, noise_epsilon = 0.01f;
};

struct TorchModelBatch {
    int samples = 0;
    const float *features[8] = {};         // samples x features[m]
    const uint8_t *observed = nullptr;     // samples x modalities
    const int32_t *combination = nullptr;  // samples, Flex-MoE's combination index
    const int32_t *labels = nullptr;       // samples
    const float *noise = nullptr;          // modalities x (samples * patches) x experts, the gate's draws
};

class TorchModel {
public:
    // parameter(name) gives the tensor of that name (flexmoe's names and shapes, expert weights
    // unpacked), read once into torch's own leaves.
    TorchModel(const TorchModelConfig &config, const std::function<const float *(const std::string &)> &parameter,
               const TorchModelBatch &batch);
    ~TorchModel();

    // One training step's forward and backward (gradients zeroed first); returns the loss.
    float train_step();

    // The gradient of a parameter after train_step (plain layout), into dst.
    void gradient(const std::string &name, float *dst) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace fmbench
