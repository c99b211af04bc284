/* Routing plans, dispatch and combine on every ISA path: plans against a reference that sorts
 * (expert, assignment) pairs and applies the capacity by position or by gate; dispatch against
 * exact copies; combine and the backward passes against double-precision references, with
 * finite-difference checks in double; outputs large enough to be streamed; argument errors that
 * write nothing. */
#include "fm_test.h"

#include <string.h>

/* Combine sums k products in float: a few ulp of the sum of |terms|. */
#define COMBINE_TOLERANCE 1e-6
#define GRADIENT_TOLERANCE 1e-5

typedef struct {
    int expert, assignment;
    float gate;
} entry;

static int by_expert(const void *a, const void *b) {
    const entry *p = (const entry *)a, *q = (const entry *)b;
    return p->expert != q->expert ? p->expert - q->expert : p->assignment - q->assignment;
}

static int by_gate(const void *a, const void *b) {
    const entry *p = (const entry *)a, *q = (const entry *)b;
    if (p->gate != q->gate) return p->gate > q->gate ? -1 : 1;
    return p->assignment - q->assignment;
}

static int by_assignment(const void *a, const void *b) {
    return ((const entry *)a)->assignment - ((const entry *)b)->assignment;
}

/* The plan as the header describes it: order, position, counts, dropped per expert. */
static int reference_plan(int T, int k, int E, const int32_t *idx, const float *gates, float factor, fm_drop_policy policy,
                          int32_t *order, int32_t *position, int32_t *counts, int32_t *dropped) {
    const int n = T * k;
    entry *all = (entry *)malloc((size_t)n * sizeof *all);
    int a, e, start, rows = 0, capacity = n, total_dropped = 0;
    if (factor > 0) {
        capacity = (int)ceil((double)factor * n / E);
        if (capacity < 1) capacity = 1;
    }
    for (a = 0; a < n; a++) all[a].expert = idx[a], all[a].assignment = a, all[a].gate = gates[a], position[a] = -1;
    qsort(all, (size_t)n, sizeof *all, by_expert);
    for (e = 0, start = 0; e < E; e++) {
        int end = start, kept;
        while (end < n && all[end].expert == e) end++;
        kept = end - start < capacity ? end - start : capacity;
        if (policy == FM_DROP_BY_GATE && kept < end - start) {
            qsort(all + start, (size_t)(end - start), sizeof *all, by_gate);
            qsort(all + start, (size_t)kept, sizeof *all, by_assignment);
        }
        counts[e] = kept;
        dropped[e] = end - start - kept;
        total_dropped += dropped[e];
        for (a = start; a < start + kept; a++) {
            order[rows] = all[a].assignment;
            position[all[a].assignment] = rows++;
        }
        start = end;
    }
    free(all);
    return total_dropped;
}

typedef struct {
    int T, k, E, rows;
    int32_t *idx, *counts, *offsets, *order, *position, *dropped;
    float *gates;
    fm_routing_plan plan;
} routed;

