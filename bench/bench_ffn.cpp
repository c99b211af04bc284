// ffn/<impl>/<rows_per_expert>/<d>/<h> and ffn_backward/...: every expert's FFN, Linear(d -> h)
// -> GELU (erf) -> Linear(h -> d) with biases, over E experts of rows_per_expert rows (E = 16 at
// the Flex-MoE shapes d = 128, h = 256; E = 4 at the large one). Rates are rows per second.
//   flexmoe   fm_expert_ffn_forward (inference: no pre-activations kept) and, for the backward,
//             fm_expert_ffn_backward from the saved pre-activations and hidden rows
//   openblas  per expert: bias copy + cblas_sgemm, fm_gelu_forward, bias copy + cblas_sgemm (the
//             GELU is flexmoe's vectorised kernel, so the ratio measures the GEMMs and the fusion);
//             backward: sgemm for dH, dW2, fm_gelu_backward, sgemm for dX, dW1, saxpy rows for the
//             biases
//   libxsmm   the forward with one JIT kernel per layer shape
// Outputs are compared with flexmoe's scalar path before timing.
#include <cblas.h>
#include <libxsmm.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

struct Shape {
    int rows_per_expert, d, h, experts;
};
const Shape kShapes[] = {{1, 128, 256, 16}, {4, 128, 256, 16}, {16, 128, 256, 16}, {256, 512, 2048, 2}};

struct Ffn {
    int R, d, h, E, rows;
    std::vector<int32_t> offsets;
    fmbench::Floats x, w1, w2, p1, p2, b1, b2, y, hidden, pre, dy, dx, dhidden, gw1, gw2, gp1, gp2, gb1, gb2;
    fmbench::Floats y_ref, dx_ref;
    fm_expert_ffn_desc desc;
    Ffn(int R_, int d_, int h_, int E_)
        : R(R_), d(d_), h(h_), E(E_), rows(R_ * E_), offsets(E_ + 1),
          x(fmbench::normal_floats(size_t(rows) * d_, 1.0f, 21)),
          w1(fmbench::normal_floats(size_t(E_) * d_ * h_, 0.08f, 22)),
          w2(fmbench::normal_floats(size_t(E_) * d_ * h_, 0.05f, 23)),
          p1(size_t(E_) * fm_packed_weight_floats(d_, h_)), p2(size_t(E_) * fm_packed_weight_floats(h_, d_)),
          b1(fmbench::normal_floats(size_t(E_) * h_, 0.5f, 24)), b2(fmbench::normal_floats(size_t(E_) * d_, 0.5f, 25)),
          y(size_t(rows) * d_), hidden(size_t(rows) * h_), pre(size_t(rows) * h_),
          dy(fmbench::normal_floats(size_t(rows) * d_, 1.0f, 26)), dx(size_t(rows) * d_), dhidden(size_t(rows) * h_),
          gw1(w1.size()), gw2(w2.size()), gp1(p1.size()), gp2(p2.size()), gb1(b1.size()), gb2(b2.size()) {
        for (int e = 0; e <= E; e++) offsets[e] = e * R;
        fm_pack_weights(E, d, h, FM_WEIGHTS_IN_BY_OUT, w1.data(), h, p1.data());
        fm_pack_weights(E, h, d, FM_WEIGHTS_IN_BY_OUT, w2.data(), d, p2.data());
        desc.experts = E, desc.dim = d, desc.hidden = h, desc.gelu = FM_GELU_ERF;
        const fm_isa active = fm_active_isa();
        fm_set_isa(FM_ISA_SCALAR);
        forward_flexmoe(true);
        y_ref = y;
        backward_flexmoe();
        dx_ref = dx;
        fm_set_isa(active);
    }
    fm_expert_ffn_params params() const { return {p1.data(), b1.data(), p2.data(), b2.data()}; }
    void forward_flexmoe(bool keep_pre) {
        const fm_expert_ffn_params p = params();
        fm_expert_ffn_forward(&desc, offsets.data(), &p, x.data(), d, y.data(), d, hidden.data(), h,
                              keep_pre ? pre.data() : nullptr, h);
    }
    void backward_flexmoe() {
        const fm_expert_ffn_params p = params();
        const fm_expert_ffn_grads g = {gp1.data(), gb1.data(), gp2.data(), gb2.data()};
        fm_expert_ffn_backward(&desc, offsets.data(), &p, x.data(), d, pre.data(), h, hidden.data(), h, dy.data(), d,
                               dx.data(), d, &g, dhidden.data(), h);
    }
    static void copy_bias(float *out, const float *bias, int n_rows, int n) {
        for (int r = 0; r < n_rows; r++) std::memcpy(out + size_t(r) * n, bias, size_t(n) * 4);
    }
    static void bias_grad(float *db, const float *g, int n_rows, int n) {
        std::memset(db, 0, size_t(n) * 4);
        for (int r = 0; r < n_rows; r++) cblas_saxpy(n, 1.0f, g + size_t(r) * n, 1, db, 1);
    }
};

