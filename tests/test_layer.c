/* The SMoE layer (fm_moe_forward / fm_moe_backward) on every ISA path, against a reference of
 * the whole layer computed in double from its definition in flexmoe.h: the output, the routing
 * and the gate-loss terms of the forward; every gradient of the backward against central
 * differences of that double reference (a step of 1e-5 in double: the differences are good to
 * about 1e-9, so they are the double-precision reference of the gradient). Every gate kind, in
 * training and inference, dropless and with a capacity; routing identical to the scalar path's
 * without noise; the buffer checks and argument errors. */
#include "fm_test.h"

/* Relative to the largest value of each compared tensor (the acceptance criterion). */
#define LAYER_TOLERANCE 1e-5

typedef struct config {
    fm_moe_desc desc;
    int tokens, training, max_combination, labels;
    int slot_term; /* the objective also has sum(d_slots * slot outputs): fm_moe_stats.slot_outputs and
                      fm_moe_loss_weights.d_slot_outputs */
    fm_moe_loss_weights weights;
} config;

/* The parameters and the batch in double (the reference's) and in float (the layer's). */
typedef struct problem {
    config cfg;
    int T, D, H, E, K, C, G;
    double *x, *wg, *wn, *w1, *b1, *w2, *b2, *cw, *cb, *gamma, *beta, *pw, *pb, *dy, *d_slots;
    int32_t *combination, *group, *labels;
    uint64_t seed, offset;
} problem;

/* Frozen values of the confidence gate's detached terms (ConfSMoE's targets and, for the probe
 * loss, the experts' outputs): the reference keeps them from the unperturbed parameters. */
typedef struct frozen {
    double *target, *h;
} frozen;

static double normal(double scale) { return fm_test_normal() * scale; }

static double *new_doubles(size_t n, double scale) {
    double *v = (double *)malloc((n ? n : 1) * sizeof(double));
    size_t i;
    for (i = 0; i < n; i++) v[i] = (double)(float)normal(scale);
    return v;
}

static float *to_float(const double *v, size_t n) {
    float *f = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) f[i] = (float)v[i];
    return f;
}

static void new_problem(problem *p, const config *cfg) {
    int t;
    memset(p, 0, sizeof *p);
    p->cfg = *cfg;
    p->T = cfg->tokens, p->D = cfg->desc.dim, p->H = cfg->desc.hidden, p->E = cfg->desc.experts;
    p->K = cfg->desc.top_k, p->C = cfg->desc.classes, p->G = cfg->desc.groups ? cfg->desc.groups : 2;
    p->x = new_doubles((size_t)p->T * p->D, 1.0);
    p->wg = new_doubles((size_t)p->D * p->E, 1.5 / sqrt(p->D));
    p->wn = new_doubles((size_t)p->D * p->E, 0.5 / sqrt(p->D));
    p->w1 = new_doubles((size_t)p->E * p->D * p->H, 1.0 / sqrt(p->D));
    p->b1 = new_doubles((size_t)p->E * p->H, 0.1);
    p->w2 = new_doubles((size_t)p->E * p->H * p->D, 1.0 / sqrt(p->H));
    p->b2 = new_doubles((size_t)p->E * p->D, 0.1);
    p->cw = new_doubles((size_t)p->E * p->D, 0.5);
    p->cb = new_doubles((size_t)p->E, 0.5);
    p->gamma = new_doubles((size_t)p->D, 0.2);
    p->beta = new_doubles((size_t)p->D, 0.2);
    for (t = 0; t < p->D; t++) p->gamma[t] += 1.0;
    p->pw = new_doubles((size_t)p->E * (p->C ? p->C : 1) * p->D, 0.3);
    p->pb = new_doubles((size_t)p->E * (p->C ? p->C : 1), 0.1);
    p->dy = new_doubles((size_t)p->T * p->D, 1.0);
    p->d_slots = new_doubles((size_t)p->T * p->K * p->D, 1.0);
    p->combination = (int32_t *)malloc((size_t)p->T * sizeof(int32_t));
    p->group = (int32_t *)malloc((size_t)p->T * sizeof(int32_t));
    p->labels = (int32_t *)malloc((size_t)p->T * sizeof(int32_t));
    for (t = 0; t < p->T; t++) {
        p->combination[t] = fm_test_int(0, cfg->max_combination);
        /* Flex-MoE's two groups, or (more groups) any: the S-Router term is a mean per group */
        p->group[t] = p->G > 2 ? fm_test_int(0, p->G - 1) : p->combination[t] > 0 && p->G > 1;
        p->labels[t] = p->C ? fm_test_int(0, p->C - 1) : 0;
    }
    p->seed = fm_test_next(), p->offset = fm_test_next() >> 16;
}

static void free_problem(problem *p) {
    free(p->x), free(p->wg), free(p->wn), free(p->w1), free(p->b1), free(p->w2), free(p->b2), free(p->cw), free(p->cb);
    free(p->gamma), free(p->beta), free(p->pw), free(p->pb), free(p->dy), free(p->d_slots), free(p->combination), free(p->group);
    free(p->labels);
}

/* ---- the reference ---- */

