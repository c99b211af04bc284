// gemm_grouped/<impl>/<rows_per_expert>/<d>/<h> and gemm_grouped_backward/...: every expert's
// Linear(d -> h) with bias, Y_e = X_e W_e + b_e, over E experts of rows_per_expert rows each
// (E = 16 at the Flex-MoE shapes d = 128, h = 256; E = 4 at the large ones). Rates are rows
// (routed tokens) per second.
//   flexmoe   fm_grouped_gemm_forward on packed weights (fm_pack_weights, done once, as a model
//             keeps its weights packed); the backward is fm_grouped_gemm_backward (dX, dW, db)
//   openblas  cblas_sgemm per expert on the plain weights, bias copied into Y first (beta = 1),
//             which is what a per-expert loop of nn.Linear amounts to; backward: sgemm NT for dX,
//             sgemm TN for dW, saxpy per row for db
//   libxsmm   a JIT kernel per shape (dispatched once, outside the timing), called per expert;
//             backward: its transposed-B kernel for dW, W transposed by libxsmm_otrans then a
//             plain kernel for dX (libxsmm 1.17 JITs no transposed A), saxpy rows for db
//   peak      the machine's FMA peak: a register-only FMA loop, counted as the rows per second
//             that 2 d h flops per row would allow
// Every impl's Y (or dX, dW, db) is compared with the scalar path's before it is timed.
#include <cblas.h>
#include <immintrin.h>
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
const Shape kShapes[] = {{1, 128, 256, 16},  {2, 128, 256, 16},  {4, 128, 256, 16}, {8, 128, 256, 16},
                         {16, 128, 256, 16}, {256, 512, 512, 4}, {512, 512, 512, 4}, {256, 1024, 1024, 2}};

struct Experts {
    int R, d, h, E, rows;
    std::vector<int32_t> offsets;
    fmbench::Floats x, w, packed, bias, y, dy, dx, dw, dw_packed, db;
    fmbench::Floats y_ref, dx_ref, dw_ref, db_ref; // the scalar path's results
    Experts(int R_, int d_, int h_, int E_)
        : R(R_), d(d_), h(h_), E(E_), rows(R_ * E_), offsets(E_ + 1),
          x(fmbench::normal_floats(size_t(rows) * d_, 1.0f, 11)),
          w(fmbench::normal_floats(size_t(E_) * d_ * h_, 0.05f, 12)),
          packed(size_t(E_) * fm_packed_weight_floats(d_, h_)), bias(fmbench::normal_floats(size_t(E_) * h_, 1.0f, 13)),
          y(size_t(rows) * h_), dy(fmbench::normal_floats(size_t(rows) * h_, 1.0f, 14)), dx(size_t(rows) * d_),
          dw(w.size()), dw_packed(packed.size()), db(bias.size()) {
        for (int e = 0; e <= E; e++) offsets[e] = e * R;
        fm_pack_weights(E, d, h, FM_WEIGHTS_IN_BY_OUT, w.data(), h, packed.data());
        const fm_isa active = fm_active_isa();
        fm_set_isa(FM_ISA_SCALAR);
        y_ref = y, dx_ref = dx, db_ref = db;
        fmbench::Floats dw_packed_ref(packed.size());
        dw_ref = w;
        fm_grouped_gemm_forward(E, offsets.data(), d, h, x.data(), d, packed.data(), bias.data(), y_ref.data(), h);
        fm_grouped_gemm_backward(E, offsets.data(), d, h, x.data(), d, packed.data(), dy.data(), h, dx_ref.data(), d,
                                 dw_packed_ref.data(), db_ref.data());
        fm_unpack_weights(E, d, h, FM_WEIGHTS_IN_BY_OUT, dw_packed_ref.data(), dw_ref.data(), h);
        fm_set_isa(active);
    }
    float *x_of(int e) { return x.data() + size_t(e) * R * d; }
    float *y_of(int e) { return y.data() + size_t(e) * R * h; }
    float *dy_of(int e) { return dy.data() + size_t(e) * R * h; }
    float *dx_of(int e) { return dx.data() + size_t(e) * R * d; }
    float *w_of(int e) { return w.data() + size_t(e) * d * h; }
    float *dw_of(int e) { return dw.data() + size_t(e) * d * h; }
    void copy_bias() {
        for (int e = 0; e < E; e++)
            for (int r = 0; r < R; r++) std::memcpy(y_of(e) + size_t(r) * h, bias.data() + size_t(e) * h, size_t(h) * 4);
    }
    void backward_bias_with_saxpy() {
        std::fill(db.begin(), db.end(), 0.0f);
        for (int e = 0; e < E; e++)
            for (int r = 0; r < R; r++) cblas_saxpy(h, 1.0f, dy_of(e) + size_t(r) * h, 1, db.data() + size_t(e) * h, 1);
    }
};

