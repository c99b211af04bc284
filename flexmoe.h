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
 *   4. LayerNorm and the ConfSMoE confidence gate         (public API)
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
    FM_ERR_INVALID_VALUE,   /* an index or parameter outside its range (expert >= E, label >= classes, eps < 0) */
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

/* ==== 4. LayerNorm and the ConfSMoE confidence gate ======================================== */

/* Row LayerNorm as nn.LayerNorm computes it: for each row, mean and biased variance over its
 * `cols` floats, y = (x - mean) * rstd * gamma + beta with rstd = 1 / sqrt(var + eps).
 * gamma and beta (cols floats each) may be NULL: 1 and 0. mean and rstd (rows floats each) are
 * optional outputs, the values the backward needs. eps == 0 means the PyTorch default 1e-5
 * (zero is "default" everywhere in flexmoe); a negative or NaN eps is FM_ERR_INVALID_VALUE.
 * Two passes in float with blocked sums (mean, then the squared deviations from it), so a large
 * common offset does not cancel the variance away; about 1e-6 relative to double.
 * May run in place (y == x with ldy == ldx).
 * Non-finite values follow IEEE arithmetic on that formula, identically on every path:
 *   - a NaN or ±Inf anywhere in a row of x makes the whole output row NaN and its rstd NaN
 *     (Inf - mean is Inf - Inf or NaN);
 *   - a NaN in gamma[j] or beta[j] makes column j NaN in every row.
 * On the vector paths, deviations |x - mean| above ~1e19 overflow the float variance (rstd
 * becomes 0); the scalar path sums in double. */
fm_status fm_layernorm_forward(int rows, int cols, const float *x, int ldx, const float *gamma,
                               const float *beta, float eps, float *y, int ldy, float *mean,
                               float *rstd);

/* Backward of fm_layernorm_forward from its input x and the saved mean and rstd:
 *   xhat = (x - mean) * rstd,  g = dy * gamma,
 *   dx = rstd * (g - avg(g) - xhat * avg(g * xhat))  (avg over the row),
 *   dgamma[j] = sum_r dy[r][j] * xhat[r][j],  dbeta[j] = sum_r dy[r][j].
 * gamma may be NULL (1). dgamma and dbeta (cols floats each) may be NULL; they are OVERWRITTEN,
 * not accumulated, like every gradient output in flexmoe (add them up yourself across calls).
 * xhat is recomputed from the float mean, which is only good to an ulp of |mean|: a row whose
 * spread is tiny against its mean (|mean| * rstd large) loses that many ulps in dx and dgamma.
 * dx may alias dy (dx == dy with lddx == lddy). Rows of dx are computed in parallel; dgamma and
 * dbeta are summed over the rows in row order for each column (columns in parallel), so every
 * result is independent of the thread count.
 * A NaN in row r of x, dy, mean or rstd makes row r of dx NaN; in dgamma/dbeta it propagates
 * by IEEE arithmetic (a NaN dy[r][j] poisons dgamma[j] and dbeta[j], a NaN in x's row r all of
 * dgamma). */
fm_status fm_layernorm_backward(int rows, int cols, const float *x, int ldx, const float *gamma,
                                const float *mean, const float *rstd, const float *dy, int lddy,
                                float *dx, int lddx, float *dgamma, float *dbeta);

