/* GELU and the expert FFN on every ISA path: GELU (both forms) and its derivative against double
 * precision over a wide range and at NaN, +-Inf and extremes; the FFN forward against a double
 * reference on ragged experts; its backward against central differences of that reference (in
 * double); the backward with and without the saved hidden rows; argument errors. */
#include "fm_test.h"

#include <string.h>

/* GELU in float: a few ulp, plus the exponential's condition. exp(-x^2/2) (erf form) and
 * exp(-2u) (tanh form) turn the float rounding of their argument t into a relative error of
 * about |t| 2^-24 in the result: 4e-6 at x = -12, where GELU is below 1e-31. So 1e-5 relative
 * plus 4 |t| 2^-24, and 1e-7 absolute for the derivative's zero near x = -0.75. */
#define GELU_TOLERANCE 1e-5
#define FFN_TOLERANCE 1e-5

static double gelu_ref(double x, int kind, int derivative) {
    if (kind == FM_GELU_ERF) {
        const double cdf = 0.5 * erfc(-x / sqrt(2.0)), pdf = exp(-0.5 * x * x) / sqrt(2.0 * 3.14159265358979323846);
        return derivative ? cdf + x * pdf : x * cdf;
    } else { /* 0.5 (1 + tanh u) as 1 / (1 + exp(-2u)): no cancellation for u far below 0 */
        const double c = sqrt(2.0 / 3.14159265358979323846), u = c * (x + 0.044715 * x * x * x);
        const double half_one_plus_tanh = 1.0 / (1.0 + exp(-2.0 * u));
        const double one_minus_tanh_squared = 4.0 * half_one_plus_tanh * (1.0 - half_one_plus_tanh);
        return derivative ? half_one_plus_tanh + 0.5 * x * one_minus_tanh_squared * c * (1.0 + 3.0 * 0.044715 * x * x)
                          : x * half_one_plus_tanh;
    }
}

static double exp_argument(double x, int kind) {
    return kind == FM_GELU_ERF ? 0.5 * x * x : 2.0 * sqrt(2.0 / 3.14159265358979323846) * fabs(x + 0.044715 * x * x * x);
}

static int gelu_close(double got, double want, double x, int kind, double absolute) {
    if (isnan(want)) return isnan(got);
    if (isinf(want)) return got == want;
    return fabs(got - want) <= (GELU_TOLERANCE + 4.0 * exp_argument(x, kind) * 0x1p-24) * fabs(want) + absolute;
}

static void test_gelu(int kind) {
    enum { N = 2000 };
    static const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-30f, -1e-30f, 100.0f, -100.0f,
                                    -7.0f, -0.7518f, 3.0f, 1e10f, -1e10f};
    const int nspecial = (int)(sizeof special / sizeof special[0]);
    const int ld = N + 3;
    float *x = fm_test_new_matrix(2, N, ld), *y = fm_test_new_matrix(2, N, ld), *dy = fm_test_new_matrix(2, N, ld);
    float *dx = fm_test_new_matrix(2, N, ld);
    int i, bad = 0, bad_grad = 0;
    for (i = 0; i < 2 * ld - 3; i++) {
        if (i % ld >= N) continue;
        x[i] = i % ld < nspecial ? special[i % ld] : (float)(fm_test_uniform() * 20.0 - 12.0);
        dy[i] = (float)fm_test_normal();
    }
    FM_CHECK(fm_gelu_forward(2, N, (fm_gelu)kind, x, ld, y, ld) == FM_OK, "gelu forward");
    FM_CHECK(fm_gelu_backward(2, N, (fm_gelu)kind, x, ld, dy, ld, dx, ld) == FM_OK, "gelu backward");
    for (i = 0; i < 2 * ld - 3; i++) {
        double want_grad;
        if (i % ld >= N) continue;
        if (fabsf(x[i]) >= 1e10f && kind == FM_GELU_TANH) continue; /* the formula's x^3 overflows float: any Inf/NaN mix */
        if (!gelu_close(y[i], gelu_ref(x[i], kind, 0), x[i], kind, 1e-37)) {
            if (bad < 3) fprintf(stderr, "gelu(%.9g) = %.9g, want %.9g\n", x[i], y[i], gelu_ref(x[i], kind, 0));
            bad++;
        }
        want_grad = gelu_ref(x[i], kind, 1) * dy[i];
        if (!gelu_close(dx[i], want_grad, x[i], kind, 1e-7 * fabs(dy[i]))) {
            if (bad_grad < 3) fprintf(stderr, "gelu'(%g) * %g = %g, want %g\n", x[i], dy[i], dx[i], want_grad);
            bad_grad++;
        }
    }
    FM_CHECK(bad == 0, "gelu %s: %d of %d values off the double reference", kind ? "tanh" : "erf", bad, 2 * N);
    FM_CHECK(bad_grad == 0, "gelu %s backward: %d of %d off", kind ? "tanh" : "erf", bad_grad, 2 * N);
    FM_CHECK(fm_test_padding_intact(y, 2, N, ld) && fm_test_padding_intact(dx, 2, N, ld), "gelu wrote padding");
    FM_CHECK(fm_gelu_forward(2, N, (fm_gelu)kind, x, ld, x, ld) == FM_OK && memcmp(x, y, ((size_t)ld + N) * sizeof(float)) == 0,
             "gelu in place gives the same floats");
    FM_CHECK(fm_gelu_forward(2, N, (fm_gelu)5, x, ld, y, ld) == FM_ERR_INVALID_ARGUMENT, "unknown gelu kind");
    free(x), free(y), free(dy), free(dx);
}

