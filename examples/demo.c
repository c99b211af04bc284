/* flexmoe_demo — Flex-MoE's noisy top-k routing of multimodal tokens on every ISA path of this
 * machine.
 *
 * Tokens come from samples that observe different combinations of M modalities (Flex-MoE's
 * setting); each combination has its own gate bias, so a router that learned to specialise
 * sends each combination to its own experts. The demo runs the training-mode noisy top-k gate
 * (FastMoE's, with Flex-MoE's token groups: full-modality tokens apart from the others), shows
 * where each combination's tokens go and the Flex-MoE router loss, then runs the sparse MoE layer
 * those routes feed (routing plan -> dispatch -> every expert's FFN -> gate-weighted combine),
 * and checks that every available path routes, and computes the layer, like the scalar
 * reference. Run with --help for the options.
 */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct demo_options {
    int tokens, experts, modalities, top_k, dim, hidden;
    unsigned seed;
    fm_isa isa;
} demo_options;

static void usage(FILE *out) {
    fprintf(out,
            "usage: flexmoe_demo [options]\n"
            "  --tokens N       tokens to route (default 4096)\n"
            "  --experts E      experts, 2..1024 and at least the combinations (default 16)\n"
            "  --modalities M   modalities, 1..6 (default 3: 2^M-1 combinations)\n"
            "  --top-k K        experts per token, 1..16 and < E (default 4, as Flex-MoE)\n"
            "  --dim D          token width of the MoE layer (default 128, as Flex-MoE)\n"
            "  --hidden H       hidden width of each expert's FFN (default 256)\n"
            "  --seed S         random seed (default 1)\n"
            "  --isa NAME       force a path: scalar, avx2, avx512, neon (default: best)\n"
            "  --list-isas      print the paths this machine supports, one per line, and exit\n"
            "  --help           this text\n"
            "environment:\n"
            "  FLEXMOE_DEMO_FAIL_ALLOC=N  testing aid: the Nth allocation fails, to walk the\n"
            "                             out-of-memory paths (tests/demo_alloc_failures.sh)\n");
}

static int parse_int(const char *flag, const char *text, int lo, int hi, int *out) {
    char *end;
    long v = text ? strtol(text, &end, 10) : 0;
    if (!text || *end || v < lo || v > hi) {
        fprintf(stderr, "flexmoe_demo: %s needs an integer in [%d, %d], got '%s'\n", flag, lo, hi,
                text ? text : "(nothing)");
        return 0;
    }
    *out = (int)v;
    return 1;
}

static int parse_args(int argc, char **argv, demo_options *o) {
    int i, seed = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--list-isas")) {
            int k;
            for (k = FM_ISA_SCALAR; k < FM_ISA_COUNT; k++)
                if (fm_isa_supported((fm_isa)k)) printf("%s\n", fm_isa_name((fm_isa)k));
            exit(0);
        } else if (!strcmp(a, "--tokens")) {
            if (!parse_int(a, v, 1, 1 << 24, &o->tokens)) return 0;
            i++;
        } else if (!strcmp(a, "--experts")) {
            if (!parse_int(a, v, 2, FLEXMOE_GATE_MAX_EXPERTS, &o->experts)) return 0;
            i++;
        } else if (!strcmp(a, "--top-k")) {
            if (!parse_int(a, v, 1, FLEXMOE_GATE_MAX_TOP_K, &o->top_k)) return 0;
            i++;
        } else if (!strcmp(a, "--dim")) {
            if (!parse_int(a, v, 1, 1 << 14, &o->dim)) return 0;
            i++;
        } else if (!strcmp(a, "--hidden")) {
            if (!parse_int(a, v, 1, 1 << 15, &o->hidden)) return 0;
            i++;
        } else if (!strcmp(a, "--modalities")) {
            if (!parse_int(a, v, 1, 6, &o->modalities)) return 0;
            i++;
        } else if (!strcmp(a, "--seed")) {
            if (!parse_int(a, v, 0, 1 << 30, &seed)) return 0;
            o->seed = (unsigned)seed;
            i++;
        } else if (!strcmp(a, "--isa")) {
            if (!v || fm_isa_from_name(v, &o->isa) != FM_OK) {
                fprintf(stderr, "flexmoe_demo: --isa needs one of scalar, avx2, avx512, neon\n");
                return 0;
            }
            i++;
        } else {
            fprintf(stderr, "flexmoe_demo: unknown option '%s'\n", a);
            usage(stderr);
            return 0;
        }
    }
    if ((1 << o->modalities) - 1 > o->experts) {
        fprintf(stderr, "flexmoe_demo: Flex-MoE's S-Router gives each modality combination its own expert: "
                        "--modalities %d needs --experts >= %d\n", o->modalities, (1 << o->modalities) - 1);
        return 0;
    }
    if (o->top_k >= o->experts) {
        fprintf(stderr, "flexmoe_demo: --top-k must be below --experts (%d), got %d\n", o->experts, o->top_k);
        return 0;
    }
    return 1;
}

