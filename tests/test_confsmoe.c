/* LayerNorm forward/backward and the ConfSMoE confidence gate on every ISA path against
 * double-precision references written here independently of the library: random shapes (one
 * row, one column, widths off the vector width up to 1100, padded leading dimensions, in place),
 * the NaN / Inf policy stated in flexmoe.h, finite-difference checks in double of every
 * gradient, and argument errors that must return the right status and write nothing. */
#include "fm_test.h"

#include <float.h>

#include <string.h>

/* LayerNorm: errors relative to the scale of the terms of each output (|xhat * gamma| + |beta|,
 * the terms of the two reductions in the backward). Float storage and float sums leave ~1e-6. */
#define LN_TOLERANCE 1e-5
/* The gate chains two LayerNorms, a sigmoid and the combination: a little more room. */
#define GATE_TOLERANCE 3e-5
/* Finite differences (central, step 1e-5 in double: truncation ~1e-10) against the float
 * gradients: relative to the largest finite-difference entry of the same array, floored at
 * GRADIENT_FLOOR (the gate) or at 1% of the LayerNorm term scale rstd * |dy * gamma|: where a
 * gradient is all but zero, what remains is the float rounding of the O(1) terms that cancel
 * (the expert-mean sums over tokens, or a 2-column LayerNorm whose output is +-1 whatever its
 * input, so that its input gradient is rounding noise times rstd; the gate's x, h, w and b
 * gradients are therefore only checked for d >= 3). */
#define GRADIENT_FLOOR 0.1
#define GRADIENT_TOLERANCE 1e-4

#define SENTINEL FM_TEST_SENTINEL

/* n > 0 elements (the guard keeps GCC's allocation-size analysis quiet about negative ints). */
static double *dalloc(size_t n) { return (double *)malloc((n ? n : 1) * sizeof(double)); }
static double *dzero(size_t n) { return (double *)calloc(n ? n : 1, sizeof(double)); }
static float *falloc(size_t n) { return (float *)malloc((n ? n : 1) * sizeof(float)); }

static int all_sentinel(const float *m, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (m[i] != SENTINEL) return 0;
    return 1;
}

static float *new_filled(size_t n) {
    float *m = falloc((n ? n : 1));
    size_t i;
    for (i = 0; i < n; i++) m[i] = SENTINEL;
    return m;
}

static float randn(double scale) { return (float)(fm_test_normal() * scale); }

static double maxd(double a, double b) { return a > b ? a : b; }

/* ==== LayerNorm ============================================================================= */

/* Reference LayerNorm of one row in double; returns mean and rstd. */
static void ref_layernorm(const double *x, int n, const float *gamma, const float *beta, double eps, double *y,
                          double *mean, double *rstd) {
    double m = 0.0, v = 0.0;
    int j;
    for (j = 0; j < n; j++) m += x[j];
    m /= n;
    for (j = 0; j < n; j++) v += (x[j] - m) * (x[j] - m);
    v /= n;
    *mean = m;
    *rstd = 1.0 / sqrt(v + eps);
    for (j = 0; j < n; j++) y[j] = (x[j] - m) * *rstd * (gamma ? gamma[j] : 1.0) + (beta ? beta[j] : 0.0);
}

/* Rows of normal values with a per-row spread and, now and then, a large common offset. */
static void fill_rows(float *x, int rows, int cols, int ld) {
    int r, j;
    for (r = 0; r < rows; r++) {
        double scale = pow(10.0, fm_test_uniform() * 4.0 - 2.0);
        double offset = fm_test_int(0, 2) == 0 ? fm_test_normal() * 1e3 * scale : fm_test_normal() * scale;
        for (j = 0; j < cols; j++) x[(size_t)r * ld + j] = (float)(offset + fm_test_normal() * scale);
    }
}

static void check_ln_forward(int rows, int cols, int ld, int in_place, int affine) {
    float *x = fm_test_new_matrix(rows, cols, ld), *y = in_place ? x : fm_test_new_matrix(rows, cols, ld);
    float *x_copy = fm_test_new_matrix(rows, cols, ld), *gamma = NULL, *beta = NULL;
    float *mean = falloc(rows), *rstd = falloc(rows);
    double *xd = dalloc(cols), *want = dalloc(cols);
    double worst = 0.0, worst_stats = 0.0;
    const float eps = fm_test_int(0, 1) ? 0.0f : 1e-3f; /* 0: the default 1e-5 */
    size_t extent = (size_t)(rows - 1) * ld + cols;
    fm_status status;
    int r, j;
    fill_rows(x, rows, cols, ld);
    if (affine & 1) {
        gamma = falloc(cols);
        for (j = 0; j < cols; j++) gamma[j] = randn(1.0);
    }
    if (affine & 2) {
        beta = falloc(cols);
        for (j = 0; j < cols; j++) beta[j] = randn(1.0);
    }
    memcpy(x_copy, x, extent * sizeof(float));
    status = fm_layernorm_forward(rows, cols, x, ld, gamma, beta, eps, y, ld, (affine & 4) ? NULL : mean,
                                  (affine & 4) ? NULL : rstd);
    for (r = 0; r < rows && status == FM_OK; r++) {
        double m, s, scale = 0.0;
        for (j = 0; j < cols; j++) xd[j] = x_copy[(size_t)r * ld + j];
        ref_layernorm(xd, cols, gamma, beta, eps == 0.0f ? 1e-5 : eps, want, &m, &s);
        for (j = 0; j < cols; j++)
            scale = maxd(scale, fabs((xd[j] - m) * s * (gamma ? gamma[j] : 1.0)) + fabs(beta ? beta[j] : 0.0));
        for (j = 0; j < cols; j++) worst = maxd(worst, fabs(y[(size_t)r * ld + j] - want[j]) / maxd(scale, 1e-30));
        if (!(affine & 4)) { /* the mean relative to its magnitude or the spread, rstd relative to itself */
            worst_stats = maxd(worst_stats, fabs(mean[r] - m) / maxd(fabs(m), 1.0 / s));
            worst_stats = maxd(worst_stats, fabs(rstd[r] - s) / s);
        }
    }
    FM_CHECK(status == FM_OK && worst <= LN_TOLERANCE && worst_stats <= LN_TOLERANCE,
             "ln forward rows=%d cols=%d ld=%d in_place=%d affine=%d: %s, error %.3g, stats %.3g", rows, cols,
             ld, in_place, affine, fm_status_str(status), worst, worst_stats);
    FM_CHECK(fm_test_padding_intact(y, rows, cols, ld), "ln forward rows=%d cols=%d ld=%d wrote into the padding", rows,
             cols, ld);
    if (!in_place) {
        FM_CHECK(memcmp(x, x_copy, extent * sizeof(float)) == 0, "ln forward modified its input");
        free(y);
    }
    free(x), free(x_copy), free(gamma), free(beta), free(mean), free(rstd), free(xd), free(want);
}

