/* flexmoe.h — SIMD kernels for sparse Mixture-of-Experts routing on the CPU.
 *
 * Header-only, stb style. In exactly one C or C++ file:
 *
 *     #define FLEXMOE_IMPLEMENTATION
 *     #include "flexmoe.h"
 *
 * and link with libm:  cc -O2 app.c -lm
 * Every other file includes flexmoe.h without the macro. flexmoe_simd.h (the ISA kernels) must
 * sit beside this file. One binary built with baseline flags carries the AVX2 and AVX-512 paths
 * on x86-64 and picks the best one the CPU and OS support at run time; aarch64 builds use NEON.
 *
 * Contents
 *   1. Version, status codes, memory and logging hooks   (public API)
 *   2. ISA selection                                      (public API)
 *   3. Softmax                                            (public API)
 *   4. Top-k and routing gates                            (public API)
 *   --- implementation (FLEXMOE_IMPLEMENTATION) ---
 *   5. Status strings, allocator, logger
 *   6. Kernel table and scalar reference kernels
 *   7. ISA kernels and run-time selection
 *   8. Argument checking and public entry points
 *
 * Conventions: every fallible call returns fm_status (FM_OK == 0). Buffers are caller-owned,
 * row-major, described by (rows, cols, leading dimension); kernels never allocate. Shapes are
 * int; a zero or negative shape, a leading dimension below the row length, a NULL buffer or a
 * shape whose extent overflows the address space is an error, reported before anything is read
 * or written. Optional configuration is a struct whose zero value means "default" (sokol style).
 *
 * Threads: when the implementation file is compiled with OpenMP, row-parallel kernels split
 * their rows across threads; rows are independent, so results do not depend on the thread count.
 * Call fm_setup() (or any kernel) once before starting threads: the ISA choice is lazy and
 * process-global.
 *
 * Licence: MIT (see LICENSE).
 */
#ifndef FLEXMOE_H
#define FLEXMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ==== 1. Version, status codes, memory and logging hooks ================================== */

#define FLEXMOE_VERSION_MAJOR 0
#define FLEXMOE_VERSION_MINOR 1
#define FLEXMOE_VERSION_PATCH 0

typedef enum fm_status {
    FM_OK = 0,
    FM_ERR_NULL_POINTER,    /* a required buffer or output pointer is NULL */
    FM_ERR_INVALID_SHAPE,   /* a dimension is zero or negative, or a leading dimension < cols */
    FM_ERR_OVERFLOW,        /* the extent of a buffer does not fit in the address space */
    FM_ERR_OUT_OF_MEMORY,   /* the allocator returned NULL */
    FM_ERR_UNKNOWN_ISA,     /* a name (FLEXMOE_ISA, fm_isa_from_name) that names no ISA path */
    FM_ERR_UNSUPPORTED_ISA, /* that ISA path is not compiled in or this CPU/OS cannot run it */
    FM_ERR_INVALID_ARGUMENT, /* a value outside its documented range (k > experts, a label >= classes, ...) */
    FM_STATUS_COUNT
} fm_status;

/* A short English description of a status code; never NULL. */
const char *fm_status_str(fm_status status);

/* malloc/free-like hooks. alloc must return memory aligned for any C type; fm_alloc adds the
 * 64-byte alignment the kernels like on top. */
typedef struct fm_allocator {
    void *(*alloc)(size_t size, void *user_data);
    void (*free)(void *ptr, void *user_data);
    void *user_data;
} fm_allocator;

typedef enum fm_log_level { FM_LOG_ERROR = 0, FM_LOG_WARNING, FM_LOG_INFO } fm_log_level;

typedef struct fm_logger {
    void (*func)(fm_log_level level, const char *message, void *user_data);
    void *user_data;
} fm_logger;

/* ==== 2. ISA selection ===================================================================== */