/* Random distinct experts per token, random gates, and a plan built by the library. */
static int build(routed *r, int T, int k, int E, float factor, fm_drop_policy policy) {
    int t, i, j;
    fm_plan_desc desc;
    int32_t *want_order, *want_position, *want_counts, *want_dropped;
    int want_total, ok;
    r->T = T, r->k = k, r->E = E;
    r->idx = (int32_t *)malloc((size_t)T * k * 4);
    r->gates = (float *)malloc((size_t)T * k * 4);
    r->counts = (int32_t *)malloc((size_t)E * 4);
    r->offsets = (int32_t *)malloc((size_t)(E + 1) * 4);
    r->order = (int32_t *)malloc((size_t)T * k * 4);
    r->position = (int32_t *)malloc((size_t)T * k * 4);
    r->dropped = (int32_t *)malloc((size_t)E * 4);
    for (t = 0; t < T; t++)
        for (i = 0; i < k; i++) {
            int e, used;
            do { /* skewed toward low experts, so that capacities bite */
                e = fm_test_int(0, 2) ? fm_test_int(0, E - 1) : fm_test_int(0, (E - 1) / 3);
                for (used = 0, j = 0; j < i; j++) used |= r->idx[t * k + j] == e;
            } while (used);
            r->idx[t * k + i] = e;
            r->gates[t * k + i] = fm_test_int(0, 5) ? (float)fm_test_uniform() : 0.5f; /* ties too */
        }
    memset(&desc, 0, sizeof desc);
    desc.tokens = T, desc.top_k = k, desc.experts = E, desc.capacity_factor = factor, desc.drop_policy = policy;
    memset(&r->plan, 0, sizeof r->plan);
    r->plan.counts = r->counts, r->plan.offsets = r->offsets, r->plan.order = r->order, r->plan.position = r->position;
    r->plan.dropped_per_expert = r->dropped;
    FM_CHECK(fm_routing_plan_build(&desc, r->idx, k, r->gates, k, &r->plan) == FM_OK, "plan T=%d k=%d E=%d", T, k, E);
    want_order = (int32_t *)malloc((size_t)T * k * 4), want_position = (int32_t *)malloc((size_t)T * k * 4);
    want_counts = (int32_t *)malloc((size_t)E * 4), want_dropped = (int32_t *)malloc((size_t)E * 4);
    want_total = reference_plan(T, k, E, r->idx, r->gates, factor, policy, want_order, want_position, want_counts, want_dropped);
    r->rows = T * k - want_total;
    ok = r->plan.rows == r->rows && r->plan.dropped == want_total &&
         !memcmp(want_counts, r->counts, (size_t)E * 4) && !memcmp(want_dropped, r->dropped, (size_t)E * 4) &&
         !memcmp(want_order, r->order, (size_t)r->rows * 4) && !memcmp(want_position, r->position, (size_t)T * k * 4);
    for (i = 0, j = 0; i < E; i++) ok &= r->offsets[i] == j, j += want_counts[i];
    ok &= r->offsets[E] == r->rows;
    FM_CHECK(ok, "plan T=%d k=%d E=%d factor %g policy %d differs from the reference (rows %d want %d)", T, k, E, factor,
             (int)policy, r->plan.rows, r->rows);
    free(want_order), free(want_position), free(want_counts), free(want_dropped);
    return ok;
}

static void release(routed *r) {
    free(r->idx), free(r->gates), free(r->counts), free(r->offsets), free(r->order), free(r->position), free(r->dropped);
}

static float *random_matrix(int rows, int cols, int ld) {
    float *m = fm_test_new_matrix(rows, cols, ld);
    int i, j;
    for (i = 0; i < rows; i++)
        for (j = 0; j < cols; j++) m[(size_t)i * ld + j] = (float)fm_test_normal();
    return m;
}