/* ---- the FFN ---- */

typedef struct {
    fm_expert_ffn_desc desc;
    int rows;
    int32_t *offsets;
    double *w1, *b1, *w2, *b2, *x, *g; /* plain parameters (W1: E x D x H, W2: E x H x D), input, dL/dy */
} ffn_problem;

static ffn_problem new_ffn(int experts, int dim, int hidden, int kind) {
    ffn_problem p;
    int e;
    size_t i;
    memset(&p, 0, sizeof p);
    p.desc.experts = experts, p.desc.dim = dim, p.desc.hidden = hidden, p.desc.gelu = (fm_gelu)kind;
    p.offsets = (int32_t *)malloc((size_t)(experts + 1) * sizeof(int32_t));
    p.offsets[0] = 0;
    for (e = 0; e < experts; e++) p.offsets[e + 1] = p.offsets[e] + (fm_test_int(0, 3) == 0 ? 0 : fm_test_int(1, 9));
    if (p.offsets[experts] == 0) p.offsets[experts] = 1;
    p.rows = p.offsets[experts];
    p.w1 = (double *)malloc((size_t)experts * dim * hidden * sizeof(double));
    p.w2 = (double *)malloc((size_t)experts * dim * hidden * sizeof(double));
    p.b1 = (double *)malloc((size_t)experts * hidden * sizeof(double));
    p.b2 = (double *)malloc((size_t)experts * dim * sizeof(double));
    p.x = (double *)malloc((size_t)p.rows * dim * sizeof(double));
    p.g = (double *)malloc((size_t)p.rows * dim * sizeof(double));
    /* parameters rounded to float so the float and double paths see the same numbers */
    for (i = 0; i < (size_t)experts * dim * hidden; i++) p.w1[i] = (float)(fm_test_normal() / sqrt((double)dim));
    for (i = 0; i < (size_t)experts * dim * hidden; i++) p.w2[i] = (float)(fm_test_normal() / sqrt((double)hidden));
    for (i = 0; i < (size_t)experts * hidden; i++) p.b1[i] = (float)(0.5 * fm_test_normal());
    for (i = 0; i < (size_t)experts * dim; i++) p.b2[i] = (float)(0.5 * fm_test_normal());
    for (i = 0; i < (size_t)p.rows * dim; i++) p.x[i] = (float)fm_test_normal(), p.g[i] = (float)fm_test_normal();
    return p;
}

static void free_ffn(ffn_problem *p) { free(p->offsets), free(p->w1), free(p->w2), free(p->b1), free(p->b2), free(p->x), free(p->g); }

