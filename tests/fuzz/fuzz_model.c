/* libFuzzer target of the SMoE layer API (flexmoe.h section 8: fm_moe_buffer_sizes,
 * fm_moe_forward, fm_moe_backward) and the model API (section 9 and 11: fm_model_create, init,
 * forward, backward, adam_step, dropout_mask, evaluate, routing) with fuzzer-chosen shapes,
 * configurations and values.
 *
 * The input is a little script, as in fuzz_kernels.c: the first byte picks the layer (even) or
 * the model (odd); the following bytes choose every desc field (shapes mostly small: dim 1..12,
 * experts 1..8, tokens 1..10, modalities 1..3, ...; sometimes 0 for the default, negative, one
 * past a limit or extreme), the gate, k, groups, the capacity and drop policy, the confidence
 * mode, the imputation, the dropout and the eps's (sometimes NaN, +-Inf or out of range), which
 * optional pointers are NULL, leading dimensions, index arrays (in range or not) and the float
 * contents (ordinary values or a palette of NaN, +-Inf, +-1e30, denormals, -0). Exhausted input
 * reads as zero bytes, the plain option.
 *
 * Every buffer is allocated with exactly the extent its documented shape needs, and the layer's
 * saved and workspace buffers with exactly the bytes fm_moe_buffer_sizes gives (64-byte aligned),
 * so AddressSanitizer sees any overrun. Calls whose buffers would exceed a few MiB are skipped
 * (small shapes keep thousands of executions a minute).
 *
 * After each call the target checks (abort() on failure, so the fuzzer reports it):
 *   - the status is an fm_status; a call the header documents as invalid (a desc field out of
 *     its range or enum, a NULL required pointer, a leading dimension below dim, an index out of
 *     range, a sample without a modality, a bad class weight, ...) returns an error, and a
 *     documented-valid one returns FM_OK (where every float choice was ordinary);
 *   - on FM_OK: the layer's stats agree (expert rows sum to stats.rows, rows + dropped = tokens x
 *     k, indices in [0, experts)); the model's dropout mask is 0 or 1 / (1 - dropout) and its
 *     metrics in range; every block the library allocated is freed (an allocator hook counts
 *     them; it also refuses blocks over 32 MiB: FM_ERR_OUT_OF_MEMORY, accepted).
 * The ISA path is the process's (FLEXMOE_ISA=scalar|avx2|avx512, read by fm_setup).
 * FUZZ_TRACE=1 prints each call, its configuration and the expected and actual status.
 *
 * Build (scripts/fuzz.sh does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. \
 *         tests/fuzz/fuzz_model.c build/fuzz/flexmoe_impl.o -o build/fuzz/fuzz_model -lm
 * (scripts/fuzz.sh builds build/fuzz/flexmoe_impl.o first). */
#define FUZZ_NAME "fuzz_model"
#define FUZZ_COUNTING_HOOK
#define FUZZ_BYTE_READER
#include "fuzz_common.h"

#include <float.h>
#include <limits.h>
#include <math.h>

/* ---- failures --------------------------------------------------------------------------- */

static int g_bad;       /* the header says this call must fail */
static int g_unmodeled; /* a float choice the model does not judge: any status */
static void set_bad(int line) {
    if (g_trace && !g_bad) fprintf(stderr, "  (expected to fail: fuzz_model.c:%d)\n", line);
    g_bad = 1;
}
#define BAD() set_bad(__LINE__)

/* The status against the expectation; returns whether the call succeeded. */
static int expect(const char *call, fm_status st) {
    TRACE("%s = %s (expected %s%s)", call, fm_status_str(st), g_bad ? "an error" : "FM_OK",
          g_unmodeled ? ", unmodeled" : "");
    CHECK(valid_status(st), "%s returned %d", call, (int)st);
    if (g_bad) CHECK(st != FM_OK, "%s succeeded but the header says the call is invalid", call);
    else if (!g_unmodeled && st != FM_ERR_OUT_OF_MEMORY)
        CHECK(st == FM_OK, "%s = %s, but every argument is valid", call, fm_status_str(st));
    return st == FM_OK;
}

/* ---- the input reader: u8, u16 and rare in fuzz_common.h, the wider integers here ---------- */

static uint64_t u64(void) {
    uint64_t a = u16();
    a |= (uint64_t)u16() << 16;
    return a | (uint64_t)u16() << 32;
}

/* A small count: mostly 1..max, sometimes 0, one or a few past max, negative or extreme. */
static int pick(int max) {
    static const int extreme[] = {INT_MAX, INT_MIN, 1025, 65536, 1 << 20, (1 << 24) + 1, 4097, 17};
    const unsigned b = u8();
    if (b < 224) return 1 + (int)(b % (unsigned)max);
    if (b < 234) return 0;
    if (b < 242) return max + 1 + (int)(b % 4);
    if (b < 250) return -(int)(1 + b % 3);
    return extreme[b % 8];
}