static void check_moves(routed *r, int d) {
    const int T = r->T, k = r->k, rows = r->rows > 0 ? r->rows : 1;
    const int ldx = d + fm_test_int(0, 3), lde = d + fm_test_int(0, 3), ldy = d + fm_test_int(0, 3);
    float *x = random_matrix(T, d, ldx), *xe = fm_test_new_matrix(rows, d, lde), *ye = random_matrix(rows, d, lde);
    float *y = fm_test_new_matrix(T, d, ldy), *dy = random_matrix(T, d, ldy), *dye = fm_test_new_matrix(rows, d, lde);
    float *dx = fm_test_new_matrix(T, d, ldx), *dg = (float *)malloc((size_t)T * k * 4);
    double worst_combine = 0.0, worst_back = 0.0, worst_dye = 0.0, worst_dg = 0.0;
    int bad_copy = 0, t, i, j, row;
    FM_CHECK(fm_dispatch_forward(&r->plan, d, x, ldx, xe, lde) == FM_OK, "dispatch");
    for (row = 0; row < r->rows; row++)
        bad_copy += memcmp(xe + (size_t)row * lde, x + (size_t)(r->order[row] / k) * ldx, (size_t)d * 4) != 0;
    FM_CHECK(bad_copy == 0, "dispatch T=%d d=%d: %d rows are not exact copies", T, d, bad_copy);
    FM_CHECK(fm_combine_forward(&r->plan, d, ye, lde, r->gates, k, y, ldy) == FM_OK, "combine");
    FM_CHECK(fm_dispatch_backward(&r->plan, d, ye, lde, dx, ldx) == FM_OK, "dispatch backward");
    FM_CHECK(fm_combine_backward(&r->plan, d, ye, lde, r->gates, k, dy, ldy, dye, lde, dg, k) == FM_OK, "combine backward");
    for (t = 0; t < T; t++)
        for (j = 0; j < d; j++) {
            double sum = 0.0, scale = 0.0, plain = 0.0, plain_scale = 0.0;
            for (i = 0; i < k; i++) {
                const int p = r->position[t * k + i];
                if (p < 0) continue;
                sum += (double)r->gates[t * k + i] * ye[(size_t)p * lde + j];
                scale += fabs((double)r->gates[t * k + i] * ye[(size_t)p * lde + j]);
                plain += ye[(size_t)p * lde + j], plain_scale += fabs(ye[(size_t)p * lde + j]);
            }
            worst_combine = fmax(worst_combine, fabs(y[(size_t)t * ldy + j] - sum) / (scale + 1e-30));
            worst_back = fmax(worst_back, fabs(dx[(size_t)t * ldx + j] - plain) / (plain_scale + 1e-30));
        }
    for (row = 0; row < r->rows; row++) {
        const int a = r->order[row];
        for (j = 0; j < d; j++)
            worst_dye += dye[(size_t)row * lde + j] != (float)((double)r->gates[a] * dy[(size_t)(a / k) * ldy + j]);
    }
    for (t = 0; t < T; t++)
        for (i = 0; i < k; i++) {
            const int p = r->position[t * k + i];
            double dot = 0.0, scale = 0.0;
            for (j = 0; p >= 0 && j < d; j++) {
                dot += (double)dy[(size_t)t * ldy + j] * ye[(size_t)p * lde + j];
                scale += fabs((double)dy[(size_t)t * ldy + j] * ye[(size_t)p * lde + j]);
            }
            worst_dg = fmax(worst_dg, fabs(dg[t * k + i] - dot) / (scale + 1e-30));
        }
    FM_CHECK(worst_combine <= COMBINE_TOLERANCE, "combine T=%d k=%d d=%d: off by %.3g", T, k, d, worst_combine);
    FM_CHECK(worst_back <= COMBINE_TOLERANCE, "dispatch backward T=%d k=%d d=%d: off by %.3g", T, k, d, worst_back);
    /* one float product per element, correctly rounded: equal to the double product rounded */
    FM_CHECK(worst_dye == 0, "combine backward (rows) d=%d: %.0f elements not the rounded product", d, worst_dye);
    FM_CHECK(worst_dg <= GRADIENT_TOLERANCE, "combine backward (gates) d=%d: off by %.3g", d, worst_dg);
    FM_CHECK(fm_test_padding_intact(xe, rows, d, lde) && fm_test_padding_intact(y, T, d, ldy) &&
                 fm_test_padding_intact(dx, T, d, ldx) && fm_test_padding_intact(dye, rows, d, lde),
             "padding written");
    { /* each output alone (a separate pass) gives the floats of the one-pass call with both */
        float *dye_alone = fm_test_new_matrix(rows, d, lde), *dg_alone = (float *)malloc((size_t)T * k * 4);
        int same_rows = 1;
        FM_CHECK(fm_combine_backward(&r->plan, d, ye, lde, r->gates, k, dy, ldy, dye_alone, lde, NULL, 0) == FM_OK &&
                     fm_combine_backward(&r->plan, d, ye, lde, r->gates, k, dy, ldy, NULL, 0, dg_alone, k) == FM_OK,
                 "combine backward, one output at a time");
        for (row = 0; row < r->rows; row++)
            same_rows &= memcmp(dye_alone + (size_t)row * lde, dye + (size_t)row * lde, (size_t)d * 4) == 0;
        FM_CHECK(same_rows, "combine backward: dye alone differs from dye with d_gates (d=%d)", d);
        FM_CHECK(memcmp(dg_alone, dg, (size_t)T * k * 4) == 0, "combine backward: d_gates alone differs (d=%d)", d);
        free(dye_alone), free(dg_alone);
    }
    free(x), free(xe), free(ye), free(y), free(dy), free(dye), free(dx), free(dg);
}