static double softplus(double r) { return r > 0 ? r + log1p(exp(-r)) : log1p(exp(r)); }
static double phi(double z) { return 0.5 * erfc(-z / sqrt(2.0)); }
static double gelu(double x, int kind) {
    if (kind == FM_GELU_ERF) return x * phi(x);
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
}

static double cv_squared(const double *v, int n) {
    double mean = 0.0, var = 0.0;
    int i;
    if (n == 1) return 0.0;
    for (i = 0; i < n; i++) mean += v[i];
    mean /= n;
    for (i = 0; i < n; i++) var += (v[i] - mean) * (v[i] - mean);
    return var / (n - 1) / (mean * mean + 1e-10);
}

/* Row LayerNorm without affine. */
static void layernorm(const double *x, int n, double eps, double *y) {
    double mean = 0.0, var = 0.0;
    int i;
    for (i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= n;
    for (i = 0; i < n; i++) y[i] = (x[i] - mean) / sqrt(var + eps);
}

/* The top `levels` of v by value descending, ties to the lower index. */
static void top_of(const double *v, int n, int levels, int *top) {
    int i, j, count = 0;
    for (j = 0; j < n; j++) {
        if (count == levels && !(v[j] > v[top[levels - 1]])) continue;
        i = count < levels ? count++ : levels - 1;
        for (; i > 0 && v[j] > v[top[i - 1]]; i--) top[i] = top[i - 1];
        top[i] = j;
    }
}

typedef struct outputs {
    double *y;             /* T x D */
    int *indices;          /* T x K */
    double router_ce, balance, conf_loss, probe_loss;
    double margin;         /* the smallest gap among each token's top k + 1 routing logits */
    int rows, dropped;
    double *target, *h;    /* filled when not NULL: the detached terms */
    double *slots;         /* T x K x D, filled when not NULL: each slot's expert output */
} outputs;

/* The layer in double; returns sum(dy * y) + the weighted losses. */
static double reference(const problem *p, const frozen *fz, outputs *out) {
    const config *cfg = &p->cfg;
    const int T = p->T, D = p->D, H = p->H, E = p->E, K = p->K, C = p->C, G = p->G;
    const fm_gate_kind kind = cfg->desc.gate;
    const int noisy_training = kind == FM_GATE_NOISY_TOPK && cfg->training;
    const double eps_noise = cfg->desc.noise_epsilon ? cfg->desc.noise_epsilon : 0.01;
    const double ln_eps = cfg->desc.layernorm_eps ? cfg->desc.layernorm_eps : 1e-5;
    /* two allocations per call: the finite differences call this thousands of times */
    const size_t TE = (size_t)T * E, GE = (size_t)G * E, TK = (size_t)T * K;
    double *block = (double *)calloc(3 * TE + TK + 2 * GE + TK * D + H + (size_t)T * D + 2 * (size_t)D + (C ? C : 1),
                                     sizeof(double));
    int *iblock = (int *)calloc((size_t)(K + 1) + 2 * TK + (size_t)E, sizeof(int));
    double *clean = block, *routing = clean + TE, *stdv = routing + TE, *gates = stdv + TE;
    double *importance = gates + TK, *load = importance + GE, *expert_out = load + GE, *hid = expert_out + TK * D;
    double *y = hid + H, *z = y + (size_t)T * D, *n = z + D, *logits = n + D;
    int *top = iblock, *idx = top + K + 1, *kept = idx + TK, *count = kept + TK;
    double objective = 0.0, ce = 0.0, conf_loss = 0.0, probe_loss = 0.0, margin = INFINITY;
    double group_ce[FLEXMOE_GATE_MAX_GROUPS] = {0.0};
    int counted[FLEXMOE_GATE_MAX_GROUPS] = {0};
    int t, e, i, j, d, rows = 0;
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) {
            double c = 0.0, r = 0.0;
            for (d = 0; d < D; d++) c += p->x[(size_t)t * D + d] * p->wg[(size_t)d * E + e], r += p->x[(size_t)t * D + d] * p->wn[(size_t)d * E + e];
            clean[(size_t)t * E + e] = c;
            stdv[(size_t)t * E + e] = softplus(r) + eps_noise;
            routing[(size_t)t * E + e] = noisy_training ? c + fm_gate_noise(p->seed, p->offset + t, e) * stdv[(size_t)t * E + e] : c;
        }
    /* the gate */
    for (t = 0; t < T; t++) {
        const double *l = routing + (size_t)t * E;
        const int levels = K < E ? K + 1 : K;
        double max, sum = 0.0;
        top_of(l, E, levels, top);
        for (i = 1; i < levels; i++) margin = fmin(margin, l[top[i - 1]] - l[top[i]]);
        for (i = 0; i < K; i++) idx[(size_t)t * K + i] = top[i];
        if (kind == FM_GATE_NOISY_TOPK) {
            max = l[top[0]];
            for (i = 0; i < K; i++) sum += exp(l[top[i]] - max);
            for (i = 0; i < K; i++) gates[(size_t)t * K + i] = exp(l[top[i]] - max) / sum;
        } else {
            double selected = 0.0;
            for (max = l[0], e = 1; e < E; e++) max = fmax(max, l[e]);
            for (e = 0; e < E; e++) sum += exp(l[e] - max);
            for (i = 0; i < K; i++) selected += exp(l[top[i]] - max);
            for (i = 0; i < K; i++) gates[(size_t)t * K + i] = exp(l[top[i]] - max) / (cfg->desc.renormalize ? selected : sum);
        }
        for (i = 0; i < K; i++) importance[(size_t)p->group[t] * E + top[i]] += gates[(size_t)t * K + i];
        if (noisy_training && K < E) {
            for (e = 0; e < E; e++) {
                const double threshold = l[e] > l[top[K]] ? l[top[K]] : l[top[K - 1]];
                load[(size_t)p->group[t] * E + e] += phi((clean[(size_t)t * E + e] - threshold) / stdv[(size_t)t * E + e]);
            }
        } else {
            for (i = 0; i < K; i++) load[(size_t)p->group[t] * E + top[i]] += 1.0;
        }
        if (p->combination[t] > 0) { /* the S-Router term, a mean per group */
            double lmax = l[0], lsum = 0.0;
            for (e = 1; e < E; e++) lmax = fmax(lmax, l[e]);
            for (e = 0; e < E; e++) lsum += exp(l[e] - lmax);
            group_ce[p->group[t]] += lmax + log(lsum) - l[p->combination[t] % E];
            counted[p->group[t]]++;
        }
    }
    for (i = 0; i < G; i++) ce += counted[i] ? group_ce[i] / counted[i] : 0.0;
    /* capacity, by position */
    {
        const double f = cfg->desc.capacity_factor;
        const int capacity = f > 0 ? (int)ceil((double)f * T * K / E) : T * K;
        for (i = 0; i < T * K; i++) {
            kept[i] = count[idx[i]] < capacity;
            count[idx[i]] += kept[i];
            rows += kept[i];
        }
    }
    /* the experts, per slot */
    for (i = 0; i < T * K; i++) {
        const double *xt = p->x + (size_t)(i / K) * D;
        double *o = expert_out + (size_t)i * D;
        e = idx[i];
        if (!kept[i]) continue;
        for (j = 0; j < H; j++) {
            double a = p->b1[(size_t)e * H + j];
            for (d = 0; d < D; d++) a += xt[d] * p->w1[((size_t)e * D + d) * H + j];
            hid[j] = gelu(a, cfg->desc.gelu);
        }
        for (d = 0; d < D; d++) {
            double a = p->b2[(size_t)e * D + d];
            for (j = 0; j < H; j++) a += hid[j] * p->w2[((size_t)e * H + j) * D + d];
            o[d] = a;
        }
    }
    /* the combination */
    for (t = 0; t < T; t++) {
        double *yt = y + (size_t)t * D;
        if (kind != FM_GATE_CONFIDENCE) {
            for (i = 0; i < K; i++)
                for (d = 0; d < D; d++) yt[d] += gates[(size_t)t * K + i] * expert_out[((size_t)t * K + i) * D + d];
            continue;
        }
        for (d = 0; d < D; d++) z[d] = p->x[(size_t)t * D + d];
        for (i = 0; i < K; i++) {
            const size_t s = (size_t)t * K + i;
            const double *h = expert_out + s * D;
            double u = p->cb[idx[s]];
            layernorm(h, D, ln_eps, n);
            for (d = 0; d < D; d++) u += p->cw[(size_t)idx[s] * D + d] * n[d];
            u = 1.0 / (1.0 + exp(-u));
            for (d = 0; d < D; d++) z[d] += u * h[d];
            if (cfg->labels) { /* the probe, on the (frozen) expert output */
                const double *hp = fz ? fz->h + s * D : h;
                double lmax, lsum = 0.0, target;
                int c;
                for (c = 0; c < C; c++) {
                    logits[c] = p->pb[(size_t)idx[s] * C + c];
                    for (d = 0; d < D; d++) logits[c] += p->pw[((size_t)idx[s] * C + c) * D + d] * hp[d];
                }
                for (lmax = logits[0], c = 1; c < C; c++) lmax = fmax(lmax, logits[c]);
                for (c = 0; c < C; c++) lsum += exp(logits[c] - lmax);
                probe_loss += lmax + log(lsum) - logits[p->labels[t]];
                target = exp(logits[p->labels[t]] - lmax) / lsum;
                if (out && out->target) out->target[s] = target;
                if (out && out->h) memcpy(out->h + s * D, h, (size_t)D * sizeof(double));
                if (fz) target = fz->target[s];
                conf_loss += (u - target) * (u - target);
            }
        }
        layernorm(z, D, ln_eps, n);
        for (d = 0; d < D; d++) yt[d] = n[d] * p->gamma[d] + p->beta[d];
    }
    conf_loss /= (double)T * K, probe_loss /= (double)T * K;
    for (i = 0; i < T * D; i++) objective += p->dy[i] * y[i];
    if (cfg->slot_term)
        for (i = 0; i < T * K * D; i++) objective += p->d_slots[i] * expert_out[i];
    if (out && out->slots) memcpy(out->slots, expert_out, TK * D * sizeof(double));
    {
        double balance = 0.0;
        int g;
        if (kind != FM_GATE_CONFIDENCE)
            for (g = 0; g < G; g++) balance += cv_squared(importance + (size_t)g * E, E) + cv_squared(load + (size_t)g * E, E);
        objective += cfg->weights.gate * (ce + balance);
        if (kind == FM_GATE_CONFIDENCE && cfg->labels)
            objective += cfg->weights.confidence * conf_loss + cfg->weights.probe * probe_loss;
        if (out) {
            if (out->y) memcpy(out->y, y, (size_t)T * D * sizeof(double));
            if (out->indices) memcpy(out->indices, idx, (size_t)T * K * sizeof(int));
            out->router_ce = ce, out->balance = balance, out->conf_loss = conf_loss, out->probe_loss = probe_loss;
            out->margin = margin, out->rows = rows, out->dropped = T * K - rows;
        }
    }
    free(block), free(iblock);
    return objective;
}