static float palette(unsigned b) {
    switch (b % 24) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return 1.0f;
    case 3: return -1.0f;
    case 4: return NAN;
    case 5: return INFINITY;
    case 6: return -INFINITY;
    case 7: return 1e30f;
    case 8: return -1e30f;
    case 9: return 3e38f;
    case 10: return 1e-40f;
    case 11: return FLT_MIN;
    case 12: return 88.8f;
    case 13: return -104.0f;
    case 14: return FLT_MAX;
    case 15: return 0.5f;
    case 16: return -NAN;
    default: return (float)((int)(b % 24) - 20) * 0.75f;
    }
}

/* A float field: mostly one of `usual` (n of them), sometimes the palette. */
static float pick_float(const float *usual, unsigned n) {
    const unsigned b = u8();
    if (b < 224) return usual[b % n];
    return palette(u8());
}

/* ---- buffers ------------------------------------------------------------------------------ */

#define MAX_BUFFERS 96
#define MAX_BYTES ((size_t)8 << 20)
static void *bufs[MAX_BUFFERS];
static int nbufs;
static int g_skip; /* a buffer too large: the call is skipped */

/* Exactly `bytes` (at least 1), 64-byte aligned, zeroed; NULL (and g_skip) when too large. */
static void *alloc_bytes(size_t bytes) {
    void *p = NULL;
    if (nbufs == MAX_BUFFERS) die("target bug: too many buffers");
    if (bytes > MAX_BYTES) {
        g_skip = 1;
        return NULL;
    }
    if (bytes == 0) bytes = 1;
    if (posix_memalign(&p, 64, bytes) != 0 || !p) abort();
    memset(p, 0, bytes);
    bufs[nbufs++] = p;
    return p;
}

static void free_all(void) {
    int i;
    for (i = 0; i < nbufs; i++) free(bufs[i]);
    nbufs = 0;
}

static uint64_t rng_state;
static uint64_t rng(void) { return fuzz_splitmix(&rng_state); }
static float rng_uniform(float lo, float hi) { return lo + (hi - lo) * (float)((rng() >> 40) * (1.0 / 16777216.0)); }

static void fill(float *p, size_t n, float scale) {
    const unsigned mode = u8() % 16;
    size_t i;
    rng_state ^= u16() * 0x100000001B3ull + n;
    if (mode == 13) {
        for (i = 0; i < n; i++) p[i] = palette(u8());
    } else if (mode == 14) {
        const float v = palette(u8());
        for (i = 0; i < n; i++) p[i] = v;
    } else if (mode == 15) {
        unsigned c, count = 1 + u8() % 3;
        for (i = 0; i < n; i++) p[i] = rng_uniform(-scale, scale);
        for (c = 0; c < count; c++) p[u16() % n] = palette(u8());
    } else {
        for (i = 0; i < n; i++) p[i] = rng_uniform(-scale, scale);
    }
}

/* n floats, filled; NULL (a call the header may call invalid) when optional and the fuzzer says so. */
static float *floats(size_t n, float scale) {
    float *p = (float *)alloc_bytes(n * sizeof(float));
    if (p) fill(p, n, scale);
    return p;
}

/* A leading dimension for rows of cols: 0 (the default), cols, padded, or (rarely) too short. */
static int ldim(int cols, int *bad) {
    const unsigned b = u8();
    if (b < 96) return 0;
    if (b < 176) return cols;
    if (b < 248) return cols + 1 + (int)(b % 3);
    *bad = 1;
    return (b & 1) && cols > 1 ? cols - 1 : -1; /* cols - 1 = 0 would be the default */
}

/* ---- the layer ------------------------------------------------------------------------------ */