/* The most memory the demo may ask for: the options allow far more (2^24 tokens x 16 routes x a
 * 2^15-wide FFN need tens of TiB), and such runs are refused up front rather than left to fail,
 * or to be killed, part-way through. */
#define DEMO_MAX_GIB 256

/* The most bytes the demo holds at once: the gate's buffers and the layer's packed weights
 * throughout, with either the plain weights (while packing) or the layer's input and outputs and
 * one run's scratch. Counted in 64 bits, where no option combination overflows (the largest is
 * below 2^47), so the caller can tell a size_t overflow from a merely absurd request. */
static unsigned long long demo_peak_bytes(const demo_options *o) {
    const unsigned long long f = sizeof(float), i32 = sizeof(int32_t), tokens = (unsigned long long)o->tokens,
                             experts = (unsigned long long)o->experts, routes = tokens * (unsigned long long)o->top_k,
                             dim = (unsigned long long)o->dim, hidden = (unsigned long long)o->hidden,
                             combos = (1ull << o->modalities) - 1;
    const unsigned long long gate = 3 * tokens * experts * f + 2 * routes * (f + i32) + 2 * tokens * i32 +
                                    combos * experts * sizeof(double) + combos * sizeof(int);
    const unsigned long long weights =
        experts * ((unsigned long long)fm_packed_weight_floats(o->dim, o->hidden) +
                   (unsigned long long)fm_packed_weight_floats(o->hidden, o->dim) + hidden + dim) * f;
    const unsigned long long plain = experts * dim * hidden * f;
    const unsigned long long layer = 3 * tokens * dim * f + experts * i32 + /* x, y, y_ref, rows per expert */
                                     (experts + 1 + 2 * routes) * i32 + routes * (2 * dim + hidden) * f; /* a run */
    return gate + weights + (plain > layer ? plain : layer);
}

static unsigned rng_state;
static double uniform(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return (rng_state >> 8) * (1.0 / 16777216.0);
}
static double normal(void) { return sqrt(-2.0 * log(1.0 - uniform())) * cos(6.283185307179586 * uniform()); }

/* Combination index as in Flex-MoE: by size, largest first, each size in lexicographic order. */
static void combination_masks(int m, int *masks) {
    int size, mask, n = 0, bit;
    for (size = m; size >= 1; size--) {
        int pos[6], k; /* the next position list of this size, in lexicographic order */
        for (k = 0; k < size; k++) pos[k] = k;
        for (;;) {
            for (mask = 0, k = 0; k < size; k++) mask |= 1 << pos[k];
            masks[n++] = mask;
            for (k = size - 1; k >= 0 && pos[k] == m - size + k; k--) {}
            if (k < 0) break;
            pos[k]++;
            for (bit = k + 1; bit < size; bit++) pos[bit] = pos[bit - 1] + 1;
        }
    }
}

/* FLEXMOE_DEMO_FAIL_ALLOC=N: the Nth allocation through the library's allocator hook fails. Real
 * out-of-memory is too rare to test the error paths by, so tests/demo_alloc_failures.sh walks N
 * = 1, 2, ... instead. Only the Nth fails, and it says so on stderr: a run that succeeds without
 * that line has proved the walk is over, one that succeeds with it has swallowed a failure. */
