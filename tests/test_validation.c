/* Argument validation of every public entry point, as one table (issue 15, deliverable 1).
 *
 * Each ROW is one (entry point, rejection): the call is made with otherwise valid arguments except
 * the one defect, and the row checks
 *   - the exact status the manual (the public part of flexmoe.h) documents for it;
 *   - that an error message reached the logger, where the manual documents one (LOG);
 *   - that nothing was written: every output buffer and output struct the test owns is filled
 *     with a sentinel byte pattern before the call and compared after, and every input buffer is
 *     snapshotted and compared too (calls that document "zeroed on failure" are checked for that).
 * Each row runs in a forked child, so a row that crashes the library counts as one failed row.
 * Rows that tests/test_api.c and tests/test_robustness.c already hold are not repeated here.
 * At the end, every function declared in the manual must have a row or a reason in `uncovered`.
 * Functions that take no argument that can be wrong are listed at the end (uncovered, and why).
 *
 * Build (from the repository root):
 *   cc -std=c99 -Wall -Wextra -pedantic -Werror -O1 -I. -Itests -DFM_TEST_SOURCE_ROOT="\"$PWD\"" \
 *      tests/test_validation.c tests/flexmoe_impl.c -lm -lpthread */
#include "fm_test.h"

#include <float.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- the capturing logger --------------------------------------------------------------- */

static int log_errors;
static char log_last[256];

static void capture_log(fm_log_level level, const char *message, void *user_data) {
    (void)user_data;
    if (level == FM_LOG_ERROR) log_errors++;
    strncpy(log_last, message, sizeof log_last - 1);
    log_last[sizeof log_last - 1] = 0;
}

static fm_desc setup_desc; /* the capturing logger, default allocator and ISA */

/* ---- watched memory: outputs filled with a sentinel, inputs snapshotted ------------------- */

#define SENTINEL_BYTE 0xA7

typedef struct region {
    const char *name;
    void *p;
    size_t bytes;
    int fill;             /* 1: filled with SENTINEL_BYTE before each row (an output) */
    unsigned char *snap;
} region;

static region regions[64];
static int region_count;

static void watch(const char *name, const void *p, size_t bytes, int fill) {
    region *r = &regions[region_count++];
    r->name = name, r->p = (void *)(uintptr_t)p, r->bytes = bytes, r->fill = fill;
    r->snap = (unsigned char *)malloc(bytes);
}
#define OUT(name, p, bytes) watch(name, p, bytes, 1)
#define KEEP(name, p, bytes) watch(name, p, bytes, 0)

static void drop_regions(int keep_count) {
    while (region_count > keep_count) free(regions[--region_count].snap);
}

static void arm(void) {
    int i;
    for (i = 0; i < region_count; i++) {
        if (regions[i].fill) memset(regions[i].p, SENTINEL_BYTE, regions[i].bytes);
        memcpy(regions[i].snap, regions[i].p, regions[i].bytes);
    }
}

/* ---- rows, entry points and categories ---------------------------------------------------- */

enum {
    C_NULL,     /* a required pointer is NULL (with a nonzero size) */
    C_SHAPE,    /* a zero or negative shape or count */
    C_LD,       /* a leading dimension below the row length */
    C_OVERFLOW, /* a dimension or extent beyond FLEXMOE_MAX_DIM or the address space, a config that cannot fit */
    C_K,        /* k / top_k outside its range */
    C_INDEX,    /* index array contents out of range (experts, groups, labels, rows, combinations, offsets) */
    C_DESC,     /* a descriptor field or enum out of range */
    C_NAN,      /* NaN or infinity in a float argument or field */
    C_STATE,    /* an object in the wrong state (not created, no forward, a dataset that does not fit) */
    C_ISA,      /* an ISA that is unknown or cannot run */
    C_FILE,     /* a file or directory that is missing or malformed */
    C_VALUE,    /* a non-status function's documented answer to a bad argument */
    C_COUNT
};
static const char *category_names[C_COUNT] = {
    "NULL pointer", "zero/negative shape", "leading dimension < row", "overflow / cannot fit", "k outside its range",
    "index contents out of range", "descriptor field / enum out of range", "NaN / Inf in a float", "object state",
    "ISA", "file / directory", "documented value for a bad argument"};

#define LOG 1    /* the manual documents an error message through the logger */
#define NOLOG 0  /* it does not (a message may still come; counted, not required) */
#define ZEROED 2 /* or'ed into the flag: the manual says the output struct is zeroed on failure */

static int category_rows[C_COUNT], rows_total, rows_failed, rows_silent;
static const char *entry_names[128];
static int entry_rows[128], entry_count, current;
static const char *failed_rows[256];

static void entry(const char *name) {
    int i;
    for (i = 0; i < entry_count; i++)
        if (strcmp(entry_names[i], name) == 0) break;
    if (i == entry_count) entry_names[entry_count++] = name;
    current = i;
}

/* Each row runs in a child process (fork), so a row that crashes the library is reported as a
 * failed row and the table goes on; the child sends back what it saw through a pipe. */
typedef struct row_result {
    int status, logged, touched, zero_ok, value_ok, crashed;
} row_result;

static int child_fd = -1;
static row_result last;

static int row_fork(void) {
    int fds[2], wstatus = 0;
    pid_t pid;
    memset(&last, 0, sizeof last);
    last.touched = -1, last.zero_ok = last.value_ok = 1;
    fflush(stdout), fflush(stderr);
    if (pipe(fds) != 0 || (pid = fork()) < 0) {
        perror("test_validation: pipe/fork");
        exit(2);
    }
    if (pid == 0) {
        close(fds[0]);
        child_fd = fds[1];
        return 1;
    }
    close(fds[1]);
    if (read(fds[0], &last, sizeof last) != (ssize_t)sizeof last) last.crashed = 1;
    close(fds[0]);
    waitpid(pid, &wstatus, 0);
    if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) last.crashed = 1;
    if (last.crashed) last.crashed = WIFSIGNALED(wstatus) ? WTERMSIG(wstatus) : -1;
    return 0;
}

static void row_child_done(fm_status status, int value_ok, const void *zeroed, size_t zeroed_bytes) {
    row_result r;
    size_t i;
    int k;
    memset(&r, 0, sizeof r);
    r.status = (int)status, r.logged = log_errors, r.value_ok = value_ok, r.zero_ok = 1, r.touched = -1;
    for (k = 0; k < region_count && r.touched < 0; k++)
        if (memcmp(regions[k].snap, regions[k].p, regions[k].bytes) != 0) r.touched = k;
    for (i = 0; i < zeroed_bytes; i++) r.zero_ok &= ((const unsigned char *)zeroed)[i] == 0;
    if (write(child_fd, &r, sizeof r) != (ssize_t)sizeof r) _exit(3);
    _exit(0);
}

static void count_row(int category, int ok) {
    rows_total++, category_rows[category]++, entry_rows[current]++;
    if (!last.crashed && last.logged == 0) rows_silent++;
    if (!ok) {
        if (rows_failed < 256) failed_rows[rows_failed] = entry_names[current];
        rows_failed++;
    }
}

static void finish_row(int category, const char *what, fm_status want, int flags) {
    const char *changed = last.touched >= 0 ? regions[last.touched].name : NULL;
    const int ok_log = !(flags & LOG) || last.logged > 0, ok_zero = !(flags & ZEROED) || last.zero_ok;
    const int ok = !last.crashed && last.status == (int)want && ok_log && !changed && ok_zero;
    char crash[48] = "";
    count_row(category, ok);
    if (last.crashed) snprintf(crash, sizeof crash, ", CRASHED (signal %d)", last.crashed);
    FM_CHECK(ok, "%s, %s: got %s (want %s)%s%s%s%s%s", entry_names[current], what,
             last.crashed ? "nothing" : fm_status_str((fm_status)last.status), fm_status_str(want), crash,
             !last.crashed && !ok_log ? ", no message logged" : "", changed ? ", wrote into " : "", changed ? changed : "",
             ok_zero ? "" : ", output not zeroed");
}

static void finish_value(int category, const char *what) {
    const char *changed = last.touched >= 0 ? regions[last.touched].name : NULL;
    const int ok = !last.crashed && last.value_ok && !changed;
    count_row(category, ok);
    FM_CHECK(ok, "%s, %s: %s%s%s", entry_names[current], what, last.crashed ? "CRASHED" : "wrong answer",
             changed ? ", wrote into " : "", changed ? changed : "");
}

/* One row: a copy of the entry's valid arguments `base`, the one defect, the call (CALL(a), a
 * macro each entry point defines), the checks. */
#define ROWZ(cat, what, want, flags, zp, zbytes, ...)                                         \
    do {                                                                                      \
        if (row_fork()) {                                                                     \
            A a = base;                                                                       \
            __VA_ARGS__;                                                                      \
            arm();                                                                            \
            log_errors = 0;                                                                   \
            row_child_done(CALL(a), 1, zp, zbytes);                                           \
        }                                                                                     \
        finish_row(cat, what, want, flags);                                                   \
    } while (0)
#define ROW(cat, what, want, flags, ...) ROWZ(cat, what, want, flags, NULL, 0, __VA_ARGS__)
/* A row of a function without a status: cond is the documented answer. */
#define VROW(cat, what, cond)                                                                 \
    do {                                                                                      \
        if (row_fork()) {                                                                     \
            arm();                                                                            \
            log_errors = 0;                                                                   \
            row_child_done(FM_OK, (cond) ? 1 : 0, NULL, 0);                                   \
        }                                                                                     \
        finish_value(cat, what);                                                              \
    } while (0)
#define NOTHING (void)0

/* ---- shared fixture: small shapes, valid inputs, output buffers ---------------------------- */

enum { T = 4, E = 4, K = 2, D = 8, H = 16, G = 2, BIG = 4096 };

static float *in_f;            /* BIG floats of valid input (small normals) */
static float *in_pos;          /* BIG floats in (0.5, 1.5): rstd, std, gates */
static int32_t idx_ok[T * K] = {0, 1, 1, 2, 2, 3, 3, 0};
static int32_t idx_big[T * K] = {0, 1, 1, 2, 2, E, 3, 0};  /* an expert == E */
static int32_t idx_neg[T * K] = {0, 1, 1, -1, 2, 3, 3, 0}; /* an expert < 0 */
static int32_t group_ok[T] = {0, 1, 0, 1}, group_big[T] = {0, G, 0, 1}, group_neg[T] = {0, -1, 0, 1};
static int32_t comb_ok[T] = {0, 1, 2, 3}, comb_big[T] = {0, 1, E, 3}, comb_neg[T] = {0, -1, 2, 3};
static int32_t label_ok[T] = {0, 1, 2, 0}, label_big[T] = {0, 1, 3, 0}, label_neg[T] = {0, -1, 2, 0};
static int32_t offsets_ok[E + 1] = {0, 2, 4, 6, 8}, offsets_down[E + 1] = {0, 3, 2, 6, 8};
static float *out_f[6];        /* six output buffers of BIG floats */
static int32_t *out_i[3];      /* three output buffers of BIG int32 */
static int base_regions;       /* the shared regions, always watched */

static void fixture(void) {
    int i;
    in_f = (float *)malloc(BIG * sizeof(float));
    in_pos = (float *)malloc(BIG * sizeof(float));
    for (i = 0; i < BIG; i++) in_f[i] = (float)(fm_test_normal() * 0.5), in_pos[i] = (float)(0.5 + fm_test_uniform());
    for (i = 0; i < 6; i++) out_f[i] = (float *)malloc(BIG * sizeof(float));
    for (i = 0; i < 3; i++) out_i[i] = (int32_t *)malloc(BIG * sizeof(int32_t));
    KEEP("input floats", in_f, BIG * sizeof(float));
    KEEP("positive input floats", in_pos, BIG * sizeof(float));
    KEEP("indices", idx_ok, sizeof idx_ok);
    for (i = 0; i < 6; i++) OUT("an output float buffer", out_f[i], BIG * sizeof(float));
    for (i = 0; i < 3; i++) OUT("an output int32 buffer", out_i[i], BIG * sizeof(int32_t));
    base_regions = region_count;
}

#define X in_f
#define P in_pos
#define O0 out_f[0]
#define O1 out_f[1]
#define O2 out_f[2]
#define O3 out_f[3]
#define O4 out_f[4]
#define O5 out_f[5]
#define I0 out_i[0]
#define I1 out_i[1]
#define I2 out_i[2]
#define MAXD FLEXMOE_MAX_DIM

/* ==== 1. status strings, setup, ISA, threads, memory ==================================== */