void run(benchmark::State &state, Ffn &s, const std::function<void()> &step) {
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * s.rows);
}

bool agrees(const fmbench::Floats &got, const fmbench::Floats &want) { return fmbench::max_abs_diff(got, want) < 2e-3; }

Ffn &ffn_for(Shape shape) { return fmbench::cached<Ffn>(shape.rows_per_expert, shape.d, shape.h, shape.experts); }

void flexmoe_forward(benchmark::State &state, Shape shape) {
    Ffn &s = ffn_for(shape);
    auto step = [&] { s.forward_flexmoe(false); };
    step();
    if (!agrees(s.y, s.y_ref)) return state.SkipWithError("flexmoe disagrees with the scalar path");
    run(state, s, step);
}

void openblas_forward(benchmark::State &state, Shape shape) {
    Ffn &s = ffn_for(shape);
    auto step = [&] {
        for (int e = 0; e < s.E; e++) {
            const size_t r0 = size_t(e) * s.R;
            float *hid = s.hidden.data() + r0 * s.h, *out = s.y.data() + r0 * s.d;
            Ffn::copy_bias(hid, s.b1.data() + size_t(e) * s.h, s.R, s.h);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.R, s.h, s.d, 1.0f, s.x.data() + r0 * s.d, s.d,
                        s.w1.data() + size_t(e) * s.d * s.h, s.h, 1.0f, hid, s.h);
            fm_gelu_forward(s.R, s.h, FM_GELU_ERF, hid, s.h, hid, s.h);
            Ffn::copy_bias(out, s.b2.data() + size_t(e) * s.d, s.R, s.d);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.R, s.d, s.h, 1.0f, hid, s.h,
                        s.w2.data() + size_t(e) * s.d * s.h, s.d, 1.0f, out, s.d);
        }
    };
    step();
    if (!agrees(s.y, s.y_ref)) return state.SkipWithError("openblas disagrees with the scalar path");
    run(state, s, step);
}

// Column-major views as in bench_gemm: layer 1 is m = h, n = rows, k = d; layer 2 m = d, k = h.
void libxsmm_forward(benchmark::State &state, Shape shape) {
    Ffn &s = ffn_for(shape);
    const float alpha = 1.0f, beta = 1.0f;
    const libxsmm_blasint n = s.R, h = s.h, d = s.d;
    const libxsmm_smmfunction up = libxsmm_smmdispatch(h, n, d, &h, &d, &h, &alpha, &beta, nullptr, nullptr);
    const libxsmm_smmfunction down = libxsmm_smmdispatch(d, n, h, &d, &h, &d, &alpha, &beta, nullptr, nullptr);
    if (!up || !down) return state.SkipWithError("libxsmm has no kernel for this shape");
    auto step = [&] {
        for (int e = 0; e < s.E; e++) {
            const size_t r0 = size_t(e) * s.R;
            float *hid = s.hidden.data() + r0 * s.h, *out = s.y.data() + r0 * s.d;
            Ffn::copy_bias(hid, s.b1.data() + size_t(e) * s.h, s.R, s.h);
            up(s.w1.data() + size_t(e) * s.d * s.h, s.x.data() + r0 * s.d, hid);
            fm_gelu_forward(s.R, s.h, FM_GELU_ERF, hid, s.h, hid, s.h);
            Ffn::copy_bias(out, s.b2.data() + size_t(e) * s.d, s.R, s.d);
            down(s.w2.data() + size_t(e) * s.d * s.h, hid, out);
        }
    };
    step();
    if (!agrees(s.y, s.y_ref)) return state.SkipWithError("libxsmm disagrees with the scalar path");
    run(state, s, step);
}