/* ConfSMoE confidence gate (Zheng et al. 2025; see DESIGN.md). The router has already chosen k
 * experts per token; the gate replaces the router's softmax weights by confidences.
 * Shapes: T tokens, k slots per token, E experts, d features, C probe classes. Slot s = t*k + i
 * is token t's i-th expert e_s = experts[s]; h_s = row s of the (T*k) x d expert outputs E_k(x).
 *
 *   n_s   = LayerNorm(h_s), no affine: w is already a per-feature scale, so a gamma/beta inside
 *           would only reparameterise it (w . (gamma*n + beta) + b = (w*gamma) . n + b') and add
 *           redundant parameters with a flat direction in the loss;
 *   u_s   = sigmoid(w[e_s] . n_s + b[e_s])                      token-level confidence
 *   c_s   = u_s                           (FM_CONF_TOKEN), or
 *         = mean of u over the slots routed to e_s in this batch (FM_CONF_EXPERT_MEAN);
 *   out_t = LayerNorm(x_t + sum_i c_{t*k+i} h_{t*k+i}; gamma, beta)   (combination, unnormalised)
 *   p_s   = softmax(probe_w[e_s] h_s + probe_b[e_s]),  target_s = p_s[labels[t]]
 *   loss_conf  = mean over slots of (c_s - target_s)^2
 *   loss_probe = mean over slots of -log p_s[labels[t]]    (the probe's own cross-entropy)
 *
 * target_s is DETACHED (ConfidNet / TCP style): it is the label that the confidence regresses
 * onto, so loss_conf sends no gradient into the probe or, through the probe, into the experts;
 * otherwise minimising it would also push the probe towards whatever the confidence says, and
 * the target would chase its own estimate. The probe learns from loss_probe alone. By default
 * loss_probe treats h as a constant too (a linear probe that measures the experts without
 * training them); set probe_trains_experts to let its gradient reach h.
 *
 * NaN / Inf: IEEE propagation through the formulas above. A non-finite value in h_s makes
 * u_s NaN (through the LayerNorm), hence out_t NaN and, in FM_CONF_EXPERT_MEAN, c and out NaN
 * for every token routed to e_s; the losses become NaN. A NaN in x_t makes out_t NaN only. */
typedef enum fm_conf_mode {
    FM_CONF_TOKEN = 0,   /* each slot's own confidence */
    FM_CONF_EXPERT_MEAN  /* an expert's confidence is the mean over its slots in the batch */
} fm_conf_mode;

typedef struct fm_confsmoe_desc {
    int tokens;               /* T */
    int k;                    /* experts per token, 1 <= k <= experts */
    int experts;              /* E */
    int dim;                  /* d */
    int classes;              /* C, probe outputs */
    fm_conf_mode mode;        /* zero: FM_CONF_TOKEN */
    float eps;                /* both LayerNorms; zero: 1e-5 */
    int probe_trains_experts; /* zero: loss_probe's gradient stops at h */
} fm_confsmoe_desc;

/* Parameters, row-major, contiguous. probe_w is E x C x d: probe e's weight is C x d, the layout
 * of PyTorch's nn.Linear(d, C).weight, so each logit is a dot product with a contiguous row. */
typedef struct fm_confsmoe_params {
    const float *w;       /* E x d confidence weights */
    const float *b;       /* E confidence biases */
    const float *gamma;   /* d, output LayerNorm scale; NULL: 1 */
    const float *beta;    /* d, output LayerNorm shift; NULL: 0 */
    const float *probe_w; /* E x C x d; may be NULL only when labels is NULL */
    const float *probe_b; /* E x C; likewise */
} fm_confsmoe_params;

/* Parameter gradients, same shapes as the parameters. Each may be NULL (not computed); the
 * others are OVERWRITTEN. Parameter gradients sum over slots in slot order (serially), so they
 * do not depend on the thread count. The per-slot glue (confidence, probe, their gradients)
 * runs serially on top of the ISA kernels; the per-token combination and the output LayerNorm
 * are row-parallel under OpenMP. */
typedef struct fm_confsmoe_grads {
    float *w, *b, *gamma, *beta, *probe_w, *probe_b;
} fm_confsmoe_grads;

/* Floats the `saved` buffer of the forward/backward needs: 6*T*k + 2*T + 2*E + 2*d + C.
 * The forward fills it; the backward reads it and uses its tail as scratch, so one forward
 * supports any number of backwards. */
fm_status fm_confsmoe_saved_floats(const fm_confsmoe_desc *desc, size_t *floats);

/* experts: T*k int32 in [0, E). labels: T int32 in [0, C), or NULL to skip the probe and the
 * losses (then target and losses are not written and probe_w/probe_b may be NULL).
 * x: T x d (ldx), h: (T*k) x d (ldh), out: T x d (ldout), must not overlap x or h.
 * conf, target: optional T*k outputs (c_s and target_s). losses: optional float[2] =
 * {loss_conf, loss_probe}. Everything is checked (shapes, NULLs, index and label ranges) before
 * anything is written. */