typedef struct fail_alloc {
    int fail_at; /* 0: never */
    int count;
} fail_alloc;

static void *failing_alloc(size_t size, void *user_data) {
    fail_alloc *f = (fail_alloc *)user_data;
    if (++f->count == f->fail_at) {
        fprintf(stderr, "flexmoe_demo: FLEXMOE_DEMO_FAIL_ALLOC=%d: failing this allocation\n", f->fail_at);
        return NULL;
    }
    return malloc(size);
}

static void failing_free(void *ptr, void *user_data) {
    (void)user_data;
    free(ptr);
}

/* Every failure is reported where it happens, by the helper that saw it, so callers only unwind;
 * each message names the step, because a bare "out of memory" does not say which option to shrink. */
static void *new_buffer(size_t bytes, const char *what) {
    void *p = fm_alloc(bytes);
    if (!p) fprintf(stderr, "flexmoe_demo: out of memory allocating %s (%zu bytes)\n", what, bytes);
    return p;
}

/* The same for a buffer of one run of a step that runs several times (the MoE layer): run says
 * which, and the message the path it was on. */
static void *new_run_buffer(size_t bytes, const char *what, const char *run) {
    void *p = fm_alloc(bytes);
    if (!p)
        fprintf(stderr, "flexmoe_demo: out of memory allocating %s (%zu bytes) for %s on the %s path\n", what, bytes,
                run, fm_isa_name(fm_active_isa()));
    return p;
}

static int failed(fm_status status, const char *step) {
    if (status == FM_OK) return 0;
    fprintf(stderr, "flexmoe_demo: %s on the %s path: %s\n", step, fm_isa_name(fm_active_isa()),
            fm_status_str(status));
    return 1;
}

static int run_failed(fm_status status, const char *step, const char *run) {
    if (status == FM_OK) return 0;
    fprintf(stderr, "flexmoe_demo: %s for %s on the %s path: %s\n", step, run, fm_isa_name(fm_active_isa()),
            fm_status_str(status));
    return 1;
}

static int select_failed(fm_status status, fm_isa isa) {
    if (status == FM_OK) return 0;
    fprintf(stderr, "flexmoe_demo: selecting the %s path: %s\n", isa == FM_ISA_AUTO ? "default" : fm_isa_name(isa),
            fm_status_str(status));
    return 1;
}

/* The training-mode gate on the active path: indices, gates, noisy logits, importance, load. */
static fm_status route(const demo_options *o, const float *clean, const float *noise, const int32_t *group,
                       int32_t *indices, float *gates, float *noisy, float *importance, float *load) {
    fm_gate_desc desc;
    fm_gate_tensors t;
    fm_status status;
    memset(&desc, 0, sizeof desc);
    memset(&t, 0, sizeof t);
    desc.tokens = o->tokens, desc.experts = o->experts, desc.top_k = o->top_k;
    desc.training = 1, desc.groups = 2, desc.seed = o->seed;
    t.clean_logits = clean, t.noise_logits = noise, t.token_group = group;
    t.indices = indices, t.gates = gates, t.noisy_logits = noisy, t.importance = importance, t.load = load;
    status = fm_noisy_gate_forward(&desc, &t);
    failed(status, "noisy top-k gate");
    return status;
}

/* The sparse MoE layer on the active path: y[t] = sum_i gates[t][i] * FFN_{indices[t][i]}(x[t]).
 * rows_per_expert (experts) receives the plan's counts; run names this run in error messages. */
typedef struct moe_layer {
    fm_expert_ffn_desc desc;
    fm_expert_ffn_params params;
} moe_layer;