/* ---- the layer ---- */

typedef struct layer_run {
    float *x, *wg, *wn, *w1, *b1, *w2, *b2, *cw, *cb, *gamma, *beta, *pw, *pb, *dy, *y, *dx, *d_slots, *slots;
    float *gwg, *gwn, *gw1, *gb1, *gw2, *gb2, *gcw, *gcb, *ggamma, *gbeta, *gpw, *gpb;
    void *saved, *workspace;
    fm_moe_params params;
    fm_moe_grads grads;
    fm_moe_batch batch;
    fm_moe_stats stats;
    int32_t *expert_rows;
} layer_run;

static float *packed_of(const double *w, int E, int in, int out) {
    float *plain = to_float(w, (size_t)E * in * out), *packed = (float *)malloc(E * fm_packed_weight_floats(in, out) * sizeof(float));
    FM_CHECK(fm_pack_weights(E, in, out, FM_WEIGHTS_IN_BY_OUT, plain, out, packed) == FM_OK, "pack");
    free(plain);
    return packed;
}

static float *zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

static void new_run(layer_run *r, const problem *p) {
    const int T = p->T, D = p->D, H = p->H, E = p->E, C = p->C ? p->C : 1;
    fm_moe_sizes sizes;
    memset(r, 0, sizeof *r);
    r->x = to_float(p->x, (size_t)T * D), r->dy = to_float(p->dy, (size_t)T * D);
    r->wg = to_float(p->wg, (size_t)D * E), r->wn = to_float(p->wn, (size_t)D * E);
    r->w1 = packed_of(p->w1, E, D, H), r->w2 = packed_of(p->w2, E, H, D);
    r->b1 = to_float(p->b1, (size_t)E * H), r->b2 = to_float(p->b2, (size_t)E * D);
    r->cw = to_float(p->cw, (size_t)E * D), r->cb = to_float(p->cb, (size_t)E);
    r->gamma = to_float(p->gamma, (size_t)D), r->beta = to_float(p->beta, (size_t)D);
    r->pw = to_float(p->pw, (size_t)E * C * D), r->pb = to_float(p->pb, (size_t)E * C);
    r->y = zeros((size_t)T * D), r->dx = zeros((size_t)T * D);
    r->d_slots = to_float(p->d_slots, (size_t)T * p->K * D), r->slots = zeros((size_t)T * p->K * D);
    r->gwg = zeros((size_t)D * E), r->gwn = zeros((size_t)D * E);
    r->gw1 = zeros(E * fm_packed_weight_floats(D, H)), r->gw2 = zeros(E * fm_packed_weight_floats(H, D));
    r->gb1 = zeros((size_t)E * H), r->gb2 = zeros((size_t)E * D), r->gcw = zeros((size_t)E * D), r->gcb = zeros(E);
    r->ggamma = zeros(D), r->gbeta = zeros(D), r->gpw = zeros((size_t)E * C * D), r->gpb = zeros((size_t)E * C);
    r->expert_rows = (int32_t *)calloc((size_t)E, sizeof(int32_t));
    FM_CHECK(fm_moe_buffer_sizes(&p->cfg.desc, T, &sizes) == FM_OK, "buffer sizes");
    r->saved = fm_alloc(sizes.saved_bytes);
    r->workspace = fm_alloc(sizes.workspace_bytes > sizes.inference_workspace_bytes ? sizes.workspace_bytes
                                                                                     : sizes.inference_workspace_bytes);
    r->params.w_gate = r->wg, r->params.w_noise = r->wn, r->params.w1 = r->w1, r->params.b1 = r->b1;
    r->params.w2 = r->w2, r->params.b2 = r->b2;
    r->params.confidence.w = r->cw, r->params.confidence.b = r->cb, r->params.confidence.gamma = r->gamma;
    r->params.confidence.beta = r->beta, r->params.confidence.probe_w = r->pw, r->params.confidence.probe_b = r->pb;
    r->grads.w_gate = r->gwg, r->grads.w_noise = r->gwn, r->grads.w1 = r->gw1, r->grads.b1 = r->gb1;
    r->grads.w2 = r->gw2, r->grads.b2 = r->gb2;
    r->grads.confidence.w = r->gcw, r->grads.confidence.b = r->gcb, r->grads.confidence.gamma = r->ggamma;
    r->grads.confidence.beta = r->gbeta, r->grads.confidence.probe_w = r->gpw, r->grads.confidence.probe_b = r->gpb;
    r->batch.tokens = T, r->batch.x = r->x, r->batch.combination = p->combination, r->batch.token_group = p->group;
    r->batch.labels = p->cfg.labels ? p->labels : NULL, r->batch.training = p->cfg.training;
    r->batch.seed = p->seed, r->batch.token_offset = p->offset;
    r->stats.expert_rows = r->expert_rows;
    if (p->cfg.slot_term) r->stats.slot_outputs = r->slots;
}