fm_status fm_confsmoe_forward(const fm_confsmoe_desc *desc, const fm_confsmoe_params *params,
                              const int32_t *experts, const int32_t *labels, const float *x,
                              int ldx, const float *h, int ldh, float *out, int ldout,
                              float *conf, float *target, float *losses, float *saved);

/* Gradients of  L = sum(dout * out) + dloss_conf * loss_conf + dloss_probe * loss_probe
 * (pass 1, 1 for the plain sum of the two losses) with respect to x (dx, T x d), h (dh,
 * (T*k) x d) and the parameters (grads, may be NULL). Same desc, params, experts, labels, x, h
 * and saved as the forward. dx and dh are required and overwritten; dx may not overlap dout. */
fm_status fm_confsmoe_backward(const fm_confsmoe_desc *desc, const fm_confsmoe_params *params,
                               const int32_t *experts, const int32_t *labels, const float *x,
                               int ldx, const float *h, int ldh, const float *dout, int lddout,
                               float dloss_conf, float dloss_probe, float *saved, float *dx,
                               int lddx, float *dh, int lddh, const fm_confsmoe_grads *grads);

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
    case FM_ERR_INVALID_VALUE: return "an index or parameter value is out of range";
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
    /* mean, rstd may be NULL */
    void (*layernorm_forward)(int rows, int cols, const float *x, int ldx, const float *gamma,
                              const float *beta, float eps, float *y, int ldy, float *mean, float *rstd);
    /* dx only; dx may alias x or dy */
    void (*layernorm_backward)(int rows, int cols, const float *x, int ldx, const float *gamma,
                               const float *mean, const float *rstd, const float *dy, int lddy,
                               float *dx, int lddx);
    /* dgamma, dbeta (either may be NULL) of a range of columns, overwritten, rows in order */
    void (*layernorm_param_grad)(int rows, int cols, const float *x, int ldx, const float *mean,
                                 const float *rstd, const float *dy, int lddy, float *dgamma,
                                 float *dbeta);
    /* out[r] = a[r] . v */
    void (*gemv)(int rows, int cols, const float *a, int lda, const float *v, float *out);
    /* y += alpha * x */
    void (*axpy)(int n, float alpha, const float *x, float *y);
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

/* LayerNorm in double: mean, then the biased variance of the deviations from it. */
static void fm__scalar_layernorm_forward(int rows, int cols, const float *x, int ldx, const float *gamma,
                                         const float *beta, float eps, float *y, int ldy, float *mean,
                                         float *rstd) {
    int r, j;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        double m = 0.0, var = 0.0, rsd;
        for (j = 0; j < cols; j++) m += xr[j];
        m /= cols;
        for (j = 0; j < cols; j++) var += (xr[j] - m) * (xr[j] - m);
        var /= cols;
        rsd = 1.0 / sqrt(var + eps);
        if (mean) mean[r] = (float)m;
        if (rstd) rstd[r] = (float)rsd;
        for (j = 0; j < cols; j++) { /* the double mean: a float one rounds at the row's offset */
            float t = (float)((xr[j] - m) * rsd);
            yr[j] = t * (gamma ? gamma[j] : 1.0f) + (beta ? beta[j] : 0.0f);
        }
    }
}

/* dx = rstd * (g - avg(g) - xhat * avg(g * xhat)), g = dy * gamma; dx may alias x or dy. */
static void fm__scalar_layernorm_backward(int rows, int cols, const float *x, int ldx, const float *gamma,
                                          const float *mean, const float *rstd, const float *dy, int lddy,
                                          float *dx, int lddx) {
    int r, j;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx, *dyr = dy + (size_t)r * lddy;
        float *dxr = dx + (size_t)r * lddx;
        double sg = 0.0, sgx = 0.0;
        float a, q;
        for (j = 0; j < cols; j++) {
            double g = (double)dyr[j] * (gamma ? gamma[j] : 1.0f);
            sg += g;
            sgx += g * ((xr[j] - mean[r]) * rstd[r]);
        }
        a = (float)(sg / cols);
        q = (float)(sgx / cols);
        for (j = 0; j < cols; j++) {
            float xhat = (xr[j] - mean[r]) * rstd[r], g = dyr[j] * (gamma ? gamma[j] : 1.0f);
            dxr[j] = rstd[r] * (g - a - xhat * q);
        }
    }
}

