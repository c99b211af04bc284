/* Top-k on every ISA path against a reference that sorts (key, column) pairs: indices must be
 * identical and values bit-identical, on random shapes (k = 1..16 and beyond, widths off the
 * vector width, one row, padded leading dimensions), heavy ties, -0/+0, and the NaN / ±Inf
 * policy; plus argument errors that must write nothing. */
#include "fm_test.h"

#include <string.h>

static const float SENTINEL_VALUE = 12345.0f;
static const int32_t SENTINEL_INDEX = -7777;

typedef struct {
    double key;
    int column;
} keyed;

/* The documented order: NaN ranks as +Inf; descending key, then ascending column. */
static int by_rank(const void *a, const void *b) {
    const keyed *p = (const keyed *)a, *q = (const keyed *)b;
    if (p->key != q->key) return p->key > q->key ? -1 : 1;
    return p->column - q->column;
}

static void reference_topk(const float *x, int cols, int k, int32_t *idx) {
    keyed *pairs = (keyed *)malloc((size_t)cols * sizeof *pairs);
    int j;
    for (j = 0; j < cols; j++) {
        pairs[j].key = x[j] != x[j] ? INFINITY : x[j];
        pairs[j].column = j;
    }
    qsort(pairs, (size_t)cols, sizeof *pairs, by_rank);
    for (j = 0; j < k; j++) idx[j] = pairs[j].column;
    free(pairs);
}

static int same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* Kinds of rows: 0 normal, 1 few distinct values (ties), 2 specials sprinkled, 3 mostly -Inf. */
static float draw(int kind) {
    switch (kind) {
    case 1: return (float)fm_test_int(-2, 2) * (fm_test_int(0, 1) ? 1.0f : -1.0f) * 0.5f; /* -0 too */
    case 2: {
        int pick = fm_test_int(0, 9);
        if (pick == 0) return NAN;
        if (pick == 1) return INFINITY;
        if (pick == 2) return -INFINITY;
        if (pick == 3) return -0.0f;
        return (float)fm_test_normal();
    }
    case 3: return fm_test_int(0, 7) == 0 ? (float)fm_test_normal() : -INFINITY;
    default: return (float)(fm_test_normal() * 3.0);
    }
}

/* One call on a rows x cols block with leading dimensions padded at random; checks everything. */
static void check_case(int rows, int cols, int k, int kind, int with_values) {
    const int ldx = cols + fm_test_int(0, 3), ldi = k + fm_test_int(0, 2), ldv = k + fm_test_int(0, 2);
    const size_t nx = (size_t)(rows - 1) * ldx + cols, ni = (size_t)(rows - 1) * ldi + k,
                 nv = (size_t)(rows - 1) * ldv + k;
    float *x = (float *)malloc(nx * sizeof *x), *values = (float *)malloc(nv * sizeof *values);
    int32_t *indices = (int32_t *)malloc(ni * sizeof *indices), *want = (int32_t *)malloc((size_t)k * sizeof *want);
    int r, i, bad_index = 0, bad_value = 0, bad_padding = 0;
    size_t e;
    fm_status status;
    for (e = 0; e < nx; e++) x[e] = draw(kind);
    for (e = 0; e < ni; e++) indices[e] = SENTINEL_INDEX;
    for (e = 0; e < nv; e++) values[e] = SENTINEL_VALUE;
    status = fm_topk(rows, cols, k, x, ldx, indices, ldi, with_values ? values : NULL, ldv);
    FM_CHECK(status == FM_OK, "fm_topk(%d x %d, k=%d): %s", rows, cols, k, fm_status_str(status));
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        reference_topk(xr, cols, k, want);
        for (i = 0; i < k; i++) {
            const int32_t got = indices[(size_t)r * ldi + i];
            if (got != want[i] && !bad_index++)
                fprintf(stderr, "  row %d slot %d: index %d, want %d (x=%g, want x=%g)\n", r, i, got, want[i],
                        got >= 0 && got < cols ? xr[got] : 0.0, xr[want[i]]);
            if (with_values && !same_bits(values[(size_t)r * ldv + i], xr[want[i]])) bad_value++;
        }
        for (i = k; r + 1 < rows && i < ldi; i++) bad_padding += indices[(size_t)r * ldi + i] != SENTINEL_INDEX;
        for (i = k; r + 1 < rows && i < ldv; i++) bad_padding += !same_bits(values[(size_t)r * ldv + i], SENTINEL_VALUE);
    }
    if (!with_values)
        for (e = 0; e < nv; e++) bad_padding += !same_bits(values[e], SENTINEL_VALUE);
    FM_CHECK(bad_index == 0, "%d x %d k=%d kind %d: %d wrong indices", rows, cols, k, kind, bad_index);
    FM_CHECK(bad_value == 0, "%d x %d k=%d kind %d: %d values not copied from x", rows, cols, k, kind, bad_value);
    FM_CHECK(bad_padding == 0, "%d x %d k=%d kind %d: %d writes outside the outputs", rows, cols, k, kind,
             bad_padding);
    free(x);
    free(values);
    free(indices);
    free(want);
}

