/* The library as a hostile or careless user meets it: the regression tests of the defects issue,
 * each on every path. Arguments at the edges of their documented ranges (infinite epsilon,
 * 1100 experts, rows of 2^24 + 2 columns, offsets near FLEXMOE_MAX_DIM, INT_MAX everywhere),
 * calls that must fail loudly (a NULL output, a half-installed allocator, a corrupted routing
 * plan, a path switched away on another thread), and what every public call must leave behind:
 * a clean upper vector state (XINUSE) and a small stack. */
#include "fm_test.h"

#include <float.h>
#include <pthread.h>
#include <sys/mman.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

/* The stack a public call may use, measured on a painted thread stack (without sanitizers,
 * whose redzones inflate frames). The documented bound in flexmoe.h. */
#define STACK_BOUND (16 * 1024)

static float *random_floats(size_t n, float scale) {
    float *v = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) v[i] = (float)(fm_test_normal() * scale);
    return v;
}

/* Anonymous memory reserved but not committed: matrices with FLEXMOE_MAX_DIM rows whose pages
 * are only touched where a call reads or writes. NULL where the system refuses. */
static float *reserve_floats(size_t n) {
    void *p = mmap(NULL, n * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : (float *)p;
}

/* ---- 1. the gate's padding lanes never win; a non-finite epsilon is refused ------------------ */

static void check_gate_epsilon(void) {
    const int T = 21, E = 14, k = 11;
    const float epsilons[] = {INFINITY, -INFINITY, NAN, -1.0f};
    float *clean = random_floats((size_t)T * E, 1.0f), *noise = random_floats((size_t)T * E, 1.0f);
    float *gates = (float *)malloc((size_t)T * k * sizeof(float)), *noisy = (float *)malloc((size_t)T * E * sizeof(float));
    float *importance = (float *)malloc((size_t)2 * E * sizeof(float)), *load = (float *)malloc((size_t)2 * E * sizeof(float));
    int32_t *idx = (int32_t *)malloc((size_t)T * k * sizeof(int32_t)), group[21];
    fm_gate_desc desc;
    fm_gate_tensors t;
    size_t i;
    int in_range = 1, e;
    memset(&desc, 0, sizeof desc);
    memset(&t, 0, sizeof t);
    for (i = 0; i < (size_t)T; i++) group[i] = (int32_t)(i % 2);
    desc.tokens = T, desc.experts = E, desc.top_k = k, desc.training = 1, desc.groups = 2, desc.seed = 7;
    t.clean_logits = clean, t.noise_logits = noise, t.token_group = group, t.indices = idx, t.gates = gates;
    t.importance = importance, t.load = load;
    for (i = 0; i < sizeof epsilons / sizeof epsilons[0]; i++) {
        desc.noise_epsilon = epsilons[i];
        FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_ARGUMENT, "noise_epsilon %g is refused", (double)epsilons[i]);
        FM_CHECK(fm_gate_noise_forward(&desc, clean, E, noise, E, noisy, E, NULL, 0) == FM_ERR_INVALID_ARGUMENT,
                 "fm_gate_noise_forward refuses noise_epsilon %g", (double)epsilons[i]);
    }
    /* The largest finite epsilon: std near FLT_MAX, so the padding lanes' -Inf + n * std is NaN
     * for half the draws, and real experts with -Inf clean logits go NaN too. */
    desc.noise_epsilon = FLT_MAX;
    for (i = 0; i < (size_t)T * E; i += 5) clean[i] = -INFINITY;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_OK, "the largest finite epsilon runs");
    for (i = 0; i < (size_t)T * k; i++) in_range &= idx[i] >= 0 && idx[i] < E;
    FM_CHECK(in_range, "every selected index is a real expert (a padding lane never wins)");
    for (e = 0; e < 2 * E; e++) in_range &= !(importance[e] < 0.0f);
    FM_CHECK(in_range, "importance stays in its buffer and non-negative");
    free(clean), free(noise), free(gates), free(noisy), free(importance), free(load), free(idx);
}

/* ---- 2. the noise kernel beyond the gate's expert limit ------------------------------------- */

static void check_gate_noise_many_experts(void) {
    const int T = 3, E = FLEXMOE_GATE_MAX_EXPERTS + 76;
    float *clean = random_floats((size_t)T * E, 1.0f), *noise = random_floats((size_t)T * E, 1.0f);
    float *noisy = (float *)malloc((size_t)T * E * sizeof(float)), *std = (float *)malloc((size_t)T * E * sizeof(float));
    fm_gate_desc desc;
    double worst = 0.0;
    int t, e;
    memset(&desc, 0, sizeof desc);
    desc.tokens = T, desc.experts = E, desc.seed = 3, desc.token_offset = 11;
    FM_CHECK(fm_gate_noise_forward(&desc, clean, E, noise, E, noisy, E, NULL, 0) == FM_OK, "%d experts without std", E);
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) {
            const double r = noise[t * E + e], s = (r > 0 ? r : 0.0) + log1p(exp(-fabs(r))) + 0.01;
            const double want = clean[t * E + e] + (double)fm_gate_noise(3, 11 + (uint64_t)t, e) * s;
            const double d = fabs(noisy[t * E + e] - want) / (1.0 + fabs(want));
            worst = d > worst ? d : worst;
        }
    FM_CHECK(worst < 1e-5, "noisy = clean + n * std for %d experts (worst %.3g)", E, worst);
    FM_CHECK(fm_gate_noise_forward(&desc, clean, E, noise, E, noisy, E, std, E) == FM_OK, "%d experts with std", E);
    free(clean), free(noise), free(noisy), free(std);
}

/* ---- 3. a NULL value of the router loss --------------------------------------------------- */

static void check_router_loss_outputs(void) {
    const int T = 5, E = 4;
    float *logits = random_floats((size_t)T * E, 1.0f), *importance = random_floats(E, 1.0f), *load = random_floats(E, 1.0f);
    float value = -1.0f;
    int32_t combination[5] = {0, 1, 2, 3, 1};
    FM_CHECK(fm_flexmoe_router_loss(T, E, 1, logits, E, combination, importance, load, NULL, NULL, E, NULL, NULL) ==
                 FM_ERR_NULL_POINTER,
             "fm_flexmoe_router_loss with value NULL");
    FM_CHECK(fm_flexmoe_router_loss(T, E, 1, logits, E, combination, importance, load, &value, NULL, E, NULL, NULL) == FM_OK &&
                 value >= 0.0f,
             "fm_flexmoe_router_loss with every gradient NULL");
    free(logits), free(importance), free(load);
}

/* ---- 4. top-k over rows wider than float lanes number exactly --------------------------------- */

static void check_topk_wide_rows(void) {
    const int cols = (1 << 24) + 2;
    float *x = (float *)malloc((size_t)cols * sizeof(float)), values[2];
    int32_t idx[2];
    int j;
    for (j = 0; j < cols; j++) x[j] = (float)(j % 1000) * 1e-3f;
    x[(1 << 24) + 1] = 5.0f; /* 16777217: not a float */
    x[7] = 4.0f;
    FM_CHECK(fm_topk(1, cols, 2, x, cols, idx, 2, values, 2) == FM_OK, "top-2 of 2^24 + 2 columns");
    FM_CHECK(idx[0] == (1 << 24) + 1 && idx[1] == 7 && values[0] == 5.0f && values[1] == 4.0f,
             "column 2^24 + 1 found exactly (got %d, %d)", (int)idx[0], (int)idx[1]);
    free(x);
}

/* ---- 5 and 7. index arithmetic at the top of int ------------------------------------------ */

