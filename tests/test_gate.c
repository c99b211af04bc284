/* Routing gates and router losses on every ISA path against double-precision references written
 * here from the documented formulas: softmax-then-top-k, the noisy top-k gate (its counter-based
 * noise, gates, importance, load) and its backward, the gate's logit projection, cv^2, the router
 * cross-entropy and the Flex-MoE gate loss; finite-difference checks in double for every
 * backward; NaN policy; argument errors that write nothing. */
#include "fm_test.h"

#include <string.h>

/* fm_gate_noise against sqrt(2) erfinv(x) in double: Giles' float erfinv is good to a few
 * 1e-7 relative, and float log rounding adds about as much; 4e-6 relative leaves a margin of ~5. */
#define NOISE_TOLERANCE 4e-6
/* Gate outputs (gates, load per token, noisy logits) are float computations of exp, log, erfc and
 * a polynomial; each is within a few ulp, so 2e-5 of the quantity's scale bounds the sum. */
#define GATE_TOLERANCE 2e-5
/* Central differences of the double reference with step 1e-4 (truncation ~1e-8 relative) against
 * the float backward: the float rounding of the backward's inputs dominates. */
#define GRADIENT_TOLERANCE 2e-4

/* ---- the documented noise, written again from the header's description ---- */

static uint32_t ref_token_state(uint64_t seed, uint64_t token) {
    uint64_t z = seed + (token + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z ^ (z >> 32));
}

/* The draw as (sign, 1 - |x|): the distance to +-1 is exact, which the tails need. */
static double ref_symmetric(uint64_t seed, uint64_t token, int expert, double *distance) {
    uint32_t h = ref_token_state(seed, token) ^ ((uint32_t)(expert + 1) * 0x9E3779B9u);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    *distance = (((h >> 8) & 0x7FFFFF) + 0.5) / 8388608.0;
    return (h >> 31) ? -1.0 : 1.0;
}

/* z = erfinv(1 - distance) >= 0: Newton on log erfc(z) = log(distance), which stays well
 * conditioned out in the tail where erf(z) - (1 - distance) would cancel. */
static double ref_erfinv_complement(double distance) {
    double z = sqrt(-log(distance * (2.0 - distance))) * 0.8, step;
    int i;
    for (i = 0; i < 200; i++) {
        const double f = log(erfc(z)) - log(distance), slope = -1.1283791670955126 * exp(-z * z) / erfc(z);
        step = f / slope;
        if (z - step < 0) step = z / 2;
        z -= step;
        if (fabs(step) < 1e-16 * (1.0 + z)) break;
    }
    return z;
}

static double ref_noise(uint64_t seed, uint64_t token, int expert) {
    double distance;
    const double sign = ref_symmetric(seed, token, expert, &distance);
    return sign * 1.4142135623730951 * ref_erfinv_complement(distance);
}

/* max that lets a NaN through: a NaN result must fail its check, not vanish in fmax */
static double worse(double worst, double error) { return error != error ? INFINITY : fmax(worst, error); }

static double softplus(double r) { return r > 0 ? r + log1p(exp(-r)) : log1p(exp(r)); }
static double cdf(double z) { return 0.5 * erfc(-z / sqrt(2.0)); }
static double key_of(double v) { return v != v ? INFINITY : v; }

/* The top `levels` of row v by (key descending, column ascending). */
static void ref_top(const double *v, int n, int levels, int *top) {
    int i, j, count = 0;
    for (j = 0; j < n; j++) {
        const double key = key_of(v[j]);
        if (count == levels && !(key > key_of(v[top[levels - 1]]))) continue;
        i = count < levels ? count++ : levels - 1;
        for (; i > 0 && key > key_of(v[top[i - 1]]); i--) top[i] = top[i - 1];
        top[i] = j;
    }
}

/* ---- the gate in double ---- */

typedef struct {
    int tokens, experts, k, training, groups;
    double epsilon;
    uint64_t seed, offset;
} gate_case;

typedef struct {
    double *noisy;      /* tokens x experts */
    int *top;           /* tokens x (k + 1) */
    double *gates;      /* tokens x k */
    double *importance; /* groups x experts */
    double *load;       /* groups x experts */
    double margin;      /* smallest gap between the k-th/(k+1)-th keys and their neighbours */
} gate_ref;