typedef enum fm_isa {
    FM_ISA_AUTO = 0, /* FLEXMOE_ISA if set, else the best path this machine supports */
    FM_ISA_SCALAR,   /* portable C, the reference and the fallback */
    FM_ISA_AVX2,     /* x86-64 AVX2 + FMA */
    FM_ISA_AVX512,   /* x86-64 AVX-512 F/BW/DQ/VL */
    FM_ISA_NEON,     /* aarch64 Advanced SIMD */
    FM_ISA_COUNT
} fm_isa;

typedef struct fm_desc {
    fm_isa isa;             /* FM_ISA_AUTO: the FLEXMOE_ISA environment variable, else best */
    fm_allocator allocator; /* zero: malloc and free */
    fm_logger logger;       /* zero: one line per message on stderr */
} fm_desc;

/* Optional. Installs the hooks and selects the ISA path; without it the defaults apply on
 * first use. Returns FM_ERR_UNKNOWN_ISA / FM_ERR_UNSUPPORTED_ISA when the requested path (from
 * desc->isa or FLEXMOE_ISA) cannot run here; kernels then return that error until a later
 * fm_setup() or fm_set_isa() succeeds. desc may be NULL (all defaults). */
fm_status fm_setup(const fm_desc *desc);

/* Switch the ISA path for all later calls (process-global). FM_ISA_AUTO re-runs the default
 * selection. Forcing a path this machine cannot run is an error and leaves no path active. */
fm_status fm_set_isa(fm_isa isa);

/* The path kernels run on now; FM_ISA_AUTO when the forced path could not be used. */
fm_isa fm_active_isa(void);

/* Nonzero when the path is compiled in and the CPU and OS support it (FM_ISA_AUTO: always). */
int fm_isa_supported(fm_isa isa);

/* "auto", "scalar", "avx2", "avx512", "neon"; "unknown" outside the enum. */
const char *fm_isa_name(fm_isa isa);

/* The inverse of fm_isa_name (case-sensitive); FM_ERR_UNKNOWN_ISA for anything else. */
fm_status fm_isa_from_name(const char *name, fm_isa *isa);

/* 64-byte aligned memory through the installed allocator; NULL on failure or size 0. */
void *fm_alloc(size_t size);
void fm_free(void *ptr);

/* ==== 3. Softmax =========================================================================== */

/* y[r][:] = softmax(x[r][:]) for each of `rows` rows of `cols` floats, computed as
 * exp(x - max) / sum(exp(x - max)), so any finite input (±1e30 included) is safe.
 * May run in place (y == x with ldy == ldx); other overlap is not allowed.
 * Non-finite inputs follow IEEE arithmetic on that formula, identically on every path:
 *   - a NaN anywhere in a row makes the whole output row NaN;
 *   - a +Inf in a row makes the whole row NaN (Inf - Inf), as in PyTorch and oneDNN;
 *   - -Inf entries give exactly 0, unless the whole row is -Inf, which gives NaN. */
fm_status fm_softmax_forward(int rows, int cols, const float *x, int ldx, float *y, int ldy);

/* Backward of the row softmax from its output: dx = y * (dy - sum(y * dy)) per row.
 * May run in place (dx == dy with lddx == lddy). A NaN in a row of y or dy makes that row of dx
 * NaN; infinities propagate by IEEE arithmetic on the formula above. */
fm_status fm_softmax_backward(int rows, int cols, const float *y, int ldy, const float *dy,
                              int lddy, float *dx, int lddx);


/* ==== 4. Top-k and routing gates =========================================================== */

/* The k largest of each row's cols values, in descending order, for 1 <= k <= cols:
 * indices[r][0..k) (required) and values[r][0..k) (optional: NULL skips them). Ties go to the
 * lower column, so results are identical on every path. A NaN ranks as +Inf (above every number;
 * among NaNs and +Infs the lower column first); values are copied from x, so a selected NaN reads
 * back as NaN. FM_ERR_INVALID_ARGUMENT when k is outside [1, cols]. The SIMD paths keep one row
 * per vector lane and a k-deep insertion network in registers for k <= 16; larger k runs a scalar
 * insertion per row. */