static void check_int_limits(void) {
    const int32_t too_far[2] = {INT_MAX - 5, INT_MAX - 1};
    const int32_t negative[2] = {-1, 3};
    float w[64], y[64];
    fm_expert_ffn_desc ffn;
    fm_expert_ffn_params params;
    FM_CHECK(fm_packed_weight_floats(1, INT_MAX - 62) == 0 && fm_packed_weight_floats(3, FLEXMOE_MAX_DIM + 1) == 0,
             "out_features above FLEXMOE_MAX_DIM: 0 floats");
    FM_CHECK(fm_packed_weight_floats(1, FLEXMOE_MAX_DIM) == (size_t)FLEXMOE_MAX_DIM &&
                 fm_packed_weight_floats(3, 100) == 3 * 128,
             "packed floats at FLEXMOE_MAX_DIM and at 100");
    FM_CHECK(isfinite(fm_gate_noise(1, UINT64_MAX, INT_MAX)) && isfinite(fm_gate_noise(1, 0, -5)),
             "fm_gate_noise at expert INT_MAX and -5");
    FM_CHECK(fm_pack_weights(1, 1, INT_MAX - 62, FM_WEIGHTS_IN_BY_OUT, w, INT_MAX, y) == FM_ERR_OVERFLOW,
             "pack with out_features near INT_MAX");
    FM_CHECK(fm_grouped_gemm_forward(1, too_far, 1, 1, w, 1, w, NULL, y, 1) == FM_ERR_OVERFLOW,
             "grouped GEMM forward with offsets near INT_MAX");
    FM_CHECK(fm_grouped_gemm_backward(1, too_far, 1, 1, w, 1, w, w, 1, y, 1, NULL, NULL) == FM_ERR_OVERFLOW,
             "grouped GEMM backward with offsets near INT_MAX");
    FM_CHECK(fm_grouped_gemm_forward(1, negative, 1, 1, w, 1, w, NULL, y, 1) == FM_ERR_INVALID_ARGUMENT, "offsets[0] < 0");
    memset(&ffn, 0, sizeof ffn);
    memset(&params, 0, sizeof params);
    ffn.experts = 1, ffn.dim = 1, ffn.hidden = 1;
    params.w1 = w, params.w2 = w;
    FM_CHECK(fm_expert_ffn_forward(&ffn, too_far, &params, w, 1, y, 1, y, 1, NULL, 0) == FM_ERR_OVERFLOW,
             "expert FFN with offsets near INT_MAX");
    FM_CHECK(fm_softmax_forward(FLEXMOE_MAX_DIM + 1, 1, w, 1, y, 1) == FM_ERR_OVERFLOW, "rows above FLEXMOE_MAX_DIM");
}

/* The FFN forward and the GEMM backward on rows [FLEXMOE_MAX_DIM - 300, FLEXMOE_MAX_DIM) of
 * reserved matrices give the floats they give on the same rows at offset 0. */
static void check_offsets_at_the_limit(void) {
    const int E = 2, D = 3, H = 5, first = FLEXMOE_MAX_DIM - 300, rows = 300;
    const int32_t high[3] = {first, first + 100, FLEXMOE_MAX_DIM}, low[3] = {0, 100, 300};
    const size_t extent = (size_t)FLEXMOE_MAX_DIM;
    float *x = reserve_floats(extent * D), *y = reserve_floats(extent * D), *hidden = reserve_floats(extent * H);
    float *pre = reserve_floats(extent * H), *dx = reserve_floats(extent * D), *dh = reserve_floats(extent * H);
    float *w1 = random_floats((size_t)E * fm_packed_weight_floats(D, H), 0.5f);
    float *w2 = random_floats((size_t)E * fm_packed_weight_floats(H, D), 0.5f);
    float *x0 = random_floats((size_t)rows * D, 1.0f), *dy0 = random_floats((size_t)rows * D, 1.0f);
    float *y0 = (float *)malloc((size_t)rows * D * sizeof(float)), *h0 = (float *)malloc((size_t)rows * H * sizeof(float));
    float *p0 = (float *)malloc((size_t)rows * H * sizeof(float)), *dx0 = (float *)malloc((size_t)rows * D * sizeof(float));
    float *dh0 = (float *)malloc((size_t)rows * H * sizeof(float));
    float *dw1 = (float *)malloc((size_t)E * fm_packed_weight_floats(D, H) * sizeof(float));
    float *dw1_high = (float *)malloc((size_t)E * fm_packed_weight_floats(D, H) * sizeof(float));
    fm_expert_ffn_desc desc;
    fm_expert_ffn_params params;
    fm_expert_ffn_grads grads;
    int same;
    if (!x || !y || !hidden || !pre || !dx || !dh) {
        printf("test_robustness: skipping offsets at FLEXMOE_MAX_DIM: the system refused %zu GiB of reserved memory\n",
               extent * (3 * D + 3 * H) * sizeof(float) >> 30);
    } else {
        memset(&desc, 0, sizeof desc);
        memset(&params, 0, sizeof params);
        memset(&grads, 0, sizeof grads);
        desc.experts = E, desc.dim = D, desc.hidden = H;
        params.w1 = w1, params.w2 = w2;
        memcpy(x + (size_t)first * D, x0, (size_t)rows * D * sizeof(float));
        memset(y + (size_t)first * D, 0xFF, (size_t)rows * D * sizeof(float)); /* NaN: unwritten shows */
        FM_CHECK(fm_expert_ffn_forward(&desc, low, &params, x0, D, y0, D, h0, H, p0, H) == FM_OK, "FFN at offset 0");
        FM_CHECK(fm_expert_ffn_forward(&desc, high, &params, x, D, y, D, hidden, H, pre, H) == FM_OK,
                 "FFN with offsets near FLEXMOE_MAX_DIM");
        same = memcmp(y + (size_t)first * D, y0, (size_t)rows * D * sizeof(float)) == 0;
        FM_CHECK(same, "FFN rows near FLEXMOE_MAX_DIM are written, equal to the same rows at offset 0");
        grads.w1 = dw1;
        FM_CHECK(fm_grouped_gemm_backward(E, low, D, H, x0, D, w1, p0, H, dx0, D, dw1, NULL) == FM_OK, "GEMM backward at 0");
        memcpy(pre + (size_t)first * H, p0, (size_t)rows * H * sizeof(float));
        memset(dx + (size_t)first * D, 0xFF, (size_t)rows * D * sizeof(float));
        FM_CHECK(fm_grouped_gemm_backward(E, high, D, H, x, D, w1, pre, H, dx, D, dw1_high, NULL) == FM_OK,
                 "GEMM backward with offsets near FLEXMOE_MAX_DIM");
        FM_CHECK(memcmp(dx + (size_t)first * D, dx0, (size_t)rows * D * sizeof(float)) == 0 &&
                     memcmp(dw1, dw1_high, (size_t)E * fm_packed_weight_floats(D, H) * sizeof(float)) == 0,
                 "GEMM backward rows near FLEXMOE_MAX_DIM: dx and dW equal to offset 0");
        memcpy(y + (size_t)first * D, dy0, (size_t)rows * D * sizeof(float));
        FM_CHECK(fm_expert_ffn_backward(&desc, low, &params, x0, D, p0, H, h0, H, dy0, D, dx0, D, &grads, dh0, H) == FM_OK &&
                     fm_expert_ffn_backward(&desc, high, &params, x, D, pre, H, hidden, H, y, D, dx, D, &grads, dh, H) ==
                         FM_OK &&
                     memcmp(dx + (size_t)first * D, dx0, (size_t)rows * D * sizeof(float)) == 0,
                 "FFN backward rows near FLEXMOE_MAX_DIM");
    }
    if (x) munmap(x, extent * D * sizeof(float));
    if (y) munmap(y, extent * D * sizeof(float));
    if (dx) munmap(dx, extent * D * sizeof(float));
    if (hidden) munmap(hidden, extent * H * sizeof(float));
    if (pre) munmap(pre, extent * H * sizeof(float));
    if (dh) munmap(dh, extent * H * sizeof(float));
    free(w1), free(w2), free(x0), free(dy0), free(y0), free(h0), free(p0), free(dx0), free(dh0), free(dw1), free(dw1_high);
}

/* ---- 8. switching paths while kernels run on other threads ---------------------------------- */

static void quiet_log(fm_log_level level, const char *message, void *user_data) {
    (void)level, (void)message, (void)user_data;
}


#define SWITCH_ROWS 4
#define SWITCH_COLS 40
#define SWITCH_CALLS 1000000 /* per worker; or 5 s, whichever comes first */

typedef struct switch_worker {
    const float *x;
    long calls, ok_without_output, bad_status;
    volatile int *stop;
} switch_worker;

static void *softmax_while_switching(void *arg) {
    switch_worker *w = (switch_worker *)arg;
    float y[SWITCH_ROWS * SWITCH_COLS];
    while (!*w->stop && w->calls < SWITCH_CALLS) {
        fm_status status;
        int i, written = 1;
        for (i = 0; i < SWITCH_ROWS * SWITCH_COLS; i++) y[i] = -1.0f;
        status = fm_softmax_forward(SWITCH_ROWS, SWITCH_COLS, w->x, SWITCH_COLS, y, SWITCH_COLS);
        for (i = 0; i < SWITCH_ROWS * SWITCH_COLS; i++) written &= y[i] >= 0.0f;
        w->calls++;
        if (status == FM_OK && !written) w->ok_without_output++;
        if (status != FM_OK && status != FM_ERR_UNSUPPORTED_ISA) w->bad_status++;
    }
    return NULL;
}

