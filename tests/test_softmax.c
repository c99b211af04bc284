/* Row softmax forward and backward on every ISA path against a double-precision reference:
 * random shapes (one row, one column, widths off the vector width, up to 4096 columns, padded
 * leading dimensions, in place), the documented NaN / ±Inf / ±1e30 policy, and a
 * finite-difference check of the backward. */
#include "fm_test.h"

#include <string.h>

/* Forward: max over the row of |y - ref| relative to max |ref| (the metric). The float
 * kernels lose a few ulp in exp, the sum and the final scaling; 1e-6 leaves room for those and
 * for nothing else. */
#define FORWARD_TOLERANCE 1e-6
/* Backward: dx_i = y_i (dy_i - <y, dy>) cancels when dy_i is close to the dot product, so the
 * error is measured against the scale y_i (|dy_i| + sum_j |y_j dy_j|) that bounds the terms. */
#define BACKWARD_TOLERANCE 1e-6
/* The finite-difference check compares the float kernels with a central difference of the double
 * reference (truncation error ~h^2 = 1e-10): what remains is the float rounding of y and dx,
 * measured like the backward check against the scale of the terms that cancel. */
#define GRADIENT_TOLERANCE 2e-6

#define SENTINEL FM_TEST_SENTINEL

/* Same formula as the kernels, in double: the classes (NaN, ±Inf, finite) of its results are the
 * documented policy. */
static void reference_forward(const float *x, int n, double *y) {
    double max = x[0], sum = 0.0;
    int j;
    for (j = 1; j < n; j++) max = x[j] > max ? x[j] : max;
    for (j = 0; j < n; j++) sum += y[j] = exp((double)x[j] - max);
    for (j = 0; j < n; j++) y[j] /= sum;
}

static void reference_backward(const float *y, const float *dy, int n, double *dx) {
    double dot = 0.0;
    int j;
    for (j = 0; j < n; j++) dot += (double)y[j] * dy[j];
    for (j = 0; j < n; j++) dx[j] = y[j] * (dy[j] - dot);
}

static int value_class(double v) { return v != v ? 0 : v == INFINITY ? 1 : v == -INFINITY ? 2 : 3; }

/* Random logits: normal with a per-row scale, and now and then a special value. */
static float random_logit(double scale, int specials) {
    if (specials && fm_test_int(0, 9) == 0) {
        static const float special[] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f};
        return special[fm_test_int(0, 4)];
    }
    return (float)(fm_test_normal() * scale);
}

/* Compares one row with the reference: identical classes, finite values within `tolerance` of
 * `scale`. Returns the largest error relative to scale (or +inf on a class mismatch). */
static double row_error(const float *got, const double *want, int n, double scale) {
    double worst = 0.0;
    int j;
    for (j = 0; j < n; j++) {
        if (value_class(got[j]) != value_class(want[j])) return INFINITY;
        if (value_class(want[j]) == 3) {
            double e = fabs(got[j] - want[j]) / (scale > 0 ? scale : 1.0);
            worst = e > worst ? e : worst;
        }
    }
    return worst;
}

static void check_forward(int rows, int cols, int ld, int in_place, int specials) {
    float *x = fm_test_new_matrix(rows, cols, ld), *y = in_place ? x : fm_test_new_matrix(rows, cols, ld);
    float *x_copy = fm_test_new_matrix(rows, cols, ld);
    double *want = (double *)malloc((size_t)cols * sizeof(double)), worst = 0.0;
    int r, j;
    fm_status status;
    for (r = 0; r < rows; r++) {
        double scale = pow(10.0, fm_test_uniform() * 3.0 - 1.0); /* 0.1 .. 100 */
        for (j = 0; j < cols; j++) x[(size_t)r * ld + j] = random_logit(scale, specials);
    }
    memcpy(x_copy, x, ((size_t)(rows - 1) * ld + cols) * sizeof(float));
    status = fm_softmax_forward(rows, cols, x, ld, y, ld);
    for (r = 0; r < rows && status == FM_OK; r++) {
        double scale = 0.0, e;
        reference_forward(x_copy + (size_t)r * ld, cols, want);
        for (j = 0; j < cols; j++) scale = fabs(want[j]) > scale && value_class(want[j]) == 3 ? fabs(want[j]) : scale;
        e = row_error(y + (size_t)r * ld, want, cols, scale);
        worst = e > worst ? e : worst;
    }
    FM_CHECK(status == FM_OK && worst <= FORWARD_TOLERANCE,
             "forward rows=%d cols=%d ld=%d in_place=%d specials=%d: %s, error %.3g", rows, cols, ld,
             in_place, specials, fm_status_str(status), worst);
    FM_CHECK(fm_test_padding_intact(y, rows, cols, ld), "forward rows=%d cols=%d ld=%d wrote into the padding",
             rows, cols, ld);
    if (!in_place) {
        FM_CHECK(memcmp(x, x_copy, ((size_t)(rows - 1) * ld + cols) * sizeof(float)) == 0,
                 "forward rows=%d cols=%d modified its input", rows, cols);
        free(y);
    }
    free(x);
    free(x_copy);
    free(want);
}

