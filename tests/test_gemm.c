/* The grouped expert GEMM on every ISA path: the packed layout against its documented formula,
 * the forward and every gradient against double-precision references on ragged groups (empty
 * experts, one row, row and depth blocks crossed, panel tails), NaN and Inf propagation, a
 * finite-difference check of the backward against the forward, padding left untouched, and
 * argument errors that write nothing. */
#include "fm_test.h"

#include <string.h>

/* A float dot product of n terms is within about n * 2^-24 of the sum of |terms| (blocked and
 * tree-summed paths do better); 1e-5 of that sum covers n up to 160 with room, and the shapes
 * here stay below 300, where the measured error is far smaller (see the report on failure). */
#define GEMM_TOLERANCE 1e-5

typedef struct {
    int experts, in, out, rows, first; /* rows of all experts; x starts at row `first` */
    int32_t *offsets;
    int ldx, ldy, lddx;
    float *x, *w, *bias, *packed, *y, *dy;
} problem;

static void random_fill(float *v, size_t n, double scale) {
    size_t i;
    for (i = 0; i < n; i++) v[i] = (float)(scale * fm_test_normal());
}

/* Ragged rows per expert: empty experts, single rows, and now and then one past the row block. */
static problem new_problem(int experts, int in, int out, int big) {
    problem p;
    int e;
    memset(&p, 0, sizeof p);
    p.experts = experts, p.in = in, p.out = out;
    p.first = fm_test_int(0, 3);
    p.offsets = (int32_t *)malloc((size_t)(experts + 1) * sizeof(int32_t));
    p.offsets[0] = p.first;
    for (e = 0; e < experts; e++) {
        int count = fm_test_int(0, 4) == 0 ? 0 : fm_test_int(1, 20);
        if (big && e == experts - 1) count = fm_test_int(257, 300);
        p.offsets[e + 1] = p.offsets[e] + count;
    }
    if (p.offsets[experts] == p.first) p.offsets[experts]++; /* at least one row in all */
    p.rows = p.offsets[experts];
    p.ldx = in + fm_test_int(0, 3);
    p.ldy = out + fm_test_int(0, 3);
    p.lddx = in + fm_test_int(0, 2);
    p.x = fm_test_new_matrix(p.rows, in, p.ldx);
    p.y = fm_test_new_matrix(p.rows, out, p.ldy);
    p.dy = fm_test_new_matrix(p.rows, out, p.ldy);
    {
        int r;
        for (r = 0; r < p.rows; r++) {
            random_fill(p.x + (size_t)r * p.ldx, (size_t)in, 1.0);
            random_fill(p.dy + (size_t)r * p.ldy, (size_t)out, 1.0);
        }
    }
    p.w = (float *)malloc((size_t)experts * in * out * sizeof(float));
    random_fill(p.w, (size_t)experts * in * out, 1.0 / sqrt((double)in));
    p.bias = (float *)malloc((size_t)experts * out * sizeof(float));
    random_fill(p.bias, (size_t)experts * out, 1.0);
    p.packed = (float *)malloc((size_t)experts * fm_packed_weight_floats(in, out) * sizeof(float));
    FM_CHECK(fm_pack_weights(experts, in, out, FM_WEIGHTS_IN_BY_OUT, p.w, out, p.packed) == FM_OK, "pack");
    return p;
}

static void free_problem(problem *p) {
    free(p->offsets), free(p->x), free(p->w), free(p->bias), free(p->packed), free(p->y), free(p->dy);
}

static int expert_of_row(const problem *p, int r) {
    int e = 0;
    while (p->offsets[e + 1] <= r) e++;
    return e;
}

/* |got - want| within the tolerance of the sum of |terms|; NaN and Inf must match exactly. */
static int close_to(double got, double want, double magnitude) {
    if (isnan(want)) return isnan(got);
    if (isinf(want)) return got == want;
    return fabs(got - want) <= GEMM_TOLERANCE * magnitude + 1e-30;
}