static void check_switch_under_load(fm_isa isa) {
    const fm_isa foreign = fm_isa_supported(FM_ISA_NEON) ? FM_ISA_AVX2 : FM_ISA_NEON; /* never runs here */
    float *x = random_floats(SWITCH_ROWS * SWITCH_COLS, 2.0f);
    volatile int stop = 0;
    switch_worker workers[2];
    pthread_t threads[2];
    fm_desc quiet; /* the foreign path would log each time */
    int i, round;
    long calls = 0, silent = 0, bad = 0;
    const clock_t start = clock();
    memset(&quiet, 0, sizeof quiet);
    quiet.isa = isa;
    quiet.logger.func = quiet_log;
    fm_setup(&quiet);
    for (i = 0; i < 2; i++) {
        memset(&workers[i], 0, sizeof workers[i]);
        workers[i].x = x;
        workers[i].stop = &stop;
        pthread_create(&threads[i], NULL, softmax_while_switching, &workers[i]);
    }
    for (round = 0; (workers[0].calls < SWITCH_CALLS || workers[1].calls < SWITCH_CALLS) &&
                    (double)(clock() - start) < 5.0 * CLOCKS_PER_SEC;
         round++)
        fm_set_isa(round % 3 == 2 ? foreign : round % 3 ? isa : FM_ISA_SCALAR);
    stop = 1;
    for (i = 0; i < 2; i++) {
        pthread_join(threads[i], NULL);
        calls += workers[i].calls, silent += workers[i].ok_without_output, bad += workers[i].bad_status;
    }
    fm_setup(NULL);
    fm_test_use_isa(isa);
    FM_CHECK(silent == 0 && bad == 0, "%ld softmax calls while the path switched: %ld returned FM_OK without output, %ld "
             "an unexpected status", calls, silent, bad);
    free(x);
}

/* ---- 9. the allocator hooks ---------------------------------------------------------------- */

/* A bump allocator over a static arena: handing its blocks to free() would be a bad free. */
static unsigned char arena[1 << 16];
static size_t arena_used, arena_live;

static void *arena_alloc(size_t size, void *user_data) {
    void *p;
    (void)user_data;
    if (arena_used + size > sizeof arena) return NULL;
    p = arena + arena_used;
    arena_used += (size + 63) & ~(size_t)63;
    arena_live++;
    return p;
}

static void arena_free(void *ptr, void *user_data) {
    (void)user_data;
    if (ptr) arena_live--;
}

static void check_allocator_hooks(fm_isa isa) {
    fm_desc desc;
    void *block, *plain;
    memset(&desc, 0, sizeof desc);
    desc.isa = isa;
    desc.logger.func = quiet_log; /* the rejections below log */
    FM_CHECK(fm_setup(&desc) == FM_OK, "quiet logger");
    desc.allocator.alloc = arena_alloc;
    FM_CHECK(fm_setup(&desc) == FM_ERR_INVALID_ARGUMENT, "fm_setup with alloc but no free");
    desc.allocator.alloc = NULL, desc.allocator.free = arena_free;
    FM_CHECK(fm_setup(&desc) == FM_ERR_INVALID_ARGUMENT, "fm_setup with free but no alloc");
    plain = fm_alloc(100); /* the rejected hooks were not installed: this is malloc's */
    desc.allocator.alloc = arena_alloc;
    FM_CHECK(arena_live == 0 && fm_setup(&desc) == FM_OK, "a complete allocator is accepted");
    block = fm_alloc(1000);
    FM_CHECK(block && arena_live == 1 && ((uintptr_t)block & 63) == 0, "fm_alloc goes through the hook, 64-byte aligned");
    desc.allocator.alloc = NULL, desc.allocator.free = NULL;
    FM_CHECK(fm_setup(&desc) == FM_OK, "back to malloc and free");
    fm_free(block); /* made by the arena: must go back to it, not to free() */
    fm_free(plain);
    FM_CHECK(arena_live == 0, "a block goes back to the allocator that made it (%zu left)", arena_live);
    fm_setup(NULL);
    fm_test_use_isa(isa);
}

/* ---- 12 and 13. paths that must agree at the extremes -------------------------------------- */

static void check_gelu_extremes(void) {
    static const float x[] = {1.85e19f, -1.85e19f, 1e30f, -1e30f, FLT_MAX, -FLT_MAX, 30.0f, -30.0f, 2e19f, -2e19f,
                              1e10f, -1e10f, 25.0f, -25.0f, 21.0f, -21.0f};
    const int n = (int)(sizeof x / sizeof x[0]);
    float dy[16], dx[16], y[16];
    const float inf[2] = {INFINITY, -INFINITY};
    float inf_dx[2], inf_dy[2] = {1.0f, 1.0f};
    int kind, i;
    for (i = 0; i < n; i++) dy[i] = 1.0f;
    for (kind = FM_GELU_ERF; kind <= FM_GELU_TANH; kind++) {
        int right = 1;
        FM_CHECK(fm_gelu_backward(1, n, (fm_gelu)kind, x, n, dy, n, dx, n) == FM_OK, "GELU backward");
        FM_CHECK(fm_gelu_forward(1, n, (fm_gelu)kind, x, n, y, n) == FM_OK, "GELU forward");
        for (i = 0; i < n; i++) {
            right &= dx[i] == (x[i] > 0 ? 1.0f : 0.0f);
            right &= y[i] == (x[i] > 0 ? x[i] : 0.0f);
        }
        FM_CHECK(right, "GELU (%s) at |x| from 21 to FLT_MAX: y = max(x, 0) exactly, GELU' = 1 or 0",
                 kind == FM_GELU_ERF ? "erf" : "tanh");
        FM_CHECK(fm_gelu_backward(1, 2, (fm_gelu)kind, inf, 2, inf_dy, 2, inf_dx, 2) == FM_OK && isnan(inf_dx[0]) &&
                     isnan(inf_dx[1]),
                 "GELU (%s) backward at +-Inf is NaN (documented)", kind == FM_GELU_ERF ? "erf" : "tanh");
    }
}

static void check_layernorm_infinite_rows(void) {
    const int cols = 37;
    float x[4 * 37], y[4 * 37], mean[4], rstd[4];
    int r, j, nan_rows = 1;
    for (r = 0; r < 4; r++)
        for (j = 0; j < cols; j++) x[r * cols + j] = (float)(j - 18) * 0.25f;
    x[0 * cols + 5] = INFINITY;
    x[1 * cols + 36] = -INFINITY;
    x[2 * cols + 0] = INFINITY, x[2 * cols + 9] = -INFINITY;
    x[3 * cols + 20] = NAN;
    FM_CHECK(fm_layernorm_forward(4, cols, x, cols, NULL, NULL, 0.0f, y, cols, mean, rstd) == FM_OK, "LayerNorm");
    FM_CHECK(mean[0] == INFINITY && mean[1] == -INFINITY && isnan(mean[2]) && isnan(mean[3]),
             "LayerNorm mean of rows with +Inf, -Inf, both, NaN: %g %g %g %g", (double)mean[0], (double)mean[1],
             (double)mean[2], (double)mean[3]);
    for (r = 0; r < 4; r++) {
        nan_rows &= isnan(rstd[r]);
        for (j = 0; j < cols; j++) nan_rows &= isnan(y[r * cols + j]);
    }
    FM_CHECK(nan_rows, "those rows and their rstd are NaN");
}

/* ---- a routing plan that its build did not make ------------------------------------------- */