/* dgamma, dbeta over a range of columns, summed over the rows in row order; either may be NULL. */
static void fm__scalar_layernorm_param_grad(int rows, int cols, const float *x, int ldx, const float *mean,
                                            const float *rstd, const float *dy, int lddy, float *dgamma,
                                            float *dbeta) {
    int r, j;
    for (j = 0; j < cols; j++) {
        double sg = 0.0, sb = 0.0;
        for (r = 0; r < rows; r++) {
            const float d = dy[(size_t)r * lddy + j];
            sg += (double)d * ((x[(size_t)r * ldx + j] - mean[r]) * rstd[r]);
            sb += d;
        }
        if (dgamma) dgamma[j] = (float)sg;
        if (dbeta) dbeta[j] = (float)sb;
    }
}

static void fm__scalar_gemv(int rows, int cols, const float *a, int lda, const float *v, float *out) {
    int r, j;
    for (r = 0; r < rows; r++) {
        double dot = 0.0;
        for (j = 0; j < cols; j++) dot += (double)a[(size_t)r * lda + j] * v[j];
        out[r] = (float)dot;
    }
}

static void fm__scalar_axpy(int n, float alpha, const float *x, float *y) {
    int j;
    for (j = 0; j < n; j++) y[j] += alpha * x[j];
}