static void check_ln_backward(int rows, int cols, int ld, int in_place, int affine) {
    float *x = fm_test_new_matrix(rows, cols, ld), *dy = fm_test_new_matrix(rows, cols, ld);
    float *dx = in_place ? dy : fm_test_new_matrix(rows, cols, ld), *dy_copy = fm_test_new_matrix(rows, cols, ld);
    float *gamma = NULL, *mean = falloc(rows), *rstd = falloc(rows);
    float *dgamma = new_filled(cols + 1), *dbeta = new_filled(cols + 1);
    double *xd = dalloc(cols), *tmp = dalloc(cols);
    double *rg = dzero(cols), *rb = dzero(cols);
    double *sg = dzero(cols), *sb = dzero(cols);
    double worst = 0.0, worst_g = 0.0, worst_b = 0.0;
    const int want_params = !(affine & 4);
    fm_status status;
    int r, j;
    fill_rows(x, rows, cols, ld);
    for (r = 0; r < rows; r++)
        for (j = 0; j < cols; j++) dy[(size_t)r * ld + j] = randn(1.0);
    if (affine & 1) {
        gamma = falloc(cols);
        for (j = 0; j < cols; j++) gamma[j] = randn(1.0);
    }
    for (r = 0; r < rows; r++) { /* the saved statistics, as the forward would give them */
        double m, s;
        for (j = 0; j < cols; j++) xd[j] = x[(size_t)r * ld + j];
        ref_layernorm(xd, cols, NULL, NULL, 1e-5, tmp, &m, &s);
        mean[r] = (float)m;
        rstd[r] = (float)s;
    }
    memcpy(dy_copy, dy, ((size_t)(rows - 1) * ld + cols) * sizeof(float));
    status = fm_layernorm_backward(rows, cols, x, ld, gamma, mean, rstd, dy, ld, dx, ld,
                                   want_params ? dgamma : NULL, want_params ? dbeta : NULL);
    for (r = 0; r < rows && status == FM_OK; r++) {
        const float *xr = x + (size_t)r * ld, *dyr = dy_copy + (size_t)r * ld;
        double a = 0.0, q = 0.0, aa = 0.0, qa = 0.0, scale = 0.0;
        for (j = 0; j < cols; j++) {
            double xhat = ((double)xr[j] - mean[r]) * rstd[r], g = (double)dyr[j] * (gamma ? gamma[j] : 1.0);
            a += g, q += g * xhat, aa += fabs(g), qa += fabs(g * xhat);
            rg[j] += dyr[j] * xhat, rb[j] += dyr[j];
            sg[j] += fabs(dyr[j] * xhat), sb[j] += fabs(dyr[j]);
        }
        a /= cols, q /= cols, aa /= cols, qa /= cols;
        for (j = 0; j < cols; j++) {
            double xhat = ((double)xr[j] - mean[r]) * rstd[r], g = (double)dyr[j] * (gamma ? gamma[j] : 1.0);
            scale = maxd(scale, rstd[r] * (fabs(g) + aa + fabs(xhat) * qa));
        }
        for (j = 0; j < cols; j++) {
            double xhat = ((double)xr[j] - mean[r]) * rstd[r], g = (double)dyr[j] * (gamma ? gamma[j] : 1.0);
            worst = maxd(worst, fabs(dx[(size_t)r * ld + j] - rstd[r] * (g - a - xhat * q)) / scale);
        }
    }
    if (want_params)
        for (j = 0; j < cols; j++) {
            worst_g = maxd(worst_g, fabs(dgamma[j] - rg[j]) / maxd(sg[j], 1e-30));
            worst_b = maxd(worst_b, fabs(dbeta[j] - rb[j]) / maxd(sb[j], 1e-30));
        }
    FM_CHECK(status == FM_OK && worst <= LN_TOLERANCE && worst_g <= LN_TOLERANCE && worst_b <= LN_TOLERANCE,
             "ln backward rows=%d cols=%d ld=%d in_place=%d affine=%d: %s, dx %.3g dgamma %.3g dbeta %.3g", rows,
             cols, ld, in_place, affine, fm_status_str(status), worst, worst_g, worst_b);
    FM_CHECK(fm_test_padding_intact(dx, rows, cols, ld) && dgamma[cols] == SENTINEL && dbeta[cols] == SENTINEL &&
                 (want_params || (dgamma[0] == SENTINEL && dbeta[0] == SENTINEL)),
             "ln backward rows=%d cols=%d wrote outside its outputs", rows, cols);
    if (!in_place) free(dx);
    free(x), free(dy), free(dy_copy), free(gamma), free(mean), free(rstd), free(dgamma), free(dbeta);
    free(xd), free(tmp), free(rg), free(rb), free(sg), free(sb);
}

/* L = sum w * LayerNorm(x; gamma, beta) in double, one entry of x (0 .. rows*cols-1), gamma
 * (next cols) or beta (next cols) moved by step. */
static double ln_loss(const float *x, const float *gamma, const float *beta, const float *w, int rows, int cols,
                      int at, double step, double *xd, double *yd, double *g, double *b) {
    double loss = 0.0, m, s;
    int r, j;
    for (j = 0; j < cols; j++) {
        g[j] = gamma[j] + (at == rows * cols + j ? step : 0.0);
        b[j] = beta[j] + (at == rows * cols + cols + j ? step : 0.0);
    }
    for (r = 0; r < rows; r++) {
        for (j = 0; j < cols; j++) xd[j] = x[r * cols + j] + (at == r * cols + j ? step : 0.0);
        ref_layernorm(xd, cols, NULL, NULL, 1e-5, yd, &m, &s);
        for (j = 0; j < cols; j++) loss += w[r * cols + j] * (yd[j] * g[j] + b[j]);
    }
    return loss;
}