static void check_corrupted_plan(void) {
    const int T = 6, k = 2, E = 3, D = 5;
    int32_t idx[12] = {0, 1, 1, 2, 2, 0, 0, 2, 1, 0, 2, 1};
    int32_t counts[3], offsets[4], order[12], position[12];
    float *x = random_floats((size_t)T * D, 1.0f), *xe = (float *)malloc((size_t)T * k * D * sizeof(float));
    float *gates = random_floats((size_t)T * k, 1.0f), *y = (float *)malloc((size_t)T * D * sizeof(float));
    fm_plan_desc desc;
    fm_routing_plan plan;
    memset(&desc, 0, sizeof desc);
    desc.tokens = T, desc.top_k = k, desc.experts = E;
    plan.counts = counts, plan.offsets = offsets, plan.order = order, plan.position = position;
    plan.dropped_per_expert = NULL;
    FM_CHECK(fm_routing_plan_build(&desc, idx, k, NULL, 0, &plan) == FM_OK, "plan");
    FM_CHECK(fm_dispatch_forward(&plan, D, x, D, xe, D) == FM_OK, "dispatch of a built plan");
    position[3] = T * k; /* a row past the dispatched matrix */
    FM_CHECK(fm_dispatch_forward(&plan, D, x, D, xe, D) == FM_ERR_INVALID_ARGUMENT, "dispatch refuses a row past the end");
    FM_CHECK(fm_combine_forward(&plan, D, xe, D, gates, k, y, D) == FM_ERR_INVALID_ARGUMENT, "combine likewise");
    position[3] = position[4]; /* two assignments in one row */
    FM_CHECK(fm_combine_backward(&plan, D, xe, D, gates, k, y, D, xe, D, gates, k) == FM_ERR_INVALID_ARGUMENT,
             "combine backward refuses a row shared by two assignments");
    FM_CHECK(fm_routing_plan_build(&desc, idx, k, NULL, 0, &plan) == FM_OK, "plan rebuilt");
    order[0] = -7;
    FM_CHECK(fm_dispatch_backward(&plan, D, xe, D, y, D) == FM_ERR_INVALID_ARGUMENT, "an order entry out of range");
    plan.tokens = INT_MAX / 2 + 1;
    FM_CHECK(fm_dispatch_forward(&plan, D, x, D, xe, D) == FM_ERR_OVERFLOW, "tokens * top_k above INT32_MAX");
    free(x), free(xe), free(gates), free(y);
}

/* ---- errors before reads: index arrays are read only once every other argument is good ------ */

/* Each call below names an index matrix far larger than its one-int buffer (the guarded heap
 * faults on any read past it) together with another bad argument: the error must come first. */
static void check_errors_before_reads(void) {
    int32_t *one = (int32_t *)malloc(sizeof(int32_t));
    float *values = random_floats(8, 1.0f), value, d[4];
    int32_t counts[2], offsets[3], order[2], position[2];
    fm_plan_desc plan_desc;
    fm_routing_plan plan;
    fm_gate_desc desc;
    fm_gate_tensors t;
    fm_gate_gradients g;
    one[0] = 5; /* out of range too */
    memset(&plan_desc, 0, sizeof plan_desc);
    plan_desc.tokens = 2, plan_desc.top_k = 1, plan_desc.experts = 2;
    plan.counts = NULL, plan.offsets = offsets, plan.order = order, plan.position = position;
    plan.dropped_per_expert = counts;
    FM_CHECK(fm_routing_plan_build(&plan_desc, one, 1000, NULL, 0, &plan) == FM_ERR_NULL_POINTER,
             "plan build: a NULL plan array is reported before the indices are read");
    memset(&desc, 0, sizeof desc);
    memset(&t, 0, sizeof t);
    memset(&g, 0, sizeof g);
    desc.tokens = 2, desc.experts = 2, desc.top_k = 1;
    t.clean_logits = values, t.indices = one, t.ld_indices = 1000, t.gates = values, t.token_group = one;
    FM_CHECK(fm_noisy_gate_backward(&desc, &t, &g) == FM_ERR_NULL_POINTER,
             "gate backward: a NULL d_clean_logits is reported before indices or groups are read");
    FM_CHECK(fm_flexmoe_router_loss(1000, 4, 1, NULL, 4, one, values, values, &value, d, 4, NULL, NULL) ==
                 FM_ERR_NULL_POINTER,
             "router loss: NULL logits reported before the combinations are read");
    free(one), free(values);
}

/* One kept row: dispatch backward copies it, sign of zero included, on every path. */
static void check_single_row_sums(void) {
    const int T = 3, k = 1, E = 2, D = 21;
    int32_t idx[3] = {0, 1, 0}, counts[2], offsets[3], order[3], position[3];
    float *dxe = random_floats((size_t)T * k * D, 1.0f), *dx = (float *)malloc((size_t)T * D * sizeof(float));
    fm_plan_desc desc;
    fm_routing_plan plan;
    int j, same = 1;
    memset(&desc, 0, sizeof desc);
    desc.tokens = T, desc.top_k = k, desc.experts = E;
    plan.counts = counts, plan.offsets = offsets, plan.order = order, plan.position = position;
    plan.dropped_per_expert = NULL;
    FM_CHECK(fm_routing_plan_build(&desc, idx, k, NULL, 0, &plan) == FM_OK, "plan");
    for (j = 0; j < T * k * D; j++) dxe[j] = -0.0f;
    FM_CHECK(fm_dispatch_backward(&plan, D, dxe, D, dx, D) == FM_OK, "dispatch backward");
    for (j = 0; j < T * D; j++) same &= dx[j] == 0.0f && signbit(dx[j]);
    FM_CHECK(same, "a token's one kept row of -0 comes back -0");
    free(dxe), free(dx);
}

/* ---- the packed weights' padding: never read into a result, always written as zero ---------- */

static void check_packed_padding(void) {
    const int E = 2, in = 9, out = 70; /* the second panel has 6 live columns and 58 of padding */
    const int32_t offsets[3] = {0, 5, 45}; /* 5 rows: dot products; 40: transposed blocks */
    const size_t per_expert = fm_packed_weight_floats(in, out), rows = 45;
    float *plain = random_floats((size_t)E * in * out, 0.5f), *packed = (float *)malloc(E * per_expert * sizeof(float));
    float *x = random_floats(rows * in, 1.0f), *dy = random_floats(rows * out, 1.0f);
    float *dx[2], *y[2], *dw = (float *)malloc(E * per_expert * sizeof(float));
    size_t e, k, j;
    int v, zero = 1;
    FM_CHECK(fm_pack_weights(E, in, out, FM_WEIGHTS_IN_BY_OUT, plain, out, packed) == FM_OK, "pack");
    for (v = 0; v < 2; v++) {
        dx[v] = (float *)malloc(rows * in * sizeof(float)), y[v] = (float *)malloc(rows * out * sizeof(float));
        if (v) /* garbage in the padding: what a careless optimiser or loader might leave there */
            for (e = 0; e < (size_t)E; e++)
                for (k = 0; k < (size_t)in; k++)
                    for (j = 6; j < FM_GEMM_PANEL; j++) packed[e * per_expert + (size_t)in * FM_GEMM_PANEL + k * FM_GEMM_PANEL + j] = NAN;
        FM_CHECK(fm_grouped_gemm_forward(E, offsets, in, out, x, in, packed, NULL, y[v], out) == FM_OK &&
                     fm_grouped_gemm_backward(E, offsets, in, out, x, in, packed, dy, out, dx[v], in, NULL, NULL) == FM_OK,
                 "GEMM forward and dx");
    }
    FM_CHECK(memcmp(y[0], y[1], rows * out * sizeof(float)) == 0 && memcmp(dx[0], dx[1], rows * in * sizeof(float)) == 0,
             "NaN in the packed padding changes no float of y or dx");
    x[3] = INFINITY, x[7 * in + 2] = -INFINITY;
    FM_CHECK(fm_grouped_gemm_backward(E, offsets, in, out, x, in, packed, dy, out, NULL, 0, dw, NULL) == FM_OK, "dW");
    for (e = 0; e < (size_t)E; e++)
        for (k = 0; k < (size_t)in; k++)
            for (j = 6; j < FM_GEMM_PANEL; j++) zero &= dw[e * per_expert + (size_t)in * FM_GEMM_PANEL + k * FM_GEMM_PANEL + j] == 0.0f;
    FM_CHECK(zero, "dW's padding is zero even with +-Inf in x");
    for (v = 0; v < 2; v++) free(dx[v]), free(y[v]);
    free(plain), free(packed), free(x), free(dy), free(dw);
}

/* ---- the gate's optional workspace changes no float ---------------------------------------- */