static void check_forward(const problem *p, int with_bias, const char *what) {
    int r, j, k, bad = 0;
    double worst = 0.0;
    for (r = p->first; r < p->rows; r++) {
        const int e = expert_of_row(p, r);
        for (j = 0; j < p->out; j++) {
            double want = with_bias ? p->bias[(size_t)e * p->out + j] : 0.0, magnitude = fabs(want);
            const double got = p->y[(size_t)r * p->ldy + j];
            for (k = 0; k < p->in; k++) {
                const double term = (double)p->x[(size_t)r * p->ldx + k] * p->w[((size_t)e * p->in + k) * p->out + j];
                want += term, magnitude += fabs(term);
            }
            if (!close_to(got, want, magnitude)) bad++;
            else if (magnitude > 0 && isfinite(want)) worst = fmax(worst, fabs(got - want) / magnitude);
        }
    }
    FM_CHECK(bad == 0, "%s: %d of %d outputs off the double reference (E %d, in %d, out %d, rows %d)", what, bad,
             (p->rows - p->first) * p->out, p->experts, p->in, p->out, p->rows);
    FM_CHECK(worst <= GEMM_TOLERANCE, "%s: worst error %.3g of the sum of |terms|", what, worst);
}

static void test_packing(void) {
    const int experts = 3, in = fm_test_int(1, 70), out = fm_test_int(1, 150);
    const size_t per_expert = fm_packed_weight_floats(in, out);
    float *w = (float *)malloc((size_t)experts * in * out * sizeof(float));
    float *wt = (float *)malloc((size_t)experts * in * out * sizeof(float));
    float *packed = (float *)malloc((size_t)experts * per_expert * sizeof(float));
    float *from_t = (float *)malloc((size_t)experts * per_expert * sizeof(float));
    float *back = (float *)malloc((size_t)experts * in * out * sizeof(float));
    int e, k, j, bad = 0, padding = 0;
    FM_CHECK(per_expert == (size_t)((out + 63) / 64) * 64 * in, "packed size %zu for %d x %d", per_expert, in, out);
    random_fill(w, (size_t)experts * in * out, 1.0);
    for (e = 0; e < experts; e++)
        for (k = 0; k < in; k++)
            for (j = 0; j < out; j++) wt[((size_t)e * out + j) * in + k] = w[((size_t)e * in + k) * out + j];
    memset(packed, 0xFF, (size_t)experts * per_expert * sizeof(float)); /* NaN: every float must be written */
    FM_CHECK(fm_pack_weights(experts, in, out, FM_WEIGHTS_IN_BY_OUT, w, out, packed) == FM_OK, "pack");
    FM_CHECK(fm_pack_weights(experts, in, out, FM_WEIGHTS_OUT_BY_IN, wt, in, from_t) == FM_OK, "pack transposed");
    for (e = 0; e < experts; e++)
        for (k = 0; k < in; k++)
            for (j = 0; j < (out + 63) / 64 * 64; j++) {
                const float got = packed[e * per_expert + (size_t)(j / 64) * in * 64 + (size_t)k * 64 + j % 64];
                if (j < out) bad += got != w[((size_t)e * in + k) * out + j];
                else padding += got != 0.0f;
            }
    FM_CHECK(bad == 0 && padding == 0, "packed layout: %d elements misplaced, %d padding floats not zero", bad, padding);
    FM_CHECK(memcmp(packed, from_t, (size_t)experts * per_expert * sizeof(float)) == 0,
             "both plain layouts pack to the same floats");
    FM_CHECK(fm_unpack_weights(experts, in, out, FM_WEIGHTS_IN_BY_OUT, packed, back, out) == FM_OK &&
                 memcmp(back, w, (size_t)experts * in * out * sizeof(float)) == 0,
             "unpack inverts pack");
    FM_CHECK(fm_unpack_weights(experts, in, out, FM_WEIGHTS_OUT_BY_IN, packed, back, in) == FM_OK &&
                 memcmp(back, wt, (size_t)experts * in * out * sizeof(float)) == 0,
             "unpack to PyTorch's layout");
    free(w), free(wt), free(packed), free(from_t), free(back);
}

static void test_forward(int experts, int in, int out, int big) {
    problem p = new_problem(experts, in, out, big);
    int with_bias;
    for (with_bias = 0; with_bias < 2; with_bias++) {
        FM_CHECK(fm_grouped_gemm_forward(p.experts, p.offsets, in, out, p.x, p.ldx, p.packed, with_bias ? p.bias : NULL,
                                         p.y, p.ldy) == FM_OK,
                 "forward");
        check_forward(&p, with_bias, with_bias ? "forward with bias" : "forward");
        FM_CHECK(fm_test_padding_intact(p.y, p.rows, out, p.ldy), "forward wrote into y's padding");
        {
            int r, j, untouched = 1;
            for (r = 0; r < p.first; r++)
                for (j = 0; j < out; j++) untouched &= p.y[(size_t)r * p.ldy + j] == FM_TEST_SENTINEL;
            FM_CHECK(untouched, "forward wrote rows before offsets[0]");
        }
    }
    free_problem(&p);
}