static void ref_gate(const gate_case *c, const double *clean, const double *raw, const int32_t *group, gate_ref *out) {
    const int E = c->experts, k = c->k, with_load = c->training && k < E, levels = with_load ? k + 1 : k;
    int t, e, i;
    double *std = (double *)malloc((size_t)E * sizeof *std);
    memset(out->importance, 0, (size_t)c->groups * E * sizeof(double));
    memset(out->load, 0, (size_t)c->groups * E * sizeof(double));
    out->margin = INFINITY;
    for (t = 0; t < c->tokens; t++) {
        double *noisy = out->noisy + (size_t)t * E, sum = 0.0, top0;
        int *top = out->top + (size_t)t * (k + 1);
        const int g = group ? group[t] : 0;
        for (e = 0; e < E; e++) {
            std[e] = c->training ? softplus(raw[(size_t)t * E + e]) + c->epsilon : 0.0;
            noisy[e] = clean[(size_t)t * E + e] + (c->training ? ref_noise(c->seed, c->offset + t, e) * std[e] : 0.0);
        }
        ref_top(noisy, E, levels, top);
        { /* how close the routing is to a discontinuity: the gaps between consecutive ranks up
           * to k + 2 (the order of the slots, the selection at k / k+1, the owners of the
           * thresholds at k-1 / k and k+1 / k+2) */
            int ranks[FLEXMOE_GATE_MAX_TOP_K + 2];
            const int n = E < k + 2 ? E : k + 2;
            ref_top(noisy, E, n, ranks);
            for (i = 0; i + 1 < n; i++)
                out->margin = fmin(out->margin, fabs(noisy[ranks[i]] - noisy[ranks[i + 1]]));
        }
        top0 = key_of(noisy[top[0]]);
        for (i = 0; i < k; i++) sum += exp(key_of(noisy[top[i]]) - top0);
        for (i = 0; i < k; i++) {
            out->gates[(size_t)t * k + i] = exp(key_of(noisy[top[i]]) - top0) / sum;
            out->importance[(size_t)g * E + top[i]] += out->gates[(size_t)t * k + i];
            if (!with_load) out->load[(size_t)g * E + top[i]] += 1.0;
        }
        if (with_load) /* FastMoE: in the top k when above the (k+1)-th noisy logit */
            for (e = 0; e < E; e++)
                out->load[(size_t)g * E + e] +=
                    cdf((clean[(size_t)t * E + e] - key_of(noisy[top[noisy[e] > key_of(noisy[top[k]]) ? k : k - 1]])) / std[e]);
    }
    free(std);
}

static gate_ref new_ref(const gate_case *c) {
    gate_ref r;
    r.noisy = (double *)malloc((size_t)c->tokens * c->experts * sizeof(double));
    r.top = (int *)malloc((size_t)c->tokens * (c->k + 1) * sizeof(int));
    r.gates = (double *)malloc((size_t)c->tokens * c->k * sizeof(double));
    r.importance = (double *)malloc((size_t)c->groups * c->experts * sizeof(double));
    r.load = (double *)malloc((size_t)c->groups * c->experts * sizeof(double));
    return r;
}

static void free_ref(gate_ref *r) {
    free(r->noisy);
    free(r->top);
    free(r->gates);
    free(r->importance);
    free(r->load);
}

static float *to_float(const double *v, size_t n) {
    float *f = (float *)malloc(n * sizeof *f);
    size_t i;
    for (i = 0; i < n; i++) f[i] = (float)v[i];
    return f;
}

static void random_fill(double *v, size_t n, double scale) {
    size_t i;
    for (i = 0; i < n; i++) v[i] = (double)(float)(fm_test_normal() * scale);
}

/* ---- noise ---- */

static void check_noise(void) {
    double worst = 0.0, mean = 0.0, var = 0.0;
    const int n = 20000;
    int i;
    for (i = 0; i < n; i++) {
        const uint64_t seed = fm_test_next(), token = fm_test_next() >> fm_test_int(0, 63);
        const int expert = fm_test_int(0, 1023);
        const double want = ref_noise(seed, token, expert), got = fm_gate_noise(seed, token, expert);
        worst = worse(worst, fabs(got - want) / fmax(1.0, fabs(want)));
    }
    FM_CHECK(worst <= NOISE_TOLERANCE, "fm_gate_noise vs sqrt(2) erfinv(x): %.3g", worst);
    for (i = 0; i < n; i++) {
        const double z = fm_gate_noise(7, (uint64_t)i / 16, i % 16);
        mean += z / n;
        var += z * z / n;
    }
    FM_CHECK(fabs(mean) < 0.05 && fabs(var - 1.0) < 0.05, "noise moments: mean %g, variance %g", mean, var - mean * mean);
    FM_CHECK(fm_gate_noise(1, 2, 3) == fm_gate_noise(1, 2, 3) && fm_gate_noise(1, 2, 3) != fm_gate_noise(2, 2, 3),
             "noise is a function of (seed, token, expert)");
}

/* ---- the gate forward ---- */

static void run_gate(const gate_case *c, const float *clean, const float *raw, const int32_t *group, int32_t *indices,
                     float *gates, float *noisy, float *importance, float *load, fm_status *status) {
    fm_gate_desc desc;
    fm_gate_tensors t;
    memset(&desc, 0, sizeof desc);
    memset(&t, 0, sizeof t);
    desc.tokens = c->tokens;
    desc.experts = c->experts;
    desc.top_k = c->k;
    desc.training = c->training;
    desc.groups = c->groups;
    desc.noise_epsilon = c->epsilon == 0.01 ? 0.0f : (float)c->epsilon; /* 0 means the default */
    desc.seed = c->seed;
    desc.token_offset = c->offset;
    t.clean_logits = clean;
    t.noise_logits = raw;
    t.token_group = group;
    t.indices = indices;
    t.gates = gates;
    t.noisy_logits = noisy;
    t.importance = importance;
    t.load = load;
    *status = fm_noisy_gate_forward(&desc, &t);
}