fm_status fm_topk(int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi,
                  float *values, int ldv);

#ifdef __cplusplus
}
#endif
#endif /* FLEXMOE_H */

/* ========================================================================================== */
/* ==== Implementation ====================================================================== */
/* ========================================================================================== */
#if defined(FLEXMOE_IMPLEMENTATION) && !defined(FLEXMOE_IMPLEMENTATION_DONE)
#define FLEXMOE_IMPLEMENTATION_DONE

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__cplusplus)
#define FM__RESTRICT __restrict
#else
#define FM__RESTRICT restrict
#endif

#ifdef _OPENMP
#define FM__OMP_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define FM__OMP_PARALLEL_FOR
#endif

/* ==== 5. Status strings, allocator, logger ================================================= */

const char *fm_status_str(fm_status status) {
    switch (status) {
    case FM_OK: return "ok";
    case FM_ERR_NULL_POINTER: return "a required pointer is NULL";
    case FM_ERR_INVALID_SHAPE: return "invalid shape (a dimension <= 0 or a leading dimension < cols)";
    case FM_ERR_OVERFLOW: return "the buffer extent overflows the address space";
    case FM_ERR_OUT_OF_MEMORY: return "out of memory";
    case FM_ERR_UNKNOWN_ISA: return "unknown ISA name (expected scalar, avx2, avx512 or neon)";
    case FM_ERR_UNSUPPORTED_ISA: return "the requested ISA path is not supported on this machine";
    case FM_ERR_INVALID_ARGUMENT: return "an argument is outside its documented range";
    case FM_STATUS_COUNT: break;
    }
    return "unknown status code";
}

static void *fm__default_alloc(size_t size, void *user_data) {
    (void)user_data;
    return malloc(size);
}

static void fm__default_free(void *ptr, void *user_data) {
    (void)user_data;
    free(ptr);
}

static void fm__default_log(fm_log_level level, const char *message, void *user_data) {
    static const char *const level_names[] = {"error", "warning", "info"};
    (void)user_data;
    fprintf(stderr, "flexmoe: %s: %s\n", level_names[level], message);
}

typedef struct fm__kernel_table fm__kernel_table;

static struct {
    fm_allocator allocator;
    fm_logger logger;
    const fm__kernel_table *kernels; /* NULL until selected, or after a failed selection */
    fm_status selection_status;
    int selected; /* a selection has run (successfully or not) */
} fm__state = {{fm__default_alloc, fm__default_free, NULL}, {fm__default_log, NULL}, NULL, FM_OK, 0};

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void fm__log(fm_log_level level, const char *format, ...) {
    char message[256];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    fm__state.logger.func(level, message, fm__state.logger.user_data);
}

/* Each block is over-allocated by 64 bytes plus a header that remembers the raw pointer. */
void *fm_alloc(size_t size) {
    const size_t align = 64, header = sizeof(void *);
    unsigned char *raw;
    uintptr_t aligned;
    if (size == 0 || size > SIZE_MAX - align - header) return NULL;
    raw = (unsigned char *)fm__state.allocator.alloc(size + align + header,
                                                     fm__state.allocator.user_data);
    if (!raw) return NULL;
    aligned = ((uintptr_t)(raw + header) + align - 1) & ~(uintptr_t)(align - 1);
    memcpy((unsigned char *)aligned - header, &raw, sizeof raw);
    return (void *)aligned;
}

void fm_free(void *ptr) {
    void *raw;
    if (!ptr) return;
    memcpy(&raw, (unsigned char *)ptr - sizeof(void *), sizeof raw);
    fm__state.allocator.free(raw, fm__state.allocator.user_data);
}

/* ==== 6. Kernel table and scalar reference kernels ========================================= */

/* One table per ISA path. Entries receive arguments the public entry points already checked. */
struct fm__kernel_table {
    fm_isa isa;
    void (*softmax_forward)(int rows, int cols, const float *x, int ldx, float *y, int ldy);
    void (*softmax_backward)(int rows, int cols, const float *y, int ldy, const float *dy,
                             int lddy, float *dx, int lddx);
    void (*topk)(int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi,
                 float *values, int ldv);
};