/* NaN and Inf in x reach exactly the outputs the double reference says they reach. */
static void test_special_values(void) {
    problem p = new_problem(3, fm_test_int(1, 80), fm_test_int(1, 140), 0);
    const int r_nan = fm_test_int(p.first, p.rows - 1), r_inf = fm_test_int(p.first, p.rows - 1);
    p.x[(size_t)r_nan * p.ldx + fm_test_int(0, p.in - 1)] = NAN;
    p.x[(size_t)r_inf * p.ldx + fm_test_int(0, p.in - 1)] = INFINITY;
    p.x[(size_t)r_inf * p.ldx + fm_test_int(0, p.in - 1)] = -1e30f;
    FM_CHECK(fm_grouped_gemm_forward(p.experts, p.offsets, p.in, p.out, p.x, p.ldx, p.packed, p.bias, p.y, p.ldy) == FM_OK,
             "forward with NaN and Inf");
    check_forward(&p, 1, "forward with NaN, Inf and huge inputs");
    free_problem(&p);
}

static void test_backward(int experts, int in, int out, int big) {
    problem p = new_problem(experts, in, out, big);
    const size_t per_expert = fm_packed_weight_floats(in, out);
    float *dx = fm_test_new_matrix(p.rows, in, p.lddx);
    float *dw = (float *)malloc((size_t)experts * per_expert * sizeof(float));
    float *dw_plain = (float *)malloc((size_t)experts * in * out * sizeof(float));
    float *db = (float *)malloc((size_t)experts * out * sizeof(float));
    int r, k, j, e, bad_dx = 0, bad_dw = 0, bad_db = 0, padding = 0;
    memset(dw, 0xFF, (size_t)experts * per_expert * sizeof(float));
    memset(db, 0xFF, (size_t)experts * out * sizeof(float));
    FM_CHECK(fm_grouped_gemm_backward(experts, p.offsets, in, out, p.x, p.ldx, p.packed, p.dy, p.ldy, dx, p.lddx, dw, db) ==
                 FM_OK,
             "backward");
    for (r = p.first; r < p.rows; r++) {
        e = expert_of_row(&p, r);
        for (k = 0; k < in; k++) {
            double want = 0.0, magnitude = 0.0;
            for (j = 0; j < out; j++) {
                const double term = (double)p.dy[(size_t)r * p.ldy + j] * p.w[((size_t)e * in + k) * out + j];
                want += term, magnitude += fabs(term);
            }
            bad_dx += !close_to(dx[(size_t)r * p.lddx + k], want, magnitude);
        }
    }
    FM_CHECK(fm_unpack_weights(experts, in, out, FM_WEIGHTS_IN_BY_OUT, dw, dw_plain, out) == FM_OK, "unpack dW");
    for (e = 0; e < experts; e++) {
        for (k = 0; k < in; k++)
            for (j = 0; j < out; j++) {
                double want = 0.0, magnitude = 0.0;
                for (r = p.offsets[e]; r < p.offsets[e + 1]; r++) {
                    const double term = (double)p.x[(size_t)r * p.ldx + k] * p.dy[(size_t)r * p.ldy + j];
                    want += term, magnitude += fabs(term);
                }
                bad_dw += !close_to(dw_plain[((size_t)e * in + k) * out + j], want, magnitude);
            }
        for (j = 0; j < out; j++) {
            double want = 0.0, magnitude = 0.0;
            for (r = p.offsets[e]; r < p.offsets[e + 1]; r++) want += p.dy[(size_t)r * p.ldy + j], magnitude += fabs(p.dy[(size_t)r * p.ldy + j]);
            bad_db += !close_to(db[(size_t)e * out + j], want, magnitude);
        }
        for (k = 0; k < in; k++)
            for (j = out; j < (out + 63) / 64 * 64; j++)
                padding += dw[e * per_expert + (size_t)(j / 64) * in * 64 + (size_t)k * 64 + j % 64] != 0.0f;
    }
    FM_CHECK(bad_dx == 0, "dx: %d of %d off the double reference (E %d, in %d, out %d)", bad_dx, (p.rows - p.first) * in,
             experts, in, out);
    FM_CHECK(bad_dw == 0, "dW: %d of %d off the double reference (E %d, in %d, out %d)", bad_dw, experts * in * out,
             experts, in, out);
    FM_CHECK(bad_db == 0, "d_bias: %d of %d off the double reference", bad_db, experts * out);
    FM_CHECK(padding == 0, "dW: %d padding floats not zero", padding);
    FM_CHECK(fm_test_padding_intact(dx, p.rows, in, p.lddx), "backward wrote into dx's padding");

    { /* each output alone gives the same floats */
        float *dx2 = fm_test_new_matrix(p.rows, in, p.lddx);
        float *db2 = (float *)malloc((size_t)experts * out * sizeof(float));
        FM_CHECK(fm_grouped_gemm_backward(experts, p.offsets, in, out, p.x, p.ldx, p.packed, p.dy, p.ldy, dx2, p.lddx, NULL,
                                          NULL) == FM_OK &&
                     memcmp(dx2 + (size_t)p.first * p.lddx, dx + (size_t)p.first * p.lddx,
                            ((size_t)(p.rows - p.first - 1) * p.lddx + in) * sizeof(float)) == 0,
                 "dx alone");
        FM_CHECK(fm_grouped_gemm_backward(experts, p.offsets, in, out, NULL, 0, NULL, p.dy, p.ldy, NULL, 0, NULL, db2) ==
                         FM_OK &&
                     memcmp(db2, db, (size_t)experts * out * sizeof(float)) == 0,
                 "d_bias alone (x and the weights unused)");
        free(dx2), free(db2);
    }
    free(dx), free(dw), free(dw_plain), free(db);
    free_problem(&p);
}