static void check_ln_gradient(int rows, int cols) {
    const int n = rows * cols;
    float *x = falloc(n), *w = falloc(n);
    float *y = falloc(n), *dx = falloc(n);
    float *gamma = falloc(cols), *beta = falloc(cols);
    float *dgamma = falloc(cols), *dbeta = falloc(cols);
    float *mean = falloc(rows), *rstd = falloc(rows);
    double *xd = dalloc(cols), *yd = dalloc(cols);
    double *g = dalloc(cols), *b = dalloc(cols);
    double worst[3] = {0, 0, 0}, scale[3] = {1e-30, 1e-30, 1e-30};
    const double step = 1e-5;
    int i;
    for (i = 0; i < n; i++) x[i] = randn(2.0), w[i] = randn(1.0);
    for (i = 0; i < cols; i++) gamma[i] = randn(1.0), beta[i] = randn(1.0);
    fm_layernorm_forward(rows, cols, x, cols, gamma, beta, 0.0f, y, cols, mean, rstd);
    fm_layernorm_backward(rows, cols, x, cols, gamma, mean, rstd, w, cols, dx, cols, dgamma, dbeta);
    /* xhat comes from the float mean, which is off by an ulp of |mean|: |mean| * rstd ulps of xhat */
    for (i = 0; i < n; i++)
        scale[0] = maxd(scale[0], 1e-2 * rstd[i / cols] * fabs(w[i] * gamma[i % cols]) *
                                      maxd(1.0, fabs(mean[i / cols]) * rstd[i / cols]));
    for (i = 0; i < n + 2 * cols; i++) {
        const double fd = (ln_loss(x, gamma, beta, w, rows, cols, i, step, xd, yd, g, b) -
                           ln_loss(x, gamma, beta, w, rows, cols, i, -step, xd, yd, g, b)) / (2 * step);
        const int which = i < n ? 0 : i < n + cols ? 1 : 2;
        const float got = which == 0 ? dx[i] : which == 1 ? dgamma[i - n] : dbeta[i - n - cols];
        worst[which] = maxd(worst[which], fabs(got - fd));
        scale[which] = maxd(scale[which], fabs(fd));
    }
    FM_CHECK(worst[0] <= GRADIENT_TOLERANCE * scale[0] && worst[1] <= GRADIENT_TOLERANCE * scale[1] &&
                 worst[2] <= GRADIENT_TOLERANCE * scale[2],
             "ln gradient rows=%d cols=%d: dx %.3g/%.3g dgamma %.3g/%.3g dbeta %.3g/%.3g", rows, cols, worst[0],
             scale[0], worst[1], scale[1], worst[2], scale[2]);
    free(x), free(w), free(y), free(dx), free(gamma), free(beta), free(dgamma), free(dbeta), free(mean);
    free(rstd), free(xd), free(yd), free(g), free(b);
}

static int row_all_nan(const float *y, int n) {
    int j, all = 1;
    for (j = 0; j < n; j++) all &= y[j] != y[j];
    return all;
}
static int row_all_finite(const float *y, int n) {
    int j, all = 1;
    for (j = 0; j < n; j++) all &= isfinite(y[j]) != 0;
    return all;
}

static void check_ln_policy(int cols) {
    const int rows = 3;
    float *x = falloc(rows * cols), *y = falloc(rows * cols);
    float *dy = falloc(rows * cols), *gamma = falloc(cols);
    float mean[3], rstd[3], *dg = falloc(cols), *db = falloc(cols);
    static const float specials[] = {NAN, INFINITY, -INFINITY};
    const int at = fm_test_int(0, cols - 1);
    int i, k, j, ok;
    for (k = 0; k < 3; k++) {
        for (i = 0; i < rows * cols; i++) x[i] = randn(1.0);
        x[cols + at] = specials[k];
        fm_layernorm_forward(rows, cols, x, cols, NULL, NULL, 0.0f, y, cols, mean, rstd);
        FM_CHECK(row_all_nan(y + cols, cols) && rstd[1] != rstd[1] && row_all_finite(y, cols) &&
                     row_all_finite(y + 2 * cols, cols),
                 "ln cols=%d: %g in row 1 must make exactly row 1 NaN", cols, specials[k]);
    }
    for (i = 0; i < rows * cols; i++) x[i] = randn(1.0), dy[i] = randn(1.0);
    for (j = 0; j < cols; j++) gamma[j] = randn(1.0);
    gamma[at] = NAN;
    fm_layernorm_forward(rows, cols, x, cols, gamma, NULL, 0.0f, y, cols, mean, rstd);
    for (ok = 1, i = 0; i < rows; i++)
        for (j = 0; j < cols; j++) ok &= (j == at) == (y[i * cols + j] != y[i * cols + j]);
    FM_CHECK(ok, "ln cols=%d: a NaN gamma[%d] must make exactly column %d NaN", cols, at, at);

    gamma[at] = 1.0f;
    fm_layernorm_forward(rows, cols, x, cols, gamma, NULL, 0.0f, y, cols, mean, rstd);
    dy[cols + at] = NAN;
    fm_layernorm_backward(rows, cols, x, cols, gamma, mean, rstd, dy, cols, y, cols, dg, db);
    for (ok = 1, j = 0; j < cols; j++) ok &= (j == at) == (dg[j] != dg[j]) && (j == at) == (db[j] != db[j]);
    FM_CHECK(ok && row_all_nan(y + cols, cols) && row_all_finite(y, cols) && row_all_finite(y + 2 * cols, cols),
             "ln backward cols=%d: a NaN dy[1][%d] must make row 1 of dx and column %d of dgamma/dbeta NaN", cols, at,
             at);
    dy[cols + at] = 1.0f;
    x[2 * cols + at] = NAN;
    fm_layernorm_forward(rows, cols, x, cols, gamma, NULL, 0.0f, y, cols, mean, rstd);
    fm_layernorm_backward(rows, cols, x, cols, gamma, mean, rstd, dy, cols, y, cols, dg, db);
    FM_CHECK(row_all_nan(y + 2 * cols, cols) && row_all_finite(y, 2 * cols) && row_all_nan(dg, cols) &&
                 row_all_finite(db, cols),
             "ln backward cols=%d: a NaN in row 2 of x must make row 2 of dx and all of dgamma NaN", cols);
    free(x), free(y), free(dy), free(gamma), free(dg), free(db);
}

#define EXPECT_STATUS(want, call, untouched)                                                        \
    do {                                                                                            \
        fm_status got_ = (call);                                                                    \
        FM_CHECK(got_ == (want) && (untouched), "%s: %s (want %s)%s", #call, fm_status_str(got_),    \
                 fm_status_str(want), (untouched) ? "" : ", and it wrote into an output");          \
    } while (0)

