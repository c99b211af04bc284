/* fm_test.h — the little harness every test program shares: checks that count, a seeded RNG
 * whose seed is printed (FLEXMOE_TEST_SEED replays a run), and the ISA loop.
 *
 * A test program checks each case with FM_CHECK; it ends with fm_test_finish(), which prints
 * "<program>: N passed, N failed" and returns the exit status. */
#ifndef FM_TEST_H
#define FM_TEST_H

/* mmap's MAP_ANONYMOUS and pthreads under -std=c99; this header comes before any system header */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "flexmoe.h"

/* ---- guarded heap ------------------------------------------------------------------------ */

/* Every malloc, calloc and free of the test programs (not the library's, which was compiled
 * above) goes through pages of its own: the block ends exactly where an inaccessible page
 * begins, so a kernel that reads or writes one float past a buffer faults at once, whatever
 * instruction it uses. AddressSanitizer cannot see AVX2's masked loads and stores (vmaskmov);
 * the guard page can, and it catches overreads that sentinel values would miss. A masked-off
 * lane never faults, so only real overruns do. FM_TEST_NO_GUARD turns it off. */
#if defined(__unix__) && !defined(FM_TEST_NO_GUARD)
#include <sys/mman.h>
#include <unistd.h>

typedef struct fm_test_mapping {
    void *base;
    size_t length;
} fm_test_mapping;

static inline void *fm_test_guarded_malloc(size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t padded = bytes + (4 - bytes % 4) % 4; /* 4-byte alignment for float and int32 */
    const size_t data_pages = (padded + sizeof(fm_test_mapping) + page - 1) / page;
    fm_test_mapping mapping;
    unsigned char *base, *data;
    mapping.length = (data_pages + 1) * page;
    base = (unsigned char *)mmap(NULL, mapping.length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == (unsigned char *)MAP_FAILED) return NULL;
    if (mprotect(base + data_pages * page, page, PROT_NONE) != 0) {
        munmap(base, mapping.length);
        return NULL;
    }
    mapping.base = base;
    data = base + data_pages * page - padded;
    memcpy(data - sizeof mapping, &mapping, sizeof mapping);
    return data;
}

static inline void fm_test_guarded_free(void *p) {
    fm_test_mapping mapping;
    if (!p) return;
    memcpy(&mapping, (unsigned char *)p - sizeof mapping, sizeof mapping);
    munmap(mapping.base, mapping.length);
}

static inline void *fm_test_guarded_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) return NULL;
    return fm_test_guarded_malloc(count * size); /* fresh anonymous pages are zero */
}

#define malloc(bytes) fm_test_guarded_malloc(bytes)
#define calloc(count, size) fm_test_guarded_calloc(count, size)
#define free(p) fm_test_guarded_free(p)
#endif

static int fm_test_passed, fm_test_failed;
static const char *fm_test_context = ""; /* printed with each failure: the ISA under test */

#define FM_CHECK(condition, ...)                                                              \
    do {                                                                                      \
        if (condition) {                                                                      \
            fm_test_passed++;                                                                 \
        } else {                                                                              \
            fm_test_failed++;                                                                 \
            fprintf(stderr, "FAIL %s:%d [%s] ", __FILE__, __LINE__, fm_test_context);         \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fputc('\n', stderr);                                                              \
        }                                                                                     \
    } while (0)

static inline int fm_test_finish(const char *program) {
    printf("%s: %d passed, %d failed\n", program, fm_test_passed, fm_test_failed);
    return fm_test_failed == 0 ? 0 : 1;
}

/* ---- random numbers: splitmix64 ---------------------------------------------------------- */

static uint64_t fm_test_rng_state;

static inline void fm_test_seed(const char *program) {
    const char *given = getenv("FLEXMOE_TEST_SEED");
    fm_test_rng_state = given ? strtoull(given, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)clock();
    printf("%s: seed %llu (replay with FLEXMOE_TEST_SEED)\n", program,
           (unsigned long long)fm_test_rng_state);
}