/* L = sum g * y; the backward with dy = g against central differences of L through the forward.
 * y is linear in each parameter, so a large step has no truncation error and keeps the float
 * rounding of L small against the step. */
static double loss(problem *p) {
    double sum = 0.0;
    int r, j;
    fm_grouped_gemm_forward(p->experts, p->offsets, p->in, p->out, p->x, p->ldx, p->packed, p->bias, p->y, p->ldy);
    for (r = p->first; r < p->rows; r++)
        for (j = 0; j < p->out; j++) sum += (double)p->dy[(size_t)r * p->ldy + j] * p->y[(size_t)r * p->ldy + j];
    return sum;
}

static void test_finite_differences(void) {
    problem p = new_problem(2, fm_test_int(1, 40), fm_test_int(1, 90), 0);
    const size_t per_expert = fm_packed_weight_floats(p.in, p.out);
    const float step = 0.25f;
    float *dx = fm_test_new_matrix(p.rows, p.in, p.lddx);
    float *dw = (float *)malloc((size_t)p.experts * per_expert * sizeof(float));
    float *db = (float *)malloc((size_t)p.experts * p.out * sizeof(float));
    int trial, bad = 0;
    double worst = 0.0;
    FM_CHECK(fm_grouped_gemm_backward(p.experts, p.offsets, p.in, p.out, p.x, p.ldx, p.packed, p.dy, p.ldy, dx, p.lddx, dw,
                                      db) == FM_OK,
             "backward for finite differences");
    for (trial = 0; trial < 30; trial++) {
        float *param, analytic;
        double plus, minus, numeric;
        const int kind = trial % 3;
        if (kind == 0) { /* x */
            const int r = fm_test_int(p.first, p.rows - 1), k = fm_test_int(0, p.in - 1);
            param = p.x + (size_t)r * p.ldx + k, analytic = dx[(size_t)r * p.lddx + k];
        } else if (kind == 1) { /* a packed weight (padding excluded) */
            const int e = fm_test_int(0, p.experts - 1), k = fm_test_int(0, p.in - 1), j = fm_test_int(0, p.out - 1);
            const size_t at = e * per_expert + (size_t)(j / 64) * p.in * 64 + (size_t)k * 64 + j % 64;
            param = p.packed + at, analytic = dw[at];
        } else {
            const size_t at = (size_t)fm_test_int(0, p.experts * p.out - 1);
            param = p.bias + at, analytic = db[at];
        }
        {
            const float saved = *param;
            *param = saved + step, plus = loss(&p);
            *param = saved - step, minus = loss(&p);
            *param = saved;
        }
        numeric = (plus - minus) / (2.0 * step);
        worst = fmax(worst, fabs(numeric - analytic) / (1.0 + fabs(numeric)));
        bad += fabs(numeric - analytic) > 1e-3 * (1.0 + fabs(numeric));
    }
    FM_CHECK(bad == 0, "finite differences: %d of 30 gradients off (worst %.3g relative)", bad, worst);
    free(dx), free(dw), free(db);
    free_problem(&p);
}

