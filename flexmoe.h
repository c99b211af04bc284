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
 *   5. LayerNorm and the ConfSMoE confidence gate         (public API)
 *   6. Routing plan, dispatch and combine                 (public API)
 *   7. Grouped expert GEMM, GELU and the expert FFN       (public API)
 *   8. The SMoE layer                                     (public API)
 *   --- implementation (FLEXMOE_IMPLEMENTATION) ---
 *   9. Status strings, allocator, logger
 *  10. Kernel table and scalar reference kernels
 *  11. ISA kernels and run-time selection
 *  12. Argument checking and public entry points
 *  13. The SMoE layer
 *
 * Conventions: every fallible call returns fm_status (FM_OK == 0), and FM_OK means every
 * promised output was written. Buffers are caller-owned, row-major, described by (rows, cols,
 * leading dimension); kernels never allocate. Shapes are int; a zero or negative shape, a
 * leading dimension below the row length, a NULL buffer, a dimension above FLEXMOE_MAX_DIM or a
 * shape whose extent overflows the address space is an error, reported before anything is
 * written (index arrays are range-checked before use). Optional configuration is a struct whose
 * zero value means "default" (sokol style).
 *
 * What every call leaves behind, on every path (tests/test_robustness.c checks each):
 *   - at most 16 KiB of stack (thread pools run on 128 KiB stacks); larger tiles live in
 *     optional caller workspace;
 *   - on x86, a clean upper vector state: every AVX2 and AVX-512 kernel returns through
 *     vzeroupper, so the caller's SSE and scalar code pays no transition penalty;
 *   - nothing read or written outside the buffers its shapes describe, padding lanes of a
 *     vector never becoming results whatever the inputs (NaN, +-Inf, huge values).
 *
 * Threads: when the implementation file is compiled with OpenMP (-fopenmp), every call splits its
 * work into items that each compute their own outputs: row blocks, (expert x input block x output
 * panel) tiles of the experts' weight gradients taken dynamically (so one hot expert of a skewed
 * mix is spread over every thread), (sample x head) in the attention, spans of the optimiser.
 * No item depends on how the others are scheduled, and sums over items run in item order, so
 * results are the same bit for bit at any thread count (fm_set_threads; OMP_NUM_THREADS).
 * Kernels may run on any number of threads at once. The ISA choice is process-global and lazy;
 * fm_set_isa() may switch it while kernels run elsewhere (each call runs on one path or returns
 * an error); fm_setup() installs hooks and is meant for start-up, before other threads call in.
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
    FM_ERR_IO,              /* the system refused to open, read, write, flush or rename a file */
    FM_ERR_BAD_FILE,        /* a file is truncated, damaged, foreign or does not match what it claims */
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

/* The largest dimension (rows, columns, features, tokens) and row index (a grouped GEMM's
 * offsets) any call accepts: 2^31 - 4096, so that loops stepping through a dimension in blocks
 * stay within int. Beyond it a call returns FM_ERR_OVERFLOW. */
#define FLEXMOE_MAX_DIM 2147479552

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
 * first use. An allocator needs both hooks, alloc and free, or neither (zero: malloc and free);
 * one without the other is FM_ERR_INVALID_ARGUMENT and changes nothing. Each block of fm_alloc
 * remembers the allocator that made it, and fm_free returns it there, even after a later
 * fm_setup() installed another. Returns FM_ERR_UNKNOWN_ISA / FM_ERR_UNSUPPORTED_ISA when the
 * requested path (from desc->isa or FLEXMOE_ISA) cannot run here; kernels then return that error
 * until a later fm_setup() or fm_set_isa() succeeds. desc may be NULL (all defaults). */
fm_status fm_setup(const fm_desc *desc);

/* Switch the ISA path for all later calls (process-global). FM_ISA_AUTO re-runs the default
 * selection. Forcing a path this machine cannot run is an error and leaves no path active.
 * Safe while kernels run on other threads: the new path is published atomically, a call in
 * flight finishes on the path it started with, and a call that finds no path active returns an
 * error (never FM_OK without its output). */
fm_status fm_set_isa(fm_isa isa);

/* The path kernels run on now; FM_ISA_AUTO when the forced path could not be used. */
fm_isa fm_active_isa(void);

/* Nonzero when the path is compiled in and the CPU and OS support it (FM_ISA_AUTO: always). */
int fm_isa_supported(fm_isa isa);

/* "auto", "scalar", "avx2", "avx512", "neon"; "unknown" outside the enum. */
const char *fm_isa_name(fm_isa isa);

/* The inverse of fm_isa_name (case-sensitive); FM_ERR_UNKNOWN_ISA for anything else. */
fm_status fm_isa_from_name(const char *name, fm_isa *isa);

/* The threads of flexmoe's parallel loops, when the implementation file is compiled with OpenMP
 * (-fopenmp); 1 otherwise. threads = 0 (the default) follows OpenMP's own count (OMP_NUM_THREADS,
 * else one per core); a positive count overrides it for every later call (process-global, meant
 * for start-up or between calls). Returns the count in effect. Results are the same bit for bit
 * at every count: work is split into items that each compute their own outputs in a fixed order,
 * and every sum over items runs in item order. */
int fm_set_threads(int threads);
int fm_threads(void);

#ifdef FLEXMOE_TRACE
/* Work-item tracing for scheduling studies (scripts/schedule.py), compiled in only when the
 * implementation is compiled with FLEXMOE_TRACE. Between fm_trace_start and fm_trace_stop every
 * parallel loop records one event as each of its items starts (item >= 0) and one as the loop
 * ends (item = -1); `loop` names the loop (a string the library owns), expert is the expert an
 * item works for (-1: none; for "gemm_strided", whose row blocks are cut for the thread count, the
 * product's rows). Events past `capacity` are counted but not kept. fm_trace_stop
 * returns how many events there were. */
typedef struct fm_trace_event {
    const char *loop;
    int line, item, expert, thread;
    double seconds; /* since fm_trace_start */
} fm_trace_event;
void fm_trace_start(fm_trace_event *events, int capacity);
int fm_trace_stop(void);
#endif

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
 * per vector lane and a k-deep insertion network in registers for k <= FLEXMOE_GATE_MAX_TOP_K;
 * larger k, and rows of more than 2^24 columns (which float lanes cannot number exactly), run a
 * scalar insertion per row. */
fm_status fm_topk(int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi,
                  float *values, int ldv);

/* Limits of the gates below: the top-k network's depth, the experts of one register tile, and the
 * token groups whose importance and load are kept apart. */
#define FLEXMOE_GATE_MAX_TOP_K 16
#define FLEXMOE_GATE_MAX_EXPERTS 1024
#define FLEXMOE_GATE_MAX_GROUPS 16

/* Softmax-then-top-k routing (Mixtral, ggml): indices = the top k of each row of logits (fm_topk
 * order, so ties and NaN as there), weights = softmax(logits) at those indices, divided by their
 * sum when `renormalize` is nonzero (then they equal the softmax over the k selected logits).
 * Selection is on the logits, not on rounded probabilities, so two logits that round to the
 * same probability still rank by value. 1 <= k <= min(experts, FLEXMOE_GATE_MAX_TOP_K),
 * experts <= FLEXMOE_GATE_MAX_EXPERTS. A row whose selected logits include NaN or +Inf gets NaN
 * weights. */
fm_status fm_softmax_topk_forward(int tokens, int experts, int k, int renormalize, const float *logits,
                                  int ldl, int32_t *indices, int ldi, float *weights, int ldw);

/* Gradient of the weights above with respect to the logits (d_logits overwritten, tokens x
 * experts), from the forward's logits, indices and weights and the weights' gradient. */
fm_status fm_softmax_topk_backward(int tokens, int experts, int k, int renormalize, const float *logits,
                                   int ldl, const int32_t *indices, int ldi, const float *weights, int ldw,
                                   const float *d_weights, int lddw, float *d_logits, int lddl);

/* The noisy top-k gate of FastMoE, as Flex-MoE uses it. Per token t, from its clean logits
 * c = x W_gate and noise logits r = x W_noise (fm_gate_logits_forward):
 *   training:  std = softplus(r) + noise_epsilon, noisy = c + n * std, n = fm_gate_noise(...)
 *   inference: noisy = c
 *   indices = the top k of noisy (fm_topk order), gates = softmax over those k noisy logits;
 *   importance[g][e] = sum of the gates given to expert e by the tokens of group g;
 *   load[g][e] (training, k < experts) = sum over those tokens of P(e stays in the top k under
 *     the noise) = Phi((c_e - theta) / std_e), theta = the (k+1)-th noisy logit when e is in the
 *     top k, else the k-th: FastMoE's differentiable load. In inference, or with k == experts,
 *     load counts the tokens routed to each expert (FastMoE's _gates_to_load) and has no gradient.
 * One pass over tiles of tokens (one token per vector lane): the tokens x experts noisy logits
 * and probabilities are only written when noisy_logits is given. "e in the top k" is FastMoE's
 * test noisy_e > the (k+1)-th noisy logit.
 * Across ISA paths the noise agrees to a few ulp (the integers of the draw are identical; exp,
 * log and erfinv round differently), so gates, importance and load agree to about 2e-5 and the
 * indices are identical except where two noisy logits are that close (a near-tie); without
 * noise (inference) the indices are identical to fm_topk's on every path. */
typedef struct fm_gate_desc {
    int tokens;
    int experts;              /* <= FLEXMOE_GATE_MAX_EXPERTS */
    int top_k;                /* 1 .. min(experts, FLEXMOE_GATE_MAX_TOP_K) */
    int training;             /* nonzero: add the noise and compute the differentiable load */
    int groups;               /* token groups for importance and load; 0: 1 */
    float noise_epsilon;      /* added to softplus(r); 0: 0.01 (FastMoE); finite and >= 0 */
    uint64_t seed;            /* the noise of token t, expert e is fm_gate_noise(seed, */
    uint64_t token_offset;    /*   token_offset + t, e): give each batch or step its own offset */
} fm_gate_desc;

/* Leading dimensions of 0 mean packed rows (experts or top_k). */
typedef struct fm_gate_tensors {
    const float *clean_logits;    /* tokens x experts, required */
    int ld_clean;
    const float *noise_logits;    /* tokens x experts, required in training */
    int ld_noise;
    const int32_t *token_group;   /* tokens, each in [0, groups); NULL: every token in group 0 */
    int32_t *indices;             /* tokens x top_k, written by the forward, read by the backward */
    int ld_indices;
    float *gates;                 /* tokens x top_k, likewise */
    int ld_gates;
    float *noisy_logits;          /* tokens x experts, optional output (the S-Router CE needs it) */
    int ld_noisy;
    float *importance;            /* groups x experts, optional output (overwritten) */
    float *load;                  /* groups x experts, optional output (overwritten) */
    float *workspace;             /* optional scratch, fm_gate_workspace_floats() floats (below) */
} fm_gate_tensors;

/* Floats of the optional workspace of fm_noisy_gate_forward (0 on a bad desc). Without one, the
 * training gate keeps the noise of the first 16 to 64 experts (16 on AVX-512, 32 on AVX2, 64 on NEON) between its two passes (a few KiB of
 * stack) and draws the noise of the others twice; with one, every expert's noise is drawn once.
 * It must not overlap the other tensors. */
size_t fm_gate_workspace_floats(const fm_gate_desc *desc);

fm_status fm_noisy_gate_forward(const fm_gate_desc *desc, const fm_gate_tensors *tensors);

/* Backward of fm_noisy_gate_forward: from the forward's inputs and outputs (tensors: clean and
 * noise logits, token_group, indices, gates; the noise is drawn again from the seed) and any of
 * the gradients of its outputs (NULL: zero), writes the gradients of the clean and noise logits
 * (overwritten). Gradients flow through the gates' softmax, through the load probabilities into
 * the clean logits, the noise std and the threshold logit, and through the noise into r.
 * Each token's noise is drawn once, into 4 KiB of stack; its rows of d_clean_logits and
 * d_noise_logits hold its noisy logits and std until their own gradients are written, so those
 * two outputs must not overlap any input. */
typedef struct fm_gate_gradients {
    const float *d_gates;         /* tokens x top_k */
    int ld_d_gates;
    const float *d_importance;    /* groups x experts */
    const float *d_load;          /* groups x experts (ignored where load is a count) */
    const float *d_noisy_logits;  /* tokens x experts */
    int ld_d_noisy;
    float *d_clean_logits;        /* tokens x experts, required */
    int ld_d_clean;
    float *d_noise_logits;        /* tokens x experts, required in training */
    int ld_d_noise;
} fm_gate_gradients;

fm_status fm_noisy_gate_backward(const fm_gate_desc *desc, const fm_gate_tensors *tensors,
                                 const fm_gate_gradients *gradients);

/* The noise step of the gate on its own: noisy = clean + n * std, std = softplus(noise) +
 * noise_epsilon, with the draws fm_noisy_gate_forward makes in training (desc: tokens, experts,
 * noise_epsilon, seed, token_offset; top_k and the rest unused). std (optional) receives std.
 * Unlike the gate, any number of experts. */
fm_status fm_gate_noise_forward(const fm_gate_desc *desc, const float *clean, int ldc, const float *noise,
                                int ldn, float *noisy, int ldy, float *std, int lds);

/* FastMoE's load on its own, the last step of the gate done as separate kernels: from the
 * clean logits, the noise step's noisy logits and std (fm_gate_noise_forward) and the top k + 1
 * noisy values of each token (fm_topk with k + 1; tokens x (top_k + 1), leading dimension ldv),
 * load[g][e] (groups x experts, overwritten) = the sum over the tokens of group g of
 * Phi((clean - theta) / std) as in fm_noisy_gate_forward. desc: tokens, experts, top_k
 * (< experts), groups. */
fm_status fm_gate_load_forward(const fm_gate_desc *desc, const float *clean, int ldc, const float *noisy, int ldn,
                               const float *std, int lds, const float *top_values, int ldv,
                               const int32_t *token_group, float *load);

/* The gate's N(0, 1) noise for a (global token index, expert) pair: a counter-based draw, so a
 * run is reproducible whatever the batching, threads or ISA: h = lowbias32(state(seed, token) ^
 * (expert + 1) * 0x9E3779B9), x = (-1)^(h >> 31) (1 - (((h >> 8) & 0x7FFFFF) + 1/2) / 2^23),
 * uniform in (-1, 1); n = sqrt(2) erfinv(x) (Giles' float erfinv). state() is the splitmix64
 * finaliser of seed + (token + 1) * 0x9E3779B97F4A7C15, folded to 32 bits as (uint32_t)(z ^
 * (z >> 32)); expert + 1 is computed in 32-bit unsigned arithmetic (any int expert is valid).
 * The SIMD paths compute the same x exactly and n within a few ulp. */
float fm_gate_noise(uint64_t seed, uint64_t token, int expert);

/* The gate's logits from token features: clean = x W_gate and, when w_noise is not NULL,
 * noise = x W_noise (x: tokens x dim, W: dim x experts, outputs tokens x experts, packed). */
fm_status fm_gate_logits_forward(int tokens, int dim, int experts, const float *x, int ldx,
                                 const float *w_gate, const float *w_noise, float *clean, float *noise);

/* Its backward: dx = d_clean W_gate^T + d_noise W_noise^T, dW_gate = x^T d_clean,
 * dW_noise = x^T d_noise (all overwritten; d_noise, w_noise and dw_noise NULL together, and any
 * of dx, dw_gate, dw_noise may be NULL when not wanted). */
fm_status fm_gate_logits_backward(int tokens, int dim, int experts, const float *x, int ldx,
                                  const float *w_gate, const float *w_noise, const float *d_clean,
                                  const float *d_noise, float *dx, int lddx, float *dw_gate, float *dw_noise);

/* ---- Router losses (value and gradient in one call; gradient pointers may be NULL) ---- */

/* cv^2(v) = var(v) / (mean(v)^2 + 1e-10), unbiased variance as in FastMoE; 0 when n == 1.
 * dv (n floats, overwritten) is its gradient. */
fm_status fm_cv_squared(int n, const float *v, float *value, float *dv);

/* Mean over the tokens with targets[t] >= 0 of the cross-entropy of softmax(logits[t]) toward
 * targets[t] (negative targets are ignored, as PyTorch's ignore_index; 0 when all are).
 * d_logits (tokens x experts, overwritten; zero rows for ignored tokens) is its gradient. */
fm_status fm_router_cross_entropy(int tokens, int experts, const float *logits, int ldl,
                                  const int32_t *targets, float *value, float *d_logits, int lddl);

/* Flex-MoE's gate loss for one chunk of tokens: the S-Router term, cross-entropy of the noisy
 * logits toward each token's modality-combination index over the tokens whose sample misses a
 * modality (combination[t] > 0; 0 = all modalities), plus, for each token group g,
 * cv^2(importance[g]) + cv^2(load[g]) (the G-Router balance; Flex-MoE uses group 0 = tokens of
 * full-modality samples, group 1 = the others). combination[t] must be < experts. The gradients
 * (NULL: not wanted) feed fm_noisy_gate_backward. */
fm_status fm_flexmoe_router_loss(int tokens, int experts, int groups, const float *noisy_logits, int ldl,
                                 const int32_t *combination, const float *importance, const float *load,
                                 float *value, float *d_noisy_logits, int lddl, float *d_importance,
                                 float *d_load);

/* ==== 5. LayerNorm and the ConfSMoE confidence gate ======================================== */

/* Row LayerNorm as nn.LayerNorm computes it: for each row, mean and biased variance over its
 * `cols` floats, y = (x - mean) * rstd * gamma + beta with rstd = 1 / sqrt(var + eps).
 * gamma and beta (cols floats each) may be NULL: 1 and 0. mean and rstd (rows floats each) are
 * optional outputs, the values the backward needs. eps == 0 means the PyTorch default 1e-5
 * (zero is "default" everywhere in flexmoe); a negative or NaN eps is FM_ERR_INVALID_ARGUMENT.
 * Two passes in float with blocked sums (mean, then the squared deviations from it), so a large
 * common offset does not cancel the variance away; about 1e-6 relative to double.
 * May run in place (y == x with ldy == ldx).
 * Non-finite values follow IEEE arithmetic on that formula, identically on every path:
 *   - a NaN or ±Inf anywhere in a row of x makes the whole output row NaN and its rstd NaN
 *     (Inf - mean is Inf - Inf or NaN); its mean is the row's sum over cols: +Inf or -Inf for
 *     infinities of one sign, NaN with both signs or a NaN;
 *   - a NaN in gamma[j] or beta[j] makes column j NaN in every row.
 * On the vector paths, which sum in float, a row whose sum overflows float (values near
 * FLT_MAX) gets an infinite mean, and deviations |x - mean| above ~1e19 overflow the float
 * variance (rstd becomes 0); the scalar path sums in double. */
fm_status fm_layernorm_forward(int rows, int cols, const float *x, int ldx, const float *gamma,
                               const float *beta, float eps, float *y, int ldy, float *mean,
                               float *rstd);

/* Backward of fm_layernorm_forward from its input x and the saved mean and rstd:
 *   xhat = (x - mean) * rstd,  g = dy * gamma,
 *   dx = rstd * (g - avg(g) - xhat * avg(g * xhat))  (avg over the row),
 *   dgamma[j] = sum_r dy[r][j] * xhat[r][j],  dbeta[j] = sum_r dy[r][j].
 * gamma may be NULL (1); dgamma is then still the gradient of that implicit unit gamma, and
 * dbeta that of an implicit zero beta. dgamma and dbeta (cols floats each) may be NULL; they are OVERWRITTEN,
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

/* ==== 6. Routing plan, dispatch and combine ================================================ */

/* A routing plan turns the (token, slot) -> expert assignments of a top-k router into the
 * expert-contiguous order the expert FFNs run in. Assignment a = t * top_k + i is token t's
 * i-th expert. Plans are built by a stable counting sort, so within an expert its assignments
 * keep token order and the plan is deterministic. Dropless by default; with a capacity factor f
 * each expert keeps at most ceil(f * tokens * top_k / experts) assignments, chosen by position
 * (the first in token order, as GShard and Switch) or by gate (the largest gates, ties to the
 * earlier assignment). Dropped assignments are counted in the plan and contribute nothing to
 * combine. */
typedef enum fm_drop_policy {
    FM_DROP_BY_POSITION = 0, /* keep each expert's earliest assignments */
    FM_DROP_BY_GATE          /* keep each expert's largest gates */
} fm_drop_policy;

typedef struct fm_plan_desc {
    int tokens;
    int top_k;
    int experts;
    float capacity_factor; /* 0: dropless; else > 0 */
    fm_drop_policy drop_policy;
} fm_plan_desc;

/* Caller-owned arrays, sized as noted; the build fills them and the sizes. */
typedef struct fm_routing_plan {
    int tokens, top_k, experts; /* copied from the desc */
    int rows;                   /* assignments kept = rows of the dispatched matrix */
    int dropped;                /* assignments dropped by the capacity */
    int32_t *counts;            /* experts: rows per expert */
    int32_t *offsets;           /* experts + 1: expert e owns dispatched rows [offsets[e], offsets[e+1]) */
    int32_t *order;             /* tokens * top_k: order[r] = the assignment in dispatched row r (r < rows) */
    int32_t *position;          /* tokens * top_k: the dispatched row of assignment a, -1 if dropped */
    int32_t *dropped_per_expert;/* experts, optional (NULL: not reported per expert) */
} fm_routing_plan;

/* indices: tokens x top_k experts (ldi), each in [0, experts); gates (ldg) are needed only by
 * FM_DROP_BY_GATE (else may be NULL). */
fm_status fm_routing_plan_build(const fm_plan_desc *desc, const int32_t *indices, int ldi, const float *gates,
                                int ldg, fm_routing_plan *plan);

/* Dispatch and combine trust no plan: before moving a row they check that order and position
 * are each other's inverse over the plan's rows (FM_ERR_INVALID_ARGUMENT otherwise), so a plan
 * edited or corrupted after its build cannot send a row outside the dispatched matrix. */

/* xe[r] = x[token of order[r]]: plan->rows x dim, expert-contiguous. */
fm_status fm_dispatch_forward(const fm_routing_plan *plan, int dim, const float *x, int ldx, float *xe, int ldxe);

/* Its transpose: dx[t] = sum over t's kept assignments a of dxe[position[a]] (overwritten). */
fm_status fm_dispatch_backward(const fm_routing_plan *plan, int dim, const float *dxe, int lddxe, float *dx,
                               int lddx);

/* y[t] = sum over t's kept assignments a = t * top_k + i of gates[t][i] * ye[position[a]], in
 * token order without atomics (overwritten; dropped assignments add nothing). */
fm_status fm_combine_forward(const fm_routing_plan *plan, int dim, const float *ye, int ldye, const float *gates,
                             int ldg, float *y, int ldy);

/* Its backward: dye[r] = gates[a] * dy[t] for the assignment a in row r (a dispatch of dy, scaled),
 * and the gate gradient d_gates[t][i] = <dy[t], ye[position[a]]> (0 when dropped); either output
 * may be NULL. */
fm_status fm_combine_backward(const fm_routing_plan *plan, int dim, const float *ye, int ldye, const float *gates,
                              int ldg, const float *dy, int lddy, float *dye, int lddye, float *d_gates, int lddg);

/* ==== 7. Grouped expert GEMM, GELU and the expert FFN ==================================== */

/* Every expert e computes Y_e = X_e . W_e + b_e on its own rows: with a routing plan's offsets,
 * rows [offsets[e], offsets[e+1]) of x (the dispatched matrix) belong to expert e. W_e is
 * in_features x out_features, stored packed:
 *
 *   panel p (columns 64p .. 64p + 63) of expert e starts at
 *       packed + e * fm_packed_weight_floats(in, out) + p * in * FM_GEMM_PANEL,
 *   and holds W_e[k][64p + j] at [k * FM_GEMM_PANEL + j], k < in, j < 64;
 *   columns past out_features are zero.
 *
 * The layout is the same on every ISA path, so packed weights move between machines, and it is a
 * fixed permutation (plus zero padding) of the plain weights, so elementwise optimisers (SGD,
 * Adam) can update packed weights directly: the backward writes dW in the same layout. */
#define FM_GEMM_PANEL 64

typedef enum fm_weight_layout {
    FM_WEIGHTS_IN_BY_OUT = 0, /* w[e][k][j]: the W in x . W */
    FM_WEIGHTS_OUT_BY_IN      /* w[e][j][k]: PyTorch's nn.Linear.weight */
} fm_weight_layout;

/* Floats of one expert's packed weights: ceil(out / 64) * 64 * in (0 on a bad shape: a feature
 * count <= 0 or above FLEXMOE_MAX_DIM). */
size_t fm_packed_weight_floats(int in_features, int out_features);

/* Packs experts plain matrices (rows of ldw floats, expert e's matrix at w + e * rows * ldw where
 * rows is in_features or out_features per the layout) into packed (fully written, padding
 * zeroed); unpack is its inverse and writes only the plain matrices' elements. */
fm_status fm_pack_weights(int experts, int in_features, int out_features, fm_weight_layout layout,
                          const float *w, int ldw, float *packed);
fm_status fm_unpack_weights(int experts, int in_features, int out_features, fm_weight_layout layout,
                            const float *packed, float *w, int ldw);

/* y[r] = x[r] . W_e + bias[e] for every row r of every expert e (bias: experts x out_features,
 * may be NULL). offsets: experts + 1 non-decreasing row indices starting at >= 0; rows outside
 * [offsets[0], offsets[experts]) are neither read nor written. */
fm_status fm_grouped_gemm_forward(int experts, const int32_t *offsets, int in_features, int out_features,
                                  const float *x, int ldx, const float *packed_w, const float *bias, float *y,
                                  int ldy);

/* The backward of fm_grouped_gemm_forward, each output optional (NULL: not computed), each
 * overwritten: dx = dy . W_e^T per row; d_packed_w (packed like the weights, padding zero) =
 * X_e^T . dY_e per expert; d_bias = column sums of dY_e, whether or not the forward had a bias
 * (then the gradient of an implicit zero bias). An expert without rows gets zero gradients. */
fm_status fm_grouped_gemm_backward(int experts, const int32_t *offsets, int in_features, int out_features,
                                   const float *x, int ldx, const float *packed_w, const float *dy, int lddy,
                                   float *dx, int lddx, float *d_packed_w, float *d_bias);

/* GELU, elementwise: FM_GELU_ERF is the exact x Phi(x) (PyTorch's default), FM_GELU_TANH the
 * tanh approximation (approximate="tanh"). Both follow their formulas at the extremes: +Inf gives
 * +Inf, -Inf gives NaN (Inf times 0, as PyTorch), NaN gives NaN; every finite x, however large,
 * gives a finite result (past |x| = 20, GELU(x) = x or 0 and GELU'(x) = 1 or 0 exactly, on every
 * path). y may alias x; the backward gives dx = dy * GELU'(x), and dx may alias x or dy;
 * at x = +-Inf, GELU'(x) is NaN (x times a zero slope). */
typedef enum fm_gelu { FM_GELU_ERF = 0, FM_GELU_TANH } fm_gelu;

fm_status fm_gelu_forward(int rows, int cols, fm_gelu kind, const float *x, int ldx, float *y, int ldy);
fm_status fm_gelu_backward(int rows, int cols, fm_gelu kind, const float *x, int ldx, const float *dy, int lddy,
                           float *dx, int lddx);

/* The expert FFN: y = GELU(x W1_e + b1_e) W2_e + b2_e for every row of expert e (offsets as in
 * the grouped GEMM). W1_e is dim x hidden and W2_e hidden x dim, both packed by fm_pack_weights;
 * biases are experts x hidden and experts x dim, and may be NULL. */
typedef struct fm_expert_ffn_desc {
    int experts, dim, hidden;
    fm_gelu gelu; /* default FM_GELU_ERF */
} fm_expert_ffn_desc;

typedef struct fm_expert_ffn_params {
    const float *w1, *b1, *w2, *b2;
} fm_expert_ffn_params;

/* Gradients, each optional (NULL: not computed) and overwritten; weights packed like the params. */
typedef struct fm_expert_ffn_grads {
    float *w1, *b1, *w2, *b2;
} fm_expert_ffn_grads;

/* hidden (rows x desc->hidden, ldh) receives GELU(x W1 + b1); pre (same shape, ldp), unless NULL,
 * receives x W1 + b1, which the backward needs. The work goes an expert's block of rows at a time
 * through both layers, so a block's hidden rows are still in cache when the second layer reads
 * them. */
fm_status fm_expert_ffn_forward(const fm_expert_ffn_desc *desc, const int32_t *offsets,
                                const fm_expert_ffn_params *params, const float *x, int ldx, float *y, int ldy,
                                float *hidden, int ldh, float *pre, int ldp);

/* The backward from what the forward saved: pre, and hidden (or NULL: recomputed from pre into
 * d_hidden). d_hidden (rows x desc->hidden, lddh) is scratch; dx may be NULL. */
fm_status fm_expert_ffn_backward(const fm_expert_ffn_desc *desc, const int32_t *offsets,
                                 const fm_expert_ffn_params *params, const float *x, int ldx, const float *pre,
                                 int ldp, const float *hidden, int ldh, const float *dy, int lddy, float *dx,
                                 int lddx, const fm_expert_ffn_grads *grads, float *d_hidden, int lddh);

/* ==== 8. The SMoE layer =================================================================== */

/* The sparse Mixture-of-Experts FFN layer as one call each way, composed from the kernels above:
 *
 *   logits   clean = x W_gate (and noise = x W_noise for the noisy gate), on the GEMM kernels
 *   gate     FM_GATE_NOISY_TOPK    Flex-MoE / FastMoE: fm_noisy_gate_forward (noise in training)
 *            FM_GATE_SOFTMAX_TOPK  Mixtral: fm_softmax_topk_forward on the clean logits
 *            FM_GATE_CONFIDENCE    ConfSMoE: the top k of the clean logits choose the experts;
 *                                  fm_confsmoe_forward combines their outputs by confidence
 *   plan     fm_routing_plan_build (dropless, or the capacity factor and drop policy)
 *   experts  dispatch, the expert FFN GELU(x W1 + b1) W2 + b2 per expert, then
 *   combine  y[t] = sum_i gates[t][i] expert_i(x[t])            (noisy and softmax gates), or
 *            y[t] = LayerNorm(x[t] + sum_i c[t][i] expert_i(x[t]))  (confidence gate: the
 *            residual and the output LayerNorm are part of ConfSMoE's combination)
 *
 * and back. Each token carries its modality-combination index (Flex-MoE's order, 0 = all
 * modalities) and its token group (0 = a full-modality sample's token, 1 = the others), which
 * feed the gate loss:
 *
 *   gate_loss = router_ce + balance
 *   router_ce = the S-Router term: for each token group, the mean over its tokens with
 *               combination > 0 of the cross-entropy of the routing logits (the noisy logits in
 *               training, else the clean ones) toward combination mod experts (so more
 *               combinations than experts share experts), summed over the groups. With the
 *               default groups that is one mean, over the tokens of samples that miss a
 *               modality; a model that gives each of its chunks of tokens a pair of groups gets
 *               the sum over chunks of each chunk's term, as Flex-MoE computes it per chunk
 *   balance   = sum over groups g of cv^2(importance[g]) + cv^2(load[g]) (the G-Router), where
 *               importance sums each expert's gates and load is FastMoE's differentiable load in
 *               training (the token counts otherwise, without gradient). The confidence gate has
 *               no balance term (ConfSMoE: decoupling the weights from the softmax replaces it).
 *
 * Nothing is allocated: the caller provides `saved` (what the forward keeps for the backward)
 * and `workspace` (scratch), sized by fm_moe_sizes for the largest batch, 64-byte aligned
 * (fm_alloc). Parameters and gradients are structs of pointers into caller memory, so a model
 * can point them into its arenas. Every gradient is overwritten, like every gradient output in
 * flexmoe. The calls check every argument (shapes, NULLs, index ranges, a saved buffer from
 * another forward) before writing anything. */
typedef enum fm_gate_kind {
    FM_GATE_NOISY_TOPK = 0, /* FastMoE's noisy top-k: softmax over the top k (noisy) logits */
    FM_GATE_SOFTMAX_TOPK,   /* softmax over every expert, then its top k (desc.renormalize) */
    FM_GATE_CONFIDENCE      /* ConfSMoE's confidence-weighted combination */
} fm_gate_kind;

/* Zero is Flex-MoE's configuration: d 128, hidden 256, 16 experts, top-4, the noisy gate,
 * exact GELU, dropless. */
typedef struct fm_moe_desc {
    int dim;                    /* d; 0: 128 */
    int hidden;                 /* each expert's hidden width; 0: 2 * dim */
    int experts;                /* 0: 16; <= FLEXMOE_GATE_MAX_EXPERTS */
    int top_k;                  /* 0: 4; <= min(experts, FLEXMOE_GATE_MAX_TOP_K) */
    int groups;                 /* token groups of the gate loss's terms; 0: 2; <= FLEXMOE_GATE_MAX_GROUPS */
    fm_gate_kind gate;          /* 0: FM_GATE_NOISY_TOPK */
    fm_gelu gelu;               /* 0: FM_GELU_ERF */
    float noise_epsilon;        /* noisy gate: std = softplus(x W_noise) + this; 0: 0.01 */
    int renormalize;            /* softmax gate: divide the k weights by their sum */
    float capacity_factor;      /* 0: dropless; else > 0, as fm_plan_desc */
    fm_drop_policy drop_policy; /* with a capacity factor */
    int classes;                /* confidence gate: the probes' classes (>= 2 when labels are given) */
    fm_conf_mode confidence;    /* confidence gate: per token or the expert's mean */
    float layernorm_eps;        /* confidence gate's LayerNorms; 0: 1e-5 */
} fm_moe_desc;

/* Parameters. w_gate and w_noise are plain dim x experts (x W); w1 and w2 are packed
 * (fm_pack_weights: w1 dim x hidden, w2 hidden x dim per expert, fm_packed_weight_floats each);
 * b1 (experts x hidden) and b2 (experts x dim) may be NULL. w_noise is used by the noisy gate
 * only, `confidence` by the confidence gate only (fm_confsmoe_params: w, b, gamma, beta and, when
 * labels are given, the probes). */
typedef struct fm_moe_params {
    const float *w_gate, *w_noise;
    const float *w1, *b1, *w2, *b2;
    fm_confsmoe_params confidence;
} fm_moe_params;

/* Gradients, same shapes and layouts as the parameters; each may be NULL (not computed). */
typedef struct fm_moe_grads {
    float *w_gate, *w_noise;
    float *w1, *b1, *w2, *b2;
    fm_confsmoe_grads confidence;
} fm_moe_grads;

/* One batch of tokens. */
typedef struct fm_moe_batch {
    int tokens;
    const float *x;               /* tokens x dim, leading dimension ldx (0: dim) */
    int ldx;
    const int32_t *combination;   /* tokens, >= 0; NULL: every token from the all-modality combination */
    const int32_t *token_group;   /* tokens, in [0, groups); NULL: 0 where combination is 0, else 1 */
    const int32_t *labels;        /* confidence gate: tokens class labels for the probes; NULL: no probe */
    int training;                 /* nonzero: the gate's noise and differentiable load */
    uint64_t seed, token_offset;  /* the noise of token t, expert e: fm_gate_noise(seed, token_offset + t, e) */
} fm_moe_batch;

/* What a forward reports (every pointer optional). */
typedef struct fm_moe_stats {
    int32_t *expert_rows;    /* experts: assignments each expert ran (after drops) */
    int32_t *expert_dropped; /* experts: assignments dropped by the capacity */
    int32_t *indices;        /* tokens x top_k: each token's experts, best first */
    float *slot_outputs;     /* tokens x top_k x dim: each slot's expert output (the expert of
                                indices[t][i] applied to x[t]; zero for a dropped slot), for a
                                caller that builds more on them (ConfSMoE's stage-2 imputation) */
    int rows, dropped;       /* their sums */
    float router_ce, balance, gate_loss; /* the gate loss and its terms (above) */
    float confidence_loss, probe_loss;   /* confidence gate with labels: fm_confsmoe_forward's losses */
} fm_moe_stats;

/* Bytes of the caller's buffers for batches of up to max_tokens tokens. A forward with a saved
 * buffer (training, or anything to be differentiated) needs saved_bytes of saved and
 * workspace_bytes of workspace; the backward needs the same two. An inference forward without a
 * saved buffer (saved = NULL) needs inference_workspace_bytes of workspace. */
typedef struct fm_moe_sizes {
    size_t saved_bytes, workspace_bytes, inference_workspace_bytes;
} fm_moe_sizes;

fm_status fm_moe_buffer_sizes(const fm_moe_desc *desc, int max_tokens, fm_moe_sizes *sizes);

/* y (tokens x dim, ldy; 0: dim) = the layer applied to batch->x. saved: fm_moe_buffer_sizes'
 * saved_bytes, or NULL for an inference forward; stats may be NULL. y must not overlap x. */
fm_status fm_moe_forward(const fm_moe_desc *desc, const fm_moe_params *params, const fm_moe_batch *batch,
                         float *y, int ldy, void *saved, void *workspace, fm_moe_stats *stats);

/* d(objective) / d(each term of the layer's losses): the objective is sum(dy * y) + gate *
 * gate_loss (+ confidence * confidence_loss + probe * probe_loss for the confidence gate) (+
 * sum(d_slot_outputs * slot_outputs) when the caller used fm_moe_stats.slot_outputs). Flex-MoE
 * trains with gate = 0.01; ConfSMoE with confidence = probe = 1. NULL: all zero. */
typedef struct fm_moe_loss_weights {
    float gate, confidence, probe;
    const float *d_slot_outputs; /* tokens x top_k x dim, or NULL; a dropped slot's is ignored */
} fm_moe_loss_weights;

/* The backward of the forward that filled `saved` (same desc, params and batch; FM_ERR_INVALID_ARGUMENT
 * for a saved buffer of another shape, kind or of no forward): dx (tokens x dim, lddx; 0: dim;
 * required, overwritten) and every gradient grads asks for. The gate's gradient reaches w_gate
 * (and w_noise) through the gates' softmax and, with a nonzero weights->gate, the gate loss; the
 * confidence gate's router learns from the S-Router term only. saved is also scratch for the
 * confidence gate, so run one backward per forward. */
fm_status fm_moe_backward(const fm_moe_desc *desc, const fm_moe_params *params, const fm_moe_batch *batch,
                          void *saved, const float *dy, int lddy, const fm_moe_loss_weights *weights, float *dx,
                          int lddx, const fm_moe_grads *grads, void *workspace);

/* ==== 9. The Flex-MoE model ================================================================ */

/* Flex-MoE (multimodal learning with missing modalities) as its official code builds it
 * (DESIGN.md), forward and backward, in the style of llm.c: plain structs, flat arenas, one
 * forward and one backward. M modalities; each sample observes a non-empty subset of them.
 *
 *   combination  c = fm_combination_index(M, the sample's observed mask): Flex-MoE's order
 *   encoders     each observed modality m: its F_m features, zero-padded to patches * P_m with
 *                P_m = ceil(F_m / patches), make `patches` patches (patch p = features
 *                [p P_m, (p + 1) P_m)), each a token: patch . encoder.m.weight + encoder.m.bias
 *   bank         each missing modality m: the `patches` learned tokens bank[c][m]
 *   position     x = the M * patches tokens (modality-major) + position
 *   attention    x = x + dropout(MHA(LayerNorm(x))): pre-LN, `heads` heads, q and kv without
 *                bias, the output projection with bias (no_attention_residual: the official
 *                code's x = dropout(MHA(LayerNorm(x))), for comparison)
 *   SMoE         for each modality's chunk of `patches` tokens: x = x + dropout(SMoE(LN(x))),
 *                one LayerNorm and one SMoE layer (section 8, Flex-MoE's noisy top-k gate)
 *                shared by the chunks, each chunk with its own gate loss (the S-Router target is
 *                c mod experts, so with 2^M - 1 > experts combinations share). The chunks go
 *                through the layer in one call, chunk-major, each chunk's full-modality tokens
 *                and the others a pair of token groups, so the layer's per-group gate loss is
 *                the sum over chunks, and the experts see every chunk's rows at once
 *   head         logits = (the mean of each chunk's tokens, concatenated: M * dim) . head.weight
 *                + head.bias
 *   loss         cross-entropy (class weights optional: sum_b w[y_b] nll_b / sum_b w[y_b], as
 *                PyTorch) + gate_loss_weight * the sum over chunks of the gate loss
 *
 * ConfSMoE's gate (gate = FM_GATE_CONFIDENCE) replaces the SMoE's gate and combination, nothing
 * else: the top k of the clean logits choose the experts (no noise), and SMoE(u) = LayerNorm(u +
 * sum_i c_i expert_i(u); moe.confidence.norm) with the confidences c of fm_confsmoe_forward (per
 * token, or each expert's mean over every slot of the batch, all chunks together), each token's
 * label its sample's. The gate loss keeps only the S-Router term (no balance), and the loss adds
 * the confidence loss and the probe's cross-entropy (each a mean over every slot of the batch):
 *   loss = task + gate_loss_weight * sum over chunks of router_ce + confidence + probe.
 * imputation = FM_IMPUTE_ZERO gives a missing modality zero tokens instead of the bank's;
 * FM_IMPUTE_FEATURES encodes the imputed features the batch carries for it (ConfSMoE's first stage,
 * fm_dataset_impute), the combination index and the gate loss still following the observed mask.
 * FM_IMPUTE_TWO_STAGE adds ConfSMoE's second stage, after the experts and before the SMoE's
 * dropout and residual, with either gate. For a sample that misses modalities, the keys are the
 * slots of its observed modalities' tokens (modality, patch, slot: n = observed * patches * top_k
 * of them), key_j = h_j Wk and value_j = h_j Wv from the slot's expert output h_j; each token t
 * of a missing modality asks q_t = (the mean of its own k expert outputs) Wq, and
 *   a = softmax_j(q_t . key_j / sqrt(dim)),  z_t = sum over the ceil(impute_keep * n) largest a_j
 *   (ties to the lower j; the others dropped, not renormalised) of a_j value_j,
 *   SMoE(u)_t = LayerNorm(y_t + z_t; moe.impute.norm)    (y_t the SMoE's output; observed tokens keep y_t)
 * The gradient reaches the expert outputs from both sides (fm_moe_stats.slot_outputs and
 * fm_moe_loss_weights.d_slot_outputs).
 *
 * Parameters, gradients and Adam's two moments are four arenas of the same layout, one
 * contiguous 64-byte aligned array each, described by one table of named tensors; the activations
 * the backward needs live in a fifth, sized for max_samples. Every dense product runs on the
 * GEMM micro-kernels. Dropout masks and gate noise come from counter-based streams keyed by
 * (seed, step, purpose, index), so they depend neither on the thread count nor on where a sample
 * sits in memory.
 *
 * Tensors (dense weights are stored in x W layout, in x out; PyTorch's nn.Linear.weight is the
 * transpose):
 *   encoder.<m>.weight  P_m x dim           encoder.<m>.bias  dim
 *   bank                (2^M - 1) x M x patches x dim
 *   position            M * patches x dim
 *   attention.norm.weight, attention.norm.bias       dim
 *   attention.q.weight  dim x dim           attention.kv.weight  dim x 2 dim (K's columns, then V's)
 *   attention.out.weight dim x dim          attention.out.bias   dim
 *   moe.norm.weight, moe.norm.bias          dim
 *   moe.gate.weight, moe.noise.weight       dim x experts
 *   moe.w1  experts x dim x hidden (packed: fm_pack_weights)     moe.b1  experts x hidden
 *   moe.w2  experts x hidden x dim (packed)                      moe.b2  experts x dim
 *   head.weight         M * dim x classes   head.bias  classes
 * The bank only with FM_IMPUTE_BANK, moe.noise.weight only with the noisy gate; FM_IMPUTE_TWO_STAGE
 * adds
 *   moe.impute.q.weight dim x dim           moe.impute.kv.weight  dim x 2 dim (K's columns, then V's)
 *   moe.impute.norm.weight, moe.impute.norm.bias    dim
 * and the confidence gate adds (fm_confsmoe_params):
 *   moe.confidence.w    experts x dim       moe.confidence.b  experts
 *   moe.confidence.norm.weight, moe.confidence.norm.bias       dim
 *   moe.probe.weight    experts x classes x dim (PyTorch's nn.Linear(dim, classes).weight each)
 *   moe.probe.bias      experts x classes
 * Initialisation (fm_model_init) as the reference's PyTorch modules do it: nn.Linear's
 * U(+-1/sqrt(in)) for the encoders, attention and head (weights and biases); the bank N(0, 1);
 * position zero; LayerNorms 1 and 0; FastMoE's gate (kaiming_uniform on a dim x experts tensor,
 * whose fan-in PyTorch takes as experts: U(+-1/sqrt(experts))) and experts (kaiming_uniform on
 * the experts x out x in tensor: U(+-1/sqrt(out * in)), biases zero); the confidence gate's and
 * the probes' weights and biases nn.Linear(dim, .)'s U(+-1/sqrt(dim)), its LayerNorm 1 and 0. */
#define FLEXMOE_MODEL_MAX_MODALITIES 8
#define FLEXMOE_MODEL_MAX_TENSORS (2 * FLEXMOE_MODEL_MAX_MODALITIES + 26) /* two per encoder, at most 26 more */

/* What stands in for a missing modality's tokens. */
typedef enum fm_imputation {
    FM_IMPUTE_BANK = 0, /* Flex-MoE's learned bank[combination][modality] */
    FM_IMPUTE_ZERO,     /* zero tokens (the position is still added): the baseline */
    FM_IMPUTE_FEATURES, /* ConfSMoE's first stage: the batch carries imputed features for a missing
                           modality (fm_dataset_impute: the mean of R observed training samples'),
                           encoded like an observed modality's; the observed mask still marks it
                           missing for the combination index and the gate loss */
    FM_IMPUTE_TWO_STAGE /* ConfSMoE's two stages: FM_IMPUTE_FEATURES, then the missing modalities'
                           tokens attend over the observed modalities' expert outputs (above) */
} fm_imputation;

/* Zero is the reference's configuration, except the modalities, their features and the classes,
 * which have no default. */
typedef struct fm_model_desc {
    int modalities;                              /* M: 1 .. FLEXMOE_MODEL_MAX_MODALITIES */
    int features[FLEXMOE_MODEL_MAX_MODALITIES];  /* each modality's feature count, >= 1 */
    int classes;                                 /* >= 2 */
    int patches;                                 /* tokens per modality; 0: 16 */
    int dim;                                     /* 0: 128 */
    int heads;                                   /* dividing dim; 0: 4 */
    int experts, top_k, hidden;                  /* 0: 16, 4, 2 * dim */
    float dropout;                               /* 0: 0.5; negative: none; else < 1 */
    float gate_loss_weight;                      /* 0: 0.01; negative: none */
    int no_attention_residual;                   /* nonzero: the official code's attention */
    float layernorm_eps;                         /* 0: 1e-5 */
    fm_gate_kind gate;        /* 0: Flex-MoE's noisy top-k; FM_GATE_CONFIDENCE: ConfSMoE's (below) */
    fm_conf_mode confidence;  /* confidence gate: per token (0) or the expert's mean over the batch */
    fm_imputation imputation; /* 0: the bank */
    float impute_keep;        /* FM_IMPUTE_TWO_STAGE: the fraction of attention weights kept; 0: 1/4 */
} fm_model_desc;

/* One named tensor of the arenas: `floats` floats from `offset` (a multiple of 16), `packed`
 * for the expert weights (fm_pack_weights' layout, with its padding; shape gives the plain
 * experts x in x out). */
typedef struct fm_tensor_info {
    char name[32];
    int rank, shape[4];
    size_t offset, floats;
    int packed;
} fm_tensor_info;

/* What a model scores on some samples of a dataset: accuracy, macro-F1 (over the classes that
 * occur among the labels or the predictions), one-vs-rest macro AUC (over the classes that have
 * both positives and negatives there; ties share their rank) and the mean cross-entropy. */
typedef struct fm_metrics {
    int samples;
    float accuracy, macro_f1, macro_auc, loss;
} fm_metrics;

/* Where a model's training stands: fm_model_train advances it, a checkpoint keeps it. With the
 * counter-based streams, the seed, the step and the epoch are the whole random state. */
typedef struct fm_train_state {
    int epoch;                  /* epochs completed */
    int64_t step;               /* Adam steps taken */
    uint64_t seed;              /* the run's (fm_train_desc.seed) */
    int best_epoch;             /* the epoch whose weights model->best holds; 0: none yet */
    fm_metrics best_validation; /* its validation scores */
} fm_train_state;

typedef struct fm__model_state fm__model_state;

typedef struct fm_model {
    fm_model_desc config;  /* the desc with every default filled in */
    int max_samples;
    size_t param_floats;   /* of each arena */
    float *params, *grads, *adam_m, *adam_v;
    float *best;           /* the weights of the best validation epoch (fm_model_train) */
    fm_train_state trained;
    int tensor_count;
    fm_tensor_info tensors[FLEXMOE_MODEL_MAX_TENSORS];
    fm__model_state *state; /* the activations and scratch; internal */
} fm_model;

/* One batch of samples. */
typedef struct fm_model_batch {
    int samples;                                       /* 1 .. max_samples */
    const float *features[FLEXMOE_MODEL_MAX_MODALITIES]; /* samples x features[m], rows packed; a
                                                          missing modality's row is not read (NULL
                                                          when no sample has the modality), except
                                                          with FM_IMPUTE_FEATURES and
                                                          FM_IMPUTE_TWO_STAGE: every row read */
    const uint8_t *observed;     /* samples x modalities, nonzero = observed; >= 1 per sample */
    const int32_t *labels;       /* samples, in [0, classes); NULL: no loss, no backward */
    const float *class_weights;  /* classes, finite and >= 0, not all zero; NULL: all 1 */
    int training;                /* nonzero: dropout and the gate's noise */
    uint64_t seed, step;         /* the streams of dropout and noise */
} fm_model_batch;

typedef struct fm_model_losses {
    float loss;       /* task + gate_loss_weight * gate (+ confidence + probe) */
    float task;       /* the (weighted) cross-entropy */
    float gate;       /* the sum over chunks of the SMoE gate loss */
    float confidence, probe; /* the confidence gate's losses; 0 for the noisy gate */
} fm_model_losses;

/* 2^modalities - 1 (0 outside 1 .. 30). */
int fm_combination_count(int modalities);
/* The combination index of an observed mask (bit m = modality m observed) in Flex-MoE's order:
 * subsets by size, largest first, each size in lexicographic order of the modality positions; 0
 * is all modalities. -1 for an empty mask, a bit past the modalities, or modalities outside
 * 1 .. 30. */
int fm_combination_index(int modalities, uint32_t mask);
/* The inverse: the mask of an index in [0, 2^modalities - 1); 0 outside. */
uint32_t fm_combination_mask(int modalities, int index);

/* Creates a model for batches of up to max_samples: checks the desc (an error message through
 * the logger names the field), fills model (every arena allocated, parameters zero until
 * fm_model_init). fm_model_destroy frees it (and accepts a model whose create failed). */
fm_status fm_model_create(const fm_model_desc *desc, int max_samples, fm_model *model);
void fm_model_destroy(fm_model *model);

/* The parameters' initial values from a seed (above); Adam's moments, the best weights and the
 * training state zero. */
fm_status fm_model_init(fm_model *model, uint64_t seed);

/* The tensor of that name, or NULL. */
const fm_tensor_info *fm_model_tensor(const fm_model *model, const char *name);

/* The seed of a batch's gate noise: patch p of sample s in modality m's chunk is the layer's token
 * t = (m * samples + s) * patches + p, and its noise for expert e is
 * fm_gate_noise(fm_model_noise_seed(batch), t, e). */
uint64_t fm_model_noise_seed(const fm_model_batch *batch);

/* Adam over the whole parameter arena, as PyTorch's torch.optim.Adam computes it (weight decay
 * added to the gradient, L2 style):
 *   g = grad + weight_decay * param,  m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,
 *   param -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
 * with m and v in model->adam_m and model->adam_v. One loop over the arenas: the packed experts'
 * padding and the gaps between tensors stay zero. */
typedef struct fm_adam_desc {
    float lr;           /* 0: 1e-3 */
    float beta1, beta2; /* 0: 0.9 and 0.999; in [0, 1) */
    float eps;          /* 0: 1e-8 */
    float weight_decay; /* 0: none */
} fm_adam_desc;

/* One step (step = 1 for the first, counting up) from model->grads. A NaN or infinite gradient
 * changes nothing: FM_ERR_INVALID_ARGUMENT, and the logger names the tensor and the step. */
fm_status fm_model_adam_step(fm_model *model, const fm_adam_desc *desc, int64_t step);

/* Where a training forward applies dropout. */
typedef enum fm_model_dropout_site {
    FM_DROPOUT_ATTENTION = 0, /* the attention block's output: samples x M * patches x dim, token order */
    FM_DROPOUT_MOE            /* the SMoE's output: M x samples * patches x dim, chunk-major */
} fm_model_dropout_site;

/* The dropout a training forward of this batch applies at a site (to inspect it, or to check a
 * reference against): mask (samples * M * patches * dim floats) receives each element's factor,
 * 0 or 1 / (1 - dropout); all 1 when the model has no dropout. */
fm_status fm_model_dropout_mask(const fm_model *model, const fm_model_batch *batch, fm_model_dropout_site site,
                                float *mask);

/* Forward: logits (samples x classes, optional) and, with labels, the losses (optional). The
 * activations stay in the model for fm_model_backward of the same batch. */
fm_status fm_model_forward(fm_model *model, const fm_model_batch *batch, float *logits, fm_model_losses *losses);

/* Backward of the last forward (same batch, with labels): d(loss) for every parameter into
 * model->grads (overwritten). */
fm_status fm_model_backward(fm_model *model, const fm_model_batch *batch);

/* ==== 10. Multi-view data ================================================================== */

/* A multi-view dataset in memory: for each view (modality) a samples x features matrix, which
 * samples observe it, and a label per sample. FLEXMOE_NO_STDIO leaves out fm_dataset_load (the
 * only part that touches files), as stb does.
 *
 * The directory format (../shared/data/handwritten/README.md): views.txt lists the views in
 * modality order, one "name features" per line; <name>.csv holds one sample per line, features
 * comma-separated, no header, an empty line where that sample misses the view; labels.csv holds
 * one integer label per line, 0 .. classes - 1. Every file has one line per sample. */
typedef struct fm_dataset {
    int samples, views, classes;
    char names[FLEXMOE_MODEL_MAX_MODALITIES][32];
    int features[FLEXMOE_MODEL_MAX_MODALITIES];
    float *values[FLEXMOE_MODEL_MAX_MODALITIES]; /* samples x features[v]; zero where missing */
    uint8_t *observed;                           /* samples x views */
    int32_t *labels;                             /* samples */
} fm_dataset;

#ifndef FLEXMOE_NO_STDIO
/* Loads a directory. Anything malformed (a missing or empty file, a ragged row, a field that is
 * not a finite number, files of different line counts, a label that is not an integer in
 * 0 .. 2^20, fewer than two classes, a sample that observes no view, more views than
 * FLEXMOE_MODEL_MAX_MODALITIES) is FM_ERR_INVALID_ARGUMENT, with a message through the logger
 * that names the file and the line; FM_ERR_OUT_OF_MEMORY when an allocation fails. dataset is
 * zeroed first, and left zeroed on failure. */
fm_status fm_dataset_load(const char *directory, fm_dataset *dataset);
#endif

void fm_dataset_free(fm_dataset *dataset);

/* Standardises each view with the mean and standard deviation of its observed rows among
 * `rows` (count indices, e.g. the training split), applied to every observed row; a feature
 * constant over those rows is only centred. A view with no observed row in `rows`, or whose
 * every feature is constant there, is FM_ERR_INVALID_ARGUMENT (its name in the message). */
fm_status fm_dataset_standardize(fm_dataset *dataset, const int32_t *rows, int count);

/* Simulated missingness: each observed view of each sample is dropped with probability rate
 * (a seeded stream of (seed, sample, view)), keeping at least one view per sample (the one the
 * stream ranks first among its observed views, when every one was drawn). */
fm_status fm_dataset_drop_views(fm_dataset *dataset, float rate, uint64_t seed);

/* ConfSMoE's first stage of imputation: each missing view of each sample gets the mean of `draws`
 * rows drawn (with replacement, a seeded stream of (seed, sample, view, draw)) from the rows of
 * pool (count indices, the training split) that observe that view; observed stays 0, so the model
 * still knows the view is missing (it reads these values with FM_IMPUTE_FEATURES and
 * FM_IMPUTE_TWO_STAGE). A view that no pool row observes is FM_ERR_INVALID_ARGUMENT (its name in
 * the message). */
fm_status fm_dataset_impute(fm_dataset *dataset, const int32_t *pool, int count, int draws, uint64_t seed);

/* A seeded shuffle split into train, validation and test: the first 70 %, the next 15 %, the
 * rest. order (samples indices) receives the shuffled samples; *train and *validation the sizes
 * of the first two parts. */
fm_status fm_dataset_split(const fm_dataset *dataset, uint64_t seed, int32_t *order, int *train, int *validation);

/* ==== 11. Training and evaluation ========================================================== */

/* The model in inference (no dropout, no noise) on count rows of the dataset (its views are the
 * model's modalities, in order), max_samples at a time. */
fm_status fm_model_evaluate(fm_model *model, const fm_dataset *dataset, const int32_t *rows, int count, fm_metrics *metrics);

/* Where a training run stands, for the callbacks. */
typedef struct fm_train_progress {
    const fm_model *model;        /* the model being trained: on_epoch may save a checkpoint of it */
    int epoch, epochs;            /* 1-based */
    int step, steps_per_epoch;    /* step within the epoch, 1-based */
    int64_t total_step;           /* over the run, 1-based: Adam's step and the streams' */
    float loss;                   /* this step's (on_step) or the epoch's mean (on_epoch) */
    fm_metrics validation;        /* on_epoch */
    int best_epoch;               /* the epoch whose weights the run keeps so far */
} fm_train_progress;

/* Zero is Flex-MoE's reference recipe: 20 epochs, batches of 16 (at most the model's
 * max_samples), 5 warm-up epochs of the curriculum, Adam's defaults. */
typedef struct fm_train_desc {
    int epochs;                   /* the run's total, counting those the model has trained; 0: 20 */
    int batch_size;               /* 0: min(16, max_samples) */
    int warmup_epochs;            /* 0: 5; negative: none */
    fm_adam_desc adam;
    const float *class_weights;   /* classes, or NULL */
    uint64_t seed;                /* shuffles, dropout and noise */
    /* Optional; a nonzero return stops the run after that step or epoch. */
    int (*on_step)(const fm_train_progress *progress, void *user_data);
    int (*on_epoch)(const fm_train_progress *progress, void *user_data);
    void *user_data;
} fm_train_desc;

typedef struct fm_train_result {
    int epochs_run, best_epoch, stopped; /* epochs completed (in all); stopped: a callback asked */
    int64_t steps;                       /* Adam steps taken (in all) */
    fm_metrics best_validation;
} fm_train_result;

/* Trains from the model's current parameters and training state (model->trained): each epoch
 * after the last it completed goes through the training rows in batches (forward, backward,
 * Adam), in the curriculum's order for the warm-up epochs (most observed views first, ties in row
 * order) and shuffled after, then evaluates the validation rows, keeping the weights of the best
 * validation accuracy (the first of equals) in model->best; the model ends with those weights.
 * The same seed, data and thread count give the same weights, bit for bit, and so does a run
 * resumed from a checkpoint saved by on_epoch (fm_model_save, fm_model_load) with the same
 * arguments. A run stopped by on_step within an epoch cannot be resumed bit for bit. A NaN or
 * infinite loss or gradient stops the run with FM_ERR_INVALID_ARGUMENT, a message naming the
 * step (and the tensor), and the weights from before that step. Everything the run allocates is
 * taken before its first step: FM_ERR_OUT_OF_MEMORY leaves the model as it was, so the same call
 * again, once memory is back, is the uninterrupted run. */
fm_status fm_model_train(fm_model *model, const fm_dataset *dataset, const int32_t *train_rows, int train_count,
                         const int32_t *validation_rows, int validation_count, const fm_train_desc *desc,
                         fm_train_result *result);

/* Copies model->best into the parameters (nothing when no epoch has been evaluated yet). */
fm_status fm_model_restore_best(fm_model *model);

/* Expert-collapse diagnostics: where the model's SMoE sends the tokens of count rows of a
 * dataset (the training rows: an epoch's worth), every chunk's tokens counted, with the
 * inference routing (the top k of the clean logits, no noise). Works for either gate. */
typedef struct fm_routing_report {
    int64_t assignments;        /* token-expert assignments counted: count * M * patches * top_k */
    float load_cv;              /* std / mean of the experts' assignment counts: 0 when even */
    float entropy;              /* of the experts' shares of the assignments, in nats */
    float normalized_entropy;   /* entropy / ln(experts): 1 when even, 0 when one expert takes all */
    /* Optional outputs, the caller's (NULL: not written): */
    float *load;                /* experts: each expert's share of the assignments (they sum to 1) */
    float *share;               /* (2^M - 1) x experts, combinations in Flex-MoE's order: each
                                   expert's share of that combination's assignments (a row sums to
                                   1; zero for a combination none of the rows has) */
    int64_t *combination_tokens; /* 2^M - 1: the tokens counted of each combination */
} fm_routing_report;

fm_status fm_model_routing(fm_model *model, const fm_dataset *dataset, const int32_t *rows, int count,
                           fm_routing_report *report);

/* ==== 12. Checkpoints ====================================================================== */

/* A checkpoint is a safetensors file, the format PyTorch and numpy users open directly
 * (safetensors.torch.load_file, safetensors.numpy.load_file):
 *   8 bytes   N, the header's length, little-endian
 *   N bytes   JSON: per tensor {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} and
 *             "__metadata__" (strings), padded with spaces so the data starts 8-byte aligned
 *   the data  each tensor's values, little-endian, row-major, in the header's order, no gaps
 * Its tensors, all F32:
 *   <name>                         the parameters under the names and shapes of the model's
 *                                  tensor table (section 9); moe.w1 and moe.w2 unpacked, experts x
 *                                  in x out (PyTorch's FastMoE keeps experts x out x in: transpose
 *                                  the last two)
 *   adam.m.<name>, adam.v.<name>   Adam's moments, the same shapes
 *   best.<name>                    model->best, when trained.best_epoch > 0
 * and its __metadata__:
 *   "format": "flexmoe.checkpoint", "version": "1"
 *   "config"    the model's fm_model_desc as JSON, defaults filled in: {"modalities": 6,
 *               "features": [240, 76, ...], "classes": 10, "patches": 16, "dim": 128, "heads": 4,
 *               "experts": 16, "top_k": 4, "hidden": 256, "dropout": 0.5, "gate_loss_weight":
 *               0.01, "no_attention_residual": 0, "layernorm_eps": 1e-05, "gate": 0,
 *               "confidence": 0, "imputation": 0, "impute_keep": 0.25} (the enums by value; a
 *               file without the last four keys takes their zero defaults)
 *   "training"  model->trained as JSON: {"epoch", "step", "seed", "best_epoch", "best_samples",
 *               "best_accuracy", "best_macro_f1", "best_macro_auc", "best_loss"}
 *   "crc32"     the CRC-32 of the data (zlib's: Python's zlib.crc32 agrees), 8 hex digits
 * FLEXMOE_NO_STDIO leaves this section out. */
#ifndef FLEXMOE_NO_STDIO
/* Saves the model atomically: written to path + ".tmp" in the same directory, flushed to the disk
 * (fsync, POSIX), renamed over path and the directory flushed, so a crash or a kill at any moment
 * leaves the old file or the new one in place, never a damaged one. FM_ERR_IO when the system
 * refuses a step (the logger says which and why; the old file stays). */
fm_status fm_model_save(const fm_model *model, const char *path);

/* Creates a model for batches of up to max_samples from a checkpoint: its configuration,
 * parameters, Adam's moments, training state and best weights, ready for fm_model_train to
 * continue or for inference. The file is trusted in nothing: its length, header, tensor dtypes,
 * shapes and offsets, the checksum and every value are checked before the model is used. A
 * file that is truncated, damaged, not safetensors, safetensors but not a flexmoe checkpoint, of
 * another format version, or whose tensors do not match its configuration is FM_ERR_BAD_FILE,
 * with a message through the logger that says what is wrong; FM_ERR_IO when it cannot be read.
 * model is zeroed on failure (fm_model_destroy accepts it). */
fm_status fm_model_load(const char *path, int max_samples, fm_model *model);

/* One tensor of a safetensors file of the caller's own (data for PyTorch, say). */
typedef struct fm_safetensor {
    const char *name;  /* unique, not "__metadata__" */
    const char *dtype; /* a safetensors dtype: "F32", "I32", "U8", "F64", "I64", ... */
    int rank;          /* 0 .. 4 */
    int shape[4];
    const void *data;  /* the values, little-endian, row-major */
} fm_safetensor;

/* Writes count tensors and metadata (key, value, key, value, ..., NULL; or NULL) to a
 * safetensors file, atomically as fm_model_save does; a "crc32" entry is added. */
fm_status fm_safetensors_write(const char *path, const fm_safetensor *tensors, int count, const char *const *metadata);
#endif

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

/* Parallel loops over independent items, every one taken dynamically (one at a time): items of
 * uneven cost balance, such as the experts' tiles under a skewed mix, and so do items of equal cost
 * on threads of uneven speed (a shared VM's vCPUs: traced, one thread of a static loop's two often
 * ran at half the other's speed, and the loop waited for it). Products below this many
 * multiply-adds stay on one thread (a parallel region costs microseconds). */
#define FM__PARALLEL_MIN_MACS 4194304.0
#ifdef _OPENMP
#include <omp.h>
static int fm__threads_requested;
static int fm__thread_count(void) { return fm__threads_requested > 0 ? fm__threads_requested : omp_get_max_threads(); }
#define FM__OMP_PARALLEL_FOR _Pragma("omp parallel for schedule(dynamic) num_threads(fm__thread_count())")
#define FM__PRAGMA(text) _Pragma(#text)
/* ... on `threads` threads (1: no parallel region's cost for small work) */
#define FM__OMP_PARALLEL_FOR_ON(threads) FM__PRAGMA(omp parallel for schedule(dynamic) num_threads(threads) if(threads > 1))
/* ... whose items end in an FM__OMP_ORDERED block, run in item order (sums over the items) */
#define FM__OMP_PARALLEL_FOR_ORDERED _Pragma("omp parallel for ordered schedule(dynamic) num_threads(fm__thread_count())")
#define FM__OMP_ORDERED _Pragma("omp ordered")
/* Threads for work of `macs` multiply-adds: 1 below FM__PARALLEL_MIN_MACS or inside another
 * parallel loop (whose items are the parallelism). */
static int fm__threads_for(double macs) { return macs >= FM__PARALLEL_MIN_MACS && !omp_in_parallel() ? fm__thread_count() : 1; }
#else
static int fm__thread_count(void) { return 1; }
static int fm__threads_for(double macs) { return (void)macs, 1; }
#define FM__OMP_PARALLEL_FOR
#define FM__OMP_PARALLEL_FOR_ON(threads)
#define FM__OMP_PARALLEL_FOR_ORDERED
#define FM__OMP_ORDERED
#endif

/* FLEXMOE_TRACE: FM__TRACE_ITEM(loop, item, expert) first in a parallel loop's body,
 * FM__TRACE_END(loop) after the loop. */
#ifdef FLEXMOE_TRACE
#include <time.h>
static fm_trace_event *fm__trace_events;
static int fm__trace_capacity, fm__trace_count, fm__tracing;
static double fm__trace_origin;
static double fm__trace_clock(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}
static void fm__trace(const char *loop, int line, int item, int expert) {
    int at;
    if (!fm__tracing) return;
#ifdef _OPENMP
#pragma omp atomic capture
#endif
    at = fm__trace_count++;
    if (at < fm__trace_capacity) {
        fm_trace_event *event = fm__trace_events + at;
        event->loop = loop, event->line = line, event->item = item, event->expert = expert;
#ifdef _OPENMP
        event->thread = omp_get_thread_num();
#else
        event->thread = 0;
#endif
        event->seconds = fm__trace_clock() - fm__trace_origin;
    }
}
void fm_trace_start(fm_trace_event *events, int capacity) {
    fm__trace_events = events, fm__trace_capacity = events && capacity > 0 ? capacity : 0;
    fm__trace_count = 0, fm__trace_origin = fm__trace_clock(), fm__tracing = 1;
}
int fm_trace_stop(void) { return fm__tracing = 0, fm__trace_count; }
#define FM__TRACE_ITEM(loop, item, expert) fm__trace(loop, __LINE__, (int)(item), expert)
#define FM__TRACE_END(loop) fm__trace(loop, __LINE__, -1, -1)
#else
#define FM__TRACE_ITEM(loop, item, expert) ((void)0)
#define FM__TRACE_END(loop) ((void)0)
#endif

/* An elementwise pass over n elements in spans of FM__SPAN (even: the dropout draws serve pairs),
 * the spans in parallel: `body` sees begin and count. */
#define FM__SPAN 16384
#define FM__FOR_SPANS(n, begin, count, body)                                                       \
    do {                                                                                           \
        const long fm__spans = (long)(((n) + FM__SPAN - 1) / FM__SPAN);                            \
        long fm__span;                                                                             \
        FM__OMP_PARALLEL_FOR                                                                       \
        for (fm__span = 0; fm__span < fm__spans; fm__span++) {                                     \
            const size_t begin = (size_t)fm__span * FM__SPAN;                                      \
            const size_t count = (n) - begin < FM__SPAN ? (n) - begin : FM__SPAN;                  \
            FM__TRACE_ITEM(__func__, fm__span, -1);                                                \
            body;                                                                                  \
        }                                                                                          \
        FM__TRACE_END(__func__);                                                                   \
    } while (0)

int fm_set_threads(int threads) {
#ifdef _OPENMP
    fm__threads_requested = threads > 0 ? threads : 0;
#else
    (void)threads;
#endif
    return fm__thread_count();
}

int fm_threads(void) { return fm__thread_count(); }

/* ==== 11. Status strings, allocator, logger ================================================*/

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
    case FM_ERR_IO: return "a file could not be opened, read, written or renamed";
    case FM_ERR_BAD_FILE: return "a file is truncated, damaged, foreign or mismatched";
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

/* Everything the fused gate kernel needs, checked and with defaults applied. */
typedef struct fm__gate_job {
    int tokens, experts, top_k, training, groups, renormalize;
    float noise_epsilon;
    uint64_t seed, token_offset;
    const float *clean, *noise;
    int ld_clean, ld_noise;
    const int32_t *token_group;
    int32_t *indices;
    float *gates, *noisy, *importance, *load; /* importance and load accumulate (zeroed first) */
    float *stds;                              /* the noise kernel's optional std output */
    float *tile;                              /* optional: the fused gate's noise tile, 3 W floats per expert */
    float *partials; /* optional: 2 x groups x experts floats per row chunk, for sums past the stack's */
    const float *noisy_in, *stds_in, *top_values; /* the load kernel's inputs */
    int ld_values;
    int ld_indices, ld_gates, ld_noisy, ld_stds;
} fm__gate_job;

/* The selection is read by kernels on any thread while fm_set_isa() may change it on another:
 * its fields are published with atomic stores and read with atomic loads, the table pointer
 * last, so a kernel sees either a complete table or NULL with the error that caused it. */
static struct {
    fm_allocator allocator;
    fm_logger logger;
    const fm__kernel_table *kernels; /* NULL until selected, or after a failed selection */
    int selection_status;            /* an fm_status */
    int selected;                    /* a selection has run (successfully or not) */
} fm__state = {{fm__default_alloc, fm__default_free, NULL}, {fm__default_log, NULL}, NULL, FM_OK, 0};

#if defined(__GNUC__) || defined(__clang__)
#define FM__LOAD(field) __atomic_load_n(&(field), __ATOMIC_ACQUIRE)
#define FM__STORE(field, value) __atomic_store_n(&(field), (value), __ATOMIC_RELEASE)
#else
#define FM__LOAD(field) (field)
#define FM__STORE(field, value) ((field) = (value))
#endif

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

/* What sits just below every aligned block: the raw pointer and the allocator that made it, so
 * a block is freed through its own allocator even after fm_setup() installed another. */
typedef struct fm__block_header {
    void *raw;
    fm_allocator allocator;
} fm__block_header;

/* Each block is over-allocated by 64 bytes plus the header. */
void *fm_alloc(size_t size) {
    const size_t align = 64, header = sizeof(fm__block_header);
    const fm_allocator allocator = fm__state.allocator;
    fm__block_header block;
    unsigned char *raw;
    uintptr_t aligned;
    if (size == 0 || size > SIZE_MAX - align - header) return NULL;
    raw = (unsigned char *)allocator.alloc(size + align + header, allocator.user_data);
    if (!raw) return NULL;
    aligned = ((uintptr_t)(raw + header) + align - 1) & ~(uintptr_t)(align - 1);
    block.raw = raw;
    block.allocator = allocator;
    memcpy((unsigned char *)aligned - header, &block, sizeof block);
    return (void *)aligned;
}

void fm_free(void *ptr) {
    fm__block_header block;
    if (!ptr) return;
    memcpy(&block, (unsigned char *)ptr - sizeof block, sizeof block);
    block.allocator.free(block.raw, block.allocator.user_data);
}

/* ==== 12. Kernel table and scalar reference kernels ========================================= */

/* One table per ISA path. Entries receive arguments the public entry points already checked. */
struct fm__kernel_table {
    fm_isa isa;
    void (*softmax_forward)(int rows, int cols, const float *x, int ldx, float *y, int ldy);
    void (*softmax_backward)(int rows, int cols, const float *y, int ldy, const float *dy,
                             int lddy, float *dx, int lddx);
    void (*topk)(int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi,
                 float *values, int ldv);
    void (*gate)(const fm__gate_job *job);
    void (*gate_noise)(const fm__gate_job *job); /* clean, noise -> noisy (and stds) only */
    void (*gate_load)(const fm__gate_job *job);  /* clean, stds, top k+1 -> load only */
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
    /* dst[position[t*k+i]] = (scale ? scale[t][i] : 1) * src[t] over position >= 0, t < tokens;
     * stream: write dst with streaming stores (fm__stream_output) */
    void (*scatter_rows)(int tokens, int k, int dim, const float *src, int ld_src, const int32_t *position,
                         const float *scale, int ld_scale, float *dst, int ld_dst, int stream);
    /* dst[t] = sum_i (weights ? weights[t][i] : 1) * src[position[t*k+i]] over position >= 0, the
     * first kept term scaled and the others added in slot order; stream as above */
    void (*combine_rows)(int tokens, int k, int dim, const float *src, int ld_src, const int32_t *position,
                         const float *weights, int ldw, float *dst, int ld_dst, int stream);
    /* out[t][i] = <a[t], src[position[t*k+i]]>, 0 where position < 0 */
    void (*row_dots)(int tokens, int k, int dim, const float *a, int lda, const float *src, int ld_src,
                     const int32_t *position, float *out, int ldo);
    /* C[rows x cols] (+)= bias + A . P for one packed panel P (depth x FM_GEMM_PANEL, cols <= 64):
     * a(i, p) = a[i * a_row + p * a_depth]; bias (cols floats) may be NULL; accumulate adds C */
    void (*gemm_panel)(int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth, const float *panel,
                       const float *bias, int accumulate, float *c, ptrdiff_t ldc, int cols);
    /* gemm_panel on a panel whose rows are ldp floats apart (rows of dy read in place), and, with
     * act, GELU(C) of gelu_kind (fm_gelu) written to act as well (when act is c, only GELU(C)):
     * the FFN's first layer with its activation. A full panel row (64 floats) is read per depth
     * step whatever cols is. */
    void (*gemm_panel_ex)(int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth, const float *panel,
                          ptrdiff_t ldp, const float *bias, int accumulate, float *c, ptrdiff_t ldc, int cols,
                          int gelu_kind, float *act, ptrdiff_t ldact);
    /* dx[r][k] = <dy[r][0..out), W[k][0..out)> for W packed (one expert) */
    void (*gemm_dot)(int rows, int in_features, int out_features, const float *dy, ptrdiff_t lddy,
                     const float *packed, float *dx, ptrdiff_t lddx);
    /* y = GELU(x), or y = dy * GELU'(x) when dy is not NULL (kind: fm_gelu); y may alias x or dy */
    void (*gelu_row)(int n, int kind, const float *x, const float *dy, float *y);
    /* dst[j][k] = W[k0 + k][j0 + j], j < depth, k < 64 (0 past in_features), from W packed */
    void (*gemm_transpose_block)(const float *packed, int in_features, int k0, int j0, int depth, float *dst);
    /* for a = order[r], r < rows: dst[r] = scale[a / k][a % k] * src[a / k] and
     * dots[a / k][a % k] = <src[a / k], dot_src[r]>; stream as for scatter_rows */
    void (*gather_scale_dot)(int rows, int dim, const float *src, int ld_src, const int32_t *order, int k,
                             const float *scale, int ld_scale, const float *dot_src, int ld_dot, float *dst, int ld_dst,
                             float *dots, int ld_dots, int stream);
    /* 1 when every one of the n floats is finite */
    int (*all_finite)(size_t n, const float *x);
    /* Adam over n floats, hyper = {beta1, beta2, step_size (lr over beta1's correction), the square
     * root of beta2's correction, eps, weight_decay}, in the scalar path's operations and order
     * (no fused multiply-add), so every path gives the same bits */
    void (*adam)(size_t n, const float *hyper, float *param, const float *grad, float *m, float *v);
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


/* ---- the gate's noise: counter-based, identical integers on every path ---- */

/* The splitmix64 finaliser of (seed, token), folded to 32 bits: one state per token. */
static uint32_t fm__noise_token_state(uint64_t seed, uint64_t token) {
    uint64_t z = seed + (token + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z ^ (z >> 32));
}

static uint32_t fm__noise_expert_key(int expert) { return ((uint32_t)expert + 1u) * 0x9E3779B9u; }

/* Chris Wellons' lowbias32 of the token's state mixed with the expert's key. */
static uint32_t fm__noise_hash(uint32_t state, int expert) {
    uint32_t h = state ^ fm__noise_expert_key(expert);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

/* sqrt(2) erfinv(x) with Giles' single-precision erfinv (sqrt(2) folded into its coefficients), as
 * the SIMD template evaluates it, for the draw x = (-1)^(h >> 31) (1 - y),
 * y = (((h >> 8) & 0x7FFFFF) + 1/2) / 2^23: uniform on a grid symmetric about 0, exact in float,
 * whose points next to +-1 keep full precision (1 - |x| = y exactly), which the tails of the
 * normal need; 1 - x^2 = y (2 - y) is rounded once (the product is exact in double). */
static float fm__normal_from_hash(uint32_t h) {
    const float y = (float)((h >> 8) & 0x7FFFFFu) * 0x1p-23f + 0x1p-24f;
    float w = -logf((float)((double)y * (2.0 - (double)y))), p;
    if (!(w > 5.0f)) {
        w -= 2.5f;
        p = 3.97426021e-08f;
        p = 4.85462635e-07f + p * w;
        p = -4.9828227e-06f + p * w;
        p = -6.21052823e-06f + p * w;
        p = 0.00030912002f + p * w;
        p = -0.00177303492f + p * w;
        p = -0.00590813393f + p * w;
        p = 0.348802656f + p * w;
        p = 2.12331367f + p * w;
    } else {
        w = sqrtf(w) - 3.0f;
        p = -0.000283145724f;
        p = 0.000142765653f + p * w;
        p = 0.00190825947f + p * w;
        p = -0.00519501232f + p * w;
        p = 0.00811688974f + p * w;
        p = -0.0107797878f + p * w;
        p = 0.0133485785f + p * w;
        p = 1.41658103f + p * w;
        p = 4.00643444f + p * w;
    }
    return p * (h >> 31 ? y - 1.0f : 1.0f - y);
}

/* softplus(r) + epsilon without overflow; NaN stays NaN. */
static float fm__noise_std(float r, float epsilon) {
    return (r > 0.0f ? r : 0.0f) + log1pf(expf(-fabsf(r))) + epsilon;
}

static double fm__normal_cdf(double z) { return 0.5 * erfc(-z * 0.70710678118654752); }
static double fm__normal_pdf(double z) { return 0.39894228040143268 * exp(-0.5 * z * z); }

/* Written as 1 / (1 + e^-|z|) on the side that cannot overflow; NaN stays NaN. */
static float fm__sigmoid(float z) {
    float e;
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    e = expf(z);
    return e / (1.0f + e);
}

/* Token t's noise step: stds[e] = softplus(noise[e]) + epsilon (stds may be NULL), the draw n[e]
 * (into draws, which may be NULL), noisy[e] = clean[e] + n[e] * std. */
static void fm__noise_row(const fm__gate_job *job, int t, float *noisy, float *stds, float *draws) {
    const float *clean = job->clean + (size_t)t * job->ld_clean, *noise = job->noise + (size_t)t * job->ld_noise;
    const uint32_t state = fm__noise_token_state(job->seed, job->token_offset + (uint64_t)t);
    int e;
    for (e = 0; e < job->experts; e++) {
        const float n = fm__normal_from_hash(fm__noise_hash(state, e));
        const float std = fm__noise_std(noise[e], job->noise_epsilon);
        noisy[e] = fmaf(n, std, clean[e]);
        if (stds) stds[e] = std;
        if (draws) draws[e] = n;
    }
}

static void fm__scalar_gate_noise(const fm__gate_job *job) {
    int t;
    for (t = 0; t < job->tokens; t++)
        fm__noise_row(job, t, job->noisy + (size_t)t * job->ld_noisy,
                      job->stds ? job->stds + (size_t)t * job->ld_stds : NULL, NULL);
}

/* FastMoE's load of one token added to load_row[e]: Phi((clean - threshold) / std), the
 * threshold the (k+1)-th noisy logit for the experts above it (its top k), the k-th for the rest. */
static void fm__token_load(int E, const float *clean, const float *noisy, const float *stds, double in_threshold,
                           double out_threshold, float *load_row) {
    int e;
    for (e = 0; e < E; e++)
        load_row[e] += (float)fm__normal_cdf((clean[e] - (noisy[e] > in_threshold ? in_threshold : out_threshold)) / stds[e]);
}

static void fm__scalar_gate_load(const fm__gate_job *job) {
    int t;
    for (t = 0; t < job->tokens; t++) {
        const float *values = job->top_values + (size_t)t * job->ld_values;
        fm__token_load(job->experts, job->clean + (size_t)t * job->ld_clean, job->noisy_in + (size_t)t * job->ld_noisy,
                       job->stds_in + (size_t)t * job->ld_stds, fm__rank_key(values[job->top_k]),
                       fm__rank_key(values[job->top_k - 1]),
                       job->load + (size_t)(job->token_group ? job->token_group[t] : 0) * job->experts);
    }
}

/* The reference gate, one token at a time; the SIMD template does the same per lane. */
static void fm__scalar_gate(const fm__gate_job *job) {
    const int E = job->experts, k = job->top_k;
    const int with_load = job->training && job->load && k < E, levels = with_load ? k + 1 : k;
    float noisy[FLEXMOE_GATE_MAX_EXPERTS], stds[FLEXMOE_GATE_MAX_EXPERTS];
    int32_t top[FLEXMOE_GATE_MAX_TOP_K + 1];
    int t, e, i;
    for (t = 0; t < job->tokens; t++) {
        const float *clean = job->clean + (size_t)t * job->ld_clean;
        const int group = job->token_group ? job->token_group[t] : 0;
        int32_t *idx = job->indices + (size_t)t * job->ld_indices;
        float *gates = job->gates + (size_t)t * job->ld_gates;
        float key0;
        double denominator = 0.0;
        if (job->training) {
            fm__noise_row(job, t, noisy, stds, NULL);
        } else {
            memcpy(noisy, clean, (size_t)E * sizeof *noisy);
        }
        if (job->noisy) memcpy(job->noisy + (size_t)t * job->ld_noisy, noisy, (size_t)E * sizeof *noisy);
        fm__scalar_topk(1, E, levels, noisy, E, top, levels, NULL, 0);
        key0 = fm__rank_key(noisy[top[0]]);
        if (job->renormalize)
            for (i = 0; i < k; i++) denominator += exp((double)fm__rank_key(noisy[top[i]]) - key0);
        else
            for (e = 0; e < E; e++) denominator += exp((double)fm__rank_key(clean[e]) - key0);
        for (i = 0; i < k; i++) {
            idx[i] = top[i];
            gates[i] = (float)(exp((double)fm__rank_key(noisy[top[i]]) - key0) / denominator);
            if (job->importance) job->importance[(size_t)group * E + idx[i]] += gates[i];
            if (job->load && !with_load) job->load[(size_t)group * E + idx[i]] += 1.0f;
        }
        if (with_load)
            fm__token_load(E, clean, noisy, stds, fm__rank_key(noisy[top[k]]), fm__rank_key(noisy[top[k - 1]]),
                           job->load + (size_t)group * E);
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

/* ---- dispatch and combine ---- */

static void fm__scalar_scatter_rows(int tokens, int k, int dim, const float *src, int ld_src, const int32_t *position,
                                    const float *scale, int ld_scale, float *dst, int ld_dst, int stream) {
    int t, i, j;
    (void)stream;
    for (t = 0; t < tokens; t++)
        for (i = 0; i < k; i++) {
            const int32_t row = position[(size_t)t * k + i];
            const float f = scale ? scale[(size_t)t * ld_scale + i] : 1.0f;
            if (row < 0) continue;
            for (j = 0; j < dim; j++) dst[(size_t)row * ld_dst + j] = scale ? f * src[(size_t)t * ld_src + j] : src[(size_t)t * ld_src + j];
        }
}

/* As the table says: the first kept row scaled, the others added in slot order (not 0 + w * row,
 * which would turn a lone -0 into +0), zero when every assignment was dropped. */
static void fm__scalar_combine_rows(int tokens, int k, int dim, const float *src, int ld_src, const int32_t *position,
                                    const float *weights, int ldw, float *dst, int ld_dst, int stream) {
    int t, i, j, first;
    (void)stream;
    for (t = 0; t < tokens; t++) {
        float *d = dst + (size_t)t * ld_dst;
        for (j = 0; j < dim; j++) d[j] = 0.0f;
        for (i = 0, first = 1; i < k; i++) {
            const int32_t row = position[(size_t)t * k + i];
            const float w = weights ? weights[(size_t)t * ldw + i] : 1.0f;
            if (row < 0) continue;
            for (j = 0; j < dim; j++) d[j] = first ? w * src[(size_t)row * ld_src + j] : fmaf(w, src[(size_t)row * ld_src + j], d[j]);
            first = 0;
        }
    }
}

static void fm__scalar_row_dots(int tokens, int k, int dim, const float *a, int lda, const float *src, int ld_src,
                                const int32_t *position, float *out, int ldo) {
    int t, i, j;
    for (t = 0; t < tokens; t++)
        for (i = 0; i < k; i++) {
            const int32_t row = position[(size_t)t * k + i];
            double dot = 0.0;
            if (row >= 0)
                for (j = 0; j < dim; j++) dot += (double)a[(size_t)t * lda + j] * src[(size_t)row * ld_src + j];
            out[(size_t)t * ldo + i] = (float)dot;
        }
}


static void fm__scalar_gelu_row(int n, int kind, const float *x, const float *dy, float *y);

static void fm__scalar_gemm_panel_ex(int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth,
                                     const float *panel, ptrdiff_t ldp, const float *bias, int accumulate, float *c,
                                     ptrdiff_t ldc, int cols, int gelu_kind, float *act, ptrdiff_t ldact) {
    int r, j, p;
    for (r = 0; r < rows; r++)
        for (j = 0; j < cols; j++) {
            double sum = bias ? bias[j] : 0.0;
            for (p = 0; p < depth; p++) sum += (double)a[r * a_row + p * a_depth] * panel[p * ldp + j];
            c[r * ldc + j] = (float)(accumulate ? c[r * ldc + j] + sum : sum);
        }
    for (r = 0; act && r < rows; r++) fm__scalar_gelu_row(cols, gelu_kind, c + r * ldc, NULL, act + r * ldact);
}

static void fm__scalar_gemm_panel(int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth,
                                  const float *panel, const float *bias, int accumulate, float *c, ptrdiff_t ldc,
                                  int cols) {
    fm__scalar_gemm_panel_ex(rows, depth, a, a_row, a_depth, panel, FM_GEMM_PANEL, bias, accumulate, c, ldc, cols, 0,
                             NULL, 0);
}

static void fm__scalar_gemm_dot(int rows, int in_features, int out_features, const float *dy, ptrdiff_t lddy,
                                const float *packed, float *dx, ptrdiff_t lddx) {
    const size_t panel_floats = (size_t)in_features * FM_GEMM_PANEL;
    int r, k, j;
    for (r = 0; r < rows; r++)
        for (k = 0; k < in_features; k++) {
            double sum = 0.0;
            for (j = 0; j < out_features; j++)
                sum += (double)dy[r * lddy + j] *
                       packed[(size_t)(j / FM_GEMM_PANEL) * panel_floats + (size_t)k * FM_GEMM_PANEL + j % FM_GEMM_PANEL];
            dx[r * lddx + k] = (float)sum;
        }
}

/* GELU in double: x Phi(x) or x sigmoid(2u) (the tanh form), or their derivatives. */
static double fm__gelu(double x, int kind, int derivative) {
    if (kind == 0) return derivative ? fm__normal_cdf(x) + x * fm__normal_pdf(x) : x * fm__normal_cdf(x);
    {
        const double u = 0.7978845608028654 * (x + 0.044715 * x * x * x), sig = 1.0 / (1.0 + exp(-2.0 * u));
        return derivative ? sig + 2.0 * x * sig * (1.0 - sig) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
                          : x * sig;
    }
}

static void fm__scalar_gelu_row(int n, int kind, const float *x, const float *dy, float *y) {
    int j;
    for (j = 0; j < n; j++) y[j] = (float)(dy ? fm__gelu(x[j], kind, 1) * dy[j] : fm__gelu(x[j], kind, 0));
}

static void fm__scalar_gemm_transpose_block(const float *packed, int in_features, int k0, int j0, int depth,
                                            float *dst) {
    int j, k;
    for (j = 0; j < depth; j++)
        for (k = 0; k < FM_GEMM_PANEL; k++)
            dst[(size_t)j * FM_GEMM_PANEL + k] =
                k0 + k < in_features ? packed[(size_t)((j0 + j) / FM_GEMM_PANEL) * in_features * FM_GEMM_PANEL +
                                              (size_t)(k0 + k) * FM_GEMM_PANEL + (j0 + j) % FM_GEMM_PANEL]
                                     : 0.0f;
}

static void fm__scalar_gather_scale_dot(int rows, int dim, const float *src, int ld_src, const int32_t *order, int k,
                                        const float *scale, int ld_scale, const float *dot_src, int ld_dot, float *dst,
                                        int ld_dst, float *dots, int ld_dots, int stream) {
    int r, j;
    (void)stream;
    for (r = 0; r < rows; r++) {
        const int t = order[r] / k, i = order[r] % k;
        double dot = 0.0;
        for (j = 0; j < dim; j++) {
            dst[(size_t)r * ld_dst + j] = scale[(size_t)t * ld_scale + i] * src[(size_t)t * ld_src + j];
            dot += (double)src[(size_t)t * ld_src + j] * dot_src[(size_t)r * ld_dot + j];
        }
        dots[(size_t)t * ld_dots + i] = (float)dot;
    }
}

static int fm__scalar_all_finite(size_t n, const float *x) {
    float sum = 0.0f; /* x * 0 is 0 for finite x and NaN otherwise, and a NaN stays */
    size_t i;
    for (i = 0; i < n; i++) sum += x[i] * 0.0f;
    return sum == 0.0f;
}

static void fm__scalar_adam(size_t n, const float *hyper, float *param, const float *grad, float *m, float *v) {
    const float beta1 = hyper[0], beta2 = hyper[1], step_size = hyper[2], root2 = hyper[3], eps = hyper[4], decay = hyper[5];
    size_t i;
    for (i = 0; i < n; i++) {
        const float g = grad[i] + decay * param[i];
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        param[i] -= step_size * m[i] / (sqrtf(v[i]) / root2 + eps);
    }
}

static const fm__kernel_table fm__scalar_kernels = {
    FM_ISA_SCALAR,
    fm__scalar_softmax_forward,
    fm__scalar_softmax_backward,
    fm__scalar_topk,
    fm__scalar_gate,
    fm__scalar_gate_noise,
    fm__scalar_gate_load,
    fm__scalar_layernorm_forward,
    fm__scalar_layernorm_backward,
    fm__scalar_layernorm_param_grad,
    fm__scalar_gemv,
    fm__scalar_axpy,
    fm__scalar_scatter_rows,
    fm__scalar_combine_rows,
    fm__scalar_row_dots,
    fm__scalar_gemm_panel,
    fm__scalar_gemm_panel_ex,
    fm__scalar_gemm_dot,
    fm__scalar_gelu_row,
    fm__scalar_gemm_transpose_block,
    fm__scalar_gather_scale_dot,
    fm__scalar_all_finite,
    fm__scalar_adam,
};

/* ==== 13. ISA kernels and run-time selection ============================================= */

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

/* Publishes a selection: the status first, the table last, so that no reader finds the new
 * table with an old error or NULL with an old FM_OK (fm__selection_error covers the rest). */
static fm_status fm__publish(const fm__kernel_table *kernels, fm_status status) {
    FM__STORE(fm__state.selection_status, (int)status);
    FM__STORE(fm__state.kernels, kernels);
    FM__STORE(fm__state.selected, 1);
    return status;
}

/* The new table is chosen before anything is published: there is no moment when a kernel on
 * another thread finds no table while the selection succeeds. */
static fm_status fm__select(fm_isa isa) {
    const char *source = "fm_set_isa";
    const fm__kernel_table *kernels;
    if (isa == FM_ISA_AUTO) {
        const char *forced = getenv("FLEXMOE_ISA");
        if (!forced || !*forced) return fm__publish(fm__best_kernels(), FM_OK);
        source = "FLEXMOE_ISA";
        if (fm_isa_from_name(forced, &isa) != FM_OK || isa == FM_ISA_AUTO) {
            fm__log(FM_LOG_ERROR, "FLEXMOE_ISA=%s names no ISA path (use scalar, avx2, avx512 or neon)",
                    forced);
            return fm__publish(NULL, FM_ERR_UNKNOWN_ISA);
        }
    }
    if ((unsigned)isa >= FM_ISA_COUNT) {
        fm__log(FM_LOG_ERROR, "%s: %d is not an fm_isa value", source, (int)isa);
        return fm__publish(NULL, FM_ERR_UNKNOWN_ISA);
    }
    kernels = fm__kernels_for(isa);
    if (!kernels) {
        fm__log(FM_LOG_ERROR, "%s: the %s path cannot run here (%s)", source, fm_isa_name(isa),
                fm__isa_requirement(isa));
        return fm__publish(NULL, FM_ERR_UNSUPPORTED_ISA);
    }
    return fm__publish(kernels, FM_OK);
}

fm_status fm_setup(const fm_desc *desc) {
    fm_desc zero;
    if (!desc) {
        memset(&zero, 0, sizeof zero);
        desc = &zero;
    }
    if (!desc->allocator.alloc != !desc->allocator.free) {
        fm__log(FM_LOG_ERROR, "fm_setup: the allocator needs both hooks, alloc and free (or neither)");
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (desc->allocator.alloc) {
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
    if (!FM__LOAD(fm__state.selected)) fm__select(FM_ISA_AUTO);
    return FM__LOAD(fm__state.kernels);
}

/* What a kernel returns when fm__active_kernels() found no table: the error of the selection
 * that removed it. A selection that succeeded since then may already have published FM_OK;
 * the call still did nothing, so it must not report success. */
static fm_status fm__selection_error(void) {
    const fm_status status = (fm_status)FM__LOAD(fm__state.selection_status);
    return status != FM_OK ? status : FM_ERR_UNSUPPORTED_ISA;
}

fm_isa fm_active_isa(void) {
    const fm__kernel_table *table = fm__active_kernels();
    return table ? table->isa : FM_ISA_AUTO;
}

/* ==== 14. Argument checking and public entry points ======================================= */

/* Whether [a, a + a_bytes) and [b, b + b_bytes) share a byte. */
static int fm__overlap(const void *a, size_t a_bytes, const void *b, size_t b_bytes) {
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + b_bytes && y < x + a_bytes;
}

/* The bytes of a rows x cols matrix with leading dimension ld (a shape fm__check_matrix passed). */
static size_t fm__matrix_bytes(int rows, int cols, int ld) { return ((size_t)(rows - 1) * ld + cols) * sizeof(float); }

/* A rows x cols matrix with leading dimension ld: shapes positive, ld >= cols, each dimension
 * within FLEXMOE_MAX_DIM, extent addressable. */
static fm_status fm__check_matrix(const void *data, int rows, int cols, int ld) {
    if (rows <= 0 || cols <= 0 || ld < cols) return FM_ERR_INVALID_SHAPE;
    if (!data) return FM_ERR_NULL_POINTER;
    if (rows > FLEXMOE_MAX_DIM || cols > FLEXMOE_MAX_DIM ||
        (uint64_t)(rows - 1) * (uint64_t)ld + (uint64_t)cols > (uint64_t)(PTRDIFF_MAX / sizeof(float)))
        return FM_ERR_OVERFLOW;
    return FM_OK;
}

/* Rows per parallel chunk: large enough to amortise the fork, small enough to balance. */
#define FM__ROW_CHUNK 256

/* Outputs of more bytes than this are written with streaming (non-temporal) stores. Past the
 * cache, an ordinary store first reads its line from memory, and the output evicts inputs still
 * to be read; a streaming store writes whole lines without reading them. Smaller outputs stay
 * cached for the kernel that reads them next (the expert FFN after a dispatch). The crossover
 * measured on Zen 4 lies between 8 and 16 MiB of output (bench/RESULTS.md). */
#define FM__STREAM_MIN_BYTES ((size_t)8 << 20)

static int fm__stream_output(int rows, int dim) {
    return (size_t)rows * (size_t)dim * sizeof(float) > FM__STREAM_MIN_BYTES;
}

/* Runs `call` on consecutive chunks of rows [r0, r0 + n), in parallel under OpenMP. */
#define FM__FOR_ROW_CHUNKS(rows, r0, n, call)                                                     \
    do {                                                                                          \
        const int fm__chunks = (rows) / FM__ROW_CHUNK + ((rows) % FM__ROW_CHUNK != 0);            \
        int fm__chunk;                                                                            \
        FM__OMP_PARALLEL_FOR                                                                      \
        for (fm__chunk = 0; fm__chunk < fm__chunks; fm__chunk++) {                                \
            const int r0 = fm__chunk * FM__ROW_CHUNK;                                             \
            const int n = (rows) - r0 < FM__ROW_CHUNK ? (rows) - r0 : FM__ROW_CHUNK;              \
            FM__TRACE_ITEM(__func__, fm__chunk, -1);                                              \
            call;                                                                                 \
        }                                                                                         \
        FM__TRACE_END(__func__);                                                                  \
    } while (0)

fm_status fm_softmax_forward(int rows, int cols, const float *x, int ldx, float *y, int ldy) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, cols, ldy)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
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
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
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
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__FOR_ROW_CHUNKS(rows, r0, n,
                       kernels->topk(n, cols, k, x + (size_t)r0 * ldx, ldx, indices + (size_t)r0 * ldi, ldi,
                                     values ? values + (size_t)r0 * ldv : NULL, ldv));
    return FM_OK;
}

/* ---- routing gates ---- */

static fm_status fm__check_gate_size(int tokens, int experts, int k) {
    if (tokens <= 0 || experts <= 0) return FM_ERR_INVALID_SHAPE;
    if (k < 1 || k > experts || k > FLEXMOE_GATE_MAX_TOP_K || experts > FLEXMOE_GATE_MAX_EXPERTS)
        return FM_ERR_INVALID_ARGUMENT;
    return FM_OK;
}

/* The noise's epsilon: finite and >= 0 (an infinite std would make every noisy logit +-Inf or
 * NaN, and a NaN ranks above every expert's logit). */
static int fm__valid_noise_epsilon(float epsilon) { return epsilon >= 0.0f && epsilon <= 3.402823466e38f; }

/* Every index of a tokens x k matrix in [0, experts). */
static fm_status fm__check_indices(const int32_t *indices, int tokens, int k, int ld, int experts) {
    int t, i;
    for (t = 0; t < tokens; t++)
        for (i = 0; i < k; i++)
            if (indices[(size_t)t * ld + i] < 0 || indices[(size_t)t * ld + i] >= experts) return FM_ERR_INVALID_ARGUMENT;
    return FM_OK;
}

/* Runs the gate kernel on all tokens. Without importance or load to accumulate, token chunks are
 * independent and run in parallel under OpenMP. */
static void fm__gate_rows(const fm__kernel_table *kernels, const fm__gate_job *job, int r0, int n) {
    fm__gate_job chunk = *job;
    chunk.tokens = n;
    chunk.token_offset += (uint64_t)r0;
    chunk.clean += (size_t)r0 * job->ld_clean;
    if (chunk.noise) chunk.noise += (size_t)r0 * job->ld_noise;
    if (chunk.token_group) chunk.token_group += r0;
    chunk.indices += (size_t)r0 * job->ld_indices;
    chunk.gates += (size_t)r0 * job->ld_gates;
    if (chunk.noisy) chunk.noisy += (size_t)r0 * job->ld_noisy;
    kernels->gate(&chunk);
}

/* The importance and load sums of a row chunk live on the stack (256 bytes each: the AVX-512 gate
 * is near the 16 KiB bound), or in the job's partials where the caller has them (the layer); other
 * configurations with more groups x experts sum the whole batch at once. */
#define FM__GATE_PARTIAL_FLOATS 64

/* importance and load are sums over the tokens: each row chunk sums its own tokens into zeroed
 * partials, and the partials join the totals in chunk order (an ordered loop), so the sums are the
 * same at any thread count. The chunks leave the caller's noise tile alone (one tile cannot serve
 * two threads): their load pass keeps its tile on the stack or draws the noise again, the same
 * floats either way. */
static void fm__run_gate(const fm__kernel_table *kernels, const fm__gate_job *job) {
    const size_t sums = (size_t)job->groups * job->experts;
    const int chunks = job->tokens / FM__ROW_CHUNK + (job->tokens % FM__ROW_CHUNK != 0);
    int chunk;
    if (!job->importance && !job->load) {
        FM__FOR_ROW_CHUNKS(job->tokens, r0, n, fm__gate_rows(kernels, job, r0, n));
        return;
    }
    if (sums > FM__GATE_PARTIAL_FLOATS && !job->partials) {
        kernels->gate(job);
        return;
    }
    FM__OMP_PARALLEL_FOR_ORDERED
    for (chunk = 0; chunk < chunks; chunk++) {
        float stack_partials[2 * FM__GATE_PARTIAL_FLOATS];
        float *importance = job->partials ? job->partials + (size_t)chunk * 2 * sums : stack_partials,
              *load = importance + sums;
        const int r0 = chunk * FM__ROW_CHUNK, n = job->tokens - r0 < FM__ROW_CHUNK ? job->tokens - r0 : FM__ROW_CHUNK;
        fm__gate_job part = *job;
        size_t i;
        FM__TRACE_ITEM("gate_sums", chunk, -1);
        memset(importance, 0, sums * sizeof(float));
        memset(load, 0, sums * sizeof(float));
        part.importance = job->importance ? importance : NULL;
        part.load = job->load ? load : NULL;
        part.tile = NULL;
        fm__gate_rows(kernels, &part, r0, n);
        FM__OMP_ORDERED
        {
            for (i = 0; job->importance && i < sums; i++) job->importance[i] += importance[i];
            for (i = 0; job->load && i < sums; i++) job->load[i] += load[i];
        }
    }
    FM__TRACE_END("gate_sums");
}

fm_status fm_softmax_topk_forward(int tokens, int experts, int k, int renormalize, const float *logits,
                                  int ldl, int32_t *indices, int ldi, float *weights, int ldw) {
    const fm__kernel_table *kernels;
    fm__gate_job job;
    fm_status status;
    if ((status = fm__check_gate_size(tokens, experts, k)) != FM_OK) return status;
    if ((status = fm__check_matrix(logits, tokens, experts, ldl)) != FM_OK) return status;
    if ((status = fm__check_matrix(indices, tokens, k, ldi)) != FM_OK) return status;
    if ((status = fm__check_matrix(weights, tokens, k, ldw)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    memset(&job, 0, sizeof job);
    job.tokens = tokens;
    job.experts = experts;
    job.top_k = k;
    job.groups = 1;
    job.renormalize = renormalize != 0;
    job.clean = logits;
    job.ld_clean = ldl;
    job.indices = indices;
    job.ld_indices = ldi;
    job.gates = weights;
    job.ld_gates = ldw;
    fm__run_gate(kernels, &job);
    return FM_OK;
}

fm_status fm_softmax_topk_backward(int tokens, int experts, int k, int renormalize, const float *logits,
                                   int ldl, const int32_t *indices, int ldi, const float *weights, int ldw,
                                   const float *d_weights, int lddw, float *d_logits, int lddl) {
    const fm__kernel_table *kernels;
    fm_status status;
    int t, i, e;
    if ((status = fm__check_gate_size(tokens, experts, k)) != FM_OK) return status;
    if ((status = fm__check_matrix(logits, tokens, experts, ldl)) != FM_OK) return status;
    if ((status = fm__check_matrix(indices, tokens, k, ldi)) != FM_OK) return status;
    if ((status = fm__check_matrix(weights, tokens, k, ldw)) != FM_OK) return status;
    if ((status = fm__check_matrix(d_weights, tokens, k, lddw)) != FM_OK) return status;
    if ((status = fm__check_matrix(d_logits, tokens, experts, lddl)) != FM_OK) return status;
    if ((status = fm__check_indices(indices, tokens, k, ldi, experts)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    /* w_i = p_{j_i} (/ sum of the selected p): dl = p * (g - <w, dw>) with g the scattered dw, over
     * all experts without renormalisation, over the selected ones (p -> w) with it. */
    if (!renormalize)
        FM__FOR_ROW_CHUNKS(tokens, r0, n,
                           kernels->softmax_forward(n, experts, logits + (size_t)r0 * ldl, ldl,
                                                    d_logits + (size_t)r0 * lddl, lddl));
    for (t = 0; t < tokens; t++) {
        const int32_t *idx = indices + (size_t)t * ldi;
        const float *w = weights + (size_t)t * ldw, *dw = d_weights + (size_t)t * lddw;
        float *dl = d_logits + (size_t)t * lddl;
        double dot = 0.0;
        for (i = 0; i < k; i++) dot += (double)w[i] * dw[i];
        if (renormalize) {
            for (e = 0; e < experts; e++) dl[e] = 0.0f;
            for (i = 0; i < k; i++) dl[idx[i]] = (float)(w[i] * (dw[i] - dot));
        } else { /* dl holds p: p * (0 - dot) everywhere, p * (dw - dot) at the selected experts */
            float p[FLEXMOE_GATE_MAX_TOP_K];
            for (i = 0; i < k; i++) p[i] = dl[idx[i]];
            for (e = 0; e < experts; e++) dl[e] *= (float)-dot;
            for (i = 0; i < k; i++) dl[idx[i]] = p[i] * (float)(dw[i] - dot);
        }
    }
    return FM_OK;
}

/* The desc and tensors of a gate call, checked, with defaults applied. `outputs` says whether
 * indices and gates are written (forward) or read (backward, where they are also checked). */
static fm_status fm__gate_job_from(const fm_gate_desc *desc, const fm_gate_tensors *t, int outputs, fm__gate_job *job) {
    fm_status status;
    if (!desc || !t) return FM_ERR_NULL_POINTER;
    if ((status = fm__check_gate_size(desc->tokens, desc->experts, desc->top_k)) != FM_OK) return status;
    memset(job, 0, sizeof *job);
    job->tokens = desc->tokens;
    job->experts = desc->experts;
    job->top_k = desc->top_k;
    job->training = desc->training != 0;
    job->groups = desc->groups ? desc->groups : 1;
    job->renormalize = 1;
    job->noise_epsilon = desc->noise_epsilon != 0.0f ? desc->noise_epsilon : 0.01f;
    job->seed = desc->seed;
    job->token_offset = desc->token_offset;
    if (job->groups < 1 || job->groups > FLEXMOE_GATE_MAX_GROUPS || !fm__valid_noise_epsilon(job->noise_epsilon))
        return FM_ERR_INVALID_ARGUMENT;
    job->clean = t->clean_logits;
    job->ld_clean = t->ld_clean ? t->ld_clean : desc->experts;
    job->noise = job->training ? t->noise_logits : NULL;
    job->ld_noise = t->ld_noise ? t->ld_noise : desc->experts;
    job->token_group = t->token_group;
    job->indices = t->indices;
    job->ld_indices = t->ld_indices ? t->ld_indices : desc->top_k;
    job->gates = t->gates;
    job->ld_gates = t->ld_gates ? t->ld_gates : desc->top_k;
    job->noisy = outputs ? t->noisy_logits : NULL;
    job->ld_noisy = t->ld_noisy ? t->ld_noisy : desc->experts;
    job->importance = outputs ? t->importance : NULL;
    job->load = outputs ? t->load : NULL;
    job->tile = outputs ? t->workspace : NULL;
    if ((status = fm__check_matrix(job->clean, job->tokens, job->experts, job->ld_clean)) != FM_OK) return status;
    if (job->training && (status = fm__check_matrix(job->noise, job->tokens, job->experts, job->ld_noise)) != FM_OK)
        return status;
    if ((status = fm__check_matrix(job->indices, job->tokens, job->top_k, job->ld_indices)) != FM_OK) return status;
    if ((status = fm__check_matrix(job->gates, job->tokens, job->top_k, job->ld_gates)) != FM_OK) return status;
    if (job->noisy && (status = fm__check_matrix(job->noisy, job->tokens, job->experts, job->ld_noisy)) != FM_OK)
        return status;
    return FM_OK;
}

/* The index arrays of a checked gate job (token groups; the backward's indices), read only once
 * every other argument of the call is known good. */
static fm_status fm__check_gate_contents(const fm__gate_job *job, int indices_are_input) {
    int i;
    if (job->token_group)
        for (i = 0; i < job->tokens; i++)
            if (job->token_group[i] < 0 || job->token_group[i] >= job->groups) return FM_ERR_INVALID_ARGUMENT;
    return indices_are_input ? fm__check_indices(job->indices, job->tokens, job->top_k, job->ld_indices, job->experts)
                             : FM_OK;
}

/* The widest vector's lanes: one tile layout serves every path. */
#define FM__GATE_TILE_LANES 16

size_t fm_gate_workspace_floats(const fm_gate_desc *desc) {
    if (!desc || fm__check_gate_size(desc->tokens, desc->experts, desc->top_k) != FM_OK) return 0;
    return (size_t)3 * FM__GATE_TILE_LANES * (size_t)desc->experts;
}

/* fm_noisy_gate_forward with room for the sums' partials (fm__gate_job.partials; NULL: none). */
static fm_status fm__noisy_gate_forward(const fm_gate_desc *desc, const fm_gate_tensors *tensors, float *partials) {
    const fm__kernel_table *kernels;
    fm__gate_job job;
    fm_status status;
    if ((status = fm__gate_job_from(desc, tensors, 1, &job)) != FM_OK) return status;
    job.partials = partials;
    if ((status = fm__check_gate_contents(&job, 0)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    if (job.importance) memset(job.importance, 0, (size_t)job.groups * job.experts * sizeof(float));
    if (job.load) memset(job.load, 0, (size_t)job.groups * job.experts * sizeof(float));
    fm__run_gate(kernels, &job);
    return FM_OK;
}

fm_status fm_noisy_gate_forward(const fm_gate_desc *desc, const fm_gate_tensors *tensors) {
    return fm__noisy_gate_forward(desc, tensors, NULL);
}

/* The slot of expert e among a token's k selected experts, or -1. */
static int fm__slot_of(const int32_t *idx, int k, int e) {
    int i;
    for (i = 0; i < k; i++)
        if (idx[i] == e) return i;
    return -1;
}

/* Token by token in O(k) memory (no row of E values on the stack): the rows of d_clean_logits and
 * d_noise_logits hold the token's noisy logits and std until their own entries are written. */
fm_status fm_noisy_gate_backward(const fm_gate_desc *desc, const fm_gate_tensors *tensors,
                                 const fm_gate_gradients *g) {
    fm__gate_job job;
    fm_status status;
    int t, E, k, ld_dg, ld_dn, ld_dc, ld_dr;
    if (!g) return FM_ERR_NULL_POINTER;
    if ((status = fm__gate_job_from(desc, tensors, 0, &job)) != FM_OK) return status;
    E = job.experts;
    k = job.top_k;
    ld_dg = g->ld_d_gates ? g->ld_d_gates : k;
    ld_dn = g->ld_d_noisy ? g->ld_d_noisy : E;
    ld_dc = g->ld_d_clean ? g->ld_d_clean : E;
    ld_dr = g->ld_d_noise ? g->ld_d_noise : E;
    if (g->d_gates && (status = fm__check_matrix(g->d_gates, job.tokens, k, ld_dg)) != FM_OK) return status;
    if (g->d_noisy_logits && (status = fm__check_matrix(g->d_noisy_logits, job.tokens, E, ld_dn)) != FM_OK) return status;
    if ((status = fm__check_matrix(g->d_clean_logits, job.tokens, E, ld_dc)) != FM_OK) return status;
    if (job.training && (status = fm__check_matrix(g->d_noise_logits, job.tokens, E, ld_dr)) != FM_OK) return status;
    if ((status = fm__check_gate_contents(&job, 1)) != FM_OK) return status;
    FM__OMP_PARALLEL_FOR /* the tokens are independent */
    for (t = 0; t < job.tokens; t++) {
        FM__TRACE_ITEM("noisy_gate_backward", t, -1);
        float draws[FLEXMOE_GATE_MAX_EXPERTS]; /* the token's noise, drawn once (4 KiB) */
        int e, i;
        const float *clean = job.clean + (size_t)t * job.ld_clean;
        const float *raw = job.training ? job.noise + (size_t)t * job.ld_noise : NULL;
        const int32_t *idx = job.indices + (size_t)t * job.ld_indices;
        const float *gates = job.gates + (size_t)t * job.ld_gates;
        const int group = job.token_group ? job.token_group[t] : 0;
        const int with_load = job.training && k < E && g->d_load;
        float *d_clean = g->d_clean_logits + (size_t)t * ld_dc, *d_noise = job.training ? g->d_noise_logits + (size_t)t * ld_dr : NULL;
        float *noisy = job.training ? d_clean : NULL, *stds = d_noise; /* until overwritten below */
        double dot = 0.0, dg[FLEXMOE_GATE_MAX_TOP_K], below_next = 0.0, below_kth = 0.0, next_value = 0.0, kth_value = 0.0;
        int next = -1, kth = -1;
        if (job.training) fm__noise_row(&job, t, noisy, stds, draws);
        /* gates = softmax over the selected noisy logits; importance sums the gates */
        for (i = 0; i < k; i++) {
            dg[i] = (g->d_gates ? g->d_gates[(size_t)t * ld_dg + i] : 0.0) +
                    (g->d_importance ? g->d_importance[(size_t)group * E + idx[i]] : 0.0);
            dot += gates[i] * dg[i];
        }
        for (i = 0; i < k; i++) dg[i] = gates[i] * (dg[i] - dot);
        /* load = Phi((clean - threshold) / std), the threshold being another expert's noisy logit:
         * the best unselected one (next) or the k-th; their gradients are the sums of the q's,
         * added once the pass below has summed them (it overwrites noisy and stds as it goes) */
        if (with_load) {
            for (e = 0; e < E; e++)
                if (fm__slot_of(idx, k, e) < 0 && (next < 0 || fm__rank_key(noisy[e]) > fm__rank_key(noisy[next]))) next = e;
            kth = idx[k - 1];
            next_value = fm__rank_key(noisy[next]);
            kth_value = fm__rank_key(noisy[kth]);
        }
        /* noisy = clean + n * std, std = softplus(r) + epsilon */
        for (e = 0; e < E; e++) {
            const int slot = fm__slot_of(idx, k, e);
            const double d_noisy = (g->d_noisy_logits ? g->d_noisy_logits[(size_t)t * ld_dn + e] : 0.0) + (slot >= 0 ? dg[slot] : 0.0);
            double d_clean_load = 0.0, d_std = 0.0;
            if (with_load) {
                const int above = noisy[e] > next_value;
                const double z = ((double)clean[e] - (above ? next_value : kth_value)) / stds[e];
                const double q = g->d_load[(size_t)group * E + e] * fm__normal_pdf(z) / stds[e];
                if (above) below_next += q;
                else below_kth += q;
                d_clean_load = q;
                d_std = -q * z;
            }
            d_clean[e] = (float)(d_clean_load + d_noisy);
            if (job.training) d_noise[e] = (float)((d_std + d_noisy * draws[e]) * fm__sigmoid(raw[e])); /* d std / d r */
        }
        if (with_load) { /* the thresholds' own gradients, through their noisy logits */
            d_clean[next] = (float)((double)d_clean[next] - below_next);
            d_noise[next] = (float)((double)d_noise[next] - below_next * draws[next] * fm__sigmoid(raw[next]));
            d_clean[kth] = (float)((double)d_clean[kth] - below_kth);
            d_noise[kth] = (float)((double)d_noise[kth] - below_kth * draws[kth] * fm__sigmoid(raw[kth]));
        }
    }
    FM__TRACE_END("noisy_gate_backward");
    return FM_OK;
}

fm_status fm_gate_noise_forward(const fm_gate_desc *desc, const float *clean, int ldc, const float *noise,
                                int ldn, float *noisy, int ldy, float *std, int lds) {
    const fm__kernel_table *kernels;
    fm__gate_job job;
    fm_status status;
    if (!desc) return FM_ERR_NULL_POINTER;
    if ((status = fm__check_matrix(clean, desc->tokens, desc->experts, ldc)) != FM_OK) return status;
    if ((status = fm__check_matrix(noise, desc->tokens, desc->experts, ldn)) != FM_OK) return status;
    if ((status = fm__check_matrix(noisy, desc->tokens, desc->experts, ldy)) != FM_OK) return status;
    if (std && (status = fm__check_matrix(std, desc->tokens, desc->experts, lds)) != FM_OK) return status;
    if (!fm__valid_noise_epsilon(desc->noise_epsilon)) return FM_ERR_INVALID_ARGUMENT;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    memset(&job, 0, sizeof job);
    job.tokens = desc->tokens;
    job.experts = desc->experts;
    job.noise_epsilon = desc->noise_epsilon != 0.0f ? desc->noise_epsilon : 0.01f;
    job.seed = desc->seed;
    job.token_offset = desc->token_offset;
    job.clean = clean;
    job.ld_clean = ldc;
    job.noise = noise;
    job.ld_noise = ldn;
    job.noisy = noisy;
    job.ld_noisy = ldy;
    job.stds = std;
    job.ld_stds = lds;
    kernels->gate_noise(&job);
    return FM_OK;
}

fm_status fm_gate_load_forward(const fm_gate_desc *desc, const float *clean, int ldc, const float *noisy, int ldn,
                               const float *std, int lds, const float *top_values, int ldv,
                               const int32_t *token_group, float *load) {
    const fm__kernel_table *kernels;
    fm__gate_job job;
    fm_status status;
    int t;
    if (!desc) return FM_ERR_NULL_POINTER;
    if ((status = fm__check_gate_size(desc->tokens, desc->experts, desc->top_k)) != FM_OK) return status;
    memset(&job, 0, sizeof job);
    job.tokens = desc->tokens;
    job.experts = desc->experts;
    job.top_k = desc->top_k;
    job.groups = desc->groups ? desc->groups : 1;
    if (job.top_k >= job.experts || job.groups < 1 || job.groups > FLEXMOE_GATE_MAX_GROUPS) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__check_matrix(clean, job.tokens, job.experts, ldc)) != FM_OK) return status;
    if ((status = fm__check_matrix(noisy, job.tokens, job.experts, ldn)) != FM_OK) return status;
    if ((status = fm__check_matrix(std, job.tokens, job.experts, lds)) != FM_OK) return status;
    if ((status = fm__check_matrix(top_values, job.tokens, job.top_k + 1, ldv)) != FM_OK) return status;
    if ((status = fm__check_matrix(load, job.groups, job.experts, job.experts)) != FM_OK) return status;
    if (token_group)
        for (t = 0; t < job.tokens; t++)
            if (token_group[t] < 0 || token_group[t] >= job.groups) return FM_ERR_INVALID_ARGUMENT;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    job.clean = clean;
    job.ld_clean = ldc;
    job.noisy_in = noisy;
    job.ld_noisy = ldn;
    job.stds_in = std;
    job.ld_stds = lds;
    job.top_values = top_values;
    job.ld_values = ldv;
    job.token_group = token_group;
    job.load = load;
    memset(load, 0, (size_t)job.groups * job.experts * sizeof(float));
    kernels->gate_load(&job);
    return FM_OK;
}

float fm_gate_noise(uint64_t seed, uint64_t token, int expert) {
    return fm__normal_from_hash(fm__noise_hash(fm__noise_token_state(seed, token), expert));
}

#define FM__ALIGN64 __attribute__((aligned(64))) /* full-vector loads of a stack panel never split a line */

/* Depth of the B blocks that fm__gemm_strided packs on the stack: 32 x FM_GEMM_PANEL floats, 8 KiB. */
#define FM__STRIDED_DEPTH 32
/* The most rows of a strided product's work item (a multiple of the micro-kernel's 6 rows). */
#define FM__STRIDED_ROWS 96

/* C[rows x cols] (+)= A . B for operands at any strides, a(i, p) = a[i * a_row + p * a_depth]
 * and b(p, j) = b[p * b_row + j * b_col], on the packed-panel micro-kernels: B goes through a
 * stack panel one depth block of FM__STRIDED_DEPTH by FM_GEMM_PANEL columns at a time, so the
 * gate's small products (x W, dlogits W^T, x^T dlogits, with few experts) run at kernel speed
 * without a workspace. accumulate adds C's old values. */
static void fm__gemm_strided(const fm__kernel_table *kernels, int rows, int depth, int cols, const float *a,
                             ptrdiff_t a_row, ptrdiff_t a_depth, const float *b, ptrdiff_t b_row, ptrdiff_t b_col,
                             int accumulate, float *c, ptrdiff_t ldc) {
    /* items of (row block x column panel): each element of c sums its depth in the same order
     * whatever the split, so the result does not depend on the threads */
    const int panels = (cols + FM_GEMM_PANEL - 1) / FM_GEMM_PANEL;
    const int threads = fm__threads_for((double)rows * depth * cols);
    /* row blocks of at most FM__STRIDED_ROWS, at least four items a thread where the rows allow,
     * blocks of equal size (multiples of 6) so that no item is the odd long one */
    const int wanted = (rows + FM__STRIDED_ROWS - 1) / FM__STRIDED_ROWS,
              spread = (4 * threads + panels - 1) / panels, most = (rows + 5) / 6;
    const int blocks = wanted > spread ? wanted : spread < most ? spread : most > 0 ? most : 1;
    const int block_rows = ((rows + blocks - 1) / blocks + 5) / 6 * 6, row_blocks = rows > 0 ? (rows + block_rows - 1) / block_rows : 0;
    int item;
    (void)threads;
    FM__OMP_PARALLEL_FOR_ON(threads)
    for (item = 0; item < panels * row_blocks; item++) {
        FM__TRACE_ITEM("gemm_strided", item, rows); /* its items depend on the threads: the sizes to re-cut them */
        FM__ALIGN64 float panel[FM__STRIDED_DEPTH * FM_GEMM_PANEL];
        const int c0 = item % panels * FM_GEMM_PANEL, r0 = item / panels * block_rows;
        const int n = cols - c0 < FM_GEMM_PANEL ? cols - c0 : FM_GEMM_PANEL;
        const int m = rows - r0 < block_rows ? rows - r0 : block_rows;
        int k0, p, j;
        for (k0 = 0; k0 < depth; k0 += FM__STRIDED_DEPTH) {
            const int kd = depth - k0 < FM__STRIDED_DEPTH ? depth - k0 : FM__STRIDED_DEPTH;
            for (p = 0; p < kd; p++) {
                const float *bp = b + (ptrdiff_t)(k0 + p) * b_row + (ptrdiff_t)c0 * b_col;
                float *row = panel + p * FM_GEMM_PANEL;
                for (j = 0; j < n; j++) row[j] = bp[j * b_col];
                for (; j < FM_GEMM_PANEL; j++) row[j] = 0.0f;
            }
            kernels->gemm_panel(m, kd, a + (ptrdiff_t)r0 * a_row + (ptrdiff_t)k0 * a_depth, a_row, a_depth, panel, NULL,
                                accumulate || k0 > 0, c + (ptrdiff_t)r0 * ldc + c0, ldc, n);
        }
    }
    FM__TRACE_END("gemm_strided");
}

/* Depth (tokens) of a block of fm__gemm_split_depth. */
#define FM__SPLIT_DEPTH 512

/* fm__gemm_strided (C overwritten) for a product with few rows and a long depth, such as the gate's
 * dW = x^T dlogits (dim x experts, summed over the tokens), which fm__gemm_strided could split
 * into only rows / 6 items: one item per depth block of FM__SPLIT_DEPTH, each product into
 * `scratch` (ceil(depth / FM__SPLIT_DEPTH) rows x cols floats, when scratch_floats has them),
 * then the blocks' sums added in block order: the same at any thread count. */
static void fm__gemm_split_depth(const fm__kernel_table *kernels, int rows, int depth, int cols, const float *a,
                                 ptrdiff_t a_row, ptrdiff_t a_depth, const float *b, ptrdiff_t b_row, ptrdiff_t b_col,
                                 float *c, ptrdiff_t ldc, float *scratch, size_t scratch_floats) {
    const int blocks = depth / FM__SPLIT_DEPTH + (depth % FM__SPLIT_DEPTH != 0);
    const size_t per_block = (size_t)rows * cols;
    int block;
    if (blocks < 2 || (size_t)blocks * per_block > scratch_floats) {
        fm__gemm_strided(kernels, rows, depth, cols, a, a_row, a_depth, b, b_row, b_col, 0, c, ldc);
        return;
    }
    FM__OMP_PARALLEL_FOR
    for (block = 0; block < blocks; block++) {
        const int k0 = block * FM__SPLIT_DEPTH, n = depth - k0 < FM__SPLIT_DEPTH ? depth - k0 : FM__SPLIT_DEPTH;
        FM__TRACE_ITEM("gemm_split_depth", block, -1);
        fm__gemm_strided(kernels, rows, n, cols, a + (ptrdiff_t)k0 * a_depth, a_row, a_depth, b + (ptrdiff_t)k0 * b_row,
                         b_row, b_col, 0, scratch + block * per_block, cols);
    }
    FM__TRACE_END("gemm_split_depth");
    FM__FOR_ROW_CHUNKS(rows, r0, n, {
        int r;
        int j;
        int from;
        for (r = r0; r < r0 + n; r++)
            for (j = 0; j < cols; j++) {
                float sum = scratch[(size_t)r * cols + j];
                for (from = 1; from < blocks; from++) sum += scratch[from * per_block + (size_t)r * cols + j];
                c[r * ldc + j] = sum;
            }
    });
}

/* The gate's logits with leading dimensions: clean = x W_gate, noise = x W_noise when wanted. */
static void fm__gate_logits(const fm__kernel_table *kernels, int tokens, int dim, int experts, const float *x,
                            int ldx, const float *w_gate, const float *w_noise, float *clean, int ldc, float *noise,
                            int ldn) {
    fm__gemm_strided(kernels, tokens, dim, experts, x, ldx, 1, w_gate, experts, 1, 0, clean, ldc);
    if (w_noise) fm__gemm_strided(kernels, tokens, dim, experts, x, ldx, 1, w_noise, experts, 1, 0, noise, ldn);
}

/* Its backward, each output optional: dx = d_clean W_gate^T (+ d_noise W_noise^T) with
 * accumulate_dx adding to dx, dW = x^T d_logits. */
static void fm__gate_logits_backward(const fm__kernel_table *kernels, int tokens, int dim, int experts,
                                     const float *x, int ldx, const float *w_gate, const float *w_noise,
                                     const float *d_clean, int lddc, const float *d_noise, int lddn, float *dx,
                                     int lddx, int accumulate_dx, float *dw_gate, float *dw_noise) {
    if (dx) {
        fm__gemm_strided(kernels, tokens, experts, dim, d_clean, lddc, 1, w_gate, 1, experts, accumulate_dx, dx, lddx);
        if (d_noise) fm__gemm_strided(kernels, tokens, experts, dim, d_noise, lddn, 1, w_noise, 1, experts, 1, dx, lddx);
    }
    if (dw_gate) fm__gemm_strided(kernels, dim, tokens, experts, x, 1, ldx, d_clean, lddc, 1, 0, dw_gate, experts);
    if (dw_noise) fm__gemm_strided(kernels, dim, tokens, experts, x, 1, ldx, d_noise, lddn, 1, 0, dw_noise, experts);
}

fm_status fm_gate_logits_forward(int tokens, int dim, int experts, const float *x, int ldx,
                                 const float *w_gate, const float *w_noise, float *clean, float *noise) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, tokens, dim, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(w_gate, dim, experts, experts)) != FM_OK) return status;
    if ((status = fm__check_matrix(clean, tokens, experts, experts)) != FM_OK) return status;
    if (!w_noise != !noise) return FM_ERR_NULL_POINTER;
    if (w_noise && (status = fm__check_matrix(noise, tokens, experts, experts)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__FOR_ROW_CHUNKS(tokens, r0, n,
                       fm__gate_logits(kernels, n, dim, experts, x + (size_t)r0 * ldx, ldx, w_gate, w_noise,
                                       clean + (size_t)r0 * experts, experts,
                                       noise ? noise + (size_t)r0 * experts : NULL, experts));
    return FM_OK;
}

fm_status fm_gate_logits_backward(int tokens, int dim, int experts, const float *x, int ldx,
                                  const float *w_gate, const float *w_noise, const float *d_clean,
                                  const float *d_noise, float *dx, int lddx, float *dw_gate, float *dw_noise) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, tokens, dim, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(w_gate, dim, experts, experts)) != FM_OK) return status;
    if ((status = fm__check_matrix(d_clean, tokens, experts, experts)) != FM_OK) return status;
    if (!w_noise != !d_noise || (dw_noise && !d_noise)) return FM_ERR_NULL_POINTER;
    if (dx && (status = fm__check_matrix(dx, tokens, dim, lddx)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    if (dx)
        FM__FOR_ROW_CHUNKS(tokens, r0, n,
                           fm__gate_logits_backward(kernels, n, dim, experts, NULL, ldx, w_gate, w_noise,
                                                    d_clean + (size_t)r0 * experts, experts,
                                                    d_noise ? d_noise + (size_t)r0 * experts : NULL, experts,
                                                    dx + (size_t)r0 * lddx, lddx, 0, NULL, NULL));
    fm__gate_logits_backward(kernels, tokens, dim, experts, x, ldx, NULL, NULL, d_clean, experts, d_noise, experts,
                             NULL, 0, 0, dw_gate, dw_noise);
    return FM_OK;
}

/* ---- router losses ---- */

#define FM__CV_EPSILON 1e-10

fm_status fm_cv_squared(int n, const float *v, float *value, float *dv) {
    double mean = 0.0, var = 0.0, denominator;
    int i;
    if (n <= 0) return FM_ERR_INVALID_SHAPE;
    if (!v || !value) return FM_ERR_NULL_POINTER;
    if (n > FLEXMOE_MAX_DIM) return FM_ERR_OVERFLOW;
    if (n == 1) {
        *value = 0.0f;
        if (dv) dv[0] = 0.0f;
        return FM_OK;
    }
    for (i = 0; i < n; i++) mean += v[i];
    mean /= n;
    for (i = 0; i < n; i++) var += (v[i] - mean) * (v[i] - mean);
    var /= n - 1;
    denominator = mean * mean + FM__CV_EPSILON;
    *value = (float)(var / denominator);
    if (dv) /* d var = 2 (v - mean) / (n - 1), d mean = 1 / n */
        for (i = 0; i < n; i++)
            dv[i] = (float)((2.0 * (v[i] - mean) / (n - 1)) / denominator -
                            var * 2.0 * mean / ((double)n * denominator * denominator));
    return FM_OK;
}

/* Cross-entropy over the tokens with targets[t] >= first_target. */
static fm_status fm__cross_entropy(int tokens, int experts, const float *logits, int ldl, const int32_t *targets,
                                   int first_target, float *value, float *d_logits, int lddl) {
    const fm__kernel_table *kernels;
    fm_status status;
    double loss = 0.0;
    int t, e, counted = 0;
    if ((status = fm__check_matrix(logits, tokens, experts, ldl)) != FM_OK) return status;
    if (!targets || !value) return FM_ERR_NULL_POINTER;
    if (d_logits && (status = fm__check_matrix(d_logits, tokens, experts, lddl)) != FM_OK) return status;
    for (t = 0; t < tokens; t++) {
        if (targets[t] >= experts) return FM_ERR_INVALID_ARGUMENT;
        counted += targets[t] >= first_target;
    }
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    if (d_logits)
        FM__FOR_ROW_CHUNKS(tokens, r0, n,
                           kernels->softmax_forward(n, experts, logits + (size_t)r0 * ldl, ldl,
                                                    d_logits + (size_t)r0 * lddl, lddl));
    for (t = 0; t < tokens; t++) {
        const float *l = logits + (size_t)t * ldl;
        float *d = d_logits ? d_logits + (size_t)t * lddl : NULL;
        if (targets[t] < first_target) {
            if (d)
                for (e = 0; e < experts; e++) d[e] = 0.0f;
            continue;
        }
        { /* log-sum-exp in double: the loss stays finite however small p[target] is */
            double max = l[0], sum = 0.0;
            for (e = 1; e < experts; e++) max = l[e] > max ? l[e] : max;
            for (e = 0; e < experts; e++) sum += exp(l[e] - max);
            loss += max + log(sum) - l[targets[t]];
        }
        if (d) {
            for (e = 0; e < experts; e++) d[e] /= (float)counted;
            d[targets[t]] -= 1.0f / (float)counted;
        }
    }
    *value = counted ? (float)(loss / counted) : 0.0f;
    return FM_OK;
}

fm_status fm_router_cross_entropy(int tokens, int experts, const float *logits, int ldl,
                                  const int32_t *targets, float *value, float *d_logits, int lddl) {
    return fm__cross_entropy(tokens, experts, logits, ldl, targets, 0, value, d_logits, lddl);
}

fm_status fm_flexmoe_router_loss(int tokens, int experts, int groups, const float *noisy_logits, int ldl,
                                 const int32_t *combination, const float *importance, const float *load,
                                 float *value, float *d_noisy_logits, int lddl, float *d_importance,
                                 float *d_load) {
    fm_status status;
    float ce, cv;
    double total;
    int t, g;
    if (!value || !combination) return FM_ERR_NULL_POINTER;
    if (groups < 1 || groups > FLEXMOE_GATE_MAX_GROUPS) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__check_matrix(importance, groups, experts, experts)) != FM_OK) return status;
    if ((status = fm__check_matrix(load, groups, experts, experts)) != FM_OK) return status;
    if ((status = fm__check_matrix(noisy_logits, tokens, experts, ldl)) != FM_OK) return status;
    if (d_noisy_logits && (status = fm__check_matrix(d_noisy_logits, tokens, experts, lddl)) != FM_OK) return status;
    for (t = 0; t < tokens; t++) /* the contents last, once every shape is known good */
        if (combination[t] < 0) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__cross_entropy(tokens, experts, noisy_logits, ldl, combination, 1, &ce, d_noisy_logits,
                                    lddl)) != FM_OK)
        return status;
    total = ce;
    for (g = 0; g < groups; g++) {
        fm_cv_squared(experts, importance + (size_t)g * experts, &cv, d_importance ? d_importance + (size_t)g * experts : NULL);
        total += cv;
        fm_cv_squared(experts, load + (size_t)g * experts, &cv, d_load ? d_load + (size_t)g * experts : NULL);
        total += cv;
    }
    *value = (float)total;
    return FM_OK;
}

/* ---- LayerNorm ---- */

/* eps == 0 is the PyTorch default; a negative or NaN eps would give NaN or a negative variance. */
static fm_status fm__layernorm_eps(float eps, float *effective) {
    if (!(eps >= 0.0f)) return FM_ERR_INVALID_ARGUMENT;
    *effective = eps == 0.0f ? 1e-5f : eps;
    return FM_OK;
}

/* Columns per parallel chunk of the dgamma / dbeta sums: 1 KiB of each output, which stays in
 * L1 while the rows stream past. */
#define FM__COL_CHUNK 32

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
        FM__TRACE_ITEM("layernorm_param_grad", chunk, -1);
        const int c0 = chunk * FM__COL_CHUNK, n = cols - c0 < FM__COL_CHUNK ? cols - c0 : FM__COL_CHUNK;
        kernels->layernorm_param_grad(rows, n, x + c0, ldx, mean, rstd, dy + c0, lddy,
                                      dgamma ? dgamma + c0 : NULL, dbeta ? dbeta + c0 : NULL);
    }
    FM__TRACE_END("layernorm_param_grad");
}

fm_status fm_layernorm_forward(int rows, int cols, const float *x, int ldx, const float *gamma,
                               const float *beta, float eps, float *y, int ldy, float *mean,
                               float *rstd) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, cols, ldy)) != FM_OK) return status;
    if ((status = fm__layernorm_eps(eps, &eps)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
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
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
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
    if (desc->tokens <= 0 || desc->k <= 0 || desc->experts <= 0 || desc->dim <= 0 || desc->classes <= 0)
        return FM_ERR_INVALID_SHAPE;
    if (desc->k > desc->experts) return FM_ERR_INVALID_ARGUMENT; /* as everywhere: k > E is a range error */
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
    if (desc->mode != FM_CONF_TOKEN && desc->mode != FM_CONF_EXPERT_MEAN) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__layernorm_eps(desc->eps, eps)) != FM_OK) return status;
    for (s = 0; s < (size_t)desc->tokens * desc->k; s++)
        if (experts[s] < 0 || experts[s] >= desc->experts) return FM_ERR_INVALID_ARGUMENT;
    if (labels)
        for (i = 0; i < desc->tokens; i++)
            if (labels[i] < 0 || labels[i] >= desc->classes) return FM_ERR_INVALID_ARGUMENT;
    return FM_OK;
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
    if (fm__overlap(out, fm__matrix_bytes(desc->tokens, desc->dim, ldout), x, fm__matrix_bytes(desc->tokens, desc->dim, ldx)) ||
        fm__overlap(out, fm__matrix_bytes(desc->tokens, desc->dim, ldout), h,
                    fm__matrix_bytes(desc->tokens * desc->k, desc->dim, ldh)))
        return FM_ERR_INVALID_ARGUMENT;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
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
    if (fm__overlap(dx, fm__matrix_bytes(desc->tokens, desc->dim, lddx), dout, fm__matrix_bytes(desc->tokens, desc->dim, lddout)))
        return FM_ERR_INVALID_ARGUMENT;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
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

/* ---- routing plan, dispatch and combine ---- */

/* Whether assignment a comes before b: by gate descending, then assignment ascending (the
 * gate-drop priority); with gates NULL by assignment alone. */
static int fm__assignment_before(const float *gates, int ldg, int k, int32_t a, int32_t b) {
    if (gates) {
        const float ga = gates[(size_t)(a / k) * ldg + a % k], gb = gates[(size_t)(b / k) * ldg + b % k];
        if (ga != gb) return ga > gb;
    }
    return a < b;
}

/* In-place heapsort of list[0..n) into fm__assignment_before order: no allocation, O(n log n),
 * deterministic since the order is total. The heap keeps the element that goes last on top. */
static void fm__sort_assignments(int32_t *list, int n, const float *gates, int ldg, int k) {
    int start, end, root, child;
    int32_t tmp;
    for (start = n / 2 - 1, end = n; end > 1;) {
        if (start >= 0) {
            root = start--; /* building the heap */
        } else {
            tmp = list[0], list[0] = list[--end], list[end] = tmp; /* the last element to its place */
            root = 0;
        }
        for (; (child = 2 * root + 1) < end; root = child) {
            if (child + 1 < end && fm__assignment_before(gates, ldg, k, list[child], list[child + 1])) child++;
            if (!fm__assignment_before(gates, ldg, k, list[root], list[child])) break;
            tmp = list[root], list[root] = list[child], list[child] = tmp;
        }
    }
}

/* Tokens of a routing plan's counting chunk, at least: each chunk's histogram of E counts. */
#define FM__PLAN_CHUNK_TOKENS 256

fm_status fm_routing_plan_build(const fm_plan_desc *desc, const int32_t *indices, int ldi, const float *gates,
                                int ldg, fm_routing_plan *plan) {
    fm_status status;
    int T, k, E, e, i, capacity, chunks, chunk_tokens, chunk, most;
    int32_t *histograms;
    size_t assignments, a, r;
    if (!desc || !plan) return FM_ERR_NULL_POINTER;
    T = desc->tokens, k = desc->top_k, E = desc->experts;
    if (T <= 0 || k <= 0 || E <= 0) return FM_ERR_INVALID_SHAPE;
    if (k > E || !(desc->capacity_factor >= 0.0f) || (unsigned)desc->drop_policy > FM_DROP_BY_GATE)
        return FM_ERR_INVALID_ARGUMENT;
    if ((uint64_t)T * (uint64_t)k > (uint64_t)INT32_MAX) return FM_ERR_OVERFLOW;
    if ((status = fm__check_matrix(indices, T, k, ldi)) != FM_OK) return status;
    if (desc->capacity_factor > 0.0f && desc->drop_policy == FM_DROP_BY_GATE &&
        (status = fm__check_matrix(gates, T, k, ldg)) != FM_OK)
        return status;
    if (!plan->counts || !plan->offsets || !plan->order || !plan->position) return FM_ERR_NULL_POINTER;
    /* the contents last: every other argument is known good before a byte of them is read */
    if ((status = fm__check_indices(indices, T, k, ldi, E)) != FM_OK) return status;
    assignments = (size_t)T * k;
    capacity = INT32_MAX;
    if (desc->capacity_factor > 0.0f) {
        const double c = ceil((double)desc->capacity_factor * (double)assignments / E);
        capacity = c < 1.0 ? 1 : c > (double)INT32_MAX ? INT32_MAX : (int)c;
    }
    plan->tokens = T, plan->top_k = k, plan->experts = E;
    /* stable counting sort by expert over chunks of tokens, in parallel: each chunk counts its
     * assignments per expert, a prefix sum in (expert, chunk) order gives each chunk its first row
     * per expert, and each chunk writes its assignments from there in token order: the order of
     * one pass over the tokens, at any chunking. The histograms live in position (written only
     * below), or in counts when there is one chunk. */
    chunks = fm__thread_count() * 4;
    if (chunks > T / FM__PLAN_CHUNK_TOKENS) chunks = T / FM__PLAN_CHUNK_TOKENS;
    if ((size_t)chunks * E > assignments) chunks = (int)(assignments / E);
    if (chunks < 1) chunks = 1;
    chunk_tokens = (T + chunks - 1) / chunks, chunks = (T + chunk_tokens - 1) / chunk_tokens;
    histograms = chunks > 1 ? plan->position : plan->counts;
    FM__OMP_PARALLEL_FOR
    for (chunk = 0; chunk < chunks; chunk++) {
        int32_t *histogram = histograms + (size_t)chunk * E;
        const int first = chunk * chunk_tokens, end = T - first < chunk_tokens ? T : first + chunk_tokens;
        int t, slot, expert;
        FM__TRACE_ITEM("routing_plan.count", chunk, -1);
        for (expert = 0; expert < E; expert++) histogram[expert] = 0;
        for (t = first; t < end; t++)
            for (slot = 0; slot < k; slot++) histogram[indices[(size_t)t * ldi + slot]]++;
    }
    FM__TRACE_END("routing_plan.count");
    plan->offsets[0] = 0;
    for (e = 0, most = 0; e < E; e++) {
        int32_t row = plan->offsets[e];
        for (chunk = 0; chunk < chunks; chunk++) {
            const int32_t n = histograms[(size_t)chunk * E + e];
            histograms[(size_t)chunk * E + e] = row; /* the chunk's cursor */
            row += n;
        }
        plan->offsets[e + 1] = row;
        if (row - plan->offsets[e] > most) most = row - plan->offsets[e];
    }
    FM__OMP_PARALLEL_FOR
    for (chunk = 0; chunk < chunks; chunk++) {
        int32_t *cursor = histograms + (size_t)chunk * E;
        const int first = chunk * chunk_tokens, end = T - first < chunk_tokens ? T : first + chunk_tokens;
        int t, slot;
        FM__TRACE_ITEM("routing_plan.order", chunk, -1);
        for (t = first; t < end; t++)
            for (slot = 0; slot < k; slot++) plan->order[cursor[indices[(size_t)t * ldi + slot]]++] = (int32_t)((size_t)t * k + slot);
    }
    FM__TRACE_END("routing_plan.order");
    plan->dropped = 0;
    if (most <= capacity) { /* nothing dropped: the order stands, each row's position in parallel */
        for (e = 0; e < E; e++) {
            plan->counts[e] = plan->offsets[e + 1] - plan->offsets[e];
            if (plan->dropped_per_expert) plan->dropped_per_expert[e] = 0;
        }
        FM__FOR_SPANS(assignments, begin, count, {
            size_t row;
            for (row = begin; row < begin + count; row++) plan->position[plan->order[row]] = (int32_t)row;
        });
        plan->rows = plan->offsets[E];
        return FM_OK;
    }
    /* capacity: keep the first `capacity` of each expert's list (after ordering it by gate when
     * dropping by gate), compacting the kept rows to the front of order */
    for (a = 0; a < assignments; a++) plan->position[a] = -1;
    for (e = 0, r = 0; e < E; e++) {
        int32_t *list = plan->order + plan->offsets[e];
        const int n = plan->offsets[e + 1] - plan->offsets[e], kept = n < capacity ? n : capacity;
        if (kept < n && desc->drop_policy == FM_DROP_BY_GATE) {
            fm__sort_assignments(list, n, gates, ldg, k); /* the largest gates first */
            fm__sort_assignments(list, kept, NULL, 0, k); /* the kept ones back in token order */
        }
        if (plan->dropped_per_expert) plan->dropped_per_expert[e] = n - kept;
        plan->dropped += n - kept;
        plan->counts[e] = kept;
        for (i = 0; i < kept; i++, r++) {
            plan->order[r] = list[i]; /* r <= offsets[e] + i: the move never overtakes the reads */
            plan->position[plan->order[r]] = (int32_t)r;
        }
    }
    plan->offsets[0] = 0;
    for (e = 0; e < E; e++) plan->offsets[e + 1] = plan->offsets[e] + plan->counts[e];
    plan->rows = plan->offsets[E];
    return FM_OK;
}

/* A plan as the build leaves it: sizes positive, arrays present, and order and position each
 * other's inverse over the kept assignments (every kept row written exactly once, no row index
 * outside the dispatched matrix), whoever filled them in. O(tokens * top_k), small beside the
 * rows of dim floats that the call moves. */
static fm_status fm__check_plan(const fm_routing_plan *plan, int dim) {
    int32_t a, r, assignments;
    if (!plan) return FM_ERR_NULL_POINTER;
    if (plan->tokens <= 0 || plan->top_k <= 0 || plan->experts <= 0 || dim <= 0 || plan->rows < 0 ||
        (int64_t)plan->rows > (int64_t)plan->tokens * plan->top_k)
        return FM_ERR_INVALID_SHAPE;
    if ((int64_t)plan->tokens * plan->top_k > INT32_MAX || plan->tokens > FLEXMOE_MAX_DIM || dim > FLEXMOE_MAX_DIM)
        return FM_ERR_OVERFLOW;
    if (!plan->order || !plan->position) return FM_ERR_NULL_POINTER;
    assignments = plan->tokens * plan->top_k;
    for (r = 0; r < plan->rows; r++)
        if (plan->order[r] < 0 || plan->order[r] >= assignments || plan->position[plan->order[r]] != r)
            return FM_ERR_INVALID_ARGUMENT;
    for (a = 0; a < assignments; a++)
        if (plan->position[a] != -1 &&
            (plan->position[a] < 0 || plan->position[a] >= plan->rows || plan->order[plan->position[a]] != a))
            return FM_ERR_INVALID_ARGUMENT;
    return FM_OK;
}

fm_status fm_dispatch_forward(const fm_routing_plan *plan, int dim, const float *x, int ldx, float *xe, int ldxe) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_plan(plan, dim)) != FM_OK) return status;
    if ((status = fm__check_matrix(x, plan->tokens, dim, ldx)) != FM_OK) return status;
    if (plan->rows == 0) return FM_OK;
    if ((status = fm__check_matrix(xe, plan->rows, dim, ldxe)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__FOR_ROW_CHUNKS(plan->tokens, t0, n,
                       kernels->scatter_rows(n, plan->top_k, dim, x + (size_t)t0 * ldx, ldx, plan->position + (size_t)t0 * plan->top_k,
                                             NULL, 0, xe, ldxe, fm__stream_output(plan->rows, dim)));
    return FM_OK;
}

fm_status fm_dispatch_backward(const fm_routing_plan *plan, int dim, const float *dxe, int lddxe, float *dx,
                               int lddx) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_plan(plan, dim)) != FM_OK) return status;
    if ((status = fm__check_matrix(dx, plan->tokens, dim, lddx)) != FM_OK) return status;
    if (plan->rows > 0 && (status = fm__check_matrix(dxe, plan->rows, dim, lddxe)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__FOR_ROW_CHUNKS(plan->tokens, t0, n,
                       kernels->combine_rows(n, plan->top_k, dim, dxe, lddxe, plan->position + (size_t)t0 * plan->top_k,
                                             NULL, 0, dx + (size_t)t0 * lddx, lddx, fm__stream_output(plan->tokens, dim)));
    return FM_OK;
}

fm_status fm_combine_forward(const fm_routing_plan *plan, int dim, const float *ye, int ldye, const float *gates,
                             int ldg, float *y, int ldy) {
    const fm__kernel_table *kernels;
    fm_status status;
    if ((status = fm__check_plan(plan, dim)) != FM_OK) return status;
    if ((status = fm__check_matrix(gates, plan->tokens, plan->top_k, ldg)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, plan->tokens, dim, ldy)) != FM_OK) return status;
    if (plan->rows > 0 && (status = fm__check_matrix(ye, plan->rows, dim, ldye)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__FOR_ROW_CHUNKS(plan->tokens, t0, n,
                       kernels->combine_rows(n, plan->top_k, dim, ye, ldye, plan->position + (size_t)t0 * plan->top_k,
                                             gates + (size_t)t0 * ldg, ldg, y + (size_t)t0 * ldy, ldy,
                                             fm__stream_output(plan->tokens, dim)));
    return FM_OK;
}

fm_status fm_combine_backward(const fm_routing_plan *plan, int dim, const float *ye, int ldye, const float *gates,
                              int ldg, const float *dy, int lddy, float *dye, int lddye, float *d_gates, int lddg) {
    const fm__kernel_table *kernels;
    fm_status status;
    const int k = plan ? plan->top_k : 1;
    if ((status = fm__check_plan(plan, dim)) != FM_OK) return status;
    if ((status = fm__check_matrix(gates, plan->tokens, k, ldg)) != FM_OK) return status;
    if ((status = fm__check_matrix(dy, plan->tokens, dim, lddy)) != FM_OK) return status;
    if (plan->rows > 0 && dye && (status = fm__check_matrix(dye, plan->rows, dim, lddye)) != FM_OK) return status;
    if (plan->rows > 0 && d_gates && (status = fm__check_matrix(ye, plan->rows, dim, ldye)) != FM_OK) return status;
    if (d_gates && (status = fm__check_matrix(d_gates, plan->tokens, k, lddg)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    if (dye && d_gates) { /* both in one pass over the dispatched rows; dropped assignments get 0 first */
        int a;
        for (a = 0; a < plan->tokens * k; a++)
            if (plan->position[a] < 0) d_gates[(size_t)(a / k) * lddg + a % k] = 0.0f;
        if (plan->rows > 0)
            FM__FOR_ROW_CHUNKS(plan->rows, r0, n,
                               kernels->gather_scale_dot(n, dim, dy, lddy, plan->order + r0, k, gates, ldg,
                                                         ye + (size_t)r0 * ldye, ldye, dye + (size_t)r0 * lddye, lddye,
                                                         d_gates, lddg, fm__stream_output(plan->rows, dim)));
        return FM_OK;
    }
    if (dye && plan->rows > 0)
        FM__FOR_ROW_CHUNKS(plan->tokens, t0, n,
                           kernels->scatter_rows(n, k, dim, dy + (size_t)t0 * lddy, lddy, plan->position + (size_t)t0 * k,
                                                 gates + (size_t)t0 * ldg, ldg, dye, lddye, fm__stream_output(plan->rows, dim)));
    if (d_gates)
        FM__FOR_ROW_CHUNKS(plan->tokens, t0, n,
                           kernels->row_dots(n, k, dim, dy + (size_t)t0 * lddy, lddy, ye, ldye,
                                             plan->position + (size_t)t0 * k, d_gates + (size_t)t0 * lddg, lddg));
    return FM_OK;
}

/* ---- grouped GEMM ---- */

/* Depth and row blocks of the forward loops (BLIS's KC and MC): a depth block of a panel
 * (128 x 64 floats, 32 KiB) stays in L1 while a block of rows streams past it, and the rows'
 * depth block (256 x 128 floats) stays in L2 across the panels. */
#define FM__GEMM_DEPTH_BLOCK 128
#define FM__GEMM_ROW_BLOCK 256

/* Written so that out_features near INT_MAX does not overflow. */
static int fm__gemm_panels(int out_features) { return out_features / FM_GEMM_PANEL + (out_features % FM_GEMM_PANEL != 0); }

/* Chunks of `block` rows in [first, rows), counted in 64 bits: first may be near INT_MAX. Each
 * chunk's first row, first + chunk * block, is below rows, so it fits in int. */
static int fm__row_chunks(int first, int rows, int block) {
    return (int)(((int64_t)rows - first + block - 1) / block);
}

/* Live columns of panel p. */
static int fm__panel_cols(int out_features, int p) {
    return out_features - p * FM_GEMM_PANEL < FM_GEMM_PANEL ? out_features - p * FM_GEMM_PANEL : FM_GEMM_PANEL;
}

/* y[rows][0..cols) = x[rows] . P (+ bias) for one packed panel P of in_features rows: the BLIS
 * loops around the micro-kernel, rows and depth in blocks. With act, the last depth block also
 * writes GELU(y) of kind gelu to act (only that when act is y). */
static void fm__gemm_panel_blocked(const fm__kernel_table *kernels, int rows, int in_features, const float *x,
                                   int ldx, const float *panel, const float *bias, float *y, int ldy, int cols,
                                   fm_gelu gelu, float *act, int ldact) {
    int r0, k0;
    for (r0 = 0; r0 < rows; r0 += FM__GEMM_ROW_BLOCK) {
        const int m = rows - r0 < FM__GEMM_ROW_BLOCK ? rows - r0 : FM__GEMM_ROW_BLOCK;
        for (k0 = 0; k0 < in_features; k0 += FM__GEMM_DEPTH_BLOCK) {
            const int depth = in_features - k0 < FM__GEMM_DEPTH_BLOCK ? in_features - k0 : FM__GEMM_DEPTH_BLOCK;
            if (act && k0 + depth == in_features)
                kernels->gemm_panel_ex(m, depth, x + (size_t)r0 * ldx + k0, ldx, 1, panel + (size_t)k0 * FM_GEMM_PANEL,
                                       FM_GEMM_PANEL, k0 == 0 ? bias : NULL, k0 > 0, y + (size_t)r0 * ldy, ldy, cols,
                                       (int)gelu, act + (size_t)r0 * ldact, ldact);
            else
                kernels->gemm_panel(m, depth, x + (size_t)r0 * ldx + k0, ldx, 1, panel + (size_t)k0 * FM_GEMM_PANEL,
                                    k0 == 0 ? bias : NULL, k0 > 0, y + (size_t)r0 * ldy, ldy, cols);
        }
    }
}

size_t fm_packed_weight_floats(int in_features, int out_features) {
    if (in_features <= 0 || out_features <= 0 || in_features > FLEXMOE_MAX_DIM || out_features > FLEXMOE_MAX_DIM) return 0;
    return (size_t)fm__gemm_panels(out_features) * FM_GEMM_PANEL * (size_t)in_features;
}

/* Shapes, the plain matrices' extent and the offsets of a grouped GEMM; rows = offsets[experts]. */
static fm_status fm__check_grouped(int experts, const int32_t *offsets, int in_features, int out_features,
                                   int *rows) {
    int e;
    if (experts <= 0 || in_features <= 0 || out_features <= 0) return FM_ERR_INVALID_SHAPE;
    if (!offsets) return FM_ERR_NULL_POINTER;
    if (offsets[0] < 0) return FM_ERR_INVALID_ARGUMENT;
    for (e = 0; e < experts; e++)
        if (offsets[e + 1] < offsets[e]) return FM_ERR_INVALID_ARGUMENT;
    if (offsets[experts] > FLEXMOE_MAX_DIM || in_features > FLEXMOE_MAX_DIM || out_features > FLEXMOE_MAX_DIM)
        return FM_ERR_OVERFLOW;
    if ((uint64_t)fm_packed_weight_floats(in_features, out_features) * (uint64_t)experts >
            (uint64_t)(PTRDIFF_MAX / sizeof(float)) ||
        (int64_t)experts * fm__gemm_panels(in_features > out_features ? in_features : out_features) > INT32_MAX)
        return FM_ERR_OVERFLOW; /* the work items (expert, panel) are numbered in int */
    *rows = offsets[experts];
    return FM_OK;
}

/* The arguments of pack and unpack: shapes, the plain matrices' extent, the packed buffer. */
static fm_status fm__check_packing(int experts, int in_features, int out_features, fm_weight_layout layout,
                                   const float *w, int ldw, const float *packed) {
    const int rows = layout == FM_WEIGHTS_OUT_BY_IN ? out_features : in_features;
    const int cols = layout == FM_WEIGHTS_OUT_BY_IN ? in_features : out_features;
    fm_status status;
    if (experts <= 0 || in_features <= 0 || out_features <= 0) return FM_ERR_INVALID_SHAPE;
    if (layout != FM_WEIGHTS_IN_BY_OUT && layout != FM_WEIGHTS_OUT_BY_IN) return FM_ERR_INVALID_ARGUMENT;
    if ((int64_t)experts * rows > INT32_MAX ||
        (uint64_t)fm_packed_weight_floats(in_features, out_features) * (uint64_t)experts >
            (uint64_t)(PTRDIFF_MAX / sizeof(float)))
        return FM_ERR_OVERFLOW;
    if ((status = fm__check_matrix(w, experts * rows, cols, ldw)) != FM_OK) return status;
    return packed ? FM_OK : FM_ERR_NULL_POINTER;
}

/* The element (k, j) of expert e in the plain layout. */
static size_t fm__plain_weight_index(int in_features, int out_features, fm_weight_layout layout, int ldw, int e,
                                     int k, int j) {
    return layout == FM_WEIGHTS_OUT_BY_IN ? ((size_t)e * out_features + j) * ldw + k
                                          : ((size_t)e * in_features + k) * ldw + j;
}

fm_status fm_pack_weights(int experts, int in_features, int out_features, fm_weight_layout layout,
                          const float *w, int ldw, float *packed) {
    const size_t per_expert = fm_packed_weight_floats(in_features, out_features);
    int e, p, k, j;
    fm_status status;
    if ((status = fm__check_packing(experts, in_features, out_features, layout, w, ldw, packed)) != FM_OK) return status;
    for (e = 0; e < experts; e++)
        for (p = 0; p < fm__gemm_panels(out_features); p++)
            for (k = 0; k < in_features; k++) {
                float *dst = packed + e * per_expert + ((size_t)p * in_features + k) * FM_GEMM_PANEL;
                for (j = 0; j < FM_GEMM_PANEL; j++) {
                    const int column = p * FM_GEMM_PANEL + j;
                    dst[j] = column < out_features
                                 ? w[fm__plain_weight_index(in_features, out_features, layout, ldw, e, k, column)]
                                 : 0.0f;
                }
            }
    return FM_OK;
}

fm_status fm_unpack_weights(int experts, int in_features, int out_features, fm_weight_layout layout,
                            const float *packed, float *w, int ldw) {
    const size_t per_expert = fm_packed_weight_floats(in_features, out_features);
    int e, k, j;
    fm_status status;
    if ((status = fm__check_packing(experts, in_features, out_features, layout, w, ldw, packed)) != FM_OK) return status;
    for (e = 0; e < experts; e++)
        for (k = 0; k < in_features; k++)
            for (j = 0; j < out_features; j++)
                w[fm__plain_weight_index(in_features, out_features, layout, ldw, e, k, j)] =
                    packed[e * per_expert + ((size_t)(j / FM_GEMM_PANEL) * in_features + k) * FM_GEMM_PANEL +
                           j % FM_GEMM_PANEL];
    return FM_OK;
}

fm_status fm_grouped_gemm_forward(int experts, const int32_t *offsets, int in_features, int out_features,
                                  const float *x, int ldx, const float *packed_w, const float *bias, float *y,
                                  int ldy) {
    const fm__kernel_table *kernels;
    const size_t per_expert = fm_packed_weight_floats(in_features, out_features);
    const int panels = fm__gemm_panels(out_features);
    int rows, item;
    fm_status status;
    if ((status = fm__check_grouped(experts, offsets, in_features, out_features, &rows)) != FM_OK) return status;
    if (!packed_w) return FM_ERR_NULL_POINTER;
    if (rows == 0) return FM_OK;
    if ((status = fm__check_matrix(x, rows, in_features, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, out_features, ldy)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < experts * panels; item++) {
        FM__TRACE_ITEM("grouped_gemm_forward", item, item / panels);
        const int e = item / panels, p = item % panels, first = offsets[e];
        fm__gemm_panel_blocked(kernels, offsets[e + 1] - first, in_features, x + (size_t)first * ldx, ldx,
                               packed_w + e * per_expert + (size_t)p * in_features * FM_GEMM_PANEL,
                               bias ? bias + (size_t)e * out_features + p * FM_GEMM_PANEL : NULL,
                               y + (size_t)first * ldy + p * FM_GEMM_PANEL, ldy, fm__panel_cols(out_features, p),
                               FM_GELU_ERF, NULL, 0);
    }
    FM__TRACE_END("grouped_gemm_forward");
    return FM_OK;
}

/* dx's rows go to the dot-product kernels in chunks of this many, split where the expert changes. */
#define FM__GEMM_GRAD_ROW_BLOCK 64
/* dW's rows are taken a block at a time. A panel of 64 of dy's columns is read in place, in
 * blocks of FM__GEMM_DEPTH_BLOCK rows; the last, partial panel of a width that is not a multiple
 * of 64 is copied a block at a time, zero padded, into a panel-shaped buffer (8 KiB: kernels
 * keep their stack small) so the micro-kernel reads whole vectors past out_features. */
#define FM__GEMM_DY_BLOCK 32
/* The depth of a transposed block of W for dx (32 x 64 floats, 8 KiB of stack). */
#define FM__GEMM_TRANSPOSE_DEPTH 32
/* From this many rows an expert's dx goes through transposed blocks of W (see below). */
#define FM__GEMM_TRANSPOSE_MIN_ROWS 32

/* dx[rows] = dy[rows] . W^T, columns 64q .. of dx, for one expert's rows (W packed, rows >=
 * FM__GEMM_TRANSPOSE_MIN_ROWS): W^T a block at a time (FM__GEMM_TRANSPOSE_DEPTH x 64, transposed
 * from the packed panels, in L1) through the forward's micro-kernel. Row blocks outside: a
 * block's dx rows stay in L2 while every depth block adds to them (the other way round, an
 * expert of thousands of rows re-read its whole dx from memory per depth block); the transposed
 * blocks are recomputed per row block, little next to the block's FMAs (32 x 64 moves against
 * 32 x 64 x 256). */
static void fm__gemm_dx_panel(const fm__kernel_table *kernels, int rows, int in_features, int out_features, int q,
                              const float *dy, int lddy, const float *packed, float *dx, int lddx) {
    const int cols = fm__panel_cols(in_features, q);
    float block[FM__GEMM_TRANSPOSE_DEPTH * FM_GEMM_PANEL];
    int j0, r0;
    for (r0 = 0; r0 < rows; r0 += FM__GEMM_ROW_BLOCK) {
        const int m = rows - r0 < FM__GEMM_ROW_BLOCK ? rows - r0 : FM__GEMM_ROW_BLOCK;
        for (j0 = 0; j0 < out_features; j0 += FM__GEMM_TRANSPOSE_DEPTH) {
            const int depth = out_features - j0 < FM__GEMM_TRANSPOSE_DEPTH ? out_features - j0 : FM__GEMM_TRANSPOSE_DEPTH;
            kernels->gemm_transpose_block(packed, in_features, q * FM_GEMM_PANEL, j0, depth, block);
            kernels->gemm_panel(m, depth, dy + (size_t)r0 * lddy + j0, lddy, 1, block, NULL, j0 > 0,
                                dx + (size_t)r0 * lddx + q * FM_GEMM_PANEL, lddx, cols);
        }
    }
}

/* dx[rows] = dy[rows] . W^T for one expert's rows: dot products against W's rows when they are
 * few (nothing to prepare), transposed blocks otherwise. */
static void fm__gemm_dx_rows(const fm__kernel_table *kernels, int rows, int in_features, int out_features,
                             const float *dy, int lddy, const float *packed, float *dx, int lddx) {
    int q;
    if (rows < FM__GEMM_TRANSPOSE_MIN_ROWS) {
        kernels->gemm_dot(rows, in_features, out_features, dy, lddy, packed, dx, lddx);
        return;
    }
    for (q = 0; q < fm__gemm_panels(in_features); q++)
        fm__gemm_dx_panel(kernels, rows, in_features, out_features, q, dy, lddy, packed, dx, lddx);
}

/* Panel p of dW = X^T dY over one expert's rows (d_panel: in_features x 64, packed; accumulate
 * adds to it). A full panel of dy's 64 columns is read in place in blocks of
 * FM__GEMM_DEPTH_BLOCK rows; a partial one is copied a block at a time, zero padded, into a
 * panel-shaped buffer (8 KiB: kernels keep their stack small) so the micro-kernel reads whole
 * vectors past out_features, and its padding columns are written zero whatever x holds (an Inf
 * in x times dy's zero padding would be NaN there, and an optimiser would carry it into the
 * weights' padding). */
static void fm__gemm_dw_panel(const fm__kernel_table *kernels, int rows, int in_features, int out_features, int p,
                              const float *x, int ldx, const float *dy, int lddy, float *d_panel, int accumulate) {
    const int cols = fm__panel_cols(out_features, p);
    float dy_block[FM__GEMM_DY_BLOCK * FM_GEMM_PANEL];
    int r0, i, j;
    if (rows == 0) {
        if (!accumulate) memset(d_panel, 0, (size_t)in_features * FM_GEMM_PANEL * sizeof(float));
        return;
    }
    if (cols == FM_GEMM_PANEL) {
        for (r0 = 0; r0 < rows; r0 += FM__GEMM_DEPTH_BLOCK)
            kernels->gemm_panel_ex(in_features, rows - r0 < FM__GEMM_DEPTH_BLOCK ? rows - r0 : FM__GEMM_DEPTH_BLOCK,
                                   x + (size_t)r0 * ldx, 1, ldx, dy + (size_t)r0 * lddy + p * FM_GEMM_PANEL, lddy, NULL,
                                   accumulate || r0 > 0, d_panel, FM_GEMM_PANEL, cols, 0, NULL, 0);
        return;
    }
    for (r0 = 0; r0 < rows; r0 += FM__GEMM_DY_BLOCK) {
        const int n = rows - r0 < FM__GEMM_DY_BLOCK ? rows - r0 : FM__GEMM_DY_BLOCK;
        for (i = 0; i < n; i++) {
            memcpy(dy_block + i * FM_GEMM_PANEL, dy + (size_t)(r0 + i) * lddy + p * FM_GEMM_PANEL, (size_t)cols * sizeof(float));
            for (j = cols; j < FM_GEMM_PANEL; j++) dy_block[i * FM_GEMM_PANEL + j] = 0.0f;
        }
        kernels->gemm_panel(in_features, n, x + (size_t)r0 * ldx, 1, ldx, dy_block, NULL, accumulate || r0 > 0, d_panel,
                            FM_GEMM_PANEL, cols);
    }
    for (i = 0; i < in_features; i++)
        memset(d_panel + (size_t)i * FM_GEMM_PANEL + cols, 0, (size_t)(FM_GEMM_PANEL - cols) * sizeof(float));
}

/* db (out_features floats) (+)= the column sums of dy's rows, in row order. */
static void fm__gemm_db_rows(const fm__kernel_table *kernels, int rows, int out_features, const float *dy, int lddy,
                             float *db, int accumulate) {
    int r;
    if (!accumulate) memset(db, 0, (size_t)out_features * sizeof(float));
    for (r = 0; r < rows; r++) kernels->axpy(out_features, 1.0f, dy + (size_t)r * lddy, db);
}

fm_status fm_grouped_gemm_backward(int experts, const int32_t *offsets, int in_features, int out_features,
                                   const float *x, int ldx, const float *packed_w, const float *dy, int lddy,
                                   float *dx, int lddx, float *d_packed_w, float *d_bias) {
    const fm__kernel_table *kernels;
    const size_t per_expert = fm_packed_weight_floats(in_features, out_features);
    const int panels = fm__gemm_panels(out_features);
    int rows, item, e;
    fm_status status;
    if ((status = fm__check_grouped(experts, offsets, in_features, out_features, &rows)) != FM_OK) return status;
    if (rows > 0 && (status = fm__check_matrix(dy, rows, out_features, lddy)) != FM_OK) return status;
    if (dx && rows > 0) {
        if (!packed_w) return FM_ERR_NULL_POINTER;
        if ((status = fm__check_matrix(dx, rows, in_features, lddx)) != FM_OK) return status;
    }
    if (d_packed_w && rows > 0 && (status = fm__check_matrix(x, rows, in_features, ldx)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    if (dx && rows > 0) {
        /* Experts with few rows: dot products against W's rows, nothing to prepare. The others:
         * W^T a block at a time (FM__GEMM_TRANSPOSE_DEPTH x 64, transposed from the packed panels, in
         * L1) through the forward's micro-kernel, which the block's cost is spread over. */
        const int chunks = fm__row_chunks(offsets[0], rows, FM__GEMM_GRAD_ROW_BLOCK);
        const int dx_panels = fm__gemm_panels(in_features);
        int chunk;
        FM__OMP_PARALLEL_FOR
        for (chunk = 0; chunk < chunks; chunk++) {
            FM__TRACE_ITEM("grouped_gemm_backward.dx_rows", chunk, -1);
            /* the chunk's rows of experts with few rows, split where they change expert */
            int r = offsets[0] + chunk * FM__GEMM_GRAD_ROW_BLOCK, expert = 0;
            const int end = rows - r > FM__GEMM_GRAD_ROW_BLOCK ? r + FM__GEMM_GRAD_ROW_BLOCK : rows;
            while (r < end) {
                int stop;
                while (offsets[expert + 1] <= r) expert++;
                stop = offsets[expert + 1] < end ? offsets[expert + 1] : end;
                if (offsets[expert + 1] - offsets[expert] < FM__GEMM_TRANSPOSE_MIN_ROWS)
                    kernels->gemm_dot(stop - r, in_features, out_features, dy + (size_t)r * lddy, lddy,
                                      packed_w + expert * per_expert, dx + (size_t)r * lddx, lddx);
                r = stop;
            }
        }
        FM__TRACE_END("grouped_gemm_backward.dx_rows");
        FM__OMP_PARALLEL_FOR
        for (item = 0; item < experts * dx_panels; item++) {
            FM__TRACE_ITEM("grouped_gemm_backward.dx_panels", item, item / dx_panels);
            const int ex = item / dx_panels, q = item % dx_panels, first = offsets[ex], count = offsets[ex + 1] - first;
            if (count >= FM__GEMM_TRANSPOSE_MIN_ROWS)
                fm__gemm_dx_panel(kernels, count, in_features, out_features, q, dy + (size_t)first * lddy, lddy,
                                  packed_w + ex * per_expert, dx + (size_t)first * lddx, lddx);
        }
        FM__TRACE_END("grouped_gemm_backward.dx_panels");
    }
    if (d_packed_w) {
        FM__OMP_PARALLEL_FOR
        for (item = 0; item < experts * panels; item++) {
            FM__TRACE_ITEM("grouped_gemm_backward.dw", item, item / panels);
            const int ex = item / panels, p = item % panels, first = offsets[ex], count = offsets[ex + 1] - first;
            /* x and dy may be NULL when no expert has rows: no offset is applied to them then */
            fm__gemm_dw_panel(kernels, count, in_features, out_features, p, count ? x + (size_t)first * ldx : x, ldx,
                              count ? dy + (size_t)first * lddy : dy, lddy,
                              d_packed_w + ex * per_expert + (size_t)p * in_features * FM_GEMM_PANEL, 0);
        }
        FM__TRACE_END("grouped_gemm_backward.dw");
    }
    if (d_bias) {
        FM__OMP_PARALLEL_FOR
        for (e = 0; e < experts; e++) {
            FM__TRACE_ITEM("grouped_gemm_backward.db", e, e);
            fm__gemm_db_rows(kernels, offsets[e + 1] - offsets[e], out_features,
                             offsets[e + 1] > offsets[e] ? dy + (size_t)offsets[e] * lddy : dy, lddy,
                             d_bias + (size_t)e * out_features, 0);
        }
        FM__TRACE_END("grouped_gemm_backward.db");
    }
    return FM_OK;
}

/* ---- GELU and the expert FFN ---- */

static fm_status fm__gelu_rows(int rows, int cols, fm_gelu kind, const float *x, int ldx, const float *dy, int lddy,
                               float *y, int ldy) {
    const fm__kernel_table *kernels;
    fm_status status;
    if (kind != FM_GELU_ERF && kind != FM_GELU_TANH) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__check_matrix(x, rows, cols, ldx)) != FM_OK) return status;
    if (dy && (status = fm__check_matrix(dy, rows, cols, lddy)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, cols, ldy)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    FM__FOR_ROW_CHUNKS(rows, r0, n, {
        int r;
        for (r = r0; r < r0 + n; r++)
            kernels->gelu_row(cols, kind, x + (size_t)r * ldx, dy ? dy + (size_t)r * lddy : NULL, y + (size_t)r * ldy);
    });
    return FM_OK;
}

fm_status fm_gelu_forward(int rows, int cols, fm_gelu kind, const float *x, int ldx, float *y, int ldy) {
    return fm__gelu_rows(rows, cols, kind, x, ldx, NULL, 0, y, ldy);
}

fm_status fm_gelu_backward(int rows, int cols, fm_gelu kind, const float *x, int ldx, const float *dy, int lddy,
                           float *dx, int lddx) {
    if (!dy) return FM_ERR_NULL_POINTER;
    return fm__gelu_rows(rows, cols, kind, x, ldx, dy, lddy, dx, lddx);
}

static fm_status fm__check_ffn(const fm_expert_ffn_desc *desc, const int32_t *offsets,
                               const fm_expert_ffn_params *params, int *rows) {
    fm_status status;
    if (!desc || !params) return FM_ERR_NULL_POINTER;
    if (desc->gelu != FM_GELU_ERF && desc->gelu != FM_GELU_TANH) return FM_ERR_INVALID_ARGUMENT;
    if ((status = fm__check_grouped(desc->experts, offsets, desc->dim, desc->hidden, rows)) != FM_OK) return status;
    if ((status = fm__check_grouped(desc->experts, offsets, desc->hidden, desc->dim, rows)) != FM_OK) return status;
    if (!params->w1 || !params->w2) return FM_ERR_NULL_POINTER;
    return FM_OK;
}

/* Rows of an expert that go through both layers together: enough that every weight block brought
 * into L1 serves many rows (blocks of 64 rows ran 20 % slower at d = 512, h = 2048, each block
 * streaming all the weights again), few enough that the block's hidden rows (256 x hidden) are
 * still in L2 or L3 when the second layer reads them. */
#define FM__FFN_ROW_BLOCK 256

/* y[rows] = x[rows] . W (+ bias) for one expert's block of rows: every panel; with act, GELU(y)
 * into act as well (as fm__gemm_panel_blocked). */
static void fm__gemm_rows(const fm__kernel_table *kernels, int rows, int in_features, int out_features,
                          const float *x, int ldx, const float *packed, const float *bias, float *y, int ldy,
                          fm_gelu gelu, float *act, int ldact) {
    int p;
    for (p = 0; p < fm__gemm_panels(out_features); p++)
        fm__gemm_panel_blocked(kernels, rows, in_features, x, ldx, packed + (size_t)p * in_features * FM_GEMM_PANEL,
                               bias ? bias + p * FM_GEMM_PANEL : NULL, y + p * FM_GEMM_PANEL, ldy,
                               fm__panel_cols(out_features, p), gelu, act ? act + p * FM_GEMM_PANEL : NULL, ldact);
}

fm_status fm_expert_ffn_forward(const fm_expert_ffn_desc *desc, const int32_t *offsets,
                                const fm_expert_ffn_params *params, const float *x, int ldx, float *y, int ldy,
                                float *hidden, int ldh, float *pre, int ldp) {
    const fm__kernel_table *kernels;
    int rows, chunks, chunk;
    fm_status status;
    if ((status = fm__check_ffn(desc, offsets, params, &rows)) != FM_OK) return status;
    if (rows == offsets[0]) return FM_OK;
    if ((status = fm__check_matrix(x, rows, desc->dim, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(y, rows, desc->dim, ldy)) != FM_OK) return status;
    if ((status = fm__check_matrix(hidden, rows, desc->hidden, ldh)) != FM_OK) return status;
    if (pre && (status = fm__check_matrix(pre, rows, desc->hidden, ldp)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    chunks = fm__row_chunks(offsets[0], rows, FM__FFN_ROW_BLOCK);
    FM__OMP_PARALLEL_FOR
    for (chunk = 0; chunk < chunks; chunk++) {
        FM__TRACE_ITEM("expert_ffn_forward", chunk, -1);
        const size_t w1_floats = fm_packed_weight_floats(desc->dim, desc->hidden);
        const size_t w2_floats = fm_packed_weight_floats(desc->hidden, desc->dim);
        const int D = desc->dim, H = desc->hidden;
        int r0 = offsets[0] + chunk * FM__FFN_ROW_BLOCK, e = 0;
        const int end = rows - r0 > FM__FFN_ROW_BLOCK ? r0 + FM__FFN_ROW_BLOCK : rows;
        while (r0 < end) { /* the chunk's rows, split where they change expert */
            int m;
            float *a;
            int lda;
            while (offsets[e + 1] <= r0) e++;
            m = (offsets[e + 1] < end ? offsets[e + 1] : end) - r0;
            a = pre ? pre + (size_t)r0 * ldp : hidden + (size_t)r0 * ldh;
            lda = pre ? ldp : ldh;
            fm__gemm_rows(kernels, m, D, H, x + (size_t)r0 * ldx, ldx, params->w1 + e * w1_floats,
                          params->b1 ? params->b1 + (size_t)e * H : NULL, a, lda, desc->gelu, hidden + (size_t)r0 * ldh,
                          ldh);
            fm__gemm_rows(kernels, m, H, D, hidden + (size_t)r0 * ldh, ldh, params->w2 + e * w2_floats,
                          params->b2 ? params->b2 + (size_t)e * D : NULL, y + (size_t)r0 * ldy, ldy, FM_GELU_ERF, NULL,
                          0);
            r0 += m;
        }
    }
    FM__TRACE_END("expert_ffn_forward");
    return FM_OK;
}

/* Every expert's W^T (out_features x in_features), packed, from its packed W: dx = dy . W^T then
 * runs on the forward's loops, for a caller that has the room (fm_packed_weight_floats(out, in)
 * floats per expert). */
static void fm__transpose_packed(const fm__kernel_table *kernels, int experts, int in_features, int out_features,
                                 const float *packed, float *transposed) {
    const size_t per_expert = fm_packed_weight_floats(in_features, out_features),
                 per_transposed = fm_packed_weight_floats(out_features, in_features);
    const int panels = fm__gemm_panels(in_features);
    int item;
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < experts * panels; item++) {
        FM__TRACE_ITEM("transpose_packed", item, item / panels);
        const int e = item / panels, q = item % panels;
        kernels->gemm_transpose_block(packed + e * per_expert, in_features, q * FM_GEMM_PANEL, 0, out_features,
                                      transposed + e * per_transposed + (size_t)q * out_features * FM_GEMM_PANEL);
    }
    FM__TRACE_END("transpose_packed");
}

/* Input rows of a weight gradient per work item (a multiple of the micro-kernel's 6 rows). */
#define FM__DW_IN_BLOCK 48

/* Every expert's dW = x_e^T dy_e (packed, in x out) and db = the sum of dy_e's rows, each
 * optional: items (expert, input block, output panel) for dW and (expert) for db, taken
 * dynamically; each sums its expert's rows in row order, so no item depends on another. An
 * expert without rows gets zeros. */
static void fm__ffn_weight_grads(const fm__kernel_table *kernels, int experts, const int32_t *offsets, int in_features,
                                 int out_features, const float *x, int ldx, const float *dy, int lddy, float *dw,
                                 float *db) {
    const size_t per_expert = fm_packed_weight_floats(in_features, out_features);
    const int panels = fm__gemm_panels(out_features), blocks = (in_features + FM__DW_IN_BLOCK - 1) / FM__DW_IN_BLOCK;
    const int items = dw ? experts * blocks * panels : 0;
    int item;
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < items + (db ? experts : 0); item++) {
        FM__TRACE_ITEM("ffn_weight_grads", item, item < items ? item / (blocks * panels) : item - items);
        if (item < items) {
            const int e = item / (blocks * panels), b = item / panels % blocks, p = item % panels;
            const int first = offsets[e], count = offsets[e + 1] - first, i0 = b * FM__DW_IN_BLOCK;
            const int n = in_features - i0 < FM__DW_IN_BLOCK ? in_features - i0 : FM__DW_IN_BLOCK;
            fm__gemm_dw_panel(kernels, count, n, out_features, p, count ? x + (size_t)first * ldx + i0 : x, ldx,
                              count ? dy + (size_t)first * lddy : dy, lddy,
                              dw + e * per_expert + ((size_t)p * in_features + i0) * FM_GEMM_PANEL, 0);
        } else {
            const int e = item - items;
            fm__gemm_db_rows(kernels, offsets[e + 1] - offsets[e], out_features,
                             offsets[e + 1] > offsets[e] ? dy + (size_t)offsets[e] * lddy : dy, lddy,
                             db + (size_t)e * out_features, 0);
        }
    }
    FM__TRACE_END("ffn_weight_grads");
}

/* The operands of one expert FFN backward, as fm__expert_ffn_backward received them; h is what
 * dW2 multiplies: the saved hidden rows, or d_hidden after GELU(pre) was written there. */
typedef struct fm__ffn_backward_operands {
    const fm_expert_ffn_desc *desc;
    const int32_t *offsets;
    const fm_expert_ffn_params *params;
    const fm_expert_ffn_grads *grads;
    const float *w1_t, *w2_t, *x, *pre, *h, *dy;
    float *dx, *d_hidden;
    int ldx, ldp, ld_h, lddy, lddx, lddh;
} fm__ffn_backward_operands;

/* Rows [r, r + m) of expert e: dH = (dy W2^T) GELU'(pre), then dx = dH W1^T. */
static void fm__ffn_backward_rows(const fm__kernel_table *kernels, const fm__ffn_backward_operands *o, int e, int r,
                                  int m) {
    const int D = o->desc->dim, H = o->desc->hidden;
    float *dh_r = o->d_hidden + (size_t)r * o->lddh;
    int i;
    if (o->w2_t)
        fm__gemm_rows(kernels, m, D, H, o->dy + (size_t)r * o->lddy, o->lddy, o->w2_t + e * fm_packed_weight_floats(D, H),
                      NULL, dh_r, o->lddh, o->desc->gelu, NULL, 0);
    else fm__gemm_dx_rows(kernels, m, H, D, o->dy + (size_t)r * o->lddy, o->lddy,
                          o->params->w2 + e * fm_packed_weight_floats(H, D), dh_r, o->lddh);
    for (i = 0; i < m; i++)
        kernels->gelu_row(H, o->desc->gelu, o->pre + (size_t)(r + i) * o->ldp, dh_r + (size_t)i * o->lddh,
                          dh_r + (size_t)i * o->lddh);
    if (o->dx && o->w1_t)
        fm__gemm_rows(kernels, m, H, D, dh_r, o->lddh, o->w1_t + e * fm_packed_weight_floats(H, D), NULL,
                      o->dx + (size_t)r * o->lddx, o->lddx, o->desc->gelu, NULL, 0);
    else if (o->dx)
        fm__gemm_dx_rows(kernels, m, D, H, dh_r, o->lddh, o->params->w1 + e * fm_packed_weight_floats(D, H),
                         o->dx + (size_t)r * o->lddx, o->lddx);
}

/* h = GELU(pre) into d_hidden for rows [r, r + m), when the forward did not keep the hidden rows. */
static void fm__ffn_hidden_rows(const fm__kernel_table *kernels, const fm__ffn_backward_operands *o, int r, int m) {
    int i;
    if (o->h == o->d_hidden)
        for (i = r; i < r + m; i++)
            kernels->gelu_row(o->desc->hidden, o->desc->gelu, o->pre + (size_t)i * o->ldp, NULL,
                              o->d_hidden + (size_t)i * o->lddh);
}

/* Four parallel passes, each over items that write their own outputs: row blocks for the rows'
 * products, (expert x input block x output panel) for the weight gradients, so that one hot
 * expert's gradients are split over every thread, each summing its expert's rows in order. (A
 * one-thread path through both layers per row block, dH kept in L2, measured no faster.) */
static void fm__ffn_backward_passes(const fm__kernel_table *kernels, const fm__ffn_backward_operands *o, int rows) {
    const int D = o->desc->dim, H = o->desc->hidden, E = o->desc->experts, first = o->offsets[0];
    const int chunks = rows > first ? fm__row_chunks(first, rows, FM__FFN_ROW_BLOCK) : 0;
    const fm_expert_ffn_grads *g = o->grads;
    int chunk;
    FM__OMP_PARALLEL_FOR
    for (chunk = 0; chunk < chunks; chunk++) {
        const int r0 = first + chunk * FM__FFN_ROW_BLOCK;
        FM__TRACE_ITEM("ffn_backward.hidden", chunk, -1);
        fm__ffn_hidden_rows(kernels, o, r0, rows - r0 > FM__FFN_ROW_BLOCK ? FM__FFN_ROW_BLOCK : rows - r0);
    }
    FM__TRACE_END("ffn_backward.hidden");
    if (g->w2 || g->b2) fm__ffn_weight_grads(kernels, E, o->offsets, H, D, o->h, o->ld_h, o->dy, o->lddy, g->w2, g->b2);
    FM__OMP_PARALLEL_FOR
    for (chunk = 0; chunk < chunks; chunk++) {
        int r0 = first + chunk * FM__FFN_ROW_BLOCK, e = 0;
        const int end = rows - r0 > FM__FFN_ROW_BLOCK ? r0 + FM__FFN_ROW_BLOCK : rows;
        FM__TRACE_ITEM("ffn_backward.rows", chunk, -1);
        while (r0 < end) { /* the chunk's rows, split where they change expert */
            int m;
            while (o->offsets[e + 1] <= r0) e++;
            m = (o->offsets[e + 1] < end ? o->offsets[e + 1] : end) - r0;
            fm__ffn_backward_rows(kernels, o, e, r0, m);
            r0 += m;
        }
    }
    FM__TRACE_END("ffn_backward.rows");
    if (g->w1 || g->b1)
        fm__ffn_weight_grads(kernels, E, o->offsets, D, H, o->x, o->ldx, o->d_hidden, o->lddh, g->w1, g->b1);
}

/* fm_expert_ffn_backward, with the experts' W1^T and W2^T (fm__transpose_packed) when the caller
 * has them (NULL: dx and dH from transposed blocks of W, made as they are needed). */
static fm_status fm__expert_ffn_backward(const fm_expert_ffn_desc *desc, const int32_t *offsets,
                                         const fm_expert_ffn_params *params, const float *w1_t, const float *w2_t,
                                         const float *x, int ldx, const float *pre, int ldp, const float *hidden, int ldh,
                                         const float *dy, int lddy, float *dx, int lddx, const fm_expert_ffn_grads *grads,
                                         float *d_hidden, int lddh) {
    static const fm_expert_ffn_grads none = {NULL, NULL, NULL, NULL};
    const fm__kernel_table *kernels;
    fm__ffn_backward_operands o;
    int rows;
    fm_status status;
    if (!grads) grads = &none;
    if ((status = fm__check_ffn(desc, offsets, params, &rows)) != FM_OK) return status;
    if (rows > 0) {
        if ((status = fm__check_matrix(pre, rows, desc->hidden, ldp)) != FM_OK) return status;
        if (hidden && (status = fm__check_matrix(hidden, rows, desc->hidden, ldh)) != FM_OK) return status;
        if ((status = fm__check_matrix(d_hidden, rows, desc->hidden, lddh)) != FM_OK) return status;
        if ((status = fm__check_matrix(dy, rows, desc->dim, lddy)) != FM_OK) return status;
        if ((status = fm__check_matrix(x, rows, desc->dim, ldx)) != FM_OK) return status;
        if (dx && (status = fm__check_matrix(dx, rows, desc->dim, lddx)) != FM_OK) return status;
    }
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    o.desc = desc, o.offsets = offsets, o.params = params, o.grads = grads;
    o.w1_t = w1_t, o.w2_t = w2_t, o.x = x, o.pre = pre, o.dy = dy, o.dx = dx, o.d_hidden = d_hidden;
    o.h = hidden ? hidden : d_hidden, o.ld_h = hidden ? ldh : lddh;
    o.ldx = ldx, o.ldp = ldp, o.lddy = lddy, o.lddx = lddx, o.lddh = lddh;
    fm__ffn_backward_passes(kernels, &o, rows);
    return FM_OK;
}

fm_status fm_expert_ffn_backward(const fm_expert_ffn_desc *desc, const int32_t *offsets,
                                 const fm_expert_ffn_params *params, const float *x, int ldx, const float *pre,
                                 int ldp, const float *hidden, int ldh, const float *dy, int lddy, float *dx,
                                 int lddx, const fm_expert_ffn_grads *grads, float *d_hidden, int lddh) {
    return fm__expert_ffn_backward(desc, offsets, params, NULL, NULL, x, ldx, pre, ldp, hidden, ldh, dy, lddy, dx, lddx,
                                   grads, d_hidden, lddh);
}

/* ==== 15. The SMoE layer =================================================================== */

/* The desc with its defaults filled in and checked. */
typedef struct fm__moe_config {
    int dim, hidden, experts, top_k, groups, classes, renormalize;
    fm_gate_kind gate;
    fm_gelu gelu;
    fm_drop_policy drop_policy;
    fm_conf_mode confidence;
    float noise_epsilon, capacity_factor, layernorm_eps;
} fm__moe_config;

static fm_status fm__moe_config_of(const char *caller, const fm_moe_desc *desc, fm__moe_config *c) {
    if (!desc) return FM_ERR_NULL_POINTER;
    c->dim = desc->dim ? desc->dim : 128;
    c->hidden = desc->hidden ? desc->hidden : 2 * c->dim;
    c->experts = desc->experts ? desc->experts : 16;
    c->top_k = desc->top_k ? desc->top_k : 4;
    c->groups = desc->groups ? desc->groups : 2;
    c->gate = desc->gate;
    c->gelu = desc->gelu;
    c->noise_epsilon = desc->noise_epsilon != 0.0f ? desc->noise_epsilon : 0.01f;
    c->renormalize = desc->renormalize;
    c->capacity_factor = desc->capacity_factor;
    c->drop_policy = desc->drop_policy;
    c->classes = desc->classes;
    c->confidence = desc->confidence;
    c->layernorm_eps = desc->layernorm_eps != 0.0f ? desc->layernorm_eps : 1e-5f;
    if (c->dim <= 0 || c->hidden <= 0 || c->experts <= 0 || c->dim > FLEXMOE_MAX_DIM / 2 || c->hidden > FLEXMOE_MAX_DIM) {
        fm__log(FM_LOG_ERROR, "%s: dim %d, hidden %d and experts %d must be positive (dim <= %d)", caller, c->dim,
                c->hidden, c->experts, FLEXMOE_MAX_DIM / 2);
        return FM_ERR_INVALID_SHAPE;
    }
    if (c->experts > FLEXMOE_GATE_MAX_EXPERTS || c->top_k < 1 || c->top_k > c->experts ||
        c->top_k > FLEXMOE_GATE_MAX_TOP_K || c->groups < 1 || c->groups > FLEXMOE_GATE_MAX_GROUPS) {
        fm__log(FM_LOG_ERROR, "%s: experts %d (at most %d), top_k %d (1 to min(experts, %d)) or groups %d (1 to %d) out of range",
                caller, c->experts, FLEXMOE_GATE_MAX_EXPERTS, c->top_k, FLEXMOE_GATE_MAX_TOP_K, c->groups,
                FLEXMOE_GATE_MAX_GROUPS);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if ((c->gate != FM_GATE_NOISY_TOPK && c->gate != FM_GATE_SOFTMAX_TOPK && c->gate != FM_GATE_CONFIDENCE) ||
        (c->gelu != FM_GELU_ERF && c->gelu != FM_GELU_TANH) ||
        (c->drop_policy != FM_DROP_BY_POSITION && c->drop_policy != FM_DROP_BY_GATE) ||
        (c->confidence != FM_CONF_TOKEN && c->confidence != FM_CONF_EXPERT_MEAN)) {
        fm__log(FM_LOG_ERROR, "%s: gate %d, gelu %d, drop_policy %d or confidence %d is not a value of its enum", caller,
                (int)c->gate, (int)c->gelu, (int)c->drop_policy, (int)c->confidence);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (!fm__valid_noise_epsilon(c->noise_epsilon) || !(c->capacity_factor >= 0.0f && c->capacity_factor < INFINITY) ||
        !(c->layernorm_eps > 0.0f && c->layernorm_eps < INFINITY) || c->classes < 0) {
        fm__log(FM_LOG_ERROR, "%s: noise_epsilon %g, capacity_factor %g and layernorm_eps %g must be finite and >= 0, "
                "classes %d >= 0", caller, (double)c->noise_epsilon, (double)c->capacity_factor,
                (double)c->layernorm_eps, c->classes);
        return FM_ERR_INVALID_ARGUMENT;
    }
    return FM_OK;
}

static fm_confsmoe_desc fm__moe_confsmoe_desc(const fm__moe_config *c, int tokens) {
    fm_confsmoe_desc d;
    memset(&d, 0, sizeof d);
    d.tokens = tokens, d.k = c->top_k, d.experts = c->experts, d.dim = c->dim;
    d.classes = c->classes > 0 ? c->classes : 1; /* no probe without labels (which need classes >= 2) */
    d.mode = c->confidence, d.eps = c->layernorm_eps;
    return d;
}

/* What the forward leaves at the start of `saved`, so that the backward can refuse a buffer that
 * no forward of this shape filled. */
#define FM__MOE_MAGIC 0x464d6f45u
typedef struct fm__moe_header {
    uint32_t magic;
    int tokens, training, gate, experts, top_k, dim, hidden, rows, dropped;
} fm__moe_header;

/* Pointers into the saved buffer and the workspace. */
typedef struct fm__moe_views {
    fm__moe_header *header;
    float *clean, *noise, *noisy, *gates, *importance, *load, *xe, *pre, *hidden, *ye, *h_slots, *conf_saved;
    int32_t *indices, *targets, *group, *counts, *offsets, *order, *position, *dropped;
    /* workspace */
    float *gate_workspace, *dye, *d_gates, *d_hidden, *dxe, *d_clean, *d_noise, *d_routing, *d_importance, *d_load,
        *dx_residual, *dh, *w1_t, *w2_t;
} fm__moe_views;

/* Regions of a buffer, each 64-byte aligned; with base NULL it only measures. */
static void *fm__moe_take(unsigned char *base, size_t *used, size_t count, size_t size) {
    const size_t at = *used;
    *used += (count * size + 63) / 64 * 64;
    return base ? base + at : NULL;
}

/* The saved regions for `tokens` tokens at base (NULL: only measured); pre only when with_pre
 * (a backward reads it, an inference forward does not write it). Returns the bytes. */
static size_t fm__moe_saved_layout(const fm__moe_config *c, int tokens, unsigned char *base, int with_pre,
                                   fm__moe_views *v) {
    const size_t T = (size_t)tokens, E = (size_t)c->experts, K = (size_t)c->top_k, D = (size_t)c->dim,
                 H = (size_t)c->hidden, G = (size_t)c->groups, slots = T * K;
    const int noisy = c->gate == FM_GATE_NOISY_TOPK, confident = c->gate == FM_GATE_CONFIDENCE;
    size_t s = 0, conf_floats = 0;
    if (confident) {
        const fm_confsmoe_desc d = fm__moe_confsmoe_desc(c, tokens);
        fm_confsmoe_saved_floats(&d, &conf_floats);
    }
    v->header = (fm__moe_header *)fm__moe_take(base, &s, 1, sizeof(fm__moe_header));
    v->clean = (float *)fm__moe_take(base, &s, T * E, 4);
    v->noise = noisy ? (float *)fm__moe_take(base, &s, T * E, 4) : NULL;
    v->noisy = noisy ? (float *)fm__moe_take(base, &s, T * E, 4) : NULL;
    v->indices = (int32_t *)fm__moe_take(base, &s, slots, 4);
    v->gates = (float *)fm__moe_take(base, &s, slots, 4);
    v->importance = (float *)fm__moe_take(base, &s, G * E, 4);
    v->load = (float *)fm__moe_take(base, &s, G * E, 4);
    v->targets = (int32_t *)fm__moe_take(base, &s, T, 4);
    v->group = (int32_t *)fm__moe_take(base, &s, T, 4);
    v->counts = (int32_t *)fm__moe_take(base, &s, E, 4);
    v->offsets = (int32_t *)fm__moe_take(base, &s, E + 1, 4);
    v->order = (int32_t *)fm__moe_take(base, &s, slots, 4);
    v->position = (int32_t *)fm__moe_take(base, &s, slots, 4);
    v->dropped = (int32_t *)fm__moe_take(base, &s, E, 4);
    v->xe = (float *)fm__moe_take(base, &s, slots * D, 4);
    v->hidden = (float *)fm__moe_take(base, &s, slots * H, 4);
    v->ye = (float *)fm__moe_take(base, &s, slots * D, 4);
    v->h_slots = confident ? (float *)fm__moe_take(base, &s, slots * D, 4) : NULL;
    v->conf_saved = confident ? (float *)fm__moe_take(base, &s, conf_floats, 4) : NULL;
    v->pre = with_pre ? (float *)fm__moe_take(base, &s, slots * H, 4) : NULL;
    return s;
}

/* The scratch regions, the gate's first (the only one a forward uses). Returns the bytes, and
 * those of the gate's region in *gate_bytes. */
static size_t fm__moe_workspace_layout(const fm__moe_config *c, int tokens, unsigned char *base, fm__moe_views *v,
                                       size_t *gate_bytes) {
    const size_t T = (size_t)tokens, E = (size_t)c->experts, K = (size_t)c->top_k, D = (size_t)c->dim,
                 H = (size_t)c->hidden, G = (size_t)c->groups, slots = T * K;
    const int confident = c->gate == FM_GATE_CONFIDENCE;
    size_t w = 0;
    fm_gate_desc gd;
    memset(&gd, 0, sizeof gd);
    gd.tokens = tokens, gd.experts = c->experts, gd.top_k = c->top_k, gd.training = 1, gd.groups = c->groups;
    v->gate_workspace =
        (float *)fm__moe_take(base, &w, c->gate == FM_GATE_NOISY_TOPK ? fm_gate_workspace_floats(&gd) : 1, 4);
    *gate_bytes = w;
    v->dye = (float *)fm__moe_take(base, &w, slots * D, 4);
    v->d_gates = (float *)fm__moe_take(base, &w, slots, 4);
    v->d_hidden = (float *)fm__moe_take(base, &w, slots * H, 4);
    v->dxe = (float *)fm__moe_take(base, &w, slots * D, 4);
    v->d_clean = (float *)fm__moe_take(base, &w, T * E, 4);
    v->d_noise = (float *)fm__moe_take(base, &w, T * E, 4);
    v->d_routing = (float *)fm__moe_take(base, &w, T * E, 4);
    v->d_importance = (float *)fm__moe_take(base, &w, G * E, 4);
    v->d_load = (float *)fm__moe_take(base, &w, G * E, 4);
    v->dx_residual = confident ? (float *)fm__moe_take(base, &w, T * D, 4) : NULL;
    v->dh = confident ? (float *)fm__moe_take(base, &w, slots * D, 4) : NULL;
    v->w1_t = (float *)fm__moe_take(base, &w, E * fm_packed_weight_floats((int)H, (int)D), 4);
    v->w2_t = (float *)fm__moe_take(base, &w, E * fm_packed_weight_floats((int)D, (int)H), 4);
    return w;
}

/* Tokens within the limits of the plan (tokens * top_k assignments numbered in int32) and buffers
 * whose bytes fit in size_t with room to spare. */
static fm_status fm__moe_check_tokens(const char *caller, const fm__moe_config *c, int tokens) {
    const uint64_t slots = (uint64_t)(tokens > 0 ? tokens : 0) * (uint64_t)c->top_k;
    const uint64_t widest = (uint64_t)(c->dim > c->hidden ? c->dim : c->hidden) + (uint64_t)c->experts;
    if (tokens <= 0) {
        fm__log(FM_LOG_ERROR, "%s: %d tokens (must be positive)", caller, tokens);
        return FM_ERR_INVALID_SHAPE;
    }
    if (slots > (uint64_t)FLEXMOE_MAX_DIM || slots * widest > (uint64_t)(PTRDIFF_MAX / 64)) {
        fm__log(FM_LOG_ERROR, "%s: %d tokens x top_k %d assignments of %d floats exceed the address space or "
                "FLEXMOE_MAX_DIM", caller, tokens, c->top_k, (int)widest);
        return FM_ERR_OVERFLOW;
    }
    return FM_OK;
}

fm_status fm_moe_buffer_sizes(const fm_moe_desc *desc, int max_tokens, fm_moe_sizes *sizes) {
    fm__moe_config c;
    fm__moe_views v;
    size_t gate_bytes;
    fm_status status;
    if (!sizes) return FM_ERR_NULL_POINTER;
    if ((status = fm__moe_config_of("fm_moe_buffer_sizes", desc, &c)) != FM_OK) return status;
    if ((status = fm__moe_check_tokens("fm_moe_buffer_sizes", &c, max_tokens)) != FM_OK) return status;
    sizes->saved_bytes = fm__moe_saved_layout(&c, max_tokens, NULL, 1, &v);
    sizes->workspace_bytes = fm__moe_workspace_layout(&c, max_tokens, NULL, &v, &gate_bytes);
    sizes->inference_workspace_bytes = gate_bytes + fm__moe_saved_layout(&c, max_tokens, NULL, 0, &v);
    return FM_OK;
}

/* Everything a forward or backward reads of the caller's, checked before anything is written. */
static fm_status fm__moe_check_call(const char *caller, const fm__moe_config *c, const fm_moe_params *params,
                                    const fm_moe_batch *batch, const float *out, int ldout, const void *workspace) {
    const int T = batch ? batch->tokens : 0, D = c->dim;
    const int ldx = batch && batch->ldx ? batch->ldx : D, ld = ldout ? ldout : D;
    fm_status status;
    int t;
    if (!params || !batch || !workspace) return FM_ERR_NULL_POINTER;
    if ((status = fm__moe_check_tokens(caller, c, T)) != FM_OK) return status;
    if ((status = fm__check_matrix(batch->x, T, D, ldx)) != FM_OK) return status;
    if ((status = fm__check_matrix(out, T, D, ld)) != FM_OK) return status;
    if (!params->w_gate || !params->w1 || !params->w2 || (c->gate == FM_GATE_NOISY_TOPK && !params->w_noise) ||
        (c->gate == FM_GATE_CONFIDENCE && (!params->confidence.w || !params->confidence.b ||
                                           (batch->labels && (!params->confidence.probe_w || !params->confidence.probe_b))))) {
        fm__log(FM_LOG_ERROR, "%s: a parameter the %s gate needs is NULL", caller,
                c->gate == FM_GATE_NOISY_TOPK ? "noisy" : c->gate == FM_GATE_SOFTMAX_TOPK ? "softmax" : "confidence");
        return FM_ERR_NULL_POINTER;
    }
    if (batch->labels && c->gate == FM_GATE_CONFIDENCE && c->classes < 2) {
        fm__log(FM_LOG_ERROR, "%s: labels need desc.classes >= 2 (the probes' outputs)", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (fm__overlap(out, ((size_t)(T - 1) * ld + D) * sizeof(float), batch->x, ((size_t)(T - 1) * ldx + D) * sizeof(float))) {
        fm__log(FM_LOG_ERROR, "%s: the output overlaps x", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    for (t = 0; t < T; t++) { /* the contents last, once every shape is known good */
        const int32_t comb = batch->combination ? batch->combination[t] : 0;
        if (comb < 0 || (batch->token_group && (batch->token_group[t] < 0 || batch->token_group[t] >= c->groups)) ||
            (batch->labels && c->gate == FM_GATE_CONFIDENCE && (batch->labels[t] < 0 || batch->labels[t] >= c->classes))) {
            fm__log(FM_LOG_ERROR, "%s: token %d has combination %d, group %d or label %d out of range", caller, t,
                    (int)comb, batch->token_group ? (int)batch->token_group[t] : 0,
                    batch->labels ? (int)batch->labels[t] : 0);
            return FM_ERR_INVALID_ARGUMENT;
        }
    }
    return FM_OK;
}

static fm_routing_plan fm__moe_plan(const fm__moe_config *c, int tokens, const fm__moe_views *v) {
    fm_routing_plan plan;
    memset(&plan, 0, sizeof plan);
    plan.tokens = tokens, plan.top_k = c->top_k, plan.experts = c->experts;
    plan.rows = v->header->rows, plan.dropped = v->header->dropped;
    plan.counts = v->counts, plan.offsets = v->offsets, plan.order = v->order, plan.position = v->position;
    plan.dropped_per_expert = v->dropped;
    return plan;
}

static fm_expert_ffn_desc fm__moe_ffn_desc(const fm__moe_config *c) {
    fm_expert_ffn_desc d;
    d.experts = c->experts, d.dim = c->dim, d.hidden = c->hidden, d.gelu = c->gelu;
    return d;
}

static fm_gate_desc fm__moe_gate_desc(const fm__moe_config *c, const fm_moe_batch *batch) {
    fm_gate_desc d;
    memset(&d, 0, sizeof d);
    d.tokens = batch->tokens, d.experts = c->experts, d.top_k = c->top_k, d.training = batch->training != 0;
    d.groups = c->groups, d.noise_epsilon = c->noise_epsilon, d.seed = batch->seed, d.token_offset = batch->token_offset;
    return d;
}

static fm_gate_tensors fm__moe_gate_tensors(const fm__moe_config *c, const fm_moe_batch *batch, const fm__moe_views *v) {
    fm_gate_tensors g;
    memset(&g, 0, sizeof g);
    g.clean_logits = v->clean, g.ld_clean = c->experts;
    g.noise_logits = batch->training ? v->noise : NULL, g.ld_noise = c->experts;
    g.token_group = v->group, g.indices = v->indices, g.ld_indices = c->top_k, g.gates = v->gates, g.ld_gates = c->top_k;
    g.noisy_logits = batch->training ? v->noisy : NULL, g.ld_noisy = c->experts;
    g.importance = v->importance, g.load = v->load, g.workspace = v->gate_workspace;
    return g;
}

/* The logits the S-Router cross-entropy reads: the noisy ones in training. */
static const float *fm__moe_routing_logits(const fm__moe_config *c, const fm_moe_batch *batch, const fm__moe_views *v) {
    return c->gate == FM_GATE_NOISY_TOPK && batch->training ? v->noisy : v->clean;
}

/* The S-Router term, summed over the token groups that have tokens with a target: each group's
 * mean cross-entropy over its tokens with a target (-1: none). Row chunks in parallel, each
 * summing its tokens' losses in double in token order per group, the chunks' sums joined in chunk
 * order (the same at any thread count); d_routing (optional) receives the sum of the groups'
 * gradients, softmax(logits) - onehot(target) over the group's count, row chunks in parallel. */
static void fm__moe_router_ce(const fm__moe_config *c, int T, const float *logits, const fm__moe_views *v, float *value,
                              float *d_routing) {
    const fm__kernel_table *kernels = fm__active_kernels();
    const int E = c->experts;
    const int chunks = T / FM__ROW_CHUNK + (T % FM__ROW_CHUNK != 0);
    double sums[FLEXMOE_GATE_MAX_GROUPS] = {0.0};
    int counts[FLEXMOE_GATE_MAX_GROUPS] = {0};
    int g, t, chunk;
    for (t = 0; t < T; t++) counts[v->group[t]] += v->targets[t] >= 0;
    FM__OMP_PARALLEL_FOR_ORDERED
    for (chunk = 0; chunk < chunks; chunk++) {
        double part[FLEXMOE_GATE_MAX_GROUPS] = {0.0};
        const int end = T - chunk * FM__ROW_CHUNK < FM__ROW_CHUNK ? T : (chunk + 1) * FM__ROW_CHUNK;
        int r, e, j;
        FM__TRACE_ITEM("router_ce", chunk, -1);
        for (r = chunk * FM__ROW_CHUNK; r < end; r++)
            if (v->targets[r] >= 0) { /* log-sum-exp in double: finite however small p[target] is */
                const float *l = logits + (size_t)r * E;
                double max = l[0], sum = 0.0;
                for (e = 1; e < E; e++) max = l[e] > max ? l[e] : max;
                for (e = 0; e < E; e++) sum += exp(l[e] - max);
                part[v->group[r]] += max + log(sum) - l[v->targets[r]];
            }
        FM__OMP_ORDERED
        for (j = 0; j < c->groups; j++) sums[j] += part[j];
    }
    FM__TRACE_END("router_ce");
    *value = 0.0f;
    for (g = 0; g < c->groups; g++)
        if (counts[g]) *value += (float)(sums[g] / counts[g]);
    if (d_routing)
        FM__FOR_ROW_CHUNKS(T, r0, n, {
            int r;
            int j;
            kernels->softmax_forward(n, E, logits + (size_t)r0 * E, E, d_routing + (size_t)r0 * E, E);
            for (r = r0; r < r0 + n; r++) {
                float *d = d_routing + (size_t)r * E;
                const float count = (float)counts[v->group[r]];
                if (v->targets[r] < 0) {
                    memset(d, 0, (size_t)E * sizeof(float));
                    continue;
                }
                for (j = 0; j < E; j++) d[j] /= count;
                d[v->targets[r]] -= 1.0f / count;
            }
        });
}

/* The gate-loss terms, and with d_* given their gradients scaled by `weight`. */
static void fm__moe_gate_loss(const fm__moe_config *c, const fm_moe_batch *batch, const fm__moe_views *v,
                              float weight, float *router_ce, float *balance, float *d_routing, float *d_importance,
                              float *d_load) {
    const int E = c->experts, T = batch->tokens;
    float cv = 0.0f; /* fm_cv_squared cannot fail here (E is a checked expert count) */
    size_t i;
    int g;
    fm__moe_router_ce(c, T, fm__moe_routing_logits(c, batch, v), v, router_ce, d_routing);
    *balance = 0.0f;
    if (c->gate != FM_GATE_CONFIDENCE)
        for (g = 0; g < c->groups; g++) {
            fm_cv_squared(E, v->importance + (size_t)g * E, &cv, d_importance ? d_importance + (size_t)g * E : NULL);
            *balance += cv;
            fm_cv_squared(E, v->load + (size_t)g * E, &cv, d_load ? d_load + (size_t)g * E : NULL);
            *balance += cv;
        }
    if (d_routing)
        for (i = 0; i < (size_t)T * E; i++) d_routing[i] *= weight;
    if (d_importance)
        for (i = 0; i < (size_t)c->groups * E; i++) d_importance[i] *= weight, d_load[i] *= weight;
}

/* The experts' outputs in slot order (tokens x top_k x dim); a dropped slot's is zero. */
static void fm__moe_slot_outputs(const fm__moe_config *c, int tokens, const fm__moe_views *v, float *h) {
    const size_t D = (size_t)c->dim;
    int i;
    for (i = 0; i < tokens * c->top_k; i++) {
        if (v->position[i] >= 0) memcpy(h + (size_t)i * D, v->ye + (size_t)v->position[i] * D, D * sizeof(float));
        else memset(h + (size_t)i * D, 0, D * sizeof(float));
    }
}

fm_status fm_moe_forward(const fm_moe_desc *desc, const fm_moe_params *params, const fm_moe_batch *batch,
                         float *y, int ldy, void *saved, void *workspace, fm_moe_stats *stats) {
    static const char caller[] = "fm_moe_forward";
    const fm__kernel_table *kernels;
    fm__moe_config c;
    fm__moe_views v;
    fm_routing_plan plan;
    fm_plan_desc plan_desc;
    fm_status status;
    size_t gate_bytes;
    int T, E, K, D, ldx, t, i;
    if ((status = fm__moe_config_of(caller, desc, &c)) != FM_OK) return status;
    if ((status = fm__moe_check_call(caller, &c, params, batch, y, ldy, workspace)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    T = batch->tokens, E = c.experts, K = c.top_k, D = c.dim, ldx = batch->ldx ? batch->ldx : D, ldy = ldy ? ldy : D;
    gate_bytes = 0;
    fm__moe_workspace_layout(&c, T, (unsigned char *)workspace, &v, &gate_bytes);
    fm__moe_saved_layout(&c, T, saved ? (unsigned char *)saved : (unsigned char *)workspace + gate_bytes, saved != NULL, &v);
    v.header->magic = 0; /* valid again only once the forward has succeeded */
    for (t = 0; t < T; t++) {
        const int32_t comb = batch->combination ? batch->combination[t] : 0;
        v.targets[t] = comb > 0 ? comb % E : -1;
        v.group[t] = batch->token_group ? batch->token_group[t] : comb > 0 && c.groups > 1;
    }
    FM__FOR_ROW_CHUNKS(T, r0, n,
                       fm__gate_logits(kernels, n, D, E, batch->x + (size_t)r0 * ldx, ldx, params->w_gate,
                                       c.gate == FM_GATE_NOISY_TOPK && batch->training ? params->w_noise : NULL,
                                       v.clean + (size_t)r0 * E, E, v.noise ? v.noise + (size_t)r0 * E : NULL, E));
    if (c.gate == FM_GATE_NOISY_TOPK) {
        const fm_gate_desc gd = fm__moe_gate_desc(&c, batch);
        const fm_gate_tensors gt = fm__moe_gate_tensors(&c, batch, &v);
        /* with saved buffers, the backward's d_clean (T x E floats) is free for the sums' partials:
         * ceil(T / FM__ROW_CHUNK) x 2 x groups x E fit once there are two chunks */
        float *partials = saved && T > FM__ROW_CHUNK ? v.d_clean : NULL;
        if ((status = fm__noisy_gate_forward(&gd, &gt, partials)) != FM_OK) return status;
    } else {
        if ((status = fm_softmax_topk_forward(T, E, K, c.renormalize, v.clean, E, v.indices, K, v.gates, K)) != FM_OK)
            return status;
        memset(v.importance, 0, (size_t)c.groups * E * sizeof(float));
        memset(v.load, 0, (size_t)c.groups * E * sizeof(float));
        for (t = 0; t < T; t++)
            for (i = 0; i < K; i++) {
                const size_t at = (size_t)v.group[t] * E + v.indices[(size_t)t * K + i];
                v.importance[at] += v.gates[(size_t)t * K + i];
                v.load[at] += 1.0f;
            }
    }
    memset(&plan_desc, 0, sizeof plan_desc);
    plan_desc.tokens = T, plan_desc.top_k = K, plan_desc.experts = E;
    plan_desc.capacity_factor = c.capacity_factor, plan_desc.drop_policy = c.drop_policy;
    v.header->rows = v.header->dropped = 0;
    plan = fm__moe_plan(&c, T, &v);
    if ((status = fm_routing_plan_build(&plan_desc, v.indices, K, v.gates, K, &plan)) != FM_OK) return status;
    v.header->rows = plan.rows, v.header->dropped = plan.dropped;
    if (plan.rows > 0) {
        const fm_expert_ffn_desc fd = fm__moe_ffn_desc(&c);
        fm_expert_ffn_params fp;
        fp.w1 = params->w1, fp.b1 = params->b1, fp.w2 = params->w2, fp.b2 = params->b2;
        if ((status = fm_dispatch_forward(&plan, D, batch->x, ldx, v.xe, D)) != FM_OK) return status;
        if ((status = fm_expert_ffn_forward(&fd, v.offsets, &fp, v.xe, D, v.ye, D, v.hidden, c.hidden, v.pre,
                                            c.hidden)) != FM_OK)
            return status;
    }
    if (c.gate == FM_GATE_CONFIDENCE) {
        const fm_confsmoe_desc cd = fm__moe_confsmoe_desc(&c, T);
        float losses[2] = {0.0f, 0.0f};
        fm__moe_slot_outputs(&c, T, &v, v.h_slots);
        if ((status = fm_confsmoe_forward(&cd, &params->confidence, v.indices, batch->labels, batch->x, ldx, v.h_slots,
                                          D, y, ldy, NULL, NULL, batch->labels ? losses : NULL, v.conf_saved)) != FM_OK)
            return status;
        if (stats) stats->confidence_loss = losses[0], stats->probe_loss = losses[1];
    } else {
        if (plan.rows > 0) {
            if ((status = fm_combine_forward(&plan, D, v.ye, D, v.gates, K, y, ldy)) != FM_OK) return status;
        } else {
            for (t = 0; t < T; t++) memset(y + (size_t)t * ldy, 0, (size_t)D * sizeof(float));
        }
        if (stats) stats->confidence_loss = stats->probe_loss = 0.0f;
    }
    v.header->tokens = T, v.header->training = batch->training != 0, v.header->gate = (int)c.gate;
    v.header->experts = E, v.header->top_k = K, v.header->dim = D, v.header->hidden = c.hidden;
    v.header->magic = saved ? FM__MOE_MAGIC : 0;
    if (stats) {
        if (stats->slot_outputs) fm__moe_slot_outputs(&c, T, &v, stats->slot_outputs);
        if (stats->expert_rows) memcpy(stats->expert_rows, v.counts, (size_t)E * sizeof(int32_t));
        if (stats->expert_dropped) memcpy(stats->expert_dropped, v.dropped, (size_t)E * sizeof(int32_t));
        if (stats->indices) memcpy(stats->indices, v.indices, (size_t)T * K * sizeof(int32_t));
        stats->rows = plan.rows, stats->dropped = plan.dropped;
        fm__moe_gate_loss(&c, batch, &v, 0.0f, &stats->router_ce, &stats->balance, NULL, NULL, NULL);
        stats->gate_loss = stats->router_ce + stats->balance;
    }
    return FM_OK;
}

/* rows x cols of dst += src. */
static void fm__add_rows(const fm__kernel_table *kernels, int rows, int cols, const float *src, int lds, float *dst,
                         int ldd) {
    int r;
    for (r = 0; r < rows; r++) kernels->axpy(cols, 1.0f, src + (size_t)r * lds, dst + (size_t)r * ldd);
}

fm_status fm_moe_backward(const fm_moe_desc *desc, const fm_moe_params *params, const fm_moe_batch *batch,
                          void *saved, const float *dy, int lddy, const fm_moe_loss_weights *weights, float *dx,
                          int lddx, const fm_moe_grads *grads, void *workspace) {
    static const char caller[] = "fm_moe_backward";
    fm_moe_grads no_grads;
    fm_moe_loss_weights no_weights;
    const fm__kernel_table *kernels;
    fm__moe_config c;
    fm__moe_views v;
    fm_routing_plan plan;
    fm_status status;
    size_t gate_bytes;
    int T, E, K, D, H, ldx, t, i, with_loss;
    float ce, balance;
    memset(&no_grads, 0, sizeof no_grads);
    memset(&no_weights, 0, sizeof no_weights);
    if (!grads) grads = &no_grads;
    if (!weights) weights = &no_weights;
    with_loss = weights->gate != 0.0f;
    if ((status = fm__moe_config_of(caller, desc, &c)) != FM_OK) return status;
    if ((status = fm__moe_check_call(caller, &c, params, batch, dx, lddx, workspace)) != FM_OK) return status;
    if (!saved) return FM_ERR_NULL_POINTER;
    T = batch->tokens, E = c.experts, K = c.top_k, D = c.dim, H = c.hidden;
    ldx = batch->ldx ? batch->ldx : D, lddx = lddx ? lddx : D, lddy = lddy ? lddy : D;
    if ((status = fm__check_matrix(dy, T, D, lddy)) != FM_OK) return status;
    if (!(weights->gate == weights->gate && weights->confidence == weights->confidence && weights->probe == weights->probe))
        return FM_ERR_INVALID_ARGUMENT;
    fm__moe_workspace_layout(&c, T, (unsigned char *)workspace, &v, &gate_bytes);
    fm__moe_saved_layout(&c, T, (unsigned char *)saved, 1, &v);
    if (v.header->magic != FM__MOE_MAGIC || v.header->tokens != T || v.header->training != (batch->training != 0) ||
        v.header->gate != (int)c.gate || v.header->experts != E || v.header->top_k != K || v.header->dim != D ||
        v.header->hidden != H || v.header->rows < 0 || v.header->rows > T * K) {
        fm__log(FM_LOG_ERROR, "%s: `saved` holds no forward of this desc and batch (run fm_moe_forward with it first)",
                caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    plan = fm__moe_plan(&c, T, &v);
    /* combine: the experts' output gradients and the gates' */
    if (c.gate == FM_GATE_CONFIDENCE) {
        const fm_confsmoe_desc cd = fm__moe_confsmoe_desc(&c, T);
        if ((status = fm_confsmoe_backward(&cd, &params->confidence, v.indices, batch->labels, batch->x, ldx, v.h_slots, D,
                                           dy, lddy, weights->confidence, weights->probe, v.conf_saved, v.dx_residual, D,
                                           v.dh, D, &grads->confidence)) != FM_OK)
            return status;
        for (i = 0; i < T * K; i++)
            if (v.position[i] >= 0)
                memcpy(v.dye + (size_t)v.position[i] * D, v.dh + (size_t)i * D, (size_t)D * sizeof(float));
    } else if (plan.rows > 0) {
        if ((status = fm_combine_backward(&plan, D, v.ye, D, v.gates, K, dy, lddy, v.dye, D, v.d_gates, K)) != FM_OK)
            return status;
    } else {
        memset(v.d_gates, 0, (size_t)T * K * sizeof(float));
    }
    if (weights->d_slot_outputs) /* the caller's use of the slot outputs */
        for (i = 0; i < T * K; i++)
            if (v.position[i] >= 0)
                kernels->axpy(D, 1.0f, weights->d_slot_outputs + (size_t)i * D, v.dye + (size_t)v.position[i] * D);
    /* the experts, then back to the tokens */
    {
        const fm_expert_ffn_desc fd = fm__moe_ffn_desc(&c);
        fm_expert_ffn_params fp;
        fm_expert_ffn_grads fg;
        fp.w1 = params->w1, fp.b1 = params->b1, fp.w2 = params->w2, fp.b2 = params->b2;
        fg.w1 = grads->w1, fg.b1 = grads->b1, fg.w2 = grads->w2, fg.b2 = grads->b2;
        /* W1^T and W2^T once per call: dH and dx then run on the forward's loops */
        fm__transpose_packed(kernels, E, D, H, params->w1, v.w1_t);
        fm__transpose_packed(kernels, E, H, D, params->w2, v.w2_t);
        if ((status = fm__expert_ffn_backward(&fd, v.offsets, &fp, v.w1_t, v.w2_t, v.xe, D, v.pre, H, v.hidden, H, v.dye, D,
                                              v.dxe, D, &fg, v.d_hidden, H)) != FM_OK)
            return status;
    }
    if (plan.rows > 0) {
        if ((status = fm_dispatch_backward(&plan, D, v.dxe, D, dx, lddx)) != FM_OK) return status;
    } else {
        for (t = 0; t < T; t++) memset(dx + (size_t)t * lddx, 0, (size_t)D * sizeof(float));
    }
    if (c.gate == FM_GATE_CONFIDENCE) fm__add_rows(kernels, T, D, v.dx_residual, D, dx, lddx);
    /* the gate: its loss, the gates' softmax, the logits */
    if (with_loss)
        fm__moe_gate_loss(&c, batch, &v, weights->gate, &ce, &balance, v.d_routing, v.d_importance, v.d_load);
    if (c.gate == FM_GATE_NOISY_TOPK) {
        const fm_gate_desc gd = fm__moe_gate_desc(&c, batch);
        const fm_gate_tensors gt = fm__moe_gate_tensors(&c, batch, &v);
        fm_gate_gradients gg;
        memset(&gg, 0, sizeof gg);
        gg.d_gates = v.d_gates, gg.ld_d_gates = K;
        gg.d_importance = with_loss ? v.d_importance : NULL, gg.d_load = with_loss ? v.d_load : NULL;
        gg.d_noisy_logits = with_loss ? v.d_routing : NULL, gg.ld_d_noisy = E;
        gg.d_clean_logits = v.d_clean, gg.ld_d_clean = E;
        gg.d_noise_logits = batch->training ? v.d_noise : NULL, gg.ld_d_noise = E;
        if ((status = fm_noisy_gate_backward(&gd, &gt, &gg)) != FM_OK) return status;
    } else if (c.gate == FM_GATE_SOFTMAX_TOPK) {
        if (with_loss) /* the gates' gradient from importance, then through the softmax */
            for (t = 0; t < T; t++)
                for (i = 0; i < K; i++)
                    v.d_gates[(size_t)t * K + i] += v.d_importance[(size_t)v.group[t] * E + v.indices[(size_t)t * K + i]];
        if ((status = fm_softmax_topk_backward(T, E, K, c.renormalize, v.clean, E, v.indices, K, v.gates, K, v.d_gates,
                                               K, v.d_clean, E)) != FM_OK)
            return status;
        if (with_loss) kernels->axpy(T * E, 1.0f, v.d_routing, v.d_clean);
    } else if (with_loss) {
        memcpy(v.d_clean, v.d_routing, (size_t)T * E * sizeof(float));
    } else { /* the confidence gate's router without the S-Router term: no gradient reaches it */
        if (grads->w_gate) memset(grads->w_gate, 0, (size_t)D * E * sizeof(float));
        if (grads->w_noise) memset(grads->w_noise, 0, (size_t)D * E * sizeof(float));
        return FM_OK;
    }
    {
        const int with_noise = c.gate == FM_GATE_NOISY_TOPK && batch->training;
        FM__FOR_ROW_CHUNKS(T, r0, n,
                           fm__gate_logits_backward(kernels, n, D, E, NULL, ldx, params->w_gate,
                                                    with_noise ? params->w_noise : NULL, v.d_clean + (size_t)r0 * E, E,
                                                    with_noise ? v.d_noise + (size_t)r0 * E : NULL, E,
                                                    dx + (size_t)r0 * lddx, lddx, 1, NULL, NULL));
        /* dW = x^T dlogits over the tokens in depth blocks, the experts' d_hidden (done with) the scratch */
        if (grads->w_gate)
            fm__gemm_split_depth(kernels, D, T, E, batch->x, 1, ldx, v.d_clean, E, 1, grads->w_gate, E, v.d_hidden,
                                 (size_t)T * K * H);
        if (grads->w_noise && with_noise)
            fm__gemm_split_depth(kernels, D, T, E, batch->x, 1, ldx, v.d_noise, E, 1, grads->w_noise, E, v.d_hidden,
                                 (size_t)T * K * H);
        if (grads->w_noise && !with_noise) memset(grads->w_noise, 0, (size_t)D * E * sizeof(float));
    }
    return FM_OK;
}

/* ==== 16. The Flex-MoE model =============================================================== */

int fm_combination_count(int modalities) {
    return modalities >= 1 && modalities <= 30 ? (int)((1u << modalities) - 1u) : 0;
}

static int fm__popcount(uint32_t v) {
    int n = 0;
    for (; v; v &= v - 1) n++;
    return n;
}

/* Masks of one size in lexicographic order of their sorted positions: the order of
 * itertools.combinations(range(M), r). a < b in that order iff the lowest bit where they differ
 * belongs to a. */
static int fm__mask_before(uint32_t a, uint32_t b) {
    const uint32_t differ = a ^ b;
    return differ && (a & differ & (~differ + 1u)) != 0;
}

int fm_combination_index(int modalities, uint32_t mask) {
    uint32_t other;
    int index = 0, size;
    if (!fm_combination_count(modalities) || mask == 0 || mask >> modalities) return -1;
    size = fm__popcount(mask);
    for (other = 1; other < (1u << modalities); other++) {
        const int other_size = fm__popcount(other);
        if (other_size > size || (other_size == size && fm__mask_before(other, mask))) index++;
    }
    return index;
}

uint32_t fm_combination_mask(int modalities, int index) {
    uint32_t mask;
    if (index < 0 || index >= fm_combination_count(modalities)) return 0;
    for (mask = 1; mask < (1u << modalities); mask++)
        if (fm_combination_index(modalities, mask) == index) return mask;
    return 0;
}

/* The counter-based streams: one 64-bit hash of (seed, step, purpose, index). */
enum { FM__STREAM_INIT = 1, FM__STREAM_DROPOUT_ATTENTION, FM__STREAM_DROPOUT_MOE, FM__STREAM_NOISE };

static uint64_t fm__mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t fm__stream(uint64_t seed, uint64_t step, int purpose, uint64_t index) {
    return fm__mix64(fm__mix64(fm__mix64(seed + 0x9E3779B97F4A7C15ull) ^ (step * 0xD1B54A32D192ED03ull + (uint64_t)purpose)) ^
                     (index + 1) * 0x9E3779B97F4A7C15ull);
}

/* Uniform in [0, 1), 24 bits. */
static float fm__stream_uniform(uint64_t seed, uint64_t step, int purpose, uint64_t index) {
    return (float)(fm__stream(seed, step, purpose, index) >> 40) * 0x1p-24f;
}

uint64_t fm_model_noise_seed(const fm_model_batch *batch) {
    return batch ? fm__stream(batch->seed, batch->step, FM__STREAM_NOISE, 0) : 0;
}

/* The activations of one batch and the scratch of the backward, views into one block. */
struct fm__model_state {
    int samples, forward_done;
    fm_moe_desc moe;
    fm_moe_sizes moe_sizes;
    float *x0, *ln1, *mean1, *rstd1, *q, *kv, *probs, *context, *attention, *x1;
    float *chunk_in, *chunk_ln, *mean2, *rstd2, *chunk_out, *x2, *pooled, *logits_probs;
    float *patches[FLEXMOE_MODEL_MAX_MODALITIES];
    int32_t *combination, *token_combination, *token_group, *token_label;
    int32_t *expert_indices; /* each token's top_k experts in the last forward (fm_model_routing) */
    unsigned char *moe_saved, *moe_workspace;
    uint8_t *keep_attention, *keep_moe; /* the dropout masks of the last training forward */
    /* the second imputation stage: the slot outputs (R x k x d); for the missing tokens their mean
     * slot output, query q, q Wk^T, the kept weights' sum of slot outputs, y + z (R x d each) and
     * its LayerNorm's statistics (R), their attention weights before and after the top fraction
     * (R x max_keys); and the backward's scratch */
    float *slots, *imp_mean_slot, *imp_q, *imp_qk, *imp_mix, *imp_pre, *imp_mean, *imp_rstd, *imp_probs, *imp_kept;
    float *d_slots, *d_imp_rows, *d_imp_scores, *imp_select, *d_imp_norm;
    float *d_x, *d_tmp, *d_q, *d_kv, *d_probs, *d_context, *d_chunk, *d_pooled, *d_logits;
    float loss_weight_sum;
};

static const char *fm__model_field_error(const fm_model_desc *d) {
    int m;
    if (d->modalities < 1 || d->modalities > FLEXMOE_MODEL_MAX_MODALITIES) return "modalities must be 1 .. 8";
    for (m = 0; m < d->modalities; m++)
        if (d->features[m] < 1 || d->features[m] > (1 << 24)) return "every features[m] must be 1 .. 2^24";
    if (d->classes < 2 || d->classes > (1 << 20)) return "classes must be 2 .. 2^20";
    if (d->patches < 0 || d->patches > 4096) return "patches must be 0 (16) .. 4096";
    if (d->dim < 0 || d->dim > 65536) return "dim must be 0 (128) .. 65536";
    if (d->heads < 0 || (d->dim ? d->dim : 128) % (d->heads ? d->heads : 4) != 0) return "heads must divide dim";
    if (d->experts < 0 || d->experts > FLEXMOE_GATE_MAX_EXPERTS) return "experts must be 0 (16) .. 1024";
    if (d->top_k < 0 || d->top_k > FLEXMOE_GATE_MAX_TOP_K || (d->top_k ? d->top_k : 4) > (d->experts ? d->experts : 16))
        return "top_k must be 0 (4) .. min(experts, 16)";
    if (d->hidden < 0 || d->hidden > 1 << 20) return "hidden must be 0 (2 * dim) .. 2^20";
    if (!(d->dropout < 1.0f)) return "dropout must be below 1 (negative: none)";
    if (!(d->gate_loss_weight == d->gate_loss_weight) || d->gate_loss_weight > 1e30f) return "gate_loss_weight must be finite";
    if (!(d->layernorm_eps >= 0.0f) || d->layernorm_eps > 1.0f) return "layernorm_eps must be 0 (1e-5) .. 1";
    if (d->gate != FM_GATE_NOISY_TOPK && d->gate != FM_GATE_CONFIDENCE)
        return "gate must be FM_GATE_NOISY_TOPK (0) or FM_GATE_CONFIDENCE";
    if (d->confidence != FM_CONF_TOKEN && d->confidence != FM_CONF_EXPERT_MEAN)
        return "confidence must be FM_CONF_TOKEN (0) or FM_CONF_EXPERT_MEAN";
    if (d->imputation != FM_IMPUTE_BANK && d->imputation != FM_IMPUTE_ZERO && d->imputation != FM_IMPUTE_FEATURES &&
        d->imputation != FM_IMPUTE_TWO_STAGE)
        return "imputation must be FM_IMPUTE_BANK (0), FM_IMPUTE_ZERO, FM_IMPUTE_FEATURES or FM_IMPUTE_TWO_STAGE";
    if (!(d->impute_keep >= 0.0f && d->impute_keep <= 1.0f)) return "impute_keep must be 0 (1/4) .. 1";
    return NULL;
}

static fm_model_desc fm__model_config(const fm_model_desc *d) {
    fm_model_desc c = *d;
    if (!c.patches) c.patches = 16;
    if (!c.dim) c.dim = 128;
    if (!c.heads) c.heads = 4;
    if (!c.experts) c.experts = 16;
    if (!c.top_k) c.top_k = 4;
    if (!c.hidden) c.hidden = 2 * c.dim;
    if (c.dropout == 0.0f) c.dropout = 0.5f; /* a negative value (none) stays, so the config round-trips */
    if (c.gate_loss_weight == 0.0f) c.gate_loss_weight = 0.01f;
    if (c.layernorm_eps == 0.0f) c.layernorm_eps = 1e-5f;
    if (c.impute_keep == 0.0f) c.impute_keep = 0.25f;
    return c;
}

static float fm__model_dropout(const fm_model_desc *c) { return c->dropout > 0.0f ? c->dropout : 0.0f; }
static float fm__model_gate_weight(const fm_model_desc *c) { return c->gate_loss_weight > 0.0f ? c->gate_loss_weight : 0.0f; }

static int fm__patch_width(const fm_model_desc *c, int m) { return (c->features[m] + c->patches - 1) / c->patches; }

/* Whether a missing modality's imputed features are encoded (ConfSMoE's first stage). */
static int fm__encodes_imputed(const fm_model_desc *c) {
    return c->imputation == FM_IMPUTE_FEATURES || c->imputation == FM_IMPUTE_TWO_STAGE;
}

/* The most keys a token of a missing modality attends over in the second stage: the slots of the
 * other modalities' tokens (0 without the second stage). */
static size_t fm__impute_max_keys(const fm_model_desc *c) {
    return c->imputation == FM_IMPUTE_TWO_STAGE ? (size_t)(c->modalities - 1) * c->patches * c->top_k : 0;
}

static void fm__model_add_tensor(fm_model *model, const char *name, int rank, const int *shape, int packed) {
    fm_tensor_info *t = &model->tensors[model->tensor_count++];
    size_t floats = 1;
    int i;
    snprintf(t->name, sizeof t->name, "%s", name);
    t->rank = rank;
    for (i = 0; i < 4; i++) t->shape[i] = i < rank ? shape[i] : 0;
    for (i = 0; i < rank; i++) floats *= (size_t)shape[i];
    if (packed) floats = (size_t)shape[0] * fm_packed_weight_floats(shape[1], shape[2]);
    t->offset = model->param_floats;
    t->floats = floats;
    t->packed = packed;
    model->param_floats += (floats + 15) / 16 * 16; /* every tensor on a 64-byte boundary */
}

static void fm__model_layout(fm_model *model) {
    const fm_model_desc *c = &model->config;
    const int M = c->modalities, P = c->patches, d = c->dim, E = c->experts, H = c->hidden;
    char name[32];
    int m;
    for (m = 0; m < M; m++) {
        const int w[2] = {fm__patch_width(c, m), d};
        snprintf(name, sizeof name, "encoder.%d.weight", m);
        fm__model_add_tensor(model, name, 2, w, 0);
        snprintf(name, sizeof name, "encoder.%d.bias", m);
        fm__model_add_tensor(model, name, 1, &d, 0);
    }
    {
        const int bank[4] = {fm_combination_count(M), M, P, d}, position[2] = {M * P, d}, qw[2] = {d, d},
                  kvw[2] = {d, 2 * d}, gate[2] = {d, E}, w1[3] = {E, d, H}, b1[2] = {E, H}, w2[3] = {E, H, d},
                  b2[2] = {E, d}, head[2] = {M * d, c->classes};
        if (c->imputation == FM_IMPUTE_BANK) fm__model_add_tensor(model, "bank", 4, bank, 0);
        fm__model_add_tensor(model, "position", 2, position, 0);
        fm__model_add_tensor(model, "attention.norm.weight", 1, &d, 0);
        fm__model_add_tensor(model, "attention.norm.bias", 1, &d, 0);
        fm__model_add_tensor(model, "attention.q.weight", 2, qw, 0);
        fm__model_add_tensor(model, "attention.kv.weight", 2, kvw, 0);
        fm__model_add_tensor(model, "attention.out.weight", 2, qw, 0);
        fm__model_add_tensor(model, "attention.out.bias", 1, &d, 0);
        fm__model_add_tensor(model, "moe.norm.weight", 1, &d, 0);
        fm__model_add_tensor(model, "moe.norm.bias", 1, &d, 0);
        fm__model_add_tensor(model, "moe.gate.weight", 2, gate, 0);
        if (c->gate == FM_GATE_NOISY_TOPK) fm__model_add_tensor(model, "moe.noise.weight", 2, gate, 0);
        fm__model_add_tensor(model, "moe.w1", 3, w1, 1);
        fm__model_add_tensor(model, "moe.b1", 2, b1, 0);
        fm__model_add_tensor(model, "moe.w2", 3, w2, 1);
        fm__model_add_tensor(model, "moe.b2", 2, b2, 0);
        if (c->imputation == FM_IMPUTE_TWO_STAGE) {
            fm__model_add_tensor(model, "moe.impute.q.weight", 2, qw, 0);
            fm__model_add_tensor(model, "moe.impute.kv.weight", 2, kvw, 0);
            fm__model_add_tensor(model, "moe.impute.norm.weight", 1, &d, 0);
            fm__model_add_tensor(model, "moe.impute.norm.bias", 1, &d, 0);
        }
        if (c->gate == FM_GATE_CONFIDENCE) {
            const int w[2] = {E, d}, probe_w[3] = {E, c->classes, d}, probe_b[2] = {E, c->classes};
            fm__model_add_tensor(model, "moe.confidence.w", 2, w, 0);
            fm__model_add_tensor(model, "moe.confidence.b", 1, &E, 0);
            fm__model_add_tensor(model, "moe.confidence.norm.weight", 1, &d, 0);
            fm__model_add_tensor(model, "moe.confidence.norm.bias", 1, &d, 0);
            fm__model_add_tensor(model, "moe.probe.weight", 3, probe_w, 0);
            fm__model_add_tensor(model, "moe.probe.bias", 2, probe_b, 0);
        }
        fm__model_add_tensor(model, "head.weight", 2, head, 0);
        fm__model_add_tensor(model, "head.bias", 1, &c->classes, 0);
    }
}

const fm_tensor_info *fm_model_tensor(const fm_model *model, const char *name) {
    int i;
    if (!model || !name) return NULL;
    for (i = 0; i < model->tensor_count; i++)
        if (strcmp(model->tensors[i].name, name) == 0) return &model->tensors[i];
    return NULL;
}

/* The tensor in that arena, or NULL when this configuration has no such tensor. */
static float *fm__model_param(const fm_model *model, float *arena, const char *name) {
    const fm_tensor_info *t = fm_model_tensor(model, name);
    return t ? arena + t->offset : NULL;
}

/* The state's block: every view, 64-byte aligned, from one allocation (base NULL: only sizes). */
static size_t fm__model_state_layout(const fm_model *model, int S, fm__model_state *s, unsigned char *base) {
    const fm_model_desc *c = &model->config;
    const int M = c->modalities, N = M * c->patches, d = c->dim, heads = c->heads;
    const size_t R = (size_t)S * N, chunk_rows = (size_t)S * c->patches;
    size_t used = 0;
    int m;
#define FM__TAKE(ptr, count, type)                                                \
    do {                                                                          \
        (ptr) = base ? (type *)(void *)(base + used) : NULL;                      \
        used += ((size_t)(count) * sizeof(type) + 63) / 64 * 64;                  \
    } while (0)
    FM__TAKE(s->x0, R * d, float);
    FM__TAKE(s->ln1, R * d, float);
    FM__TAKE(s->mean1, R, float);
    FM__TAKE(s->rstd1, R, float);
    FM__TAKE(s->q, R * d, float);
    FM__TAKE(s->kv, R * 2 * d, float);
    FM__TAKE(s->probs, (size_t)S * heads * N * N, float);
    FM__TAKE(s->context, R * d, float);
    FM__TAKE(s->attention, R * d, float);
    FM__TAKE(s->x1, R * d, float);
    FM__TAKE(s->chunk_in, R * d, float);
    FM__TAKE(s->chunk_ln, R * d, float);
    FM__TAKE(s->mean2, R, float);
    FM__TAKE(s->rstd2, R, float);
    FM__TAKE(s->chunk_out, R * d, float);
    FM__TAKE(s->x2, R * d, float);
    FM__TAKE(s->pooled, (size_t)S * M * d, float);
    FM__TAKE(s->logits_probs, (size_t)S * c->classes, float);
    for (m = 0; m < M; m++) FM__TAKE(s->patches[m], chunk_rows * fm__patch_width(c, m), float);
    FM__TAKE(s->combination, S, int32_t);
    FM__TAKE(s->token_combination, R, int32_t);
    FM__TAKE(s->token_group, R, int32_t);
    FM__TAKE(s->token_label, R, int32_t);
    FM__TAKE(s->expert_indices, R * c->top_k, int32_t);
    FM__TAKE(s->moe_saved, s->moe_sizes.saved_bytes, unsigned char);
    FM__TAKE(s->moe_workspace, s->moe_sizes.workspace_bytes, unsigned char);
    FM__TAKE(s->keep_attention, R * d, uint8_t);
    FM__TAKE(s->keep_moe, R * d, uint8_t);
    {
        const size_t keys = fm__impute_max_keys(c), K = c->imputation == FM_IMPUTE_TWO_STAGE ? (size_t)c->top_k : 0,
                     stage = keys ? 1 : 0;
        FM__TAKE(s->slots, R * K * d, float);
        FM__TAKE(s->imp_mean_slot, stage * R * d, float);
        FM__TAKE(s->imp_q, stage * R * d, float);
        FM__TAKE(s->imp_qk, stage * R * d, float);
        FM__TAKE(s->imp_mix, stage * R * d, float);
        FM__TAKE(s->imp_pre, stage * R * d, float);
        FM__TAKE(s->imp_mean, stage * R, float);
        FM__TAKE(s->imp_rstd, stage * R, float);
        FM__TAKE(s->imp_probs, R * keys, float);
        FM__TAKE(s->imp_kept, R * keys, float);
        FM__TAKE(s->d_slots, R * K * d, float);
        FM__TAKE(s->d_imp_rows, stage * 4 * c->patches * d, float);
        FM__TAKE(s->d_imp_scores, (size_t)c->patches * keys, float);
        FM__TAKE(s->imp_select, keys, float);
        FM__TAKE(s->d_imp_norm, stage * 2 * d, float);
    }
    FM__TAKE(s->d_x, R * d, float);
    FM__TAKE(s->d_tmp, R * d, float);
    FM__TAKE(s->d_q, R * d, float);
    FM__TAKE(s->d_kv, R * 2 * d, float);
    FM__TAKE(s->d_probs, (size_t)S * heads * N * N, float);
    FM__TAKE(s->d_context, R * d, float);
    FM__TAKE(s->d_chunk, R * d, float);
    FM__TAKE(s->d_pooled, (size_t)S * M * d, float);
    FM__TAKE(s->d_logits, (size_t)S * c->classes, float);
#undef FM__TAKE
    return used;
}

void fm_model_destroy(fm_model *model) {
    if (!model) return;
    fm_free(model->params);
    fm_free(model->grads);
    fm_free(model->adam_m);
    fm_free(model->adam_v);
    fm_free(model->best);
    if (model->state) fm_free(model->state);
    memset(model, 0, sizeof *model);
}

fm_status fm_model_create(const fm_model_desc *desc, int max_samples, fm_model *model) {
    const char *problem;
    fm__model_state probe;
    size_t state_bytes, arena_bytes;
    fm_status status;
    if (!model) return FM_ERR_NULL_POINTER;
    memset(model, 0, sizeof *model);
    if (!desc) return FM_ERR_NULL_POINTER;
    if ((problem = fm__model_field_error(desc))) {
        fm__log(FM_LOG_ERROR, "fm_model_create: %s", problem);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (max_samples < 1 || max_samples > (1 << 20)) {
        fm__log(FM_LOG_ERROR, "fm_model_create: max_samples must be 1 .. 2^20 (got %d)", max_samples);
        return FM_ERR_INVALID_SHAPE;
    }
    {
        const fm_model_desc config = fm__model_config(desc), *c = &config;
        const double rows = (double)max_samples * c->modalities * c->patches;
        if (rows * c->dim * 4 > (double)FLEXMOE_MAX_DIM || rows * c->modalities * c->patches * c->heads > (double)FLEXMOE_MAX_DIM ||
            (double)fm_combination_count(c->modalities) * c->modalities * c->patches * c->dim > (double)FLEXMOE_MAX_DIM ||
            rows * (double)fm__impute_max_keys(c) > (double)FLEXMOE_MAX_DIM ||
            (c->imputation == FM_IMPUTE_TWO_STAGE && rows * c->top_k * c->dim > (double)FLEXMOE_MAX_DIM)) {
            fm__log(FM_LOG_ERROR, "fm_model_create: %d samples of this configuration do not fit", max_samples);
            return FM_ERR_OVERFLOW;
        }
    }
    model->config = fm__model_config(desc);
    model->max_samples = max_samples;
    fm__model_layout(model);
    memset(&probe, 0, sizeof probe);
    memset(&probe.moe, 0, sizeof probe.moe);
    probe.moe.dim = model->config.dim, probe.moe.hidden = model->config.hidden;
    probe.moe.experts = model->config.experts, probe.moe.top_k = model->config.top_k;
    probe.moe.groups = 2 * model->config.modalities; /* per chunk: full-modality tokens, the others */
    probe.moe.gate = model->config.gate, probe.moe.confidence = model->config.confidence;
    probe.moe.classes = model->config.classes, probe.moe.layernorm_eps = model->config.layernorm_eps;
    if ((status = fm_moe_buffer_sizes(&probe.moe, max_samples * model->config.modalities * model->config.patches,
                                      &probe.moe_sizes)) != FM_OK)
        return status;
    state_bytes = sizeof(fm__model_state) + fm__model_state_layout(model, max_samples, &probe, NULL) + 64;
    arena_bytes = model->param_floats * sizeof(float);
    model->params = (float *)fm_alloc(arena_bytes);
    model->grads = (float *)fm_alloc(arena_bytes);
    model->adam_m = (float *)fm_alloc(arena_bytes);
    model->adam_v = (float *)fm_alloc(arena_bytes);
    model->best = (float *)fm_alloc(arena_bytes);
    model->state = (fm__model_state *)fm_alloc(state_bytes);
    if (!model->params || !model->grads || !model->adam_m || !model->adam_v || !model->best || !model->state) {
        fm__log(FM_LOG_ERROR, "fm_model_create: out of memory (%zu bytes of arenas, %zu of activations)", 5 * arena_bytes,
                state_bytes);
        fm_model_destroy(model);
        return FM_ERR_OUT_OF_MEMORY;
    }
    memset(model->params, 0, arena_bytes);
    memset(model->grads, 0, arena_bytes);
    memset(model->adam_m, 0, arena_bytes);
    memset(model->adam_v, 0, arena_bytes);
    memset(model->best, 0, arena_bytes);
    *model->state = probe;
    fm__model_state_layout(model, max_samples, model->state,
                           (unsigned char *)model->state + (sizeof(fm__model_state) + 63) / 64 * 64);
    return FM_OK;
}

/* N(0, 1) from two uniforms of the stream (Box-Muller). */
static float fm__stream_normal(uint64_t seed, int purpose, uint64_t index) {
    const uint64_t h = fm__stream(seed, 0, purpose, index);
    const double u1 = ((double)(h >> 40) + 0.5) * 0x1p-24, u2 = (double)((h >> 16) & 0xFFFFFFu) * 0x1p-24;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

fm_status fm_model_init(fm_model *model, uint64_t seed) {
    const fm_model_desc *c;
    int i;
    if (!model || !model->params) return FM_ERR_NULL_POINTER;
    c = &model->config;
    memset(model->params, 0, model->param_floats * sizeof(float));
    memset(model->adam_m, 0, model->param_floats * sizeof(float));
    memset(model->adam_v, 0, model->param_floats * sizeof(float));
    memset(model->best, 0, model->param_floats * sizeof(float));
    memset(&model->trained, 0, sizeof model->trained);
    for (i = 0; i < model->tensor_count; i++) {
        const fm_tensor_info *t = &model->tensors[i];
        float *p = model->params + t->offset;
        const char *n = t->name;
        const size_t count = t->packed ? (size_t)t->shape[0] * t->shape[1] * t->shape[2] : t->floats;
        const uint64_t stream = seed + 0x100000000ull * (uint64_t)i; /* one stream per tensor */
        float bound = 0.0f;
        size_t j;
        if (strcmp(n, "bank") == 0) {
            for (j = 0; j < count; j++) p[j] = fm__stream_normal(stream, FM__STREAM_INIT, j);
            continue;
        }
        if (strstr(n, ".norm.weight")) {
            for (j = 0; j < count; j++) p[j] = 1.0f;
            continue;
        }
        if (strcmp(n, "position") == 0 || strstr(n, ".norm.bias") || strcmp(n, "moe.b1") == 0 || strcmp(n, "moe.b2") == 0)
            continue;
        if (strcmp(n, "moe.gate.weight") == 0 || strcmp(n, "moe.noise.weight") == 0) bound = 1.0f / sqrtf((float)c->experts);
        else if (strncmp(n, "moe.confidence.", 15) == 0 || strncmp(n, "moe.probe.", 10) == 0) bound = 1.0f / sqrtf((float)c->dim);
        else if (t->packed) bound = 1.0f / sqrtf((float)t->shape[1] * (float)t->shape[2]);
        else if (strstr(n, ".bias")) bound = 1.0f / sqrtf((float)model->tensors[i - 1].shape[0]); /* its weight's fan-in */
        else bound = 1.0f / sqrtf((float)t->shape[0]);
        if (t->packed) { /* drawn in the plain layout, then packed, so the values do not depend on the packing */
            float *plain = model->grads; /* scratch: the gradients are overwritten by every backward */
            for (j = 0; j < count; j++) plain[j] = (2.0f * fm__stream_uniform(stream, 0, FM__STREAM_INIT, j) - 1.0f) * bound;
            fm_pack_weights(t->shape[0], t->shape[1], t->shape[2], FM_WEIGHTS_IN_BY_OUT, plain, t->shape[2], p);
            memset(plain, 0, count * sizeof(float));
        } else {
            for (j = 0; j < count; j++) p[j] = (2.0f * fm__stream_uniform(stream, 0, FM__STREAM_INIT, j) - 1.0f) * bound;
        }
    }
    return FM_OK;
}

/* y (rows x out, ldy) (+)= x . W (+ bias), W plain in x out. */
static void fm__linear_forward(const fm__kernel_table *kernels, int rows, int in, int out, const float *x, int ldx,
                               const float *w, const float *bias, int accumulate, float *y, int ldy) {
    int r;
    fm__gemm_strided(kernels, rows, in, out, x, ldx, 1, w, out, 1, accumulate, y, ldy);
    if (bias)
        for (r = 0; r < rows; r++) kernels->axpy(out, 1.0f, bias, y + (size_t)r * ldy);
}

/* Its backward: dx (+)= dy . W^T (dx optional), dW (+)= x^T dy, db (+)= column sums of dy (each
 * optional). */
static void fm__linear_backward(const fm__kernel_table *kernels, int rows, int in, int out, const float *x, int ldx,
                                const float *w, const float *dy, int lddy, float *dx, int lddx, int accumulate_dx,
                                float *dw, float *db, int accumulate_dw) {
    int r;
    if (dx) fm__gemm_strided(kernels, rows, out, in, dy, lddy, 1, w, 1, out, accumulate_dx, dx, lddx);
    if (dw) fm__gemm_strided(kernels, in, rows, out, x, 1, ldx, dy, lddy, 1, accumulate_dw, dw, out);
    if (db) {
        if (!accumulate_dw) memset(db, 0, (size_t)out * sizeof(float));
        for (r = 0; r < rows; r++) kernels->axpy(out, 1.0f, dy + (size_t)r * lddy, db);
    }
}

/* Inverted dropout at a site: element i is kept unless its 24-bit uniform is below p, one draw
 * of the site's stream serving two elements (the high and the low 24 bits). keep[i] = 1 or 0. */
static void fm__dropout_draw(const fm_model_batch *b, int purpose, float p, size_t n, uint8_t *keep) {
    const uint64_t base = fm__stream(b->seed, b->step, purpose, 0);
    const uint32_t threshold = (uint32_t)ceil((double)p * 16777216.0); /* u < p exactly when the 24 bits < threshold */
    FM__FOR_SPANS(n, begin, count, {
        size_t i;
        for (i = begin; i < begin + count; i += 2) {
            const uint64_t h = fm__mix64(base ^ (i / 2 + 1) * 0xD6E8FEB86659FD93ull);
            keep[i] = (uint32_t)(h >> 40) >= threshold;
            if (i + 1 < n) keep[i + 1] = (uint32_t)(h >> 8 & 0xFFFFFFu) >= threshold;
        }
    });
}

/* v *= the kept elements' factor 1 / (1 - p), the others 0 (the values, then their gradients). */
static void fm__dropout_apply(const uint8_t *keep, float p, size_t n, float *v) {
    const float scale = 1.0f / (1.0f - p);
    FM__FOR_SPANS(n, begin, count, {
        size_t i;
        for (i = begin; i < begin + count; i++) v[i] *= keep[i] ? scale : 0.0f;
    });
}

/* Class weights (NULL: all 1): finite, >= 0, not all zero. */
static fm_status fm__check_class_weights(const char *caller, const float *weights, int classes) {
    double sum = 0.0;
    int c;
    if (!weights) return FM_OK;
    for (c = 0; c < classes; c++) {
        if (!(weights[c] >= 0.0f) || weights[c] > 3e38f) {
            fm__log(FM_LOG_ERROR, "%s: class weight %d must be finite and >= 0", caller, c);
            return FM_ERR_INVALID_ARGUMENT;
        }
        sum += weights[c];
    }
    if (!(sum > 0.0)) {
        fm__log(FM_LOG_ERROR, "%s: the class weights are all zero", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    return FM_OK;
}

static fm_status fm__model_check_batch(const char *caller, const fm_model *model, const fm_model_batch *b) {
    const fm_model_desc *c;
    int s, m;
    if (!model || !b) return FM_ERR_NULL_POINTER;
    if (!model->state) {
        fm__log(FM_LOG_ERROR, "%s: the model was not created (fm_model_create)", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    c = &model->config;
    if (b->samples < 1 || b->samples > model->max_samples) {
        fm__log(FM_LOG_ERROR, "%s: samples must be 1 .. %d (the model's max_samples), got %d", caller, model->max_samples,
                b->samples);
        return FM_ERR_INVALID_SHAPE;
    }
    if (!b->observed) return FM_ERR_NULL_POINTER;
    for (s = 0; s < b->samples; s++) {
        int any = 0;
        for (m = 0; m < c->modalities; m++) {
            const int observed = b->observed[(size_t)s * c->modalities + m] != 0;
            any |= observed;
            if ((observed || fm__encodes_imputed(c)) && !b->features[m]) {
                fm__log(FM_LOG_ERROR, "%s: sample %d %s modality %d, whose features are NULL", caller, s,
                        observed ? "observes" : "needs the imputed features of", m);
                return FM_ERR_NULL_POINTER;
            }
        }
        if (!any) {
            fm__log(FM_LOG_ERROR, "%s: sample %d observes no modality", caller, s);
            return FM_ERR_INVALID_ARGUMENT;
        }
        if (b->labels && (b->labels[s] < 0 || b->labels[s] >= c->classes)) {
            fm__log(FM_LOG_ERROR, "%s: label %d of sample %d is outside [0, %d)", caller, b->labels[s], s, c->classes);
            return FM_ERR_INVALID_ARGUMENT;
        }
    }
    return fm__check_class_weights(caller, b->class_weights, c->classes);
}

static fm_moe_params fm__model_moe_params(const fm_model *model, float *arena) {
    fm_moe_params p;
    memset(&p, 0, sizeof p);
    p.w_gate = fm__model_param(model, arena, "moe.gate.weight");
    p.w_noise = fm__model_param(model, arena, "moe.noise.weight");
    p.w1 = fm__model_param(model, arena, "moe.w1");
    p.b1 = fm__model_param(model, arena, "moe.b1");
    p.w2 = fm__model_param(model, arena, "moe.w2");
    p.b2 = fm__model_param(model, arena, "moe.b2");
    p.confidence.w = fm__model_param(model, arena, "moe.confidence.w");
    p.confidence.b = fm__model_param(model, arena, "moe.confidence.b");
    p.confidence.gamma = fm__model_param(model, arena, "moe.confidence.norm.weight");
    p.confidence.beta = fm__model_param(model, arena, "moe.confidence.norm.bias");
    p.confidence.probe_w = fm__model_param(model, arena, "moe.probe.weight");
    p.confidence.probe_b = fm__model_param(model, arena, "moe.probe.bias");
    return p;
}

/* Every chunk's tokens, chunk-major, as one batch of the SMoE layer. */
static fm_moe_batch fm__model_moe_batch(const fm_model *model, const fm_model_batch *b) {
    const fm__model_state *s = model->state;
    fm_moe_batch mb;
    memset(&mb, 0, sizeof mb);
    mb.tokens = b->samples * model->config.modalities * model->config.patches;
    mb.x = s->chunk_ln;
    mb.combination = s->token_combination;
    mb.token_group = s->token_group;
    mb.labels = model->config.gate == FM_GATE_CONFIDENCE && b->labels ? s->token_label : NULL;
    mb.training = b->training;
    mb.seed = fm_model_noise_seed(b);
    return mb;
}

/* Adam's hyperparameters with the defaults filled in, checked (a message names the caller). */
static fm_status fm__adam_hyper(const char *caller, const fm_adam_desc *desc, int64_t step, fm_adam_desc *out) {
    fm_adam_desc d = *desc;
    if (d.lr == 0.0f) d.lr = 1e-3f;
    if (d.beta1 == 0.0f) d.beta1 = 0.9f;
    if (d.beta2 == 0.0f) d.beta2 = 0.999f;
    if (d.eps == 0.0f) d.eps = 1e-8f;
    if (!(d.lr > 0.0f && d.lr < 1e30f) || !(d.beta1 >= 0.0f && d.beta1 < 1.0f) || !(d.beta2 >= 0.0f && d.beta2 < 1.0f) ||
        !(d.eps > 0.0f && d.eps < 1e30f) || !(d.weight_decay >= 0.0f && d.weight_decay < 1e30f) || step < 1) {
        fm__log(FM_LOG_ERROR, "%s: lr %g and eps %g must be positive, betas %g and %g in [0, 1), "
                "weight_decay %g >= 0 (all finite), step %lld >= 1", caller, (double)d.lr, (double)d.eps, (double)d.beta1,
                (double)d.beta2, (double)d.weight_decay, (long long)step);
        return FM_ERR_INVALID_ARGUMENT;
    }
    *out = d;
    return FM_OK;
}

fm_status fm_model_adam_step(fm_model *model, const fm_adam_desc *desc, int64_t step) {
    const fm__kernel_table *kernels;
    fm_adam_desc d;
    double correction1, correction2;
    float hyper[6];
    size_t i;
    int t;
    if (!model || !desc) return FM_ERR_NULL_POINTER;
    if (!model->params) {
        fm__log(FM_LOG_ERROR, "fm_model_adam_step: the model was not created (fm_model_create)");
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (fm__adam_hyper("fm_model_adam_step", desc, step, &d) != FM_OK) return FM_ERR_INVALID_ARGUMENT;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    if (!kernels->all_finite(model->param_floats, model->grads)) { /* name the first culprit */
        const char *name = "the padding between tensors";
        float g;
        for (i = 0; i + 1 < model->param_floats && model->grads[i] - model->grads[i] == 0.0f; i++) {}
        g = model->grads[i];
        for (t = 0; t < model->tensor_count; t++)
            if (i >= model->tensors[t].offset && i < model->tensors[t].offset + model->tensors[t].floats)
                name = model->tensors[t].name, i -= model->tensors[t].offset, t = model->tensor_count;
        fm__log(FM_LOG_ERROR, "fm_model_adam_step: step %lld: the gradient of %s is %s at element %zu; nothing updated",
                (long long)step, name, g != g ? "NaN" : "infinite", i);
        return FM_ERR_INVALID_ARGUMENT;
    }
    correction1 = 1.0 - pow((double)d.beta1, (double)step);
    correction2 = 1.0 - pow((double)d.beta2, (double)step);
    hyper[0] = d.beta1, hyper[1] = d.beta2, hyper[2] = (float)(d.lr / correction1), hyper[3] = (float)sqrt(correction2);
    hyper[4] = d.eps, hyper[5] = d.weight_decay;
    FM__FOR_SPANS(model->param_floats, begin, count,
                  kernels->adam(count, hyper, model->params + begin, model->grads + begin, model->adam_m + begin,
                                model->adam_v + begin));
    return FM_OK;
}

fm_status fm_model_dropout_mask(const fm_model *model, const fm_model_batch *b, fm_model_dropout_site site, float *mask) {
    fm_status status;
    size_t i, n;
    float p;
    if ((status = fm__model_check_batch("fm_model_dropout_mask", model, b)) != FM_OK) return status;
    if (!mask) return FM_ERR_NULL_POINTER;
    if (site != FM_DROPOUT_ATTENTION && site != FM_DROPOUT_MOE) return FM_ERR_INVALID_ARGUMENT;
    n = (size_t)b->samples * model->config.modalities * model->config.patches * model->config.dim;
    p = fm__model_dropout(&model->config);
    for (i = 0; i < n; i++) mask[i] = 1.0f;
    if (p > 0.0f) {
        uint8_t *keep = (uint8_t *)mask; /* the bytes fit in the mask's first quarter, read before overwritten */
        fm__dropout_draw(b, site == FM_DROPOUT_ATTENTION ? FM__STREAM_DROPOUT_ATTENTION : FM__STREAM_DROPOUT_MOE, p, n, keep);
        for (i = n; i-- > 0;) mask[i] = keep[i] ? 1.0f / (1.0f - p) : 0.0f;
    }
    return FM_OK;
}

/* ---- ConfSMoE's second imputation stage ---- */

/* The count-th largest of x[0..n) (1 <= count <= n), x reordered: a three-way quickselect, so
 * runs of equal values cost one pass and a NaN (never > or < anything) cannot stall it. */
static float fm__select_largest(float *x, int n, int count) {
    int lo = 0, hi = n - 1;
    const int target = count - 1;
    while (lo < hi) {
        const float pivot = x[lo + (hi - lo) / 2];
        int lt = lo, i = lo, gt = hi;
        while (i <= gt) { /* [lo, lt) > pivot, [lt, i) == pivot, (gt, hi] < pivot */
            const float v = x[i];
            if (v > pivot) x[i] = x[lt], x[lt++] = v, i++;
            else if (v < pivot) x[i] = x[gt], x[gt--] = v;
            else i++;
        }
        if (target < lt) hi = lt - 1;
        else if (target > gt) lo = gt + 1;
        else return pivot;
    }
    return x[target];
}

/* kept[j] = a[j] for the count largest of a[0..n) (ties to the lower j), else 0. */
static void fm__keep_largest(const float *a, int n, int count, float *kept, float *scratch) {
    float threshold;
    int j, ties;
    memcpy(scratch, a, (size_t)n * sizeof(float));
    threshold = fm__select_largest(scratch, n, count);
    for (ties = count, j = 0; j < n; j++) ties -= a[j] > threshold;
    for (j = 0; j < n; j++) kept[j] = a[j] > threshold || (a[j] == threshold && ties-- > 0) ? a[j] : 0.0f;
}

/* The modalities a sample observes, ascending; returns their count. */
static int fm__observed_modalities(const fm_model_desc *c, const fm_model_batch *b, int sample, int *list) {
    int m, n = 0;
    for (m = 0; m < c->modalities; m++)
        if (b->observed[(size_t)sample * c->modalities + m]) list[n++] = m;
    return n;
}

/* First token of sample i's patches in modality m's chunk (the layer's chunk-major order). */
static size_t fm__chunk_token(const fm_model_desc *c, int samples, int m, int i) {
    return ((size_t)m * samples + (size_t)i) * c->patches;
}

/* Stage two on the SMoE's output (chunk_out, chunk-major) and its slot outputs (s->slots). The
 * projections move to the query's side, which has fewer rows than the keys: q . (h_j Wk) =
 * (q Wk^T) . h_j and sum_j w_j (h_j Wv) = (sum_j w_j h_j) Wv. */
static fm_status fm__impute_forward(fm_model *model, const fm_model_batch *b, float *chunk_out) {
    fm__model_state *s = model->state;
    const fm_model_desc *c = &model->config;
    const fm__kernel_table *kernels = fm__active_kernels();
    const int S = b->samples, M = c->modalities, P = c->patches, K = c->top_k, d = c->dim, PK = P * K;
    const size_t keys_ld = fm__impute_max_keys(c);
    const float *wq = fm__model_param(model, model->params, "moe.impute.q.weight");
    const float *wkv = fm__model_param(model, model->params, "moe.impute.kv.weight");
    const float scale = 1.0f / sqrtf((float)d);
    fm_status status;
    int i, m, o, p, k, observed[FLEXMOE_MODEL_MAX_MODALITIES];
    for (i = 0; i < S; i++) {
        const int n_observed = fm__observed_modalities(c, b, i, observed), keys = n_observed * PK;
        const int count = (int)fmin(fmax(ceil((double)c->impute_keep * keys), 1.0), (double)keys);
        if (n_observed == M) continue;
        for (m = 0; m < M; m++) {
            const size_t t0 = fm__chunk_token(c, S, m, i);
            float *probs = s->imp_probs + t0 * keys_ld, *kept = s->imp_kept + t0 * keys_ld;
            float *mean = s->imp_mean_slot + t0 * d, *q = s->imp_q + t0 * d, *qk = s->imp_qk + t0 * d;
            float *mix = s->imp_mix + t0 * d, *pre = s->imp_pre + t0 * d;
            if (b->observed[(size_t)i * M + m]) continue;
            memset(mean, 0, (size_t)P * d * sizeof(float));
            for (p = 0; p < P; p++)
                for (k = 0; k < K; k++) kernels->axpy(d, 1.0f / (float)K, s->slots + ((t0 + p) * K + k) * d, mean + (size_t)p * d);
            fm__linear_forward(kernels, P, d, d, mean, d, wq, NULL, 0, q, d);
            fm__gemm_strided(kernels, P, d, d, q, d, 1, wkv, 1, 2 * d, 0, qk, d); /* q Wk^T */
            for (o = 0; o < n_observed; o++) {
                const float *h = s->slots + fm__chunk_token(c, S, observed[o], i) * K * d;
                fm__gemm_strided(kernels, P, d, PK, qk, d, 1, h, 1, d, 0, probs + (size_t)o * PK, (ptrdiff_t)keys_ld);
            }
            for (p = 0; p < P; p++)
                for (k = 0; k < keys; k++) probs[(size_t)p * keys_ld + k] *= scale;
            if ((status = fm_softmax_forward(P, keys, probs, (int)keys_ld, probs, (int)keys_ld)) != FM_OK) return status;
            for (p = 0; p < P; p++)
                fm__keep_largest(probs + (size_t)p * keys_ld, keys, count, kept + (size_t)p * keys_ld, s->imp_select);
            for (o = 0; o < n_observed; o++) {
                const float *h = s->slots + fm__chunk_token(c, S, observed[o], i) * K * d;
                fm__gemm_strided(kernels, P, PK, d, kept + (size_t)o * PK, (ptrdiff_t)keys_ld, 1, h, d, 1, o > 0, mix, d);
            }
            memcpy(pre, chunk_out + t0 * d, (size_t)P * d * sizeof(float));
            fm__gemm_strided(kernels, P, d, d, mix, d, 1, wkv + d, 2 * d, 1, 1, pre, d); /* y + z, z = mix Wv */
            if ((status = fm_layernorm_forward(P, d, pre, d, fm__model_param(model, model->params, "moe.impute.norm.weight"),
                                               fm__model_param(model, model->params, "moe.impute.norm.bias"),
                                               c->layernorm_eps, chunk_out + t0 * d, d, s->imp_mean + t0,
                                               s->imp_rstd + t0)) != FM_OK)
                return status;
        }
    }
    return FM_OK;
}

/* Its backward: d_chunk (chunk-major d(SMoE output)) becomes d(the layer's y) in place, s->d_slots
 * receives d(slot outputs), and the stage's parameter gradients are overwritten in g. */
static fm_status fm__impute_backward(fm_model *model, const fm_model_batch *b, float *d_chunk, float *g) {
    fm__model_state *s = model->state;
    const fm_model_desc *c = &model->config;
    const fm__kernel_table *kernels = fm__active_kernels();
    const int S = b->samples, M = c->modalities, P = c->patches, K = c->top_k, d = c->dim, PK = P * K;
    const size_t keys_ld = fm__impute_max_keys(c), R = (size_t)S * M * P;
    const float *wq = fm__model_param(model, model->params, "moe.impute.q.weight");
    const float *wkv = fm__model_param(model, model->params, "moe.impute.kv.weight");
    const float *gamma = fm__model_param(model, model->params, "moe.impute.norm.weight");
    float *dwq = fm__model_param(model, g, "moe.impute.q.weight"), *dwkv = fm__model_param(model, g, "moe.impute.kv.weight");
    float *dgamma = fm__model_param(model, g, "moe.impute.norm.weight"), *dbeta = fm__model_param(model, g, "moe.impute.norm.bias");
    float *d_mix = s->d_imp_rows, *d_qk = d_mix + (size_t)P * d, *d_q = d_qk + (size_t)P * d, *d_mean = d_q + (size_t)P * d;
    const float scale = 1.0f / sqrtf((float)d);
    fm_status status;
    int i, m, o, p, k, j, first = 1, observed[FLEXMOE_MODEL_MAX_MODALITIES];
    memset(s->d_slots, 0, R * K * d * sizeof(float));
    memset(dwq, 0, (size_t)d * d * sizeof(float));
    memset(dwkv, 0, (size_t)d * 2 * d * sizeof(float));
    memset(dgamma, 0, (size_t)d * sizeof(float));
    memset(dbeta, 0, (size_t)d * sizeof(float));
    for (i = 0; i < S; i++) {
        const int n_observed = fm__observed_modalities(c, b, i, observed), keys = n_observed * PK;
        if (n_observed == M) continue;
        for (m = 0; m < M; m++) {
            const size_t t0 = fm__chunk_token(c, S, m, i);
            const float *probs = s->imp_probs + t0 * keys_ld, *kept = s->imp_kept + t0 * keys_ld;
            const float *q = s->imp_q + t0 * d, *qk = s->imp_qk + t0 * d;
            float *dz = d_chunk + t0 * d, *ds = s->d_imp_scores;
            if (b->observed[(size_t)i * M + m]) continue;
            /* the LayerNorm: dz = d(y + z), which is also d y */
            if ((status = fm_layernorm_backward(P, d, s->imp_pre + t0 * d, d, gamma, s->imp_mean + t0, s->imp_rstd + t0, dz, d,
                                                dz, d, s->d_imp_norm, s->d_imp_norm + d)) != FM_OK)
                return status;
            kernels->axpy(d, 1.0f, s->d_imp_norm, dgamma);
            kernels->axpy(d, 1.0f, s->d_imp_norm + d, dbeta);
            /* z = mix Wv */
            fm__gemm_strided(kernels, P, d, d, dz, d, 1, wkv + d, 1, 2 * d, 0, d_mix, d);
            fm__gemm_strided(kernels, d, P, d, s->imp_mix + t0 * d, 1, d, dz, d, 1, !first, dwkv + d, 2 * d);
            /* mix = kept . h: d kept = d_mix . h^T, dh += kept^T d_mix */
            for (o = 0; o < n_observed; o++) {
                const size_t h0 = fm__chunk_token(c, S, observed[o], i) * K * d;
                fm__gemm_strided(kernels, P, d, PK, d_mix, d, 1, s->slots + h0, 1, d, 0, ds + (size_t)o * PK, (ptrdiff_t)keys_ld);
                fm__gemm_strided(kernels, PK, P, d, kept + (size_t)o * PK, 1, (ptrdiff_t)keys_ld, d_mix, d, 1, 1, s->d_slots + h0, d);
            }
            /* through the kept fraction (a dropped weight passes nothing) and the softmax */
            for (p = 0; p < P; p++) {
                const float *a = probs + (size_t)p * keys_ld, *kp = kept + (size_t)p * keys_ld;
                float *row = ds + (size_t)p * keys_ld, dot = 0.0f;
                for (j = 0; j < keys; j++) row[j] = kp[j] != 0.0f ? row[j] : 0.0f, dot += a[j] * row[j];
                for (j = 0; j < keys; j++) row[j] = a[j] * (row[j] - dot) * scale;
            }
            /* the scores qk . h: d qk = ds . h, dh += ds^T qk */
            for (o = 0; o < n_observed; o++) {
                const size_t h0 = fm__chunk_token(c, S, observed[o], i) * K * d;
                fm__gemm_strided(kernels, P, PK, d, ds + (size_t)o * PK, (ptrdiff_t)keys_ld, 1, s->slots + h0, d, 1, o > 0, d_qk, d);
                fm__gemm_strided(kernels, PK, P, d, ds + (size_t)o * PK, 1, (ptrdiff_t)keys_ld, qk, d, 1, 1, s->d_slots + h0, d);
            }
            /* qk = q Wk^T: dq = d_qk Wk, dWk += d_qk^T q; then q = mean Wq, the mean of the token's own slots */
            fm__gemm_strided(kernels, P, d, d, d_qk, d, 1, wkv, 2 * d, 1, 0, d_q, d);
            fm__gemm_strided(kernels, d, P, d, d_qk, 1, d, q, d, 1, !first, dwkv, 2 * d);
            fm__linear_backward(kernels, P, d, d, s->imp_mean_slot + t0 * d, d, wq, d_q, d, d_mean, d, 0, dwq, NULL, !first);
            first = 0;
            for (p = 0; p < P; p++)
                for (k = 0; k < K; k++)
                    kernels->axpy(d, 1.0f / (float)K, d_mean + (size_t)p * d, s->d_slots + ((t0 + p) * K + k) * d);
        }
    }
    return FM_OK;
}

/* y = x and y += x over n floats, in parallel spans. */
static void fm__copy_spans(size_t n, const float *x, float *y) {
    FM__FOR_SPANS(n, begin, count, memcpy(y + begin, x + begin, count * sizeof(float)));
}
static void fm__add_spans(const fm__kernel_table *kernels, size_t n, const float *x, float *y) {
    FM__FOR_SPANS(n, begin, count, kernels->axpy((int)count, 1.0f, x + begin, y + begin));
}

/* Every modality's encoder weight and bias in `arena` (the parameters or the gradients). */
static void fm__model_encoders(const fm_model *model, float *arena, float **weight, float **bias) {
    char name[32];
    int m;
    for (m = 0; m < model->config.modalities; m++) {
        snprintf(name, sizeof name, "encoder.%d.weight", m);
        weight[m] = fm__model_param(model, arena, name);
        snprintf(name, sizeof name, "encoder.%d.bias", m);
        bias[m] = fm__model_param(model, arena, name);
    }
}

/* The SMoE's chunk-major rows (modality m's chunk holds sample i's P tokens at rows (m S + i) P)
 * against the sample-major stream (the same tokens at rows i N + m P), one block of P tokens per
 * parallel item: gather copies the stream's blocks into chunks; otherwise stream = base + chunks. */
static void fm__model_chunk_blocks(const fm__kernel_table *kernels, const fm_model_desc *c, int S, float *stream,
                                   const float *base, float *chunks, int gather) {
    const int M = c->modalities, P = c->patches, N = M * P, d = c->dim;
    int item;
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < M * S; item++) {
        const int m = item / S, i = item % S;
        const size_t at = ((size_t)i * N + (size_t)m * P) * d, block = (size_t)P * d;
        FM__TRACE_ITEM("model_chunk_blocks", item, -1);
        if (gather) {
            memcpy(chunks + item * block, stream + at, block * sizeof(float));
        } else {
            if (base) memcpy(stream + at, base + at, block * sizeof(float));
            kernels->axpy((int)block, 1.0f, chunks + item * block, stream + at);
        }
    }
    FM__TRACE_END("model_chunk_blocks");
}

fm_status fm_model_forward(fm_model *model, const fm_model_batch *b, float *logits, fm_model_losses *losses) {
    static const char caller[] = "fm_model_forward";
    const fm__kernel_table *kernels;
    fm__model_state *s;
    const fm_model_desc *c;
    fm_status status;
    int S, M, P, N, d, heads, dh, C, i, m, j, item;
    size_t R;
    float scale;
    double task = 0.0, gate = 0.0, confidence = 0.0, probe_loss = 0.0, weight_sum = 0.0;
    if ((status = fm__model_check_batch(caller, model, b)) != FM_OK) return status;
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    s = model->state, c = &model->config;
    S = b->samples, M = c->modalities, P = c->patches, N = M * P, d = c->dim, heads = c->heads, dh = d / heads;
    C = c->classes, R = (size_t)S * N, scale = 1.0f / sqrtf((float)dh);
    s->forward_done = 0;
    s->samples = S;
    for (i = 0; i < S; i++) {
        uint32_t mask = 0;
        for (m = 0; m < M; m++)
            if (b->observed[(size_t)i * M + m]) mask |= 1u << m;
        s->combination[i] = fm_combination_index(M, mask);
    }
    for (m = 0; m < M; m++)
        for (i = 0; i < S; i++)
            for (j = 0; j < P; j++) {
                const size_t t = ((size_t)m * S + i) * P + j;
                s->token_combination[t] = s->combination[i];
                s->token_group[t] = 2 * m + (s->combination[i] > 0);
                s->token_label[t] = b->labels ? b->labels[i] : 0;
            }
    /* tokens: encoders for the observed modalities, the bank (or zeros) for the missing ones; + position */
    {
        const float *bank = fm__model_param(model, model->params, "bank");
        const float *position = fm__model_param(model, model->params, "position");
        float *weight[FLEXMOE_MODEL_MAX_MODALITIES], *bias[FLEXMOE_MODEL_MAX_MODALITIES];
        fm__model_encoders(model, model->params, weight, bias);
        FM__OMP_PARALLEL_FOR
        for (item = 0; item < M * S; item++) { /* one (modality, sample) block of P tokens each */
            const int m = item / S, i = item % S, width = fm__patch_width(c, m), F = c->features[m];
            float *tokens = s->x0 + ((size_t)i * N + (size_t)m * P) * d;
            float *patch = s->patches[m] + (size_t)i * P * width;
            FM__TRACE_ITEM("model_tokens", item, -1);
            if (b->observed[(size_t)i * M + m] || fm__encodes_imputed(c)) {
                memset(patch, 0, (size_t)P * width * sizeof(float));
                memcpy(patch, b->features[m] + (size_t)i * F, (size_t)F * sizeof(float));
                fm__linear_forward(kernels, P, width, d, patch, width, weight[m], bias[m], 0, tokens, d);
            } else if (bank) {
                memcpy(tokens, bank + (((size_t)s->combination[i] * M + m) * P) * d, (size_t)P * d * sizeof(float));
            } else {
                memset(tokens, 0, (size_t)P * d * sizeof(float));
            }
            kernels->axpy(P * d, 1.0f, position + (size_t)m * P * d, tokens);
        }
        FM__TRACE_END("model_tokens");
    }
    /* attention */
    if ((status = fm_layernorm_forward((int)R, d, s->x0, d, fm__model_param(model, model->params, "attention.norm.weight"),
                                       fm__model_param(model, model->params, "attention.norm.bias"), c->layernorm_eps, s->ln1,
                                       d, s->mean1, s->rstd1)) != FM_OK)
        return status;
    fm__linear_forward(kernels, (int)R, d, d, s->ln1, d, fm__model_param(model, model->params, "attention.q.weight"), NULL, 0,
                       s->q, d);
    fm__linear_forward(kernels, (int)R, d, 2 * d, s->ln1, d, fm__model_param(model, model->params, "attention.kv.weight"),
                       NULL, 0, s->kv, 2 * d);
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < S * heads; item++) { /* one (sample, head) each */
        FM__TRACE_ITEM("attention_forward", item, -1);
        const int i = item / heads, h = item % heads;
        const float *q = s->q + (size_t)i * N * d + h * dh, *k = s->kv + (size_t)i * N * 2 * d + h * dh;
        float *probs = s->probs + (size_t)item * N * N;
        int j;
        fm__gemm_strided(kernels, N, dh, N, q, d, 1, k, 1, 2 * d, 0, probs, N);
        for (j = 0; j < N * N; j++) probs[j] *= scale;
        kernels->softmax_forward(N, N, probs, N, probs, N);
        fm__gemm_strided(kernels, N, N, dh, probs, N, 1, k + d, 2 * d, 1, 0, s->context + (size_t)i * N * d + h * dh, d);
    }
    FM__TRACE_END("attention_forward");
    fm__linear_forward(kernels, (int)R, d, d, s->context, d, fm__model_param(model, model->params, "attention.out.weight"),
                       fm__model_param(model, model->params, "attention.out.bias"), 0, s->attention, d);
    fm__copy_spans(R * d, s->attention, s->x1);
    if (b->training && fm__model_dropout(c) > 0.0f) {
        fm__dropout_draw(b, FM__STREAM_DROPOUT_ATTENTION, fm__model_dropout(c), R * d, s->keep_attention);
        fm__dropout_apply(s->keep_attention, fm__model_dropout(c), R * d, s->x1);
    }
    if (!c->no_attention_residual) fm__add_spans(kernels, R * d, s->x0, s->x1);
    /* the SMoE over every chunk's rows, gathered chunk-major */
    {
        const fm_moe_params mp = fm__model_moe_params(model, model->params);
        const fm_moe_batch mb = fm__model_moe_batch(model, b);
        fm_moe_stats stats;
        memset(&stats, 0, sizeof stats);
        stats.indices = s->expert_indices;
        if (c->imputation == FM_IMPUTE_TWO_STAGE) stats.slot_outputs = s->slots;
        fm__model_chunk_blocks(kernels, c, S, s->x1, NULL, s->chunk_in, 1);
        if ((status = fm_layernorm_forward((int)R, d, s->chunk_in, d, fm__model_param(model, model->params, "moe.norm.weight"),
                                           fm__model_param(model, model->params, "moe.norm.bias"), c->layernorm_eps,
                                           s->chunk_ln, d, s->mean2, s->rstd2)) != FM_OK)
            return status;
        if ((status = fm_moe_forward(&s->moe, &mp, &mb, s->chunk_out, d, s->moe_saved, s->moe_workspace, &stats)) != FM_OK)
            return status;
        gate = stats.gate_loss, confidence = stats.confidence_loss, probe_loss = stats.probe_loss;
        if (c->imputation == FM_IMPUTE_TWO_STAGE && (status = fm__impute_forward(model, b, s->chunk_out)) != FM_OK)
            return status;
        if (b->training && fm__model_dropout(c) > 0.0f) {
            fm__dropout_draw(b, FM__STREAM_DROPOUT_MOE, fm__model_dropout(c), R * d, s->keep_moe);
            fm__dropout_apply(s->keep_moe, fm__model_dropout(c), R * d, s->chunk_out);
        }
        fm__model_chunk_blocks(kernels, c, S, s->x2, s->x1, s->chunk_out, 0);
    }
    /* head and loss */
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < S * M; item++) { /* one (sample, modality) mean each */
        float *pooled = s->pooled + (size_t)item * d;
        int token;
        FM__TRACE_ITEM("model_pool", item, -1);
        memset(pooled, 0, (size_t)d * sizeof(float));
        for (token = 0; token < P; token++) kernels->axpy(d, 1.0f / (float)P, s->x2 + ((size_t)item * P + token) * d, pooled);
    }
    FM__TRACE_END("model_pool");
    fm__linear_forward(kernels, S, M * d, C, s->pooled, M * d, fm__model_param(model, model->params, "head.weight"),
                       fm__model_param(model, model->params, "head.bias"), 0, s->logits_probs, C);
    if (logits)
        for (i = 0; i < S; i++) memcpy(logits + (size_t)i * C, s->logits_probs + (size_t)i * C, (size_t)C * sizeof(float));
    if ((status = fm_softmax_forward(S, C, s->logits_probs, C, s->logits_probs, C)) != FM_OK) return status;
    if (b->labels) {
        for (i = 0; i < S; i++) {
            const double w = b->class_weights ? b->class_weights[b->labels[i]] : 1.0;
            task -= w * log((double)s->logits_probs[(size_t)i * C + b->labels[i]]);
            weight_sum += w;
        }
        task = weight_sum > 0.0 ? task / weight_sum : 0.0;
        s->loss_weight_sum = (float)weight_sum;
        s->forward_done = 1;
    }
    if (losses) {
        losses->task = (float)task;
        losses->gate = (float)gate;
        losses->confidence = (float)confidence, losses->probe = (float)probe_loss;
        losses->loss = (float)(task + fm__model_gate_weight(c) * gate + confidence + probe_loss);
    }
    return FM_OK;
}

fm_status fm_model_backward(fm_model *model, const fm_model_batch *b) {
    static const char caller[] = "fm_model_backward";
    const fm__kernel_table *kernels;
    fm__model_state *s;
    const fm_model_desc *c;
    fm_status status;
    int S, M, P, N, d, heads, dh, C, i, m, j, item;
    size_t R;
    float *g, scale;
    if ((status = fm__model_check_batch(caller, model, b)) != FM_OK) return status;
    s = model->state, c = &model->config;
    if (!b->labels || !s->forward_done || s->samples != b->samples) {
        fm__log(FM_LOG_ERROR, "%s: needs the forward of this batch, with labels, first", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (!(kernels = fm__active_kernels())) return fm__selection_error();
    S = b->samples, M = c->modalities, P = c->patches, N = M * P, d = c->dim, heads = c->heads, dh = d / heads;
    C = c->classes, R = (size_t)S * N, scale = 1.0f / sqrtf((float)dh);
    g = model->grads;
    /* loss -> logits -> head */
    for (i = 0; i < S; i++) {
        const float w = (b->class_weights ? b->class_weights[b->labels[i]] : 1.0f) / s->loss_weight_sum;
        for (j = 0; j < C; j++)
            s->d_logits[(size_t)i * C + j] = w * (s->logits_probs[(size_t)i * C + j] - (j == b->labels[i] ? 1.0f : 0.0f));
    }
    fm__linear_backward(kernels, S, M * d, C, s->pooled, M * d, fm__model_param(model, model->params, "head.weight"),
                        s->d_logits, C, s->d_pooled, M * d, 0, fm__model_param(model, g, "head.weight"),
                        fm__model_param(model, g, "head.bias"), 0);
    /* mean pool -> x2 (the residual stream after the SMoE chunks) */
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < S * M; item++) { /* one (sample, modality) block each */
        const float *dp = s->d_pooled + (size_t)item * d;
        int token, k;
        FM__TRACE_ITEM("model_unpool", item, -1);
        for (token = 0; token < P; token++) {
            float *dx = s->d_x + ((size_t)item * P + token) * d;
            for (k = 0; k < d; k++) dx[k] = dp[k] / (float)P;
        }
    }
    FM__TRACE_END("model_unpool");
    /* the SMoE: d_x stays the residual's gradient, the branch's is added */
    {
        const fm_moe_params mp = fm__model_moe_params(model, model->params);
        const fm_moe_params gp = fm__model_moe_params(model, g);
        const fm_moe_batch mb = fm__model_moe_batch(model, b);
        fm_moe_grads mg;
        fm_moe_loss_weights weights;
        memset(&weights, 0, sizeof weights);
        weights.gate = fm__model_gate_weight(c), weights.confidence = 1.0f, weights.probe = 1.0f;
        memset(&mg, 0, sizeof mg);
        mg.w_gate = (float *)gp.w_gate, mg.w_noise = (float *)gp.w_noise, mg.w1 = (float *)gp.w1;
        mg.b1 = (float *)gp.b1, mg.w2 = (float *)gp.w2, mg.b2 = (float *)gp.b2;
        mg.confidence.w = (float *)gp.confidence.w, mg.confidence.b = (float *)gp.confidence.b;
        mg.confidence.gamma = (float *)gp.confidence.gamma, mg.confidence.beta = (float *)gp.confidence.beta;
        mg.confidence.probe_w = (float *)gp.confidence.probe_w, mg.confidence.probe_b = (float *)gp.confidence.probe_b;
        fm__model_chunk_blocks(kernels, c, S, s->d_x, NULL, s->d_chunk, 1);
        if (b->training && fm__model_dropout(c) > 0.0f) fm__dropout_apply(s->keep_moe, fm__model_dropout(c), R * d, s->d_chunk);
        if (c->imputation == FM_IMPUTE_TWO_STAGE) {
            if ((status = fm__impute_backward(model, b, s->d_chunk, g)) != FM_OK) return status;
            weights.d_slot_outputs = s->d_slots;
        }
        if ((status = fm_moe_backward(&s->moe, &mp, &mb, s->moe_saved, s->d_chunk, d, &weights, s->d_tmp, d, &mg,
                                      s->moe_workspace)) != FM_OK)
            return status;
        if ((status = fm_layernorm_backward((int)R, d, s->chunk_in, d, fm__model_param(model, model->params, "moe.norm.weight"),
                                            s->mean2, s->rstd2, s->d_tmp, d, s->d_tmp, d, fm__model_param(model, g, "moe.norm.weight"),
                                            fm__model_param(model, g, "moe.norm.bias"))) != FM_OK)
            return status;
        fm__model_chunk_blocks(kernels, c, S, s->d_x, NULL, s->d_tmp, 0);
    }
    /* attention: d_x is now d x1; the branch's gradient goes to d_tmp */
    fm__copy_spans(R * d, s->d_x, s->d_tmp);
    if (b->training && fm__model_dropout(c) > 0.0f) fm__dropout_apply(s->keep_attention, fm__model_dropout(c), R * d, s->d_tmp);
    if (c->no_attention_residual) memset(s->d_x, 0, R * d * sizeof(float));
    fm__linear_backward(kernels, (int)R, d, d, s->context, d, fm__model_param(model, model->params, "attention.out.weight"),
                        s->d_tmp, d, s->d_context, d, 0, fm__model_param(model, g, "attention.out.weight"),
                        fm__model_param(model, g, "attention.out.bias"), 0);
    FM__OMP_PARALLEL_FOR
    for (item = 0; item < S * heads; item++) { /* one (sample, head) each */
        FM__TRACE_ITEM("attention_backward", item, -1);
        const int i = item / heads, h = item % heads;
        const size_t row0 = (size_t)i * N;
        const float *q = s->q + row0 * d + h * dh, *k = s->kv + row0 * 2 * d + h * dh, *v = k + d;
        const float *probs = s->probs + (size_t)item * N * N, *dctx = s->d_context + row0 * d + h * dh;
        float *dq = s->d_q + row0 * d + h * dh, *dk = s->d_kv + row0 * 2 * d + h * dh, *dv = dk + d;
        float *d_probs = s->d_probs + (size_t)item * N * N;
        int j;
        fm__gemm_strided(kernels, N, dh, N, dctx, d, 1, v, 1, 2 * d, 0, d_probs, N);
        fm__gemm_strided(kernels, N, N, dh, probs, 1, N, dctx, d, 1, 0, dv, 2 * d);
        kernels->softmax_backward(N, N, probs, N, d_probs, N, d_probs, N);
        for (j = 0; j < N * N; j++) d_probs[j] *= scale;
        fm__gemm_strided(kernels, N, N, dh, d_probs, N, 1, k, 2 * d, 1, 0, dq, d);
        fm__gemm_strided(kernels, N, N, dh, d_probs, 1, N, q, d, 1, 0, dk, 2 * d);
    }
    FM__TRACE_END("attention_backward");
    fm__linear_backward(kernels, (int)R, d, d, s->ln1, d, fm__model_param(model, model->params, "attention.q.weight"), s->d_q, d,
                        s->d_tmp, d, 0, fm__model_param(model, g, "attention.q.weight"), NULL, 0);
    fm__linear_backward(kernels, (int)R, d, 2 * d, s->ln1, d, fm__model_param(model, model->params, "attention.kv.weight"),
                        s->d_kv, 2 * d, s->d_tmp, d, 1, fm__model_param(model, g, "attention.kv.weight"), NULL, 0);
    if ((status = fm_layernorm_backward((int)R, d, s->x0, d, fm__model_param(model, model->params, "attention.norm.weight"),
                                        s->mean1, s->rstd1, s->d_tmp, d, s->d_tmp, d,
                                        fm__model_param(model, g, "attention.norm.weight"),
                                        fm__model_param(model, g, "attention.norm.bias"))) != FM_OK)
        return status;
    fm__add_spans(kernels, R * d, s->d_tmp, s->d_x);
    /* d_x is d x0: position, bank, encoders, one modality per item: each sums its samples in order */
    {
        float *dpos = fm__model_param(model, g, "position"), *dbank = fm__model_param(model, g, "bank");
        float *dw[FLEXMOE_MODEL_MAX_MODALITIES], *db[FLEXMOE_MODEL_MAX_MODALITIES];
        const int combinations = fm_combination_count(M);
        fm__model_encoders(model, g, dw, db);
        FM__OMP_PARALLEL_FOR
        for (m = 0; m < M; m++) {
            const int width = fm__patch_width(c, m);
            const size_t block = (size_t)P * d;
            float *dpos_m = dpos + (size_t)m * block;
            int first = 1, i, combination;
            FM__TRACE_ITEM("model_tokens_backward", m, -1);
            memcpy(dpos_m, s->d_x + (size_t)m * block, block * sizeof(float));
            for (i = 1; i < S; i++) kernels->axpy((int)block, 1.0f, s->d_x + ((size_t)i * M + m) * block, dpos_m);
            if (dbank)
                for (combination = 0; combination < combinations; combination++)
                    memset(dbank + ((size_t)combination * M + m) * block, 0, block * sizeof(float));
            memset(dw[m], 0, (size_t)width * d * sizeof(float));
            memset(db[m], 0, (size_t)d * sizeof(float));
            for (i = 0; i < S; i++) {
                const float *dtokens = s->d_x + ((size_t)i * M + m) * block;
                if (b->observed[(size_t)i * M + m] || fm__encodes_imputed(c)) {
                    fm__linear_backward(kernels, P, width, d, s->patches[m] + (size_t)i * P * width, width, NULL, dtokens, d,
                                        NULL, 0, 0, dw[m], db[m], !first);
                    first = 0;
                } else if (dbank) {
                    kernels->axpy((int)block, 1.0f, dtokens, dbank + ((size_t)s->combination[i] * M + m) * block);
                }
            }
        }
        FM__TRACE_END("model_tokens_backward");
    }
    return FM_OK;
}

/* ==== 17. Multi-view data ================================================================== */

enum { FM__STREAM_MISSING = 16, FM__STREAM_SPLIT, FM__STREAM_IMPUTE = 19 };

fm_status fm_dataset_impute(fm_dataset *ds, const int32_t *pool, int count, int draws, uint64_t seed) {
    int32_t *observers;
    int v, s, i, j, k, n;
    if (!ds || !pool) return FM_ERR_NULL_POINTER;
    if (ds->samples < 1 || ds->views < 1 || ds->views > FLEXMOE_MODEL_MAX_MODALITIES || !ds->observed) {
        fm__log(FM_LOG_ERROR, "fm_dataset_impute: not a loaded dataset");
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (count < 1 || draws < 1 || draws > 1 << 20) return FM_ERR_INVALID_SHAPE;
    for (i = 0; i < count; i++)
        if (pool[i] < 0 || pool[i] >= ds->samples) return FM_ERR_INVALID_ARGUMENT;
    for (v = 0; v < ds->views; v++) { /* every view checked before any is changed */
        for (n = 0, i = 0; i < count; i++) n += ds->observed[(size_t)pool[i] * ds->views + v] != 0;
        if (n == 0) {
            fm__log(FM_LOG_ERROR, "fm_dataset_impute: no row of the pool observes view %s", ds->names[v]);
            return FM_ERR_INVALID_ARGUMENT;
        }
    }
    if (!(observers = (int32_t *)fm_alloc((size_t)count * sizeof(int32_t)))) return FM_ERR_OUT_OF_MEMORY;
    for (v = 0; v < ds->views; v++) {
        const int F = ds->features[v];
        for (n = 0, i = 0; i < count; i++)
            if (ds->observed[(size_t)pool[i] * ds->views + v]) observers[n++] = pool[i];
        for (s = 0; s < ds->samples; s++) {
            float *row = ds->values[v] + (size_t)s * F;
            if (ds->observed[(size_t)s * ds->views + v]) continue;
            for (k = 0; k < F; k++) row[k] = 0.0f;
            for (j = 0; j < draws; j++) {
                const uint64_t h = fm__stream(seed, (uint64_t)s * FLEXMOE_MODEL_MAX_MODALITIES + (uint64_t)v, FM__STREAM_IMPUTE, (uint64_t)j);
                const float *drawn = ds->values[v] + (size_t)observers[h % (uint64_t)n] * F;
                for (k = 0; k < F; k++) row[k] += drawn[k];
            }
            for (k = 0; k < F; k++) row[k] /= (float)draws;
        }
    }
    fm_free(observers);
    return FM_OK;
}

void fm_dataset_free(fm_dataset *dataset) {
    int v;
    if (!dataset) return;
    for (v = 0; v < FLEXMOE_MODEL_MAX_MODALITIES; v++) fm_free(dataset->values[v]);
    fm_free(dataset->observed);
    fm_free(dataset->labels);
    memset(dataset, 0, sizeof *dataset);
}

#ifndef FLEXMOE_NO_STDIO
/* A whole file, NUL-terminated (fm_free it); NULL with a message when it cannot be read or is
 * empty. */
static char *fm__read_file(const char *path, size_t *length, fm_status *status) {
    FILE *f = fopen(path, "rb");
    char *text = NULL;
    long size;
    *status = FM_ERR_INVALID_ARGUMENT;
    if (!f) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: cannot open %s", path);
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: cannot read %s", path);
    } else if (size == 0) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: %s is empty", path);
    } else if (!(text = (char *)fm_alloc((size_t)size + 1))) {
        *status = FM_ERR_OUT_OF_MEMORY;
    } else if (fread(text, 1, (size_t)size, f) != (size_t)size) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: cannot read %s", path);
        fm_free(text);
        text = NULL;
    } else {
        text[size] = '\0';
        *length = (size_t)size;
        *status = FM_OK;
    }
    fclose(f);
    return text;
}

/* The next line of text at *at (without its '\n' or "\r\n"), NUL-terminated in place; NULL at
 * the end (a final newline ends the last line, it does not start an empty one). */
static char *fm__next_line(char **at, char *end) {
    char *line = *at, *newline;
    if (line >= end) return NULL;
    newline = (char *)memchr(line, '\n', (size_t)(end - line));
    if (!newline) newline = end;
    *newline = '\0';
    if (newline > line && newline[-1] == '\r') newline[-1] = '\0';
    *at = newline + 1;
    return line;
}

static int fm__count_lines(const char *text, size_t length) {
    size_t i;
    int lines = 0;
    for (i = 0; i < length; i++) lines += text[i] == '\n';
    return lines + (length > 0 && text[length - 1] != '\n');
}

/* One row of comma-separated finite numbers into row[0 .. count); the number of fields read, or
 * -1 (and *bad = the offending field) for one that is not a finite number. */
static int fm__parse_row(char *line, float *row, int count, char **bad) {
    int n = 0;
    char *p = line;
    *bad = line;
    for (;;) {
        char *stop;
        float value;
        while (*p == ' ' || *p == '\t') p++;
        value = strtof(p, &stop);
        if (stop == p || !(value - value == 0.0f)) {
            *bad = p;
            return -1;
        }
        while (*stop == ' ' || *stop == '\t') stop++;
        if (n < count) row[n] = value;
        n++;
        if (*stop == '\0') return n;
        if (*stop != ',') {
            *bad = p;
            return -1;
        }
        p = stop + 1;
    }
}

static fm_status fm__load_views(const char *directory, fm_dataset *ds) {
    char path[4096], *text, *at, *line;
    size_t length;
    fm_status status;
    int number = 0;
    snprintf(path, sizeof path, "%s/views.txt", directory);
    if (!(text = fm__read_file(path, &length, &status))) return status;
    at = text;
    while ((line = fm__next_line(&at, text + length))) {
        char name[64];
        int features, used = 0;
        number++;
        if (line[0] == '\0') continue;
        if (sscanf(line, "%63s %d %n", name, &features, &used) != 2 || line[used] != '\0' || features < 1 ||
            features > (1 << 24) || strlen(name) >= sizeof ds->names[0] || strchr(name, '/')) {
            fm__log(FM_LOG_ERROR, "fm_dataset_load: %s line %d: want \"name features\" (a name of up to 31 characters "
                    "without '/', 1 .. 2^24 features), got \"%s\"", path, number, line);
            fm_free(text);
            return FM_ERR_INVALID_ARGUMENT;
        }
        if (ds->views == FLEXMOE_MODEL_MAX_MODALITIES) {
            fm__log(FM_LOG_ERROR, "fm_dataset_load: %s line %d: more than %d views", path, number, FLEXMOE_MODEL_MAX_MODALITIES);
            fm_free(text);
            return FM_ERR_INVALID_ARGUMENT;
        }
        memcpy(ds->names[ds->views], name, strlen(name) + 1); /* shorter than names[0]: checked above */
        ds->features[ds->views++] = features;
    }
    fm_free(text);
    if (ds->views == 0) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: %s lists no view", path);
        return FM_ERR_INVALID_ARGUMENT;
    }
    return FM_OK;
}

static fm_status fm__load_labels(const char *directory, fm_dataset *ds) {
    char path[4096], *text, *at, *line;
    size_t length;
    fm_status status;
    int number = 0, highest = -1;
    snprintf(path, sizeof path, "%s/labels.csv", directory);
    if (!(text = fm__read_file(path, &length, &status))) return status;
    ds->samples = fm__count_lines(text, length);
    if (!(ds->labels = (int32_t *)fm_alloc((size_t)ds->samples * sizeof(int32_t)))) {
        fm_free(text);
        return FM_ERR_OUT_OF_MEMORY;
    }
    at = text;
    while ((line = fm__next_line(&at, text + length))) {
        char *stop;
        const long label = strtol(line, &stop, 10);
        if (stop == line || *stop != '\0' || label < 0 || label >= (1 << 20)) {
            fm__log(FM_LOG_ERROR, "fm_dataset_load: %s line %d: \"%s\" is not a label (an integer 0 .. 2^20 - 1)", path,
                    number + 1, line);
            fm_free(text);
            return FM_ERR_INVALID_ARGUMENT;
        }
        ds->labels[number++] = (int32_t)label;
        if (label > highest) highest = (int)label;
    }
    fm_free(text);
    ds->classes = highest + 1;
    if (ds->classes < 2) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: %s has one class only (%d samples)", path, ds->samples);
        return FM_ERR_INVALID_ARGUMENT;
    }
    return FM_OK;
}

static fm_status fm__load_view(const char *directory, fm_dataset *ds, int v) {
    char path[4096], *text, *at, *line, *bad;
    const int F = ds->features[v];
    size_t length;
    fm_status status;
    int number = 0, lines;
    snprintf(path, sizeof path, "%s/%s.csv", directory, ds->names[v]);
    if (!(text = fm__read_file(path, &length, &status))) return status;
    if ((lines = fm__count_lines(text, length)) != ds->samples) {
        fm__log(FM_LOG_ERROR, "fm_dataset_load: %s has %d lines, labels.csv %d", path, lines, ds->samples);
        fm_free(text);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (!(ds->values[v] = (float *)fm_alloc((size_t)ds->samples * F * sizeof(float)))) {
        fm_free(text);
        return FM_ERR_OUT_OF_MEMORY;
    }
    memset(ds->values[v], 0, (size_t)ds->samples * F * sizeof(float));
    at = text;
    while ((line = fm__next_line(&at, text + length))) {
        const size_t s = (size_t)number++;
        int fields;
        if (line[0] == '\0') continue; /* this sample misses the view */
        ds->observed[s * ds->views + v] = 1;
        if ((fields = fm__parse_row(line, ds->values[v] + s * F, F, &bad)) != F) {
            if (fields < 0)
                fm__log(FM_LOG_ERROR, "fm_dataset_load: %s line %d: \"%.24s\" is not a finite number", path, number, bad);
            else
                fm__log(FM_LOG_ERROR, "fm_dataset_load: %s line %d: %d fields, views.txt gives %s %d", path, number, fields,
                        ds->names[v], F);
            fm_free(text);
            return FM_ERR_INVALID_ARGUMENT;
        }
    }
    fm_free(text);
    return FM_OK;
}

fm_status fm_dataset_load(const char *directory, fm_dataset *ds) {
    fm_status status;
    int v, s;
    if (!ds) return FM_ERR_NULL_POINTER;
    memset(ds, 0, sizeof *ds);
    if (!directory) return FM_ERR_NULL_POINTER;
    if ((status = fm__load_views(directory, ds)) != FM_OK || (status = fm__load_labels(directory, ds)) != FM_OK) {
        fm_dataset_free(ds);
        return status;
    }
    if (!(ds->observed = (uint8_t *)fm_alloc((size_t)ds->samples * ds->views))) {
        fm_dataset_free(ds);
        return FM_ERR_OUT_OF_MEMORY;
    }
    memset(ds->observed, 0, (size_t)ds->samples * ds->views);
    for (v = 0; v < ds->views; v++)
        if ((status = fm__load_view(directory, ds, v)) != FM_OK) {
            fm_dataset_free(ds);
            return status;
        }
    for (s = 0; s < ds->samples; s++) {
        int any = 0;
        for (v = 0; v < ds->views; v++) any |= ds->observed[(size_t)s * ds->views + v];
        if (!any) {
            fm__log(FM_LOG_ERROR, "fm_dataset_load: %s: sample %d (line %d of every view file) observes no view", directory, s,
                    s + 1);
            fm_dataset_free(ds);
            return FM_ERR_INVALID_ARGUMENT;
        }
    }
    return FM_OK;
}
#endif /* FLEXMOE_NO_STDIO */

static fm_status fm__check_dataset(const char *caller, const fm_dataset *ds) {
    if (!ds) return FM_ERR_NULL_POINTER;
    if (ds->samples < 1 || ds->views < 1 || ds->views > FLEXMOE_MODEL_MAX_MODALITIES || !ds->observed) {
        fm__log(FM_LOG_ERROR, "%s: not a loaded dataset", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    return FM_OK;
}

fm_status fm_dataset_standardize(fm_dataset *ds, const int32_t *rows, int count) {
    fm_status status;
    int v, i, j;
    if ((status = fm__check_dataset("fm_dataset_standardize", ds)) != FM_OK) return status;
    if (!rows || count < 1) return FM_ERR_INVALID_SHAPE;
    for (i = 0; i < count; i++)
        if (rows[i] < 0 || rows[i] >= ds->samples) return FM_ERR_INVALID_ARGUMENT;
    for (v = 0; v < ds->views; v++) { /* every view checked before any is changed */
        const float *x = ds->values[v], *first = NULL;
        int varying = 0;
        for (i = 0; i < count && !varying; i++)
            if (ds->observed[(size_t)rows[i] * ds->views + v]) {
                const float *row = x + (size_t)rows[i] * ds->features[v];
                if (!first) first = row;
                for (j = 0; j < ds->features[v]; j++) varying |= row[j] != first[j];
            }
        if (!first || !varying) {
            fm__log(FM_LOG_ERROR, "fm_dataset_standardize: view %s %s the %d rows", ds->names[v],
                    first ? "has zero variance over" : "is observed by none of", count);
            return FM_ERR_INVALID_ARGUMENT;
        }
    }
    for (v = 0; v < ds->views; v++) {
        const int F = ds->features[v];
        float *x = ds->values[v];
        int seen = 0;
        for (i = 0; i < count; i++) seen += ds->observed[(size_t)rows[i] * ds->views + v];
        for (j = 0; j < F; j++) {
            double sum = 0.0, squares = 0.0, mean, spread;
            size_t s;
            for (i = 0; i < count; i++)
                if (ds->observed[(size_t)rows[i] * ds->views + v]) sum += x[(size_t)rows[i] * F + j];
            mean = sum / seen;
            for (i = 0; i < count; i++)
                if (ds->observed[(size_t)rows[i] * ds->views + v]) squares += pow(x[(size_t)rows[i] * F + j] - mean, 2);
            spread = sqrt(squares / seen);
            for (s = 0; s < (size_t)ds->samples; s++)
                if (ds->observed[s * ds->views + v])
                    x[s * F + j] = (float)((x[s * F + j] - mean) / (spread > 0.0 ? spread : 1.0));
        }
    }
    return FM_OK;
}

fm_status fm_dataset_drop_views(fm_dataset *ds, float rate, uint64_t seed) {
    fm_status status;
    int s, v;
    if ((status = fm__check_dataset("fm_dataset_drop_views", ds)) != FM_OK) return status;
    if (!(rate >= 0.0f && rate <= 1.0f)) return FM_ERR_INVALID_ARGUMENT;
    for (s = 0; s < ds->samples; s++) {
        uint8_t *observed = ds->observed + (size_t)s * ds->views;
        int kept = 0, first = -1;
        float first_draw = 2.0f;
        for (v = 0; v < ds->views; v++) {
            const float draw = fm__stream_uniform(seed, (uint64_t)s, FM__STREAM_MISSING, (uint64_t)v);
            if (!observed[v]) continue;
            if (draw < first_draw) first_draw = draw, first = v;
            if (draw < rate) {
                observed[v] = 2; /* dropped, unless it is the last one */
            } else {
                kept++;
            }
        }
        for (v = 0; v < ds->views; v++)
            if (observed[v] == 2) {
                observed[v] = (uint8_t)(kept == 0 && v == first);
                if (!observed[v]) memset(ds->values[v] + (size_t)s * ds->features[v], 0, (size_t)ds->features[v] * sizeof(float));
            }
    }
    return FM_OK;
}

fm_status fm_dataset_split(const fm_dataset *ds, uint64_t seed, int32_t *order, int *train, int *validation) {
    fm_status status;
    int i;
    if ((status = fm__check_dataset("fm_dataset_split", ds)) != FM_OK) return status;
    if (!order || !train || !validation) return FM_ERR_NULL_POINTER;
    for (i = 0; i < ds->samples; i++) order[i] = i;
    for (i = ds->samples - 1; i > 0; i--) { /* Fisher-Yates */
        const int j = (int)(fm__stream(seed, 0, FM__STREAM_SPLIT, (uint64_t)i) % (uint64_t)(i + 1));
        const int32_t keep = order[i];
        order[i] = order[j], order[j] = keep;
    }
    *train = (int)((int64_t)ds->samples * 70 / 100);
    *validation = (int)((int64_t)ds->samples * 15 / 100);
    return FM_OK;
}

/* ==== 18. Training and evaluation ========================================================== */

enum { FM__STREAM_SHUFFLE = 18 };

/* Batch buffers: rows of a dataset gathered into a model batch. */
typedef struct fm__batch_buffers {
    float *features[FLEXMOE_MODEL_MAX_MODALITIES];
    uint8_t *observed;
    int32_t *labels;
} fm__batch_buffers;

static void fm__free_batch_buffers(fm__batch_buffers *b) {
    int v;
    for (v = 0; v < FLEXMOE_MODEL_MAX_MODALITIES; v++) fm_free(b->features[v]);
    fm_free(b->observed);
    fm_free(b->labels);
    memset(b, 0, sizeof *b);
}

static fm_status fm__alloc_batch_buffers(const fm_dataset *ds, int samples, fm__batch_buffers *b) {
    int v, ok;
    memset(b, 0, sizeof *b);
    ok = (b->observed = (uint8_t *)fm_alloc((size_t)samples * ds->views)) != NULL;
    ok = ok && (b->labels = (int32_t *)fm_alloc((size_t)samples * sizeof(int32_t))) != NULL;
    for (v = 0; ok && v < ds->views; v++)
        ok = (b->features[v] = (float *)fm_alloc((size_t)samples * ds->features[v] * sizeof(float))) != NULL;
    if (!ok) fm__free_batch_buffers(b);
    return ok ? FM_OK : FM_ERR_OUT_OF_MEMORY;
}

static void fm__gather_batch(const fm_dataset *ds, const int32_t *rows, int n, fm__batch_buffers *buffers, fm_model_batch *b) {
    int i, v;
    memset(b, 0, sizeof *b);
    for (i = 0; i < n; i++) {
        const size_t r = (size_t)rows[i];
        memcpy(buffers->observed + (size_t)i * ds->views, ds->observed + r * ds->views, (size_t)ds->views);
        buffers->labels[i] = ds->labels[r];
        for (v = 0; v < ds->views; v++)
            memcpy(buffers->features[v] + (size_t)i * ds->features[v], ds->values[v] + r * ds->features[v],
                   (size_t)ds->features[v] * sizeof(float));
    }
    b->samples = n;
    for (v = 0; v < ds->views; v++) b->features[v] = buffers->features[v];
    b->observed = buffers->observed;
    b->labels = buffers->labels;
}

static fm_status fm__check_model_data(const char *caller, const fm_model *model, const fm_dataset *ds, const int32_t *rows,
                                      int count) {
    int v, i;
    if (!model || !ds || !rows) return FM_ERR_NULL_POINTER;
    if (!model->state || ds->views != model->config.modalities || ds->classes > model->config.classes) {
        fm__log(FM_LOG_ERROR, "%s: the dataset (%d views, %d classes) does not fit the model (%d modalities, %d classes)",
                caller, ds->views, ds->classes, model ? model->config.modalities : 0, model ? model->config.classes : 0);
        return FM_ERR_INVALID_ARGUMENT;
    }
    for (v = 0; v < ds->views; v++)
        if (ds->features[v] != model->config.features[v]) {
            fm__log(FM_LOG_ERROR, "%s: view %s has %d features, the model's modality %d %d", caller, ds->names[v],
                    ds->features[v], v, model->config.features[v]);
            return FM_ERR_INVALID_ARGUMENT;
        }
    if (count < 1) return FM_ERR_INVALID_SHAPE;
    for (i = 0; i < count; i++)
        if (rows[i] < 0 || rows[i] >= ds->samples) return FM_ERR_INVALID_ARGUMENT;
    return FM_OK;
}

typedef struct fm__scored {
    float score;
    int positive;
} fm__scored;

static int fm__by_score(const void *a, const void *b) {
    const float x = ((const fm__scored *)a)->score, y = ((const fm__scored *)b)->score;
    if (x != x || y != y) return (x != x) - (y != y); /* NaN after every number: a total order */
    return x < y ? -1 : x > y;
}

/* Accuracy, macro-F1 and one-vs-rest macro AUC from n rows of class probabilities. */
static void fm__score(const float *probs, const int32_t *labels, int n, int classes, fm__scored *scratch, fm_metrics *m) {
    int c, i, correct = 0, f1_classes = 0, auc_classes = 0;
    double f1 = 0.0, auc = 0.0;
    for (i = 0; i < n; i++) {
        int best = 0;
        for (c = 1; c < classes; c++)
            if (probs[(size_t)i * classes + c] > probs[(size_t)i * classes + best]) best = c;
        correct += best == labels[i];
    }
    for (c = 0; c < classes; c++) {
        int tp = 0, fp = 0, fn = 0, positives = 0, j;
        for (i = 0; i < n; i++) {
            int best = 0, k;
            for (k = 1; k < classes; k++)
                if (probs[(size_t)i * classes + k] > probs[(size_t)i * classes + best]) best = k;
            tp += best == c && labels[i] == c, fp += best == c && labels[i] != c, fn += best != c && labels[i] == c;
            scratch[i].score = probs[(size_t)i * classes + c], scratch[i].positive = labels[i] == c;
            positives += labels[i] == c;
        }
        if (tp + fp + fn > 0) f1 += 2.0 * tp / (2.0 * tp + fp + fn), f1_classes++;
        if (positives > 0 && positives < n) { /* Mann-Whitney: the positives' mean rank, ties averaged */
            double rank_sum = 0.0;
            qsort(scratch, (size_t)n, sizeof *scratch, fm__by_score);
            for (i = 0; i < n; i = j) { /* j > i: a NaN score (equal to nothing) is a tie of one */
                int in_tie = scratch[i].positive;
                for (j = i + 1; j < n && scratch[j].score == scratch[i].score; j++) in_tie += scratch[j].positive;
                rank_sum += in_tie * (i + j + 1) / 2.0;
            }
            auc += (rank_sum - positives * (positives + 1) / 2.0) / ((double)positives * (n - positives)), auc_classes++;
        }
    }
    m->samples = n;
    m->accuracy = n ? (float)correct / (float)n : 0.0f;
    m->macro_f1 = f1_classes ? (float)(f1 / f1_classes) : 0.0f;
    m->macro_auc = auc_classes ? (float)(auc / auc_classes) : 0.0f;
}

/* What an evaluation of up to `count` rows needs: fm_model_train takes it before its first step, so
 * that an allocation failure can only come before the model changes. */
typedef struct fm__eval_buffers {
    fm__batch_buffers batch;
    float *probs;
    int32_t *labels;
    fm__scored *scratch;
} fm__eval_buffers;

static void fm__free_eval_buffers(fm__eval_buffers *e) {
    fm_free(e->probs), fm_free(e->labels), fm_free(e->scratch);
    fm__free_batch_buffers(&e->batch);
    e->probs = NULL, e->labels = NULL, e->scratch = NULL;
}

static fm_status fm__alloc_eval_buffers(const fm_model *model, const fm_dataset *ds, int count, fm__eval_buffers *e) {
    memset(e, 0, sizeof *e);
    if (fm__alloc_batch_buffers(ds, model->max_samples, &e->batch) != FM_OK) return FM_ERR_OUT_OF_MEMORY;
    e->probs = (float *)fm_alloc((size_t)count * model->config.classes * sizeof(float));
    e->labels = (int32_t *)fm_alloc((size_t)count * sizeof(int32_t));
    e->scratch = (fm__scored *)fm_alloc((size_t)count * sizeof(fm__scored));
    if (e->probs && e->labels && e->scratch) return FM_OK;
    fm__free_eval_buffers(e);
    return FM_ERR_OUT_OF_MEMORY;
}

/* fm_model_evaluate on checked arguments, in buffers for at least count rows. */
static fm_status fm__evaluate(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count, fm_metrics *metrics,
                              fm__eval_buffers *e) {
    const int C = model->config.classes;
    fm_status status = FM_OK;
    double loss = 0.0;
    int i, k;
    for (i = 0; i < count; i += model->max_samples) {
        const int n = count - i < model->max_samples ? count - i : model->max_samples;
        fm_model_batch b;
        fm_model_losses losses;
        fm__gather_batch(ds, rows + i, n, &e->batch, &b);
        if ((status = fm_model_forward(model, &b, e->probs + (size_t)i * C, &losses)) != FM_OK) return status;
        loss += (double)losses.task * n;
        for (k = 0; k < n; k++) e->labels[i + k] = b.labels[k];
    }
    if ((status = fm_softmax_forward(count, C, e->probs, C, e->probs, C)) != FM_OK) return status;
    fm__score(e->probs, e->labels, count, C, e->scratch, metrics);
    metrics->loss = (float)(loss / count);
    return FM_OK;
}

fm_status fm_model_evaluate(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count, fm_metrics *metrics) {
    fm__eval_buffers buffers;
    fm_status status;
    if ((status = fm__check_model_data("fm_model_evaluate", model, ds, rows, count)) != FM_OK) return status;
    if (!metrics) return FM_ERR_NULL_POINTER;
    if ((status = fm__alloc_eval_buffers(model, ds, count, &buffers)) != FM_OK) return status;
    status = fm__evaluate(model, ds, rows, count, metrics, &buffers);
    fm__free_eval_buffers(&buffers);
    return status;
}

/* The training rows in the curriculum's order: most observed views first, ties in row order. */
static void fm__curriculum(const fm_dataset *ds, const int32_t *rows, int count, int32_t *order) {
    int filled = 0, observed, i, v;
    for (observed = ds->views; observed >= 1; observed--)
        for (i = 0; i < count; i++) {
            int n = 0;
            for (v = 0; v < ds->views; v++) n += ds->observed[(size_t)rows[i] * ds->views + v] != 0;
            if (n == observed) order[filled++] = rows[i];
        }
}

static int fm__loss_is_finite(const fm_model_losses *l) { return l->loss - l->loss == 0.0f; }

fm_status fm_model_restore_best(fm_model *model) {
    if (!model) return FM_ERR_NULL_POINTER;
    if (!model->params) return FM_ERR_INVALID_ARGUMENT;
    if (model->trained.best_epoch > 0) memcpy(model->params, model->best, model->param_floats * sizeof(float));
    return FM_OK;
}

fm_status fm_model_routing(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count, fm_routing_report *report) {
    fm__batch_buffers buffers;
    int64_t *counts;
    fm_status status;
    int combos, E, K, i, c, e;
    double total = 0.0, mean, variance = 0.0, entropy = 0.0;
    if ((status = fm__check_model_data("fm_model_routing", model, ds, rows, count)) != FM_OK) return status;
    if (!report) return FM_ERR_NULL_POINTER;
    combos = fm_combination_count(model->config.modalities), E = model->config.experts, K = model->config.top_k;
    if (!(counts = (int64_t *)fm_alloc((size_t)combos * E * sizeof(int64_t)))) return FM_ERR_OUT_OF_MEMORY;
    if ((status = fm__alloc_batch_buffers(ds, model->max_samples, &buffers)) != FM_OK) {
        fm_free(counts);
        return status;
    }
    memset(counts, 0, (size_t)combos * E * sizeof(int64_t));
    for (i = 0; status == FM_OK && i < count; i += model->max_samples) {
        const int n = count - i < model->max_samples ? count - i : model->max_samples;
        const int tokens = n * model->config.modalities * model->config.patches;
        fm_model_batch b;
        int t, j;
        fm__gather_batch(ds, rows + i, n, &buffers, &b);
        b.labels = NULL; /* routing only: no loss */
        if ((status = fm_model_forward(model, &b, NULL, NULL)) != FM_OK) break;
        for (t = 0; t < tokens; t++)
            for (j = 0; j < K; j++)
                counts[(size_t)model->state->token_combination[t] * E + model->state->expert_indices[(size_t)t * K + j]]++;
    }
    if (status == FM_OK) {
        memset(report, 0, offsetof(fm_routing_report, load));
        for (c = 0; c < combos; c++) {
            int64_t row = 0;
            for (e = 0; e < E; e++) row += counts[(size_t)c * E + e];
            if (report->combination_tokens) report->combination_tokens[c] = row / K;
            if (report->share)
                for (e = 0; e < E; e++) report->share[(size_t)c * E + e] = row ? (float)((double)counts[(size_t)c * E + e] / row) : 0.0f;
            total += (double)row;
        }
        mean = total / E;
        for (e = 0; e < E; e++) {
            double load = 0.0;
            for (c = 0; c < combos; c++) load += (double)counts[(size_t)c * E + e];
            variance += (load - mean) * (load - mean) / E;
            if (load > 0.0) entropy -= load / total * log(load / total);
            if (report->load) report->load[e] = (float)(load / total);
        }
        report->assignments = (int64_t)total;
        report->load_cv = (float)(sqrt(variance) / mean);
        report->entropy = (float)entropy;
        report->normalized_entropy = E > 1 ? (float)(entropy / log((double)E)) : 1.0f;
    }
    fm_free(counts);
    fm__free_batch_buffers(&buffers);
    return status;
}

fm_status fm_model_train(fm_model *model, const fm_dataset *ds, const int32_t *train_rows, int train_count,
                         const int32_t *validation_rows, int validation_count, const fm_train_desc *desc,
                         fm_train_result *result) {
    static const char caller[] = "fm_model_train";
    fm__batch_buffers buffers;
    fm__eval_buffers validation;
    fm_train_desc d;
    fm_train_progress progress;
    fm_train_state *state;
    int32_t *order;
    fm_status status;
    int epoch, i, stopped = 0;
    if (!desc) return FM_ERR_NULL_POINTER;
    if ((status = fm__check_model_data(caller, model, ds, train_rows, train_count)) != FM_OK ||
        (status = fm__check_model_data(caller, model, ds, validation_rows, validation_count)) != FM_OK)
        return status;
    d = *desc;
    if (d.epochs == 0) d.epochs = 20;
    if (d.batch_size == 0) d.batch_size = model->max_samples < 16 ? model->max_samples : 16;
    if (d.warmup_epochs == 0) d.warmup_epochs = 5;
    if (d.epochs < 1 || d.batch_size < 1 || d.batch_size > model->max_samples) {
        fm__log(FM_LOG_ERROR, "%s: epochs %d must be >= 1 and batch_size %d in 1 .. %d (the model's max_samples)", caller,
                d.epochs, d.batch_size, model->max_samples);
        return FM_ERR_INVALID_ARGUMENT;
    }
    {
        fm_adam_desc adam; /* checked here, so that a bad one stops the run before its first step */
        if ((status = fm__adam_hyper(caller, &d.adam, 1, &adam)) != FM_OK ||
            (status = fm__check_class_weights(caller, d.class_weights, model->config.classes)) != FM_OK)
            return status;
    }
    state = &model->trained;
    if (state->epoch == 0 && state->step == 0) state->seed = d.seed;
    else if (state->seed != d.seed)
        fm__log(FM_LOG_WARNING, "%s: the model trained with seed %llu so far and continues with %llu: not the run it began",
                caller, (unsigned long long)state->seed, (unsigned long long)d.seed);
    memset(&progress, 0, sizeof progress);
    /* everything the run needs, before its first step: an allocation that fails leaves the model as it was */
    order = (int32_t *)fm_alloc((size_t)train_count * sizeof(int32_t));
    if (!order || fm__alloc_batch_buffers(ds, d.batch_size, &buffers) != FM_OK) {
        fm_free(order);
        return FM_ERR_OUT_OF_MEMORY;
    }
    if (fm__alloc_eval_buffers(model, ds, validation_count, &validation) != FM_OK) {
        fm_free(order);
        fm__free_batch_buffers(&buffers);
        return FM_ERR_OUT_OF_MEMORY;
    }
    progress.model = model;
    progress.epochs = d.epochs;
    progress.steps_per_epoch = (train_count + d.batch_size - 1) / d.batch_size;
    for (epoch = state->epoch + 1; status == FM_OK && epoch <= d.epochs && !stopped; epoch++) {
        double epoch_loss = 0.0;
        fm__curriculum(ds, train_rows, train_count, order);
        if (epoch > d.warmup_epochs) /* shuffled (Fisher-Yates) after the warm-up */
            for (i = train_count - 1; i > 0; i--) {
                const int j = (int)(fm__stream(d.seed, (uint64_t)epoch, FM__STREAM_SHUFFLE, (uint64_t)i) % (uint64_t)(i + 1));
                const int32_t keep = order[i];
                order[i] = order[j], order[j] = keep;
            }
        progress.epoch = epoch;
        for (i = 0; status == FM_OK && i < train_count && !stopped; i += d.batch_size) {
            const int n = train_count - i < d.batch_size ? train_count - i : d.batch_size;
            fm_model_batch b;
            fm_model_losses losses;
            fm__gather_batch(ds, order + i, n, &buffers, &b);
            b.class_weights = d.class_weights, b.training = 1, b.seed = d.seed, b.step = (uint64_t)(state->step + 1);
            if ((status = fm_model_forward(model, &b, NULL, &losses)) != FM_OK) break;
            if (!fm__loss_is_finite(&losses)) {
                fm__log(FM_LOG_ERROR, "%s: the loss is %s at step %lld (epoch %d); the weights from before it are kept",
                        caller, losses.loss != losses.loss ? "NaN" : "infinite", (long long)(state->step + 1), epoch);
                status = FM_ERR_INVALID_ARGUMENT;
                break;
            }
            if ((status = fm_model_backward(model, &b)) != FM_OK ||
                (status = fm_model_adam_step(model, &d.adam, state->step + 1)) != FM_OK)
                break;
            state->step++;
            epoch_loss += (double)losses.loss * n;
            progress.step = i / d.batch_size + 1, progress.total_step = state->step, progress.loss = losses.loss;
            if (d.on_step && d.on_step(&progress, d.user_data)) stopped = 1;
        }
        if (status != FM_OK || stopped) break;
        if ((status = fm__evaluate(model, ds, validation_rows, validation_count, &progress.validation, &validation)) != FM_OK) break;
        state->epoch = epoch;
        if (state->best_epoch == 0 || progress.validation.accuracy > state->best_validation.accuracy) {
            state->best_validation = progress.validation, state->best_epoch = epoch;
            memcpy(model->best, model->params, model->param_floats * sizeof(float));
        }
        progress.loss = (float)(epoch_loss / train_count), progress.best_epoch = state->best_epoch;
        if (d.on_epoch && d.on_epoch(&progress, d.user_data)) stopped = 1;
    }
    /* the best epoch's weights (or, after a failed step, those before it: Adam changes nothing
     * on a refused gradient, and a non-finite loss stops before the update) */
    if (status == FM_OK) fm_model_restore_best(model);
    if (result) {
        memset(result, 0, sizeof *result);
        result->epochs_run = state->epoch, result->best_epoch = state->best_epoch, result->stopped = stopped;
        result->steps = state->step, result->best_validation = state->best_validation;
    }
    fm_free(order);
    fm__free_batch_buffers(&buffers);
    fm__free_eval_buffers(&validation);
    return status;
}

/* ==== 19. Checkpoints ====================================================================== */

#ifndef FLEXMOE_NO_STDIO

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define FM__POSIX_FILES 1
#endif
#include <errno.h>

#define FM__CHECKPOINT_FORMAT "flexmoe.checkpoint"
#define FM__CHECKPOINT_VERSION "1"
#define FM__SAFETENSORS_MAX_HEADER (100u << 20) /* as the safetensors library: 100 MB */

static int fm__little_endian(void) {
    const uint32_t one = 1;
    unsigned char first;
    memcpy(&first, &one, 1);
    return first == 1;
}

/* CRC-32 as zlib computes it (reflected 0xEDB88320), so Python's zlib.crc32 checks a file. */
typedef struct fm__crc32 {
    uint32_t table[256], value;
} fm__crc32;

static void fm__crc32_init(fm__crc32 *c) {
    uint32_t i, k, r;
    for (i = 0; i < 256; i++) {
        for (r = i, k = 0; k < 8; k++) r = r & 1u ? (r >> 1) ^ 0xEDB88320u : r >> 1;
        c->table[i] = r;
    }
    c->value = 0xFFFFFFFFu;
}

static void fm__crc32_update(fm__crc32 *c, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint32_t v = c->value;
    while (n--) v = c->table[(v ^ *p++) & 0xFFu] ^ (v >> 8);
    c->value = v;
}

/* A growing NUL-terminated string; `failed` after an allocation failed (the text is then
 * incomplete and must not be used). */
typedef struct fm__text {
    char *data;
    size_t length, capacity;
    int failed;
} fm__text;

static int fm__text_reserve(fm__text *t, size_t more) {
    char *grown;
    size_t capacity;
    if (t->failed) return 0;
    if (t->length + more + 1 <= t->capacity) return 1;
    capacity = (t->length + more + 1) * 2 + 256;
    if (!(grown = (char *)fm_alloc(capacity))) return t->failed = 1, 0;
    if (t->data) memcpy(grown, t->data, t->length + 1);
    else grown[0] = '\0';
    fm_free(t->data);
    t->data = grown, t->capacity = capacity;
    return 1;
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void fm__text_add(fm__text *t, const char *format, ...) {
    va_list args;
    int n;
    va_start(args, format);
    n = vsnprintf(NULL, 0, format, args);
    va_end(args);
    if (n < 0 || !fm__text_reserve(t, (size_t)n)) return;
    va_start(args, format);
    vsnprintf(t->data + t->length, (size_t)n + 1, format, args);
    va_end(args);
    t->length += (size_t)n;
}

/* s as a JSON string, quotes and escapes added. */
static void fm__text_add_json_string(fm__text *t, const char *s) {
    fm__text_add(t, "\"");
    for (; *s; s++) {
        const unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fm__text_add(t, "\\%c", c);
        else if (c < 0x20) fm__text_add(t, "\\u%04x", c);
        else fm__text_add(t, "%c", c);
    }
    fm__text_add(t, "\"");
}

static size_t fm__safetensors_dtype_size(const char *dtype) {
    static const char *const names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"};
    static const unsigned char sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 8, 4, 2, 1, 1};
    size_t i;
    for (i = 0; i < sizeof sizes; i++)
        if (strcmp(dtype, names[i]) == 0) return sizes[i];
    return 0;
}

/* One tensor to write: named prefix + name; `packed` data is fm_pack_weights' layout of the
 * shape[0] x shape[1] x shape[2] experts, written unpacked. */
typedef struct fm__tensor_out {
    const char *prefix, *name, *dtype;
    int rank, shape[4], packed;
    const void *data;
} fm__tensor_out;

static size_t fm__tensor_out_bytes(const fm__tensor_out *t) {
    size_t bytes = fm__safetensors_dtype_size(t->dtype);
    int i;
    for (i = 0; i < t->rank; i++) bytes *= (size_t)t->shape[i];
    return bytes;
}

/* Where the data goes: into the CRC, or into a file. */
typedef struct fm__sink {
    fm__crc32 *crc;
#ifdef FM__POSIX_FILES
    int fd;
#else
    FILE *file;
#endif
    int failed;
} fm__sink;

static void fm__sink_put(fm__sink *s, const void *data, size_t n) {
    const char *p = (const char *)data;
    if (s->failed) return;
    if (s->crc) {
        fm__crc32_update(s->crc, data, n);
        return;
    }
#ifdef FM__POSIX_FILES
    while (n > 0) {
        const ssize_t wrote = write(s->fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (wrote < 0 && errno == EINTR) continue;
        if (wrote <= 0) {
            s->failed = 1;
            return;
        }
        p += wrote, n -= (size_t)wrote;
    }
#else
    if (fwrite(p, 1, n, s->file) != n) s->failed = 1;
#endif
}

static int fm__sink_open(fm__sink *s, const char *path) {
#ifdef FM__POSIX_FILES
    return (s->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644)) >= 0;
#else
    return (s->file = fopen(path, "wb")) != NULL;
#endif
}

/* Flushed to the disk (POSIX) and closed: 0 when anything failed, the write before it included. */
static int fm__sink_close(fm__sink *s) {
#ifdef FM__POSIX_FILES
    const int synced = !s->failed && fsync(s->fd) == 0;
    return close(s->fd) == 0 && synced;
#else
    return fclose(s->file) == 0 && !s->failed;
#endif
}

static void fm__sink_tensors(fm__sink *s, const fm__tensor_out *t, int count, float *scratch) {
    int i;
    for (i = 0; i < count; i++) {
        if (t[i].packed) {
            fm_unpack_weights(t[i].shape[0], t[i].shape[1], t[i].shape[2], FM_WEIGHTS_IN_BY_OUT, (const float *)t[i].data,
                              scratch, t[i].shape[2]);
            fm__sink_put(s, scratch, fm__tensor_out_bytes(&t[i]));
        } else {
            fm__sink_put(s, t[i].data, fm__tensor_out_bytes(&t[i]));
        }
    }
}

#ifdef FM__POSIX_FILES
/* The directory part of path ("." when it has none), into out. */
static void fm__directory_of(const char *path, char *out, size_t size) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 0;
    if (!slash) {
        snprintf(out, size, ".");
        return;
    }
    if (n == 0) n = 1; /* "/file" */
    if (n >= size) n = size - 1;
    memcpy(out, path, n);
    out[n] = '\0';
}
#endif

/* Writes a safetensors file atomically: path.tmp, flushed to the disk, renamed over path, the
 * directory flushed (POSIX; elsewhere the C library's rename, without the flushes). */
static fm_status fm__safetensors_write(const char *caller, const char *path, const fm__tensor_out *t, int count,
                                       const char *const *metadata) {
    fm__text header, temp;
    fm__crc32 crc;
    fm__sink sink;
    float *scratch = NULL;
    size_t largest = 0, offset = 0;
    unsigned char length_bytes[8];
    fm_status status = FM_OK;
    int i;
    if (!fm__little_endian()) {
        fm__log(FM_LOG_ERROR, "%s: safetensors data is little-endian; this host is not", caller);
        return FM_ERR_IO;
    }
    memset(&header, 0, sizeof header);
    memset(&temp, 0, sizeof temp);
    for (i = 0; i < count; i++)
        if (t[i].packed && fm__tensor_out_bytes(&t[i]) > largest) largest = fm__tensor_out_bytes(&t[i]);
    if (largest && !(scratch = (float *)fm_alloc(largest))) return FM_ERR_OUT_OF_MEMORY;
    memset(&sink, 0, sizeof sink);
    fm__crc32_init(&crc);
    sink.crc = &crc;
    fm__sink_tensors(&sink, t, count, scratch);
    fm__text_add(&header, "{\"__metadata__\":{");
    for (i = 0; metadata && metadata[i]; i += 2) {
        fm__text_add_json_string(&header, metadata[i]);
        fm__text_add(&header, ":");
        fm__text_add_json_string(&header, metadata[i + 1]);
        fm__text_add(&header, ",");
    }
    fm__text_add(&header, "\"crc32\":\"%08lx\"}", (unsigned long)(crc.value ^ 0xFFFFFFFFu));
    for (i = 0; i < count; i++) {
        int j;
        fm__text_add(&header, ",\"%s%s\":{\"dtype\":\"%s\",\"shape\":[", t[i].prefix, t[i].name, t[i].dtype);
        for (j = 0; j < t[i].rank; j++) fm__text_add(&header, "%s%d", j ? "," : "", t[i].shape[j]);
        fm__text_add(&header, "],\"data_offsets\":[%zu,%zu]}", offset, offset + fm__tensor_out_bytes(&t[i]));
        offset += fm__tensor_out_bytes(&t[i]);
    }
    fm__text_add(&header, "}");
    while (!header.failed && (8 + header.length) % 8 != 0) fm__text_add(&header, " "); /* the data 8-byte aligned */
    fm__text_add(&temp, "%s.tmp", path);
    if (header.failed || temp.failed) {
        fm_free(scratch), fm_free(header.data), fm_free(temp.data);
        return FM_ERR_OUT_OF_MEMORY;
    }
    for (i = 0; i < 8; i++) length_bytes[i] = (unsigned char)((uint64_t)header.length >> (8 * i));
    memset(&sink, 0, sizeof sink);
    if (!fm__sink_open(&sink, temp.data)) {
        fm__log(FM_LOG_ERROR, "%s: cannot create %s: %s", caller, temp.data, strerror(errno));
        status = FM_ERR_IO;
    } else {
        fm__sink_put(&sink, length_bytes, 8);
        fm__sink_put(&sink, header.data, header.length);
        fm__sink_tensors(&sink, t, count, scratch);
        if (!fm__sink_close(&sink)) {
            fm__log(FM_LOG_ERROR, "%s: cannot write %s: %s", caller, temp.data, strerror(errno));
            status = FM_ERR_IO;
        }
    }
#ifndef FM__POSIX_FILES
    if (status == FM_OK) remove(path); /* rename over an existing file fails outside POSIX */
#endif
    if (status == FM_OK && rename(temp.data, path) != 0) {
        fm__log(FM_LOG_ERROR, "%s: cannot rename %s to %s: %s", caller, temp.data, path, strerror(errno));
        status = FM_ERR_IO;
    }
#ifdef FM__POSIX_FILES
    if (status == FM_OK) { /* the rename itself durable */
        char directory[4096];
        int fd;
        fm__directory_of(path, directory, sizeof directory);
        if ((fd = open(directory, O_RDONLY)) >= 0) {
            fsync(fd);
            close(fd);
        }
    }
#endif
    if (status != FM_OK) remove(temp.data);
    fm_free(scratch), fm_free(header.data), fm_free(temp.data);
    return status;
}

fm_status fm_safetensors_write(const char *path, const fm_safetensor *tensors, int count, const char *const *metadata) {
    static const char caller[] = "fm_safetensors_write";
    fm__tensor_out *out;
    fm_status status;
    int i, j;
    if (!path || (count > 0 && !tensors)) return FM_ERR_NULL_POINTER;
    if (count < 0 || count > (1 << 20)) return FM_ERR_INVALID_SHAPE;
    for (i = 0; metadata && metadata[i]; i += 2)
        if (!metadata[i + 1] || strcmp(metadata[i], "crc32") == 0) {
            fm__log(FM_LOG_ERROR, "%s: metadata key %s %s", caller, metadata[i],
                    metadata[i + 1] ? "is the checksum's own (it is added)" : "has no value (key, value pairs, then NULL)");
            return FM_ERR_INVALID_ARGUMENT;
        }
    for (i = 0; i < count; i++) {
        const fm_safetensor *t = &tensors[i];
        double elements = 1.0;
        if (!t->name || !*t->name || !t->dtype || !fm__safetensors_dtype_size(t->dtype) || t->rank < 0 || t->rank > 4 ||
            strcmp(t->name, "__metadata__") == 0) {
            fm__log(FM_LOG_ERROR, "%s: tensor %d needs a name (not __metadata__), a dtype of safetensors (F32, I32, U8, ...) "
                    "and a rank of 0 .. 4", caller, i);
            return FM_ERR_INVALID_ARGUMENT;
        }
        for (j = 0; j < t->rank; j++) {
            if (t->shape[j] < 0) return FM_ERR_INVALID_SHAPE;
            elements *= t->shape[j];
        }
        if (elements * fm__safetensors_dtype_size(t->dtype) > (double)(SIZE_MAX / 2)) return FM_ERR_OVERFLOW;
        if (elements > 0 && !t->data) return FM_ERR_NULL_POINTER;
        for (j = 0; j < i; j++)
            if (strcmp(tensors[j].name, t->name) == 0) {
                fm__log(FM_LOG_ERROR, "%s: two tensors are named %s", caller, t->name);
                return FM_ERR_INVALID_ARGUMENT;
            }
    }
    if (!(out = (fm__tensor_out *)fm_alloc((size_t)(count ? count : 1) * sizeof *out))) return FM_ERR_OUT_OF_MEMORY;
    for (i = 0; i < count; i++) {
        memset(&out[i], 0, sizeof out[i]);
        out[i].prefix = "", out[i].name = tensors[i].name, out[i].dtype = tensors[i].dtype, out[i].rank = tensors[i].rank;
        for (j = 0; j < 4; j++) out[i].shape[j] = tensors[i].shape[j];
        out[i].data = tensors[i].data;
    }
    status = fm__safetensors_write(caller, path, out, count, metadata);
    fm_free(out);
    return status;
}

static void fm__config_json(fm__text *t, const fm_model_desc *c) {
    int m;
    fm__text_add(t, "{\"modalities\":%d,\"features\":[", c->modalities);
    for (m = 0; m < c->modalities; m++) fm__text_add(t, "%s%d", m ? "," : "", c->features[m]);
    fm__text_add(t, "],\"classes\":%d,\"patches\":%d,\"dim\":%d,\"heads\":%d,\"experts\":%d,\"top_k\":%d,\"hidden\":%d,"
                 "\"dropout\":%.9g,\"gate_loss_weight\":%.9g,\"no_attention_residual\":%d,\"layernorm_eps\":%.9g,"
                 "\"gate\":%d,\"confidence\":%d,\"imputation\":%d,\"impute_keep\":%.9g}",
                 c->classes, c->patches, c->dim, c->heads, c->experts, c->top_k, c->hidden, (double)c->dropout,
                 (double)c->gate_loss_weight, c->no_attention_residual, (double)c->layernorm_eps, (int)c->gate,
                 (int)c->confidence, (int)c->imputation, (double)c->impute_keep);
}

static void fm__train_state_json(fm__text *t, const fm_train_state *s) {
    fm__text_add(t, "{\"epoch\":%d,\"step\":%lld,\"seed\":%llu,\"best_epoch\":%d,\"best_samples\":%d,\"best_accuracy\":%.9g,"
                 "\"best_macro_f1\":%.9g,\"best_macro_auc\":%.9g,\"best_loss\":%.9g}",
                 s->epoch, (long long)s->step, (unsigned long long)s->seed, s->best_epoch, s->best_validation.samples,
                 (double)s->best_validation.accuracy, (double)s->best_validation.macro_f1,
                 (double)s->best_validation.macro_auc, (double)s->best_validation.loss);
}

/* The arenas a checkpoint holds, by the prefix of their tensors' names. */
static const char *const fm__checkpoint_prefixes[4] = {"", "adam.m.", "adam.v.", "best."};

static float *fm__checkpoint_arena(const fm_model *model, int which) {
    float *const arenas[4] = {model->params, model->adam_m, model->adam_v, model->best};
    return arenas[which];
}

fm_status fm_model_save(const fm_model *model, const char *path) {
    static const char caller[] = "fm_model_save";
    fm__tensor_out *out;
    fm__text config, training;
    const char *metadata[9];
    fm_status status;
    int arenas, a, i, count = 0;
    if (!model || !path) return FM_ERR_NULL_POINTER;
    if (!model->params) {
        fm__log(FM_LOG_ERROR, "%s: the model was not created (fm_model_create)", caller);
        return FM_ERR_INVALID_ARGUMENT;
    }
    arenas = model->trained.best_epoch > 0 ? 4 : 3;
    if (!(out = (fm__tensor_out *)fm_alloc((size_t)arenas * model->tensor_count * sizeof *out))) return FM_ERR_OUT_OF_MEMORY;
    for (a = 0; a < arenas; a++)
        for (i = 0; i < model->tensor_count; i++) {
            const fm_tensor_info *info = &model->tensors[i];
            fm__tensor_out *t = &out[count++];
            memset(t, 0, sizeof *t);
            t->prefix = fm__checkpoint_prefixes[a], t->name = info->name, t->dtype = "F32";
            t->rank = info->rank, t->packed = info->packed;
            memcpy(t->shape, info->shape, sizeof t->shape);
            t->data = fm__checkpoint_arena(model, a) + info->offset;
        }
    memset(&config, 0, sizeof config);
    memset(&training, 0, sizeof training);
    fm__config_json(&config, &model->config);
    fm__train_state_json(&training, &model->trained);
    if (config.failed || training.failed) {
        status = FM_ERR_OUT_OF_MEMORY;
    } else {
        metadata[0] = "format", metadata[1] = FM__CHECKPOINT_FORMAT, metadata[2] = "version",
        metadata[3] = FM__CHECKPOINT_VERSION, metadata[4] = "config", metadata[5] = config.data, metadata[6] = "training",
        metadata[7] = training.data, metadata[8] = NULL;
        status = fm__safetensors_write(caller, path, out, count, metadata);
    }
    fm_free(config.data), fm_free(training.data), fm_free(out);
    return status;
}

/* ---- reading ---------------------------------------------------------------------------- */

/* A tensor of a file's header; name and dtype point into the (decoded) header text. */
typedef struct fm__tensor_in {
    const char *name, *dtype;
    int rank;
    uint64_t shape[8], begin, end;
} fm__tensor_in;

typedef struct fm__safetensors_in {
    FILE *file;
    uint64_t size, header_length, data_size;
    char *header;
    fm__tensor_in *tensors;
    int count, capacity;
    const char *keys[32], *values[32];
    int metadata_count;
    char why[160]; /* what is wrong with the file */
} fm__safetensors_in;

static void fm__json_space(char **at) {
    while (**at == ' ' || **at == '\t' || **at == '\n' || **at == '\r') (*at)++;
}

static int fm__json_take(char **at, char c) {
    fm__json_space(at);
    if (**at != c) return 0;
    (*at)++;
    return 1;
}

static int fm__hex_digit(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* The JSON string at *at, decoded in place (\uXXXX to UTF-8) and NUL-terminated; NULL when it is
 * not a well-formed string. Decoding never writes past what it has read. */
static char *fm__json_string(char **at) {
    char *start, *out;
    fm__json_space(at);
    if (**at != '"') return NULL;
    start = out = ++*at;
    for (;;) {
        char c = *(*at)++;
        if (c == '"') break;
        if (c == '\0' || (unsigned char)c < 0x20) return NULL;
        if (c == '\\') {
            c = *(*at)++;
            if (c == 'u') {
                unsigned code = 0;
                int i, digit;
                for (i = 0; i < 4; i++) {
                    if ((digit = fm__hex_digit((*at)[i])) < 0) return NULL;
                    code = code * 16 + (unsigned)digit;
                }
                *at += 4;
                if (code == 0) return NULL;
                if (code < 0x80) {
                    *out++ = (char)code;
                } else if (code < 0x800) {
                    *out++ = (char)(0xC0 | code >> 6), *out++ = (char)(0x80 | (code & 0x3F));
                } else {
                    *out++ = (char)(0xE0 | code >> 12), *out++ = (char)(0x80 | (code >> 6 & 0x3F)), *out++ = (char)(0x80 | (code & 0x3F));
                }
                continue;
            }
            switch (c) {
            case '"': case '\\': case '/': break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            default: return NULL;
            }
        }
        *out++ = c;
    }
    *out = '\0';
    return start;
}

/* A non-negative integer of at most 19 digits. */
static int fm__json_count(char **at, uint64_t *value) {
    int digits = 0;
    fm__json_space(at);
    *value = 0;
    while (**at >= '0' && **at <= '9' && digits < 19) *value = *value * 10 + (uint64_t)(*(*at)++ - '0'), digits++;
    return digits > 0 && !(**at >= '0' && **at <= '9');
}

/* [a, b, ...] of at most `most` counts. */
static int fm__json_counts(char **at, uint64_t *values, int most, int *count) {
    *count = 0;
    if (!fm__json_take(at, '[')) return 0;
    if (fm__json_take(at, ']')) return 1;
    do {
        if (*count == most || !fm__json_count(at, &values[(*count)++])) return 0;
    } while (fm__json_take(at, ','));
    return fm__json_take(at, ']');
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static int fm__file_wrong(fm__safetensors_in *f, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(f->why, sizeof f->why, format, args);
    va_end(args);
    return 0;
}

static int fm__parse_tensor_entry(fm__safetensors_in *f, char **at, const char *name) {
    fm__tensor_in *t = &f->tensors[f->count++];
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    memset(t, 0, sizeof *t);
    t->name = name;
    if (!fm__json_take(at, '{')) return fm__file_wrong(f, "the header's entry %s is not an object", name);
    do {
        const char *key = fm__json_string(at);
        if (!key || !fm__json_take(at, ':')) return fm__file_wrong(f, "the header's entry %s is not well-formed JSON", name);
        if (strcmp(key, "dtype") == 0 && !have_dtype) {
            have_dtype = 1;
            if (!(t->dtype = fm__json_string(at))) return fm__file_wrong(f, "tensor %s: dtype is not a string", name);
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            have_shape = 1;
            if (!fm__json_counts(at, t->shape, 8, &t->rank))
                return fm__file_wrong(f, "tensor %s: shape is not a list of at most 8 sizes", name);
        } else if (strcmp(key, "data_offsets") == 0 && !have_offsets) {
            uint64_t offsets[2];
            int n;
            have_offsets = 1;
            if (!fm__json_counts(at, offsets, 2, &n) || n != 2)
                return fm__file_wrong(f, "tensor %s: data_offsets is not [begin, end]", name);
            t->begin = offsets[0], t->end = offsets[1];
        } else {
            return fm__file_wrong(f, "tensor %s: unknown or repeated field \"%s\"", name, key);
        }
    } while (fm__json_take(at, ','));
    if (!fm__json_take(at, '}')) return fm__file_wrong(f, "the header's entry %s is not well-formed JSON", name);
    if (!have_dtype || !have_shape || !have_offsets)
        return fm__file_wrong(f, "tensor %s lacks %s", name, !have_dtype ? "its dtype" : !have_shape ? "its shape" : "its data_offsets");
    return 1;
}

/* The header: {"__metadata__": {string: string, ...}, "name": {"dtype", "shape", "data_offsets"}, ...}
 * then nothing but spaces. */
static int fm__parse_safetensors_header(fm__safetensors_in *f) {
    char *at = f->header, *end = f->header + f->header_length;
    int have_metadata = 0;
    if (!fm__json_take(&at, '{')) return fm__file_wrong(f, "the header is not a JSON object");
    if (!fm__json_take(&at, '}')) {
        do {
            const char *name = fm__json_string(&at);
            if (!name || !fm__json_take(&at, ':')) return fm__file_wrong(f, "the header is not well-formed JSON");
            if (strcmp(name, "__metadata__") == 0) {
                if (have_metadata++) return fm__file_wrong(f, "the header has two __metadata__");
                if (!fm__json_take(&at, '{')) return fm__file_wrong(f, "__metadata__ is not an object");
                if (fm__json_take(&at, '}')) continue;
                do {
                    const char *key = fm__json_string(&at), *value;
                    if (!key || !fm__json_take(&at, ':') || !(value = fm__json_string(&at)))
                        return fm__file_wrong(f, "__metadata__ is not an object of strings");
                    if (f->metadata_count == 32) return fm__file_wrong(f, "__metadata__ has more than 32 entries");
                    f->keys[f->metadata_count] = key, f->values[f->metadata_count++] = value;
                } while (fm__json_take(&at, ','));
                if (!fm__json_take(&at, '}')) return fm__file_wrong(f, "__metadata__ is not an object of strings");
            } else {
                if (f->count == f->capacity) return fm__file_wrong(f, "the header is not well-formed JSON");
                if (!fm__parse_tensor_entry(f, &at, name)) return 0;
            }
        } while (fm__json_take(&at, ','));
        if (!fm__json_take(&at, '}')) return fm__file_wrong(f, "the header is not well-formed JSON");
    }
    fm__json_space(&at);
    if (at != end) return fm__file_wrong(f, "the header has something after its JSON object");
    return 1;
}

static const char *fm__metadata(const fm__safetensors_in *f, const char *key) {
    int i;
    for (i = 0; i < f->metadata_count; i++)
        if (strcmp(f->keys[i], key) == 0) return f->values[i];
    return NULL;
}

/* Every tensor's dtype, shape and extent consistent, and the tensors tiling the data exactly:
 * in order of their offsets, each begins where the one before ends, the last at the file's end. */
static int fm__check_safetensors_layout(fm__safetensors_in *f) {
    uint64_t expected = 0;
    int i, j;
    for (i = 0; i < f->count; i++) {
        const fm__tensor_in *t = &f->tensors[i];
        uint64_t bytes = fm__safetensors_dtype_size(t->dtype);
        if (!bytes) return fm__file_wrong(f, "tensor %s has dtype %s, which safetensors does not define", t->name, t->dtype);
        for (j = 0; j < t->rank; j++) {
            if (t->shape[j] != 0 && bytes > UINT64_MAX / t->shape[j])
                return fm__file_wrong(f, "tensor %s: its shape overflows", t->name);
            bytes *= t->shape[j];
        }
        if (t->begin > t->end || t->end - t->begin != bytes)
            return fm__file_wrong(f, "tensor %s: data_offsets [%llu, %llu] do not hold its %llu bytes", t->name,
                                  (unsigned long long)t->begin, (unsigned long long)t->end, (unsigned long long)bytes);
        for (j = 0; j < i; j++)
            if (strcmp(f->tensors[j].name, t->name) == 0) return fm__file_wrong(f, "two tensors are named %s", t->name);
    }
    for (i = 1; i < f->count; i++) { /* by offset (insertion sort: a checkpoint has a few hundred) */
        const fm__tensor_in keep = f->tensors[i];
        for (j = i; j > 0 && f->tensors[j - 1].begin > keep.begin; j--) f->tensors[j] = f->tensors[j - 1];
        f->tensors[j] = keep;
    }
    for (i = 0; i < f->count; i++) {
        if (f->tensors[i].begin != expected)
            return fm__file_wrong(f, "tensor %s begins at byte %llu of the data, not %llu: the data has %s", f->tensors[i].name,
                                  (unsigned long long)f->tensors[i].begin, (unsigned long long)expected,
                                  f->tensors[i].begin > expected ? "a hole" : "overlapping tensors");
        expected = f->tensors[i].end;
    }
    if (expected != f->data_size)
        return fm__file_wrong(f, "the tensors hold %llu bytes of data but the file has %llu after its header: %s",
                              (unsigned long long)expected, (unsigned long long)f->data_size,
                              expected > f->data_size ? "it is truncated" : "it has bytes past its last tensor");
    return 1;
}

static int fm__check_safetensors_crc(fm__safetensors_in *f) {
    const char *stored = fm__metadata(f, "crc32");
    unsigned char buffer[4096];
    fm__crc32 crc;
    uint64_t left = f->data_size;
    unsigned long expected = 0;
    int i;
    if (!stored || strlen(stored) != 8) return fm__file_wrong(f, "__metadata__ has no crc32 of 8 hex digits");
    for (i = 0; i < 8; i++) {
        const int digit = fm__hex_digit(stored[i]);
        if (digit < 0) return fm__file_wrong(f, "__metadata__'s crc32 \"%s\" is not 8 hex digits", stored);
        expected = expected * 16 + (unsigned long)digit;
    }
    fm__crc32_init(&crc);
    if (fseek(f->file, (long)(8 + f->header_length), SEEK_SET) != 0) return fm__file_wrong(f, "cannot read its data");
    while (left > 0) {
        const size_t n = left < sizeof buffer ? (size_t)left : sizeof buffer;
        if (fread(buffer, 1, n, f->file) != n) return fm__file_wrong(f, "cannot read its data");
        fm__crc32_update(&crc, buffer, n);
        left -= n;
    }
    if ((crc.value ^ 0xFFFFFFFFu) != expected)
        return fm__file_wrong(f, "its data's CRC-32 is %08lx, the header says %s: the file is damaged",
                              (unsigned long)(crc.value ^ 0xFFFFFFFFu), stored);
    return 1;
}

/* Opens a safetensors file and checks everything but the tensors' values: the header's length,
 * its JSON, the layout of the data and the checksum. 0 with f->why (or FM_ERR_* in *status). */
static int fm__open_safetensors(const char *path, fm__safetensors_in *f, fm_status *status) {
    unsigned char length_bytes[8];
    long size;
    size_t i;
    memset(f, 0, sizeof *f);
    *status = FM_ERR_BAD_FILE;
    if (!fm__little_endian()) return fm__file_wrong(f, "safetensors data is little-endian; this host is not");
    if (!(f->file = fopen(path, "rb"))) {
        *status = FM_ERR_IO;
        return fm__file_wrong(f, "cannot open it: %s", strerror(errno));
    }
    if (fseek(f->file, 0, SEEK_END) != 0 || (size = ftell(f->file)) < 0 || fseek(f->file, 0, SEEK_SET) != 0) {
        *status = FM_ERR_IO;
        return fm__file_wrong(f, "cannot read it: %s", strerror(errno));
    }
    f->size = (uint64_t)size;
    if (f->size < 8 || fread(length_bytes, 1, 8, f->file) != 8)
        return fm__file_wrong(f, "it has %llu bytes, not even the 8 of the header's length: truncated or not safetensors",
                              (unsigned long long)f->size);
    for (i = 0; i < 8; i++) f->header_length |= (uint64_t)length_bytes[i] << (8 * i);
    if (f->header_length < 2 || f->header_length > FM__SAFETENSORS_MAX_HEADER || f->header_length > f->size - 8)
        return fm__file_wrong(f, "its header length %llu does not fit its %llu bytes (or 100 MB): truncated or not safetensors",
                              (unsigned long long)f->header_length, (unsigned long long)f->size);
    f->data_size = f->size - 8 - f->header_length;
    if (!(f->header = (char *)fm_alloc((size_t)f->header_length + 1))) return *status = FM_ERR_OUT_OF_MEMORY, 0;
    if (fread(f->header, 1, (size_t)f->header_length, f->file) != (size_t)f->header_length)
        return fm__file_wrong(f, "cannot read its header");
    f->header[f->header_length] = '\0';
    if (strlen(f->header) != (size_t)f->header_length) return fm__file_wrong(f, "its header has a NUL byte: not safetensors");
    if (f->header[0] != '{') return fm__file_wrong(f, "its header does not begin with '{': not safetensors");
    for (i = 0; i < f->header_length; i++) f->capacity += f->header[i] == '{'; /* at most one tensor per object */
    if (!(f->tensors = (fm__tensor_in *)fm_alloc((size_t)f->capacity * sizeof *f->tensors))) return *status = FM_ERR_OUT_OF_MEMORY, 0;
    if (!fm__parse_safetensors_header(f)) return 0;
    return 1;
}

static void fm__close_safetensors(fm__safetensors_in *f) {
    if (f->file) fclose(f->file);
    fm_free(f->header);
    fm_free(f->tensors);
    f->file = NULL, f->header = NULL, f->tensors = NULL;
}

/* ---- the checkpoint's configuration and training state ------------------------------------ */

/* One field of a flat JSON object of numbers and lists of numbers: where its numbers' texts are. */
typedef struct fm__json_field {
    const char *key;
    const char *number[FLEXMOE_MODEL_MAX_MODALITIES];
    int count, list;
} fm__json_field;

static int fm__json_number_span(char **at, const char **start) {
    fm__json_space(at);
    *start = *at;
    while ((**at >= '0' && **at <= '9') || **at == '-' || **at == '+' || **at == '.' || **at == 'e' || **at == 'E') (*at)++;
    return *at > *start;
}

/* Parses text (decoded in place) into fields; 0 when it is not such an object. */
static int fm__json_fields(char *text, fm__json_field *fields, int most, int *count) {
    char *at = text;
    *count = 0;
    if (!fm__json_take(&at, '{')) return 0;
    if (!fm__json_take(&at, '}')) {
        do {
            fm__json_field *field = &fields[*count];
            if (*count == most || !(field->key = fm__json_string(&at)) || !fm__json_take(&at, ':')) return 0;
            field->count = 0, field->list = fm__json_take(&at, '[');
            if (field->list) {
                if (!fm__json_take(&at, ']')) {
                    do {
                        if (field->count == FLEXMOE_MODEL_MAX_MODALITIES || !fm__json_number_span(&at, &field->number[field->count++]))
                            return 0;
                    } while (fm__json_take(&at, ','));
                    if (!fm__json_take(&at, ']')) return 0;
                }
            } else if (!fm__json_number_span(&at, &field->number[field->count++])) {
                return 0;
            }
            (*count)++;
        } while (fm__json_take(&at, ','));
        if (!fm__json_take(&at, '}')) return 0;
    }
    fm__json_space(&at);
    return *at == '\0';
}

/* The field's i-th number as a double, checked to be finite, whole where `whole`, in [lo, hi]. */
static int fm__json_field_number(const fm__json_field *fields, int count, const char *key, int i, int whole, double lo, double hi,
                                 double *value) {
    int f;
    for (f = 0; f < count; f++)
        if (strcmp(fields[f].key, key) == 0 && i < fields[f].count) {
            char text[48], *end;
            const char *start = fields[f].number[i];
            size_t n = 0;
            while (n + 1 < sizeof text && ((start[n] >= '0' && start[n] <= '9') || start[n] == '-' || start[n] == '+' ||
                                           start[n] == '.' || start[n] == 'e' || start[n] == 'E'))
                text[n] = start[n], n++;
            text[n] = '\0';
            *value = strtod(text, &end);
            return *end == '\0' && *value - *value == 0.0 && (!whole || *value == floor(*value)) && *value >= lo && *value <= hi;
        }
    return 0;
}

static int fm__checkpoint_config(fm__safetensors_in *f, fm_model_desc *d) {
    static const char *const ints[] = {"modalities", "classes", "patches", "dim", "heads", "experts", "top_k", "hidden",
                                       "no_attention_residual"};
    fm__json_field fields[24];
    char *text;
    double v;
    int count, i, *const int_fields[] = {&d->modalities, &d->classes, &d->patches, &d->dim, &d->heads, &d->experts,
                                         &d->top_k, &d->hidden, &d->no_attention_residual};
    float *const float_fields[] = {&d->dropout, &d->gate_loss_weight, &d->layernorm_eps};
    static const char *const floats[] = {"dropout", "gate_loss_weight", "layernorm_eps"};
    static const char *const choices[] = {"gate", "confidence", "imputation"}; /* absent: 0 */
    memset(d, 0, sizeof *d);
    if (!(text = (char *)fm__metadata(f, "config"))) return fm__file_wrong(f, "__metadata__ has no config");
    if (!fm__json_fields(text, fields, 24, &count)) return fm__file_wrong(f, "__metadata__'s config is not a JSON object of numbers");
    for (i = 0; i < 3; i++) {
        int present = 0, j;
        for (j = 0; j < count; j++) present |= strcmp(fields[j].key, choices[i]) == 0;
        if (present && !fm__json_field_number(fields, count, choices[i], 0, 1, 0, 8, &v))
            return fm__file_wrong(f, "config: %s is not a small count", choices[i]);
        v = present ? v : 0.0;
        if (i == 0) d->gate = (fm_gate_kind)(int)v;
        else if (i == 1) d->confidence = (fm_conf_mode)(int)v;
        else d->imputation = (fm_imputation)(int)v;
    }
    for (i = 0; i < (int)(sizeof ints / sizeof *ints); i++) {
        if (!fm__json_field_number(fields, count, ints[i], 0, 1, -1e9, 1e9, &v))
            return fm__file_wrong(f, "config: %s is missing or not an integer", ints[i]);
        *int_fields[i] = (int)v;
    }
    for (i = 0; i < 3; i++) {
        if (!fm__json_field_number(fields, count, floats[i], 0, 0, -1e30, 1e30, &v))
            return fm__file_wrong(f, "config: %s is missing or not a finite number", floats[i]);
        *float_fields[i] = (float)v;
    }
    for (i = 0; i < count; i++) /* absent in version 1 files before the second imputation stage: 0, the default */
        if (strcmp(fields[i].key, "impute_keep") == 0) {
            if (!fm__json_field_number(fields, count, "impute_keep", 0, 0, 0.0, 1.0, &v))
                return fm__file_wrong(f, "config: impute_keep is not a number in [0, 1]");
            d->impute_keep = (float)v;
        }
    if (d->modalities < 1 || d->modalities > FLEXMOE_MODEL_MAX_MODALITIES) return fm__file_wrong(f, "config: modalities is %d", d->modalities);
    for (i = 0; i < d->modalities; i++) {
        if (!fm__json_field_number(fields, count, "features", i, 1, 1, 1 << 24, &v))
            return fm__file_wrong(f, "config: features must list %d counts of 1 .. 2^24", d->modalities);
        d->features[i] = (int)v;
    }
    return 1;
}

static int fm__checkpoint_training(fm__safetensors_in *f, fm_train_state *s) {
    fm__json_field fields[16];
    char *text;
    double v[9];
    int count, i;
    static const char *const keys[] = {"epoch", "step", "best_epoch", "best_samples", "best_accuracy", "best_macro_f1",
                                       "best_macro_auc", "best_loss", "seed"};
    memset(s, 0, sizeof *s);
    if (!(text = (char *)fm__metadata(f, "training"))) return fm__file_wrong(f, "__metadata__ has no training");
    if (!fm__json_fields(text, fields, 16, &count)) return fm__file_wrong(f, "__metadata__'s training is not a JSON object of numbers");
    for (i = 0; i < 8; i++)
        if (!fm__json_field_number(fields, count, keys[i], 0, i < 4, i < 4 ? 0.0 : -1e30, i < 4 ? 9e15 : 1e30, &v[i]))
            return fm__file_wrong(f, "training: %s is missing or not a %s", keys[i], i < 4 ? "count" : "finite number");
    for (i = 0; i < count; i++) /* the seed: all 64 bits, so not through a double */
        if (strcmp(fields[i].key, "seed") == 0 && !fields[i].list && fields[i].number[0][0] != '-') {
            char *end;
            errno = 0;
            s->seed = (uint64_t)strtoull(fields[i].number[0], &end, 10);
            if (errno == 0 && end != fields[i].number[0] && !(*end >= '0' && *end <= '9') && *end != '.' && *end != 'e' &&
                *end != 'E')
                break;
        }
    if (i == count) return fm__file_wrong(f, "training: seed is missing or not a count");
    if (v[0] > 1e9 || v[2] > v[0] || v[3] > 1e9)
        return fm__file_wrong(f, "training: best_epoch %g must be at most epoch %g", v[2], v[0]);
    s->epoch = (int)v[0], s->step = (int64_t)v[1], s->best_epoch = (int)v[2];
    s->best_validation.samples = (int)v[3], s->best_validation.accuracy = (float)v[4];
    s->best_validation.macro_f1 = (float)v[5], s->best_validation.macro_auc = (float)v[6], s->best_validation.loss = (float)v[7];
    return 1;
}

/* Each tensor of the file a tensor of the model's arenas, of the same shape, each exactly once. */
static int fm__match_checkpoint(fm__safetensors_in *f, const fm_model *model, int arenas, int *slot) {
    unsigned char seen[4][FLEXMOE_MODEL_MAX_TENSORS];
    int i, a, j;
    memset(seen, 0, sizeof seen);
    for (i = 0; i < f->count; i++) {
        const fm__tensor_in *t = &f->tensors[i];
        const fm_tensor_info *info = NULL;
        for (a = arenas - 1; a >= 0 && !info; a--) {
            const size_t n = strlen(fm__checkpoint_prefixes[a]);
            if (strncmp(t->name, fm__checkpoint_prefixes[a], n) == 0 && (info = fm_model_tensor(model, t->name + n))) break;
        }
        if (!info) return fm__file_wrong(f, "tensor %s is not part of this checkpoint's model", t->name);
        if (strcmp(t->dtype, "F32") != 0) return fm__file_wrong(f, "tensor %s is %s; checkpoints hold F32", t->name, t->dtype);
        for (j = 0; j < 4 && (j >= info->rank || t->shape[j] == (uint64_t)info->shape[j]); j++) {}
        if (t->rank != info->rank || j < 4)
            return fm__file_wrong(f, "tensor %s's shape does not match the config's (%d dimensions: %d %d %d %d)", t->name,
                                  info->rank, info->shape[0], info->shape[1], info->shape[2], info->shape[3]);
        slot[i] = a * FLEXMOE_MODEL_MAX_TENSORS + (int)(info - model->tensors);
        seen[a][info - model->tensors] = 1;
    }
    for (a = 0; a < arenas; a++)
        for (j = 0; j < model->tensor_count; j++)
            if (!seen[a][j])
                return fm__file_wrong(f, "it lacks tensor %s%s", fm__checkpoint_prefixes[a], model->tensors[j].name);
    return 1;
}

static int fm__read_checkpoint_tensors(fm__safetensors_in *f, fm_model *model, const int *slot, float *scratch) {
    int i;
    for (i = 0; i < f->count; i++) {
        const fm__tensor_in *t = &f->tensors[i];
        const fm_tensor_info *info = &model->tensors[slot[i] % FLEXMOE_MODEL_MAX_TENSORS];
        float *dest = fm__checkpoint_arena(model, slot[i] / FLEXMOE_MODEL_MAX_TENSORS) + info->offset;
        float *into = info->packed ? scratch : dest;
        const size_t n = (size_t)(t->end - t->begin) / sizeof(float);
        size_t j;
        if (fseek(f->file, (long)(8 + f->header_length + t->begin), SEEK_SET) != 0 || fread(into, sizeof(float), n, f->file) != n)
            return fm__file_wrong(f, "cannot read tensor %s", t->name);
        for (j = 0; j < n; j++)
            if (!(into[j] - into[j] == 0.0f))
                return fm__file_wrong(f, "tensor %s holds %s at element %zu", t->name, into[j] != into[j] ? "NaN" : "an infinity", j);
        if (info->packed) fm_pack_weights(info->shape[0], info->shape[1], info->shape[2], FM_WEIGHTS_IN_BY_OUT, into, info->shape[2], dest);
    }
    return 1;
}

fm_status fm_model_load(const char *path, int max_samples, fm_model *model) {
    static const char caller[] = "fm_model_load";
    fm__safetensors_in f;
    fm_model_desc desc;
    fm_train_state trained;
    fm_status status = FM_OK;
    int *slot = NULL, ok;
    float *scratch = NULL;
    const char *format, *version;
    if (!model) return FM_ERR_NULL_POINTER;
    memset(model, 0, sizeof *model);
    if (!path) return FM_ERR_NULL_POINTER;
    if (max_samples < 1 || max_samples > (1 << 20)) {
        fm__log(FM_LOG_ERROR, "%s: max_samples must be 1 .. 2^20 (got %d)", caller, max_samples);
        return FM_ERR_INVALID_SHAPE;
    }
    ok = fm__open_safetensors(path, &f, &status);
    if (ok && (!(format = fm__metadata(&f, "format")) || strcmp(format, FM__CHECKPOINT_FORMAT) != 0))
        ok = fm__file_wrong(&f, "it is safetensors but not a flexmoe checkpoint (its __metadata__ has no format \"%s\")",
                            FM__CHECKPOINT_FORMAT);
    if (ok && (!(version = fm__metadata(&f, "version")) || strcmp(version, FM__CHECKPOINT_VERSION) != 0))
        ok = fm__file_wrong(&f, "it is a checkpoint of format version %s; this library reads version %s",
                            version ? version : "(none)", FM__CHECKPOINT_VERSION);
    ok = ok && fm__check_safetensors_layout(&f) && fm__checkpoint_config(&f, &desc) && fm__checkpoint_training(&f, &trained);
    ok = ok && fm__check_safetensors_crc(&f);
    if (ok) {
        status = fm_model_create(&desc, max_samples, model);
        if (status == FM_ERR_INVALID_ARGUMENT)
            ok = fm__file_wrong(&f, "its config is not a valid model (the message above says why)"), status = FM_ERR_BAD_FILE;
        else if (status != FM_OK) ok = 0;
        else status = FM_ERR_BAD_FILE;
    }
    if (ok) {
        size_t largest = 0;
        int i;
        for (i = 0; i < model->tensor_count; i++)
            if (model->tensors[i].packed && model->tensors[i].floats > largest) largest = model->tensors[i].floats;
        slot = (int *)fm_alloc((size_t)(f.count ? f.count : 1) * sizeof(int));
        scratch = (float *)fm_alloc(largest * sizeof(float) + 64);
        if (!slot || !scratch) ok = 0, status = FM_ERR_OUT_OF_MEMORY;
    }
    ok = ok && fm__match_checkpoint(&f, model, trained.best_epoch > 0 ? 4 : 3, slot) &&
         fm__read_checkpoint_tensors(&f, model, slot, scratch);
    if (ok) {
        model->trained = trained;
        status = FM_OK;
    } else {
        if (f.why[0]) fm__log(FM_LOG_ERROR, "%s: %s: %s", caller, path, f.why);
        if (status == FM_OK) status = FM_ERR_BAD_FILE;
        fm_model_destroy(model);
    }
    fm_free(slot), fm_free(scratch);
    fm__close_safetensors(&f);
    return status;
}

#endif /* FLEXMOE_NO_STDIO */

#endif /* FLEXMOE_IMPLEMENTATION */