// Results agree with the scalar path to float rounding of d- or R-term dot products.
bool agrees(const fmbench::Floats &got, const fmbench::Floats &want) { return fmbench::max_abs_diff(got, want) < 2e-3; }

void run(benchmark::State &state, Experts &s, const std::function<void()> &step) {
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * s.rows);
}

void flexmoe_forward(benchmark::State &state, fm_isa isa, Shape shape) {
    Experts &s = fmbench::cached<Experts>(shape.rows_per_expert, shape.d, shape.h, shape.experts);
    if (!fmbench::use_isa(state, isa)) return;
    auto step = [&] {
        fm_grouped_gemm_forward(s.E, s.offsets.data(), s.d, s.h, s.x.data(), s.d, s.packed.data(), s.bias.data(),
                                s.y.data(), s.h);
    };
    step();
    if (!agrees(s.y, s.y_ref)) return state.SkipWithError("flexmoe forward disagrees with the scalar path");
    run(state, s, step);
    fm_set_isa(FM_ISA_AUTO);
}

void openblas_forward(benchmark::State &state, Shape shape) {
    Experts &s = fmbench::cached<Experts>(shape.rows_per_expert, shape.d, shape.h, shape.experts);
    auto step = [&] {
        s.copy_bias();
        for (int e = 0; e < s.E; e++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.R, s.h, s.d, 1.0f, s.x_of(e), s.d, s.w_of(e), s.h,
                        1.0f, s.y_of(e), s.h);
    };
    step();
    if (!agrees(s.y, s.y_ref)) return state.SkipWithError("openblas forward disagrees with the scalar path");
    run(state, s, step);
}

// Row-major Y = X W is column-major Y^T = W^T X^T: m = h, n = rows, k = d, A = W, B = X.
void libxsmm_forward(benchmark::State &state, Shape shape) {
    Experts &s = fmbench::cached<Experts>(shape.rows_per_expert, shape.d, shape.h, shape.experts);
    const libxsmm_blasint m = s.h, n = s.R, k = s.d, lda = s.h, ldb = s.d, ldc = s.h;
    const float alpha = 1.0f, beta = 1.0f;
    const libxsmm_smmfunction kernel = libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, nullptr, nullptr);
    if (!kernel) return state.SkipWithError("libxsmm has no kernel for this shape");
    auto step = [&] {
        s.copy_bias();
        for (int e = 0; e < s.E; e++) kernel(s.w_of(e), s.x_of(e), s.y_of(e));
    };
    step();
    if (!agrees(s.y, s.y_ref)) return state.SkipWithError("libxsmm forward disagrees with the scalar path");
    run(state, s, step);
}

void flexmoe_backward(benchmark::State &state, fm_isa isa, Shape shape) {
    Experts &s = fmbench::cached<Experts>(shape.rows_per_expert, shape.d, shape.h, shape.experts);
    if (!fmbench::use_isa(state, isa)) return;
    auto step = [&] {
        fm_grouped_gemm_backward(s.E, s.offsets.data(), s.d, s.h, s.x.data(), s.d, s.packed.data(), s.dy.data(), s.h,
                                 s.dx.data(), s.d, s.dw_packed.data(), s.db.data());
    };
    step();
    fm_unpack_weights(s.E, s.d, s.h, FM_WEIGHTS_IN_BY_OUT, s.dw_packed.data(), s.dw.data(), s.h);
    if (!agrees(s.dx, s.dx_ref) || !agrees(s.dw, s.dw_ref) || !agrees(s.db, s.db_ref))
        return state.SkipWithError("flexmoe backward disagrees with the scalar path");
    run(state, s, step);
    fm_set_isa(FM_ISA_AUTO);
}

void openblas_backward(benchmark::State &state, Shape shape) {
    Experts &s = fmbench::cached<Experts>(shape.rows_per_expert, shape.d, shape.h, shape.experts);
    auto step = [&] {
        for (int e = 0; e < s.E; e++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.R, s.d, s.h, 1.0f, s.dy_of(e), s.h, s.w_of(e), s.h,
                        0.0f, s.dx_of(e), s.d);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, s.d, s.h, s.R, 1.0f, s.x_of(e), s.d, s.dy_of(e), s.h,
                        0.0f, s.dw_of(e), s.h);
        }
        s.backward_bias_with_saxpy();
    };
    step();
    if (!agrees(s.dx, s.dx_ref) || !agrees(s.dw, s.dw_ref) || !agrees(s.db, s.db_ref))
        return state.SkipWithError("openblas backward disagrees with the scalar path");
    run(state, s, step);
}