static int expert_of(const ffn_problem *p, int r) {
    int e = 0;
    while (p->offsets[e + 1] <= r) e++;
    return e;
}

/* y (rows x D) in double, and the sum of |terms| of each output for the tolerance. */
static double reference_forward(const ffn_problem *p, double *y, double *magnitude) {
    const int D = p->desc.dim, H = p->desc.hidden;
    double loss = 0.0;
    double *h = (double *)malloc((size_t)H * sizeof(double)), *hmag = (double *)malloc((size_t)H * sizeof(double));
    int r, j, k;
    for (r = 0; r < p->rows; r++) {
        const int e = expert_of(p, r);
        for (j = 0; j < H; j++) {
            double a = p->b1[(size_t)e * H + j], m = fabs(a);
            for (k = 0; k < D; k++) {
                const double t = p->x[(size_t)r * D + k] * p->w1[((size_t)e * D + k) * H + j];
                a += t, m += fabs(t);
            }
            h[j] = gelu_ref(a, p->desc.gelu, 0);
            hmag[j] = m * 1.2 + 1e-30; /* |GELU'| <= 1.13 */
        }
        for (k = 0; k < D; k++) {
            double out = p->b2[(size_t)e * D + k], m = fabs(out);
            for (j = 0; j < H; j++) {
                const double w = p->w2[((size_t)e * H + j) * D + k];
                out += h[j] * w, m += (fabs(h[j]) + hmag[j] * 1e-6) * fabs(w);
            }
            if (y) y[(size_t)r * D + k] = out;
            if (magnitude) magnitude[(size_t)r * D + k] = m;
            loss += p->g[(size_t)r * D + k] * out;
        }
    }
    free(h), free(hmag);
    return loss;
}

typedef struct {
    float *w1, *w2, *b1, *b2, *x, *y, *hidden, *pre, *dy, *dx, *d_hidden;
    float *gw1, *gw2, *gb1, *gb2;
} ffn_buffers;

static ffn_buffers float_buffers(const ffn_problem *p) {
    const int E = p->desc.experts, D = p->desc.dim, H = p->desc.hidden;
    const size_t pw = fm_packed_weight_floats(D, H), pw2 = fm_packed_weight_floats(H, D);
    float *plain = (float *)calloc((size_t)E * D * H, sizeof(float));
    ffn_buffers b;
    size_t i;
    b.w1 = (float *)malloc(E * pw * sizeof(float)), b.w2 = (float *)malloc(E * pw2 * sizeof(float));
    b.gw1 = (float *)malloc(E * pw * sizeof(float)), b.gw2 = (float *)malloc(E * pw2 * sizeof(float));
    b.b1 = (float *)malloc((size_t)E * H * sizeof(float)), b.b2 = (float *)malloc((size_t)E * D * sizeof(float));
    b.gb1 = (float *)malloc((size_t)E * H * sizeof(float)), b.gb2 = (float *)malloc((size_t)E * D * sizeof(float));
    b.x = (float *)malloc((size_t)p->rows * D * sizeof(float)), b.y = (float *)malloc((size_t)p->rows * D * sizeof(float));
    b.dy = (float *)malloc((size_t)p->rows * D * sizeof(float)), b.dx = (float *)malloc((size_t)p->rows * D * sizeof(float));
    b.hidden = (float *)malloc((size_t)p->rows * H * sizeof(float)), b.pre = (float *)malloc((size_t)p->rows * H * sizeof(float));
    b.d_hidden = (float *)malloc((size_t)p->rows * H * sizeof(float));
    for (i = 0; i < (size_t)E * D * H; i++) plain[i] = (float)p->w1[i];
    fm_pack_weights(E, D, H, FM_WEIGHTS_IN_BY_OUT, plain, H, b.w1);
    for (i = 0; i < (size_t)E * D * H; i++) plain[i] = (float)p->w2[i];
    fm_pack_weights(E, H, D, FM_WEIGHTS_IN_BY_OUT, plain, D, b.w2);
    for (i = 0; i < (size_t)E * H; i++) b.b1[i] = (float)p->b1[i];
    for (i = 0; i < (size_t)E * D; i++) b.b2[i] = (float)p->b2[i];
    for (i = 0; i < (size_t)p->rows * D; i++) b.x[i] = (float)p->x[i], b.dy[i] = (float)p->g[i];
    free(plain);
    return b;
}