static void check_backward(int rows, int cols, int ld, int in_place, int specials) {
    float *y = fm_test_new_matrix(rows, cols, ld), *dy = fm_test_new_matrix(rows, cols, ld);
    float *dx = in_place ? dy : fm_test_new_matrix(rows, cols, ld), *dy_copy = fm_test_new_matrix(rows, cols, ld);
    double *want = (double *)malloc((size_t)cols * sizeof(double)), worst = 0.0;
    int r, j;
    fm_status status;
    for (r = 0; r < rows; r++) {
        float *xr = dy_copy + (size_t)r * ld; /* borrowed as logits for a valid y */
        for (j = 0; j < cols; j++) xr[j] = (float)(fm_test_normal() * 3.0);
        reference_forward(xr, cols, want);
        for (j = 0; j < cols; j++) {
            y[(size_t)r * ld + j] = (float)want[j];
            dy[(size_t)r * ld + j] = random_logit(1.0, specials);
        }
    }
    memcpy(dy_copy, dy, ((size_t)(rows - 1) * ld + cols) * sizeof(float));
    status = fm_softmax_backward(rows, cols, y, ld, dy, ld, dx, ld);
    for (r = 0; r < rows && status == FM_OK; r++) {
        const float *yr = y + (size_t)r * ld, *dyr = dy_copy + (size_t)r * ld;
        double dot_scale = 0.0, scale = 0.0, e;
        reference_backward(yr, dyr, cols, want);
        for (j = 0; j < cols; j++) dot_scale += fabs((double)yr[j] * dyr[j]);
        for (j = 0; j < cols; j++) {
            double s = yr[j] * (fabs(dyr[j]) + dot_scale);
            scale = s > scale && s == s && s != INFINITY ? s : scale;
        }
        e = row_error(dx + (size_t)r * ld, want, cols, scale);
        worst = e > worst ? e : worst;
    }
    FM_CHECK(status == FM_OK && worst <= BACKWARD_TOLERANCE,
             "backward rows=%d cols=%d ld=%d in_place=%d specials=%d: %s, error %.3g", rows, cols,
             ld, in_place, specials, fm_status_str(status), worst);
    FM_CHECK(fm_test_padding_intact(dx, rows, cols, ld), "backward rows=%d cols=%d ld=%d wrote into the padding",
             rows, cols, ld);
    if (!in_place) free(dx);
    free(y);
    free(dy);
    free(dy_copy);
    free(want);
}

/* The policy stated in flexmoe.h, on hand-made rows of several widths (narrow packed rows and
 * wide rows take different code). */
static void check_policy(int cols) {
    float *x = (float *)malloc((size_t)cols * sizeof(float)), *y = (float *)malloc((size_t)cols * sizeof(float));
    float *dy = (float *)malloc((size_t)cols * sizeof(float));
    int j, all_nan, ok;
    double sum;
    const int at = fm_test_int(0, cols - 1);

    for (j = 0; j < cols; j++) x[j] = (float)fm_test_normal();
    x[at] = NAN;
    fm_softmax_forward(1, cols, x, cols, y, cols);
    for (all_nan = 1, j = 0; j < cols; j++) all_nan &= y[j] != y[j];
    FM_CHECK(all_nan, "cols=%d: a NaN at %d must make the whole row NaN", cols, at);

    x[at] = INFINITY;
    fm_softmax_forward(1, cols, x, cols, y, cols);
    for (all_nan = 1, j = 0; j < cols; j++) all_nan &= y[j] != y[j];
    FM_CHECK(all_nan, "cols=%d: a +Inf at %d must make the whole row NaN", cols, at);

    for (j = 0; j < cols; j++) x[j] = -INFINITY;
    fm_softmax_forward(1, cols, x, cols, y, cols);
    for (all_nan = 1, j = 0; j < cols; j++) all_nan &= y[j] != y[j];
    FM_CHECK(all_nan, "cols=%d: an all -Inf row must be NaN", cols);

    if (cols >= 2) {
        for (j = 0; j < cols; j++) x[j] = j % 2 ? -INFINITY : (float)fm_test_normal();
        fm_softmax_forward(1, cols, x, cols, y, cols);
        for (ok = 1, sum = 0.0, j = 0; j < cols; j++) {
            ok &= j % 2 ? y[j] == 0.0f : (y[j] > 0.0f && y[j] <= 1.0f);
            sum += y[j];
        }
        FM_CHECK(ok && fabs(sum - 1.0) < 1e-5, "cols=%d: -Inf entries must give exactly 0 (sum %.9g)", cols, sum);

        for (j = 0; j < cols; j++) x[j] = j % 2 ? -1e30f : 0.0f;
        x[0] = 1e30f;
        fm_softmax_forward(1, cols, x, cols, y, cols);
        for (ok = y[0] == 1.0f, j = 1; j < cols; j++) ok &= y[j] == 0.0f;
        FM_CHECK(ok, "cols=%d: a 1e30 logit among 0 and -1e30 must take probability 1 (got %.9g)", cols, y[0]);
    }

    for (j = 0; j < cols; j++) {
        y[j] = 1.0f / (float)cols;
        dy[j] = (float)fm_test_normal();
    }
    dy[at] = NAN;
    fm_softmax_backward(1, cols, y, cols, dy, cols, x, cols);
    for (all_nan = 1, j = 0; j < cols; j++) all_nan &= x[j] != x[j];
    FM_CHECK(all_nan, "cols=%d: a NaN in dy at %d must make the whole row of dx NaN", cols, at);
    free(x);
    free(y);
    free(dy);
}