static void check_ln_errors(void) {
    float x[12], y[12], dx[12], stats[4], dg[4], db[4];
    const float *bogus = x; /* never dereferenced: the shape check fails first */
    int i;
    for (i = 0; i < 12; i++) x[i] = (float)i, y[i] = dx[i] = SENTINEL;
    for (i = 0; i < 4; i++) stats[i] = dg[i] = db[i] = SENTINEL;
#define LN_UNTOUCHED (all_sentinel(y, 12) && all_sentinel(stats, 4))
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_layernorm_forward(3, 4, NULL, 4, NULL, NULL, 0, y, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_layernorm_forward(3, 4, x, 4, NULL, NULL, 0, NULL, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, fm_layernorm_forward(0, 4, x, 4, NULL, NULL, 0, y, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, fm_layernorm_forward(3, -1, x, 4, NULL, NULL, 0, y, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, fm_layernorm_forward(3, 4, x, 3, NULL, NULL, 0, y, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, fm_layernorm_forward(3, 4, x, 4, NULL, NULL, 0, y, 2, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_OVERFLOW, fm_layernorm_forward(2147483647, 4, bogus, 2147483647, NULL, NULL, 0, y, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, fm_layernorm_forward(3, 4, x, 4, NULL, NULL, -1e-5f, y, 4, stats, NULL), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, fm_layernorm_forward(3, 4, x, 4, NULL, NULL, NAN, y, 4, stats, NULL), LN_UNTOUCHED);
#undef LN_UNTOUCHED
#define LN_UNTOUCHED (all_sentinel(dx, 12) && all_sentinel(dg, 4) && all_sentinel(db, 4))
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_layernorm_backward(3, 4, x, 4, NULL, NULL, x, x, 4, dx, 4, dg, db), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_layernorm_backward(3, 4, x, 4, NULL, x, NULL, x, 4, dx, 4, dg, db), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_layernorm_backward(3, 4, x, 4, NULL, x, x, NULL, 4, dx, 4, dg, db), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_layernorm_backward(3, 4, x, 4, NULL, x, x, x, 4, NULL, 4, dg, db), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, fm_layernorm_backward(3, 0, x, 4, NULL, x, x, x, 4, dx, 4, dg, db), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, fm_layernorm_backward(3, 4, x, 4, NULL, x, x, x, 4, dx, 3, dg, db), LN_UNTOUCHED);
    EXPECT_STATUS(FM_ERR_OVERFLOW, fm_layernorm_backward(2147483647, 4, bogus, 2147483647, NULL, x, x, x, 4, dx, 4, dg, db), LN_UNTOUCHED);
#undef LN_UNTOUCHED
}

/* ==== ConfSMoE gate ========================================================================= */

typedef struct gate_case {
    fm_confsmoe_desc desc;
    int has_gamma, has_beta, has_labels;
    int32_t *experts, *labels;
    /* float inputs as the library gets them */
    float *x, *h, *w, *b, *gamma, *beta, *pw, *pb, *dout;
    int ldx, ldh;
    double a, bcoef; /* dloss_conf, dloss_probe */
} gate_case;

/* The double-precision view of the parameters; the finite differences move entries of these. */
typedef struct gate_ref {
    double *x, *h, *w, *b, *gamma, *beta, *pw, *pb;
} gate_ref;

enum { P_X, P_H, P_W, P_B, P_GAMMA, P_BETA, P_PW, P_PB, P_COUNT };
static const char *const param_names[P_COUNT] = {"x", "h", "w", "b", "gamma", "beta", "probe_w", "probe_b"};

static size_t param_size(const gate_case *g, int which) {
    const fm_confsmoe_desc *d = &g->desc;
    switch (which) {
    case P_X: return (size_t)d->tokens * d->dim;
    case P_H: return (size_t)d->tokens * d->k * d->dim;
    case P_W: return (size_t)d->experts * d->dim;
    case P_B: return (size_t)d->experts;
    case P_GAMMA: return g->has_gamma ? (size_t)d->dim : 0;
    case P_BETA: return g->has_beta ? (size_t)d->dim : 0;
    case P_PW: return g->has_labels ? (size_t)d->experts * d->classes * d->dim : 0;
    default: return g->has_labels ? (size_t)d->experts * d->classes : 0;
    }
}

static double **ref_param(gate_ref *r, int which) {
    double **all[P_COUNT];
    all[P_X] = &r->x, all[P_H] = &r->h, all[P_W] = &r->w, all[P_B] = &r->b;
    all[P_GAMMA] = &r->gamma, all[P_BETA] = &r->beta, all[P_PW] = &r->pw, all[P_PB] = &r->pb;
    return all[which];
}

/* The gate in double, straight from the formulas in flexmoe.h. h_probe: the h the probe's
 * cross-entropy sees (the unperturbed one unless probe_trains_experts); fixed_target: the
 * detached target (NULL: computed here). Returns sum(dout * out) + a loss_conf + b loss_probe. */
/* amplification (T, optional): how much the output LayerNorm magnifies a rounding of its input,
 * rstd * max|gamma| * the row's largest term |x| + sum |c h|: float rounding of the sum it
 * normalises reaches the output that many times over, which matters when a row's spread is near
 * sqrt(eps) (two features, say, that nearly tie). */
static double ref_gate(const gate_case *g, const gate_ref *R, const double *h_probe, const double *fixed_target,
                       double *out, double *conf, double *target, double *losses, double *amplification) {
    const int T = g->desc.tokens, k = g->desc.k, E = g->desc.experts, d = g->desc.dim, C = g->desc.classes;
    const double eps = g->desc.eps == 0.0f ? 1e-5 : g->desc.eps;
    const int S = T * k;
    double *u = dalloc(S), *c = dalloc(S);
    double *m = dalloc(d), *y = dalloc(d);
    double *logits = dalloc(C);
    double *sum = dzero(E), *count = dzero(E);
    double objective = 0.0, loss_conf = 0.0, loss_probe = 0.0, mean, rstd;
    int s, t, i, j, e, q;
    for (s = 0; s < S; s++) {
        double z;
        e = g->experts[s];
        ref_layernorm(R->h + (size_t)s * d, d, NULL, NULL, eps, y, &mean, &rstd);
        for (z = R->b[e], j = 0; j < d; j++) z += R->w[(size_t)e * d + j] * y[j];
        u[s] = 1.0 / (1.0 + exp(-z));
        sum[e] += u[s], count[e] += 1.0;
    }
    for (s = 0; s < S; s++) c[s] = g->desc.mode == FM_CONF_EXPERT_MEAN ? sum[g->experts[s]] / count[g->experts[s]] : u[s];
    for (t = 0; t < T; t++) {
        double mu = 0.0, var = 0.0, terms = 0.0, gamma_max = 0.0;
        for (j = 0; j < d; j++) {
            double row_terms = fabs(R->x[(size_t)t * d + j]);
            m[j] = R->x[(size_t)t * d + j];
            for (i = 0; i < k; i++) {
                m[j] += c[t * k + i] * R->h[((size_t)t * k + i) * d + j];
                row_terms += fabs(c[t * k + i] * R->h[((size_t)t * k + i) * d + j]);
            }
            terms = maxd(terms, row_terms);
            gamma_max = maxd(gamma_max, R->gamma ? fabs(R->gamma[j]) : 1.0);
        }
        for (j = 0; j < d; j++) mu += m[j];
        mu /= d;
        for (j = 0; j < d; j++) var += (m[j] - mu) * (m[j] - mu);
        var /= d;
        if (amplification) amplification[t] = terms * gamma_max / sqrt(var + eps);
        for (j = 0; j < d; j++) {
            double o = (m[j] - mu) / sqrt(var + eps) * (R->gamma ? R->gamma[j] : 1.0) + (R->beta ? R->beta[j] : 0.0);
            if (out) out[(size_t)t * d + j] = o;
            objective += g->dout[(size_t)t * d + j] * o;
        }
    }
    if (g->has_labels) {
        for (s = 0; s < S; s++) {
            const int label = g->labels[s / k];
            const double *hs = (h_probe ? h_probe : R->h) + (size_t)s * d;
            double max = -INFINITY, se = 0.0, p_label, tgt;
            e = g->experts[s];
            for (q = 0; q < C; q++) {
                logits[q] = R->pb[(size_t)e * C + q];
                for (j = 0; j < d; j++) logits[q] += R->pw[((size_t)e * C + q) * d + j] * hs[j];
                max = logits[q] > max ? logits[q] : max;
            }
            for (q = 0; q < C; q++) se += exp(logits[q] - max);
            p_label = exp(logits[label] - max) / se;
            loss_probe += max + log(se) - logits[label];
            if (target) target[s] = p_label;
            tgt = fixed_target ? fixed_target[s] : p_label;
            loss_conf += (c[s] - tgt) * (c[s] - tgt);
        }
        loss_conf /= S, loss_probe /= S;
        objective += g->a * loss_conf + g->bcoef * loss_probe;
        if (losses) losses[0] = loss_conf, losses[1] = loss_probe;
    }
    if (conf) memcpy(conf, c, S * sizeof(double));
    free(u), free(c), free(m), free(y), free(logits), free(sum), free(count);
    return objective;
}

static float *random_array(size_t n, double scale) {
    float *a = falloc((n ? n : 1));
    size_t i;
    for (i = 0; i < n; i++) a[i] = randn(scale);
    return a;
}

/* A random case; T tokens with k distinct experts each (as top-k gives them). flags: 1 gamma,
 * 2 beta, 4 probe_trains_experts, 8 eps 1e-3 (else the default), 16 no labels. */
static void gate_make(gate_case *g, int T, int k, int E, int d, int C, int mode, int flags, int pad) {
    int t, i, j;
    memset(g, 0, sizeof *g);
    g->desc.tokens = T, g->desc.k = k, g->desc.experts = E, g->desc.dim = d, g->desc.classes = C;
    g->desc.mode = (fm_conf_mode)mode;
    g->desc.eps = (flags & 8) ? 1e-3f : 0.0f;
    g->desc.probe_trains_experts = (flags & 4) != 0;
    g->has_gamma = (flags & 1) != 0, g->has_beta = (flags & 2) != 0, g->has_labels = (flags & 16) == 0;
    g->ldx = d + (pad ? fm_test_int(0, 9) : 0), g->ldh = d + (pad ? fm_test_int(0, 9) : 0);
    g->experts = (int32_t *)malloc((size_t)T * k * sizeof(int32_t));
    g->labels = (int32_t *)malloc((size_t)T * sizeof(int32_t));
    for (t = 0; t < T; t++) {
        g->labels[t] = fm_test_int(0, C - 1);
        for (i = 0; i < k; i++) {
            int e, dup;
            do { /* distinct experts per token */
                e = fm_test_int(0, E - 1);
                for (dup = 0, j = 0; j < i; j++) dup |= g->experts[t * k + j] == e;
            } while (dup);
            g->experts[t * k + i] = e;
        }
    }
    g->x = fm_test_new_matrix(T, d, g->ldx), g->h = fm_test_new_matrix(T * k, d, g->ldh);
    for (t = 0; t < T; t++)
        for (j = 0; j < d; j++) g->x[(size_t)t * g->ldx + j] = randn(1.0);
    for (t = 0; t < T * k; t++)
        for (j = 0; j < d; j++) g->h[(size_t)t * g->ldh + j] = randn(1.0) + 0.5f;
    g->w = random_array((size_t)E * d, 1.0 / sqrt(d));
    g->b = random_array(E, 0.5);
    g->gamma = g->has_gamma ? random_array(d, 1.0) : NULL;
    g->beta = g->has_beta ? random_array(d, 1.0) : NULL;
    g->pw = random_array((size_t)E * C * d, 1.0 / sqrt(d));
    g->pb = random_array((size_t)E * C, 0.5);
    g->dout = random_array((size_t)T * d, 1.0);
    g->a = 0.5 + fm_test_uniform(), g->bcoef = 0.5 + fm_test_uniform();
}

static void gate_free(gate_case *g) {
    free(g->experts), free(g->labels), free(g->x), free(g->h), free(g->w), free(g->b), free(g->gamma);
    free(g->beta), free(g->pw), free(g->pb), free(g->dout);
}

/* A double copy of n floats, or of a rows x cols matrix with leading dimension ld (rows > 0). */
static double *to_double(const float *a, size_t n, int rows, int cols, int ld) {
    double *d;
    size_t i;
    if (!a) return NULL;
    if (rows > 0) n = (size_t)rows * cols;
    d = dalloc((n ? n : 1));
    if (rows > 0) {
        int r, j;
        for (r = 0; r < rows; r++)
            for (j = 0; j < cols; j++) d[(size_t)r * cols + j] = a[(size_t)r * ld + j];
    } else {
        for (i = 0; i < n; i++) d[i] = a[i];
    }
    return d;
}

static void ref_make(const gate_case *g, gate_ref *R) {
    const fm_confsmoe_desc *d = &g->desc;
    R->x = to_double(g->x, 0, d->tokens, d->dim, g->ldx);
    R->h = to_double(g->h, 0, d->tokens * d->k, d->dim, g->ldh);
    R->w = to_double(g->w, (size_t)d->experts * d->dim, 0, 0, 0);
    R->b = to_double(g->b, d->experts, 0, 0, 0);
    R->gamma = to_double(g->gamma, d->dim, 0, 0, 0);
    R->beta = to_double(g->beta, d->dim, 0, 0, 0);
    R->pw = to_double(g->pw, (size_t)d->experts * d->classes * d->dim, 0, 0, 0);
    R->pb = to_double(g->pb, (size_t)d->experts * d->classes, 0, 0, 0);
}

static void ref_free(gate_ref *R) {
    free(R->x), free(R->h), free(R->w), free(R->b), free(R->gamma), free(R->beta), free(R->pw), free(R->pb);
}

static fm_confsmoe_params gate_params(const gate_case *g) {
    fm_confsmoe_params p;
    p.w = g->w, p.b = g->b, p.gamma = g->gamma, p.beta = g->beta, p.probe_w = g->pw, p.probe_b = g->pb;
    return p;
}

static const char *gate_name(const gate_case *g, char *buf, size_t size) {
    const fm_confsmoe_desc *d = &g->desc;
    snprintf(buf, size, "T=%d k=%d E=%d d=%d C=%d mode=%d probe_trains=%d gamma=%d beta=%d labels=%d ldx=%d ldh=%d",
             d->tokens, d->k, d->experts, d->dim, d->classes, (int)d->mode, d->probe_trains_experts, g->has_gamma,
             g->has_beta, g->has_labels, g->ldx, g->ldh);
    return buf;
}

/* Forward against the reference, then the backward against central differences of the
 * reference objective: every entry when n_fd < 0, else n_fd random entries per array. */
static void check_gate(gate_case *g, int n_fd) {
    const fm_confsmoe_desc *d = &g->desc;
    const int T = d->tokens, k = d->k, D = d->dim, S = T * k, ldout = D + fm_test_int(0, 3);
    fm_confsmoe_params params = gate_params(g);
    fm_confsmoe_grads grads;
    gate_ref R;
    size_t saved_n = 0;
    float *saved, *out = fm_test_new_matrix(T, D, ldout), *conf = new_filled(S), *target = new_filled(S), losses[2];
    float *dx = fm_test_new_matrix(T, D, ldout), *dh = fm_test_new_matrix(S, D, g->ldh), *dh2 = fm_test_new_matrix(S, D, g->ldh);
    float *gr[P_COUNT];
    double *ref_out = dalloc((size_t)T * D), *ref_conf = dalloc(S);
    double *ref_target = dalloc(S), ref_losses[2] = {0, 0}, *h_base, *amplification = dalloc(T);
    double worst_out = 0.0, worst_conf = 0.0, worst_target = 0.0, worst_loss = 0.0;
    const int32_t *labels = g->has_labels ? g->labels : NULL;
    fm_status status;
    char name[256];
    int t, j, which;
    gate_name(g, name, sizeof name);
    losses[0] = losses[1] = SENTINEL;
    FM_CHECK(fm_confsmoe_saved_floats(d, &saved_n) == FM_OK &&
                 saved_n == (size_t)(6 * S + 2 * T + 2 * d->experts + 2 * D + d->classes),
             "saved_floats %s", name);
    saved = new_filled(saved_n);
    for (which = 0; which < P_COUNT; which++) gr[which] = new_filled(param_size(g, which) + 1);
    grads.w = gr[P_W], grads.b = gr[P_B], grads.gamma = g->has_gamma ? gr[P_GAMMA] : NULL;
    grads.beta = g->has_beta ? gr[P_BETA] : NULL;
    grads.probe_w = g->has_labels ? gr[P_PW] : NULL, grads.probe_b = g->has_labels ? gr[P_PB] : NULL;

    status = fm_confsmoe_forward(d, &params, g->experts, labels, g->x, g->ldx, g->h, g->ldh, out, ldout, conf,
                                 target, losses, saved);
    ref_make(g, &R);
    ref_gate(g, &R, NULL, NULL, ref_out, ref_conf, ref_target, ref_losses, amplification);
    for (t = 0; t < T && status == FM_OK; t++) {
        /* relative to the row's largest output, or to what float rounding of the LayerNorm's input
         * becomes at its output (k + 2 roundings of the sum, magnified), whichever is larger */
        double scale = 1e-30;
        for (j = 0; j < D; j++) scale = maxd(scale, fabs(ref_out[(size_t)t * D + j]));
        scale = maxd(scale, (d->k + 2) * FLT_EPSILON * amplification[t] / GATE_TOLERANCE);
        for (j = 0; j < D; j++) worst_out = maxd(worst_out, fabs(out[(size_t)t * ldout + j] - ref_out[(size_t)t * D + j]) / scale);
    }
    for (j = 0; j < S; j++) {
        worst_conf = maxd(worst_conf, fabs(conf[j] - ref_conf[j]));
        if (labels) worst_target = maxd(worst_target, fabs(target[j] - ref_target[j]));
    }
    if (labels)
        for (j = 0; j < 2; j++) worst_loss = maxd(worst_loss, fabs(losses[j] - ref_losses[j]) / maxd(ref_losses[j], 1e-3));
    FM_CHECK(status == FM_OK && worst_out <= GATE_TOLERANCE && worst_conf <= GATE_TOLERANCE &&
                 worst_target <= GATE_TOLERANCE && worst_loss <= GATE_TOLERANCE,
             "gate forward %s: %s, out %.3g conf %.3g target %.3g losses %.3g", name, fm_status_str(status), worst_out,
             worst_conf, worst_target, worst_loss);
    FM_CHECK(fm_test_padding_intact(out, T, D, ldout) && (labels || (all_sentinel(target, S) && losses[0] == SENTINEL)),
             "gate forward %s wrote outside its outputs", name);

    status = fm_confsmoe_backward(d, &params, g->experts, labels, g->x, g->ldx, g->h, g->ldh, g->dout, D,
                                  (float)g->a, (float)g->bcoef, saved, dx, ldout, dh, g->ldh, &grads);
    FM_CHECK(status == FM_OK, "gate backward %s: %s", name, fm_status_str(status));
    /* saved is left fit for another backward, with the same result */
    fm_confsmoe_backward(d, &params, g->experts, labels, g->x, g->ldx, g->h, g->ldh, g->dout, D, (float)g->a,
                         (float)g->bcoef, saved, dx, ldout, dh2, g->ldh, NULL);
    FM_CHECK(memcmp(dh, dh2, ((size_t)(S - 1) * g->ldh + D) * sizeof(float)) == 0,
             "gate %s: a second backward from the same saved state differs", name);
    FM_CHECK(fm_test_padding_intact(dx, T, D, ldout) && fm_test_padding_intact(dh, S, D, g->ldh), "gate backward %s wrote into the padding", name);
    for (which = 0; which < P_COUNT; which++)
        FM_CHECK(gr[which][param_size(g, which)] == SENTINEL, "gate backward %s wrote past d%s", name, param_names[which]);

    /* finite differences of the reference objective, target detached, probe input detached
     * unless probe_trains_experts */
    h_base = dalloc(param_size(g, P_H));
    memcpy(h_base, R.h, param_size(g, P_H) * sizeof(double));
    for (which = 0; which < P_COUNT; which++) {
        const size_t n = param_size(g, which);
        double worst = 0.0, scale = GRADIENT_FLOOR, *p = *ref_param(&R, which);
        size_t tries = n_fd < 0 ? n : (size_t)n_fd, i;
        if (D <= 2 && which <= P_B) { /* see GRADIENT_FLOOR: noise in exact arithmetic's zero */
            const float *got = which == P_X ? dx : which == P_H ? dh : gr[which];
            const size_t extent = which == P_X ? (size_t)(T - 1) * ldout + D : which == P_H ? (size_t)(S - 1) * g->ldh + D : n;
            int finite = 1;
            for (i = 0; i < extent; i++) finite &= isfinite(got[i]) != 0;
            FM_CHECK(finite, "gate gradient d%s %s: not finite", param_names[which], name);
            continue;
        }
        for (i = 0; i < tries && n > 0; i++) {
            const size_t at = n_fd < 0 ? i : (size_t)(fm_test_next() % n);
            const double step = 1e-5, saved_value = p[at];
            double plus, minus, fd, got;
            p[at] = saved_value + step;
            plus = ref_gate(g, &R, d->probe_trains_experts ? NULL : h_base, labels ? ref_target : NULL, NULL, NULL, NULL, NULL, NULL);
            p[at] = saved_value - step;
            minus = ref_gate(g, &R, d->probe_trains_experts ? NULL : h_base, labels ? ref_target : NULL, NULL, NULL, NULL, NULL, NULL);
            p[at] = saved_value;
            fd = (plus - minus) / (2 * step);
            switch (which) {
            case P_X: got = dx[at / D * ldout + at % D]; break;
            case P_H: got = dh[at / D * g->ldh + at % D]; break;
            default: got = gr[which][at];
            }
            worst = maxd(worst, fabs(got - fd));
            scale = maxd(scale, fabs(fd));
        }
        FM_CHECK(worst <= GRADIENT_TOLERANCE * scale, "gate gradient d%s %s: error %.3g at scale %.3g",
                 param_names[which], name, worst, scale);
    }
    free(h_base), ref_free(&R);
    for (which = 0; which < P_COUNT; which++) free(gr[which]);
    free(saved), free(out), free(conf), free(target), free(dx), free(dh), free(dh2), free(ref_out), free(ref_conf);
    free(amplification);
    free(ref_target);
}

/* NaN in one slot's expert output, or in one token's x: what the header promises. */
static void check_gate_policy(int mode, int d) {
    gate_case g;
    fm_confsmoe_params params;
    const int T = 6, k = 2, E = 4;
    size_t saved_n = 0;
    float *saved, *out, conf[12], losses[2];
    int t, s, ok = 1, poisoned_expert, bad_slot = fm_test_int(0, T * k - 1), bad_token = fm_test_int(0, T - 1);
    gate_make(&g, T, k, E, d, 3, mode, 3, 0);
    params = gate_params(&g);
    fm_confsmoe_saved_floats(&g.desc, &saved_n);
    saved = new_filled(saved_n), out = new_filled((size_t)T * d);
    g.h[(size_t)bad_slot * g.ldh + fm_test_int(0, d - 1)] = NAN;
    poisoned_expert = g.experts[bad_slot];
    fm_confsmoe_forward(&g.desc, &params, g.experts, g.labels, g.x, g.ldx, g.h, g.ldh, out, d, conf, NULL, losses, saved);
    for (t = 0; t < T; t++) {
        int expect_nan = t == bad_slot / k;
        for (s = t * k; s < t * k + k; s++) {
            int slot_nan = mode == FM_CONF_EXPERT_MEAN ? g.experts[s] == poisoned_expert : s == bad_slot;
            ok &= slot_nan == (conf[s] != conf[s]);
            expect_nan |= slot_nan;
        }
        ok &= expect_nan ? row_all_nan(out + (size_t)t * d, d) : row_all_finite(out + (size_t)t * d, d);
    }
    FM_CHECK(ok && losses[0] != losses[0] && losses[1] != losses[1],
             "gate mode=%d d=%d: a NaN in slot %d must poison exactly its token (its expert's tokens in expert-mean)",
             mode, d, bad_slot);
    for (s = 0; s < d; s++) g.h[(size_t)bad_slot * g.ldh + s] = randn(1.0);
    g.x[(size_t)bad_token * g.ldx] = NAN;
    fm_confsmoe_forward(&g.desc, &params, g.experts, g.labels, g.x, g.ldx, g.h, g.ldh, out, d, conf, NULL, losses, saved);
    for (ok = 1, t = 0; t < T; t++) ok &= t == bad_token ? row_all_nan(out + (size_t)t * d, d) : row_all_finite(out + (size_t)t * d, d);
    FM_CHECK(ok && row_all_finite(conf, T * k) && isfinite(losses[0]) && isfinite(losses[1]),
             "gate mode=%d d=%d: a NaN in x row %d must make exactly that output row NaN", mode, d, bad_token);
    free(saved), free(out);
    gate_free(&g);
}

static void check_gate_errors(void) {
    gate_case g;
    fm_confsmoe_params params, p;
    fm_confsmoe_desc desc;
    fm_confsmoe_grads grads;
    const int T = 3, k = 2, E = 3, d = 5, C = 4;
    size_t saved_n, n;
    float *saved, *out, *conf, *target, losses[2], *dx, *dh, *gw;
    int32_t bad_experts[6], bad_labels[3];
    gate_make(&g, T, k, E, d, C, 0, 3, 0);
    params = gate_params(&g);
    fm_confsmoe_saved_floats(&g.desc, &saved_n);
    saved = new_filled(saved_n), out = new_filled(T * d), conf = new_filled(T * k), target = new_filled(T * k);
    dx = new_filled(T * d), dh = new_filled(T * k * d), gw = new_filled(E * d);
    losses[0] = losses[1] = SENTINEL;
    memset(&grads, 0, sizeof grads);
    grads.w = gw;
#define UNTOUCHED                                                                                              \
    (all_sentinel(saved, saved_n) && all_sentinel(out, T * d) && all_sentinel(conf, T * k) &&                  \
     all_sentinel(target, T * k) && all_sentinel(losses, 2))
#define FWD(desc_, params_, experts_, labels_, h_, ldh_, out_)                                                 \
    fm_confsmoe_forward(desc_, params_, experts_, labels_, g.x, d, h_, ldh_, out_, d, conf, target, losses, saved)
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(NULL, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, NULL, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, &params, NULL, g.labels, g.h, d, out), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, &params, g.experts, g.labels, NULL, d, out), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, &params, g.experts, g.labels, g.h, d, NULL), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, FWD(&g.desc, &params, g.experts, g.labels, g.h, d - 1, out), UNTOUCHED);
    p = params, p.w = NULL;
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, &p, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    p = params, p.probe_w = NULL;
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, &p, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    p = params, p.probe_b = NULL;
    EXPECT_STATUS(FM_ERR_NULL_POINTER, FWD(&g.desc, &p, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.k = E + 1;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.tokens = 0;
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.classes = -2;
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.dim = 0;
    EXPECT_STATUS(FM_ERR_INVALID_SHAPE, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.tokens = 2147483647, desc.k = 2;
    EXPECT_STATUS(FM_ERR_OVERFLOW, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.eps = -1.0f;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    desc = g.desc, desc.mode = (fm_conf_mode)7;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&desc, &params, g.experts, g.labels, g.h, d, out), UNTOUCHED);
    memcpy(bad_experts, g.experts, sizeof bad_experts);
    bad_experts[5] = E;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&g.desc, &params, bad_experts, g.labels, g.h, d, out), UNTOUCHED);
    bad_experts[5] = -1;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&g.desc, &params, bad_experts, g.labels, g.h, d, out), UNTOUCHED);
    memcpy(bad_labels, g.labels, sizeof bad_labels);
    bad_labels[2] = C;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&g.desc, &params, g.experts, bad_labels, g.h, d, out), UNTOUCHED);
    bad_labels[2] = -1;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, FWD(&g.desc, &params, g.experts, bad_labels, g.h, d, out), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER,
                  fm_confsmoe_forward(&g.desc, &params, g.experts, g.labels, g.x, d, g.h, d, out, d, conf, target, losses, NULL),
                  UNTOUCHED);
    n = 0;
    EXPECT_STATUS(FM_ERR_NULL_POINTER, fm_confsmoe_saved_floats(&g.desc, NULL), 1);
    desc = g.desc, desc.k = E + 1;
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, fm_confsmoe_saved_floats(&desc, &n), n == 0);
    /* labels NULL: the probe parameters are not needed, target and losses not written */
    p = params, p.probe_w = NULL, p.probe_b = NULL;
    EXPECT_STATUS(FM_OK, FWD(&g.desc, &p, g.experts, NULL, g.h, d, out), all_sentinel(target, T * k) && all_sentinel(losses, 2));
    for (n = 0; n < saved_n; n++) saved[n] = SENTINEL;
