/* Results that do not depend on the thread count, bit for bit: the SMoE layer's forward and
 * backward (4096 tokens, every gate kind, a uniform and a skewed routing), a model step (forward,
 * backward and Adam; Flex-MoE and ConfSMoE with both imputation stages) and a short training run,
 * each at 1, 2 and 3 threads (fm_set_threads) on every path. Built with OpenMP (meson's openmp
 * dependency); a serial build checks that fm_set_threads stays at 1 and says so. */
#include "fm_test.h"

static const int thread_counts[3] = {1, 2, 3};

static int same_floats(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

/* ---- the layer ---- */

typedef struct layer_case {
    const char *name;
    fm_gate_kind gate;
    int skewed; /* the router sends most tokens to two experts */
} layer_case;

typedef struct layer_result {
    float *y, *dx, *grads; /* grads: w_gate, w_noise, w1, b1, w2, b2, confidence w, b, gamma, beta, probes */
} layer_result;

enum { TOKENS = 4096, DIM = 64, HIDDEN = 128, EXPERTS = 8, TOP_K = 2, CLASSES = 3 };

static float *random_floats(size_t n, double scale) {
    float *v = (float *)fm_alloc(n * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) v[i] = (float)(fm_test_normal() * scale);
    return v;
}

/* One forward and backward at `threads` threads; every output into r (allocated here). */
static void run_layer(const layer_case *lc, int threads, const fm_moe_desc *desc, const fm_moe_params *params,
                      const fm_moe_batch *batch, const float *dy, layer_result *r) {
    const size_t w1 = fm_packed_weight_floats(DIM, HIDDEN) * EXPERTS, w2 = fm_packed_weight_floats(HIDDEN, DIM) * EXPERTS;
    const size_t sizes[12] = {DIM * EXPERTS, DIM * EXPERTS, w1, EXPERTS * HIDDEN, w2, EXPERTS * DIM, EXPERTS * DIM, EXPERTS,
                              DIM, DIM, (size_t)EXPERTS * CLASSES * DIM, EXPERTS * CLASSES};
    float *g[12];
    size_t total = 0, off = 0;
    fm_moe_sizes sizes_needed;
    fm_moe_grads grads;
    fm_moe_loss_weights weights;
    void *saved, *workspace;
    int i;
    for (i = 0; i < 12; i++) total += sizes[i];
    r->y = (float *)fm_alloc((size_t)TOKENS * DIM * sizeof(float));
    r->dx = (float *)fm_alloc((size_t)TOKENS * DIM * sizeof(float));
    r->grads = (float *)fm_alloc(total * sizeof(float));
    memset(r->grads, 0, total * sizeof(float));
    for (i = 0; i < 12; i++) g[i] = r->grads + off, off += sizes[i];
    memset(&grads, 0, sizeof grads);
    grads.w_gate = g[0], grads.w_noise = lc->gate == FM_GATE_NOISY_TOPK ? g[1] : NULL, grads.w1 = g[2], grads.b1 = g[3];
    grads.w2 = g[4], grads.b2 = g[5];
    if (lc->gate == FM_GATE_CONFIDENCE) {
        grads.confidence.w = g[6], grads.confidence.b = g[7], grads.confidence.gamma = g[8], grads.confidence.beta = g[9];
        grads.confidence.probe_w = g[10], grads.confidence.probe_b = g[11];
    }
    memset(&weights, 0, sizeof weights);
    weights.gate = 0.01f, weights.confidence = 1.0f, weights.probe = 1.0f;
    FM_CHECK(fm_moe_buffer_sizes(desc, TOKENS, &sizes_needed) == FM_OK, "%s: sizes", lc->name);
    saved = fm_alloc(sizes_needed.saved_bytes);
    workspace = fm_alloc(sizes_needed.workspace_bytes);
    FM_CHECK(fm_set_threads(threads) >= 1, "fm_set_threads");
    FM_CHECK(fm_moe_forward(desc, params, batch, r->y, 0, saved, workspace, NULL) == FM_OK, "%s: forward", lc->name);
    FM_CHECK(fm_moe_backward(desc, params, batch, saved, dy, 0, &weights, r->dx, 0, &grads, workspace) == FM_OK,
             "%s: backward", lc->name);
    fm_free(saved), fm_free(workspace);
    (void)total;
}

static void check_layer(const layer_case *lc) {
    const size_t w1 = fm_packed_weight_floats(DIM, HIDDEN) * EXPERTS, w2 = fm_packed_weight_floats(HIDDEN, DIM) * EXPERTS;
    const size_t grad_floats = 2 * DIM * EXPERTS + w1 + EXPERTS * HIDDEN + w2 + 2 * EXPERTS * DIM + EXPERTS + 2 * DIM +
                               (size_t)EXPERTS * CLASSES * (DIM + 1);
    fm_moe_desc desc;
    fm_moe_params params;
    fm_moe_batch batch;
    layer_result results[3];
    float *x = random_floats((size_t)TOKENS * DIM, 1.0), *dy = random_floats((size_t)TOKENS * DIM, 1.0);
    float *wg = random_floats(DIM * EXPERTS, 0.2), *wn = random_floats(DIM * EXPERTS, 0.05);
    float *w1v = (float *)fm_alloc(w1 * sizeof(float)), *w2v = (float *)fm_alloc(w2 * sizeof(float));
    float *plain1 = random_floats((size_t)EXPERTS * DIM * HIDDEN, 0.1), *plain2 = random_floats((size_t)EXPERTS * HIDDEN * DIM, 0.1);
    float *b1 = random_floats(EXPERTS * HIDDEN, 0.1), *b2 = random_floats(EXPERTS * DIM, 0.1);
    float *cw = random_floats(EXPERTS * DIM, 0.3), *cb = random_floats(EXPERTS, 0.3);
    float *gamma = random_floats(DIM, 0.1), *beta = random_floats(DIM, 0.1);
    float *pw = random_floats((size_t)EXPERTS * CLASSES * DIM, 0.2), *pb = random_floats(EXPERTS * CLASSES, 0.1);
    int32_t *combination = (int32_t *)fm_alloc(TOKENS * sizeof(int32_t)), *labels = (int32_t *)fm_alloc(TOKENS * sizeof(int32_t));
    int t, i, e;
    for (i = 0; i < DIM; i++) gamma[i] += 1.0f;
    if (lc->skewed) /* two experts' gate columns far ahead: most tokens go there */
        for (i = 0; i < DIM; i++)
            for (e = 0; e < 2; e++) wg[i * EXPERTS + e] = 0.0f;
    for (t = 0; t < TOKENS; t++) {
        combination[t] = fm_test_int(0, 6), labels[t] = fm_test_int(0, CLASSES - 1);
        if (lc->skewed && fm_test_uniform() < 0.9) /* a large positive feature along the hot experts' logits */
            for (e = 0; e < 2; e++) x[(size_t)t * DIM + e] = 3.0f;
    }
    if (lc->skewed)
        for (e = 0; e < 2; e++) wg[e * EXPERTS + e] = 4.0f;
    fm_pack_weights(EXPERTS, DIM, HIDDEN, FM_WEIGHTS_IN_BY_OUT, plain1, HIDDEN, w1v);
    fm_pack_weights(EXPERTS, HIDDEN, DIM, FM_WEIGHTS_IN_BY_OUT, plain2, DIM, w2v);
    memset(&desc, 0, sizeof desc);
    desc.dim = DIM, desc.hidden = HIDDEN, desc.experts = EXPERTS, desc.top_k = TOP_K, desc.gate = lc->gate;
    desc.classes = CLASSES;
    memset(&params, 0, sizeof params);
    params.w_gate = wg, params.w_noise = wn, params.w1 = w1v, params.b1 = b1, params.w2 = w2v, params.b2 = b2;
    params.confidence.w = cw, params.confidence.b = cb, params.confidence.gamma = gamma, params.confidence.beta = beta;
    params.confidence.probe_w = pw, params.confidence.probe_b = pb;
    memset(&batch, 0, sizeof batch);
    batch.tokens = TOKENS, batch.x = x, batch.combination = combination, batch.training = 1, batch.seed = 7;
    batch.labels = lc->gate == FM_GATE_CONFIDENCE ? labels : NULL;
    for (i = 0; i < 3; i++) run_layer(lc, thread_counts[i], &desc, &params, &batch, dy, &results[i]);
    for (i = 1; i < 3; i++) {
        FM_CHECK(same_floats(results[0].y, results[i].y, (size_t)TOKENS * DIM), "%s: y at %d threads differs from 1 thread's",
                 lc->name, thread_counts[i]);
        FM_CHECK(same_floats(results[0].dx, results[i].dx, (size_t)TOKENS * DIM),
                 "%s: dx at %d threads differs from 1 thread's", lc->name, thread_counts[i]);
        FM_CHECK(same_floats(results[0].grads, results[i].grads, grad_floats),
                 "%s: the parameter gradients at %d threads differ from 1 thread's", lc->name, thread_counts[i]);
    }
    if (lc->skewed) { /* the mix is what it says */
        int32_t rows[EXPERTS];
        fm_moe_stats stats;
        void *workspace;
        fm_moe_sizes sizes;
        memset(&stats, 0, sizeof stats);
        stats.expert_rows = rows;
        fm_moe_buffer_sizes(&desc, TOKENS, &sizes);
        workspace = fm_alloc(sizes.inference_workspace_bytes);
        FM_CHECK(fm_moe_forward(&desc, &params, &batch, results[0].y, 0, NULL, workspace, &stats) == FM_OK, "stats");
        FM_CHECK(rows[0] + rows[1] > TOKENS * TOP_K / 2, "%s: the two hot experts get %d of %d assignments", lc->name,
                 rows[0] + rows[1], TOKENS * TOP_K);
        fm_free(workspace);
    }
    for (i = 0; i < 3; i++) fm_free(results[i].y), fm_free(results[i].dx), fm_free(results[i].grads);
    fm_free(x), fm_free(dy), fm_free(wg), fm_free(wn), fm_free(w1v), fm_free(w2v), fm_free(plain1), fm_free(plain2);
    fm_free(b1), fm_free(b2), fm_free(cw), fm_free(cb), fm_free(gamma), fm_free(beta), fm_free(pw), fm_free(pb);
    fm_free(combination), fm_free(labels);
}

/* ---- the model ---- */

enum { SAMPLES = 12, VIEWS = 3 };
static const int view_features[VIEWS] = {40, 9, 70};

static void model_desc(fm_model_desc *d, int confsmoe) {
    int v;
    memset(d, 0, sizeof *d);
    d->modalities = VIEWS, d->classes = CLASSES, d->dim = 32, d->experts = 8, d->top_k = 2, d->patches = 8;
    for (v = 0; v < VIEWS; v++) d->features[v] = view_features[v];
    if (confsmoe) d->gate = FM_GATE_CONFIDENCE, d->imputation = FM_IMPUTE_TWO_STAGE;
}

/* Two training steps (forward, backward, Adam) of a fresh model at `threads` threads; its
 * parameters, Adam's moments and the second step's logits into out (params, m, v, logits). */
static void run_steps(int confsmoe, int threads, float *out, size_t floats) {
    fm_model_desc d;
    fm_model model;
    fm_model_batch b;
    fm_adam_desc adam;
    float *features[VIEWS];
    uint8_t observed[SAMPLES * VIEWS];
    int32_t labels[SAMPLES];
    int s, v, step;
    model_desc(&d, confsmoe);
    FM_CHECK(fm_model_create(&d, SAMPLES, &model) == FM_OK && fm_model_init(&model, 3) == FM_OK, "model");
    for (v = 0; v < VIEWS; v++) features[v] = random_floats((size_t)SAMPLES * view_features[v], 1.0);
    for (s = 0; s < SAMPLES; s++) {
        uint32_t mask = s == 0 ? 7u : 0u;
        while (!mask) mask = (uint32_t)fm_test_int(1, 7);
        for (v = 0; v < VIEWS; v++) observed[s * VIEWS + v] = (uint8_t)(mask >> v & 1u);
        labels[s] = s % CLASSES;
    }
    memset(&b, 0, sizeof b);
    b.samples = SAMPLES, b.observed = observed, b.labels = labels, b.training = 1, b.seed = 11;
    for (v = 0; v < VIEWS; v++) b.features[v] = features[v];
    memset(&adam, 0, sizeof adam);
    fm_set_threads(threads);
    for (step = 1; step <= 2; step++) {
        b.step = (uint64_t)step;
        FM_CHECK(fm_model_forward(&model, &b, out + 3 * model.param_floats, NULL) == FM_OK &&
                     fm_model_backward(&model, &b) == FM_OK && fm_model_adam_step(&model, &adam, step) == FM_OK,
                 "step %d", step);
    }
    FM_CHECK(3 * model.param_floats + SAMPLES * CLASSES == floats, "sizes");
    memcpy(out, model.params, model.param_floats * sizeof(float));
    memcpy(out + model.param_floats, model.adam_m, model.param_floats * sizeof(float));
    memcpy(out + 2 * model.param_floats, model.adam_v, model.param_floats * sizeof(float));
    for (v = 0; v < VIEWS; v++) fm_free(features[v]);
    fm_model_destroy(&model);
}

static void check_model_steps(int confsmoe) {
    fm_model_desc d;
    fm_model probe;
    float *runs[3];
    size_t floats;
    uint64_t state = fm_test_rng_state;
    int i;
    model_desc(&d, confsmoe);
    FM_CHECK(fm_model_create(&d, SAMPLES, &probe) == FM_OK, "probe");
    floats = 3 * probe.param_floats + SAMPLES * CLASSES;
    fm_model_destroy(&probe);
    for (i = 0; i < 3; i++) {
        fm_test_rng_state = state; /* the same batch each time */
        runs[i] = (float *)fm_alloc(floats * sizeof(float));
        run_steps(confsmoe, thread_counts[i], runs[i], floats);
    }
    for (i = 1; i < 3; i++)
        FM_CHECK(same_floats(runs[0], runs[i], floats),
                 "%s: two steps at %d threads end with other parameters, moments or logits than at 1 thread",
                 confsmoe ? "ConfSMoE" : "Flex-MoE", thread_counts[i]);
    for (i = 0; i < 3; i++) fm_free(runs[i]);
}

/* ---- a short training run ---- */

static void synthetic(fm_dataset *ds) {
    int s, v, j;
    memset(ds, 0, sizeof *ds);
    ds->samples = 240, ds->views = VIEWS, ds->classes = CLASSES;
    ds->observed = (uint8_t *)fm_alloc((size_t)ds->samples * VIEWS);
    ds->labels = (int32_t *)fm_alloc((size_t)ds->samples * sizeof(int32_t));
    for (v = 0; v < VIEWS; v++) {
        snprintf(ds->names[v], sizeof ds->names[v], "view%d", v);
        ds->features[v] = view_features[v];
        ds->values[v] = random_floats((size_t)ds->samples * view_features[v], 1.0);
    }
    for (s = 0; s < ds->samples; s++) {
        ds->labels[s] = s % CLASSES;
        for (v = 0; v < VIEWS; v++) {
            ds->observed[s * VIEWS + v] = v == s % VIEWS || fm_test_uniform() < 0.6;
            for (j = 0; j < 3; j++) ds->values[v][(size_t)s * view_features[v] + j] += (float)ds->labels[s];
        }
    }
}

static void check_training(void) {
    fm_dataset ds;
    fm_model_desc d;
    fm_train_desc td;
    fm_train_result result;
    float *params[3];
    int32_t *order;
    int train, validation, i;
    synthetic(&ds);
    order = (int32_t *)fm_alloc((size_t)ds.samples * sizeof(int32_t));
    FM_CHECK(fm_dataset_split(&ds, 5, order, &train, &validation) == FM_OK, "split");
    model_desc(&d, 0);
    memset(&td, 0, sizeof td);
    td.epochs = 2, td.batch_size = SAMPLES, td.seed = 9;
    for (i = 0; i < 3; i++) {
        fm_model model;
        FM_CHECK(fm_model_create(&d, SAMPLES, &model) == FM_OK && fm_model_init(&model, 4) == FM_OK, "model");
        fm_set_threads(thread_counts[i]);
        FM_CHECK(fm_model_train(&model, &ds, order, train, order + train, validation, &td, &result) == FM_OK, "train");
        params[i] = (float *)fm_alloc(model.param_floats * sizeof(float));
        memcpy(params[i], model.params, model.param_floats * sizeof(float));
        if (i > 0)
            FM_CHECK(same_floats(params[0], params[i], model.param_floats),
                     "2 epochs of training at %d threads end with other weights than at 1 thread", thread_counts[i]);
        fm_model_destroy(&model);
    }
    for (i = 0; i < 3; i++) fm_free(params[i]);
    fm_free(order);
    fm_dataset_free(&ds);
}

int main(void) {
    static const layer_case layers[4] = {{"noisy gate, uniform mix", FM_GATE_NOISY_TOPK, 0},
                                         {"noisy gate, skewed mix", FM_GATE_NOISY_TOPK, 1},
                                         {"softmax gate, skewed mix", FM_GATE_SOFTMAX_TOPK, 1},
                                         {"confidence gate, uniform mix", FM_GATE_CONFIDENCE, 0}};
    fm_isa isas[FM_ISA_COUNT];
    int n, i, c;
    fm_test_seed("test_threads");
#ifdef _OPENMP
    FM_CHECK(fm_set_threads(3) == 3 && fm_threads() == 3, "fm_set_threads(3) gives 3 threads");
    printf("test_threads: OpenMP build, up to %d threads by default\n", (fm_set_threads(0), fm_threads()));
#else
    FM_CHECK(fm_set_threads(3) == 1 && fm_threads() == 1, "a serial build runs on 1 thread whatever is asked");
    printf("test_threads: serial build (no OpenMP): every count runs on 1 thread, the comparisons below are trivial\n");
#endif
    n = fm_test_isas(isas);
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        for (c = 0; c < 4; c++) check_layer(&layers[c]);
        check_model_steps(0);
        check_model_steps(1);
        check_training();
    }
    fm_set_threads(0);
    return fm_test_finish("test_threads");
}