static void free_run(layer_run *r) {
    free(r->x), free(r->wg), free(r->wn), free(r->w1), free(r->b1), free(r->w2), free(r->b2), free(r->cw), free(r->cb);
    free(r->gamma), free(r->beta), free(r->pw), free(r->pb), free(r->dy), free(r->y), free(r->dx), free(r->d_slots);
    free(r->slots), free(r->gwg), free(r->gwn), free(r->gw1), free(r->gb1), free(r->gw2), free(r->gb2), free(r->gcw), free(r->gcb), free(r->ggamma);
    free(r->gbeta), free(r->gpw), free(r->gpb), free(r->expert_rows);
    fm_free(r->saved), fm_free(r->workspace);
}

/* max |got - want| / max |want| over n values (NaN counts as infinitely far) */
static double relative_error(const float *got, const double *want, size_t n) {
    double worst = 0.0, scale = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        const double error = fabs((double)got[i] - want[i]);
        worst = error != error ? INFINITY : fmax(worst, error);
        scale = fmax(scale, fabs(want[i]));
    }
    return worst / (scale > 0 ? scale : 1.0);
}

/* Central differences of the reference for every element of a parameter tensor (or `sample`
 * random elements of it), compared with the layer's gradient. Returns the worst absolute error
 * and raises *scale to the largest gradient seen: errors are judged against the largest gradient
 * of the whole layer, since a small tensor's gradient can be the difference of large terms (the
 * gate's, through the softmax of nearly equal experts' outputs), good only to float rounding of
 * those terms. */