static void check_gate_workspace(void) {
    static const int experts[] = {16, 33, 64, 100, 1024};
    size_t x;
    for (x = 0; x < sizeof experts / sizeof experts[0]; x++) {
        const int T = 37, E = experts[x], k = 4;
        float *clean = random_floats((size_t)T * E, 1.0f), *noise = random_floats((size_t)T * E, 1.0f);
        float *gates[2], *load[2], *importance[2];
        int32_t *idx[2];
        fm_gate_desc desc;
        fm_gate_tensors t;
        int i;
        memset(&desc, 0, sizeof desc);
        memset(&t, 0, sizeof t);
        desc.tokens = T, desc.experts = E, desc.top_k = k, desc.training = 1, desc.seed = 99;
        t.clean_logits = clean, t.noise_logits = noise;
        for (i = 0; i < 2; i++) {
            gates[i] = (float *)malloc((size_t)T * k * sizeof(float));
            idx[i] = (int32_t *)malloc((size_t)T * k * sizeof(int32_t));
            load[i] = (float *)malloc((size_t)E * sizeof(float));
            importance[i] = (float *)malloc((size_t)E * sizeof(float));
            t.gates = gates[i], t.indices = idx[i], t.load = load[i], t.importance = importance[i];
            t.workspace = i ? (float *)malloc(fm_gate_workspace_floats(&desc) * sizeof(float)) : NULL;
            FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_OK, "gate with%s workspace, %d experts", i ? "" : "out", E);
            free(t.workspace);
        }
        FM_CHECK(memcmp(gates[0], gates[1], (size_t)T * k * sizeof(float)) == 0 &&
                     memcmp(idx[0], idx[1], (size_t)T * k * sizeof(int32_t)) == 0 &&
                     memcmp(load[0], load[1], (size_t)E * sizeof(float)) == 0 &&
                     memcmp(importance[0], importance[1], (size_t)E * sizeof(float)) == 0,
                 "%d experts: the workspace changes no float of gates, indices, importance or load", E);
        for (i = 0; i < 2; i++) free(gates[i]), free(idx[i]), free(load[i]), free(importance[i]);
        free(clean), free(noise);
    }
}

/* ---- 6 and 11. what every public call leaves behind ----------------------------------------- */

/* The fixture every call below reads: small shapes that still take each kernel's main paths
 * (40 experts: past the gate's stack tile; an expert of 39 rows: the GEMM's transposed dx). */
enum { T = 41, E = 40, K = 4, D = 24, H = 40, GE = 3, C = 5 };
static struct {
    float *logits, *noise, *probs, *dprobs, *out, *gates, *dgates, *noisy, *std, *top_values, *importance, *load;
    float *dclean, *dnoise, *x, *dx, *wg, *wn, *ln_mean, *ln_rstd, *gamma, *beta, *dgamma, *dbeta, *values;
    float *w1, *w2, *b1, *b2, *dw1, *dw2, *db1, *db2, *plain1, *hidden, *pre, *dhidden, *y, *xe, *ye, *dxe;
    float *conf_w, *conf_b, *probe_w, *probe_b, *h, *dh, *saved, *workspace;
    float *d_conf_w, *d_conf_b, *d_probe_w, *d_probe_b;
    int32_t *idx, *group, *combination, *labels, *slot_experts, *counts, *offsets, *order, *position, *wide_idx;
    int32_t grouped_offsets[GE + 1];
    fm_routing_plan plan;
} f;

static void fixture_setup(void) {
    int t, i;
    fm_plan_desc plan_desc;
    size_t floats;
    fm_confsmoe_desc cd;
    f.logits = random_floats((size_t)T * E, 1.0f), f.noise = random_floats((size_t)T * E, 1.0f);
    f.probs = random_floats((size_t)T * E, 1.0f), f.dprobs = random_floats((size_t)T * E, 1.0f);
    f.out = random_floats((size_t)T * E, 1.0f), f.gates = random_floats((size_t)T * K, 1.0f);
    f.dgates = random_floats((size_t)T * K, 1.0f), f.noisy = random_floats((size_t)T * E, 1.0f);
    f.std = random_floats((size_t)T * E, 1.0f), f.top_values = random_floats((size_t)T * (K + 1), 1.0f);
    f.importance = random_floats(2 * E, 1.0f), f.load = random_floats(2 * E, 1.0f);
    f.dclean = random_floats((size_t)T * E, 1.0f), f.dnoise = random_floats((size_t)T * E, 1.0f);
    f.x = random_floats((size_t)T * D, 1.0f), f.dx = random_floats((size_t)T * D, 1.0f);
    f.wg = random_floats((size_t)D * E, 0.3f), f.wn = random_floats((size_t)D * E, 0.3f);
    f.ln_mean = random_floats(T, 1.0f), f.ln_rstd = random_floats(T, 1.0f);
    f.gamma = random_floats(D, 1.0f), f.beta = random_floats(D, 1.0f), f.dgamma = random_floats(D, 1.0f);
    f.dbeta = random_floats(D, 1.0f), f.values = random_floats((size_t)T * K, 1.0f);
    f.w1 = random_floats((size_t)GE * fm_packed_weight_floats(D, H), 0.2f);
    f.w2 = random_floats((size_t)GE * fm_packed_weight_floats(H, D), 0.2f);
    f.dw1 = random_floats((size_t)GE * fm_packed_weight_floats(D, H), 0.2f);
    f.dw2 = random_floats((size_t)GE * fm_packed_weight_floats(H, D), 0.2f);
    f.b1 = random_floats((size_t)GE * H, 0.2f), f.b2 = random_floats((size_t)GE * D, 0.2f);
    f.db1 = random_floats((size_t)GE * H, 0.2f), f.db2 = random_floats((size_t)GE * D, 0.2f);
    f.plain1 = random_floats((size_t)GE * D * H, 0.2f);
    f.hidden = random_floats((size_t)T * H, 1.0f), f.pre = random_floats((size_t)T * H, 1.0f);
    f.dhidden = random_floats((size_t)T * H, 1.0f), f.y = random_floats((size_t)T * D, 1.0f);
    f.xe = random_floats((size_t)T * K * D, 1.0f), f.ye = random_floats((size_t)T * K * D, 1.0f);
    f.dxe = random_floats((size_t)T * K * D, 1.0f);
    f.conf_w = random_floats((size_t)E * D, 0.3f), f.conf_b = random_floats(E, 0.3f);
    f.probe_w = random_floats((size_t)E * C * D, 0.3f), f.probe_b = random_floats((size_t)E * C, 0.3f);
    f.d_conf_w = random_floats((size_t)E * D, 0.3f), f.d_conf_b = random_floats(E, 0.3f);
    f.d_probe_w = random_floats((size_t)E * C * D, 0.3f), f.d_probe_b = random_floats((size_t)E * C, 0.3f);
    f.h = random_floats((size_t)T * K * D, 1.0f), f.dh = random_floats((size_t)T * K * D, 1.0f);
    memset(&cd, 0, sizeof cd);
    cd.tokens = T, cd.k = K, cd.experts = E, cd.dim = D, cd.classes = C;
    fm_confsmoe_saved_floats(&cd, &floats);
    f.saved = random_floats(floats, 1.0f);
    f.workspace = random_floats((size_t)3 * 16 * E, 1.0f);
    f.idx = (int32_t *)malloc((size_t)T * K * sizeof(int32_t));
    f.group = (int32_t *)malloc(T * sizeof(int32_t)), f.combination = (int32_t *)malloc(T * sizeof(int32_t));
    f.labels = (int32_t *)malloc(T * sizeof(int32_t)), f.slot_experts = (int32_t *)malloc((size_t)T * K * sizeof(int32_t));
    f.counts = (int32_t *)malloc(E * sizeof(int32_t)), f.offsets = (int32_t *)malloc((E + 1) * sizeof(int32_t));
    f.order = (int32_t *)malloc((size_t)T * K * sizeof(int32_t));
    f.wide_idx = (int32_t *)malloc((size_t)T * 20 * sizeof(int32_t));
    f.position = (int32_t *)malloc((size_t)T * K * sizeof(int32_t));
    for (t = 0; t < T; t++) {
        f.group[t] = t % 2, f.combination[t] = t % 7, f.labels[t] = t % C;
        for (i = 0; i < K; i++) f.idx[t * K + i] = f.slot_experts[t * K + i] = (t + 11 * i) % E;
    }
    f.grouped_offsets[0] = 0, f.grouped_offsets[1] = 2, f.grouped_offsets[2] = 2, f.grouped_offsets[3] = T;
    memset(&plan_desc, 0, sizeof plan_desc);
    plan_desc.tokens = T, plan_desc.top_k = K, plan_desc.experts = E;
    f.plan.counts = f.counts, f.plan.offsets = f.offsets, f.plan.order = f.order, f.plan.position = f.position;
    f.plan.dropped_per_expert = NULL;
    fm_routing_plan_build(&plan_desc, f.idx, K, NULL, 0, &f.plan);
}

static fm_gate_desc gate_desc(int training) {
    fm_gate_desc d;
    memset(&d, 0, sizeof d);
    d.tokens = T, d.experts = E, d.top_k = K, d.training = training, d.groups = 2, d.seed = 5;
    return d;
}