/* Finite differences in double of L = sum(w * combine(ye, gates)) with respect to gates and ye:
 * the backward's dye and d_gates with dy = w. */
static void check_gradient(routed *r, int d) {
    const int T = r->T, k = r->k, rows = r->rows > 0 ? r->rows : 1;
    float *ye = random_matrix(rows, d, d), *w = random_matrix(T, d, d), *dye = (float *)malloc((size_t)rows * d * 4);
    float *dg = (float *)malloc((size_t)T * k * 4);
    double worst = 0.0;
    int t, i, j, row;
    FM_CHECK(fm_combine_backward(&r->plan, d, ye, d, r->gates, k, w, d, dye, d, dg, k) == FM_OK, "combine backward");
    for (t = 0; t < T && t < 6; t++)
        for (i = 0; i < k; i++) { /* L is linear in each gate: the central difference is exact up to rounding */
            const int p = r->position[t * k + i];
            double up = 0.0, down = 0.0;
            const double h = 1e-3;
            for (j = 0; p >= 0 && j < d; j++) {
                up += w[t * d + j] * (r->gates[t * k + i] + h) * (double)ye[(size_t)p * d + j];
                down += w[t * d + j] * (r->gates[t * k + i] - h) * (double)ye[(size_t)p * d + j];
            }
            worst = fmax(worst, fabs(dg[t * k + i] - (up - down) / (2 * h)) / (1.0 + fabs((up - down) / (2 * h))));
        }
    for (row = 0; row < r->rows && row < 6; row++)
        for (j = 0; j < d; j++) {
            const int a = r->order[row];
            const double h = 1e-3;
            const double up = w[(a / k) * d + j] * r->gates[a] * (ye[(size_t)row * d + j] + h);
            const double down = w[(a / k) * d + j] * r->gates[a] * (ye[(size_t)row * d + j] - h);
            worst = fmax(worst, fabs(dye[(size_t)row * d + j] - (up - down) / (2 * h)));
        }
    FM_CHECK(worst <= GRADIENT_TOLERANCE, "combine gradient T=%d k=%d d=%d: off by %.3g", T, k, d, worst);
    free(ye), free(w), free(dye), free(dg);
}

static void check_all(void) {
    static const int dims[] = {1, 3, 8, 15, 16, 17, 64, 100, 128, 257};
    size_t x;
    for (x = 0; x < sizeof dims / sizeof dims[0]; x++) {
        const int E = fm_test_int(2, 20), k = fm_test_int(1, E < 4 ? E : 4), T = fm_test_int(1, 300);
        static const float factors[] = {0.0f, 0.5f, 1.0f, 1.25f, 4.0f};
        const float factor = factors[fm_test_int(0, 4)];
        routed r;
        build(&r, T, k, E, factor, (fm_drop_policy)fm_test_int(0, 1));
        check_moves(&r, dims[x]);
        check_gradient(&r, dims[x]);
        release(&r);
    }
}

/* Outputs past the library's streaming threshold (8 MiB), so that the streaming stores run, on
 * rows both aligned and not (leading dimensions d + 0..3), with a vector tail and drops. */
static void check_streamed(void) {
    routed r;
    build(&r, 4200, 2, 16, 1.25f, (fm_drop_policy)fm_test_int(0, 1));
    check_moves(&r, 521);
    release(&r);
}