// Column-major, as for the forward. dW^T (h x d) = dY^T X takes X transposed, which libxsmm JITs
// (m = h, n = d, k = rows). dX^T (d x rows) = W dY^T would take W transposed, which libxsmm 1.17
// does not JIT, so W is transposed first with libxsmm_otrans (per call: the weights change every
// step) and the product is a plain kernel (m = d, n = rows, k = h).
void libxsmm_backward(benchmark::State &state, Shape shape) {
    Experts &s = fmbench::cached<Experts>(shape.rows_per_expert, shape.d, shape.h, shape.experts);
    const float alpha = 1.0f, beta = 0.0f;
    const int trans_b = LIBXSMM_GEMM_FLAG_TRANS_B;
    const libxsmm_blasint dx_m = s.d, dx_n = s.R, dx_k = s.h, dx_lda = s.d, dx_ldb = s.h, dx_ldc = s.d;
    const libxsmm_blasint dw_m = s.h, dw_n = s.d, dw_k = s.R, dw_lda = s.h, dw_ldb = s.d, dw_ldc = s.h;
    const libxsmm_smmfunction dx_kernel =
        libxsmm_smmdispatch(dx_m, dx_n, dx_k, &dx_lda, &dx_ldb, &dx_ldc, &alpha, &beta, nullptr, nullptr);
    const libxsmm_smmfunction dw_kernel =
        libxsmm_smmdispatch(dw_m, dw_n, dw_k, &dw_lda, &dw_ldb, &dw_ldc, &alpha, &beta, &trans_b, nullptr);
    if (!dx_kernel || !dw_kernel) return state.SkipWithError("libxsmm has no kernel for this shape");
    fmbench::Floats w_transposed(size_t(s.d) * s.h);
    auto step = [&] {
        for (int e = 0; e < s.E; e++) {
            libxsmm_otrans(w_transposed.data(), s.w_of(e), sizeof(float), libxsmm_blasint(s.h), libxsmm_blasint(s.d),
                           libxsmm_blasint(s.h), libxsmm_blasint(s.d));
            dx_kernel(w_transposed.data(), s.dy_of(e), s.dx_of(e));
            dw_kernel(s.dy_of(e), s.x_of(e), s.dw_of(e));
        }
        s.backward_bias_with_saxpy();
    };
    step();
    if (!agrees(s.dx, s.dx_ref) || !agrees(s.dw, s.dw_ref) || !agrees(s.db, s.db_ref))
        return state.SkipWithError("libxsmm backward disagrees with the scalar path");
    run(state, s, step);
}

// 2 d h flops per row and pass: one pass forward, two backward (dX and dW).
void peak(benchmark::State &state, Shape shape, int passes) {
    double flops = 0.0;
    for (auto _ : state) flops += fmbench::fma_loop();
    state.SetItemsProcessed(int64_t(flops / (2.0 * passes * shape.d * shape.h)));
    state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}

const bool registered = [] {
    openblas_set_num_threads(1);
    for (const Shape &shape : kShapes) {
        const std::string tail = "/" + std::to_string(shape.rows_per_expert) + "/" + std::to_string(shape.d) + "/" +
                                 std::to_string(shape.h);
        benchmark::RegisterBenchmark(("gemm_grouped/flexmoe" + tail).c_str(), flexmoe_forward, FM_ISA_AUTO, shape);
        for (fm_isa isa : fmbench::forced_isas())
            if (isa != FM_ISA_SCALAR) /* the double-precision reference: far too slow to time here */
                benchmark::RegisterBenchmark(("gemm_grouped/" + fmbench::impl_name(isa) + tail).c_str(), flexmoe_forward, isa,
                                         shape);
        benchmark::RegisterBenchmark(("gemm_grouped/openblas" + tail).c_str(), openblas_forward, shape);
        benchmark::RegisterBenchmark(("gemm_grouped/libxsmm" + tail).c_str(), libxsmm_forward, shape);
        benchmark::RegisterBenchmark(("gemm_grouped/peak" + tail).c_str(), peak, shape, 1);
        benchmark::RegisterBenchmark(("gemm_grouped_backward/flexmoe" + tail).c_str(), flexmoe_backward, FM_ISA_AUTO,
                                     shape);
        benchmark::RegisterBenchmark(("gemm_grouped_backward/openblas" + tail).c_str(), openblas_backward, shape);
        benchmark::RegisterBenchmark(("gemm_grouped_backward/libxsmm" + tail).c_str(), libxsmm_backward, shape);
        benchmark::RegisterBenchmark(("gemm_grouped_backward/peak" + tail).c_str(), peak, shape, 2);
    }
    return true;
}();

}  // namespace