/* Plain C in float with double accumulation: the fallback path and the readable definition of
 * what every ISA kernel computes. */

static void fm__scalar_softmax_forward(int rows, int cols, const float *x, int ldx, float *y,
                                       int ldy) {
    int r, j;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        float max = xr[0];
        double sum = 0.0;
        float inv;
        for (j = 1; j < cols; j++) max = xr[j] > max ? xr[j] : max; /* NaN reaches the sum */
        for (j = 0; j < cols; j++) {
            yr[j] = expf(xr[j] - max);
            sum += yr[j];
        }
        inv = (float)(1.0 / sum);
        for (j = 0; j < cols; j++) yr[j] *= inv;
    }
}

static void fm__scalar_softmax_backward(int rows, int cols, const float *y, int ldy,
                                        const float *dy, int lddy, float *dx, int lddx) {
    int r, j;
    for (r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * ldy;
        const float *dyr = dy + (size_t)r * lddy;
        float *dxr = dx + (size_t)r * lddx;
        double dot = 0.0;
        float dotf;
        for (j = 0; j < cols; j++) dot += (double)yr[j] * dyr[j];
        dotf = (float)dot;
        for (j = 0; j < cols; j++) dxr[j] = yr[j] * (dyr[j] - dotf);
    }
}


/* Top-k order: by key descending, then column ascending; the key of NaN is +Inf. */
static float fm__rank_key(float v) { return v != v ? INFINITY : v; }

/* Insertion into the sorted prefix of indices; keys are re-read from the row, so no scratch. */
static void fm__scalar_topk(int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi,
                            float *values, int ldv) {
    int r, j, i, count;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        int32_t *idx = indices + (size_t)r * ldi;
        for (j = 0, count = 0; j < cols; j++) {
            const float key = fm__rank_key(xr[j]);
            if (count == k && !(key > fm__rank_key(xr[idx[k - 1]]))) continue;
            i = count < k ? count++ : k - 1;
            for (; i > 0 && key > fm__rank_key(xr[idx[i - 1]]); i--) idx[i] = idx[i - 1];
            idx[i] = j;
        }
        if (values)
            for (i = 0; i < k; i++) values[(size_t)r * ldv + i] = xr[idx[i]];
    }
}

/* The SIMD networks start from -Inf and only admit greater keys, so a row with fewer than k
 * keys above -Inf ends with -1 slots; those are its -Inf entries, which tie, so they go in
 * ascending column order: the lowest columns not selected yet. */
static void fm__topk_fill_missing(int cols, int k, int32_t *idx) {
    int filled = k, i, j, used;
    while (filled > 0 && idx[filled - 1] < 0) filled--;
    for (j = 0; j < cols && filled < k; j++) {
        for (i = 0, used = 0; i < filled && !used; i++) used = idx[i] == j;
        if (!used) idx[filled++] = j;
    }
}

/* The SIMD top-k keeps at most this many levels in registers. */
#define FM__TOPK_MAX 16

static const fm__kernel_table fm__scalar_kernels = {
    FM_ISA_SCALAR,
    fm__scalar_softmax_forward,
    fm__scalar_softmax_backward,
    fm__scalar_topk,
};

/* ==== 7. ISA kernels and run-time selection =============================================== */

#include "flexmoe_simd.h"

static const char *const fm__isa_names[FM_ISA_COUNT] = {"auto", "scalar", "avx2", "avx512", "neon"};

const char *fm_isa_name(fm_isa isa) {
    return (unsigned)isa < FM_ISA_COUNT ? fm__isa_names[isa] : "unknown";
}

fm_status fm_isa_from_name(const char *name, fm_isa *isa) {
    int i;
    if (!name || !isa) return FM_ERR_NULL_POINTER;
    for (i = 0; i < FM_ISA_COUNT; i++) {
        if (strcmp(name, fm__isa_names[i]) == 0) {
            *isa = (fm_isa)i;
            return FM_OK;
        }
    }
    return FM_ERR_UNKNOWN_ISA;
}