static void free_buffers(ffn_buffers *b) {
    free(b->w1), free(b->w2), free(b->b1), free(b->b2), free(b->x), free(b->y), free(b->hidden), free(b->pre);
    free(b->dy), free(b->dx), free(b->d_hidden), free(b->gw1), free(b->gw2), free(b->gb1), free(b->gb2);
}

static void test_ffn(int experts, int dim, int hidden, int kind) {
    ffn_problem p = new_ffn(experts, dim, hidden, kind);
    ffn_buffers b = float_buffers(&p);
    const int D = dim, H = hidden;
    const fm_expert_ffn_params params = {b.w1, b.b1, b.w2, b.b2};
    const fm_expert_ffn_grads grads = {b.gw1, b.gb1, b.gw2, b.gb2};
    double *y = (double *)malloc((size_t)p.rows * D * sizeof(double)), *mag = (double *)malloc((size_t)p.rows * D * sizeof(double));
    int i, bad = 0, trial, bad_fd = 0;
    double worst_fd = 0.0;
    reference_forward(&p, y, mag);
    FM_CHECK(fm_expert_ffn_forward(&p.desc, p.offsets, &params, b.x, D, b.y, D, b.hidden, H, b.pre, H) == FM_OK, "ffn forward");
    for (i = 0; i < p.rows * D; i++) bad += fabs(b.y[i] - y[i]) > FFN_TOLERANCE * mag[i];
    FM_CHECK(bad == 0, "ffn forward (%s, E %d, D %d, H %d): %d of %d outputs off the double reference",
             kind ? "tanh" : "erf", experts, dim, hidden, bad, p.rows * D);
    {
        float *y2 = (float *)malloc((size_t)p.rows * D * sizeof(float));
        int same_hidden = 1;
        FM_CHECK(fm_expert_ffn_forward(&p.desc, p.offsets, &params, b.x, D, y2, D, b.d_hidden, H, NULL, 0) == FM_OK &&
                     memcmp(y2, b.y, (size_t)p.rows * D * sizeof(float)) == 0,
                 "ffn forward without pre gives the same floats");
        for (i = 0; i < p.rows * H; i++) same_hidden &= b.d_hidden[i] == b.hidden[i];
        FM_CHECK(same_hidden, "ffn hidden rows the same with and without pre");
        free(y2);
    }
    FM_CHECK(fm_expert_ffn_backward(&p.desc, p.offsets, &params, b.x, D, b.pre, H, b.hidden, H, b.dy, D, b.dx, D, &grads,
                                    b.d_hidden, H) == FM_OK,
             "ffn backward");
    { /* without the saved hidden rows: recomputed, the same floats */
        float *dx2 = (float *)malloc((size_t)p.rows * D * sizeof(float));
        float *gw2 = (float *)malloc((size_t)experts * fm_packed_weight_floats(H, D) * sizeof(float));
        const fm_expert_ffn_grads only_w2 = {NULL, NULL, gw2, NULL};
        FM_CHECK(fm_expert_ffn_backward(&p.desc, p.offsets, &params, b.x, D, b.pre, H, NULL, 0, b.dy, D, dx2, D, &only_w2,
                                        b.d_hidden, H) == FM_OK &&
                     memcmp(dx2, b.dx, (size_t)p.rows * D * sizeof(float)) == 0 &&
                     memcmp(gw2, b.gw2, (size_t)experts * fm_packed_weight_floats(H, D) * sizeof(float)) == 0,
                 "ffn backward without hidden gives the same floats");
        free(dx2), free(gw2);
    }
    /* central differences of the double reference, against the float gradients */
    for (trial = 0; trial < 40; trial++) {
        const int which = trial % 5;
        double *param, analytic, saved, plus, minus, numeric;
        const double step = 1e-4;
        if (which == 0) {
            const int r = fm_test_int(0, p.rows - 1), k = fm_test_int(0, D - 1);
            param = p.x + (size_t)r * D + k, analytic = b.dx[(size_t)r * D + k];
        } else if (which == 1 || which == 3) {
            const int e = fm_test_int(0, experts - 1), in = which == 1 ? D : H, out = which == 1 ? H : D;
            const int k = fm_test_int(0, in - 1), j = fm_test_int(0, out - 1);
            const size_t packed = e * fm_packed_weight_floats(in, out) + (size_t)(j / 64) * in * 64 + (size_t)k * 64 + j % 64;
            param = (which == 1 ? p.w1 : p.w2) + ((size_t)e * in + k) * out + j;
            analytic = (which == 1 ? b.gw1 : b.gw2)[packed];
        } else if (which == 2) {
            const int at = fm_test_int(0, experts * H - 1);
            param = p.b1 + at, analytic = b.gb1[at];
        } else {
            const int at = fm_test_int(0, experts * D - 1);
            param = p.b2 + at, analytic = b.gb2[at];
        }
        saved = *param;
        *param = saved + step, plus = reference_forward(&p, NULL, NULL);
        *param = saved - step, minus = reference_forward(&p, NULL, NULL);
        *param = saved;
        numeric = (plus - minus) / (2.0 * step);
        worst_fd = fmax(worst_fd, fabs(numeric - analytic) / (1e-3 + fabs(numeric)));
        bad_fd += fabs(numeric - analytic) > 1e-3 * (1e-2 + fabs(numeric));
    }
    FM_CHECK(bad_fd == 0, "ffn backward (%s): %d of 40 gradients off the finite differences (worst %.3g)",
             kind ? "tanh" : "erf", bad_fd, worst_fd);
    free(y), free(mag);
    free_buffers(&b);
    free_ffn(&p);
}