static double gradient_error(problem *p, const frozen *fz, double *param, size_t n, const float *analytic,
                             size_t sample, const char *name, double *scale) {
    size_t i, count = sample && sample < n ? sample : n;
    double error = 0.0, largest = 0.0;
    for (i = 0; i < count; i++) {
        const size_t at = count == n ? i : (size_t)fm_test_int(0, (int)n - 1);
        const double keep = param[at], h = 1e-5 * fmax(1.0, fabs(keep));
        double up, down, numeric, e;
        param[at] = keep + h, up = reference(p, fz, NULL);
        param[at] = keep - h, down = reference(p, fz, NULL);
        param[at] = keep;
        numeric = (up - down) / (2 * h);
        e = fabs(analytic[at] - numeric);
        error = e != e ? INFINITY : fmax(error, e);
        largest = fmax(largest, fabs(numeric));
    }
    *scale = fmax(*scale, largest);
    if (getenv("FM_TEST_VERBOSE")) fprintf(stderr, "  %s: worst error %.3g, largest gradient %.3g\n", name, error, largest);
    return error;
}

static const char *kind_name(fm_gate_kind kind) {
    return kind == FM_GATE_NOISY_TOPK ? "noisy" : kind == FM_GATE_SOFTMAX_TOPK ? "softmax" : "confidence";
}