static const char *fm__isa_requirement(fm_isa isa) {
    switch (isa) {
    case FM_ISA_AVX2:
        return FM__HAVE_X86 ? "it needs AVX2 and FMA, and an OS that saves YMM state"
                            : "it exists only in x86-64 builds";
    case FM_ISA_AVX512:
        return FM__HAVE_X86 ? "it needs AVX-512 F, BW, DQ and VL, and an OS that saves ZMM state"
                            : "it exists only in x86-64 builds";
    case FM_ISA_NEON: return "it exists only in aarch64 builds";
    default: return "no such path";
    }
}

/* The table for a path, or NULL when it is not compiled in or the CPU/OS cannot run it. */
static const fm__kernel_table *fm__kernels_for(fm_isa isa) {
    switch (isa) {
    case FM_ISA_SCALAR: return &fm__scalar_kernels;
#if FM__HAVE_X86
    case FM_ISA_AVX2: return fm__cpu_has_avx2() ? &fm__avx2_kernels : NULL;
    case FM_ISA_AVX512: return fm__cpu_has_avx512() ? &fm__avx512_kernels : NULL;
#endif
#if FM__HAVE_NEON
    case FM_ISA_NEON: return &fm__neon_kernels;
#endif
    default: return NULL;
    }
}

int fm_isa_supported(fm_isa isa) {
    return isa == FM_ISA_AUTO || fm__kernels_for(isa) != NULL;
}

static const fm__kernel_table *fm__best_kernels(void) {
    static const fm_isa preference[] = {FM_ISA_AVX512, FM_ISA_AVX2, FM_ISA_NEON};
    size_t i;
    for (i = 0; i < sizeof preference / sizeof preference[0]; i++) {
        const fm__kernel_table *table = fm__kernels_for(preference[i]);
        if (table) return table;
    }
    return &fm__scalar_kernels;
}

static fm_status fm__select(fm_isa isa) {
    const char *source = "fm_set_isa";
    fm__state.selected = 1;
    fm__state.kernels = NULL;
    if (isa == FM_ISA_AUTO) {
        const char *forced = getenv("FLEXMOE_ISA");
        if (!forced || !*forced) {
            fm__state.kernels = fm__best_kernels();
            return fm__state.selection_status = FM_OK;
        }
        source = "FLEXMOE_ISA";
        if (fm_isa_from_name(forced, &isa) != FM_OK || isa == FM_ISA_AUTO) {
            fm__log(FM_LOG_ERROR, "FLEXMOE_ISA=%s names no ISA path (use scalar, avx2, avx512 or neon)",
                    forced);
            return fm__state.selection_status = FM_ERR_UNKNOWN_ISA;
        }
    }
    if ((unsigned)isa >= FM_ISA_COUNT) {
        fm__log(FM_LOG_ERROR, "%s: %d is not an fm_isa value", source, (int)isa);
        return fm__state.selection_status = FM_ERR_UNKNOWN_ISA;
    }
    fm__state.kernels = fm__kernels_for(isa);
    if (!fm__state.kernels) {
        fm__log(FM_LOG_ERROR, "%s: the %s path cannot run here (%s)", source, fm_isa_name(isa),
                fm__isa_requirement(isa));
        return fm__state.selection_status = FM_ERR_UNSUPPORTED_ISA;
    }
    return fm__state.selection_status = FM_OK;
}

fm_status fm_setup(const fm_desc *desc) {
    fm_desc zero;
    if (!desc) {
        memset(&zero, 0, sizeof zero);
        desc = &zero;
    }
    if (desc->allocator.alloc && desc->allocator.free) {
        fm__state.allocator = desc->allocator;
    } else {
        fm__state.allocator.alloc = fm__default_alloc;
        fm__state.allocator.free = fm__default_free;
        fm__state.allocator.user_data = NULL;
    }
    if (desc->logger.func) {
        fm__state.logger = desc->logger;
    } else {
        fm__state.logger.func = fm__default_log;
        fm__state.logger.user_data = NULL;
    }
    return fm__select(desc->isa);
}