static void check_shapes(void) {
    static const int widths[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 63, 64, 65,
                                 100, 127, 128, 129, 200, 255, 256, 257, 500, 1000, 1024};
    size_t w;
    int k, kind;
    for (w = 0; w < sizeof widths / sizeof widths[0]; w++) {
        const int cols = widths[w];
        for (k = 1; k <= cols && k <= 17; k++)
            for (kind = 0; kind < 4; kind++)
                check_case(fm_test_int(1, cols > 256 ? 20 : 70), cols, k, kind, (k + kind) % 3 != 0);
        if (cols > 17) { /* past the register network: the scalar insertion */
            check_case(fm_test_int(1, 9), cols, fm_test_int(18, cols), fm_test_int(0, 3), 1);
            check_case(3, cols, cols, 2, 1);
        }
    }
    check_case(1, 1, 1, 0, 1);
    check_case(1, 256, 8, 0, 1);
    check_case(300, 64, 4, 2, 1); /* more than one OpenMP chunk */
}

/* Exact cases the policy names, whatever the random draws. */
static void check_policy(void) {
    const float row[6] = {1.0f, NAN, INFINITY, NAN, -INFINITY, 1.0f};
    const float all_low[5] = {-INFINITY, -INFINITY, -INFINITY, 3.0f, -INFINITY};
    const float zeros[4] = {0.0f, -0.0f, 0.0f, -0.0f};
    int32_t idx[6];
    float val[6];
    FM_CHECK(fm_topk(1, 6, 6, row, 6, idx, 6, val, 6) == FM_OK, "policy row");
    FM_CHECK(idx[0] == 1 && idx[1] == 2 && idx[2] == 3 && idx[3] == 0 && idx[4] == 5 && idx[5] == 4,
             "NaN ranks as +Inf, ties by column: got %d %d %d %d %d %d", idx[0], idx[1], idx[2], idx[3], idx[4], idx[5]);
    FM_CHECK(val[0] != val[0] && val[1] == INFINITY && val[2] != val[2] && val[5] == -INFINITY,
             "values are copied, NaN stays NaN");
    FM_CHECK(fm_topk(1, 5, 3, all_low, 5, idx, 3, val, 3) == FM_OK, "-Inf row");
    FM_CHECK(idx[0] == 3 && idx[1] == 0 && idx[2] == 1, "-Inf ties fill by column: %d %d %d", idx[0], idx[1], idx[2]);
    FM_CHECK(fm_topk(1, 4, 3, zeros, 4, idx, 3, NULL, 0) == FM_OK, "zeros");
    FM_CHECK(idx[0] == 0 && idx[1] == 1 && idx[2] == 2, "-0 ties with +0: %d %d %d", idx[0], idx[1], idx[2]);
}

static void check_errors(void) {
    float x[8] = {0};
    int32_t idx[8];
    float val[8];
    int i, untouched = 1;
    for (i = 0; i < 8; i++) idx[i] = SENTINEL_INDEX, val[i] = SENTINEL_VALUE;
    FM_CHECK(fm_topk(1, 4, 0, x, 4, idx, 4, val, 4) == FM_ERR_INVALID_ARGUMENT, "k = 0");
    FM_CHECK(fm_topk(1, 4, 5, x, 4, idx, 5, val, 5) == FM_ERR_INVALID_ARGUMENT, "k > cols");
    FM_CHECK(fm_topk(1, 4, 2, NULL, 4, idx, 2, val, 2) == FM_ERR_NULL_POINTER, "NULL x");
    FM_CHECK(fm_topk(1, 4, 2, x, 4, NULL, 2, val, 2) == FM_ERR_NULL_POINTER, "NULL indices");
    FM_CHECK(fm_topk(2, 4, 2, x, 3, idx, 2, val, 2) == FM_ERR_INVALID_SHAPE, "ldx < cols");
    FM_CHECK(fm_topk(2, 4, 2, x, 4, idx, 1, val, 2) == FM_ERR_INVALID_SHAPE, "ldi < k");
    FM_CHECK(fm_topk(2, 4, 2, x, 4, idx, 2, val, 1) == FM_ERR_INVALID_SHAPE, "ldv < k");
    FM_CHECK(fm_topk(0, 4, 2, x, 4, idx, 2, val, 2) == FM_ERR_INVALID_SHAPE, "rows = 0");
    FM_CHECK(fm_topk(0x7fffffff, 4, 2, x, 0x7fffffff, idx, 2, val, 2) == FM_ERR_OVERFLOW, "overflow");
    for (i = 0; i < 8; i++) untouched &= idx[i] == SENTINEL_INDEX && same_bits(val[i], SENTINEL_VALUE);
    FM_CHECK(untouched, "a failed call wrote its outputs");
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i;
    fm_test_seed("test_topk");
    n = fm_test_isas(isas);
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        check_shapes();
        check_policy();
        check_errors();
    }
    return fm_test_finish("test_topk");
}