#undef UNTOUCHED
#define UNTOUCHED (all_sentinel(dx, T * d) && all_sentinel(dh, T * k * d) && all_sentinel(gw, E * d) && all_sentinel(saved, saved_n))
#define BWD(experts_, labels_, dx_, dh_)                                                                       \
    fm_confsmoe_backward(&g.desc, &params, experts_, labels_, g.x, d, g.h, d, g.dout, d, 1.0f, 1.0f, saved,   \
                         dx_, d, dh_, d, &grads)
    EXPECT_STATUS(FM_ERR_NULL_POINTER, BWD(g.experts, g.labels, NULL, dh), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER, BWD(g.experts, g.labels, dx, NULL), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, BWD(bad_experts, g.labels, dx, dh), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_INVALID_ARGUMENT, BWD(g.experts, bad_labels, dx, dh), UNTOUCHED);
    EXPECT_STATUS(FM_ERR_NULL_POINTER,
                  fm_confsmoe_backward(&g.desc, &params, g.experts, g.labels, g.x, d, g.h, d, NULL, d, 1.0f, 1.0f,
                                       saved, dx, d, dh, d, &grads),
                  UNTOUCHED);
#undef UNTOUCHED
#undef FWD
#undef BWD
    free(saved), free(out), free(conf), free(target), free(dx), free(dh), free(gw);
    gate_free(&g);
}