fm_status fm_set_isa(fm_isa isa) { return fm__select(isa); }

static const fm__kernel_table *fm__active_kernels(void) {
    if (!fm__state.selected) fm__select(FM_ISA_AUTO);
    return fm__state.kernels;
}

fm_isa fm_active_isa(void) {
    const fm__kernel_table *table = fm__active_kernels();
    return table ? table->isa : FM_ISA_AUTO;
}

/* ==== 8. Argument checking and public entry points ========================================= */

/* A rows x cols matrix with leading dimension ld: shapes positive, ld >= cols, extent addressable. */
static fm_status fm__check_matrix(const void *data, int rows, int cols, int ld) {
    if (rows <= 0 || cols <= 0 || ld < cols) return FM_ERR_INVALID_SHAPE;
    if (!data) return FM_ERR_NULL_POINTER;
    if ((uint64_t)(rows - 1) * (uint64_t)ld + (uint64_t)cols > (uint64_t)(PTRDIFF_MAX / sizeof(float)))
        return FM_ERR_OVERFLOW;
    return FM_OK;
}

/* Rows per parallel chunk: large enough to amortise the fork, small enough to balance. */
#define FM__ROW_CHUNK 256

/* Runs `call` on consecutive chunks of rows [r0, r0 + n), in parallel under OpenMP. */
#define FM__FOR_ROW_CHUNKS(rows, r0, n, call)                                                     \
    do {                                                                                          \
        const int fm__chunks = ((rows) + FM__ROW_CHUNK - 1) / FM__ROW_CHUNK;                      \
        int fm__chunk;                                                                            \
        FM__OMP_PARALLEL_FOR                                                                      \
        for (fm__chunk = 0; fm__chunk < fm__chunks; fm__chunk++) {                                \
            const int r0 = fm__chunk * FM__ROW_CHUNK;                                             \
            const int n = (rows) - r0 < FM__ROW_CHUNK ? (rows) - r0 : FM__ROW_CHUNK;              \
            call;                                                                                 \
        }                                                                                         \
    } while (0)

fm_status fm_softmax_forward(int rows, int cols, const float *x, int ldx, float *y, int ldy) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, cols, ldy)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    FM__FOR_ROW_CHUNKS(rows, r0, n,
                       kernels->softmax_forward(n, cols, x + (size_t)r0 * ldx, ldx, y + (size_t)r0 * ldy, ldy));
    return FM_OK;
}

fm_status fm_softmax_backward(int rows, int cols, const float *y, int ldy, const float *dy,
                              int lddy, float *dx, int lddx) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(y, rows, cols, ldy)) != FM_OK) return status;
    if ((status = fm__check_matrix(dy, rows, cols, lddy)) != FM_OK) return status;
    if ((status = fm__check_matrix(dx, rows, cols, lddx)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    FM__FOR_ROW_CHUNKS(rows, r0, n,
                       kernels->softmax_backward(n, cols, y + (size_t)r0 * ldy, ldy, dy + (size_t)r0 * lddy,
                                                 lddy, dx + (size_t)r0 * lddx, lddx));
    return FM_OK;
}

fm_status fm_topk(int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi,
                  float *values, int ldv) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if (k < 1 || k > cols) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__check_matrix(indices, rows, k, ldi)) != FM_OK) return status;
    if (values && (status = fm__check_matrix(values, rows, k, ldv)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    FM__FOR_ROW_CHUNKS(rows, r0, n,
                       kernels->topk(n, cols, k, x + (size_t)r0 * ldx, ldx, indices + (size_t)r0 * ldi, ldi,
                                     values ? values + (size_t)r0 * ldv : NULL, ldv));
    return FM_OK;
}

#endif /* FLEXMOE_IMPLEMENTATION */