void flexmoe_backward(benchmark::State &state, Shape shape) {
    Ffn &s = ffn_for(shape);
    s.forward_flexmoe(true);
    auto step = [&] { s.backward_flexmoe(); };
    step();
    if (!agrees(s.dx, s.dx_ref)) return state.SkipWithError("flexmoe backward disagrees with the scalar path");
    run(state, s, step);
}

void openblas_backward(benchmark::State &state, Shape shape) {
    Ffn &s = ffn_for(shape);
    s.forward_flexmoe(true); // pre and hidden, as a training step's forward leaves them
    auto step = [&] {
        for (int e = 0; e < s.E; e++) {
            const size_t r0 = size_t(e) * s.R;
            const float *w1 = s.w1.data() + size_t(e) * s.d * s.h, *w2 = s.w2.data() + size_t(e) * s.d * s.h;
            const float *g = s.dy.data() + r0 * s.d, *hid = s.hidden.data() + r0 * s.h, *pre = s.pre.data() + r0 * s.h;
            float *dh = s.dhidden.data() + r0 * s.h;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, s.h, s.d, s.R, 1.0f, hid, s.h, g, s.d, 0.0f,
                        s.gw2.data() + size_t(e) * s.d * s.h, s.d);
            Ffn::bias_grad(s.gb2.data() + size_t(e) * s.d, g, s.R, s.d);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.R, s.h, s.d, 1.0f, g, s.d, w2, s.d, 0.0f, dh, s.h);
            fm_gelu_backward(s.R, s.h, FM_GELU_ERF, pre, s.h, dh, s.h, dh, s.h);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, s.d, s.h, s.R, 1.0f, s.x.data() + r0 * s.d, s.d, dh, s.h,
                        0.0f, s.gw1.data() + size_t(e) * s.d * s.h, s.h);
            Ffn::bias_grad(s.gb1.data() + size_t(e) * s.h, dh, s.R, s.h);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.R, s.d, s.h, 1.0f, dh, s.h, w1, s.h, 0.0f,
                        s.dx.data() + r0 * s.d, s.d);
        }
    };
    step();
    if (!agrees(s.dx, s.dx_ref)) return state.SkipWithError("openblas backward disagrees with the scalar path");
    run(state, s, step);
}

const bool registered = [] {
    openblas_set_num_threads(1);
    for (const Shape &shape : kShapes) {
        const std::string tail = "/" + std::to_string(shape.rows_per_expert) + "/" + std::to_string(shape.d) + "/" +
                                 std::to_string(shape.h);
        benchmark::RegisterBenchmark(("ffn/flexmoe" + tail).c_str(), flexmoe_forward, shape);
        benchmark::RegisterBenchmark(("ffn/openblas" + tail).c_str(), openblas_forward, shape);
        benchmark::RegisterBenchmark(("ffn/libxsmm" + tail).c_str(), libxsmm_forward, shape);
        benchmark::RegisterBenchmark(("ffn_backward/flexmoe" + tail).c_str(), flexmoe_backward, shape);
        benchmark::RegisterBenchmark(("ffn_backward/openblas" + tail).c_str(), openblas_backward, shape);
    }
    return true;
}();

}  // namespace