static void test_ffn_errors(void) {
    fm_expert_ffn_desc desc = {2, 4, 8, FM_GELU_ERF};
    int32_t offsets[3] = {0, 1, 2};
    float w1[64 * 4], w2[64 * 8], x[8], y[8], h[16];
    fm_expert_ffn_params params = {w1, NULL, w2, NULL};
    int i;
    for (i = 0; i < 8; i++) y[i] = FM_TEST_SENTINEL, x[i] = 1.0f;
    FM_CHECK(fm_expert_ffn_forward(NULL, offsets, &params, x, 4, y, 4, h, 8, NULL, 0) == FM_ERR_NULL_POINTER, "NULL desc");
    desc.gelu = (fm_gelu)3;
    FM_CHECK(fm_expert_ffn_forward(&desc, offsets, &params, x, 4, y, 4, h, 8, NULL, 0) == FM_ERR_INVALID_ARGUMENT, "bad gelu");
    desc.gelu = FM_GELU_TANH;
    params.w2 = NULL;
    FM_CHECK(fm_expert_ffn_forward(&desc, offsets, &params, x, 4, y, 4, h, 8, NULL, 0) == FM_ERR_NULL_POINTER, "NULL w2");
    params.w2 = w2;
    FM_CHECK(fm_expert_ffn_forward(&desc, offsets, &params, x, 4, y, 4, NULL, 8, NULL, 0) == FM_ERR_NULL_POINTER, "NULL hidden");
    FM_CHECK(fm_expert_ffn_forward(&desc, offsets, &params, x, 4, y, 4, h, 7, NULL, 0) == FM_ERR_INVALID_SHAPE, "ldh < hidden");
    for (i = 0; i < 8; i++) FM_CHECK(y[i] == FM_TEST_SENTINEL, "a failed call wrote y[%d]", i);
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i, kind;
    fm_test_seed("test_ffn");
    n = fm_test_isas(isas);
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        for (kind = 0; kind < 2; kind++) {
            test_gelu(kind);
            test_ffn(3, 16, 32, kind);
            test_ffn(2, 7, 70, kind);
            test_ffn(fm_test_int(1, 4), fm_test_int(1, 40), fm_test_int(1, 140), kind);
        }
        test_ffn_errors();
    }
    return fm_test_finish("test_ffn");
}