static const fm__kernel_table fm__scalar_kernels = {
    FM_ISA_SCALAR,
    fm__scalar_softmax_forward,
    fm__scalar_softmax_backward,
    fm__scalar_layernorm_forward,
    fm__scalar_layernorm_backward,
    fm__scalar_layernorm_param_grad,
    fm__scalar_gemv,
    fm__scalar_axpy,
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

/* ---- LayerNorm ---- */

/* eps == 0 is the PyTorch default; a negative or NaN eps would give NaN or a negative variance. */
static fm_status fm__layernorm_eps(float eps, float *effective) {
    if (!(eps >= 0.0f)) return FM_ERR_INVALID_VALUE;
    *effective = eps == 0.0f ? 1e-5f : eps;
    return FM_OK;
}

/* Columns per parallel chunk of the dgamma / dbeta sums: 1 KiB of each output, which stays in
 * L1 while the rows stream past. */
#define FM__COL_CHUNK 256

/* dgamma / dbeta (either may be NULL) over all rows, columns in parallel. Each column is summed
 * over the rows by one kernel call in row order, so the result does not depend on the threads. */
static void fm__layernorm_param_grad(const fm__kernel_table *kernels, int rows, int cols, const float *x,
                                     int ldx, const float *mean, const float *rstd, const float *dy,
                                     int lddy, float *dgamma, float *dbeta) {
    const int chunks = (cols + FM__COL_CHUNK - 1) / FM__COL_CHUNK;
    int chunk;
    if (!dgamma && !dbeta) return;
    FM__OMP_PARALLEL_FOR
    for (chunk = 0; chunk < chunks; chunk++) {
        const int c0 = chunk * FM__COL_CHUNK, n = cols - c0 < FM__COL_CHUNK ? cols - c0 : FM__COL_CHUNK;
        kernels->layernorm_param_grad(rows, n, x + c0, ldx, mean, rstd, dy + c0, lddy,
                                      dgamma ? dgamma + c0 : NULL, dbeta ? dbeta + c0 : NULL);
    }
}

fm_status fm_layernorm_forward(int rows, int cols, const float *x, int ldx, const float *gamma,
                               const float *beta, float eps, float *y, int ldy, float *mean,
                               float *rstd) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, cols, ldy)) != FM_OK) return status;
    if ((status = fm__layernorm_eps(eps, &eps)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    FM__FOR_ROW_CHUNKS(rows, r0, n,
                       kernels->layernorm_forward(n, cols, x + (size_t)r0 * ldx, ldx, gamma, beta, eps,
                                                  y + (size_t)r0 * ldy, ldy, mean ? mean + r0 : NULL,
                                                  rstd ? rstd + r0 : NULL));
    return FM_OK;
}

fm_status fm_layernorm_backward(int rows, int cols, const float *x, int ldx, const float *gamma,
                                const float *mean, const float *rstd, const float *dy, int lddy,
                                float *dx, int lddx, float *dgamma, float *dbeta) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(mean, 1, rows, rows)) != FM_OK) return status;
    if ((status = fm__check_matrix(rstd, 1, rows, rows)) != FM_OK) return status;
    if ((status = fm__check_matrix(dy, rows, cols, lddy)) != FM_OK) return status;
    if ((status = fm__check_matrix(dx, rows, cols, lddx)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    /* the parameter sums first: dx may overwrite dy */
    fm__layernorm_param_grad(kernels, rows, cols, x, ldx, mean, rstd, dy, lddy, dgamma, dbeta);
    FM__FOR_ROW_CHUNKS(rows, r0, n,
                       kernels->layernorm_backward(n, cols, x + (size_t)r0 * ldx, ldx, gamma, mean + r0,
                                                   rstd + r0, dy + (size_t)r0 * lddy, lddy,
                                                   dx + (size_t)r0 * lddx, lddx));
    return FM_OK;
}

/* ---- ConfSMoE confidence gate ---- */

/* The regions of the caller's `saved` buffer; the last five are scratch. */
typedef struct fm__confsmoe_saved {
    float *ln_mean, *ln_rstd, *u, *c, *target; /* per slot */
    float *out_mean, *out_rstd;                /* per token */
    float *dz;                                 /* per slot, backward scratch */
    float *expert_sum, *expert_count;          /* per expert */
    float *n, *dn;                             /* d each */
    float *p;                                  /* C */
} fm__confsmoe_saved;

static fm__confsmoe_saved fm__confsmoe_split(float *saved, const fm_confsmoe_desc *desc) {
    const size_t slots = (size_t)desc->tokens * desc->k;
    fm__confsmoe_saved s;
    s.ln_mean = saved;
    s.ln_rstd = s.ln_mean + slots;
    s.u = s.ln_rstd + slots;
    s.c = s.u + slots;
    s.target = s.c + slots;
    s.out_mean = s.target + slots;
    s.out_rstd = s.out_mean + desc->tokens;
    s.dz = s.out_rstd + desc->tokens;
    s.expert_sum = s.dz + slots;
    s.expert_count = s.expert_sum + desc->experts;
    s.n = s.expert_count + desc->experts;
    s.dn = s.n + desc->dim;
    s.p = s.dn + desc->dim;
    return s;
}

fm_status fm_confsmoe_saved_floats(const fm_confsmoe_desc *desc, size_t *floats) {
    uint64_t total;
    if (!desc || !floats) return FM_ERR_NULL_POINTER;
    if (desc->tokens <= 0 || desc->k <= 0 || desc->experts <= 0 || desc->dim <= 0 || desc->classes <= 0 ||
        desc->k > desc->experts)
        return FM_ERR_INVALID_SHAPE;
    total = 6 * (uint64_t)desc->tokens * (uint64_t)desc->k + 2 * (uint64_t)desc->tokens +
            2 * (uint64_t)desc->experts + 2 * (uint64_t)desc->dim + (uint64_t)desc->classes;
    if ((uint64_t)desc->tokens * (uint64_t)desc->k > (uint64_t)INT32_MAX ||
        total > (uint64_t)(PTRDIFF_MAX / sizeof(float)))
        return FM_ERR_OVERFLOW;
    *floats = (size_t)total;
    return FM_OK;
}

/* Everything the forward and the backward share, shapes before values; writes nothing. */
static fm_status fm__confsmoe_check(const fm_confsmoe_desc *desc, const fm_confsmoe_params *params,
                                    const int32_t *experts, const int32_t *labels, const float *x, int ldx,
                                    const float *h, int ldh, const float *saved, float *eps) {
    size_t floats, s;
    fm_status status;
    int d, i;
    if (!desc || !params) return FM_ERR_NULL_POINTER;
    if ((status = fm_confsmoe_saved_floats(desc, &floats)) != FM_OK) return status;
    d = desc->dim;
    if ((status = fm__check_matrix(x, desc->tokens, d, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(h, desc->tokens * desc->k, d, ldh)) != FM_OK) return status;
    if ((status = fm__check_matrix(params->w, desc->experts, d, d)) != FM_OK) return status;
    if ((status = fm__check_matrix(params->b, 1, desc->experts, desc->experts)) != FM_OK) return status;
    if (labels) {
        if ((uint64_t)desc->experts * (uint64_t)desc->classes > (uint64_t)INT32_MAX) return FM_ERR_OVERFLOW;
        if ((status = fm__check_matrix(params->probe_w, desc->experts * desc->classes, d, d)) != FM_OK)
            return status;
        if ((status = fm__check_matrix(params->probe_b, 1, desc->experts * desc->classes,
                                       desc->experts * desc->classes)) != FM_OK)
            return status;
    }
    if (!experts || !saved) return FM_ERR_NULL_POINTER;
    if (desc->mode != FM_CONF_TOKEN && desc->mode != FM_CONF_EXPERT_MEAN) return FM_ERR_INVALID_VALUE;
    if ((status = fm__layernorm_eps(desc->eps, eps)) != FM_OK) return status;
    for (s = 0; s < (size_t)desc->tokens * desc->k; s++)
        if (experts[s] < 0 || experts[s] >= desc->experts) return FM_ERR_INVALID_VALUE;
    if (labels)
        for (i = 0; i < desc->tokens; i++)
            if (labels[i] < 0 || labels[i] >= desc->classes) return FM_ERR_INVALID_VALUE;
    return FM_OK;
}

/* Written as 1 / (1 + e^-|z|) on the side that cannot overflow; NaN stays NaN. */
static float fm__sigmoid(float z) {
    float e;
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    e = expf(z);
    return e / (1.0f + e);
}

/* m_t = x_t + sum_i c_{t,i} h_{t,i} for tokens [t0, t0 + n), into m. */
static void fm__confsmoe_combine(const fm__kernel_table *kernels, int t0, int n, int k, int d, const float *x,
                                 int ldx, const float *h, int ldh, const float *c, float *m, int ldm) {
    int t, i;
    for (t = t0; t < t0 + n; t++) {
        float *mt = m + (size_t)t * ldm;
        memcpy(mt, x + (size_t)t * ldx, (size_t)d * sizeof(float));
        for (i = 0; i < k; i++)
            kernels->axpy(d, c[(size_t)t * k + i], h + ((size_t)t * k + i) * ldh, mt);
    }
}

/* The probe's logits for slot h_s of expert e, into p (C floats); returns their log-sum-exp
 * (in double: C is small, and -log of an underflowed softmax entry would be +Inf). */
static double fm__confsmoe_logits(const fm__kernel_table *kernels, const fm_confsmoe_params *params, int d,
                                  int C, int e, const float *hs, float *p) {
    double max, sum = 0.0;
    int j;
    kernels->gemv(C, d, params->probe_w + (size_t)e * C * d, d, hs, p);
    kernels->axpy(C, 1.0f, params->probe_b + (size_t)e * C, p);
    for (max = p[0], j = 1; j < C; j++) max = p[j] > max ? p[j] : max;
    for (j = 0; j < C; j++) sum += exp(p[j] - max);
    return max + log(sum);
}

/* Per-expert mean of v over the slots routed to each expert, written back to every slot into
 * out (out may be v). Fixed slot order. */
static void fm__confsmoe_expert_mean(const int32_t *experts, size_t slots, int E, const float *v,
                                     fm__confsmoe_saved *S, float *out) {
    size_t s;
    int e;
    for (e = 0; e < E; e++) S->expert_sum[e] = S->expert_count[e] = 0.0f;
    for (s = 0; s < slots; s++) {
        S->expert_sum[experts[s]] += v[s];
        S->expert_count[experts[s]] += 1.0f;
    }
    for (s = 0; s < slots; s++) out[s] = S->expert_sum[experts[s]] / S->expert_count[experts[s]];
}

fm_status fm_confsmoe_forward(const fm_confsmoe_desc *desc, const fm_confsmoe_params *params,
                              const int32_t *experts, const int32_t *labels, const float *x,
                              int ldx, const float *h, int ldh, float *out, int ldout,
                              float *conf, float *target, float *losses, float *saved) {
    const fm__kernel_table *kernels;
    fm__confsmoe_saved S;
    fm_status status;
    float eps;
    size_t s, slots;
    int T, k, d, C;
    if ((status = fm__confsmoe_check(desc, params, experts, labels, x, ldx, h, ldh, saved, &eps)) != FM_OK)
        return status;
    if ((status = fm__check_matrix(out, desc->tokens, desc->dim, ldout)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    T = desc->tokens, k = desc->k, d = desc->dim, C = desc->classes;
    slots = (size_t)T * k;
    S = fm__confsmoe_split(saved, desc);

    for (s = 0; s < slots; s++) { /* token-level confidences */
        const int e = experts[s];
        float z;
        kernels->layernorm_forward(1, d, h + s * ldh, ldh, NULL, NULL, eps, S.n, d, S.ln_mean + s, S.ln_rstd + s);
        kernels->gemv(1, d, S.n, d, params->w + (size_t)e * d, &z);
        S.u[s] = fm__sigmoid(z + params->b[e]);
    }
    if (desc->mode == FM_CONF_EXPERT_MEAN)
        fm__confsmoe_expert_mean(experts, slots, desc->experts, S.u, &S, S.c);
    else
        memcpy(S.c, S.u, slots * sizeof(float));

    FM__FOR_ROW_CHUNKS(T, t0, n, fm__confsmoe_combine(kernels, t0, n, k, d, x, ldx, h, ldh, S.c, out, ldout));
    FM__FOR_ROW_CHUNKS(T, t0, n,
                       kernels->layernorm_forward(n, d, out + (size_t)t0 * ldout, ldout, params->gamma,
                                                  params->beta, eps, out + (size_t)t0 * ldout, ldout,
                                                  S.out_mean + t0, S.out_rstd + t0));

    if (labels) {
        double loss_conf = 0.0, loss_probe = 0.0;
        for (s = 0; s < slots; s++) {
            const int label = labels[s / k];
            const double lse = fm__confsmoe_logits(kernels, params, d, C, experts[s], h + s * ldh, S.p);
            loss_probe += lse - S.p[label];
            kernels->softmax_forward(1, C, S.p, C, S.p, C);
            S.target[s] = S.p[label];
            loss_conf += ((double)S.c[s] - S.target[s]) * ((double)S.c[s] - S.target[s]);
        }
        if (target) memcpy(target, S.target, slots * sizeof(float));
        if (losses) {
            losses[0] = (float)(loss_conf / (double)slots);
            losses[1] = (float)(loss_probe / (double)slots);
        }
    }
    if (conf) memcpy(conf, S.c, slots * sizeof(float));
    return FM_OK;
}

fm_status fm_confsmoe_backward(const fm_confsmoe_desc *desc, const fm_confsmoe_params *params,
                               const int32_t *experts, const int32_t *labels, const float *x,
                               int ldx, const float *h, int ldh, const float *dout, int lddout,
                               float dloss_conf, float dloss_probe, float *saved, float *dx,
                               int lddx, float *dh, int lddh, const fm_confsmoe_grads *grads) {
    static const fm_confsmoe_grads no_grads = {NULL, NULL, NULL, NULL, NULL, NULL};
    const fm__kernel_table *kernels;
    fm__confsmoe_saved S;
    fm_status status;
    float eps, conf_scale, probe_scale;
    size_t s, slots;
    int T, k, E, d, C, j;
    if ((status = fm__confsmoe_check(desc, params, experts, labels, x, ldx, h, ldh, saved, &eps)) != FM_OK)
        return status;
    if ((status = fm__check_matrix(dout, desc->tokens, desc->dim, lddout)) != FM_OK) return status;
    if ((status = fm__check_matrix(dx, desc->tokens, desc->dim, lddx)) != FM_OK) return status;
    if ((status = fm__check_matrix(dh, desc->tokens * desc->k, desc->dim, lddh)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__state.selection_status;
    if (!grads) grads = &no_grads;
    T = desc->tokens, k = desc->k, E = desc->experts, d = desc->dim, C = desc->classes;
    slots = (size_t)T * k;
    S = fm__confsmoe_split(saved, desc);
    conf_scale = labels ? (float)(2.0 * dloss_conf / (double)slots) : 0.0f;
    probe_scale = (float)(dloss_probe / (double)slots);

    /* The output LayerNorm: rebuild its input m in dx, take the gamma / beta sums from it, then
     * dm (= dx, since m = x + ...) in place. */
    FM__FOR_ROW_CHUNKS(T, t0, n, fm__confsmoe_combine(kernels, t0, n, k, d, x, ldx, h, ldh, S.c, dx, lddx));
    fm__layernorm_param_grad(kernels, T, d, dx, lddx, S.out_mean, S.out_rstd, dout, lddout, grads->gamma,
                             grads->beta);
    FM__FOR_ROW_CHUNKS(T, t0, n,
                       kernels->layernorm_backward(n, d, dx + (size_t)t0 * lddx, lddx, params->gamma,
                                                   S.out_mean + t0, S.out_rstd + t0,
                                                   dout + (size_t)t0 * lddout, lddout,
                                                   dx + (size_t)t0 * lddx, lddx));

    /* dL/dc per slot: through the combination, and through loss_conf (target detached) */
    for (s = 0; s < slots; s++) {
        float dc;
        kernels->gemv(1, d, h + s * ldh, ldh, dx + s / k * lddx, &dc);
        S.dz[s] = dc + (labels ? conf_scale * (S.c[s] - S.target[s]) : 0.0f);
    }
    /* dL/du (each slot's u enters its expert's mean with weight 1 / count), then dL/dz */
    if (desc->mode == FM_CONF_EXPERT_MEAN) fm__confsmoe_expert_mean(experts, slots, E, S.dz, &S, S.dz);
    for (s = 0; s < slots; s++) S.dz[s] *= S.u[s] * (1.0f - S.u[s]);

    if (grads->w) memset(grads->w, 0, (size_t)E * d * sizeof(float));
    if (grads->b) memset(grads->b, 0, (size_t)E * sizeof(float));
    if (grads->probe_w) memset(grads->probe_w, 0, (size_t)E * C * d * sizeof(float));
    if (grads->probe_b) memset(grads->probe_b, 0, (size_t)E * C * sizeof(float));

    /* Per slot, in slot order (the parameter gradients are sums over slots). */
    for (s = 0; s < slots; s++) {
        const int e = experts[s];
        const float *hs = h + s * ldh, *dm = dx + s / k * lddx;
        float *dhs = dh + s * lddh;
        memset(S.dn, 0, (size_t)d * sizeof(float));
        kernels->axpy(d, S.dz[s], params->w + (size_t)e * d, S.dn);
        kernels->layernorm_backward(1, d, hs, ldh, NULL, S.ln_mean + s, S.ln_rstd + s, S.dn, d, dhs, lddh);
        kernels->axpy(d, S.c[s], dm, dhs);
        if (grads->w) {
            kernels->layernorm_forward(1, d, hs, ldh, NULL, NULL, eps, S.n, d, NULL, NULL);
            kernels->axpy(d, S.dz[s], S.n, grads->w + (size_t)e * d);
        }
        if (grads->b) grads->b[e] += S.dz[s];
        if (labels && (grads->probe_w || grads->probe_b || desc->probe_trains_experts)) {
            const int label = labels[s / k];
            const float *pw = params->probe_w + (size_t)e * C * d;
            fm__confsmoe_logits(kernels, params, d, C, e, hs, S.p);
            kernels->softmax_forward(1, C, S.p, C, S.p, C);
            S.p[label] -= 1.0f;
            for (j = 0; j < C; j++) {
                const float g = probe_scale * S.p[j]; /* dL/dlogit_j */
                if (grads->probe_w) kernels->axpy(d, g, hs, grads->probe_w + ((size_t)e * C + j) * d);
                if (grads->probe_b) grads->probe_b[(size_t)e * C + j] += g;
                if (desc->probe_trains_experts) kernels->axpy(d, g, pw + (size_t)j * d, dhs);
            }
        }
    }
    return FM_OK;
}

#endif /* FLEXMOE_IMPLEMENTATION */