static inline uint64_t fm_test_next(void) {
    uint64_t z = (fm_test_rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) */
static inline double fm_test_uniform(void) { return (double)(fm_test_next() >> 11) * (1.0 / 9007199254740992.0); }

/* integer in [lo, hi] */
static inline int fm_test_int(int lo, int hi) { return lo + (int)(fm_test_next() % (uint64_t)(hi - lo + 1)); }

static inline double fm_test_normal(void) {
    double u = fm_test_uniform(), v = fm_test_uniform();
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

/* ---- buffers whose padding must stay untouched ---------------------------------------------- */

#define FM_TEST_SENTINEL 12345.0f /* fills padding that must stay untouched */

/* A buffer of exactly the matrix extent (so AddressSanitizer sees any overrun), padding filled
 * with FM_TEST_SENTINEL. */
static inline float *fm_test_new_matrix(int rows, int cols, int ld) {
    size_t extent = (size_t)(rows - 1) * ld + cols, i;
    float *m = (float *)malloc(extent * sizeof(float));
    for (i = 0; i < extent; i++) m[i] = FM_TEST_SENTINEL;
    return m;
}

static inline int fm_test_padding_intact(const float *m, int rows, int cols, int ld) {
    int r, j;
    for (r = 0; r + 1 < rows; r++)
        for (j = cols; j < ld; j++)
            if (m[(size_t)r * ld + j] != FM_TEST_SENTINEL) return 0;
    return 1;
}

/* ---- ISA loop ---------------------------------------------------------------------------- */

/* The paths to test: the one FLEXMOE_ISA forces (checked to be really active), else every
 * path this machine supports. Returns the count written to `isas`. */
static inline int fm_test_isas(fm_isa isas[FM_ISA_COUNT]) {
    const char *forced = getenv("FLEXMOE_ISA");
    int n = 0, i;
    if (forced && *forced) {
        fm_isa want = FM_ISA_AUTO;
        FM_CHECK(fm_isa_from_name(forced, &want) == FM_OK, "FLEXMOE_ISA=%s is not a path name", forced);
        FM_CHECK(fm_active_isa() == want, "FLEXMOE_ISA=%s but the active path is %s", forced,
                 fm_isa_name(fm_active_isa()));
        if (fm_active_isa() != FM_ISA_AUTO) isas[n++] = fm_active_isa();
        return n;
    }
    for (i = FM_ISA_SCALAR; i < FM_ISA_COUNT; i++)
        if (fm_isa_supported((fm_isa)i)) isas[n++] = (fm_isa)i;
    return n;
}

static inline void fm_test_use_isa(fm_isa isa) {
    fm_status status = fm_set_isa(isa);
    FM_CHECK(status == FM_OK && fm_active_isa() == isa, "fm_set_isa(%s): %s", fm_isa_name(isa),
             fm_status_str(status));
    fm_test_context = fm_isa_name(isa);
}

/* ---- a synthetic three-view task ---------------------------------------------------------- */

enum { FM_TEST_CLASSES = 3, FM_TEST_VIEWS = 3 };
static const int fm_test_view_features[FM_TEST_VIEWS] = {4, 6, 5};

/* `samples` samples: each class's mean in each view is a random direction; samples add noise 0.6
 * of the means' scale, and each view is missing with probability 0.3 (one kept). Allocated with
 * fm_alloc, so fm_dataset_free releases it. */
static inline void fm_test_synthetic(fm_dataset *ds, int samples) {
    enum { C = FM_TEST_CLASSES, V = FM_TEST_VIEWS };
    double means[C][V][6];
    int c, v, j, s;
    memset(ds, 0, sizeof *ds);
    ds->samples = samples, ds->views = V, ds->classes = C;
    for (c = 0; c < C; c++)
        for (v = 0; v < V; v++)
            for (j = 0; j < 6; j++) means[c][v][j] = fm_test_normal();
    ds->observed = (uint8_t *)fm_alloc((size_t)samples * V);
    ds->labels = (int32_t *)fm_alloc((size_t)samples * sizeof(int32_t));
    for (v = 0; v < V; v++) {
        snprintf(ds->names[v], sizeof ds->names[v], "view%d", v);
        ds->features[v] = fm_test_view_features[v];
        ds->values[v] = (float *)fm_alloc((size_t)samples * fm_test_view_features[v] * sizeof(float));
    }
    for (s = 0; s < samples; s++) {
        int kept = 0;
        ds->labels[s] = s % C;
        for (v = 0; v < V; v++) {
            ds->observed[s * V + v] = fm_test_uniform() >= 0.3;
            kept += ds->observed[s * V + v];
        }
        if (!kept) ds->observed[s * V + fm_test_int(0, V - 1)] = 1;
        for (v = 0; v < V; v++)
            for (j = 0; j < fm_test_view_features[v]; j++)
                ds->values[v][(size_t)s * fm_test_view_features[v] + j] =
                    ds->observed[s * V + v] ? (float)(means[ds->labels[s]][v][j] + 0.6 * fm_test_normal()) : 0.0f;
    }
}

#endif /* FM_TEST_H */