static fm_gate_tensors gate_tensors(int workspace) {
    fm_gate_tensors t;
    memset(&t, 0, sizeof t);
    t.clean_logits = f.logits, t.noise_logits = f.noise, t.token_group = f.group, t.indices = f.idx;
    t.gates = f.gates, t.noisy_logits = f.noisy, t.importance = f.importance, t.load = f.load;
    t.workspace = workspace ? f.workspace : NULL;
    return t;
}

static fm_status call_softmax_forward(void) { return fm_softmax_forward(T, E, f.logits, E, f.probs, E); }
static fm_status call_softmax_backward(void) { return fm_softmax_backward(T, E, f.probs, E, f.dprobs, E, f.out, E); }
static fm_status call_topk(void) { return fm_topk(T, E, K, f.logits, E, f.idx, K, f.values, K); }
static fm_status call_topk_wide_k(void) { return fm_topk(T, E, 20, f.logits, E, f.wide_idx, 20, NULL, 0); }
static fm_status call_softmax_topk_forward(void) {
    return fm_softmax_topk_forward(T, E, K, 1, f.logits, E, f.idx, K, f.gates, K);
}
static fm_status call_softmax_topk_backward(void) {
    fm_status s = fm_softmax_topk_forward(T, E, K, 0, f.logits, E, f.idx, K, f.gates, K);
    return s ? s : fm_softmax_topk_backward(T, E, K, 0, f.logits, E, f.idx, K, f.gates, K, f.dgates, K, f.dclean, E);
}
static fm_status call_gate_training(void) {
    fm_gate_desc d = gate_desc(1);
    fm_gate_tensors t = gate_tensors(0);
    return fm_noisy_gate_forward(&d, &t);
}
static fm_status call_gate_training_workspace(void) {
    fm_gate_desc d = gate_desc(1);
    fm_gate_tensors t = gate_tensors(1);
    return fm_noisy_gate_forward(&d, &t);
}
static fm_status call_gate_inference(void) {
    fm_gate_desc d = gate_desc(0);
    fm_gate_tensors t = gate_tensors(0);
    t.importance = t.load = NULL;
    return fm_noisy_gate_forward(&d, &t);
}
static fm_status call_gate_backward(void) {
    fm_gate_desc d = gate_desc(1);
    fm_gate_tensors t = gate_tensors(0);
    fm_gate_gradients g;
    fm_status s = fm_noisy_gate_forward(&d, &t);
    memset(&g, 0, sizeof g);
    g.d_gates = f.dgates, g.d_importance = f.importance, g.d_load = f.load, g.d_noisy_logits = f.dprobs;
    g.d_clean_logits = f.dclean, g.d_noise_logits = f.dnoise;
    return s ? s : fm_noisy_gate_backward(&d, &t, &g);
}
static fm_status call_gate_noise(void) {
    fm_gate_desc d = gate_desc(1);
    return fm_gate_noise_forward(&d, f.logits, E, f.noise, E, f.noisy, E, f.std, E);
}
static fm_status call_gate_load(void) {
    fm_gate_desc d = gate_desc(1);
    fm_status s = fm_gate_noise_forward(&d, f.logits, E, f.noise, E, f.noisy, E, f.std, E);
    s = s ? s : fm_topk(T, E, K + 1, f.noisy, E, f.wide_idx, K + 1, f.top_values, K + 1);
    return s ? s : fm_gate_load_forward(&d, f.logits, E, f.noisy, E, f.std, E, f.top_values, K + 1, f.group, f.load);
}
static fm_status call_gate_noise_draw(void) { return isfinite(fm_gate_noise(1, 2, 3)) ? FM_OK : FM_ERR_INVALID_ARGUMENT; }
static fm_status call_gate_logits(void) { return fm_gate_logits_forward(T, D, E, f.x, D, f.wg, f.wn, f.logits, f.noise); }
static fm_status call_gate_logits_backward(void) {
    return fm_gate_logits_backward(T, D, E, f.x, D, f.wg, f.wn, f.dclean, f.dnoise, f.dx, D, f.dw1, f.dw2);
}
static fm_status call_cv_squared(void) {
    float v;
    return fm_cv_squared(E, f.importance, &v, f.dprobs);
}
static fm_status call_cross_entropy(void) {
    float v;
    return fm_router_cross_entropy(T, E, f.logits, E, f.combination, &v, f.dclean, E);
}
static fm_status call_router_loss(void) {
    float v;
    return fm_flexmoe_router_loss(T, E, 2, f.logits, E, f.combination, f.importance, f.load, &v, f.dclean, E, f.dnoise,
                                  f.dprobs);
}
static fm_status call_layernorm_forward(void) {
    return fm_layernorm_forward(T, D, f.x, D, f.gamma, f.beta, 0.0f, f.y, D, f.ln_mean, f.ln_rstd);
}
static fm_status call_layernorm_backward(void) {
    fm_status s = fm_layernorm_forward(T, D, f.x, D, f.gamma, f.beta, 0.0f, f.y, D, f.ln_mean, f.ln_rstd);
    return s ? s : fm_layernorm_backward(T, D, f.x, D, f.gamma, f.ln_mean, f.ln_rstd, f.y, D, f.dx, D, f.dgamma, f.dbeta);
}
static fm_confsmoe_desc conf_desc(void) {
    fm_confsmoe_desc d;
    memset(&d, 0, sizeof d);
    d.tokens = T, d.k = K, d.experts = E, d.dim = D, d.classes = C, d.mode = FM_CONF_EXPERT_MEAN;
    return d;
}
static fm_confsmoe_params conf_params(void) {
    fm_confsmoe_params p;
    p.w = f.conf_w, p.b = f.conf_b, p.gamma = f.gamma, p.beta = f.beta, p.probe_w = f.probe_w, p.probe_b = f.probe_b;
    return p;
}
static fm_status call_confsmoe(void) {
    fm_confsmoe_desc d = conf_desc();
    fm_confsmoe_params p = conf_params();
    float losses[2];
    size_t floats;
    fm_status s = fm_confsmoe_saved_floats(&d, &floats);
    return s ? s : fm_confsmoe_forward(&d, &p, f.slot_experts, f.labels, f.x, D, f.h, D, f.y, D, NULL, NULL, losses, f.saved);
}
static fm_status call_confsmoe_backward(void) {
    fm_confsmoe_desc d = conf_desc();
    fm_confsmoe_params p = conf_params();
    fm_confsmoe_grads g;
    fm_status s = call_confsmoe();
    g.w = f.d_conf_w, g.b = f.d_conf_b, g.gamma = f.dgamma, g.beta = f.dbeta, g.probe_w = f.d_probe_w, g.probe_b = f.d_probe_b;
    return s ? s : fm_confsmoe_backward(&d, &p, f.slot_experts, f.labels, f.x, D, f.h, D, f.y, D, 1.0f, 1.0f, f.saved,
                                        f.dx, D, f.dh, D, &g);
}
static fm_status call_plan(void) {
    fm_plan_desc d;
    memset(&d, 0, sizeof d);
    d.tokens = T, d.top_k = K, d.experts = E, d.capacity_factor = 0.5f, d.drop_policy = FM_DROP_BY_GATE;
    {
        fm_status s = fm_routing_plan_build(&d, f.idx, K, f.gates, K, &f.plan);
        d.capacity_factor = 0.0f;
        return s ? s : fm_routing_plan_build(&d, f.idx, K, NULL, 0, &f.plan);
    }
}
static fm_status call_dispatch(void) { return fm_dispatch_forward(&f.plan, D, f.x, D, f.xe, D); }
static fm_status call_dispatch_backward(void) { return fm_dispatch_backward(&f.plan, D, f.dxe, D, f.dx, D); }
static fm_status call_combine(void) { return fm_combine_forward(&f.plan, D, f.ye, D, f.gates, K, f.y, D); }
static fm_status call_combine_backward(void) {
    fm_status s = fm_combine_backward(&f.plan, D, f.ye, D, f.gates, K, f.y, D, f.dxe, D, f.dgates, K);
    return s ? s : fm_combine_backward(&f.plan, D, f.ye, D, f.gates, K, f.y, D, NULL, D, f.dgates, K);
}
static fm_status call_pack(void) {
    fm_status s = fm_pack_weights(GE, D, H, FM_WEIGHTS_OUT_BY_IN, f.plain1, D, f.w1);
    return s ? s : fm_unpack_weights(GE, D, H, FM_WEIGHTS_OUT_BY_IN, f.w1, f.plain1, D);
}
static fm_status call_gemm(void) {
    return fm_grouped_gemm_forward(GE, f.grouped_offsets, D, H, f.x, D, f.w1, f.b1, f.hidden, H);
}
static fm_status call_gemm_backward(void) {
    return fm_grouped_gemm_backward(GE, f.grouped_offsets, D, H, f.x, D, f.w1, f.dhidden, H, f.dx, D, f.dw1, f.db1);
}
static fm_status call_gelu(void) {
    fm_status s = fm_gelu_forward(T, H, FM_GELU_ERF, f.pre, H, f.hidden, H);
    return s ? s : fm_gelu_forward(T, H, FM_GELU_TANH, f.pre, H, f.hidden, H);
}
static fm_status call_gelu_backward(void) {
    fm_status s = fm_gelu_backward(T, H, FM_GELU_ERF, f.pre, H, f.dhidden, H, f.hidden, H);
    return s ? s : fm_gelu_backward(T, H, FM_GELU_TANH, f.pre, H, f.dhidden, H, f.hidden, H);
}
static fm_expert_ffn_desc ffn_desc(void) {
    fm_expert_ffn_desc d;
    d.experts = GE, d.dim = D, d.hidden = H, d.gelu = FM_GELU_ERF;
    return d;
}
static fm_status call_ffn(void) {
    fm_expert_ffn_desc d = ffn_desc();
    fm_expert_ffn_params p;
    p.w1 = f.w1, p.b1 = f.b1, p.w2 = f.w2, p.b2 = f.b2;
    return fm_expert_ffn_forward(&d, f.grouped_offsets, &p, f.x, D, f.y, D, f.hidden, H, f.pre, H);
}
static fm_status call_ffn_backward(void) {
    fm_expert_ffn_desc d = ffn_desc();
    fm_expert_ffn_params p;
    fm_expert_ffn_grads g;
    fm_status s = call_ffn();
    p.w1 = f.w1, p.b1 = f.b1, p.w2 = f.w2, p.b2 = f.b2;
    g.w1 = f.dw1, g.b1 = f.db1, g.w2 = f.dw2, g.b2 = f.db2;
    s = s ? s : fm_expert_ffn_backward(&d, f.grouped_offsets, &p, f.x, D, f.pre, H, f.hidden, H, f.y, D, f.dx, D, &g,
                                       f.dhidden, H);
    return s ? s : fm_expert_ffn_backward(&d, f.grouped_offsets, &p, f.x, D, f.pre, H, NULL, 0, f.y, D, NULL, 0, &g,
                                          f.dhidden, H);
}
static fm_status call_names(void) {
    fm_isa isa;
    void *p = fm_alloc(256);
    fm_status s = fm_isa_from_name(fm_isa_name(fm_active_isa()), &isa);
    fm_free(p);
    return s ? s : fm_status_str(FM_ERR_OVERFLOW)[0] && fm_isa_supported(isa) && p ? FM_OK : FM_ERR_INVALID_ARGUMENT;
}