static void check_gate_case(const gate_case *c) {
    const int T = c->tokens, E = c->experts, k = c->k;
    double *clean = (double *)malloc((size_t)T * E * sizeof(double)), *raw = (double *)malloc((size_t)T * E * sizeof(double));
    int32_t *group = (int32_t *)malloc((size_t)T * sizeof *group), *indices = (int32_t *)malloc((size_t)T * k * sizeof *indices);
    float *gates = (float *)malloc((size_t)T * k * sizeof *gates), *noisy = (float *)malloc((size_t)T * E * sizeof *noisy);
    float *importance = (float *)malloc((size_t)c->groups * E * sizeof(float)), *load = (float *)malloc((size_t)c->groups * E * sizeof(float));
    float *fclean, *fraw;
    double *own_importance = (double *)calloc((size_t)c->groups * E, sizeof(double));
    gate_ref ref = new_ref(c);
    fm_status status;
    int t, i, e, near_ties = 0, bad_index = 0;
    double worst_gate = 0.0, worst_noisy = 0.0, worst_importance = 0.0, worst_load = 0.0, tie_scale;
    random_fill(clean, (size_t)T * E, 2.0);
    random_fill(raw, (size_t)T * E, 1.5);
    for (t = 0; t < T; t++) group[t] = fm_test_int(0, c->groups - 1);
    fclean = to_float(clean, (size_t)T * E);
    fraw = to_float(raw, (size_t)T * E);
    ref_gate(c, clean, raw, group, &ref);
    run_gate(c, fclean, c->training ? fraw : NULL, group, indices, gates, noisy, importance, load, &status);
    FM_CHECK(status == FM_OK, "gate T=%d E=%d k=%d training=%d: %s", T, E, k, c->training, fm_status_str(status));
    for (t = 0; t < T; t++) {
        const double *row = ref.noisy + (size_t)t * E;
        int mismatch = 0;
        for (e = 0; e < E; e++)
            worst_noisy = worse(worst_noisy, fabs(noisy[(size_t)t * E + e] - row[e]) / (1.0 + fabs(row[e])));
        tie_scale = 0.0;
        for (i = 0; i < k; i++) {
            const int got = indices[(size_t)t * k + i], want = ref.top[(size_t)t * (k + 1) + i];
            if (got != want) {
                /* a different choice is only allowed between logits the float noise cannot tell apart */
                mismatch = 1;
                tie_scale = fmax(tie_scale, got >= 0 && got < E ? fabs(row[got] - row[want]) / (1.0 + fabs(row[want])) : INFINITY);
            }
        }
        if (mismatch) {
            near_ties++;
            if (!(tie_scale <= 4 * GATE_TOLERANCE)) bad_index++;
            for (i = 0; i < k; i++) {
                const int got = indices[(size_t)t * k + i];
                if (got >= 0 && got < E) own_importance[(size_t)group[t] * E + got] += gates[(size_t)t * k + i];
            }
            continue;
        }
        for (i = 0; i < k; i++) {
            worst_gate = worse(worst_gate, fabs(gates[(size_t)t * k + i] - ref.gates[(size_t)t * k + i]));
            own_importance[(size_t)group[t] * E + indices[(size_t)t * k + i]] += gates[(size_t)t * k + i];
        }
    }
    for (i = 0; i < c->groups * E; i++) {
        worst_importance = worse(worst_importance, fabs(importance[i] - own_importance[i]) / (1.0 + fabs(own_importance[i])));
        worst_load = worse(worst_load, fabs(load[i] - ref.load[i]) / (1.0 + fabs(ref.load[i])));
    }
    FM_CHECK(bad_index == 0, "T=%d E=%d k=%d training=%d: %d tokens route differently, not at a near-tie", T, E, k,
             c->training, bad_index);
    /* near-ties are rare, but one can fall in a batch of a few dozen tokens (a seed of T = 26 drew one) */
    FM_CHECK(near_ties <= 1 + T / 100, "T=%d E=%d k=%d: %d near-ties, too many to be ties", T, E, k, near_ties);
    FM_CHECK(worst_noisy <= GATE_TOLERANCE, "T=%d E=%d k=%d: noisy logits off by %.3g", T, E, k, worst_noisy);
    FM_CHECK(worst_gate <= GATE_TOLERANCE, "T=%d E=%d k=%d training=%d: gates off by %.3g", T, E, k, c->training, worst_gate);
    FM_CHECK(worst_importance <= GATE_TOLERANCE, "T=%d E=%d k=%d: importance off by %.3g", T, E, k, worst_importance);
    /* in inference the load is a count, which a near-tie changes by one; in training it is a
     * probability, continuous across the tie */
    if (!near_ties || c->training)
        FM_CHECK(worst_load <= GATE_TOLERANCE, "T=%d E=%d k=%d training=%d: load off by %.3g", T, E, k, c->training,
                 worst_load);

    if (c->training) { /* the noise step on its own makes the same floats as inside the fused gate */
        float *alone = (float *)malloc((size_t)T * E * sizeof(float)), *std = (float *)malloc((size_t)T * E * sizeof(float));
        fm_gate_desc desc;
        double worst_std = 0.0;
        memset(&desc, 0, sizeof desc);
        desc.tokens = T, desc.experts = E, desc.seed = c->seed, desc.token_offset = c->offset;
        desc.noise_epsilon = (float)c->epsilon;
        FM_CHECK(fm_gate_noise_forward(&desc, fclean, E, fraw, E, alone, E, std, E) == FM_OK, "gate noise kernel");
        FM_CHECK(memcmp(alone, noisy, (size_t)T * E * sizeof(float)) == 0, "T=%d E=%d: noise kernel and fused gate differ", T, E);
        for (i = 0; i < T * E; i++) worst_std = worse(worst_std, fabs(std[i] - (softplus(raw[i]) + c->epsilon)) / (softplus(raw[i]) + c->epsilon));
        FM_CHECK(worst_std <= GATE_TOLERANCE, "T=%d E=%d: noise std off by %.3g", T, E, worst_std);
        if (k < E) { /* and the load as separate kernels: top k + 1 of those noisy logits, then the load */
            float *values = (float *)malloc((size_t)T * (k + 1) * sizeof(float));
            float *chain_load = (float *)malloc((size_t)c->groups * E * sizeof(float));
            int32_t *top = (int32_t *)malloc((size_t)T * (k + 1) * sizeof(int32_t));
            double worst_chain = 0.0;
            desc.top_k = k, desc.groups = c->groups;
            FM_CHECK(fm_topk(T, E, k + 1, alone, E, top, k + 1, values, k + 1) == FM_OK, "top k + 1");
            FM_CHECK(fm_gate_load_forward(&desc, fclean, E, alone, E, std, E, values, k + 1, group, chain_load) == FM_OK,
                     "gate load kernel");
            for (i = 0; i < c->groups * E; i++)
                worst_chain = worse(worst_chain, fabs(chain_load[i] - load[i]) / (1.0 + fabs(load[i])));
            /* the same floats summed in the same order: any difference is a bug, not rounding */
            FM_CHECK(worst_chain <= 1e-6, "T=%d E=%d k=%d: load kernel and fused gate differ by %.3g", T, E, k, worst_chain);
            free(values), free(chain_load), free(top);
        }
        free(alone), free(std);
    }
    if (!c->training) { /* without noise the gate is softmax-then-top-k: identical indices to fm_topk */
        int32_t *want = (int32_t *)malloc((size_t)T * k * sizeof *want);
        FM_CHECK(fm_topk(T, E, k, fclean, E, want, k, NULL, 0) == FM_OK, "fm_topk");
        FM_CHECK(memcmp(want, indices, (size_t)T * k * sizeof *want) == 0, "inference gate indices differ from fm_topk");
        free(want);
    }
    free(clean), free(raw), free(group), free(indices), free(gates), free(noisy), free(importance), free(load);
    free(fclean), free(fraw), free(own_importance);
    free_ref(&ref);
}