static fm_status run_moe_layer(const demo_options *o, const moe_layer *layer, const float *x, const int32_t *indices,
                               const float *gates, float *y, int32_t *rows_per_expert, const char *run) {
    const size_t assignments = (size_t)o->tokens * o->top_k;
    fm_plan_desc desc;
    fm_routing_plan plan;
    int32_t *offsets = NULL, *order = NULL, *position = NULL;
    float *xe = NULL, *ye = NULL, *hidden = NULL;
    fm_status status = FM_ERR_OUT_OF_MEMORY;
    if (!(offsets = (int32_t *)new_run_buffer((size_t)(o->experts + 1) * sizeof(int32_t), "the plan's expert offsets",
                                              run)) ||
        !(order = (int32_t *)new_run_buffer(assignments * sizeof(int32_t), "the plan's row order", run)) ||
        !(position = (int32_t *)new_run_buffer(assignments * sizeof(int32_t), "the plan's row positions", run)) ||
        !(xe = (float *)new_run_buffer(assignments * o->dim * sizeof(float), "the dispatched tokens", run)) ||
        !(ye = (float *)new_run_buffer(assignments * o->dim * sizeof(float), "the experts' outputs", run)) ||
        !(hidden = (float *)new_run_buffer(assignments * o->hidden * sizeof(float), "the experts' hidden activations",
                                           run)))
        goto done;
    memset(&desc, 0, sizeof desc);
    memset(&plan, 0, sizeof plan);
    desc.tokens = o->tokens, desc.top_k = o->top_k, desc.experts = o->experts; /* dropless */
    plan.counts = rows_per_expert, plan.offsets = offsets, plan.order = order, plan.position = position;
    if (run_failed(status = fm_routing_plan_build(&desc, indices, o->top_k, gates, o->top_k, &plan), "routing plan",
                   run) ||
        run_failed(status = fm_dispatch_forward(&plan, o->dim, x, o->dim, xe, o->dim), "dispatch", run) ||
        run_failed(status = fm_expert_ffn_forward(&layer->desc, offsets, &layer->params, xe, o->dim, ye, o->dim,
                                                  hidden, o->hidden, NULL, 0),
                   "expert FFN", run))
        goto done;
    run_failed(status = fm_combine_forward(&plan, o->dim, ye, o->dim, gates, o->top_k, y, o->dim), "combine", run);
done:
    fm_free(offsets), fm_free(order), fm_free(position), fm_free(xe), fm_free(ye), fm_free(hidden);
    return status;
}

/* Random expert weights, packed as the FFN reads them (fm_pack_weights). The buffers go into
 * *layer as soon as they exist, so free_moe_layer releases them whether this succeeds or not. */
static fm_status new_moe_layer(const demo_options *o, moe_layer *layer) {
    const size_t plain = (size_t)o->experts * o->dim * o->hidden;
    float *w = NULL, *w1, *w2, *b1, *b2;
    size_t i;
    fm_status status = FM_ERR_OUT_OF_MEMORY;
    memset(layer, 0, sizeof *layer);
    if (!(w = (float *)new_buffer(plain * sizeof(float), "the plain expert weights")) ||
        !(layer->params.w1 = w1 = (float *)new_buffer(
              (size_t)o->experts * fm_packed_weight_floats(o->dim, o->hidden) * sizeof(float), "packed weights W1")) ||
        !(layer->params.w2 = w2 = (float *)new_buffer(
              (size_t)o->experts * fm_packed_weight_floats(o->hidden, o->dim) * sizeof(float), "packed weights W2")) ||
        !(layer->params.b1 = b1 = (float *)new_buffer((size_t)o->experts * o->hidden * sizeof(float), "biases b1")) ||
        !(layer->params.b2 = b2 = (float *)new_buffer((size_t)o->experts * o->dim * sizeof(float), "biases b2")))
        goto done;
    for (i = 0; i < plain; i++) w[i] = (float)(normal() / sqrt((double)o->dim));
    if (failed(status = fm_pack_weights(o->experts, o->dim, o->hidden, FM_WEIGHTS_IN_BY_OUT, w, o->hidden, w1),
               "packing W1"))
        goto done;
    for (i = 0; i < plain; i++) w[i] = (float)(normal() / sqrt((double)o->hidden));
    if (failed(status = fm_pack_weights(o->experts, o->hidden, o->dim, FM_WEIGHTS_IN_BY_OUT, w, o->dim, w2),
               "packing W2"))
        goto done;
    for (i = 0; i < (size_t)o->experts * o->hidden; i++) b1[i] = (float)(0.1 * normal());
    for (i = 0; i < (size_t)o->experts * o->dim; i++) b2[i] = (float)(0.1 * normal());
    layer->desc.experts = o->experts, layer->desc.dim = o->dim, layer->desc.hidden = o->hidden;
    layer->desc.gelu = FM_GELU_ERF;
done:
    fm_free(w);
    return status;
}