static void test_errors(void) {
    int32_t offsets[3] = {0, 2, 3}, backwards[3] = {0, 3, 2}, negative[3] = {-1, 1, 2};
    float x[3 * 4], packed[64 * 4], y[3 * 5], w[4 * 5];
    int i;
    for (i = 0; i < 15; i++) y[i] = FM_TEST_SENTINEL;
    for (i = 0; i < 12; i++) x[i] = 1.0f;
    for (i = 0; i < 20; i++) w[i] = 1.0f;
    FM_CHECK(fm_pack_weights(1, 4, 5, FM_WEIGHTS_IN_BY_OUT, w, 5, packed) == FM_OK, "small pack");
    FM_CHECK(fm_grouped_gemm_forward(0, offsets, 4, 5, x, 4, packed, NULL, y, 5) == FM_ERR_INVALID_SHAPE, "no experts");
    FM_CHECK(fm_grouped_gemm_forward(2, NULL, 4, 5, x, 4, packed, NULL, y, 5) == FM_ERR_NULL_POINTER, "NULL offsets");
    FM_CHECK(fm_grouped_gemm_forward(2, backwards, 4, 5, x, 4, packed, NULL, y, 5) == FM_ERR_INVALID_ARGUMENT,
             "decreasing offsets");
    FM_CHECK(fm_grouped_gemm_forward(2, negative, 4, 5, x, 4, packed, NULL, y, 5) == FM_ERR_INVALID_ARGUMENT,
             "negative offset");
    FM_CHECK(fm_grouped_gemm_forward(2, offsets, 4, 5, x, 3, packed, NULL, y, 5) == FM_ERR_INVALID_SHAPE, "ldx < in");
    FM_CHECK(fm_grouped_gemm_forward(2, offsets, 4, 5, x, 4, NULL, NULL, y, 5) == FM_ERR_NULL_POINTER, "NULL weights");
    FM_CHECK(fm_grouped_gemm_forward(2, offsets, 0, 5, x, 4, packed, NULL, y, 5) == FM_ERR_INVALID_SHAPE, "in = 0");
    FM_CHECK(fm_grouped_gemm_backward(2, offsets, 4, 5, x, 4, packed, NULL, 5, y, 4, NULL, NULL) == FM_ERR_NULL_POINTER,
             "NULL dy");
    FM_CHECK(fm_pack_weights(1, 4, 5, (fm_weight_layout)7, w, 5, packed) == FM_ERR_INVALID_ARGUMENT, "unknown layout");
    FM_CHECK(fm_pack_weights(1, 4, 5, FM_WEIGHTS_OUT_BY_IN, w, 3, packed) == FM_ERR_INVALID_SHAPE, "ldw < in");
    for (i = 0; i < 15; i++) FM_CHECK(y[i] == FM_TEST_SENTINEL, "a failed call wrote y[%d]", i);
    FM_CHECK(fm_packed_weight_floats(0, 5) == 0, "packed size of a bad shape");
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i, trial;
    fm_test_seed("test_gemm");
    n = fm_test_isas(isas);
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        test_packing();
        /* the Flex-MoE shapes, vector and panel edges, depth past the block, and random ones */
        test_forward(16, 128, 256, 0);
        test_forward(4, 1, 1, 0);
        test_forward(3, 129, 64, 1);
        test_forward(2, 17, 65, 0);
        for (trial = 0; trial < 12; trial++)
            test_forward(fm_test_int(1, 6), fm_test_int(1, 150), fm_test_int(1, 200), trial % 4 == 0);
        test_special_values();
        test_backward(16, 128, 256, 0);
        test_backward(3, 1, 1, 0);
        test_backward(2, 130, 70, 1);
        for (trial = 0; trial < 8; trial++)
            test_backward(fm_test_int(1, 5), fm_test_int(1, 140), fm_test_int(1, 150), trial % 4 == 0);
        test_finite_differences();
        test_errors();
    }
    return fm_test_finish("test_gemm");
}