static void check_gate(void) {
    static const int experts[] = {2, 3, 4, 8, 15, 16, 17, 33, 64, 100, 256, 1024};
    size_t x;
    int k, training;
    for (x = 0; x < sizeof experts / sizeof experts[0]; x++)
        for (k = 1; k <= experts[x] && k <= 16; k = k < 4 ? k + 1 : k * 2)
            for (training = 0; training <= 1; training++) {
                gate_case c;
                c.tokens = fm_test_int(1, experts[x] > 256 ? 40 : 150);
                c.experts = experts[x];
                c.k = k;
                c.training = training;
                c.groups = fm_test_int(1, 3);
                c.epsilon = fm_test_int(0, 1) ? 0.01 : 0.25;
                c.seed = fm_test_next();
                c.offset = fm_test_next() >> 20;
                check_gate_case(&c);
            }
}

/* ---- the gate backward: finite differences of a weighted sum of every output ---- */

typedef struct {
    const gate_case *c;
    const int32_t *group;
    const double *a, *b, *w, *d; /* weights of gates, importance, load, noisy logits */
} gate_objective;

static double objective(const gate_objective *o, const double *clean, const double *raw) {
    const gate_case *c = o->c;
    gate_ref r = new_ref(c);
    double value = 0.0;
    int i;
    ref_gate(c, clean, raw, o->group, &r);
    for (i = 0; i < c->tokens * c->k; i++) value += o->a[i] * r.gates[i];
    for (i = 0; i < c->groups * c->experts; i++) value += o->b[i] * r.importance[i] + o->w[i] * r.load[i];
    for (i = 0; i < c->tokens * c->experts; i++) value += o->d[i] * r.noisy[i];
    free_ref(&r);
    return value;
}