/* The SMoE layer over the fixture's tokens, with experts of its own (E of them, packed). */
static struct {
    float *w1, *w2, *b1, *b2, *dw1, *dw2, *db1, *db2, *dwg, *dwn, *y, *dy, *dx;
    void *saved, *workspace;
} L;
static fm_moe_desc layer_desc(fm_gate_kind gate) {
    fm_moe_desc d;
    memset(&d, 0, sizeof d);
    d.dim = D, d.hidden = H, d.experts = E, d.top_k = K, d.gate = gate, d.classes = C;
    return d;
}
static void layer_setup(void) {
    fm_moe_sizes sizes, most;
    fm_gate_kind gate;
    memset(&most, 0, sizeof most);
    for (gate = FM_GATE_NOISY_TOPK; gate <= FM_GATE_CONFIDENCE; gate = (fm_gate_kind)(gate + 1)) {
        const fm_moe_desc d = layer_desc(gate);
        FM_CHECK(fm_moe_buffer_sizes(&d, T, &sizes) == FM_OK, "layer buffer sizes");
        if (sizes.saved_bytes > most.saved_bytes) most.saved_bytes = sizes.saved_bytes;
        if (sizes.workspace_bytes > most.workspace_bytes) most.workspace_bytes = sizes.workspace_bytes;
        if (sizes.inference_workspace_bytes > most.workspace_bytes) most.workspace_bytes = sizes.inference_workspace_bytes;
    }
    L.w1 = random_floats((size_t)E * fm_packed_weight_floats(D, H), 0.2f);
    L.w2 = random_floats((size_t)E * fm_packed_weight_floats(H, D), 0.2f);
    L.dw1 = random_floats((size_t)E * fm_packed_weight_floats(D, H), 0.2f);
    L.dw2 = random_floats((size_t)E * fm_packed_weight_floats(H, D), 0.2f);
    L.b1 = random_floats((size_t)E * H, 0.2f), L.b2 = random_floats((size_t)E * D, 0.2f);
    L.db1 = random_floats((size_t)E * H, 0.2f), L.db2 = random_floats((size_t)E * D, 0.2f);
    L.dwg = random_floats((size_t)D * E, 0.2f), L.dwn = random_floats((size_t)D * E, 0.2f);
    L.y = random_floats((size_t)T * D, 1.0f), L.dy = random_floats((size_t)T * D, 1.0f), L.dx = random_floats((size_t)T * D, 1.0f);
    L.saved = fm_alloc(most.saved_bytes), L.workspace = fm_alloc(most.workspace_bytes);
}
static fm_status layer_call(fm_gate_kind gate, int training, int backward) {
    const fm_moe_desc d = layer_desc(gate);
    const fm_moe_loss_weights weights = {0.01f, 1.0f, 1.0f, NULL};
    fm_moe_params p;
    fm_moe_grads g;
    fm_moe_batch b;
    fm_status s;
    memset(&p, 0, sizeof p), memset(&g, 0, sizeof g), memset(&b, 0, sizeof b);
    p.w_gate = f.wg, p.w_noise = f.wn, p.w1 = L.w1, p.b1 = L.b1, p.w2 = L.w2, p.b2 = L.b2;
    p.confidence = conf_params();
    g.w_gate = L.dwg, g.w_noise = L.dwn, g.w1 = L.dw1, g.b1 = L.db1, g.w2 = L.dw2, g.b2 = L.db2;
    g.confidence.w = f.d_conf_w, g.confidence.b = f.d_conf_b, g.confidence.gamma = f.dgamma, g.confidence.beta = f.dbeta;
    g.confidence.probe_w = f.d_probe_w, g.confidence.probe_b = f.d_probe_b;
    b.tokens = T, b.x = f.x, b.combination = f.combination, b.labels = gate == FM_GATE_CONFIDENCE ? f.labels : NULL;
    b.training = training, b.seed = 5;
    s = fm_moe_forward(&d, &p, &b, L.y, 0, training || backward ? L.saved : NULL, L.workspace, NULL);
    return s || !backward ? s : fm_moe_backward(&d, &p, &b, L.saved, L.dy, 0, &weights, L.dx, 0, &g, L.workspace);
}
static fm_status call_layer_inference(void) { return layer_call(FM_GATE_NOISY_TOPK, 0, 0); }
static fm_status call_layer_training(void) { return layer_call(FM_GATE_NOISY_TOPK, 1, 0); }
static fm_status call_layer_backward(void) { return layer_call(FM_GATE_NOISY_TOPK, 1, 1); }
static fm_status call_layer_softmax(void) { return layer_call(FM_GATE_SOFTMAX_TOPK, 0, 1); }
static fm_status call_layer_confidence(void) { return layer_call(FM_GATE_CONFIDENCE, 0, 1); }