int main(void) {
    static const int widths[] = {1,  2,  3,  4,   5,   7,   8,   9,   15,  16,  17,  31,  32,  33,  47,  63,
                                 64, 65, 100, 127, 128, 129, 255, 256, 257, 300, 511, 512, 513, 777, 1024, 1100};
    static const int row_counts[] = {1, 2, 3, 5, 8, 17, 64, 300};
    fm_isa isas[FM_ISA_COUNT];
    int n_isas, isa, w, rep;
    fm_test_seed("test_confsmoe");
    n_isas = fm_test_isas(isas);
    for (isa = 0; isa < n_isas; isa++) {
        fm_test_use_isa(isas[isa]);
        check_ln_errors();
        check_gate_errors();
        for (w = 0; w < (int)(sizeof widths / sizeof widths[0]); w++) {
            const int cols = widths[w];
            for (rep = 0; rep < 3; rep++) {
                int rows = row_counts[fm_test_int(0, (int)(sizeof row_counts / sizeof row_counts[0]) - 1)];
                const int ld = cols + (rep == 0 ? 0 : fm_test_int(1, 19));
                if (cols >= 500 && rows > 64) rows = 64;
                check_ln_forward(rows, cols, ld, rep == 2, fm_test_int(0, 7));
                check_ln_backward(rows, cols, ld, rep == 2, fm_test_int(0, 7));
            }
            check_ln_policy(cols);
            if (cols <= 65) check_ln_gradient(fm_test_int(1, 4), cols);
            /* the gate at this width: random routings, sampled finite differences */
            for (rep = 0; rep < 2; rep++) {
                gate_case g;
                const int E = fm_test_int(1, 8), k = fm_test_int(1, E < 4 ? E : 4);
                const int T = cols > 300 ? fm_test_int(1, 3) : fm_test_int(1, 12);
                gate_make(&g, T, k, E, cols, fm_test_int(1, 6), rep, fm_test_int(0, 31), rep);
                check_gate(&g, 4);
                gate_free(&g);
            }
            if (cols >= 2 && cols <= 300) check_gate_policy(w % 2, cols);
        }
        /* every entry of every gradient on small cases, both modes, all flag combinations */
        for (rep = 0; rep < 32; rep++) {
            gate_case g;
            const int E = fm_test_int(1, 5), k = fm_test_int(1, E < 3 ? E : 3);
            gate_make(&g, fm_test_int(1, 5), k, E, fm_test_int(1, 9), fm_test_int(1, 4), rep % 2, rep / 2 % 16, rep % 3 == 0);
            check_gate(&g, -1);
            gate_free(&g);
        }
    }
    return fm_test_finish("test_confsmoe");
}