static void check_gate_gradient_case(int T, int E, int k, int training) {
    gate_case c;
    const size_t te = (size_t)T * E, tk = (size_t)T * k;
    double *clean = (double *)malloc(te * sizeof(double)), *raw = (double *)malloc(te * sizeof(double));
    double *a = (double *)malloc(tk * sizeof(double)), *b = (double *)malloc(3 * E * sizeof(double));
    double *w = (double *)malloc(3 * E * sizeof(double)), *d = (double *)malloc(te * sizeof(double));
    int32_t *group = (int32_t *)malloc(T * sizeof(int32_t)), *indices = (int32_t *)malloc(tk * sizeof(int32_t));
    float *gates = (float *)malloc(tk * sizeof(float)), *dclean = (float *)malloc(te * sizeof(float));
    float *draw = (float *)malloc(te * sizeof(float)), *fclean, *fraw, *fa, *fb, *fw, *fd;
    gate_objective o;
    gate_ref r;
    fm_gate_desc desc;
    fm_gate_tensors t;
    fm_gate_gradients g;
    double worst = 0.0, scale = 0.0;
    int attempt, i;
    c.tokens = T, c.experts = E, c.k = k, c.training = training, c.groups = 2, c.epsilon = 0.01;
    c.seed = fm_test_next(), c.offset = fm_test_next() >> 8;
    for (attempt = 0; attempt < 50; attempt++) { /* inputs whose selection a step of 1e-4 cannot change */
        random_fill(clean, te, 1.0);
        random_fill(raw, te, 1.0);
        r = new_ref(&c);
        for (i = 0; i < T; i++) group[i] = i % 2;
        ref_gate(&c, clean, raw, group, &r);
        free_ref(&r);
        if (r.margin > 1e-2) break;
    }
    FM_CHECK(r.margin > 1e-2, "no input away from routing discontinuities in 50 draws (margin %.3g)", r.margin);
    random_fill(a, tk, 1.0);
    random_fill(b, 2 * E, 1.0);
    random_fill(w, 2 * E, 1.0);
    random_fill(d, te, 1.0);
    o.c = &c, o.group = group, o.a = a, o.b = b, o.w = w, o.d = d;
    fclean = to_float(clean, te), fraw = to_float(raw, te), fa = to_float(a, tk), fb = to_float(b, 2 * E);
    fw = to_float(w, 2 * E), fd = to_float(d, te);
    memset(&desc, 0, sizeof desc);
    memset(&t, 0, sizeof t);
    memset(&g, 0, sizeof g);
    desc.tokens = T, desc.experts = E, desc.top_k = k, desc.training = training, desc.groups = 2;
    desc.seed = c.seed, desc.token_offset = c.offset;
    t.clean_logits = fclean, t.noise_logits = fraw, t.token_group = group, t.indices = indices, t.gates = gates;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_OK, "gate forward for the gradient check");
    g.d_gates = fa, g.d_importance = fb, g.d_load = fw, g.d_noisy_logits = fd;
    g.d_clean_logits = dclean, g.d_noise_logits = draw;
    FM_CHECK(fm_noisy_gate_backward(&desc, &t, &g) == FM_OK, "gate backward");
    for (i = 0; i < (int)te; i++) {
        const double h = 1e-4, keep_c = clean[i], keep_r = raw[i];
        double up, down, fd_clean, fd_raw = 0.0;
        clean[i] = keep_c + h, up = objective(&o, clean, raw);
        clean[i] = keep_c - h, down = objective(&o, clean, raw);
        clean[i] = keep_c;
        fd_clean = (up - down) / (2 * h);
        if (training) {
            raw[i] = keep_r + h, up = objective(&o, clean, raw);
            raw[i] = keep_r - h, down = objective(&o, clean, raw);
            raw[i] = keep_r;
            fd_raw = (up - down) / (2 * h);
            worst = worse(worst, fabs(draw[i] - fd_raw));
        }
        worst = worse(worst, fabs(dclean[i] - fd_clean));
        scale = fmax(scale, fmax(fabs(fd_clean), fabs(fd_raw)));
    }
    FM_CHECK(worst <= GRADIENT_TOLERANCE * fmax(1.0, scale), "gate gradient T=%d E=%d k=%d training=%d: off by %.3g (scale %.3g)",
             T, E, k, training, worst, scale);
    free(clean), free(raw), free(a), free(b), free(w), free(d), free(group), free(indices), free(gates);
    free(dclean), free(draw), free(fclean), free(fraw), free(fa), free(fb), free(fw), free(fd);
}

/* ---- softmax-then-top-k ---- */

static void ref_softmax_topk(const double *l, int E, int k, int renormalize, int *top, double *weights) {
    double max = l[0], sum = 0.0, selected = 0.0;
    int e, i;
    for (e = 1; e < E; e++) max = fmax(max, l[e]);
    for (e = 0; e < E; e++) sum += exp(l[e] - max);
    ref_top(l, E, k, top);
    for (i = 0; i < k; i++) selected += exp(l[top[i]] - max);
    for (i = 0; i < k; i++) weights[i] = exp(l[top[i]] - max) / (renormalize ? selected : sum);
}

/* The smallest gap between neighbours in the top k + 1 of a row: a finite-difference step
 * smaller than it cannot change which experts are selected, nor their order. */
static double selection_margin(const double *row, int E, int k, int *top) {
    const int levels = k < E ? k + 1 : E;
    double margin = INFINITY;
    int i;
    ref_top(row, E, levels, top);
    for (i = 1; i < levels; i++) margin = fmin(margin, row[top[i - 1]] - row[top[i]]);
    return margin;
}