/* A small Flex-MoE model and a batch, made on first use (kept for the process: reachable). */
static fm_model robust_model;
static fm_model_batch robust_batch;
static fm_status model_ready(void) {
    static float features[2][6 * 21];
    static uint8_t observed[6 * 2] = {1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0};
    static int32_t labels[6] = {0, 1, 2, 0, 1, 2};
    fm_model_desc d;
    fm_status s;
    int i;
    if (robust_model.params) return FM_OK;
    memset(&d, 0, sizeof d);
    d.modalities = 2, d.features[0] = 7, d.features[1] = 21, d.classes = 3, d.dim = 32, d.experts = 40, d.top_k = 4;
    if ((s = fm_model_create(&d, 6, &robust_model)) != FM_OK || (s = fm_model_init(&robust_model, 3)) != FM_OK) return s;
    for (i = 0; i < 6 * 21; i++) features[0][i % (6 * 7)] = features[1][i] = (float)((i * 37) % 11) / 5.0f - 1.0f;
    robust_batch.samples = 6, robust_batch.features[0] = features[0], robust_batch.features[1] = features[1];
    robust_batch.observed = observed, robust_batch.labels = labels, robust_batch.training = 1, robust_batch.seed = 9;
    return FM_OK;
}
static fm_status call_model_step(void) {
    fm_status s = model_ready();
    fm_model_losses losses;
    if (!s) s = fm_model_forward(&robust_model, &robust_batch, NULL, &losses);
    return s ? s : fm_model_backward(&robust_model, &robust_batch);
}
static fm_status call_model_adam(void) {
    const fm_adam_desc adam = {1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f};
    fm_status s = call_model_step();
    return s ? s : fm_model_adam_step(&robust_model, &adam, 1);
}

typedef struct public_call {
    const char *name;
    fm_status (*run)(void);
} public_call;

static const public_call calls[] = {
    {"fm_softmax_forward", call_softmax_forward},
    {"fm_softmax_backward", call_softmax_backward},
    {"fm_topk", call_topk},
    {"fm_topk (k = 20, past the network)", call_topk_wide_k},
    {"fm_softmax_topk_forward", call_softmax_topk_forward},
    {"fm_softmax_topk_backward", call_softmax_topk_backward},
    {"fm_noisy_gate_forward (training)", call_gate_training},
    {"fm_noisy_gate_forward (training, workspace)", call_gate_training_workspace},
    {"fm_noisy_gate_forward (inference)", call_gate_inference},
    {"fm_noisy_gate_backward", call_gate_backward},
    {"fm_gate_noise_forward", call_gate_noise},
    {"fm_gate_load_forward", call_gate_load},
    {"fm_gate_noise", call_gate_noise_draw},
    {"fm_gate_logits_forward", call_gate_logits},
    {"fm_gate_logits_backward", call_gate_logits_backward},
    {"fm_cv_squared", call_cv_squared},
    {"fm_router_cross_entropy", call_cross_entropy},
    {"fm_flexmoe_router_loss", call_router_loss},
    {"fm_layernorm_forward", call_layernorm_forward},
    {"fm_layernorm_backward", call_layernorm_backward},
    {"fm_confsmoe_forward", call_confsmoe},
    {"fm_confsmoe_backward", call_confsmoe_backward},
    {"fm_routing_plan_build", call_plan},
    {"fm_dispatch_forward", call_dispatch},
    {"fm_dispatch_backward", call_dispatch_backward},
    {"fm_combine_forward", call_combine},
    {"fm_combine_backward", call_combine_backward},
    {"fm_pack_weights / fm_unpack_weights", call_pack},
    {"fm_grouped_gemm_forward", call_gemm},
    {"fm_grouped_gemm_backward", call_gemm_backward},
    {"fm_gelu_forward", call_gelu},
    {"fm_gelu_backward", call_gelu_backward},
    {"fm_expert_ffn_forward", call_ffn},
    {"fm_expert_ffn_backward", call_ffn_backward},
    {"fm_moe_forward (inference)", call_layer_inference},
    {"fm_moe_forward (training)", call_layer_training},
    {"fm_moe_forward / fm_moe_backward (noisy gate)", call_layer_backward},
    {"fm_moe_forward / fm_moe_backward (softmax gate)", call_layer_softmax},
    {"fm_moe_forward / fm_moe_backward (confidence gate)", call_layer_confidence},
    {"fm_model_forward / fm_model_backward (40 experts, dropout)", call_model_step},
    {"fm_model_adam_step", call_model_adam},
    {"fm_isa_* / fm_alloc / fm_status_str", call_names},
};

/* XINUSE (XGETBV with ECX = 1): bit 2 the upper halves of YMM0-15, bit 6 those of ZMM0-15. */
static int xinuse_available(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || __get_cpuid_max(0, NULL) < 0xD) return 0;
    __cpuid_count(0xD, 1, a, b, c, d);
    return (a >> 2) & 1;
#else
    return 0;
#endif
}

#if defined(__x86_64__)
/* Sets the state clean before each call, so that a dirty state found after it is its own. */
__attribute__((target("avx"))) static void clean_upper_state(void) { __builtin_ia32_vzeroupper(); }
#else
static void clean_upper_state(void) {}
#endif

static unsigned dirty_upper_state(void) {
#if defined(__x86_64__)
    unsigned a, d;
    __asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(1));
    return a & 0x44u;
#else
    return 0;
#endif
}

/* A call on a thread whose stack we painted: the lowest byte changed is the deepest the call
 * went. */
typedef struct stack_probe {
    fm_status (*run)(void);
    fm_status status;
} stack_probe;

static void *stack_probe_thread(void *arg) {
    stack_probe *probe = (stack_probe *)arg;
    probe->status = probe->run ? probe->run() : FM_OK;
    return NULL;
}

#define PROBE_STACK (512 * 1024)
#define PAINT 0xA5

static size_t stack_used(fm_status (*run)(void), fm_status *status) {
    unsigned char *stack = (unsigned char *)mmap(NULL, PROBE_STACK, PROT_READ | PROT_WRITE,
                                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_attr_t attr;
    pthread_t thread;
    stack_probe probe;
    size_t untouched = 0;
    if (stack == (unsigned char *)MAP_FAILED) return 0;
    memset(stack, PAINT, PROBE_STACK);
    probe.run = run, probe.status = FM_OK;
    pthread_attr_init(&attr);
    pthread_attr_setstack(&attr, stack, PROBE_STACK);
    if (pthread_create(&thread, &attr, stack_probe_thread, &probe) == 0) {
        pthread_join(thread, NULL);
        while (untouched < PROBE_STACK && stack[untouched] == PAINT) untouched++;
    }
    pthread_attr_destroy(&attr);
    munmap(stack, PROBE_STACK);
    if (status) *status = probe.status;
    return PROBE_STACK - untouched;
}

static void check_every_call(fm_isa isa, int xinuse) {
    size_t i, deepest = 0, baseline = (size_t)-1;
    for (i = 0; !SANITIZED && i < 3; i++) { /* the thread's own frames and TLS, which vary a little under qemu */
        const size_t own = stack_used(NULL, NULL);
        baseline = own < baseline ? own : baseline;
    }
    const char *deepest_name = "";
    for (i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        fm_status status;
        if (xinuse) clean_upper_state();
        status = calls[i].run();
        if (xinuse)
            FM_CHECK(dirty_upper_state() == 0, "%s returns with the upper vector state dirty (XINUSE & 0x44 = %#x)",
                     calls[i].name, dirty_upper_state());
        FM_CHECK(status == FM_OK, "%s: %s", calls[i].name, fm_status_str(status));
        if (!SANITIZED) {
            const size_t total = stack_used(calls[i].run, &status), used = total > baseline ? total - baseline : 0;
            FM_CHECK(status == FM_OK && used <= STACK_BOUND, "%s uses %zu bytes of stack (bound %d)", calls[i].name, used,
                     STACK_BOUND);
            if (getenv("FM_TEST_STACK_VERBOSE")) printf("  %6zu  %s\n", used, calls[i].name);
            if (used > deepest) deepest = used, deepest_name = calls[i].name;
        }
    }
    if (!SANITIZED) printf("test_robustness [%s]: deepest stack %zu bytes (%s)\n", fm_isa_name(isa), deepest, deepest_name);
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i, xinuse;
    fm_test_seed("test_robustness");
    n = fm_test_isas(isas);
    xinuse = xinuse_available();
    if (!xinuse) printf("test_robustness: XGETBV(1) is not available here: upper-state checks skipped\n");
    if (SANITIZED) printf("test_robustness: sanitizers inflate stack frames: stack bounds not measured\n");
    fixture_setup();
    layer_setup();
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        check_every_call(isas[i], xinuse);
        check_gate_epsilon();
        check_gate_noise_many_experts();
        check_router_loss_outputs();
        check_topk_wide_rows();
        check_int_limits();
        check_offsets_at_the_limit();
        check_gelu_extremes();
        check_layernorm_infinite_rows();
        check_corrupted_plan();
        check_errors_before_reads();
        check_single_row_sums();
        check_packed_padding();
        check_gate_workspace();
        check_allocator_hooks(isas[i]);
        check_switch_under_load(isas[i]);
    }
    return fm_test_finish("test_robustness");
}