/* Loss L(x) = sum_ij w_ij softmax(x)_ij in double with x[at] moved by `step`. The step is
 * applied to a double copy of x: the reference is evaluated in double on
 * inputs that are not float-representable, so the step is not rounded away. */
static double reference_loss_perturbed(const float *x, const float *w, int rows, int cols, int at,
                                       double step, double *scratch) {
    double loss = 0.0, max, sum;
    int r, j;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * cols;
        const int row_at = at / cols == r ? at % cols : -1;
        max = -INFINITY;
        for (j = 0; j < cols; j++) {
            scratch[j] = xr[j] + (j == row_at ? step : 0.0);
            max = scratch[j] > max ? scratch[j] : max;
        }
        for (sum = 0.0, j = 0; j < cols; j++) sum += scratch[j] = exp(scratch[j] - max);
        for (j = 0; j < cols; j++) loss += w[(size_t)r * cols + j] * scratch[j] / sum;
    }
    return loss;
}

static void check_gradient(int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    float *x = (float *)malloc(n * sizeof(float)), *w = (float *)malloc(n * sizeof(float));
    float *y = (float *)malloc(n * sizeof(float)), *dx = (float *)malloc(n * sizeof(float));
    double *scratch = (double *)malloc((size_t)cols * sizeof(double)), worst = 0.0, scale = 0.0;
    const double step = 1e-5;
    size_t i;
    for (i = 0; i < n; i++) {
        x[i] = (float)(fm_test_normal() * 2.0);
        w[i] = (float)fm_test_normal();
    }
    fm_softmax_forward(rows, cols, x, cols, y, cols);
    fm_softmax_backward(rows, cols, y, cols, w, cols, dx, cols);
    for (i = 0; i < n; i++) {
        double fd = (reference_loss_perturbed(x, w, rows, cols, (int)i, step, scratch) -
                     reference_loss_perturbed(x, w, rows, cols, (int)i, -step, scratch)) / (2.0 * step);
        double e = fabs(dx[i] - fd);
        worst = e > worst ? e : worst;
    }
    for (i = 0; i < n; i++) { /* the term scale y_i (|w_i| + sum_j y_j |w_j|), as in the backward check */
        const size_t row = i / cols * cols;
        double dot_scale = 0.0, s;
        int j;
        for (j = 0; j < cols; j++) dot_scale += fabs((double)y[row + j] * w[row + j]);
        s = y[i] * (fabs(w[i]) + dot_scale);
        scale = s > scale ? s : scale;
    }
    FM_CHECK(worst <= GRADIENT_TOLERANCE * scale,
             "gradient rows=%d cols=%d: |dx - finite difference| %.3g at scale %.3g", rows, cols,
             worst, scale);
    free(x);
    free(w);
    free(y);
    free(dx);
    free(scratch);
}

int main(void) {
    static const int widths[] = {1,  2,  3,  4,   5,   7,   8,   9,   12,  15,  16,   17,  23,  31,
                                 32, 33, 48, 63,  64,  65,  100, 127, 128, 129, 200,  255, 256,
                                 257, 500, 511, 512, 513, 1000, 1024, 2047, 2048, 4095, 4096};
    static const int row_counts[] = {1, 2, 3, 5, 8, 17, 64, 300};
    fm_isa isas[FM_ISA_COUNT];
    int n_isas, k, w, rep;
    fm_test_seed("test_softmax");
    n_isas = fm_test_isas(isas);
    for (k = 0; k < n_isas; k++) {
        fm_test_use_isa(isas[k]);
        for (w = 0; w < (int)(sizeof widths / sizeof widths[0]); w++) {
            const int cols = widths[w];
            for (rep = 0; rep < 3; rep++) {
                int rows = row_counts[fm_test_int(0, (int)(sizeof row_counts / sizeof row_counts[0]) - 1)];
                int ld = cols + (rep == 0 ? 0 : fm_test_int(1, 19));
                if (cols >= 1000 && rows > 17) rows = 17;
                check_forward(rows, cols, ld, rep == 2, 0);
                check_forward(rows, cols, ld, 0, 1);
                check_backward(rows, cols, ld, rep == 2, 0);
                check_backward(rows, cols, ld, 0, 1);
            }
            check_policy(cols);
            if (cols <= 65) check_gradient(3, cols);
        }
    }
    return fm_test_finish("test_softmax");
}