static void check_softmax_topk(int T, int E, int k, int renormalize) {
    const size_t te = (size_t)T * E, tk = (size_t)T * k;
    double *l = (double *)malloc(te * sizeof(double)), *dw = (double *)malloc(tk * sizeof(double));
    double *want = (double *)malloc((size_t)k * sizeof(double));
    int *top = (int *)malloc((size_t)(k + 1) * sizeof(int));
    int32_t *indices = (int32_t *)malloc(tk * sizeof(int32_t));
    float *weights = (float *)malloc(tk * sizeof(float)), *dl = (float *)malloc(te * sizeof(float)), *fl, *fdw;
    double worst = 0.0, worst_grad = 0.0;
    int t, i, e, attempt, bad_index = 0;
    random_fill(l, te, 2.0);
    for (t = 0; t < T && t < 8; t++) /* the rows checked by finite differences stay away from selection changes */
    {
        for (attempt = 0; attempt < 50 && selection_margin(l + (size_t)t * E, E, k, top) < 1e-3; attempt++)
            random_fill(l + (size_t)t * E, (size_t)E, 2.0);
        FM_CHECK(attempt < 50, "softmax_topk: no row away from selection changes in 50 draws");
    }
    random_fill(dw, tk, 1.0);
    fl = to_float(l, te), fdw = to_float(dw, tk);
    FM_CHECK(fm_softmax_topk_forward(T, E, k, renormalize, fl, E, indices, k, weights, k) == FM_OK, "softmax_topk forward");
    FM_CHECK(fm_softmax_topk_backward(T, E, k, renormalize, fl, E, indices, k, weights, k, fdw, k, dl, E) == FM_OK,
             "softmax_topk backward");
    for (t = 0; t < T; t++) {
        double *row = l + (size_t)t * E;
        ref_softmax_topk(row, E, k, renormalize, top, want);
        for (i = 0; i < k; i++) {
            bad_index += indices[(size_t)t * k + i] != top[i];
            worst = worse(worst, fabs(weights[(size_t)t * k + i] - want[i]));
        }
        if (t < 8) /* finite differences of sum_i dw_i w_i(l) */
            for (e = 0; e < E; e++) {
                const double h = 1e-5, keep = row[e];
                double up = 0.0, down = 0.0;
                row[e] = keep + h;
                ref_softmax_topk(row, E, k, renormalize, top, want);
                for (i = 0; i < k; i++) up += dw[(size_t)t * k + i] * want[i];
                row[e] = keep - h;
                ref_softmax_topk(row, E, k, renormalize, top, want);
                for (i = 0; i < k; i++) down += dw[(size_t)t * k + i] * want[i];
                row[e] = keep;
                worst_grad = worse(worst_grad, fabs(dl[(size_t)t * E + e] - (up - down) / (2 * h)));
            }
    }
    FM_CHECK(bad_index == 0, "softmax_topk T=%d E=%d k=%d: %d indices differ", T, E, k, bad_index);
    FM_CHECK(worst <= GATE_TOLERANCE, "softmax_topk T=%d E=%d k=%d renormalize=%d: weights off by %.3g", T, E, k,
             renormalize, worst);
    FM_CHECK(worst_grad <= GRADIENT_TOLERANCE, "softmax_topk T=%d E=%d k=%d renormalize=%d: gradient off by %.3g", T, E,
             k, renormalize, worst_grad);
    free(l), free(dw), free(want), free(top), free(indices), free(weights), free(dl), free(fl), free(fdw);
}

/* ---- logit projection ---- */

static void check_logits(int T, int D, int E) {
    float *x = (float *)malloc((size_t)T * D * 4), *wg = (float *)malloc((size_t)D * E * 4), *wn = (float *)malloc((size_t)D * E * 4);
    float *clean = (float *)malloc((size_t)T * E * 4), *noise = (float *)malloc((size_t)T * E * 4);
    float *dc = (float *)malloc((size_t)T * E * 4), *dr = (float *)malloc((size_t)T * E * 4);
    float *dx = (float *)malloc((size_t)T * D * 4), *dwg = (float *)malloc((size_t)D * E * 4), *dwn = (float *)malloc((size_t)D * E * 4);
    double worst = 0.0;
    int t, i, e;
    for (i = 0; i < T * D; i++) x[i] = (float)fm_test_normal();
    for (i = 0; i < D * E; i++) wg[i] = (float)fm_test_normal(), wn[i] = (float)fm_test_normal();
    for (i = 0; i < T * E; i++) dc[i] = (float)fm_test_normal(), dr[i] = (float)fm_test_normal();
    FM_CHECK(fm_gate_logits_forward(T, D, E, x, D, wg, wn, clean, noise) == FM_OK, "logits forward");
    FM_CHECK(fm_gate_logits_backward(T, D, E, x, D, wg, wn, dc, dr, dx, D, dwg, dwn) == FM_OK, "logits backward");
    /* the backward of a linear map is exact: the objective sum(dc * clean + dr * noise) has
     * derivative dx = dc W_g^T + dr W_n^T, dW = x^T d, compared in double (scale sqrt(terms)) */
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) {
            double c = 0.0, r = 0.0;
            for (i = 0; i < D; i++) c += (double)x[t * D + i] * wg[i * E + e], r += (double)x[t * D + i] * wn[i * E + e];
            worst = worse(worst, fmax(fabs(clean[t * E + e] - c), fabs(noise[t * E + e] - r)) / sqrt(D));
        }
    for (t = 0; t < T; t++)
        for (i = 0; i < D; i++) {
            double s = 0.0;
            for (e = 0; e < E; e++) s += (double)dc[t * E + e] * wg[i * E + e] + (double)dr[t * E + e] * wn[i * E + e];
            worst = worse(worst, fabs(dx[t * D + i] - s) / sqrt(E));
        }
    for (i = 0; i < D; i++)
        for (e = 0; e < E; e++) {
            double sg = 0.0, sn = 0.0;
            for (t = 0; t < T; t++) sg += (double)x[t * D + i] * dc[t * E + e], sn += (double)x[t * D + i] * dr[t * E + e];
            worst = worse(worst, fmax(fabs(dwg[i * E + e] - sg), fabs(dwn[i * E + e] - sn)) / sqrt(T));
        }
    FM_CHECK(worst <= 1e-5, "gate logits T=%d D=%d E=%d: off by %.3g", T, D, E, worst);
    free(x), free(wg), free(wn), free(clean), free(noise), free(dc), free(dr), free(dx), free(dwg), free(dwn);
}

