// softmax/<impl>/<E> and softmax_backward/<impl>/<E> on 4096 rows: flexmoe's paths, a plain
// scalar libm loop, and oneDNN's softmax primitive (single thread), on the same data.
#include <oneapi/dnnl/dnnl.hpp>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

constexpr int kRows = 4096;
const int kWidths[] = {8, 16, 32, 64, 128, 256};

struct SoftmaxData {
    int cols;
    fmbench::Floats x, y, dy, dx, y_ref, dx_ref;
    explicit SoftmaxData(int e)
        : cols(e), x(fmbench::normal_floats(size_t(kRows) * e, 2.0f, 42 + e)), y(x.size()),
          dy(fmbench::normal_floats(x.size(), 1.0f, 7 + e)), dx(x.size()), y_ref(x.size()), dx_ref(x.size()) {
        fm_set_isa(FM_ISA_SCALAR);
        fm_softmax_forward(kRows, e, x.data(), e, y_ref.data(), e);
        fm_softmax_backward(kRows, e, y_ref.data(), e, dy.data(), e, dx_ref.data(), e);
        fm_set_isa(FM_ISA_AUTO);
    }
};

// Runs `step` once, checks `out` against `want`, then times it. Results outside 1e-5 of the
// reference make the benchmark an error instead of a number.
void timed(benchmark::State &state, const std::function<void()> &step, const fmbench::Floats &out,
           const fmbench::Floats &want) {
    step();
    double diff = fmbench::max_abs_diff(out, want);
    if (!(diff <= 1e-5)) {
        state.SkipWithError(("result differs from the reference by " + std::to_string(diff)).c_str());
        return;
    }
    for (auto _ : state) {
        step();
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(int64_t(state.iterations()) * kRows);
}

void flexmoe_forward(benchmark::State &state, fm_isa isa, int e) {
    SoftmaxData &d = fmbench::cached<SoftmaxData>(e);
    if (!fmbench::use_isa(state, isa)) return;
    timed(state, [&] { fm_softmax_forward(kRows, e, d.x.data(), e, d.y.data(), e); }, d.y, d.y_ref);
}

void flexmoe_backward(benchmark::State &state, fm_isa isa, int e) {
    SoftmaxData &d = fmbench::cached<SoftmaxData>(e);
    if (!fmbench::use_isa(state, isa)) return;
    timed(state, [&] { fm_softmax_backward(kRows, e, d.y_ref.data(), e, d.dy.data(), e, d.dx.data(), e); },
          d.dx, d.dx_ref);
}

// What a C programmer writes without a SIMD library: three passes with libm's expf.
void scalar_forward(benchmark::State &state, int e) {
    SoftmaxData &d = fmbench::cached<SoftmaxData>(e);
    timed(state,
          [&] {
              for (int r = 0; r < kRows; r++) {
                  const float *x = &d.x[size_t(r) * e];
                  float *y = &d.y[size_t(r) * e];
                  float max = x[0], sum = 0.0f;
                  for (int j = 1; j < e; j++) max = std::fmax(max, x[j]);
                  for (int j = 0; j < e; j++) sum += y[j] = std::exp(x[j] - max);
                  for (int j = 0; j < e; j++) y[j] /= sum;
              }
          },
          d.y, d.y_ref);
}

void scalar_backward(benchmark::State &state, int e) {
    SoftmaxData &d = fmbench::cached<SoftmaxData>(e);
    timed(state,
          [&] {
              for (int r = 0; r < kRows; r++) {
                  const float *y = &d.y_ref[size_t(r) * e], *dy = &d.dy[size_t(r) * e];
                  float *dx = &d.dx[size_t(r) * e], dot = 0.0f;
                  for (int j = 0; j < e; j++) dot += y[j] * dy[j];
                  for (int j = 0; j < e; j++) dx[j] = y[j] * (dy[j] - dot);
              }
          },
          d.dx, d.dx_ref);
}

using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine &onednn_engine() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

void onednn_forward(benchmark::State &state, int e) {
    SoftmaxData &d = fmbench::cached<SoftmaxData>(e);
    dnnl::stream stream(onednn_engine());
    dnnl::memory::desc md({kRows, e}, dt::f32, tag::ab);
    dnnl::softmax_forward::primitive_desc pd(
        dnnl::softmax_forward::desc(dnnl::prop_kind::forward_inference, md, 1), onednn_engine());
    dnnl::softmax_forward softmax(pd);
    dnnl::memory src(md, onednn_engine(), d.x.data()), dst(md, onednn_engine(), d.y.data());
    state.SetLabel(pd.impl_info_str());
    timed(state,
          [&] {
              softmax.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}});
              stream.wait();
          },
          d.y, d.y_ref);
}

void onednn_backward(benchmark::State &state, int e) {
    SoftmaxData &d = fmbench::cached<SoftmaxData>(e);
    dnnl::stream stream(onednn_engine());
    dnnl::memory::desc md({kRows, e}, dt::f32, tag::ab);
    dnnl::softmax_forward::primitive_desc hint(
        dnnl::softmax_forward::desc(dnnl::prop_kind::forward_training, md, 1), onednn_engine());
    dnnl::softmax_backward::primitive_desc pd(dnnl::softmax_backward::desc(md, md, 1), onednn_engine(), hint);
    dnnl::softmax_backward softmax(pd);
    dnnl::memory y(md, onednn_engine(), d.y_ref.data()), dy(md, onednn_engine(), d.dy.data()),
        dx(md, onednn_engine(), d.dx.data());
    state.SetLabel(pd.impl_info_str());
    timed(state,
          [&] {
              softmax.execute(stream, {{DNNL_ARG_DST, y}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_SRC, dx}});
              stream.wait();
          },
          d.dx, d.dx_ref);
}

int register_softmax() {
    std::vector<fm_isa> isas = {FM_ISA_AUTO};
    for (fm_isa isa : fmbench::forced_isas()) isas.push_back(isa);
    for (int e : kWidths) {
        const std::string tail = "/" + std::to_string(e);
        for (fm_isa isa : isas) {
            benchmark::RegisterBenchmark(("softmax/" + fmbench::impl_name(isa) + tail).c_str(), flexmoe_forward, isa, e);
            benchmark::RegisterBenchmark(("softmax_backward/" + fmbench::impl_name(isa) + tail).c_str(), flexmoe_backward, isa, e);
        }
        benchmark::RegisterBenchmark(("softmax/scalar" + tail).c_str(), scalar_forward, e);
        benchmark::RegisterBenchmark(("softmax_backward/scalar" + tail).c_str(), scalar_backward, e);
        benchmark::RegisterBenchmark(("softmax/onednn" + tail).c_str(), onednn_forward, e);
        benchmark::RegisterBenchmark(("softmax_backward/onednn" + tail).c_str(), onednn_backward, e);
    }
    return 0;
}

const int registered = register_softmax();

}  // namespace