static void fuzz_moe(void) {
    static const float eps_usual[] = {0.0f, 0.01f, 1e-3f, 0.5f};
    static const float cap_usual[] = {0.0f, 0.0f, 1.0f, 1.25f, 0.5f, 2.0f, 0.01f};
    static const float ln_usual[] = {0.0f, 1e-5f, 1e-3f};
    static const float weight_usual[] = {0.0f, 0.01f, 1.0f};
    fm_moe_desc d;
    fm_moe_sizes sizes;
    fm_moe_params params;
    fm_moe_batch batch;
    fm_moe_stats stats, *stats_p = NULL;
    fm_status st;
    int D, H, E, K, G, C, T, max_tokens, ldx, ldy, desc_bad = 0, t, i, ld_bad = 0;
    size_t p1, p2;
    float *y, *x;
    void *saved = NULL, *workspace;
    int32_t *combination = NULL, *group = NULL, *labels = NULL;

    g_fn = "fm_moe";
    memset(&d, 0, sizeof d);
    d.dim = pick(12);
    d.hidden = pick(16);
    d.experts = pick(8);
    {
        const int e = d.experts > 0 ? d.experts : 16;
        const unsigned b = u8();
        d.top_k = b < 200 ? 1 + (int)(b % (unsigned)(e < 16 && e > 0 ? e : 16)) : b < 215 ? 0 : b < 230 ? e + 1 : b < 240 ? 17 : -1;
    }
    d.groups = (int)(u8() % 4);
    if (rare(16)) d.groups = rare(2) ? 17 : -1;
    d.gate = (fm_gate_kind)(u8() % 3);
    if (rare(32)) d.gate = (fm_gate_kind)(rare(2) ? 3 : -1);
    d.gelu = (fm_gelu)(u8() % 2);
    if (rare(32)) d.gelu = (fm_gelu)2;
    d.noise_epsilon = pick_float(eps_usual, 4);
    d.renormalize = (int)(u8() & 1);
    d.capacity_factor = pick_float(cap_usual, 7);
    d.drop_policy = (fm_drop_policy)(u8() % 2);
    if (rare(32)) d.drop_policy = (fm_drop_policy)-1;
    d.classes = (int)(u8() % 5);
    if (rare(32)) d.classes = -1;
    d.confidence = (fm_conf_mode)(u8() % 2);
    if (rare(32)) d.confidence = (fm_conf_mode)2;
    d.layernorm_eps = pick_float(ln_usual, 3);

    D = d.dim ? d.dim : 128, H = d.hidden ? d.hidden : 2 * D, E = d.experts ? d.experts : 16, K = d.top_k ? d.top_k : 4;
    G = d.groups ? d.groups : 2, C = d.classes;
    /* the documented ranges (section 8 and the kernels' descs) */
    if (D < 0 || H < 0 || E < 0 || E > FLEXMOE_GATE_MAX_EXPERTS || K < 1 || K > E || K > FLEXMOE_GATE_MAX_TOP_K || G < 1 ||
        G > FLEXMOE_GATE_MAX_GROUPS || (unsigned)d.gate > 2u || (unsigned)d.gelu > 1u || (unsigned)d.drop_policy > 1u ||
        (unsigned)d.confidence > 1u || d.classes < 0 || !(d.capacity_factor >= 0.0f && d.capacity_factor < INFINITY) ||
        !(d.noise_epsilon >= 0.0f && d.noise_epsilon < INFINITY) ||
        !(d.layernorm_eps >= 0.0f && d.layernorm_eps < INFINITY))
        desc_bad = 1;
    if (!desc_bad && (D > 4096 || H > 4096)) g_unmodeled = 1; /* huge but maybe valid: only no crash */

    max_tokens = pick(10);
    g_bad = desc_bad || max_tokens < 1;
    st = fm_moe_buffer_sizes(&d, max_tokens, &sizes);
    TRACE("desc: dim %d hidden %d experts %d top_k %d groups %d gate %d gelu %d eps %g renorm %d capacity %g drop %d "
          "classes %d confidence %d ln_eps %g; max_tokens %d",
          d.dim, d.hidden, d.experts, d.top_k, d.groups, (int)d.gate, (int)d.gelu, (double)d.noise_epsilon, d.renormalize,
          (double)d.capacity_factor, (int)d.drop_policy, d.classes, (int)d.confidence, (double)d.layernorm_eps, max_tokens);
    if (!expect("fm_moe_buffer_sizes", st)) {
        if (!desc_bad) return;
        /* an invalid desc: a forward with plausible buffers must refuse it too */
        x = floats(4 * 16, 1.0f), y = floats(4 * 16, 1.0f);
        workspace = alloc_bytes(1 << 16);
        memset(&params, 0, sizeof params);
        params.w_gate = params.w_noise = params.w1 = params.w2 = floats(1 << 14, 1.0f);
        params.confidence.w = params.confidence.b = params.confidence.probe_w = params.confidence.probe_b = params.w1;
        memset(&batch, 0, sizeof batch);
        batch.tokens = 1, batch.x = x;
        if (g_skip) return;
        g_bad = 1;
        expect("fm_moe_forward (invalid desc)", fm_moe_forward(&d, &params, &batch, y, 0, NULL, workspace, NULL));
        return;
    }
    CHECK(sizes.saved_bytes > 0 && sizes.workspace_bytes > 0 && sizes.inference_workspace_bytes > 0,
          "fm_moe_buffer_sizes gave a zero size");

    T = 1 + (int)(u8() % (unsigned)max_tokens);
    p1 = fm_packed_weight_floats(D, H), p2 = fm_packed_weight_floats(H, D);
    if ((uint64_t)E * (p1 + p2) > (uint64_t)(2 << 20) || sizes.saved_bytes > MAX_BYTES || sizes.workspace_bytes > MAX_BYTES) return;

    memset(&params, 0, sizeof params);
    params.w_gate = floats((size_t)D * E, 1.0f);
    params.w_noise = d.gate == FM_GATE_NOISY_TOPK || (u8() & 1) ? floats((size_t)D * E, 1.0f) : NULL;
    {
        float *plain = floats((size_t)D * H, 0.5f), *w1 = (float *)alloc_bytes((size_t)E * p1 * sizeof(float));
        float *plain2 = floats((size_t)H * D, 0.5f), *w2 = (float *)alloc_bytes((size_t)E * p2 * sizeof(float));
        if (g_skip) return;
        for (i = 0; i < E; i++) {
            CHECK(fm_pack_weights(1, D, H, FM_WEIGHTS_IN_BY_OUT, plain, H, w1 + (size_t)i * p1) == FM_OK, "pack w1");
            CHECK(fm_pack_weights(1, H, D, FM_WEIGHTS_IN_BY_OUT, plain2, D, w2 + (size_t)i * p2) == FM_OK, "pack w2");
        }
        params.w1 = w1, params.w2 = w2;
    }
    params.b1 = u8() & 1 ? floats((size_t)E * H, 0.5f) : NULL;
    params.b2 = u8() & 1 ? floats((size_t)E * D, 0.5f) : NULL;
    if (d.gate == FM_GATE_CONFIDENCE || rare(4)) {
        params.confidence.w = floats((size_t)E * D, 1.0f);
        params.confidence.b = floats((size_t)E, 1.0f);
        params.confidence.gamma = u8() & 1 ? floats((size_t)D, 1.0f) : NULL;
        params.confidence.beta = u8() & 1 ? floats((size_t)D, 1.0f) : NULL;
        if (C > 0) {
            params.confidence.probe_w = floats((size_t)E * C * D, 1.0f);
            params.confidence.probe_b = floats((size_t)E * C, 1.0f);
        }
    }
    if (rare(24)) { /* a required parameter left out */
        const unsigned which = u8() % 3;
        if (which == 0) params.w_gate = NULL;
        else if (which == 1) params.w1 = NULL;
        else params.w2 = NULL;
        BAD();
    }
    if (d.gate == FM_GATE_NOISY_TOPK && !params.w_noise) BAD();
    if (d.gate == FM_GATE_CONFIDENCE && (!params.confidence.w || !params.confidence.b)) BAD();

    memset(&batch, 0, sizeof batch);
    batch.tokens = T;
    if (rare(32)) batch.tokens = rare(2) ? 0 : -1, BAD();
    ldx = ldim(D, &ld_bad);
    ldy = ldim(D, &ld_bad);
    if (ld_bad) BAD();
    {
        const int lx = ldx > D ? ldx : D, ly = ldy > D ? ldy : D;
        x = floats((size_t)(T - 1) * lx + D, 2.0f);
        y = (float *)alloc_bytes(((size_t)(T - 1) * ly + D) * sizeof(float));
    }
    batch.x = x, batch.ldx = ldx;
    if (u8() & 1) {
        combination = (int32_t *)alloc_bytes((size_t)T * 4);
        for (t = 0; t < T && combination; t++) combination[t] = (int32_t)(u8() % 8);
        if (combination && rare(16)) combination[u8() % T] = -1 - (int32_t)(u8() % 3), BAD();
    }
    if (u8() & 1) {
        group = (int32_t *)alloc_bytes((size_t)T * 4);
        for (t = 0; t < T && group; t++) group[t] = (int32_t)(u8() % (unsigned)G);
        if (group && rare(16)) group[u8() % T] = rare(2) ? G : -1, BAD();
    }
    if (u8() & 1) {
        labels = (int32_t *)alloc_bytes((size_t)T * 4);
        for (t = 0; t < T && labels; t++) labels[t] = C > 0 ? (int32_t)(u8() % (unsigned)C) : 0;
        if (labels && d.gate == FM_GATE_CONFIDENCE) {
            if (C < 2 || !params.confidence.probe_w) BAD();
            if (rare(16)) labels[u8() % T] = rare(2) ? C : -1, BAD();
        }
    }
    batch.combination = combination, batch.token_group = group, batch.labels = labels;
    batch.training = (int)(u8() & 1);
    batch.seed = u64(), batch.token_offset = u16();
    if (u8() & 1) {
        memset(&stats, 0, sizeof stats);
        if (u8() & 1) stats.expert_rows = (int32_t *)alloc_bytes((size_t)E * 4);
        if (u8() & 1) stats.expert_dropped = (int32_t *)alloc_bytes((size_t)E * 4);
        if (u8() & 1) stats.indices = (int32_t *)alloc_bytes((size_t)T * K * 4);
        if (u8() & 1) stats.slot_outputs = (float *)alloc_bytes((size_t)T * K * D * 4);
        stats_p = &stats;
    }
    if (batch.training || (u8() & 1)) {
        saved = alloc_bytes(sizes.saved_bytes);
        workspace = alloc_bytes(sizes.workspace_bytes);
    } else {
        workspace = alloc_bytes(sizes.inference_workspace_bytes);
    }
    if (rare(32)) workspace = NULL, BAD();
    if (g_skip) return;
    TRACE("batch: tokens %d ldx %d ldy %d combination %s group %s labels %s training %d saved %s stats %s", batch.tokens, ldx,
          ldy, combination ? "yes" : "NULL", group ? "yes" : "NULL", labels ? "yes" : "NULL", batch.training,
          saved ? "yes" : "NULL", stats_p ? "yes" : "NULL");
    st = fm_moe_forward(&d, &params, &batch, y, ldy, saved, workspace, stats_p);
    if (!expect("fm_moe_forward", st)) return;
    if (stats_p) {
        int rows = 0;
        CHECK(stats.rows + stats.dropped == T * K, "stats: rows %d + dropped %d != %d tokens x %d", stats.rows, stats.dropped, T, K);
        if (d.capacity_factor == 0.0f) CHECK(stats.dropped == 0, "dropless but %d dropped", stats.dropped);
        if (stats.expert_rows) {
            for (i = 0; i < E; i++) rows += stats.expert_rows[i];
            CHECK(rows == stats.rows, "expert_rows sum to %d, stats.rows %d", rows, stats.rows);
        }
        if (stats.indices)
            for (i = 0; i < T * K; i++) CHECK(stats.indices[i] >= 0 && stats.indices[i] < E, "stats index %d = %d", i, stats.indices[i]);
    }
    if (!saved) return;

    /* the backward of that forward */
    {
        fm_moe_loss_weights w, *wp = NULL;
        fm_moe_grads grads;
        float *dy, *dx;
        int lddy, lddx, bad_ld = 0;
        g_bad = 0;
        if (combination && combination[0] < 0) return; /* forward already failed then */
        lddy = ldim(D, &bad_ld), lddx = ldim(D, &bad_ld);
        if (bad_ld) BAD();
        dy = floats((size_t)(T - 1) * (lddy > D ? lddy : D) + D, 1.0f);
        dx = (float *)alloc_bytes(((size_t)(T - 1) * (lddx > D ? lddx : D) + D) * sizeof(float));
        if (rare(32)) dx = NULL, BAD();
        if (u8() & 1) {
            memset(&w, 0, sizeof w);
            w.gate = pick_float(weight_usual, 3), w.confidence = pick_float(weight_usual, 3), w.probe = pick_float(weight_usual, 3);
            if (stats_p && stats.slot_outputs && (u8() & 1)) w.d_slot_outputs = floats((size_t)T * K * D, 1.0f);
            wp = &w;
            /* the header does not say whether a non-finite loss weight is an error: any status */
            if (!isfinite(w.gate) || !isfinite(w.confidence) || !isfinite(w.probe)) g_unmodeled = 1;
        }
        memset(&grads, 0, sizeof grads);
        if (u8() & 1) grads.w_gate = (float *)alloc_bytes((size_t)D * E * 4);
        if (params.w_noise && (u8() & 1)) grads.w_noise = (float *)alloc_bytes((size_t)D * E * 4);
        if (u8() & 1) grads.w1 = (float *)alloc_bytes((size_t)E * p1 * 4);
        if (u8() & 1) grads.b1 = (float *)alloc_bytes((size_t)E * H * 4);
        if (u8() & 1) grads.w2 = (float *)alloc_bytes((size_t)E * p2 * 4);
        if (u8() & 1) grads.b2 = (float *)alloc_bytes((size_t)E * D * 4);
        if (params.confidence.w) {
            if (u8() & 1) grads.confidence.w = (float *)alloc_bytes((size_t)E * D * 4);
            if (u8() & 1) grads.confidence.b = (float *)alloc_bytes((size_t)E * 4);
            if (u8() & 1) grads.confidence.gamma = (float *)alloc_bytes((size_t)D * 4);
            if (u8() & 1) grads.confidence.beta = (float *)alloc_bytes((size_t)D * 4);
            if (C > 0 && (u8() & 1)) grads.confidence.probe_w = (float *)alloc_bytes((size_t)E * C * D * 4);
            if (C > 0 && (u8() & 1)) grads.confidence.probe_b = (float *)alloc_bytes((size_t)E * C * 4);
        }
        if (g_skip) return;
        TRACE("backward: lddy %d lddx %d weights %s (gate %g confidence %g probe %g d_slot_outputs %s)", lddy, lddx,
              wp ? "yes" : "NULL", wp ? (double)w.gate : 0.0, wp ? (double)w.confidence : 0.0, wp ? (double)w.probe : 0.0,
              wp && w.d_slot_outputs ? "yes" : "NULL");
        st = fm_moe_backward(&d, &params, &batch, saved, dy, lddy, wp, dx, lddx, &grads, workspace);
        expect("fm_moe_backward", st);
    }
}