/* ---- losses ---- */

static double ref_cv(const double *v, int n) {
    double mean = 0.0, var = 0.0;
    int i;
    if (n == 1) return 0.0;
    for (i = 0; i < n; i++) mean += v[i] / n;
    for (i = 0; i < n; i++) var += (v[i] - mean) * (v[i] - mean) / (n - 1);
    return var / (mean * mean + 1e-10);
}

static double ref_ce(const double *l, int T, int E, const int32_t *target, int first) {
    double loss = 0.0;
    int t, e, count = 0;
    for (t = 0; t < T; t++) {
        double max = l[t * E], sum = 0.0;
        if (target[t] < first) continue;
        for (e = 1; e < E; e++) max = fmax(max, l[t * E + e]);
        for (e = 0; e < E; e++) sum += exp(l[t * E + e] - max);
        loss += max + log(sum) - l[t * E + target[t]];
        count++;
    }
    return count ? loss / count : 0.0;
}

static double ref_flexmoe(const double *l, const double *imp, const double *load, int T, int E, int G, const int32_t *comb) {
    double v = ref_ce(l, T, E, comb, 1);
    int g;
    for (g = 0; g < G; g++) v += ref_cv(imp + g * E, E) + ref_cv(load + g * E, E);
    return v;
}

static void check_losses(int T, int E, int G) {
    double *l = (double *)malloc((size_t)T * E * 8), *imp = (double *)malloc((size_t)G * E * 8), *load = (double *)malloc((size_t)G * E * 8);
    float *fl, *fimp, *fload, *dl = (float *)malloc((size_t)T * E * 4), *dimp = (float *)malloc((size_t)G * E * 4);
    float *dload = (float *)malloc((size_t)G * E * 4), value = NAN, cv = NAN;
    int32_t *comb = (int32_t *)malloc((size_t)T * 4);
    double worst = 0.0, want;
    int i, g;
    random_fill(l, (size_t)T * E, 2.0);
    for (i = 0; i < G * E; i++) imp[i] = fabs(fm_test_normal()) * 3 + 0.1, load[i] = fabs(fm_test_normal()) * 3 + 0.1;
    for (i = 0; i < T; i++) comb[i] = fm_test_int(0, 2) == 0 ? 0 : fm_test_int(1, E - 1);
    fl = to_float(l, (size_t)T * E), fimp = to_float(imp, (size_t)G * E), fload = to_float(load, (size_t)G * E);
    for (i = 0; i < G * E; i++) imp[i] = fimp[i], load[i] = fload[i];
    FM_CHECK(fm_flexmoe_router_loss(T, E, G, fl, E, comb, fimp, fload, &value, dl, E, dimp, dload) == FM_OK, "flexmoe loss");
    want = ref_flexmoe(l, imp, load, T, E, G, comb);
    FM_CHECK(fabs(value - want) <= 1e-5 * (1 + fabs(want)), "flexmoe loss %.9g, want %.9g", value, want);
    for (i = 0; i < T * E + 2 * G * E; i++) {
        double *p = i < T * E ? l + i : i < T * E + G * E ? imp + (i - T * E) : load + (i - T * E - G * E);
        const float got = i < T * E ? dl[i] : i < T * E + G * E ? dimp[i - T * E] : dload[i - T * E - G * E];
        const double h = 1e-5 * fmax(1.0, fabs(*p)), keep = *p;
        double up, down;
        *p = keep + h, up = ref_flexmoe(l, imp, load, T, E, G, comb);
        *p = keep - h, down = ref_flexmoe(l, imp, load, T, E, G, comb);
        *p = keep;
        worst = worse(worst, fabs(got - (up - down) / (2 * h)) / (1.0 + fabs((up - down) / (2 * h))));
    }
    FM_CHECK(worst <= GRADIENT_TOLERANCE, "flexmoe loss T=%d E=%d G=%d: gradient off by %.3g", T, E, G, worst);
    /* cv^2 of one value is 0; the plain CE ignores negative targets */
    FM_CHECK(fm_cv_squared(1, fimp, &cv, dimp) == FM_OK && cv == 0.0f && dimp[0] == 0.0f, "cv^2 of one value");
    for (g = 0; g < T; g++) comb[g] = g % 3 == 0 ? -1 : comb[g];
    FM_CHECK(fm_router_cross_entropy(T, E, fl, E, comb, &value, dl, E) == FM_OK, "router CE");
    want = ref_ce(l, T, E, comb, 0);
    FM_CHECK(fabs(value - want) <= 1e-5 * (1 + fabs(want)), "router CE %.9g, want %.9g", value, want);
    FM_CHECK(dl[0] == 0.0f && dl[E - 1] == 0.0f, "ignored tokens get zero gradient");
    free(l), free(imp), free(load), free(fl), free(fimp), free(fload), free(dl), free(dimp), free(dload), free(comb);
}