/* Forward against the reference, then (when `gradients`) the backward against central differences. */
static void check_layer(const config *cfg, int gradients) {
    problem p;
    layer_run r;
    outputs want;
    frozen fz = {NULL, NULL};
    double *y_want, error;
    int *idx_want, attempt, bad_index = 0, i;
    const char *kind = kind_name(cfg->desc.gate);
    for (attempt = 0; attempt < 50; attempt++) { /* routing at least 1e-3 away from a change of selection */
        new_problem(&p, cfg);
        memset(&want, 0, sizeof want);
        reference(&p, NULL, &want);
        if (want.margin > 1e-3) break;
        free_problem(&p);
    }
    FM_CHECK(want.margin > 1e-3, "%s: no input away from routing ties in 50 draws", kind);
    y_want = (double *)malloc((size_t)p.T * p.D * sizeof(double));
    idx_want = (int *)malloc((size_t)p.T * p.K * sizeof(int));
    want.y = y_want, want.indices = idx_want;
    want.slots = (double *)malloc((size_t)p.T * p.K * p.D * sizeof(double));
    if (cfg->labels) {
        want.target = fz.target = (double *)malloc((size_t)p.T * p.K * sizeof(double));
        want.h = fz.h = (double *)malloc((size_t)p.T * p.K * p.D * sizeof(double));
    }
    reference(&p, NULL, &want);
    new_run(&r, &p);
    FM_CHECK(fm_moe_forward(&cfg->desc, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, &r.stats) == FM_OK,
             "%s forward", kind);
    error = relative_error(r.y, y_want, (size_t)p.T * p.D);
    FM_CHECK(error <= LAYER_TOLERANCE, "%s T=%d D=%d H=%d E=%d k=%d training=%d capacity=%g: forward off by %.3g", kind,
             p.T, p.D, p.H, p.E, p.K, cfg->training, (double)cfg->desc.capacity_factor, error);
    FM_CHECK(r.stats.rows == want.rows && r.stats.dropped == want.dropped, "%s: %d rows %d dropped, want %d and %d", kind,
             r.stats.rows, r.stats.dropped, want.rows, want.dropped);
    {
        double gate_terms[2];
        float got_terms[2];
        gate_terms[0] = want.router_ce, gate_terms[1] = want.balance;
        got_terms[0] = r.stats.router_ce, got_terms[1] = r.stats.balance;
        FM_CHECK(relative_error(got_terms, gate_terms, 2) <= LAYER_TOLERANCE, "%s: gate loss terms %g %g, want %g %g", kind,
                 got_terms[0], got_terms[1], gate_terms[0], gate_terms[1]);
        FM_CHECK(fabs(r.stats.gate_loss - (want.router_ce + want.balance)) <= 1e-5 * (1 + want.router_ce + want.balance),
                 "%s: gate loss is the sum of its terms", kind);
        if (cfg->labels) {
            gate_terms[0] = want.conf_loss, gate_terms[1] = want.probe_loss;
            got_terms[0] = r.stats.confidence_loss, got_terms[1] = r.stats.probe_loss;
            FM_CHECK(relative_error(got_terms, gate_terms, 2) <= LAYER_TOLERANCE, "%s: confidence losses %g %g, want %g %g",
                     kind, got_terms[0], got_terms[1], gate_terms[0], gate_terms[1]);
        }
    }
    if (cfg->slot_term) {
        error = relative_error(r.slots, want.slots, (size_t)p.T * p.K * p.D);
        FM_CHECK(error <= LAYER_TOLERANCE, "%s T=%d k=%d capacity=%g: slot outputs off by %.3g (dropped slots zero)", kind,
                 p.T, p.K, (double)cfg->desc.capacity_factor, error);
    }
    {
        int32_t rows_total = 0;
        for (i = 0; i < p.E; i++) rows_total += r.expert_rows[i];
        FM_CHECK(rows_total == want.rows, "%s: expert_rows sum to %d, want %d", kind, (int)rows_total, want.rows);
    }
    {
        int32_t *idx = (int32_t *)malloc((size_t)p.T * p.K * sizeof(int32_t));
        r.stats.indices = idx;
        FM_CHECK(fm_moe_forward(&cfg->desc, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, &r.stats) == FM_OK,
                 "%s forward again", kind);
        for (i = 0; i < p.T * p.K; i++) bad_index += idx[i] != idx_want[i];
        FM_CHECK(bad_index == 0, "%s: %d of %d experts differ from the reference's routing", kind, bad_index, p.T * p.K);
        r.stats.indices = NULL;
        free(idx);
    }
    if (gradients) {
        const int E = p.E, D = p.D, H = p.H, C = p.C ? p.C : 1;
        float *plain1 = zeros((size_t)E * D * H), *plain2 = zeros((size_t)E * H * D);
        double worst = 0.0, scale = 0.0;
        const frozen *f = cfg->labels ? &fz : NULL;
        fm_moe_loss_weights weights = cfg->weights;
        if (cfg->slot_term) weights.d_slot_outputs = r.d_slots;
        FM_CHECK(fm_moe_backward(&cfg->desc, &r.params, &r.batch, r.saved, r.dy, 0, &weights, r.dx, 0, &r.grads,
                                 r.workspace) == FM_OK,
                 "%s backward", kind);
        fm_unpack_weights(E, D, H, FM_WEIGHTS_IN_BY_OUT, r.gw1, plain1, H);
        fm_unpack_weights(E, H, D, FM_WEIGHTS_IN_BY_OUT, r.gw2, plain2, D);
        worst = fmax(worst, gradient_error(&p, f, p.x, (size_t)p.T * D, r.dx, 0, "dx", &scale));
        worst = fmax(worst, gradient_error(&p, f, p.wg, (size_t)D * E, r.gwg, 0, "w_gate", &scale));
        if (cfg->desc.gate == FM_GATE_NOISY_TOPK && cfg->training)
            worst = fmax(worst, gradient_error(&p, f, p.wn, (size_t)D * E, r.gwn, 0, "w_noise", &scale));
        worst = fmax(worst, gradient_error(&p, f, p.w1, (size_t)E * D * H, plain1, 200, "w1", &scale));
        worst = fmax(worst, gradient_error(&p, f, p.b1, (size_t)E * H, r.gb1, 100, "b1", &scale));
        worst = fmax(worst, gradient_error(&p, f, p.w2, (size_t)E * H * D, plain2, 200, "w2", &scale));
        worst = fmax(worst, gradient_error(&p, f, p.b2, (size_t)E * D, r.gb2, 0, "b2", &scale));
        if (cfg->desc.gate == FM_GATE_CONFIDENCE) {
            worst = fmax(worst, gradient_error(&p, &fz, p.cw, (size_t)E * D, r.gcw, 0, "confidence w", &scale));
            worst = fmax(worst, gradient_error(&p, &fz, p.cb, (size_t)E, r.gcb, 0, "confidence b", &scale));
            worst = fmax(worst, gradient_error(&p, &fz, p.gamma, (size_t)D, r.ggamma, 0, "gamma", &scale));
            worst = fmax(worst, gradient_error(&p, &fz, p.beta, (size_t)D, r.gbeta, 0, "beta", &scale));
            if (cfg->labels) {
                worst = fmax(worst, gradient_error(&p, &fz, p.pw, (size_t)E * C * D, r.gpw, 0, "probe w", &scale));
                worst = fmax(worst, gradient_error(&p, &fz, p.pb, (size_t)E * C, r.gpb, 0, "probe b", &scale));
            }
        }
        worst /= scale > 0 ? scale : 1.0;
        FM_CHECK(worst <= LAYER_TOLERANCE,
                 "%s T=%d D=%d H=%d E=%d k=%d training=%d capacity=%g: a gradient off the finite differences by %.3g of "
                 "the largest (FM_TEST_VERBOSE=1 lists each tensor)",
                 kind, p.T, D, H, E, p.K, cfg->training, (double)cfg->desc.capacity_factor, worst);
        free(plain1), free(plain2);
    }
    free(y_want), free(idx_want), free(want.slots), free(fz.target), free(fz.h);
    free_run(&r);
    free_problem(&p);
}