static int same_text(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static fm_isa foreign_isa(void) {
    int i;
    for (i = FM_ISA_SCALAR; i < FM_ISA_COUNT; i++)
        if (!fm_isa_supported((fm_isa)i)) return (fm_isa)i;
    return FM_ISA_AUTO;
}

static void rows_hooks(void) {
    entry("fm_status_str");
    VROW(C_VALUE, "status -1", same_text(fm_status_str((fm_status)-1), "unknown status code"));
    VROW(C_VALUE, "status FM_STATUS_COUNT", same_text(fm_status_str(FM_STATUS_COUNT), "unknown status code"));

    entry("fm_setup");
    {
        typedef struct { fm_desc d; } A;
        A base;
        base.d = setup_desc;
#define CALL(a) fm_setup(&(a).d)
        ROW(C_ISA, "isa 77 (no such path)", FM_ERR_UNKNOWN_ISA, LOG, a.d.isa = (fm_isa)77);
        ROW(C_ISA, "isa -1", FM_ERR_UNKNOWN_ISA, LOG, a.d.isa = (fm_isa)-1);
        if (foreign_isa() != FM_ISA_AUTO)
            ROW(C_ISA, "isa this CPU cannot run", FM_ERR_UNSUPPORTED_ISA, LOG, a.d.isa = foreign_isa());
#undef CALL
        fm_setup(&setup_desc);
    }

    entry("fm_set_isa");
    {
        typedef struct { fm_isa isa; } A;
        A base;
        base.isa = FM_ISA_AUTO;
#define CALL(a) fm_set_isa((a).isa)
        ROW(C_ISA, "isa -1", FM_ERR_UNKNOWN_ISA, NOLOG, a.isa = (fm_isa)-1);
        ROW(C_ISA, "isa FM_ISA_COUNT", FM_ERR_UNKNOWN_ISA, NOLOG, a.isa = FM_ISA_COUNT);
#undef CALL
        fm_setup(&setup_desc);
    }

    entry("fm_isa_supported");
    VROW(C_VALUE, "isa -1 is not supported", fm_isa_supported((fm_isa)-1) == 0);
    VROW(C_VALUE, "isa FM_ISA_COUNT is not supported", fm_isa_supported(FM_ISA_COUNT) == 0);

    entry("fm_isa_name");
    VROW(C_VALUE, "isa -1 reads unknown", same_text(fm_isa_name((fm_isa)-1), "unknown"));
    VROW(C_VALUE, "isa FM_ISA_COUNT reads unknown", same_text(fm_isa_name(FM_ISA_COUNT), "unknown"));

    entry("fm_isa_from_name");
    {
        static fm_isa isa_out;
        typedef struct { const char *name; fm_isa *isa; } A;
        A base;
        base.name = "scalar", base.isa = &isa_out;
        OUT("fm_isa_from_name's output", &isa_out, sizeof isa_out);
#define CALL(a) fm_isa_from_name((a).name, (a).isa)
        ROW(C_NULL, "isa NULL", FM_ERR_NULL_POINTER, NOLOG, a.isa = NULL);
        ROW(C_ISA, "empty name", FM_ERR_UNKNOWN_ISA, NOLOG, a.name = "");
        ROW(C_ISA, "name with a trailing space", FM_ERR_UNKNOWN_ISA, NOLOG, a.name = "scalar ");
        ROW(C_ISA, "a prefix of a name", FM_ERR_UNKNOWN_ISA, NOLOG, a.name = "avx");
#undef CALL
        drop_regions(base_regions);
    }

    entry("fm_set_threads");
    {
        const int before = fm_threads();
        VROW(C_VALUE, "threads -5 (no effect: the count in effect stays)", fm_set_threads(-5) == before && fm_threads() == before);
        fm_set_threads(0);
    }

    entry("fm_alloc");
    VROW(C_VALUE, "size SIZE_MAX - 64 (the 64-byte alignment overflows)", fm_alloc(SIZE_MAX - 64) == NULL);
}

/* ==== 3. softmax ============================================================================ */

static void rows_softmax(void) {
    entry("fm_softmax_forward");
    {
        typedef struct { int rows, cols; const float *x; int ldx; float *y; int ldy; } A;
        const A base = {T, E, X, E, O0, E};
#define CALL(a) fm_softmax_forward(a.rows, a.cols, a.x, a.ldx, a.y, a.ldy)
        ROW(C_SHAPE, "cols -1", FM_ERR_INVALID_SHAPE, NOLOG, a.cols = -1);
        ROW(C_LD, "ldx negative", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = -E);
        ROW(C_OVERFLOW, "cols above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.rows = 1, a.cols = MAXD + 1, a.ldx = a.ldy = MAXD + 1);
        ROW(C_OVERFLOW, "rows * ldy beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.rows = MAXD, a.ldy = MAXD);
#undef CALL
    }
    entry("fm_softmax_backward");
    {
        typedef struct { int rows, cols; const float *y; int ldy; const float *dy; int lddy; float *dx; int lddx; } A;
        const A base = {T, E, P, E, X, E, O0, E};
#define CALL(a) fm_softmax_backward(a.rows, a.cols, a.y, a.ldy, a.dy, a.lddy, a.dx, a.lddx)
        ROW(C_NULL, "dx NULL", FM_ERR_NULL_POINTER, NOLOG, a.dx = NULL);
        ROW(C_SHAPE, "rows 0", FM_ERR_INVALID_SHAPE, NOLOG, a.rows = 0);
        ROW(C_LD, "ldy < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = E - 1);
        ROW(C_LD, "lddy < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = E - 1);
        ROW(C_OVERFLOW, "rows above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.rows = MAXD + 1);
        ROW(C_OVERFLOW, "rows * lddx beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.rows = MAXD, a.lddx = MAXD);
#undef CALL
    }
}

/* ==== 4. top-k, gates, router losses ====================================================== */

static void rows_topk(void) {
    entry("fm_topk");
    {
        typedef struct { int rows, cols, k; const float *x; int ldx; int32_t *idx; int ldi; float *v; int ldv; } A;
        const A base = {T, E, K, X, E, I0, K, O0, K};
#define CALL(a) fm_topk(a.rows, a.cols, a.k, a.x, a.ldx, a.idx, a.ldi, a.v, a.ldv)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "indices NULL", FM_ERR_NULL_POINTER, NOLOG, a.idx = NULL);
        ROW(C_SHAPE, "rows 0", FM_ERR_INVALID_SHAPE, NOLOG, a.rows = 0);
        ROW(C_SHAPE, "cols -3", FM_ERR_INVALID_SHAPE, NOLOG, a.cols = -3);
        ROW(C_K, "k 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = 0);
        ROW(C_K, "k -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = -1);
        ROW(C_K, "k cols + 1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = E + 1, a.ldi = a.ldv = E + 1);
        ROW(C_LD, "ldx < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = E - 1);
        ROW(C_LD, "ldi < k", FM_ERR_INVALID_SHAPE, NOLOG, a.ldi = K - 1);
        ROW(C_LD, "ldv < k (values given)", FM_ERR_INVALID_SHAPE, NOLOG, a.ldv = K - 1);
        ROW(C_OVERFLOW, "rows * ldx beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.rows = MAXD, a.ldx = MAXD);
        ROW(C_OVERFLOW, "rows * ldi beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.rows = MAXD, a.ldx = 1, a.cols = 1, a.k = 1, a.ldi = MAXD);
#undef CALL
    }
    entry("fm_softmax_topk_forward");
    {
        typedef struct { int tokens, experts, k, renorm; const float *l; int ldl; int32_t *idx; int ldi; float *w; int ldw; } A;
        const A base = {T, E, K, 1, X, E, I0, K, O0, K};
#define CALL(a) fm_softmax_topk_forward(a.tokens, a.experts, a.k, a.renorm, a.l, a.ldl, a.idx, a.ldi, a.w, a.ldw)
        ROW(C_NULL, "logits NULL", FM_ERR_NULL_POINTER, NOLOG, a.l = NULL);
        ROW(C_NULL, "indices NULL", FM_ERR_NULL_POINTER, NOLOG, a.idx = NULL);
        ROW(C_NULL, "weights NULL", FM_ERR_NULL_POINTER, NOLOG, a.w = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.tokens = 0);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.experts = -1);
        ROW(C_K, "k 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = 0);
        ROW(C_K, "k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = E + 1, a.ldi = a.ldw = E + 1);
        ROW(C_K, "k > FLEXMOE_GATE_MAX_TOP_K", FM_ERR_INVALID_ARGUMENT, NOLOG, a.experts = a.ldl = 20, a.k = a.ldi = a.ldw = 17);
        ROW(C_DESC, "experts > FLEXMOE_GATE_MAX_EXPERTS", FM_ERR_INVALID_ARGUMENT, NOLOG, a.tokens = 1, a.experts = a.ldl = 1025);
        ROW(C_LD, "ldl < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.ldl = E - 1);
        ROW(C_LD, "ldi < k", FM_ERR_INVALID_SHAPE, NOLOG, a.ldi = K - 1);
        ROW(C_LD, "ldw < k", FM_ERR_INVALID_SHAPE, NOLOG, a.ldw = 0);
        ROW(C_OVERFLOW, "tokens above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.tokens = MAXD + 1);
#undef CALL
    }
    entry("fm_softmax_topk_backward");
    {
        typedef struct {
            int tokens, experts, k, renorm; const float *l; int ldl; const int32_t *idx; int ldi; const float *w; int ldw;
            const float *dw; int lddw; float *dl; int lddl;
        } A;
        const A base = {T, E, K, 1, X, E, idx_ok, K, P, K, X, K, O0, E};
#define CALL(a) fm_softmax_topk_backward(a.tokens, a.experts, a.k, a.renorm, a.l, a.ldl, a.idx, a.ldi, a.w, a.ldw, a.dw, a.lddw, a.dl, a.lddl)
        ROW(C_NULL, "logits NULL", FM_ERR_NULL_POINTER, NOLOG, a.l = NULL);
        ROW(C_NULL, "indices NULL", FM_ERR_NULL_POINTER, NOLOG, a.idx = NULL);
        ROW(C_NULL, "weights NULL", FM_ERR_NULL_POINTER, NOLOG, a.w = NULL);
        ROW(C_NULL, "d_weights NULL", FM_ERR_NULL_POINTER, NOLOG, a.dw = NULL);
        ROW(C_NULL, "d_logits NULL", FM_ERR_NULL_POINTER, NOLOG, a.dl = NULL);
        ROW(C_SHAPE, "tokens -2", FM_ERR_INVALID_SHAPE, NOLOG, a.tokens = -2);
        ROW(C_K, "k 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = 0);
        ROW(C_K, "k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = 5);
        ROW(C_INDEX, "an index == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.idx = idx_big);
        ROW(C_INDEX, "an index < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.idx = idx_neg);
        ROW(C_LD, "ldi < k", FM_ERR_INVALID_SHAPE, NOLOG, a.ldi = 1);
        ROW(C_LD, "lddw < k", FM_ERR_INVALID_SHAPE, NOLOG, a.lddw = 1);
        ROW(C_LD, "lddl < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.lddl = 3);
#undef CALL
    }
}

static void rows_gate(void) {
    fm_gate_desc gd;
    fm_gate_tensors gt;
    memset(&gd, 0, sizeof gd);
    memset(&gt, 0, sizeof gt);
    gd.tokens = T, gd.experts = E, gd.top_k = K, gd.training = 1, gd.groups = G, gd.seed = 3;
    gt.clean_logits = X, gt.noise_logits = X + 64, gt.token_group = group_ok, gt.indices = I0, gt.gates = O0;
    gt.noisy_logits = O1, gt.importance = O2, gt.load = O3;

    entry("fm_gate_workspace_floats");
    {
        fm_gate_desc d = gd;
        VROW(C_NULL, "desc NULL gives 0", fm_gate_workspace_floats(NULL) == 0);
        d.top_k = 0;
        VROW(C_K, "top_k 0 gives 0", fm_gate_workspace_floats(&d) == 0);
        d = gd, d.experts = 1025;
        VROW(C_DESC, "experts 1025 gives 0", fm_gate_workspace_floats(&d) == 0);
        d = gd, d.tokens = 0;
        VROW(C_SHAPE, "tokens 0 gives 0", fm_gate_workspace_floats(&d) == 0);
    }

    entry("fm_noisy_gate_forward");
    {
        typedef struct { fm_gate_desc d; fm_gate_tensors t; int no_desc, no_t; } A;
        A base;
        base.d = gd, base.t = gt, base.no_desc = base.no_t = 0;
#define CALL(a) fm_noisy_gate_forward(a.no_desc ? NULL : &a.d, a.no_t ? NULL : &a.t)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "tensors NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_t = 1);
        ROW(C_NULL, "clean_logits NULL", FM_ERR_NULL_POINTER, NOLOG, a.t.clean_logits = NULL);
        ROW(C_NULL, "noise_logits NULL in training", FM_ERR_NULL_POINTER, NOLOG, a.t.noise_logits = NULL);
        ROW(C_NULL, "indices NULL", FM_ERR_NULL_POINTER, NOLOG, a.t.indices = NULL);
        ROW(C_NULL, "gates NULL", FM_ERR_NULL_POINTER, NOLOG, a.t.gates = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.tokens = 0);
        ROW(C_SHAPE, "experts 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.experts = 0);
        ROW(C_K, "top_k 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = 0);
        ROW(C_K, "top_k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = E + 1);
        ROW(C_K, "top_k 17", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.experts = 20, a.d.top_k = 17);
        ROW(C_DESC, "experts 1025", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.tokens = 1, a.d.experts = 1025);
        ROW(C_DESC, "groups 17", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.groups = 17);
        ROW(C_DESC, "groups -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.groups = -1);
        ROW(C_LD, "ld_clean < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.t.ld_clean = E - 1);
        ROW(C_LD, "ld_noise < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.t.ld_noise = 1);
        ROW(C_LD, "ld_indices < top_k", FM_ERR_INVALID_SHAPE, NOLOG, a.t.ld_indices = 1);
        ROW(C_LD, "ld_gates negative", FM_ERR_INVALID_SHAPE, NOLOG, a.t.ld_gates = -1);
        ROW(C_LD, "ld_noisy < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.t.ld_noisy = 2);
        ROW(C_INDEX, "a token_group == groups", FM_ERR_INVALID_ARGUMENT, NOLOG, a.t.token_group = group_big);
        ROW(C_INDEX, "a token_group < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.t.token_group = group_neg);
        ROW(C_INDEX, "token_group 1 with groups 0 (= 1)", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.groups = 0);
        ROW(C_OVERFLOW, "tokens above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.d.tokens = MAXD + 1, a.t.token_group = NULL);
#undef CALL
    }

    entry("fm_noisy_gate_backward");
    {
        typedef struct { fm_gate_desc d; fm_gate_tensors t; fm_gate_gradients g; int no_desc, no_t, no_g; } A;
        A base;
        base.d = gd, base.t = gt, base.no_desc = base.no_t = base.no_g = 0;
        base.t.indices = idx_ok, base.t.gates = P, base.t.noisy_logits = NULL, base.t.importance = base.t.load = NULL;
        memset(&base.g, 0, sizeof base.g);
        base.g.d_gates = X, base.g.d_importance = X + 100, base.g.d_load = X + 200, base.g.d_noisy_logits = X + 300;
        base.g.d_clean_logits = O0, base.g.d_noise_logits = O1;
#define CALL(a) fm_noisy_gate_backward(a.no_desc ? NULL : &a.d, a.no_t ? NULL : &a.t, a.no_g ? NULL : &a.g)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "tensors NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_t = 1);
        ROW(C_NULL, "gradients NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_g = 1);
        ROW(C_NULL, "d_clean_logits NULL", FM_ERR_NULL_POINTER, NOLOG, a.g.d_clean_logits = NULL);
        ROW(C_NULL, "d_noise_logits NULL in training", FM_ERR_NULL_POINTER, NOLOG, a.g.d_noise_logits = NULL);
        ROW(C_NULL, "gates NULL", FM_ERR_NULL_POINTER, NOLOG, a.t.gates = NULL);
        ROW(C_NULL, "indices NULL", FM_ERR_NULL_POINTER, NOLOG, a.t.indices = NULL);
        ROW(C_K, "top_k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = E + 1);
        ROW(C_INDEX, "an index == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.t.indices = idx_big);
        ROW(C_INDEX, "an index < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.t.indices = idx_neg);
        ROW(C_INDEX, "a token_group == groups", FM_ERR_INVALID_ARGUMENT, NOLOG, a.t.token_group = group_big);
        ROW(C_LD, "ld_d_gates < top_k", FM_ERR_INVALID_SHAPE, NOLOG, a.g.ld_d_gates = 1);
        ROW(C_LD, "ld_d_noisy < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.g.ld_d_noisy = 3);
        ROW(C_LD, "ld_d_clean < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.g.ld_d_clean = 3);
        ROW(C_LD, "ld_d_noise < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.g.ld_d_noise = -4);
        ROW(C_NAN, "noise_epsilon NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.noise_epsilon = NAN);
#undef CALL
    }

    entry("fm_gate_noise_forward");
    {
        typedef struct { fm_gate_desc d; int no_desc; const float *c; int ldc; const float *n; int ldn; float *y; int ldy; float *s; int lds; } A;
        A base;
        base.d = gd, base.no_desc = 0, base.c = X, base.ldc = E, base.n = X + 64, base.ldn = E, base.y = O0, base.ldy = E;
        base.s = O1, base.lds = E;
#define CALL(a) fm_gate_noise_forward(a.no_desc ? NULL : &a.d, a.c, a.ldc, a.n, a.ldn, a.y, a.ldy, a.s, a.lds)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "clean NULL", FM_ERR_NULL_POINTER, NOLOG, a.c = NULL);
        ROW(C_NULL, "noise NULL", FM_ERR_NULL_POINTER, NOLOG, a.n = NULL);
        ROW(C_NULL, "noisy NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.tokens = 0);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.experts = -1);
        ROW(C_LD, "ldc < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.ldc = E - 1);
        ROW(C_LD, "ldn < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.ldn = E - 1);
        ROW(C_LD, "ldy < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = 0);
        ROW(C_LD, "lds < experts (std given)", FM_ERR_INVALID_SHAPE, NOLOG, a.lds = 1);
        ROW(C_OVERFLOW, "experts above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.d.tokens = 1, a.d.experts = MAXD + 1, a.ldc = a.ldn = a.ldy = a.lds = MAXD + 1);
#undef CALL
    }

    entry("fm_gate_load_forward");
    {
        typedef struct {
            fm_gate_desc d; int no_desc; const float *c; int ldc; const float *n; int ldn; const float *s; int lds;
            const float *v; int ldv; const int32_t *g; float *load;
        } A;
        A base;
        base.d = gd, base.no_desc = 0, base.c = X, base.ldc = E, base.n = X + 64, base.ldn = E, base.s = P, base.lds = E;
        base.v = X + 128, base.ldv = K + 1, base.g = group_ok, base.load = O0;
#define CALL(a) fm_gate_load_forward(a.no_desc ? NULL : &a.d, a.c, a.ldc, a.n, a.ldn, a.s, a.lds, a.v, a.ldv, a.g, a.load)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "clean NULL", FM_ERR_NULL_POINTER, NOLOG, a.c = NULL);
        ROW(C_NULL, "noisy NULL", FM_ERR_NULL_POINTER, NOLOG, a.n = NULL);
        ROW(C_NULL, "std NULL", FM_ERR_NULL_POINTER, NOLOG, a.s = NULL);
        ROW(C_NULL, "top_values NULL", FM_ERR_NULL_POINTER, NOLOG, a.v = NULL);
        ROW(C_NULL, "load NULL", FM_ERR_NULL_POINTER, NOLOG, a.load = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.tokens = 0);
        ROW(C_K, "top_k == experts (needs < experts)", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = E, a.ldv = E + 1);
        ROW(C_K, "top_k 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = 0);
        ROW(C_DESC, "groups 17", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.groups = 17);
        ROW(C_LD, "ldv < top_k + 1", FM_ERR_INVALID_SHAPE, NOLOG, a.ldv = K);
        ROW(C_LD, "lds < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.lds = 2);
        ROW(C_INDEX, "a token_group == groups", FM_ERR_INVALID_ARGUMENT, NOLOG, a.g = group_big);
        ROW(C_INDEX, "a token_group < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.g = group_neg);
#undef CALL
    }

    entry("fm_gate_noise");
    VROW(C_VALUE, "expert INT_MIN draws a finite number", isfinite(fm_gate_noise(1, 2, INT_MIN)));

    entry("fm_gate_logits_forward");
    {
        typedef struct { int t, d, e; const float *x; int ldx; const float *wg, *wn; float *c, *n; } A;
        const A base = {T, D, E, X, D, X + 100, X + 200, O0, O1};
#define CALL(a) fm_gate_logits_forward(a.t, a.d, a.e, a.x, a.ldx, a.wg, a.wn, a.c, a.n)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "w_gate NULL", FM_ERR_NULL_POINTER, NOLOG, a.wg = NULL);
        ROW(C_NULL, "clean NULL", FM_ERR_NULL_POINTER, NOLOG, a.c = NULL);
        ROW(C_NULL, "noise NULL with w_noise given", FM_ERR_NULL_POINTER, NOLOG, a.n = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.t = 0);
        ROW(C_SHAPE, "dim 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d = 0);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.e = -1);
        ROW(C_LD, "ldx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = D - 1);
        ROW(C_OVERFLOW, "dim above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.t = 1, a.d = a.ldx = MAXD + 1);
#undef CALL
    }
    entry("fm_gate_logits_backward");
    {
        typedef struct { int t, d, e; const float *x; int ldx; const float *wg, *wn, *dc, *dn; float *dx; int lddx; float *dwg, *dwn; } A;
        const A base = {T, D, E, X, D, X + 100, X + 200, X + 300, X + 400, O0, D, O1, O2};
#define CALL(a) fm_gate_logits_backward(a.t, a.d, a.e, a.x, a.ldx, a.wg, a.wn, a.dc, a.dn, a.dx, a.lddx, a.dwg, a.dwn)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "w_gate NULL", FM_ERR_NULL_POINTER, NOLOG, a.wg = NULL);
        ROW(C_NULL, "d_clean NULL", FM_ERR_NULL_POINTER, NOLOG, a.dc = NULL);
        ROW(C_NULL, "w_noise NULL, d_noise given", FM_ERR_NULL_POINTER, NOLOG, a.wn = NULL);
        ROW(C_NULL, "d_noise NULL, w_noise given", FM_ERR_NULL_POINTER, NOLOG, a.dn = NULL);
        ROW(C_SHAPE, "tokens -1", FM_ERR_INVALID_SHAPE, NOLOG, a.t = -1);
        ROW(C_SHAPE, "experts 0", FM_ERR_INVALID_SHAPE, NOLOG, a.e = 0);
        ROW(C_LD, "ldx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = 3);
        ROW(C_LD, "lddx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 3);
#undef CALL
    }
}

static void rows_losses(void) {
    static float value;
    OUT("a loss value", &value, sizeof value);
    entry("fm_cv_squared");
    {
        typedef struct { int n; const float *v; float *value, *dv; } A;
        const A base = {E, P, &value, O0};
#define CALL(a) fm_cv_squared(a.n, a.v, a.value, a.dv)
        ROW(C_SHAPE, "n 0", FM_ERR_INVALID_SHAPE, NOLOG, a.n = 0);
        ROW(C_SHAPE, "n -1", FM_ERR_INVALID_SHAPE, NOLOG, a.n = -1);
        ROW(C_NULL, "v NULL", FM_ERR_NULL_POINTER, NOLOG, a.v = NULL);
        ROW(C_NULL, "value NULL", FM_ERR_NULL_POINTER, NOLOG, a.value = NULL);
        ROW(C_OVERFLOW, "n above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.n = MAXD + 1);
#undef CALL
    }
    entry("fm_router_cross_entropy");
    {
        typedef struct { int t, e; const float *l; int ldl; const int32_t *tg; float *value, *dl; int lddl; } A;
        const A base = {T, E, X, E, comb_ok, &value, O0, E};
#define CALL(a) fm_router_cross_entropy(a.t, a.e, a.l, a.ldl, a.tg, a.value, a.dl, a.lddl)
        ROW(C_NULL, "logits NULL", FM_ERR_NULL_POINTER, NOLOG, a.l = NULL);
        ROW(C_NULL, "targets NULL", FM_ERR_NULL_POINTER, NOLOG, a.tg = NULL);
        ROW(C_NULL, "value NULL", FM_ERR_NULL_POINTER, NOLOG, a.value = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.t = 0);
        ROW(C_SHAPE, "experts 0", FM_ERR_INVALID_SHAPE, NOLOG, a.e = 0);
        ROW(C_LD, "ldl < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.ldl = 3);
        ROW(C_LD, "lddl < experts (d_logits given)", FM_ERR_INVALID_SHAPE, NOLOG, a.lddl = 3);
        ROW(C_INDEX, "a target == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.tg = comb_big);
#undef CALL
    }
    entry("fm_flexmoe_router_loss");
    {
        typedef struct {
            int t, e, g; const float *l; int ldl; const int32_t *c; const float *imp, *load; float *value, *dl; int lddl;
            float *dimp, *dload;
        } A;
        const A base = {T, E, G, X, E, comb_ok, P, P + 64, &value, O0, E, O1, O2};
#define CALL(a) fm_flexmoe_router_loss(a.t, a.e, a.g, a.l, a.ldl, a.c, a.imp, a.load, a.value, a.dl, a.lddl, a.dimp, a.dload)
        ROW(C_NULL, "combination NULL", FM_ERR_NULL_POINTER, NOLOG, a.c = NULL);
        ROW(C_NULL, "importance NULL", FM_ERR_NULL_POINTER, NOLOG, a.imp = NULL);
        ROW(C_NULL, "load NULL", FM_ERR_NULL_POINTER, NOLOG, a.load = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.t = 0);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.e = -1);
        ROW(C_DESC, "groups 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.g = 0);
        ROW(C_LD, "ldl < experts", FM_ERR_INVALID_SHAPE, NOLOG, a.ldl = 3);
        ROW(C_LD, "lddl < experts (d_noisy_logits given)", FM_ERR_INVALID_SHAPE, NOLOG, a.lddl = 3);
        ROW(C_INDEX, "a combination == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.c = comb_big);
        ROW(C_INDEX, "a combination < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.c = comb_neg);
#undef CALL
    }
    drop_regions(base_regions);
}

/* ==== 5. LayerNorm and ConfSMoE ============================================================ */

static void rows_layernorm(void) {
    entry("fm_layernorm_forward");
    {
        typedef struct { int r, c; const float *x; int ldx; const float *g, *b; float eps; float *y; int ldy; float *m, *s; } A;
        const A base = {T, D, X, D, P, X + 100, 0.0f, O0, D, O1, O2};
#define CALL(a) fm_layernorm_forward(a.r, a.c, a.x, a.ldx, a.g, a.b, a.eps, a.y, a.ldy, a.m, a.s)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "y NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_SHAPE, "rows 0", FM_ERR_INVALID_SHAPE, NOLOG, a.r = 0);
        ROW(C_SHAPE, "cols -8", FM_ERR_INVALID_SHAPE, NOLOG, a.c = -8);
        ROW(C_LD, "ldx < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = D - 1);
        ROW(C_LD, "ldy < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = D - 1);
        ROW(C_DESC, "eps -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.eps = -1.0f);
        ROW(C_NAN, "eps NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.eps = NAN);
        ROW(C_OVERFLOW, "rows * ldx beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.r = MAXD, a.ldx = MAXD);
#undef CALL
    }
    entry("fm_layernorm_backward");
    {
        typedef struct {
            int r, c; const float *x; int ldx; const float *g, *m, *s, *dy; int lddy; float *dx; int lddx; float *dg, *db;
        } A;
        const A base = {T, D, X, D, P, X + 100, P + 100, X + 200, D, O0, D, O1, O2};
#define CALL(a) fm_layernorm_backward(a.r, a.c, a.x, a.ldx, a.g, a.m, a.s, a.dy, a.lddy, a.dx, a.lddx, a.dg, a.db)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "mean NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_NULL, "rstd NULL", FM_ERR_NULL_POINTER, NOLOG, a.s = NULL);
        ROW(C_NULL, "dy NULL", FM_ERR_NULL_POINTER, NOLOG, a.dy = NULL);
        ROW(C_NULL, "dx NULL", FM_ERR_NULL_POINTER, NOLOG, a.dx = NULL);
        ROW(C_SHAPE, "rows -1", FM_ERR_INVALID_SHAPE, NOLOG, a.r = -1);
        ROW(C_SHAPE, "cols 0", FM_ERR_INVALID_SHAPE, NOLOG, a.c = 0);
        ROW(C_LD, "ldx < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = 1);
        ROW(C_LD, "lddy < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = 1);
        ROW(C_LD, "lddx < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 1);
        ROW(C_OVERFLOW, "cols above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.r = 1, a.c = a.ldx = a.lddy = a.lddx = MAXD + 1);
#undef CALL
    }
}

static fm_confsmoe_desc conf_desc(void) {
    fm_confsmoe_desc d;
    memset(&d, 0, sizeof d);
    d.tokens = T, d.k = K, d.experts = E, d.dim = D, d.classes = 3;
    return d;
}

static fm_confsmoe_params conf_params(void) {
    fm_confsmoe_params p;
    p.w = X, p.b = X + 64, p.gamma = P, p.beta = X + 100, p.probe_w = X + 200, p.probe_b = X + 400;
    return p;
}

static void rows_confsmoe(void) {
    static size_t floats;
    size_t saved_floats = 0;
    float *saved = (float *)malloc(1024 * sizeof(float));
    fm_confsmoe_desc cd = conf_desc();
    fm_confsmoe_params cp = conf_params();
    fm_confsmoe_grads cg;
    float losses[2];
    fm_confsmoe_saved_floats(&cd, &saved_floats);
    FM_CHECK(saved_floats <= 1024, "the ConfSMoE fixture's saved buffer is large enough (%zu)", saved_floats);

    entry("fm_confsmoe_saved_floats");
    OUT("the floats output", &floats, sizeof floats);
    {
        typedef struct { fm_confsmoe_desc d; int no_desc; size_t *f; } A;
        A base;
        base.d = cd, base.no_desc = 0, base.f = &floats;
#define CALL(a) fm_confsmoe_saved_floats(a.no_desc ? NULL : &a.d, a.f)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "floats NULL", FM_ERR_NULL_POINTER, NOLOG, a.f = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.tokens = 0);
        ROW(C_SHAPE, "dim -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.dim = -1);
        ROW(C_SHAPE, "classes 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.classes = 0);
        ROW(C_K, "k 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.k = 0);
        ROW(C_K, "k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.k = E + 1);
        ROW(C_OVERFLOW, "tokens * k above INT32_MAX", FM_ERR_OVERFLOW, NOLOG, a.d.tokens = INT_MAX, a.d.k = 2);
#undef CALL
    }
    drop_regions(base_regions);

    entry("fm_confsmoe_forward");
    OUT("the saved buffer", saved, 1024 * sizeof(float));
    OUT("the losses", losses, sizeof losses);
    {
        typedef struct {
            fm_confsmoe_desc d; fm_confsmoe_params p; int no_desc, no_p; const int32_t *ex, *lab; const float *x; int ldx;
            const float *h; int ldh; float *out; int ldout; float *conf, *target, *losses, *saved;
        } A;
        A base;
        base.d = cd, base.p = cp, base.no_desc = base.no_p = 0, base.ex = idx_ok, base.lab = label_ok, base.x = X + 1000;
        base.ldx = D, base.h = X + 2000, base.ldh = D, base.out = O0, base.ldout = D, base.conf = O1, base.target = O2;
        base.losses = losses, base.saved = saved;
#define CALL(a) fm_confsmoe_forward(a.no_desc ? NULL : &a.d, a.no_p ? NULL : &a.p, a.ex, a.lab, a.x, a.ldx, a.h, a.ldh, a.out, a.ldout, a.conf, a.target, a.losses, a.saved)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "params NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_p = 1);
        ROW(C_NULL, "experts NULL", FM_ERR_NULL_POINTER, NOLOG, a.ex = NULL);
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "h NULL", FM_ERR_NULL_POINTER, NOLOG, a.h = NULL);
        ROW(C_NULL, "out NULL", FM_ERR_NULL_POINTER, NOLOG, a.out = NULL);
        ROW(C_NULL, "saved NULL", FM_ERR_NULL_POINTER, NOLOG, a.saved = NULL);
        ROW(C_NULL, "params.w NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w = NULL);
        ROW(C_NULL, "params.b NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.b = NULL);
        ROW(C_NULL, "params.probe_w NULL with labels", FM_ERR_NULL_POINTER, NOLOG, a.p.probe_w = NULL);
        ROW(C_NULL, "params.probe_b NULL with labels", FM_ERR_NULL_POINTER, NOLOG, a.p.probe_b = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.tokens = 0);
        ROW(C_K, "k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.k = E + 1);
        ROW(C_DESC, "mode 7", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.mode = (fm_conf_mode)7);
        ROW(C_NAN, "eps NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.eps = NAN);
        ROW(C_LD, "ldx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = D - 1);
        ROW(C_LD, "ldh < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldh = D - 1);
        ROW(C_LD, "ldout < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldout = D - 1);
        ROW(C_INDEX, "an expert == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.ex = idx_big);
        ROW(C_INDEX, "an expert < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.ex = idx_neg);
        ROW(C_INDEX, "a label == classes", FM_ERR_INVALID_ARGUMENT, NOLOG, a.lab = label_big);
        ROW(C_INDEX, "a label < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.lab = label_neg);
        ROW(C_DESC, "out overlaps x", FM_ERR_INVALID_ARGUMENT, NOLOG, a.x = O0 + 4, a.out = O0);
#undef CALL
    }
    /* a valid forward for the backward's rows */
    drop_regions(base_regions);
    FM_CHECK(fm_confsmoe_forward(&cd, &cp, idx_ok, label_ok, X + 1000, D, X + 2000, D, O5, D, NULL, NULL, losses, saved) == FM_OK,
             "the ConfSMoE fixture's forward");

    entry("fm_confsmoe_backward");
    memset(&cg, 0, sizeof cg);
    cg.w = O2, cg.b = O2 + 100, cg.gamma = O2 + 200, cg.beta = O2 + 300, cg.probe_w = O3, cg.probe_b = O3 + 1000;
    KEEP("the saved buffer", saved, 1024 * sizeof(float));
    {
        typedef struct {
            fm_confsmoe_desc d; fm_confsmoe_params p; int no_desc, no_p; const int32_t *ex, *lab; const float *x; int ldx;
            const float *h; int ldh; const float *dout; int lddout; float dlc, dlp; float *saved, *dx; int lddx; float *dh;
            int lddh; fm_confsmoe_grads g;
        } A;
        A base;
        base.d = cd, base.p = cp, base.no_desc = base.no_p = 0, base.ex = idx_ok, base.lab = label_ok, base.x = X + 1000;
        base.ldx = D, base.h = X + 2000, base.ldh = D, base.dout = X + 3000, base.lddout = D, base.dlc = 1, base.dlp = 1;
        base.saved = saved, base.dx = O0, base.lddx = D, base.dh = O1, base.lddh = D, base.g = cg;
#define CALL(a) fm_confsmoe_backward(a.no_desc ? NULL : &a.d, a.no_p ? NULL : &a.p, a.ex, a.lab, a.x, a.ldx, a.h, a.ldh, a.dout, a.lddout, a.dlc, a.dlp, a.saved, a.dx, a.lddx, a.dh, a.lddh, &a.g)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "params NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_p = 1);
        ROW(C_NULL, "experts NULL", FM_ERR_NULL_POINTER, NOLOG, a.ex = NULL);
        ROW(C_NULL, "dout NULL", FM_ERR_NULL_POINTER, NOLOG, a.dout = NULL);
        ROW(C_NULL, "saved NULL", FM_ERR_NULL_POINTER, NOLOG, a.saved = NULL);
        ROW(C_NULL, "dx NULL", FM_ERR_NULL_POINTER, NOLOG, a.dx = NULL);
        ROW(C_NULL, "dh NULL", FM_ERR_NULL_POINTER, NOLOG, a.dh = NULL);
        ROW(C_SHAPE, "dim 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.dim = 0);
        ROW(C_K, "k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.k = E + 1);
        ROW(C_LD, "lddout < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddout = 2);
        ROW(C_LD, "lddx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 2);
        ROW(C_LD, "lddh < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddh = 2);
        ROW(C_INDEX, "an expert == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.ex = idx_big);
        ROW(C_INDEX, "a label == classes", FM_ERR_INVALID_ARGUMENT, NOLOG, a.lab = label_big);
        ROW(C_DESC, "dx overlaps dout", FM_ERR_INVALID_ARGUMENT, NOLOG, a.dout = O0 + 2);
#undef CALL
    }
    drop_regions(base_regions);
    free(saved);
}

/* ==== 6. routing plan, dispatch, combine ==================================================== */

static void rows_plan(void) {
    static fm_routing_plan plan_out, plan_ok;
    static int32_t counts[E], offsets[E + 1], order[T * K], position[T * K], dropped[E];
    fm_plan_desc pd;
    memset(&pd, 0, sizeof pd);
    pd.tokens = T, pd.top_k = K, pd.experts = E;

    entry("fm_routing_plan_build");
    memset(&plan_out, SENTINEL_BYTE, sizeof plan_out);
    plan_out.counts = I0, plan_out.offsets = I0 + 100, plan_out.order = I0 + 200, plan_out.position = I0 + 300;
    plan_out.dropped_per_expert = I0 + 400;
    KEEP("the plan struct", &plan_out, sizeof plan_out);
    {
        typedef struct { fm_plan_desc d; int no_desc; const int32_t *idx; int ldi; const float *g; int ldg; fm_routing_plan *plan; } A;
        A base;
        base.d = pd, base.no_desc = 0, base.idx = idx_ok, base.ldi = K, base.g = P, base.ldg = K, base.plan = &plan_out;
#define CALL(a) fm_routing_plan_build(a.no_desc ? NULL : &a.d, a.idx, a.ldi, a.g, a.ldg, a.plan)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "plan NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = NULL);
        ROW(C_NULL, "indices NULL", FM_ERR_NULL_POINTER, NOLOG, a.idx = NULL);
        ROW(C_NULL, "gates NULL with FM_DROP_BY_GATE", FM_ERR_NULL_POINTER, NOLOG, a.d.capacity_factor = 1.0f, a.d.drop_policy = FM_DROP_BY_GATE, a.g = NULL);
        {
            static fm_routing_plan p;
            p = plan_out, p.counts = NULL;
            ROW(C_NULL, "plan->counts NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = &p);
            p = plan_out, p.offsets = NULL;
            ROW(C_NULL, "plan->offsets NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = &p);
            p = plan_out, p.order = NULL;
            ROW(C_NULL, "plan->order NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = &p);
            p = plan_out, p.position = NULL;
            ROW(C_NULL, "plan->position NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = &p);
        }
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.tokens = 0);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.experts = -1);
        ROW(C_K, "top_k 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.top_k = 0);
        ROW(C_K, "top_k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = E + 1);
        ROW(C_DESC, "capacity_factor -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.capacity_factor = -1.0f);
        ROW(C_NAN, "capacity_factor NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.capacity_factor = NAN);
        ROW(C_DESC, "drop_policy 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.drop_policy = (fm_drop_policy)9);
        ROW(C_DESC, "drop_policy -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.drop_policy = (fm_drop_policy)-1);
        ROW(C_LD, "ldi < top_k", FM_ERR_INVALID_SHAPE, NOLOG, a.ldi = 1);
        ROW(C_LD, "ldg < top_k with FM_DROP_BY_GATE", FM_ERR_INVALID_SHAPE, NOLOG, a.d.capacity_factor = 1.0f, a.d.drop_policy = FM_DROP_BY_GATE, a.ldg = 1);
        ROW(C_INDEX, "an index == experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.idx = idx_big);
        ROW(C_INDEX, "an index < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.idx = idx_neg);
        ROW(C_OVERFLOW, "tokens * top_k above INT32_MAX", FM_ERR_OVERFLOW, NOLOG, a.d.tokens = INT_MAX, a.d.top_k = 2, a.ldi = 2);
#undef CALL
    }
    drop_regions(base_regions);

    memset(&plan_ok, 0, sizeof plan_ok);
    plan_ok.counts = counts, plan_ok.offsets = offsets, plan_ok.order = order, plan_ok.position = position;
    plan_ok.dropped_per_expert = dropped;
    FM_CHECK(fm_routing_plan_build(&pd, idx_ok, K, NULL, 0, &plan_ok) == FM_OK, "the fixture's plan");
    KEEP("the plan", &plan_ok, sizeof plan_ok);
    KEEP("the plan's order", order, sizeof order);
    KEEP("the plan's position", position, sizeof position);

    entry("fm_dispatch_forward");
    {
        typedef struct { const fm_routing_plan *plan; int dim; const float *x; int ldx; float *xe; int ldxe; } A;
        const A base = {&plan_ok, D, X, D, O0, D};
#define CALL(a) fm_dispatch_forward(a.plan, a.dim, a.x, a.ldx, a.xe, a.ldxe)
        ROW(C_NULL, "plan NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = NULL);
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "xe NULL", FM_ERR_NULL_POINTER, NOLOG, a.xe = NULL);
        ROW(C_SHAPE, "dim 0", FM_ERR_INVALID_SHAPE, NOLOG, a.dim = 0);
        ROW(C_LD, "ldx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = D - 1);
        ROW(C_LD, "ldxe < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldxe = D - 1);
        {
            static fm_routing_plan p;
            p = plan_ok, p.order = NULL;
            ROW(C_NULL, "plan->order NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = &p);
            p = plan_ok, p.rows = -1;
            ROW(C_STATE, "plan->rows -1", FM_ERR_INVALID_SHAPE, NOLOG, a.plan = &p);
            p = plan_ok, p.rows = T * K + 1;
            ROW(C_STATE, "plan->rows > tokens * top_k", FM_ERR_INVALID_SHAPE, NOLOG, a.plan = &p);
            p = plan_ok, p.top_k = 0;
            ROW(C_STATE, "plan->top_k 0", FM_ERR_INVALID_SHAPE, NOLOG, a.plan = &p);
        }
        ROW(C_OVERFLOW, "dim above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.dim = a.ldx = a.ldxe = MAXD + 1);
#undef CALL
    }
    entry("fm_dispatch_backward");
    {
        typedef struct { const fm_routing_plan *plan; int dim; const float *dxe; int lddxe; float *dx; int lddx; } A;
        const A base = {&plan_ok, D, X, D, O0, D};
#define CALL(a) fm_dispatch_backward(a.plan, a.dim, a.dxe, a.lddxe, a.dx, a.lddx)
        ROW(C_NULL, "plan NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = NULL);
        ROW(C_NULL, "dxe NULL", FM_ERR_NULL_POINTER, NOLOG, a.dxe = NULL);
        ROW(C_NULL, "dx NULL", FM_ERR_NULL_POINTER, NOLOG, a.dx = NULL);
        ROW(C_SHAPE, "dim -1", FM_ERR_INVALID_SHAPE, NOLOG, a.dim = -1);
        ROW(C_LD, "lddxe < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddxe = 1);
        ROW(C_LD, "lddx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 1);
        {
            static fm_routing_plan p;
            p = plan_ok, p.position = NULL;
            ROW(C_NULL, "plan->position NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = &p);
        }
#undef CALL
    }
    entry("fm_combine_forward");
    {
        typedef struct { const fm_routing_plan *plan; int dim; const float *ye; int ldye; const float *g; int ldg; float *y; int ldy; } A;
        const A base = {&plan_ok, D, X, D, P, K, O0, D};
#define CALL(a) fm_combine_forward(a.plan, a.dim, a.ye, a.ldye, a.g, a.ldg, a.y, a.ldy)
        ROW(C_NULL, "plan NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = NULL);
        ROW(C_NULL, "ye NULL", FM_ERR_NULL_POINTER, NOLOG, a.ye = NULL);
        ROW(C_NULL, "gates NULL", FM_ERR_NULL_POINTER, NOLOG, a.g = NULL);
        ROW(C_NULL, "y NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_SHAPE, "dim 0", FM_ERR_INVALID_SHAPE, NOLOG, a.dim = 0);
        ROW(C_LD, "ldye < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldye = 1);
        ROW(C_LD, "ldg < top_k", FM_ERR_INVALID_SHAPE, NOLOG, a.ldg = 1);
        ROW(C_LD, "ldy < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = 1);
#undef CALL
    }
    entry("fm_combine_backward");
    {
        typedef struct {
            const fm_routing_plan *plan; int dim; const float *ye; int ldye; const float *g; int ldg; const float *dy; int lddy;
            float *dye; int lddye; float *dg; int lddg;
        } A;
        const A base = {&plan_ok, D, X, D, P, K, X + 500, D, O0, D, O1, K};
#define CALL(a) fm_combine_backward(a.plan, a.dim, a.ye, a.ldye, a.g, a.ldg, a.dy, a.lddy, a.dye, a.lddye, a.dg, a.lddg)
        ROW(C_NULL, "plan NULL", FM_ERR_NULL_POINTER, NOLOG, a.plan = NULL);
        ROW(C_NULL, "ye NULL (d_gates wanted)", FM_ERR_NULL_POINTER, NOLOG, a.ye = NULL);
        ROW(C_NULL, "gates NULL (dye wanted)", FM_ERR_NULL_POINTER, NOLOG, a.g = NULL);
        ROW(C_NULL, "dy NULL", FM_ERR_NULL_POINTER, NOLOG, a.dy = NULL);
        ROW(C_SHAPE, "dim -8", FM_ERR_INVALID_SHAPE, NOLOG, a.dim = -8);
        ROW(C_LD, "lddy < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = 1);
        ROW(C_LD, "lddye < dim (dye given)", FM_ERR_INVALID_SHAPE, NOLOG, a.lddye = 1);
        ROW(C_LD, "lddg < top_k (d_gates given)", FM_ERR_INVALID_SHAPE, NOLOG, a.lddg = 1);
#undef CALL
    }
    drop_regions(base_regions);
}

/* ==== 7. grouped GEMM, GELU, expert FFN ===================================================== */

static void rows_gemm(void) {
    entry("fm_packed_weight_floats");
    VROW(C_SHAPE, "in_features 0 gives 0", fm_packed_weight_floats(0, 5) == 0);
    VROW(C_SHAPE, "out_features -1 gives 0", fm_packed_weight_floats(5, -1) == 0);
    VROW(C_OVERFLOW, "in_features above FLEXMOE_MAX_DIM gives 0", fm_packed_weight_floats(MAXD + 1, 1) == 0);

    entry("fm_pack_weights");
    {
        typedef struct { int e, in, out; fm_weight_layout l; const float *w; int ldw; float *packed; } A;
        const A base = {E, D, H, FM_WEIGHTS_IN_BY_OUT, X, H, O0};
#define CALL(a) fm_pack_weights(a.e, a.in, a.out, a.l, a.w, a.ldw, a.packed)
        ROW(C_NULL, "w NULL", FM_ERR_NULL_POINTER, NOLOG, a.w = NULL);
        ROW(C_NULL, "packed NULL", FM_ERR_NULL_POINTER, NOLOG, a.packed = NULL);
        ROW(C_SHAPE, "experts 0", FM_ERR_INVALID_SHAPE, NOLOG, a.e = 0);
        ROW(C_SHAPE, "in_features 0", FM_ERR_INVALID_SHAPE, NOLOG, a.in = 0);
        ROW(C_SHAPE, "out_features -1", FM_ERR_INVALID_SHAPE, NOLOG, a.out = -1);
        ROW(C_LD, "ldw < out_features (FM_WEIGHTS_IN_BY_OUT)", FM_ERR_INVALID_SHAPE, NOLOG, a.ldw = H - 1);
        ROW(C_LD, "ldw < in_features (FM_WEIGHTS_OUT_BY_IN)", FM_ERR_INVALID_SHAPE, NOLOG, a.l = FM_WEIGHTS_OUT_BY_IN, a.ldw = D - 1);
        ROW(C_DESC, "layout 5", FM_ERR_INVALID_ARGUMENT, NOLOG, a.l = (fm_weight_layout)5);
        ROW(C_OVERFLOW, "experts x packed floats beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.e = MAXD, a.in = MAXD, a.out = 64, a.ldw = 64);
#undef CALL
    }
    entry("fm_unpack_weights");
    {
        typedef struct { int e, in, out; fm_weight_layout l; const float *packed; float *w; int ldw; } A;
        const A base = {E, D, H, FM_WEIGHTS_IN_BY_OUT, X, O0, H};
#define CALL(a) fm_unpack_weights(a.e, a.in, a.out, a.l, a.packed, a.w, a.ldw)
        ROW(C_NULL, "packed NULL", FM_ERR_NULL_POINTER, NOLOG, a.packed = NULL);
        ROW(C_NULL, "w NULL", FM_ERR_NULL_POINTER, NOLOG, a.w = NULL);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.e = -1);
        ROW(C_SHAPE, "out_features 0", FM_ERR_INVALID_SHAPE, NOLOG, a.out = 0);
        ROW(C_LD, "ldw < out_features", FM_ERR_INVALID_SHAPE, NOLOG, a.ldw = 1);
        ROW(C_DESC, "layout -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.l = (fm_weight_layout)-1);
        ROW(C_OVERFLOW, "out_features above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.e = 1, a.in = 1, a.out = a.ldw = MAXD + 1);
#undef CALL
    }
    entry("fm_grouped_gemm_forward");
    {
        typedef struct { int e; const int32_t *off; int in, out; const float *x; int ldx; const float *w, *b; float *y; int ldy; } A;
        const A base = {E, offsets_ok, D, H, X, D, P, X + 100, O0, H};
#define CALL(a) fm_grouped_gemm_forward(a.e, a.off, a.in, a.out, a.x, a.ldx, a.w, a.b, a.y, a.ldy)
        ROW(C_NULL, "offsets NULL", FM_ERR_NULL_POINTER, NOLOG, a.off = NULL);
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "packed_w NULL", FM_ERR_NULL_POINTER, NOLOG, a.w = NULL);
        ROW(C_NULL, "y NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_SHAPE, "experts 0", FM_ERR_INVALID_SHAPE, NOLOG, a.e = 0);
        ROW(C_SHAPE, "in_features 0", FM_ERR_INVALID_SHAPE, NOLOG, a.in = 0);
        ROW(C_SHAPE, "out_features -1", FM_ERR_INVALID_SHAPE, NOLOG, a.out = -1);
        ROW(C_LD, "ldx < in_features", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = D - 1);
        ROW(C_LD, "ldy < out_features", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = H - 1);
        ROW(C_INDEX, "offsets decreasing", FM_ERR_INVALID_ARGUMENT, NOLOG, a.off = offsets_down);
        ROW(C_OVERFLOW, "in_features above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.in = a.ldx = MAXD + 1);
#undef CALL
    }
    entry("fm_grouped_gemm_backward");
    {
        typedef struct {
            int e; const int32_t *off; int in, out; const float *x; int ldx; const float *w, *dy; int lddy; float *dx; int lddx;
            float *dw, *db;
        } A;
        const A base = {E, offsets_ok, D, H, X, D, P, X + 200, H, O0, D, O1, O2};
#define CALL(a) fm_grouped_gemm_backward(a.e, a.off, a.in, a.out, a.x, a.ldx, a.w, a.dy, a.lddy, a.dx, a.lddx, a.dw, a.db)
        ROW(C_NULL, "offsets NULL", FM_ERR_NULL_POINTER, NOLOG, a.off = NULL);
        ROW(C_NULL, "dy NULL", FM_ERR_NULL_POINTER, NOLOG, a.dy = NULL);
        ROW(C_NULL, "x NULL (d_packed_w wanted)", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "packed_w NULL (dx wanted)", FM_ERR_NULL_POINTER, NOLOG, a.w = NULL);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.e = -1);
        ROW(C_SHAPE, "in_features 0", FM_ERR_INVALID_SHAPE, NOLOG, a.in = 0);
        ROW(C_LD, "lddy < out_features", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = 1);
        ROW(C_LD, "lddx < in_features", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 1);
        ROW(C_LD, "ldx < in_features", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = 1);
        ROW(C_INDEX, "offsets decreasing", FM_ERR_INVALID_ARGUMENT, NOLOG, a.off = offsets_down);
#undef CALL
    }
    entry("fm_gelu_forward");
    {
        typedef struct { int r, c; fm_gelu k; const float *x; int ldx; float *y; int ldy; } A;
        const A base = {T, D, FM_GELU_ERF, X, D, O0, D};
#define CALL(a) fm_gelu_forward(a.r, a.c, a.k, a.x, a.ldx, a.y, a.ldy)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "y NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_SHAPE, "rows 0", FM_ERR_INVALID_SHAPE, NOLOG, a.r = 0);
        ROW(C_SHAPE, "cols -1", FM_ERR_INVALID_SHAPE, NOLOG, a.c = -1);
        ROW(C_LD, "ldx < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = 1);
        ROW(C_LD, "ldy < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = 1);
        ROW(C_DESC, "kind 7", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = (fm_gelu)7);
        ROW(C_OVERFLOW, "rows * ldy beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.r = MAXD, a.ldy = MAXD);
#undef CALL
    }
    entry("fm_gelu_backward");
    {
        typedef struct { int r, c; fm_gelu k; const float *x; int ldx; const float *dy; int lddy; float *dx; int lddx; } A;
        const A base = {T, D, FM_GELU_TANH, X, D, X + 100, D, O0, D};
#define CALL(a) fm_gelu_backward(a.r, a.c, a.k, a.x, a.ldx, a.dy, a.lddy, a.dx, a.lddx)
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "dy NULL", FM_ERR_NULL_POINTER, NOLOG, a.dy = NULL);
        ROW(C_NULL, "dx NULL", FM_ERR_NULL_POINTER, NOLOG, a.dx = NULL);
        ROW(C_SHAPE, "rows -1", FM_ERR_INVALID_SHAPE, NOLOG, a.r = -1);
        ROW(C_LD, "lddy < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = 1);
        ROW(C_LD, "lddx < cols", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 1);
        ROW(C_DESC, "kind -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.k = (fm_gelu)-1);
#undef CALL
    }
}

static void rows_ffn(void) {
    fm_expert_ffn_desc fd;
    fm_expert_ffn_params fp;
    fm_expert_ffn_grads fg;
    fd.experts = E, fd.dim = D, fd.hidden = H, fd.gelu = FM_GELU_ERF;
    fp.w1 = P, fp.b1 = X + 100, fp.w2 = P + 1024, fp.b2 = X + 200;
    fg.w1 = O3, fg.b1 = O4, fg.w2 = O5, fg.b2 = O4 + 1000;
    entry("fm_expert_ffn_forward");
    {
        typedef struct {
            fm_expert_ffn_desc d; int no_desc; const int32_t *off; fm_expert_ffn_params p; int no_p; const float *x; int ldx;
            float *y; int ldy; float *h; int ldh; float *pre; int ldp;
        } A;
        A base;
        base.d = fd, base.no_desc = 0, base.off = offsets_ok, base.p = fp, base.no_p = 0, base.x = X + 2000, base.ldx = D;
        base.y = O0, base.ldy = D, base.h = O1, base.ldh = H, base.pre = O2, base.ldp = H;
#define CALL(a) fm_expert_ffn_forward(a.no_desc ? NULL : &a.d, a.off, a.no_p ? NULL : &a.p, a.x, a.ldx, a.y, a.ldy, a.h, a.ldh, a.pre, a.ldp)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "offsets NULL", FM_ERR_NULL_POINTER, NOLOG, a.off = NULL);
        ROW(C_NULL, "params NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_p = 1);
        ROW(C_NULL, "params.w1 NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w1 = NULL);
        ROW(C_NULL, "params.w2 NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w2 = NULL);
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "y NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_NULL, "hidden NULL", FM_ERR_NULL_POINTER, NOLOG, a.h = NULL);
        ROW(C_SHAPE, "experts 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.experts = 0);
        ROW(C_SHAPE, "dim -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.dim = -1);
        ROW(C_SHAPE, "hidden 0", FM_ERR_INVALID_SHAPE, NOLOG, a.d.hidden = 0);
        ROW(C_DESC, "gelu 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gelu = (fm_gelu)9);
        ROW(C_LD, "ldx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldx = 1);
        ROW(C_LD, "ldy < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = 1);
        ROW(C_LD, "ldh < hidden", FM_ERR_INVALID_SHAPE, NOLOG, a.ldh = 1);
        ROW(C_LD, "ldp < hidden (pre given)", FM_ERR_INVALID_SHAPE, NOLOG, a.ldp = 1);
        ROW(C_INDEX, "offsets decreasing", FM_ERR_INVALID_ARGUMENT, NOLOG, a.off = offsets_down);
        ROW(C_OVERFLOW, "hidden above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.d.hidden = a.ldh = a.ldp = MAXD + 1);
#undef CALL
    }
    entry("fm_expert_ffn_backward");
    {
        typedef struct {
            fm_expert_ffn_desc d; int no_desc; const int32_t *off; fm_expert_ffn_params p; int no_p; const float *x; int ldx;
            const float *pre; int ldp; const float *h; int ldh; const float *dy; int lddy; float *dx; int lddx;
            fm_expert_ffn_grads g; float *dh; int lddh;
        } A;
        A base;
        base.d = fd, base.no_desc = 0, base.off = offsets_ok, base.p = fp, base.no_p = 0, base.x = X + 2000, base.ldx = D;
        base.pre = X + 2200, base.ldp = H, base.h = P + 2200, base.ldh = H, base.dy = X + 3000, base.lddy = D;
        base.dx = O0, base.lddx = D, base.g = fg, base.dh = O1, base.lddh = H;
#define CALL(a) fm_expert_ffn_backward(a.no_desc ? NULL : &a.d, a.off, a.no_p ? NULL : &a.p, a.x, a.ldx, a.pre, a.ldp, a.h, a.ldh, a.dy, a.lddy, a.dx, a.lddx, &a.g, a.dh, a.lddh)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "offsets NULL", FM_ERR_NULL_POINTER, NOLOG, a.off = NULL);
        ROW(C_NULL, "params NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_p = 1);
        ROW(C_NULL, "params.w2 NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w2 = NULL);
        ROW(C_NULL, "x NULL", FM_ERR_NULL_POINTER, NOLOG, a.x = NULL);
        ROW(C_NULL, "pre NULL", FM_ERR_NULL_POINTER, NOLOG, a.pre = NULL);
        ROW(C_NULL, "dy NULL", FM_ERR_NULL_POINTER, NOLOG, a.dy = NULL);
        ROW(C_NULL, "d_hidden NULL", FM_ERR_NULL_POINTER, NOLOG, a.dh = NULL);
        ROW(C_SHAPE, "hidden -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.hidden = -1);
        ROW(C_DESC, "gelu 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gelu = (fm_gelu)9);
        ROW(C_LD, "ldp < hidden", FM_ERR_INVALID_SHAPE, NOLOG, a.ldp = 1);
        ROW(C_LD, "ldh < hidden (hidden given)", FM_ERR_INVALID_SHAPE, NOLOG, a.ldh = 1);
        ROW(C_LD, "lddy < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = 1);
        ROW(C_LD, "lddx < dim (dx given)", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = 1);
        ROW(C_LD, "lddh < hidden", FM_ERR_INVALID_SHAPE, NOLOG, a.lddh = 1);
        ROW(C_INDEX, "offsets decreasing", FM_ERR_INVALID_ARGUMENT, NOLOG, a.off = offsets_down);
#undef CALL
    }
}

/* ==== 8. the SMoE layer ===================================================================== */

static void rows_moe(void) {
    static fm_moe_sizes sizes;
    static fm_moe_stats stats;
    fm_moe_desc md;
    fm_moe_params mp;
    fm_moe_batch mb;
    fm_moe_grads mg;
    fm_moe_sizes have;
    unsigned char *saved, *workspace, *fresh;
    const size_t w1 = (size_t)E * fm_packed_weight_floats(D, H), w2 = (size_t)E * fm_packed_weight_floats(H, D);
    float *w1p = (float *)malloc(w1 * sizeof(float)), *w2p = (float *)malloc(w2 * sizeof(float));
    size_t i;
    for (i = 0; i < w1; i++) w1p[i] = in_f[i % BIG] * 0.3f;
    for (i = 0; i < w2; i++) w2p[i] = in_f[(i + 7) % BIG] * 0.3f;
    memset(&md, 0, sizeof md);
    md.dim = D, md.hidden = H, md.experts = E, md.top_k = K, md.groups = G;
    memset(&mp, 0, sizeof mp);
    mp.w_gate = X + 100, mp.w_noise = X + 200, mp.w1 = w1p, mp.w2 = w2p, mp.b1 = X + 300, mp.b2 = X + 400;
    memset(&mb, 0, sizeof mb);
    mb.tokens = T, mb.x = X + 1000, mb.combination = comb_ok, mb.token_group = group_ok, mb.training = 1, mb.seed = 5;
    FM_CHECK(fm_moe_buffer_sizes(&md, T, &have) == FM_OK, "the layer fixture's sizes");
    saved = (unsigned char *)fm_alloc(have.saved_bytes);
    fresh = (unsigned char *)fm_alloc(have.saved_bytes);
    workspace = (unsigned char *)fm_alloc(have.workspace_bytes);
    memset(fresh, 0, have.saved_bytes);

    entry("fm_moe_buffer_sizes");
    OUT("the sizes", &sizes, sizeof sizes);
    {
        typedef struct { fm_moe_desc d; int no_desc, max; fm_moe_sizes *s; } A;
        A base;
        base.d = md, base.no_desc = 0, base.max = T, base.s = &sizes;
#define CALL(a) fm_moe_buffer_sizes(a.no_desc ? NULL : &a.d, a.max, a.s)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "sizes NULL", FM_ERR_NULL_POINTER, NOLOG, a.s = NULL);
        ROW(C_SHAPE, "max_tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.max = 0);
        ROW(C_SHAPE, "dim -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.dim = -1);
        ROW(C_SHAPE, "hidden -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.hidden = -1);
        ROW(C_SHAPE, "experts -1", FM_ERR_INVALID_SHAPE, NOLOG, a.d.experts = -1);
        ROW(C_DESC, "experts 1025", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.experts = 1025);
        ROW(C_K, "top_k -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = -1);
        ROW(C_K, "top_k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = E + 1);
        ROW(C_K, "top_k 17", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.experts = 32, a.d.top_k = 17);
        ROW(C_DESC, "groups 17", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.groups = 17);
        ROW(C_DESC, "gate 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gate = (fm_gate_kind)9);
        ROW(C_DESC, "gelu 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gelu = (fm_gelu)9);
        ROW(C_DESC, "drop_policy 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.drop_policy = (fm_drop_policy)9);
        ROW(C_DESC, "confidence 9", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.confidence = (fm_conf_mode)9);
        ROW(C_NAN, "noise_epsilon NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.noise_epsilon = NAN);
        ROW(C_DESC, "noise_epsilon -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.noise_epsilon = -1.0f);
        ROW(C_DESC, "capacity_factor -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.capacity_factor = -1.0f);
        ROW(C_NAN, "capacity_factor +Inf", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.capacity_factor = INFINITY);
        ROW(C_NAN, "layernorm_eps NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.layernorm_eps = NAN);
        ROW(C_DESC, "classes -1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.classes = -1);
        ROW(C_OVERFLOW, "dim above FLEXMOE_MAX_DIM / 2", FM_ERR_INVALID_SHAPE, NOLOG, a.d.dim = MAXD / 2 + 1);
        ROW(C_OVERFLOW, "max_tokens * top_k above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.max = INT_MAX);
        ROW(C_OVERFLOW, "tokens x (dim + experts) beyond the address space", FM_ERR_OVERFLOW, NOLOG, a.max = 1 << 28, a.d.dim = 1 << 29, a.d.hidden = 1);
#undef CALL
    }
    drop_regions(base_regions);

    entry("fm_moe_forward");
    OUT("the saved buffer", saved, have.saved_bytes);
    OUT("the workspace", workspace, have.workspace_bytes);
    memset(&stats, SENTINEL_BYTE, sizeof stats);
    stats.expert_rows = I0, stats.expert_dropped = I1, stats.indices = I2, stats.slot_outputs = O3;
    KEEP("the stats", &stats, sizeof stats);
    {
        typedef struct {
            fm_moe_desc d; fm_moe_params p; fm_moe_batch b; int no_desc, no_p, no_b; float *y; int ldy; void *saved, *ws;
            fm_moe_stats *stats;
        } A;
        A base;
        base.d = md, base.p = mp, base.b = mb, base.no_desc = base.no_p = base.no_b = 0, base.y = O0, base.ldy = D;
        base.saved = saved, base.ws = workspace, base.stats = &stats;
#define CALL(a) fm_moe_forward(a.no_desc ? NULL : &a.d, a.no_p ? NULL : &a.p, a.no_b ? NULL : &a.b, a.y, a.ldy, a.saved, a.ws, a.stats)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "params NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_p = 1);
        ROW(C_NULL, "batch NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_b = 1);
        ROW(C_NULL, "y NULL", FM_ERR_NULL_POINTER, NOLOG, a.y = NULL);
        ROW(C_NULL, "workspace NULL", FM_ERR_NULL_POINTER, NOLOG, a.ws = NULL);
        ROW(C_NULL, "batch.x NULL", FM_ERR_NULL_POINTER, NOLOG, a.b.x = NULL);
        ROW(C_NULL, "w_gate NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w_gate = NULL);
        ROW(C_NULL, "w_noise NULL (noisy gate)", FM_ERR_NULL_POINTER, NOLOG, a.p.w_noise = NULL);
        ROW(C_NULL, "w1 NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w1 = NULL);
        ROW(C_NULL, "w2 NULL", FM_ERR_NULL_POINTER, NOLOG, a.p.w2 = NULL);
        ROW(C_NULL, "confidence.w NULL (confidence gate)", FM_ERR_NULL_POINTER, NOLOG, a.d.gate = FM_GATE_CONFIDENCE, a.p.confidence.b = X);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.b.tokens = 0);
        ROW(C_SHAPE, "tokens -1", FM_ERR_INVALID_SHAPE, NOLOG, a.b.tokens = -1);
        ROW(C_LD, "ldx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.b.ldx = D - 1);
        ROW(C_LD, "ldy < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.ldy = D - 1);
        ROW(C_K, "top_k > experts", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.top_k = E + 1);
        ROW(C_DESC, "gate 3", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gate = (fm_gate_kind)3);
        ROW(C_NAN, "capacity_factor NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.capacity_factor = NAN);
        ROW(C_INDEX, "a combination < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.combination = comb_neg);
        ROW(C_INDEX, "a token_group == groups", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.token_group = group_big);
        ROW(C_INDEX, "a token_group < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.token_group = group_neg);
        ROW(C_INDEX, "a label == classes (confidence gate)", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gate = FM_GATE_CONFIDENCE,
            a.d.classes = 3, a.p.confidence.w = X, a.p.confidence.b = X, a.p.confidence.probe_w = X, a.p.confidence.probe_b = X,
            a.b.labels = label_big);
        ROW(C_DESC, "labels with classes < 2 (confidence gate)", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.gate = FM_GATE_CONFIDENCE,
            a.d.classes = 1, a.p.confidence.w = X, a.p.confidence.b = X, a.p.confidence.probe_w = X, a.p.confidence.probe_b = X,
            a.b.labels = label_ok);
        ROW(C_DESC, "y overlaps x", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.x = O0 + 8);
        ROW(C_OVERFLOW, "tokens * top_k above FLEXMOE_MAX_DIM", FM_ERR_OVERFLOW, NOLOG, a.b.tokens = MAXD);
#undef CALL
    }
    drop_regions(base_regions);

    /* a valid training forward for the backward's rows */
    FM_CHECK(fm_moe_forward(&md, &mp, &mb, O5, D, saved, workspace, NULL) == FM_OK, "the layer fixture's forward");
    entry("fm_moe_backward");
    KEEP("the saved buffer", saved, have.saved_bytes);
    memset(&mg, 0, sizeof mg);
    mg.w_gate = O1, mg.w_noise = O1 + 100, mg.w1 = O2, mg.w2 = O3, mg.b1 = O1 + 200, mg.b2 = O1 + 300;
    {
        typedef struct {
            fm_moe_desc d; fm_moe_params p; fm_moe_batch b; int no_desc, no_p, no_b; void *saved; const float *dy; int lddy;
            fm_moe_loss_weights w; float *dx; int lddx; fm_moe_grads g; void *ws;
        } A;
        A base;
        base.d = md, base.p = mp, base.b = mb, base.no_desc = base.no_p = base.no_b = 0, base.saved = saved, base.dy = X + 3000;
        base.lddy = D, base.dx = O0, base.lddx = D, base.g = mg, base.ws = workspace;
        memset(&base.w, 0, sizeof base.w);
        base.w.gate = 0.01f;
#define CALL(a) fm_moe_backward(a.no_desc ? NULL : &a.d, a.no_p ? NULL : &a.p, a.no_b ? NULL : &a.b, a.saved, a.dy, a.lddy, &a.w, a.dx, a.lddx, &a.g, a.ws)
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_NULL, "params NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_p = 1);
        ROW(C_NULL, "batch NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_b = 1);
        ROW(C_NULL, "saved NULL", FM_ERR_NULL_POINTER, NOLOG, a.saved = NULL);
        ROW(C_NULL, "dy NULL", FM_ERR_NULL_POINTER, NOLOG, a.dy = NULL);
        ROW(C_NULL, "dx NULL", FM_ERR_NULL_POINTER, NOLOG, a.dx = NULL);
        ROW(C_NULL, "workspace NULL", FM_ERR_NULL_POINTER, NOLOG, a.ws = NULL);
        ROW(C_NULL, "w_noise NULL (noisy gate)", FM_ERR_NULL_POINTER, NOLOG, a.p.w_noise = NULL);
        ROW(C_SHAPE, "tokens 0", FM_ERR_INVALID_SHAPE, NOLOG, a.b.tokens = 0);
        ROW(C_LD, "lddy < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddy = D - 1);
        ROW(C_LD, "lddx < dim", FM_ERR_INVALID_SHAPE, NOLOG, a.lddx = D - 1);
        ROW(C_NAN, "weights.gate NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.w.gate = NAN);
        ROW(C_NAN, "weights.probe NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.w.probe = NAN);
        ROW(C_INDEX, "a token_group == groups", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.token_group = group_big);
        ROW(C_STATE, "saved of no forward", FM_ERR_INVALID_ARGUMENT, NOLOG, a.saved = fresh);
        ROW(C_STATE, "saved of another batch size", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.tokens = T - 1);
        ROW(C_STATE, "saved of a training forward, batch says inference", FM_ERR_INVALID_ARGUMENT, NOLOG, a.b.training = 0);
        ROW(C_STATE, "saved of another desc (hidden)", FM_ERR_INVALID_ARGUMENT, NOLOG, a.d.hidden = H / 2);
        ROW(C_DESC, "dx overlaps x", FM_ERR_INVALID_ARGUMENT, NOLOG, a.dx = (float *)(uintptr_t)(X + 1000));
#undef CALL
    }
    drop_regions(base_regions);
    fm_free(saved), fm_free(fresh), fm_free(workspace);
    free(w1p), free(w2p);
}

/* ==== 9. the model ========================================================================== */

static fm_model_desc model_desc(void) {
    fm_model_desc d;
    memset(&d, 0, sizeof d);
    d.modalities = 2, d.features[0] = 3, d.features[1] = 5, d.classes = 3, d.patches = 2, d.dim = 8, d.heads = 2;
    d.experts = 4, d.top_k = 2, d.hidden = 16;
    return d;
}

enum { MS = 4 }; /* the fixture model's max_samples */
static fm_model model;
static uint8_t observed_ok[MS * 2] = {1, 1, 1, 0, 0, 1, 1, 1}, observed_none[MS * 2] = {1, 1, 0, 0, 1, 0, 1, 1};
static int32_t mlabels_ok[MS] = {0, 1, 2, 1}, mlabels_big[MS] = {0, 3, 2, 1}, mlabels_neg[MS] = {0, 1, -2, 1};
static float cw_neg[3] = {1, -1, 1}, cw_nan[3] = {1, NAN, 1}, cw_zero[3] = {0, 0, 0}, cw_inf[3] = {1, INFINITY, 1};

static fm_model_batch model_batch(void) {
    fm_model_batch b;
    memset(&b, 0, sizeof b);
    b.samples = MS, b.features[0] = X + 100, b.features[1] = X + 200, b.observed = observed_ok, b.labels = mlabels_ok;
    b.training = 1, b.seed = 1, b.step = 1;
    return b;
}

/* The model's arenas and training state must not change. */
static void keep_model(fm_model *m) {
    KEEP("model params", m->params, m->param_floats * sizeof(float));
    KEEP("model grads", m->grads, m->param_floats * sizeof(float));
    KEEP("model adam_m", m->adam_m, m->param_floats * sizeof(float));
    KEEP("model adam_v", m->adam_v, m->param_floats * sizeof(float));
    KEEP("model best", m->best, m->param_floats * sizeof(float));
    KEEP("model struct", m, sizeof *m);
}

static void rows_model_create(void) {
    static fm_model created;
    const fm_model_desc md = model_desc();
    entry("fm_model_create");
    {
        typedef struct { fm_model_desc d; int no_desc, max; fm_model *m; } A;
        A base;
        base.d = md, base.no_desc = 0, base.max = MS, base.m = &created;
#define CALL(a) fm_model_create(a.no_desc ? NULL : &a.d, a.max, a.m)
#define ZROW(cat, what, want, ...) ROWZ(cat, what, want, LOG | ZEROED, &created, sizeof created, memset(&created, SENTINEL_BYTE, sizeof created); __VA_ARGS__)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROWZ(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, ZEROED, &created, sizeof created, memset(&created, SENTINEL_BYTE, sizeof created); a.no_desc = 1);
        ZROW(C_DESC, "modalities 0", FM_ERR_INVALID_ARGUMENT, a.d.modalities = 0);
        ZROW(C_DESC, "modalities 9", FM_ERR_INVALID_ARGUMENT, a.d.modalities = 9);
        ZROW(C_DESC, "features[1] 0", FM_ERR_INVALID_ARGUMENT, a.d.features[1] = 0);
        ZROW(C_DESC, "features[0] -3", FM_ERR_INVALID_ARGUMENT, a.d.features[0] = -3);
        ZROW(C_DESC, "features[0] 2^24 + 1", FM_ERR_INVALID_ARGUMENT, a.d.features[0] = (1 << 24) + 1);
        ZROW(C_DESC, "classes 1", FM_ERR_INVALID_ARGUMENT, a.d.classes = 1);
        ZROW(C_DESC, "patches -1", FM_ERR_INVALID_ARGUMENT, a.d.patches = -1);
        ZROW(C_DESC, "dim -8", FM_ERR_INVALID_ARGUMENT, a.d.dim = -8);
        ZROW(C_DESC, "heads not dividing dim", FM_ERR_INVALID_ARGUMENT, a.d.heads = 3);
        ZROW(C_DESC, "heads -2", FM_ERR_INVALID_ARGUMENT, a.d.heads = -2);
        ZROW(C_DESC, "experts 1025", FM_ERR_INVALID_ARGUMENT, a.d.experts = 1025);
        ZROW(C_K, "top_k > experts", FM_ERR_INVALID_ARGUMENT, a.d.top_k = 5);
        ZROW(C_K, "top_k 17", FM_ERR_INVALID_ARGUMENT, a.d.experts = 32, a.d.top_k = 17);
        ZROW(C_K, "top_k -1", FM_ERR_INVALID_ARGUMENT, a.d.top_k = -1);
        ZROW(C_DESC, "hidden -1", FM_ERR_INVALID_ARGUMENT, a.d.hidden = -1);
        ZROW(C_DESC, "dropout 1", FM_ERR_INVALID_ARGUMENT, a.d.dropout = 1.0f);
        ZROW(C_NAN, "dropout NaN", FM_ERR_INVALID_ARGUMENT, a.d.dropout = NAN);
        ZROW(C_NAN, "gate_loss_weight NaN", FM_ERR_INVALID_ARGUMENT, a.d.gate_loss_weight = NAN);
        ZROW(C_NAN, "gate_loss_weight +Inf", FM_ERR_INVALID_ARGUMENT, a.d.gate_loss_weight = INFINITY);
        ZROW(C_DESC, "layernorm_eps -1", FM_ERR_INVALID_ARGUMENT, a.d.layernorm_eps = -1.0f);
        ZROW(C_NAN, "layernorm_eps NaN", FM_ERR_INVALID_ARGUMENT, a.d.layernorm_eps = NAN);
        ZROW(C_DESC, "gate FM_GATE_SOFTMAX_TOPK (not a model gate)", FM_ERR_INVALID_ARGUMENT, a.d.gate = FM_GATE_SOFTMAX_TOPK);
        ZROW(C_DESC, "gate 9", FM_ERR_INVALID_ARGUMENT, a.d.gate = (fm_gate_kind)9);
        ZROW(C_DESC, "confidence 9", FM_ERR_INVALID_ARGUMENT, a.d.confidence = (fm_conf_mode)9);
        ZROW(C_DESC, "imputation 9", FM_ERR_INVALID_ARGUMENT, a.d.imputation = (fm_imputation)9);
        ZROW(C_DESC, "impute_keep 2", FM_ERR_INVALID_ARGUMENT, a.d.impute_keep = 2.0f);
        ZROW(C_DESC, "impute_keep -0.5", FM_ERR_INVALID_ARGUMENT, a.d.impute_keep = -0.5f);
        ZROW(C_NAN, "impute_keep NaN", FM_ERR_INVALID_ARGUMENT, a.d.impute_keep = NAN);
        ZROW(C_SHAPE, "max_samples 0", FM_ERR_INVALID_SHAPE, a.max = 0);
        ZROW(C_SHAPE, "max_samples 2^20 + 1", FM_ERR_INVALID_SHAPE, a.max = (1 << 20) + 1);
        ZROW(C_OVERFLOW, "a configuration that cannot fit (2^20 samples x 8 x 4096 patches)", FM_ERR_OVERFLOW,
             a.max = 1 << 20, a.d.modalities = 8, a.d.features[2] = a.d.features[3] = a.d.features[4] = a.d.features[5] = 1,
             a.d.features[6] = a.d.features[7] = 1, a.d.patches = 4096);
        ZROW(C_OVERFLOW, "a bank that cannot fit (255 combinations x 8 x 4096 x 65536)", FM_ERR_OVERFLOW, a.max = 1,
             a.d.modalities = 8, a.d.features[2] = a.d.features[3] = a.d.features[4] = a.d.features[5] = 1,
             a.d.features[6] = a.d.features[7] = 1, a.d.patches = 4096, a.d.dim = 65536);
#undef ZROW
#undef CALL
    }
    fm_model_destroy(&created);

    entry("fm_combination_count");
    VROW(C_VALUE, "modalities 0 gives 0", fm_combination_count(0) == 0);
    VROW(C_VALUE, "modalities 31 gives 0", fm_combination_count(31) == 0);
    VROW(C_VALUE, "modalities -1 gives 0", fm_combination_count(-1) == 0);
    entry("fm_combination_index");
    VROW(C_VALUE, "an empty mask gives -1", fm_combination_index(3, 0) == -1);
    VROW(C_VALUE, "a bit past the modalities gives -1", fm_combination_index(3, 8) == -1);
    VROW(C_VALUE, "modalities 0 gives -1", fm_combination_index(0, 1) == -1);
    VROW(C_VALUE, "modalities 31 gives -1", fm_combination_index(31, 1) == -1);
    entry("fm_combination_mask");
    VROW(C_VALUE, "index 2^M - 1 gives 0", fm_combination_mask(3, 7) == 0);
    VROW(C_VALUE, "index -1 gives 0", fm_combination_mask(3, -1) == 0);
    VROW(C_VALUE, "modalities 0 gives 0", fm_combination_mask(0, 0) == 0);
    VROW(C_VALUE, "modalities 31 gives 0", fm_combination_mask(31, 0) == 0);

    entry("fm_model_destroy");
    fm_model_destroy(NULL);
    VROW(C_NULL, "model NULL is accepted", 1);
    memset(&created, 0, sizeof created);
    fm_model_destroy(&created);
    VROW(C_STATE, "a zeroed (failed) model is accepted", 1);
}

static void rows_model(void) {
    static fm_model blank; /* zero: never created */
    static float logits[MS * 3], mask[MS * 2 * 2 * 8];
    static fm_model_losses losses;
    const fm_model_batch mb = model_batch();
    fm_model_desc md = model_desc();
    md.dropout = 0.25f;
    FM_CHECK(fm_model_create(&md, MS, &model) == FM_OK && fm_model_init(&model, 9) == FM_OK, "the model fixture");
    memset(&blank, 0, sizeof blank);

    entry("fm_model_init");
    keep_model(&model);
    {
        typedef struct { fm_model *m; } A;
        A base;
        base.m = &model;
#define CALL(a) fm_model_init(a.m, 3)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_STATE, "a model never created", FM_ERR_NULL_POINTER, NOLOG, a.m = &blank);
#undef CALL
    }
    entry("fm_model_tensor");
    VROW(C_NULL, "name NULL gives NULL", fm_model_tensor(&model, NULL) == NULL);
    VROW(C_NULL, "model NULL gives NULL", fm_model_tensor(NULL, "bank") == NULL);
    VROW(C_VALUE, "an unknown name gives NULL", fm_model_tensor(&model, "moe.w3") == NULL);
    VROW(C_VALUE, "a tensor of another configuration (moe.probe.weight) gives NULL", fm_model_tensor(&model, "moe.probe.weight") == NULL);
    entry("fm_model_noise_seed");
    VROW(C_NULL, "batch NULL gives 0", fm_model_noise_seed(NULL) == 0);

    entry("fm_model_adam_step");
    {
        typedef struct { fm_model *m; fm_adam_desc d; int no_desc; int64_t step; } A;
        A base;
        base.m = &model, base.no_desc = 0, base.step = 1;
        memset(&base.d, 0, sizeof base.d);
#define CALL(a) fm_model_adam_step(a.m, a.no_desc ? NULL : &a.d, a.step)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
        ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
        ROW(C_DESC, "step 0", FM_ERR_INVALID_ARGUMENT, LOG, a.step = 0);
        ROW(C_DESC, "step -1", FM_ERR_INVALID_ARGUMENT, LOG, a.step = -1);
        ROW(C_NAN, "lr NaN", FM_ERR_INVALID_ARGUMENT, LOG, a.d.lr = NAN);
        ROW(C_DESC, "lr -1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.lr = -1.0f);
        ROW(C_NAN, "lr +Inf", FM_ERR_INVALID_ARGUMENT, LOG, a.d.lr = INFINITY);
        ROW(C_DESC, "beta1 1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.beta1 = 1.0f);
        ROW(C_DESC, "beta2 -0.5", FM_ERR_INVALID_ARGUMENT, LOG, a.d.beta2 = -0.5f);
        ROW(C_NAN, "beta2 NaN", FM_ERR_INVALID_ARGUMENT, LOG, a.d.beta2 = NAN);
        ROW(C_DESC, "eps -1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.eps = -1.0f);
        ROW(C_DESC, "weight_decay -1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.weight_decay = -1.0f);
        ROW(C_NAN, "weight_decay NaN", FM_ERR_INVALID_ARGUMENT, LOG, a.d.weight_decay = NAN);
        {
            const size_t at = model.param_floats / 2;
            drop_regions(base_regions);
            model.grads[at] = NAN;
            keep_model(&model);
            ROW(C_NAN, "a NaN gradient", FM_ERR_INVALID_ARGUMENT, LOG, NOTHING);
            model.grads[at] = INFINITY;
            drop_regions(base_regions);
            keep_model(&model);
            ROW(C_NAN, "an infinite gradient", FM_ERR_INVALID_ARGUMENT, LOG, NOTHING);
            model.grads[at] = 0.0f;
            drop_regions(base_regions);
            keep_model(&model);
        }
#undef CALL
    }

    entry("fm_model_dropout_mask");
    OUT("the dropout mask", mask, sizeof mask);
    {
        typedef struct { const fm_model *m; fm_model_batch b; int no_b; fm_model_dropout_site s; float *mask; } A;
        A base;
        base.m = &model, base.b = mb, base.no_b = 0, base.s = FM_DROPOUT_MOE, base.mask = mask;
#define CALL(a) fm_model_dropout_mask(a.m, a.no_b ? NULL : &a.b, a.s, a.mask)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_NULL, "batch NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_b = 1);
        ROW(C_NULL, "mask NULL", FM_ERR_NULL_POINTER, NOLOG, a.mask = NULL);
        ROW(C_DESC, "site 5", FM_ERR_INVALID_ARGUMENT, NOLOG, a.s = (fm_model_dropout_site)5);
        ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
        ROW(C_SHAPE, "samples 0", FM_ERR_INVALID_SHAPE, LOG, a.b.samples = 0);
        ROW(C_SHAPE, "samples > max_samples", FM_ERR_INVALID_SHAPE, LOG, a.b.samples = MS + 1);
        ROW(C_NULL, "observed NULL", FM_ERR_NULL_POINTER, NOLOG, a.b.observed = NULL);
        ROW(C_INDEX, "a sample observes nothing", FM_ERR_INVALID_ARGUMENT, LOG, a.b.observed = observed_none);
        ROW(C_NULL, "features of an observed modality NULL", FM_ERR_NULL_POINTER, LOG, a.b.features[1] = NULL);
#undef CALL
    }
    drop_regions(base_regions);

    entry("fm_model_forward");
    keep_model(&model);
    OUT("the logits", logits, sizeof logits);
    OUT("the losses", &losses, sizeof losses);
    {
        typedef struct { fm_model *m; fm_model_batch b; int no_b; float *logits; fm_model_losses *losses; } A;
        A base;
        base.m = &model, base.b = mb, base.no_b = 0, base.logits = logits, base.losses = &losses;
#define CALL(a) fm_model_forward(a.m, a.no_b ? NULL : &a.b, a.logits, a.losses)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_NULL, "batch NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_b = 1);
        ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
        ROW(C_SHAPE, "samples 0", FM_ERR_INVALID_SHAPE, LOG, a.b.samples = 0);
        ROW(C_SHAPE, "samples -1", FM_ERR_INVALID_SHAPE, LOG, a.b.samples = -1);
        ROW(C_SHAPE, "samples > max_samples", FM_ERR_INVALID_SHAPE, LOG, a.b.samples = MS + 1);
        ROW(C_NULL, "observed NULL", FM_ERR_NULL_POINTER, NOLOG, a.b.observed = NULL);
        ROW(C_NULL, "features of an observed modality NULL", FM_ERR_NULL_POINTER, LOG, a.b.features[0] = NULL);
        ROW(C_INDEX, "a sample observes nothing", FM_ERR_INVALID_ARGUMENT, LOG, a.b.observed = observed_none);
        ROW(C_INDEX, "a label == classes", FM_ERR_INVALID_ARGUMENT, LOG, a.b.labels = mlabels_big);
        ROW(C_INDEX, "a label < 0", FM_ERR_INVALID_ARGUMENT, LOG, a.b.labels = mlabels_neg);
        ROW(C_DESC, "a class weight < 0", FM_ERR_INVALID_ARGUMENT, LOG, a.b.class_weights = cw_neg);
        ROW(C_NAN, "a class weight NaN", FM_ERR_INVALID_ARGUMENT, LOG, a.b.class_weights = cw_nan);
        ROW(C_NAN, "a class weight +Inf", FM_ERR_INVALID_ARGUMENT, LOG, a.b.class_weights = cw_inf);
        ROW(C_DESC, "class weights all zero", FM_ERR_INVALID_ARGUMENT, LOG, a.b.class_weights = cw_zero);
#undef CALL
    }
    drop_regions(base_regions);

    entry("fm_model_backward");
    {
        /* a fresh model has no forward; then a forward of the full batch for the mismatch rows */
        typedef struct { fm_model *m; fm_model_batch b; int no_b; } A;
        A base;
        base.m = &model, base.b = mb, base.no_b = 0;
#define CALL(a) fm_model_backward(a.m, a.no_b ? NULL : &a.b)
        keep_model(&model);
        ROW(C_STATE, "no forward before it", FM_ERR_INVALID_ARGUMENT, LOG, NOTHING);
        drop_regions(base_regions);
        FM_CHECK(fm_model_forward(&model, &mb, NULL, NULL) == FM_OK, "the model fixture's forward");
        keep_model(&model);
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_NULL, "batch NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_b = 1);
        ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
        ROW(C_STATE, "labels NULL", FM_ERR_INVALID_ARGUMENT, LOG, a.b.labels = NULL);
        ROW(C_STATE, "a batch of another size than the forward's", FM_ERR_INVALID_ARGUMENT, LOG, a.b.samples = MS - 1);
        ROW(C_INDEX, "a label == classes", FM_ERR_INVALID_ARGUMENT, LOG, a.b.labels = mlabels_big);
        ROW(C_INDEX, "a sample observes nothing", FM_ERR_INVALID_ARGUMENT, LOG, a.b.observed = observed_none);
#undef CALL
    }
    drop_regions(base_regions);
}

/* ==== 10 and 11. data, training, evaluation ================================================= */

enum { NS = 12 }; /* samples of the in-memory dataset */

/* A dataset that fits the fixture model: 2 views of 3 and 5 features, 3 classes, every sample
 * observing view 0, every second one view 1. Allocated with fm_alloc, as fm_dataset_free wants. */
static void make_dataset(fm_dataset *ds) {
    int s, v, j;
    memset(ds, 0, sizeof *ds);
    ds->samples = NS, ds->views = 2, ds->classes = 3;
    strcpy(ds->names[0], "alpha"), strcpy(ds->names[1], "beta");
    ds->features[0] = 3, ds->features[1] = 5;
    ds->observed = (uint8_t *)fm_alloc(NS * 2);
    ds->labels = (int32_t *)fm_alloc(NS * sizeof(int32_t));
    for (v = 0; v < 2; v++) ds->values[v] = (float *)fm_alloc((size_t)NS * ds->features[v] * sizeof(float));
    for (s = 0; s < NS; s++) {
        ds->labels[s] = s % 3;
        ds->observed[s * 2] = 1, ds->observed[s * 2 + 1] = (uint8_t)(s % 2 == 0);
        for (v = 0; v < 2; v++)
            for (j = 0; j < ds->features[v]; j++)
                ds->values[v][s * ds->features[v] + j] = ds->observed[s * 2 + v] ? (float)((s * 7 + j * 3 + v) % 11) - 5.0f : 0.0f;
    }
}

static void keep_dataset(fm_dataset *ds) {
    KEEP("dataset struct", ds, sizeof *ds);
    KEEP("dataset view 0", ds->values[0], (size_t)ds->samples * ds->features[0] * sizeof(float));
    KEEP("dataset view 1", ds->values[1], (size_t)ds->samples * ds->features[1] * sizeof(float));
    KEEP("dataset observed", ds->observed, (size_t)ds->samples * ds->views);
    KEEP("dataset labels", ds->labels, (size_t)ds->samples * sizeof(int32_t));
}

static char tmpdir[64];

static void write_text(const char *dir, const char *name, const char *text) {
    char path[256];
    FILE *f;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path) {
        FM_CHECK(0, "the path %s/%s is too long", dir, name);
        return;
    }
    f = fopen(path, "w");
    if (f) fputs(text, f), fclose(f);
}

static void rows_data(void) {
    static fm_dataset ds, empty, loaded, partial;
    static int32_t rows_ok[6] = {0, 1, 2, 3, 4, 5}, rows_oor[3] = {0, NS, 1}, rows_neg[3] = {0, -1, 1};
    static int32_t rows_odd[3] = {1, 3, 5}; /* none observes view 1 */
    static int32_t order[NS];
    static int train, validation;
    char dir[128], bad[128];
    make_dataset(&ds);
    memset(&empty, 0, sizeof empty);
    memset(&partial, 0, sizeof partial);
    partial.samples = NS, partial.views = 2, partial.classes = 3, partial.features[0] = 3, partial.features[1] = 5;

    entry("fm_dataset_load");
    snprintf(dir, sizeof dir, "%s/missing", tmpdir);
    snprintf(bad, sizeof bad, "%s/bad", tmpdir);
    mkdir(bad, 0700);
    write_text(bad, "views.txt", "a 2\nb 1\n");
    write_text(bad, "a.csv", "1,2\n3,4\n5,6\n");
    write_text(bad, "b.csv", "1\n2\n");                /* one line short */
    write_text(bad, "labels.csv", "0\n1\n0\n");
    {
        /* one view "a" of two features and two samples each: a defect in a.csv or labels.csv */
        static const struct { const char *name, *view, *labels; } broken[] = {
            {"one_class", "1,2\n3,4\n", "0\n0\n"},
            {"ragged", "1,2\n3,4,5\n", "0\n1\n"},
            {"nan_field", "1,nan\n3,4\n", "0\n1\n"},
            {"no_view", "1,2\n\n", "0\n1\n"}};
        char broken_dirs[4][128];
        char *const one_class = broken_dirs[0], *const ragged = broken_dirs[1], *const nan_field = broken_dirs[2],
                    *const no_view = broken_dirs[3];
        typedef struct { const char *dir; fm_dataset *ds; } A;
        A base;
        size_t b;
        for (b = 0; b < sizeof broken / sizeof broken[0]; b++) {
            snprintf(broken_dirs[b], sizeof broken_dirs[b], "%s/%s", tmpdir, broken[b].name);
            mkdir(broken_dirs[b], 0700);
            write_text(broken_dirs[b], "views.txt", "a 2\n");
            write_text(broken_dirs[b], "a.csv", broken[b].view);
            write_text(broken_dirs[b], "labels.csv", broken[b].labels);
        }
        base.dir = dir, base.ds = &loaded;
#define CALL(a) fm_dataset_load(a.dir, a.ds)
#define LROW(cat, what, want, flags, ...) ROWZ(cat, what, want, (flags) | ZEROED, &loaded, sizeof loaded, memset(&loaded, SENTINEL_BYTE, sizeof loaded); __VA_ARGS__)
        ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
        LROW(C_NULL, "directory NULL", FM_ERR_NULL_POINTER, NOLOG, a.dir = NULL);
        LROW(C_FILE, "a directory that does not exist", FM_ERR_INVALID_ARGUMENT, LOG, NOTHING);
        LROW(C_FILE, "files of different line counts", FM_ERR_INVALID_ARGUMENT, LOG, a.dir = bad);
        LROW(C_FILE, "fewer than two classes", FM_ERR_INVALID_ARGUMENT, LOG, a.dir = one_class);
        LROW(C_FILE, "a ragged row", FM_ERR_INVALID_ARGUMENT, LOG, a.dir = ragged);
        LROW(C_FILE, "a field that is not a finite number", FM_ERR_INVALID_ARGUMENT, LOG, a.dir = nan_field);
        LROW(C_FILE, "a sample that observes no view", FM_ERR_INVALID_ARGUMENT, LOG, a.dir = no_view);
#undef LROW
#undef CALL
    }

    entry("fm_dataset_free");
    fm_dataset_free(NULL);
    VROW(C_NULL, "dataset NULL is accepted", 1);

    entry("fm_dataset_standardize");
    keep_dataset(&ds);
    {
        typedef struct { fm_dataset *ds; const int32_t *rows; int count; } A;
        A base;
        base.ds = &ds, base.rows = rows_ok, base.count = 6;
#define CALL(a) fm_dataset_standardize(a.ds, a.rows, a.count)
        ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
        ROW(C_NULL, "rows NULL", FM_ERR_INVALID_SHAPE, NOLOG, a.rows = NULL);
        ROW(C_SHAPE, "count 0", FM_ERR_INVALID_SHAPE, NOLOG, a.count = 0);
        ROW(C_SHAPE, "count -1", FM_ERR_INVALID_SHAPE, NOLOG, a.count = -1);
        ROW(C_INDEX, "a row == samples", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rows = rows_oor, a.count = 3);
        ROW(C_INDEX, "a row < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rows = rows_neg, a.count = 3);
        ROW(C_STATE, "a dataset never loaded", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &empty);
        ROW(C_STATE, "a view no row observes (view 1)", FM_ERR_INVALID_ARGUMENT, LOG, a.rows = rows_odd, a.count = 3);
        {
            /* view 1 constant over the rows: view 0 must not be standardised on the way */
            int j, s;
            for (s = 0; s < NS; s++)
                for (j = 0; j < 5; j++)
                    if (ds.observed[s * 2 + 1]) ds.values[1][s * 5 + j] = 2.0f;
            drop_regions(base_regions);
            keep_dataset(&ds);
            ROW(C_STATE, "a view constant over the rows (view 1)", FM_ERR_INVALID_ARGUMENT, LOG, NOTHING);
            fm_dataset_free(&ds);
            make_dataset(&ds);
            drop_regions(base_regions);
            keep_dataset(&ds);
        }
ROW(C_STATE, "a dataset without observed (never loaded)", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &partial);
#undef CALL
    }

    entry("fm_dataset_drop_views");
    {
        typedef struct { fm_dataset *ds; float rate; } A;
        A base;
        base.ds = &ds, base.rate = 0.5f;
#define CALL(a) fm_dataset_drop_views(a.ds, a.rate, 7)
        ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
        ROW(C_STATE, "a dataset never loaded", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &empty);
        ROW(C_DESC, "rate -0.1", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rate = -0.1f);
        ROW(C_DESC, "rate 1.5", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rate = 1.5f);
        ROW(C_NAN, "rate NaN", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rate = NAN);
ROW(C_STATE, "a dataset without observed (never loaded)", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &partial);
#undef CALL
    }

    entry("fm_dataset_impute");
    {
        typedef struct { fm_dataset *ds; const int32_t *pool; int count, draws; } A;
        A base;
        base.ds = &ds, base.pool = rows_ok, base.count = 6, base.draws = 3;
#define CALL(a) fm_dataset_impute(a.ds, a.pool, a.count, a.draws, 11)
        ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
        ROW(C_NULL, "pool NULL", FM_ERR_NULL_POINTER, NOLOG, a.pool = NULL);
        ROW(C_SHAPE, "count 0", FM_ERR_INVALID_SHAPE, NOLOG, a.count = 0);
        ROW(C_SHAPE, "draws 0", FM_ERR_INVALID_SHAPE, NOLOG, a.draws = 0);
        ROW(C_SHAPE, "draws 2^20 + 1", FM_ERR_INVALID_SHAPE, NOLOG, a.draws = (1 << 20) + 1);
        ROW(C_INDEX, "a pool row == samples", FM_ERR_INVALID_ARGUMENT, NOLOG, a.pool = rows_oor, a.count = 3);
        ROW(C_INDEX, "a pool row < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.pool = rows_neg, a.count = 3);
        ROW(C_STATE, "a view no pool row observes", FM_ERR_INVALID_ARGUMENT, LOG, a.pool = rows_odd, a.count = 3);
        ROW(C_STATE, "a dataset never loaded", FM_ERR_INVALID_ARGUMENT, NOLOG, a.ds = &empty);
        ROW(C_STATE, "a dataset without observed (never loaded)", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &partial);
#undef CALL
    }

    entry("fm_dataset_split");
    OUT("the split's order", order, sizeof order);
    OUT("the split's train", &train, sizeof train);
    OUT("the split's validation", &validation, sizeof validation);
    {
        typedef struct { const fm_dataset *ds; int32_t *order; int *train, *validation; } A;
        A base;
        base.ds = &ds, base.order = order, base.train = &train, base.validation = &validation;
#define CALL(a) fm_dataset_split(a.ds, 5, a.order, a.train, a.validation)
        ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
        ROW(C_NULL, "order NULL", FM_ERR_NULL_POINTER, NOLOG, a.order = NULL);
        ROW(C_NULL, "train NULL", FM_ERR_NULL_POINTER, NOLOG, a.train = NULL);
        ROW(C_NULL, "validation NULL", FM_ERR_NULL_POINTER, NOLOG, a.validation = NULL);
        ROW(C_STATE, "a dataset never loaded", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &empty);
ROW(C_STATE, "a dataset without observed (never loaded)", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &partial);
#undef CALL
    }
    drop_regions(base_regions);

    /* ---- evaluation, routing, training on the fixture model ---- */
    {
        static fm_metrics metrics;
        static fm_routing_report report;
        static fm_train_result result;
        static fm_model blank;
        static int64_t combination_tokens[3];
        static fm_dataset other;
        fm_train_desc td;
        memset(&blank, 0, sizeof blank);
        make_dataset(&other);
        other.features[1] = 4; /* does not fit the model's modality 1 */

        entry("fm_model_evaluate");
        keep_model(&model);
        keep_dataset(&ds);
        OUT("the metrics", &metrics, sizeof metrics);
        {
            typedef struct { fm_model *m; const fm_dataset *ds; const int32_t *rows; int count; fm_metrics *metrics; } A;
            A base;
            base.m = &model, base.ds = &ds, base.rows = rows_ok, base.count = 6, base.metrics = &metrics;
#define CALL(a) fm_model_evaluate(a.m, a.ds, a.rows, a.count, a.metrics)
            ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
            ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
            ROW(C_NULL, "rows NULL", FM_ERR_NULL_POINTER, NOLOG, a.rows = NULL);
            ROW(C_NULL, "metrics NULL", FM_ERR_NULL_POINTER, NOLOG, a.metrics = NULL);
            ROW(C_SHAPE, "count 0", FM_ERR_INVALID_SHAPE, NOLOG, a.count = 0);
            ROW(C_INDEX, "a row == samples", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rows = rows_oor, a.count = 3);
            ROW(C_INDEX, "a row < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rows = rows_neg, a.count = 3);
            ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
            ROW(C_STATE, "a dataset of other features", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &other);
            ROW(C_STATE, "a dataset of no views", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &empty);
#undef CALL
        }
        drop_regions(base_regions);

        entry("fm_model_routing");
        keep_model(&model);
        keep_dataset(&ds);
        memset(&report, SENTINEL_BYTE, sizeof report);
        report.load = O0, report.share = O1, report.combination_tokens = combination_tokens;
        KEEP("the routing report", &report, sizeof report);
        OUT("the combination tokens", combination_tokens, sizeof combination_tokens);
        {
            typedef struct { fm_model *m; const fm_dataset *ds; const int32_t *rows; int count; fm_routing_report *r; } A;
            A base;
            base.m = &model, base.ds = &ds, base.rows = rows_ok, base.count = 6, base.r = &report;
#define CALL(a) fm_model_routing(a.m, a.ds, a.rows, a.count, a.r)
            ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
            ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
            ROW(C_NULL, "rows NULL", FM_ERR_NULL_POINTER, NOLOG, a.rows = NULL);
            ROW(C_NULL, "report NULL", FM_ERR_NULL_POINTER, NOLOG, a.r = NULL);
            ROW(C_SHAPE, "count -1", FM_ERR_INVALID_SHAPE, NOLOG, a.count = -1);
            ROW(C_INDEX, "a row == samples", FM_ERR_INVALID_ARGUMENT, NOLOG, a.rows = rows_oor, a.count = 3);
            ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
            ROW(C_STATE, "a dataset of other features", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &other);
#undef CALL
        }
        drop_regions(base_regions);

        entry("fm_model_train");
        keep_model(&model);
        keep_dataset(&ds);
        OUT("the train result", &result, sizeof result);
        memset(&td, 0, sizeof td);
        td.epochs = 1, td.batch_size = 2, td.seed = 0;
        {
            typedef struct {
                fm_model *m; const fm_dataset *ds; const int32_t *tr; int trn; const int32_t *va; int van; fm_train_desc d;
                int no_desc; fm_train_result *r;
            } A;
            A base;
            base.m = &model, base.ds = &ds, base.tr = rows_ok, base.trn = 4, base.va = rows_ok + 4, base.van = 2, base.d = td;
            base.no_desc = 0, base.r = &result;
#define CALL(a) fm_model_train(a.m, a.ds, a.tr, a.trn, a.va, a.van, a.no_desc ? NULL : &a.d, a.r)
            ROW(C_NULL, "desc NULL", FM_ERR_NULL_POINTER, NOLOG, a.no_desc = 1);
            ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
            ROW(C_NULL, "dataset NULL", FM_ERR_NULL_POINTER, NOLOG, a.ds = NULL);
            ROW(C_NULL, "train_rows NULL", FM_ERR_NULL_POINTER, NOLOG, a.tr = NULL);
            ROW(C_NULL, "validation_rows NULL", FM_ERR_NULL_POINTER, NOLOG, a.va = NULL);
            ROW(C_SHAPE, "train_count 0", FM_ERR_INVALID_SHAPE, NOLOG, a.trn = 0);
            ROW(C_SHAPE, "validation_count 0", FM_ERR_INVALID_SHAPE, NOLOG, a.van = 0);
            ROW(C_INDEX, "a train row == samples", FM_ERR_INVALID_ARGUMENT, NOLOG, a.tr = rows_oor, a.trn = 3);
            ROW(C_INDEX, "a validation row < 0", FM_ERR_INVALID_ARGUMENT, NOLOG, a.va = rows_neg, a.van = 3);
            ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
            ROW(C_STATE, "a dataset of other features", FM_ERR_INVALID_ARGUMENT, LOG, a.ds = &other);
            ROW(C_DESC, "epochs -1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.epochs = -1);
            ROW(C_DESC, "batch_size > max_samples", FM_ERR_INVALID_ARGUMENT, LOG, a.d.batch_size = MS + 1);
            ROW(C_DESC, "batch_size -1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.batch_size = -1);
            ROW(C_DESC, "a class weight < 0", FM_ERR_INVALID_ARGUMENT, LOG, a.d.class_weights = cw_neg);
            ROW(C_NAN, "adam.lr NaN", FM_ERR_INVALID_ARGUMENT, LOG, a.d.adam.lr = NAN);
            ROW(C_DESC, "adam.beta1 1", FM_ERR_INVALID_ARGUMENT, LOG, a.d.adam.beta1 = 1.0f);
#undef CALL
        }
        drop_regions(base_regions);

        entry("fm_model_restore_best");
        {
            typedef struct { fm_model *m; } A;
            A base;
            base.m = &model;
#define CALL(a) fm_model_restore_best(a.m)
            ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
            ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, NOLOG, a.m = &blank);
#undef CALL
        }
        fm_dataset_free(&other);
    }
    fm_dataset_free(&ds);
}

/* ==== 12. checkpoints ======================================================================== */

static void rows_checkpoint(void) {
    static fm_model blank, loaded;
    char missing_dir[160], garbage[160], good[160], target[160];
    static const float data[6] = {1, 2, 3, 4, 5, 6};
    fm_safetensor st;
    memset(&blank, 0, sizeof blank);
    snprintf(missing_dir, sizeof missing_dir, "%s/no/such/dir/model.safetensors", tmpdir);
    snprintf(garbage, sizeof garbage, "%s/garbage.safetensors", tmpdir);
    snprintf(good, sizeof good, "%s/good.safetensors", tmpdir);
    snprintf(target, sizeof target, "%s/written.safetensors", tmpdir);
    write_text(tmpdir, "garbage.safetensors", "this is not a safetensors file, not even close to one");
    FM_CHECK(fm_model_save(&model, good) == FM_OK, "the checkpoint fixture");

    entry("fm_model_save");
    keep_model(&model);
    {
        typedef struct { const fm_model *m; const char *path; } A;
        A base;
        base.m = &model, base.path = target;
#define CALL(a) fm_model_save(a.m, a.path)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        ROW(C_NULL, "path NULL", FM_ERR_NULL_POINTER, NOLOG, a.path = NULL);
        ROW(C_STATE, "a model never created", FM_ERR_INVALID_ARGUMENT, LOG, a.m = &blank);
        ROW(C_FILE, "a directory that does not exist", FM_ERR_IO, LOG, a.path = missing_dir);
#undef CALL
    }
    drop_regions(base_regions);
    FM_CHECK(access(target, F_OK) != 0, "no rejected save left a file behind");

    entry("fm_model_load");
    {
        typedef struct { const char *path; int max; fm_model *m; } A;
        A base;
        base.path = good, base.max = MS, base.m = &loaded;
#define CALL(a) fm_model_load(a.path, a.max, a.m)
#define LROW(cat, what, want, flags, ...) ROWZ(cat, what, want, (flags) | ZEROED, &loaded, sizeof loaded, memset(&loaded, SENTINEL_BYTE, sizeof loaded); __VA_ARGS__)
        ROW(C_NULL, "model NULL", FM_ERR_NULL_POINTER, NOLOG, a.m = NULL);
        LROW(C_NULL, "path NULL", FM_ERR_NULL_POINTER, NOLOG, a.path = NULL);
        LROW(C_SHAPE, "max_samples 0", FM_ERR_INVALID_SHAPE, LOG, a.max = 0);
        LROW(C_SHAPE, "max_samples 2^20 + 1", FM_ERR_INVALID_SHAPE, LOG, a.max = (1 << 20) + 1);
        LROW(C_FILE, "a file that does not exist", FM_ERR_IO, LOG, a.path = missing_dir);
        LROW(C_FILE, "a file that is not safetensors", FM_ERR_BAD_FILE, LOG, a.path = garbage);
#undef LROW
#undef CALL
    }

    entry("fm_safetensors_write");
    memset(&st, 0, sizeof st);
    st.name = "t", st.dtype = "F32", st.rank = 2, st.shape[0] = 2, st.shape[1] = 3, st.data = data;
    {
        static const char *meta_odd[] = {"key", NULL, NULL}, *meta_crc[] = {"crc32", "0", NULL};
        typedef struct { const char *path; fm_safetensor t[2]; int count; const char *const *meta; int no_t; } A;
        A base;
        base.path = target, base.t[0] = st, base.t[1] = st, base.t[1].name = "u", base.count = 2, base.meta = NULL, base.no_t = 0;
#define CALL(a) fm_safetensors_write(a.path, a.no_t ? NULL : a.t, a.count, a.meta)
        ROW(C_NULL, "path NULL", FM_ERR_NULL_POINTER, NOLOG, a.path = NULL);
        ROW(C_NULL, "tensors NULL with count 2", FM_ERR_NULL_POINTER, NOLOG, a.no_t = 1);
        ROW(C_NULL, "a tensor's data NULL", FM_ERR_NULL_POINTER, NOLOG, a.t[1].data = NULL);
        ROW(C_SHAPE, "count -1", FM_ERR_INVALID_SHAPE, NOLOG, a.count = -1);
        ROW(C_SHAPE, "a shape -1", FM_ERR_INVALID_SHAPE, NOLOG, a.t[0].shape[1] = -1);
        ROW(C_DESC, "rank 5", FM_ERR_INVALID_ARGUMENT, LOG, a.t[0].rank = 5);
        ROW(C_DESC, "rank -1", FM_ERR_INVALID_ARGUMENT, LOG, a.t[0].rank = -1);
        ROW(C_DESC, "dtype F17", FM_ERR_INVALID_ARGUMENT, LOG, a.t[1].dtype = "F17");
        ROW(C_NULL, "a tensor's name NULL", FM_ERR_INVALID_ARGUMENT, LOG, a.t[1].name = NULL);
        ROW(C_DESC, "a tensor named __metadata__", FM_ERR_INVALID_ARGUMENT, LOG, a.t[1].name = "__metadata__");
        ROW(C_DESC, "two tensors of one name", FM_ERR_INVALID_ARGUMENT, LOG, a.t[1].name = "t");
        ROW(C_DESC, "a metadata key without a value", FM_ERR_INVALID_ARGUMENT, LOG, a.meta = meta_odd);
        ROW(C_DESC, "a metadata key crc32", FM_ERR_INVALID_ARGUMENT, LOG, a.meta = meta_crc);
        ROW(C_OVERFLOW, "a tensor of 2^62 elements", FM_ERR_OVERFLOW, NOLOG, a.t[0].rank = 4, a.t[0].shape[0] = a.t[0].shape[1] = a.t[0].shape[2] = a.t[0].shape[3] = 1 << 16);
        ROW(C_FILE, "a directory that does not exist", FM_ERR_IO, LOG, a.path = missing_dir);
#undef CALL
    }
    FM_CHECK(access(target, F_OK) != 0, "no rejected write left a file behind");
    remove(good), remove(garbage);
}

/* ---- the functions without a row, and why ---------------------------------------------------- */

static const struct {
    const char *name, *why;
} uncovered[] = {
    {"fm_active_isa", "takes no argument"},
    {"fm_threads", "takes no argument"},
    {"fm_trace_start", "declared and compiled only with FLEXMOE_TRACE (scheduling studies); not in this build"},
    {"fm_trace_stop", "declared and compiled only with FLEXMOE_TRACE; takes no argument"},
    {"fm_free", "any pointer of fm_alloc or NULL is valid; NULL is tested in test_api.c, a foreign pointer is undefined "
                "behaviour by contract (cannot be detected)"},
};

static int is_uncovered(const char *name) {
    size_t i;
    for (i = 0; i < sizeof uncovered / sizeof uncovered[0]; i++)
        if (strcmp(uncovered[i].name, name) == 0) return 1;
    return 0;
}

/* The public functions, from the manual (lines before FLEXMOE_IMPLEMENTATION) at test time: each
 * must have a row or an entry in `uncovered`. */
static void check_every_function_listed(void) {
    char path[512], line[1024];
    FILE *f;
    int seen = 0, missing = 0;
    snprintf(path, sizeof path, "%s/flexmoe.h", FM_TEST_SOURCE_ROOT);
    f = fopen(path, "r");
    FM_CHECK(f != NULL, "open %s", path);
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        char *open, *start;
        int i, found = 0;
        if (strstr(line, "#if defined(FLEXMOE_IMPLEMENTATION)")) break;
        if (line[0] == ' ' || line[0] == '/' || line[0] == '#' || line[0] == '*' || line[0] == '\t') continue;
        if (!(open = strchr(line, '('))) continue;
        if (strstr(line, "typedef")) continue;
        *open = 0;
        start = strstr(line, "fm_");
        if (!start) continue;
        while (strstr(start + 1, "fm_")) start = strstr(start + 1, "fm_");
        if (start > line && (start[-1] == '*' || start[-1] == ' ')) {
            seen++;
            for (i = 0; i < entry_count; i++) found |= strcmp(entry_names[i], start) == 0;
            if (!found && !is_uncovered(start)) {
                missing++;
                FM_CHECK(0, "public function %s has no row and is not listed as uncovered", start);
            }
        }
    }
    fclose(f);
    printf("test_validation: %d public functions declared in the manual, %d without a row or a reason\n", seen, missing);
}

int main(void) {
    int i;
    fm_isa isas[FM_ISA_COUNT];
    fm_test_seed("test_validation");
    fm_test_isas(isas);
    memset(&setup_desc, 0, sizeof setup_desc);
    setup_desc.logger.func = capture_log;
    FM_CHECK(fm_setup(&setup_desc) == FM_OK, "fm_setup with the capturing logger");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/fm_validation_XXXXXX");
    FM_CHECK(mkdtemp(tmpdir) != NULL, "mkdtemp");
    fixture();

    rows_hooks();
    rows_softmax();
    rows_topk();
    rows_gate();
    rows_losses();
    rows_layernorm();
    rows_confsmoe();
    rows_plan();
    rows_gemm();
    rows_ffn();
    rows_moe();
    rows_model_create();
    rows_model();
    rows_data();
    rows_checkpoint();

    check_every_function_listed();
    printf("test_validation: %d entry points, %d rejections (%d rows failed, %d rejected without a logged message)\n",
           entry_count, rows_total, rows_failed, rows_silent);
    for (i = 0; i < C_COUNT; i++) printf("  %-40s %d\n", category_names[i], category_rows[i]);
    for (i = 0; i < (int)(sizeof uncovered / sizeof uncovered[0]); i++)
        printf("  not covered: %s (%s)\n", uncovered[i].name, uncovered[i].why);

    fm_model_destroy(&model);
    drop_regions(0);
    fm_setup(NULL);
    {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0) printf("test_validation: could not remove %s\n", tmpdir);
    }
    return fm_test_finish("test_validation");
}