/* ---- policy and errors ---- */

static void check_policy(void) {
    const float logits[2 * 4] = {0.5f, NAN, 2.0f, 1.0f, 1.0f, 3.0f, 1.0f, -INFINITY};
    int32_t idx[4];
    float w[4];
    FM_CHECK(fm_softmax_topk_forward(2, 4, 2, 1, logits, 4, idx, 2, w, 2) == FM_OK, "policy");
    FM_CHECK(idx[0] == 1 && idx[1] == 2 && w[0] != w[0] && w[1] != w[1], "a NaN logit is selected first and makes the weights NaN");
    FM_CHECK(idx[2] == 1 && idx[3] == 0 && fabs(w[2] - 1.0 / (1.0 + exp(-2.0))) < 1e-6, "ties by column, -Inf weight 0");
}

static void check_errors(void) {
    float clean[8] = {0}, gates[8], load[8];
    int32_t idx[8], group[2] = {0, 5}, comb[2] = {1, 9};
    fm_gate_desc desc;
    fm_gate_tensors t;
    float value;
    int i, untouched = 1;
    for (i = 0; i < 8; i++) gates[i] = 7.0f, idx[i] = -7, load[i] = 7.0f;
    memset(&desc, 0, sizeof desc);
    memset(&t, 0, sizeof t);
    desc.tokens = 2, desc.experts = 4, desc.top_k = 2;
    t.clean_logits = clean, t.indices = idx, t.gates = gates, t.load = load;
    FM_CHECK(fm_noisy_gate_forward(NULL, &t) == FM_ERR_NULL_POINTER, "NULL desc");
    desc.top_k = 5;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_ARGUMENT, "k > experts");
    desc.top_k = 2, desc.training = 1;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_NULL_POINTER, "training without noise logits");
    desc.training = 0, desc.groups = 2, t.token_group = group;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_ARGUMENT, "group out of range");
    desc.groups = FLEXMOE_GATE_MAX_GROUPS + 1, t.token_group = NULL;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_ARGUMENT, "too many groups");
    desc.groups = 0, desc.noise_epsilon = -1.0f;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_ARGUMENT, "negative epsilon");
    desc.noise_epsilon = 0.0f, desc.experts = FLEXMOE_GATE_MAX_EXPERTS + 1;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_ARGUMENT, "too many experts");
    desc.experts = 4, t.ld_clean = 3;
    FM_CHECK(fm_noisy_gate_forward(&desc, &t) == FM_ERR_INVALID_SHAPE, "ld < experts");
    FM_CHECK(fm_softmax_topk_forward(2, 20, 17, 1, clean, 20, idx, 17, gates, 17) == FM_ERR_INVALID_ARGUMENT, "k > 16");
    desc.top_k = 4, desc.groups = 0;
    FM_CHECK(fm_gate_load_forward(&desc, clean, 4, clean, 4, clean, 4, clean, 5, NULL, load) == FM_ERR_INVALID_ARGUMENT,
             "load with k == experts");
    desc.top_k = 2, desc.groups = 1;
    FM_CHECK(fm_gate_load_forward(&desc, clean, 4, clean, 4, clean, 4, clean, 3, group, load) == FM_ERR_INVALID_ARGUMENT,
             "load with a group out of range");
    FM_CHECK(fm_flexmoe_router_loss(2, 4, 1, clean, 4, comb, clean, clean, &value, NULL, 4, NULL, NULL) == FM_ERR_INVALID_ARGUMENT,
             "combination >= experts");
    for (i = 0; i < 8; i++) untouched &= gates[i] == 7.0f && idx[i] == -7 && load[i] == 7.0f;
    FM_CHECK(untouched, "a failed call wrote its outputs");
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i;
    fm_test_seed("test_gate");
    check_noise();
    n = fm_test_isas(isas);
    for (i = 0; i < n; i++) {
        fm_test_use_isa(isas[i]);
        check_gate();
        check_gate_gradient_case(5, 8, 2, 1);
        check_gate_gradient_case(7, 16, 4, 1);
        check_gate_gradient_case(4, 5, 1, 1);
        check_gate_gradient_case(6, 6, 2, 0);
        check_gate_gradient_case(3, 4, 4, 1); /* k == experts: load is a count */
        check_softmax_topk(37, 16, 4, 1);
        check_softmax_topk(37, 16, 4, 0);
        check_softmax_topk(20, 65, 8, 0);
        check_softmax_topk(5, 3, 1, 1);
        check_logits(13, 17, 5);
        check_losses(23, 8, 2);
        check_losses(9, 16, 1);
        check_policy();
        check_errors();
    }
    return fm_test_finish("test_gate");
}