static config small_config(fm_gate_kind kind, int training) {
    config c;
    memset(&c, 0, sizeof c);
    c.desc.dim = fm_test_int(5, 20), c.desc.hidden = fm_test_int(3, 40), c.desc.experts = fm_test_int(3, 9);
    c.desc.top_k = fm_test_int(1, c.desc.experts < 4 ? c.desc.experts : 4), c.desc.gate = kind;
    c.desc.gelu = (fm_gelu)fm_test_int(0, 1);
    c.tokens = fm_test_int(1, 24), c.training = training, c.max_combination = 2 * c.desc.experts;
    {
        static const int group_counts[4] = {0, 1, 4, FLEXMOE_GATE_MAX_GROUPS}; /* 0: Flex-MoE's two */
        c.desc.groups = group_counts[fm_test_int(0, 3)];
    }
    c.weights.gate = 0.5f;
    if (kind == FM_GATE_CONFIDENCE) {
        c.desc.classes = 3, c.labels = 1;
        c.weights.confidence = 0.8f, c.weights.probe = 0.6f;
    }
    return c;
}

/* Flex-MoE's configuration from a zero desc, in inference: the same routing as the scalar path
 * (without noise every path selects identically), an inference forward without a saved buffer
 * gives the floats of one with it, and the zero desc means d 128, hidden 256, 16 experts, top-4. */
static void check_defaults_and_routing(fm_isa isa) {
    config cfg;
    problem p;
    layer_run r;
    fm_moe_desc zero;
    fm_moe_sizes sizes, explicit_sizes;
    float *y_inference;
    int32_t *idx, *idx_scalar;
    int i, differ = 0;
    memset(&cfg, 0, sizeof cfg);
    memset(&zero, 0, sizeof zero);
    cfg.desc.dim = 128, cfg.desc.hidden = 256, cfg.desc.experts = 16, cfg.desc.top_k = 4, cfg.desc.groups = 2;
    cfg.desc.noise_epsilon = 0.01f, cfg.tokens = 300, cfg.max_combination = 14;
    FM_CHECK(fm_moe_buffer_sizes(&zero, 300, &sizes) == FM_OK && fm_moe_buffer_sizes(&cfg.desc, 300, &explicit_sizes) == FM_OK &&
                 sizes.saved_bytes == explicit_sizes.saved_bytes && sizes.workspace_bytes == explicit_sizes.workspace_bytes,
             "the zero desc sizes the buffers of Flex-MoE's configuration");
    new_problem(&p, &cfg);
    new_run(&r, &p);
    idx = (int32_t *)malloc((size_t)300 * 4 * sizeof(int32_t));
    idx_scalar = (int32_t *)malloc((size_t)300 * 4 * sizeof(int32_t));
    y_inference = zeros((size_t)300 * 128);
    r.stats.indices = idx;
    FM_CHECK(fm_moe_forward(&zero, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, &r.stats) == FM_OK, "zero desc forward");
    FM_CHECK(fm_moe_forward(&zero, &r.params, &r.batch, y_inference, 128, NULL, r.workspace, NULL) == FM_OK,
             "inference forward without a saved buffer");
    FM_CHECK(memcmp(y_inference, r.y, (size_t)300 * 128 * sizeof(float)) == 0,
             "an inference forward without a saved buffer gives the same floats");
    FM_CHECK(fm_moe_backward(&zero, &r.params, &r.batch, r.workspace, r.dy, 0, NULL, r.dx, 0, &r.grads, r.saved) ==
                 FM_ERR_INVALID_ARGUMENT,
             "a backward refuses a buffer that holds no saved forward");
    fm_test_use_isa(FM_ISA_SCALAR);
    r.stats.indices = idx_scalar;
    FM_CHECK(fm_moe_forward(&zero, &r.params, &r.batch, y_inference, 0, r.saved, r.workspace, &r.stats) == FM_OK,
             "scalar forward");
    fm_test_use_isa(isa);
    for (i = 0; i < 300 * 4; i++) differ += idx[i] != idx_scalar[i];
    FM_CHECK(differ == 0, "%d of %d experts chosen differ from the scalar path's without noise", differ, 300 * 4);
    free(idx), free(idx_scalar), free(y_inference);
    free_run(&r);
    free_problem(&p);
}

