// The header compiled as C++ (implementation included): it must build warning-free and agree
// with the scalar path.
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
    const int rows = 7, cols = 37;
    std::vector<float> x(rows * cols), y(rows * cols), y_scalar(rows * cols);
    for (int i = 0; i < rows * cols; i++) x[i] = std::sin(0.37f * i) * 4.0f;
    int passed = 0, failed = 0;
    bool ok = fm_softmax_forward(rows, cols, x.data(), cols, y.data(), cols) == FM_OK;
    ok = ok && fm_set_isa(FM_ISA_SCALAR) == FM_OK &&
         fm_softmax_forward(rows, cols, x.data(), cols, y_scalar.data(), cols) == FM_OK;
    double worst = 0.0;
    for (int i = 0; i < rows * cols; i++) worst = std::fmax(worst, std::fabs(y[i] - y_scalar[i]));
    (ok && worst < 1e-6 ? passed : failed)++;
    if (!ok || worst >= 1e-6) std::fprintf(stderr, "FAIL C++ softmax differs from scalar by %g\n", worst);
    std::printf("test_cxx: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