/* ---- the model ------------------------------------------------------------------------------ */

static void fuzz_model(void) {
    static const float dropout_usual[] = {0.0f, -1.0f, 0.1f, 0.5f, 0.9f};
    static const float glw_usual[] = {0.0f, -1.0f, 0.01f, 1.0f};
    static const float ln_usual[] = {0.0f, 1e-5f, 0.1f, 1.0f};
    static const float keep_usual[] = {0.0f, 0.1f, 0.5f, 1.0f};
    static const float lr_usual[] = {0.0f, 1e-3f, 0.1f};
    fm_model_desc d;
    fm_model model;
    fm_model_batch batch;
    fm_model_losses losses;
    fm_status st;
    int M, m, s, S, max_samples, C, P, dim, bad = 0, unmodeled = 0, need_features;
    float *features[FLEXMOE_MODEL_MAX_MODALITIES], *logits;
    uint8_t *observed;
    int32_t *labels = NULL;

    g_fn = "fm_model";
    memset(&d, 0, sizeof d);
    d.modalities = pick(3);
    for (m = 0; m < FLEXMOE_MODEL_MAX_MODALITIES; m++) d.features[m] = pick(10);
    {
        const unsigned b = u8();
        d.classes = b < 224 ? 2 + (int)(b % 3) : b < 236 ? 1 : b < 244 ? 0 : b < 252 ? -1 : 1 << 20 | 1;
    }
    d.patches = pick(3);
    d.dim = pick(8);
    {
        const unsigned b = u8();
        d.heads = b < 120 ? 1 : b < 180 ? (d.dim > 0 && d.dim % 2 == 0 ? 2 : 1) : pick(4);
    }
    d.experts = pick(5);
    {
        const int e = d.experts > 0 ? d.experts : 16;
        const unsigned b = u8();
        d.top_k = b < 208 ? 1 + (int)(b % (unsigned)(e < 16 && e > 0 ? e : 16)) : b < 224 ? 0 : b < 240 ? e + 1 : 17;
    }
    d.hidden = pick(8);
    d.dropout = pick_float(dropout_usual, 5);
    d.gate_loss_weight = pick_float(glw_usual, 4);
    d.no_attention_residual = (int)(u8() & 1);
    d.layernorm_eps = pick_float(ln_usual, 4);
    d.gate = u8() & 1 ? FM_GATE_CONFIDENCE : FM_GATE_NOISY_TOPK;
    if (rare(16)) d.gate = (fm_gate_kind)(rare(2) ? FM_GATE_SOFTMAX_TOPK : 3);
    d.confidence = (fm_conf_mode)(u8() % 2);
    if (rare(32)) d.confidence = (fm_conf_mode)2;
    d.imputation = (fm_imputation)(u8() % 4);
    if (rare(32)) d.imputation = (fm_imputation)4;
    d.impute_keep = pick_float(keep_usual, 4);
    max_samples = pick(4);

    M = d.modalities;
    /* the documented ranges (fm_model_desc) */
    if (M < 1 || M > FLEXMOE_MODEL_MAX_MODALITIES) bad = 1;
    for (m = 0; m < M && !bad; m++)
        if (d.features[m] < 1 || d.features[m] > 1 << 24) bad = 1;
    if (d.classes < 2 || d.classes > 1 << 20 || d.patches < 0 || d.dim < 0 || d.heads < 0 || d.experts < 0 ||
        d.experts > FLEXMOE_GATE_MAX_EXPERTS || d.top_k < 0 || d.top_k > FLEXMOE_GATE_MAX_TOP_K || d.hidden < 0)
        bad = 1;
    if (!bad && ((d.dim ? d.dim : 128) % (d.heads ? d.heads : 4) != 0 || (d.top_k ? d.top_k : 4) > (d.experts ? d.experts : 16)))
        bad = 1;
    if (!(d.dropout < 1.0f) || d.gate_loss_weight != d.gate_loss_weight || !(d.layernorm_eps >= 0.0f) ||
        (d.gate != FM_GATE_NOISY_TOPK && d.gate != FM_GATE_CONFIDENCE) || (unsigned)d.confidence > 1u ||
        (unsigned)d.imputation > 3u || !(d.impute_keep >= 0.0f && d.impute_keep <= 1.0f) || max_samples < 1 || max_samples > 1 << 20)
        bad = 1;
    /* values the header leaves to the implementation's limits: any status, never a crash */
    if (d.gate_loss_weight > 1e30f || d.gate_loss_weight < -1e30f || d.layernorm_eps > 1.0f || d.patches > 4096 ||
        d.dim > 65536 || d.hidden > (1 << 20) || d.features[0] > 4096 || (M > 1 && d.features[1] > 4096) ||
        (M > 2 && d.features[2] > 4096) || d.classes > 4096 || max_samples > 8 || M > 3)
        unmodeled = 1;
    g_bad = bad, g_unmodeled = unmodeled && !bad;
    TRACE("desc: modalities %d features %d %d %d classes %d patches %d dim %d heads %d experts %d top_k %d hidden %d "
          "dropout %g glw %g no_res %d ln_eps %g gate %d confidence %d imputation %d keep %g; max_samples %d",
          M, d.features[0], d.features[1], d.features[2], d.classes, d.patches, d.dim, d.heads, d.experts, d.top_k,
          d.hidden, (double)d.dropout, (double)d.gate_loss_weight, d.no_attention_residual, (double)d.layernorm_eps,
          (int)d.gate, (int)d.confidence, (int)d.imputation, (double)d.impute_keep, max_samples);
    memset(&model, 0xA5, sizeof model);
    st = fm_model_create(&d, max_samples, &model);
    if (!expect("fm_model_create", st)) {
        static const fm_model zero;
        CHECK(memcmp(&model, &zero, sizeof model) == 0, "a failed fm_model_create left the model not zeroed");
        fm_model_destroy(&model);
        return;
    }
    if (unmodeled) { /* a big but valid model: created, destroyed */
        fm_model_destroy(&model);
        return;
    }
    g_unmodeled = 0;
    CHECK(fm_model_init(&model, u64()) == FM_OK, "fm_model_init failed");
    C = model.config.classes, P = model.config.patches, dim = model.config.dim;

    /* a batch */
    g_bad = 0;
    S = 1 + (int)(u8() % (unsigned)max_samples);
    memset(&batch, 0, sizeof batch);
    batch.samples = S;
    if (rare(32)) batch.samples = rare(2) ? 0 : max_samples + 1, BAD();
    observed = (uint8_t *)alloc_bytes((size_t)S * M);
    for (s = 0; s < S; s++) {
        unsigned mask = 1u + u8() % ((1u << M) - 1u);
        if (rare(32)) mask = 0, BAD();
        for (m = 0; m < M; m++) observed[s * M + m] = (uint8_t)((mask >> m & 1) * (1 + u8() % 255));
    }
    batch.observed = observed;
    need_features = model.config.imputation == FM_IMPUTE_FEATURES || model.config.imputation == FM_IMPUTE_TWO_STAGE;
    for (m = 0; m < M; m++) {
        int any = need_features;
        for (s = 0; s < S; s++) any |= observed[s * M + m] != 0;
        features[m] = floats((size_t)S * d.features[m], 2.0f);
        if (!any && (u8() & 1)) features[m] = NULL; /* no sample has it: may be NULL */
        else if (any && rare(48)) features[m] = NULL, BAD();
        batch.features[m] = features[m];
    }
    if (u8() & 1) {
        labels = (int32_t *)alloc_bytes((size_t)S * 4);
        for (s = 0; s < S; s++) labels[s] = (int32_t)(u8() % (unsigned)C);
        if (rare(16)) labels[u8() % S] = rare(2) ? C : -1, BAD();
        batch.labels = labels;
    }
    if (rare(4)) {
        float *w = (float *)alloc_bytes((size_t)C * 4);
        int nonzero = 0, c;
        for (c = 0; c < C; c++) {
            w[c] = rare(8) ? palette(u8()) : (float)(u8() % 4);
            if (!(w[c] >= 0.0f) || w[c] > 3e38f) BAD();
            nonzero |= w[c] > 0.0f;
        }
        if (!nonzero) BAD();
        batch.class_weights = w;
    }
    batch.training = (int)(u8() & 1);
    batch.seed = u64(), batch.step = u16();
    logits = (float *)alloc_bytes((size_t)S * C * 4);
    if (g_skip) {
        fm_model_destroy(&model);
        return;
    }
    st = fm_model_forward(&model, &batch, u8() & 1 ? logits : NULL, u8() & 1 ? &losses : NULL);
    if (expect("fm_model_forward", st) && batch.labels) {
        fm_adam_desc adam;
        st = fm_model_backward(&model, &batch);
        expect("fm_model_backward", st);
        memset(&adam, 0, sizeof adam);
        adam.lr = pick_float(lr_usual, 3);
        adam.beta1 = u8() % 8 == 7 ? palette(u8()) : 0.0f;
        adam.beta2 = u8() % 8 == 7 ? palette(u8()) : 0.0f;
        adam.eps = u8() % 8 == 7 ? palette(u8()) : 0.0f;
        adam.weight_decay = u8() % 8 == 7 ? palette(u8()) : 0.0f;
        g_bad = 0, g_unmodeled = 1; /* a non-finite gradient is refused; the ranges of lr etc. unstated */
        expect("fm_model_adam_step", fm_model_adam_step(&model, &adam, 1 + (int64_t)(u8() % 4)));
    }
    /* the dropout masks of that batch */
    if (batch.samples == S && !g_bad) {
        float *mask = (float *)alloc_bytes((size_t)S * M * P * dim * 4);
        const float p = model.config.dropout > 0.0f ? model.config.dropout : 0.0f;
        size_t j;
        if (mask) {
            st = fm_model_dropout_mask(&model, &batch, (fm_model_dropout_site)(u8() & 1), mask);
            g_unmodeled = 0;
            if (expect("fm_model_dropout_mask", st))
                for (j = 0; j < (size_t)S * M * P * dim; j++)
                    CHECK(mask[j] == 0.0f || mask[j] == 1.0f / (1.0f - p), "dropout mask[%zu] = %g, dropout %g", j,
                          (double)mask[j], (double)p);
        }
    }
    /* evaluation and routing on a dataset made of the batch */
    if (batch.samples == S && !g_bad && (u8() & 1)) {
        fm_dataset ds;
        fm_metrics metrics;
        fm_routing_report report;
        int32_t *rows = (int32_t *)alloc_bytes((size_t)S * 4);
        const int combos = fm_combination_count(M);
        memset(&ds, 0, sizeof ds);
        ds.samples = S, ds.views = M, ds.classes = C;
        for (m = 0; m < M; m++) {
            snprintf(ds.names[m], sizeof ds.names[m], "m%d", m);
            ds.features[m] = d.features[m];
            ds.values[m] = features[m] ? features[m] : floats((size_t)S * d.features[m], 1.0f);
        }
        ds.observed = observed;
        ds.labels = (int32_t *)alloc_bytes((size_t)S * 4);
        for (s = 0; s < S; s++) rows[s] = (int32_t)(u8() % (unsigned)S), ds.labels[s] = (int32_t)(u8() % (unsigned)C);
        if (g_skip) {
            fm_model_destroy(&model);
            return;
        }
        g_unmodeled = 0;
        st = fm_model_evaluate(&model, &ds, rows, S, &metrics);
        if (expect("fm_model_evaluate", st))
            CHECK(metrics.samples == S && metrics.accuracy >= 0.0f && metrics.accuracy <= 1.0f, "metrics: %d samples, accuracy %g",
                  metrics.samples, (double)metrics.accuracy);
        memset(&report, 0, sizeof report);
        if (u8() & 1) report.load = (float *)alloc_bytes((size_t)model.config.experts * 4);
        if (u8() & 1) report.share = (float *)alloc_bytes((size_t)combos * model.config.experts * 4);
        if (u8() & 1) report.combination_tokens = (int64_t *)alloc_bytes((size_t)combos * 8);
        st = fm_model_routing(&model, &ds, rows, S, &report);
        if (expect("fm_model_routing", st))
            CHECK(report.assignments == (int64_t)S * M * P * model.config.top_k, "routing: %lld assignments",
                  (long long)report.assignments);
    }
    fm_model_destroy(&model);
}

/* ---- the entry points ---------------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_setup();
    fprintf(stderr, "fuzz_model: ISA path %s\n", fm_isa_name(fm_active_isa()));
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    fuzz_read_from(data, size);
    g_bad = g_unmodeled = g_skip = 0;
    rng_state = 0x243F6A8885A308D3ull ^ (uint64_t)size;
    hook_live = 0;
    if (u8() & 1) fuzz_model();
    else fuzz_moe();
    free_all();
    CHECK(hook_live == 0, "%ld blocks of the library's not freed", hook_live);
    return 0;
}