/* Argument errors, each before anything is written. */
static void check_errors(void) {
    config cfg;
    problem p;
    layer_run r;
    fm_moe_desc d;
    fm_moe_sizes sizes;
    int32_t keep;
    int i, intact = 1;
    cfg = small_config(FM_GATE_NOISY_TOPK, 1);
    cfg.tokens = 6;
    new_problem(&p, &cfg);
    new_run(&r, &p);
    for (i = 0; i < p.T * p.D; i++) r.y[i] = FM_TEST_SENTINEL;
    FM_CHECK(fm_moe_buffer_sizes(NULL, 4, &sizes) == FM_ERR_NULL_POINTER, "NULL desc");
    FM_CHECK(fm_moe_buffer_sizes(&cfg.desc, 0, &sizes) == FM_ERR_INVALID_SHAPE, "zero tokens");
    FM_CHECK(fm_moe_buffer_sizes(&cfg.desc, INT_MAX, &sizes) == FM_ERR_OVERFLOW, "tokens x top_k past FLEXMOE_MAX_DIM");
    d = cfg.desc, d.top_k = d.experts + 1;
    FM_CHECK(fm_moe_forward(&d, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT, "k > experts");
    d = cfg.desc, d.gate = (fm_gate_kind)7;
    FM_CHECK(fm_moe_forward(&d, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT, "gate kind");
    d = cfg.desc, d.noise_epsilon = NAN;
    FM_CHECK(fm_moe_forward(&d, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT, "NaN epsilon");
    d = cfg.desc, d.capacity_factor = -1.0f;
    FM_CHECK(fm_moe_forward(&d, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT, "capacity < 0");
    d = cfg.desc, d.dim = -3;
    FM_CHECK(fm_moe_forward(&d, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_SHAPE, "dim < 0");
    r.params.w_noise = NULL;
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_NULL_POINTER,
             "the noisy gate without w_noise");
    r.params.w_noise = r.wn;
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.y, 0, r.saved, NULL, NULL) == FM_ERR_NULL_POINTER, "no workspace");
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.y, p.D - 1, r.saved, r.workspace, NULL) == FM_ERR_INVALID_SHAPE,
             "ldy < dim");
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.x, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT,
             "y overlapping x");
    keep = p.combination[p.T - 1], p.combination[p.T - 1] = -1;
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT,
             "a negative combination");
    p.combination[p.T - 1] = keep;
    keep = p.group[0], p.group[0] = p.G;
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_ERR_INVALID_ARGUMENT,
             "a token group >= groups");
    p.group[0] = keep;
    for (i = 0; i < p.T * p.D; i++) intact &= r.y[i] == FM_TEST_SENTINEL;
    FM_CHECK(intact, "a refused forward wrote y");
    FM_CHECK(fm_moe_forward(&cfg.desc, &r.params, &r.batch, r.y, 0, r.saved, r.workspace, NULL) == FM_OK, "forward");
    r.batch.tokens = p.T - 1;
    FM_CHECK(fm_moe_backward(&cfg.desc, &r.params, &r.batch, r.saved, r.dy, 0, NULL, r.dx, 0, &r.grads, r.workspace) ==
                 FM_ERR_INVALID_ARGUMENT,
             "a backward with another batch size than its forward");
    r.batch.tokens = p.T, r.batch.training = 0;
    FM_CHECK(fm_moe_backward(&cfg.desc, &r.params, &r.batch, r.saved, r.dy, 0, NULL, r.dx, 0, &r.grads, r.workspace) ==
                 FM_ERR_INVALID_ARGUMENT,
             "a backward in inference after a training forward");
    r.batch.training = 1;
    FM_CHECK(fm_moe_backward(&cfg.desc, &r.params, &r.batch, r.saved, r.dy, 0, NULL, r.dx, 0, &r.grads, r.workspace) == FM_OK,
             "backward");
    free_run(&r);
    free_problem(&p);
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i, round;
    fm_test_seed("test_layer");
    n = fm_test_isas(isas);
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        for (round = 0; round < 3; round++) {
            config c; /* rounds 1 and 2 add the slot outputs' term to the objective */
            c = small_config(FM_GATE_NOISY_TOPK, 1), c.slot_term = round > 0;
            check_layer(&c, 1);
            check_layer((c = small_config(FM_GATE_NOISY_TOPK, 0), &c), 1);
            c = small_config(FM_GATE_SOFTMAX_TOPK, 0), c.desc.renormalize = round % 2, c.slot_term = round == 2;
            check_layer(&c, 1);
            c = small_config(FM_GATE_CONFIDENCE, 0), c.slot_term = round > 0;
            check_layer(&c, 1);
            c = small_config(FM_GATE_NOISY_TOPK, 1), c.desc.capacity_factor = 0.7f, c.slot_term = round > 0;
            check_layer(&c, 1);
        }
        { /* Flex-MoE's shapes in training: the forward at full size */
            config c;
            memset(&c, 0, sizeof c);
            c.tokens = 48, c.training = 1, c.max_combination = 20, c.weights.gate = 0.01f;
            c.desc.dim = 128, c.desc.hidden = 256, c.desc.experts = 16, c.desc.top_k = 4;
            check_layer(&c, 0);
        }
        check_defaults_and_routing(isas[i]);
        check_errors();
    }
    return fm_test_finish("test_layer");
}