static void check_plans(void) {
    static const float factors[] = {0.0f, 0.01f, 0.5f, 1.0f, 1.5f};
    int n;
    for (n = 0; n < 60; n++) {
        const int E = fm_test_int(1, 64), k = fm_test_int(1, E < 8 ? E : 8);
        routed r;
        build(&r, fm_test_int(1, 500), k, E, factors[fm_test_int(0, 4)], (fm_drop_policy)fm_test_int(0, 1));
        release(&r);
    }
    /* many tokens: the build counts them in chunks (four a thread, 256 tokens at least, as many
     * histograms of E as the position array holds), here at 1, 2 and 3 threads, up to more
     * experts than the chunks' histograms have room for */
    for (n = 0; n < 18; n++) {
        const int E = fm_test_int(1, n % 2 ? 2000 : 64), k = fm_test_int(1, E < 8 ? E : 8);
        routed r;
        fm_set_threads(1 + n % 3);
        build(&r, fm_test_int(512, 6000), k, E, factors[fm_test_int(0, 4)], (fm_drop_policy)fm_test_int(0, 1));
        release(&r);
    }
    fm_set_threads(0);
}

static void check_errors(void) {
    int32_t idx[4] = {0, 1, 2, 9}, counts[4], offsets[5], order[4], position[4];
    float gates[4] = {0.5f, 0.5f, 0.5f, 0.5f}, x[8] = {0}, y[8];
    fm_plan_desc desc;
    fm_routing_plan plan;
    int i, untouched = 1;
    memset(&desc, 0, sizeof desc);
    memset(&plan, 0, sizeof plan);
    for (i = 0; i < 4; i++) counts[i] = order[i] = position[i] = -5;
    plan.counts = counts, plan.offsets = offsets, plan.order = order, plan.position = position;
    desc.tokens = 2, desc.top_k = 2, desc.experts = 4;
    FM_CHECK(fm_routing_plan_build(&desc, idx, 2, gates, 2, &plan) == FM_ERR_INVALID_ARGUMENT, "expert out of range");
    idx[3] = 3, desc.top_k = 5;
    FM_CHECK(fm_routing_plan_build(&desc, idx, 2, gates, 2, &plan) == FM_ERR_INVALID_ARGUMENT, "k > experts");
    desc.top_k = 2, desc.capacity_factor = -1.0f;
    FM_CHECK(fm_routing_plan_build(&desc, idx, 2, gates, 2, &plan) == FM_ERR_INVALID_ARGUMENT, "negative capacity");
    desc.capacity_factor = 1.0f, desc.drop_policy = FM_DROP_BY_GATE;
    FM_CHECK(fm_routing_plan_build(&desc, idx, 2, NULL, 2, &plan) == FM_ERR_NULL_POINTER, "drop by gate without gates");
    plan.order = NULL;
    FM_CHECK(fm_routing_plan_build(&desc, idx, 2, gates, 2, &plan) == FM_ERR_NULL_POINTER, "no order array");
    for (i = 0; i < 4; i++) untouched &= counts[i] == -5 && position[i] == -5;
    FM_CHECK(untouched, "a failed build wrote the plan");
    plan.order = order;
    FM_CHECK(fm_routing_plan_build(&desc, idx, 2, gates, 2, &plan) == FM_OK, "valid plan");
    FM_CHECK(fm_dispatch_forward(&plan, 0, x, 4, y, 4) == FM_ERR_INVALID_SHAPE, "dim 0");
    FM_CHECK(fm_combine_forward(&plan, 4, x, 4, NULL, 2, y, 4) == FM_ERR_NULL_POINTER, "combine without gates");
    FM_CHECK(fm_combine_forward(NULL, 4, x, 4, gates, 2, y, 4) == FM_ERR_NULL_POINTER, "no plan");
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i;
    fm_test_seed("test_dispatch");
    n = fm_test_isas(isas);
    check_plans(); /* plans are portable C: once */
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        check_all();
        check_streamed();
        check_errors();
    }
    return fm_test_finish("test_dispatch");
}