static void free_moe_layer(moe_layer *layer) {
    fm_free((void *)layer->params.w1), fm_free((void *)layer->params.b1);
    fm_free((void *)layer->params.w2), fm_free((void *)layer->params.b2);
    memset(layer, 0, sizeof *layer);
}

int main(int argc, char **argv) {
    demo_options o = {4096, 16, 3, 4, 128, 256, 1, FM_ISA_AUTO};
    fail_alloc fail = {0, 0};
    const char *fail_env = getenv("FLEXMOE_DEMO_FAIL_ALLOC");
    fm_desc setup;
    int combos, masks[63], t, e, c, k, i, rc = 1;
    float *clean = NULL, *noise = NULL, *gates = NULL, *noisy = NULL, *ref_gates = NULL,
          importance[2 * FLEXMOE_GATE_MAX_EXPERTS], load[2 * FLEXMOE_GATE_MAX_EXPERTS], loss;
    int32_t *indices = NULL, *ref_indices = NULL, *combo_of = NULL, *group = NULL, *rows_per_expert = NULL;
    float *x = NULL, *y = NULL, *y_ref = NULL;
    moe_layer layer;
    double *share = NULL, scale, layer_error;
    int *count = NULL;
    size_t logits_bytes, routes, tokens_bytes, layer_floats, n;
    unsigned long long peak;
    const unsigned long long max_bytes = (unsigned long long)DEMO_MAX_GIB << 30,
                             limit = (unsigned long long)SIZE_MAX < max_bytes ? (unsigned long long)SIZE_MAX : max_bytes;

    memset(&layer, 0, sizeof layer); /* before the first goto done: free_moe_layer reads it */
    if (!parse_args(argc, argv, &o)) return 2;
    if ((peak = demo_peak_bytes(&o)) > limit) {
        fprintf(stderr,
                "flexmoe_demo: --tokens %d --experts %d --top-k %d --dim %d --hidden %d need %.1f GiB of buffers "
                "at once, more than %s (%.1f GiB): lower --tokens, --dim or --hidden\n",
                o.tokens, o.experts, o.top_k, o.dim, o.hidden, (double)peak / (1 << 30),
                limit < max_bytes ? "size_t can count on this machine" : "this demo allows",
                (double)limit / (1 << 30));
        return 2;
    }
    if (fail_env && *fail_env && !parse_int("FLEXMOE_DEMO_FAIL_ALLOC", fail_env, 1, 1 << 30, &fail.fail_at)) return 2;
    memset(&setup, 0, sizeof setup);
    setup.isa = o.isa;
    if (fail.fail_at) {
        setup.allocator.alloc = failing_alloc, setup.allocator.free = failing_free;
        setup.allocator.user_data = &fail;
    }
    if (select_failed(fm_setup(&setup), o.isa)) goto done; /* the library logged why as well */
    combos = (1 << o.modalities) - 1;
    combination_masks(o.modalities, masks);
    rng_state = o.seed;

    logits_bytes = (size_t)o.tokens * o.experts * sizeof(float);
    routes = (size_t)o.tokens * o.top_k;
    tokens_bytes = (size_t)o.tokens * sizeof(int32_t);
    if (!(clean = (float *)new_buffer(logits_bytes, "the clean logits")) ||
        !(noise = (float *)new_buffer(logits_bytes, "the noise logits")) ||
        !(noisy = (float *)new_buffer(logits_bytes, "the noisy logits")) ||
        !(gates = (float *)new_buffer(routes * sizeof(float), "the gates")) ||
        !(ref_gates = (float *)new_buffer(routes * sizeof(float), "the scalar path's gates")) ||
        !(indices = (int32_t *)new_buffer(routes * sizeof(int32_t), "the expert indices")) ||
        !(ref_indices = (int32_t *)new_buffer(routes * sizeof(int32_t), "the scalar path's expert indices")) ||
        !(combo_of = (int32_t *)new_buffer(tokens_bytes, "the tokens' modality combinations")) ||
        !(group = (int32_t *)new_buffer(tokens_bytes, "the tokens' groups")) ||
        !(share = (double *)new_buffer((size_t)combos * o.experts * sizeof(double), "the gate weight table")) ||
        !(count = (int *)new_buffer((size_t)combos * sizeof(int), "the combination counts")))
        goto done;
    memset(share, 0, (size_t)combos * o.experts * sizeof(double));
    memset(count, 0, (size_t)combos * sizeof(int));
    /* each combination prefers expert (c mod E) and, less, its neighbour; the noise logits set a
     * noise scale of about softplus(-1) */
    for (t = 0; t < o.tokens; t++) {
        c = (int)(uniform() * combos);
        combo_of[t] = c;
        group[t] = c != 0; /* Flex-MoE: full-modality tokens (combination 0) apart from the rest */
        for (e = 0; e < o.experts; e++) {
            clean[(size_t)t * o.experts + e] = (float)normal();
            noise[(size_t)t * o.experts + e] = (float)(normal() * 0.3 - 1.0);
        }
        clean[(size_t)t * o.experts + c % o.experts] += 3.0f;
        clean[(size_t)t * o.experts + (c + 1) % o.experts] += 1.5f;
    }

    if (route(&o, clean, noise, group, indices, gates, noisy, importance, load) != FM_OK ||
        failed(fm_flexmoe_router_loss(o.tokens, o.experts, 2, noisy, o.experts, combo_of, importance, load, &loss,
                                      NULL, 0, NULL, NULL),
               "Flex-MoE router loss"))
        goto done;
    printf("flexmoe %d.%d.%d: %d tokens, %d experts, top-%d, %d modalities (%d combinations), %s path\n\n",
           FLEXMOE_VERSION_MAJOR, FLEXMOE_VERSION_MINOR, FLEXMOE_VERSION_PATCH, o.tokens, o.experts, o.top_k,
           o.modalities, combos, fm_isa_name(fm_active_isa()));
    for (t = 0; t < o.tokens; t++) {
        count[combo_of[t]]++;
        for (i = 0; i < o.top_k; i++)
            share[(size_t)combo_of[t] * o.experts + indices[(size_t)t * o.top_k + i]] += gates[(size_t)t * o.top_k + i];
    }
    printf("mean gate weight per modality combination (rows) and expert (columns, x100)\n");
    printf("%-14s %6s ", "combination", "tokens");
    for (e = 0; e < o.experts && e < 16; e++) printf("%4d", e);
    printf("%s\n", o.experts > 16 ? " ..." : "");
    for (c = 0; c < combos; c++) {
        char name[16];
        int len = 0;
        for (k = 0; k < o.modalities; k++)
            if (masks[c] >> k & 1) len += sprintf(name + len, "%d", k);
        printf("%2d {%-10s %6d ", c, strcat(name, "}"), count[c]);
        for (e = 0; e < o.experts && e < 16; e++)
            printf("%4.0f", count[c] ? 100.0 * share[(size_t)c * o.experts + e] / count[c] : 0.0);
        printf("\n");
    }
    printf("\nFlex-MoE router loss (S-Router cross-entropy + cv^2 of importance and load per group): %.4f\n", loss);

    /* the sparse MoE layer those routes feed, on the active path */
    if (new_moe_layer(&o, &layer) != FM_OK) goto done;
    layer_floats = (size_t)o.tokens * o.dim;
    if (!(x = (float *)new_buffer(layer_floats * sizeof(float), "the layer's input")) ||
        !(y = (float *)new_buffer(layer_floats * sizeof(float), "the layer's output")) ||
        !(y_ref = (float *)new_buffer(layer_floats * sizeof(float), "the scalar path's layer output")) ||
        !(rows_per_expert = (int32_t *)new_buffer((size_t)o.experts * sizeof(int32_t), "the rows per expert")))
        goto done;
    for (n = 0; n < layer_floats; n++) x[n] = (float)normal();
    if (run_moe_layer(&o, &layer, x, indices, gates, y, rows_per_expert, "the layer after the gate") != FM_OK)
        goto done;
    printf("\nsparse MoE layer (d = %d, expert FFN %d -> %d -> %d with GELU): rows per expert\n ", o.dim, o.dim,
           o.hidden, o.dim);
    for (e = 0; e < o.experts && e < 16; e++) printf(" %d", rows_per_expert[e]);
    printf("%s\n", o.experts > 16 ? " ..." : "");

    /* every path on this machine against the scalar reference, on the same logits and noise; a
     * line is printed only once all of its calls succeeded, so no figure comes from a stale buffer.
     * The reference is the scalar path's routes and the scalar layer on them. Each path routes on
     * its own (the routing figures), but its layer runs on those same scalar routes: where two paths
     * break a near-tie differently, that shows as a token routed differently, not as a layer error. */
    printf("\nagreement with the scalar path (tokens routed differently, max |gate difference|; MoE layer output\n"
           "on the same routes, max |difference| / max |output|):\n");
    if (select_failed(fm_set_isa(FM_ISA_SCALAR), FM_ISA_SCALAR) ||
        route(&o, clean, noise, group, ref_indices, ref_gates, noisy, importance, load) != FM_OK ||
        run_moe_layer(&o, &layer, x, ref_indices, ref_gates, y_ref, rows_per_expert, "the reference layer") != FM_OK)
        goto done;
    for (n = 0, scale = 0.0; n < layer_floats; n++) scale = fmax(scale, fabs(y_ref[n]));
    for (k = FM_ISA_SCALAR; k < FM_ISA_COUNT; k++) {
        double worst = 0.0;
        int differ = 0;
        if (!fm_isa_supported((fm_isa)k)) continue;
        if (select_failed(fm_set_isa((fm_isa)k), (fm_isa)k) ||
            route(&o, clean, noise, group, indices, gates, noisy, importance, load) != FM_OK ||
            run_moe_layer(&o, &layer, x, ref_indices, ref_gates, y, rows_per_expert, "the agreement check") != FM_OK)
            goto done;
        for (t = 0; t < o.tokens; t++) {
            const size_t row = (size_t)t * o.top_k;
            if (memcmp(indices + row, ref_indices + row, (size_t)o.top_k * sizeof(int32_t))) {
                differ++; /* the float noise of two paths can only reorder near-ties */
                continue;
            }
            for (i = 0; i < o.top_k; i++) worst = fmax(worst, fabs(gates[row + i] - ref_gates[row + i]));
        }
        for (n = 0, layer_error = 0.0; n < layer_floats; n++) layer_error = fmax(layer_error, fabs(y[n] - y_ref[n]));
        if (scale > 0.0) /* relative, as the heading says */
            printf("  %-7s %d of %d tokens, %.2e; layer %.2e\n", fm_isa_name((fm_isa)k), differ, o.tokens, worst,
                   layer_error / scale);
        else /* the reference output is all zeros: there is nothing to be relative to */
            printf("  %-7s %d of %d tokens, %.2e; layer %.2e absolute (the scalar output is all zeros)\n",
                   fm_isa_name((fm_isa)k), differ, o.tokens, worst, layer_error);
    }
    rc = 0;

done: /* the one way out: fm_free(NULL) is a no-op, so whatever was not allocated yet is skipped */
    fm_free(clean), fm_free(noise), fm_free(noisy), fm_free(gates), fm_free(ref_gates);
    fm_free(indices), fm_free(ref_indices), fm_free(combo_of), fm_free(group);
    fm_free(x), fm_free(y), fm_free(y_ref), fm_free(rows_per_expert);
    fm_free(share), fm_free(count);
    free_moe_layer(&layer);
    return rc;
}
