/* flexmoe_demo — softmax routing of multimodal tokens on every ISA path of this machine.
 *
 * Tokens come from samples that observe different combinations of M modalities (Flex-MoE's
 * setting); each combination has its own gate bias, so a router that learned to specialise
 * sends each combination to its own experts. The demo computes the gate probabilities with the
 * active path, shows the mean routing per combination, and checks that every available path
 * agrees with the scalar reference. Run with --help for the options.
 */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct demo_options {
    int tokens, experts, modalities;
    unsigned seed;
    fm_isa isa;
} demo_options;

static void usage(FILE *out) {
    fprintf(out,
            "usage: flexmoe_demo [options]\n"
            "  --tokens N       tokens to route (default 4096)\n"
            "  --experts E      experts (default 16)\n"
            "  --modalities M   modalities, 1..6 (default 3: 2^M-1 combinations)\n"
            "  --seed S         random seed (default 1)\n"
            "  --isa NAME       force a path: scalar, avx2, avx512, neon (default: best)\n"
            "  --list-isas      print the paths this machine supports, one per line, and exit\n"
            "  --help           this text\n");
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
            if (!parse_int(a, v, 1, 4096, &o->experts)) return 0;
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
    return 1;
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

int main(int argc, char **argv) {
    demo_options o = {4096, 16, 3, 1, FM_ISA_AUTO};
    int combos, masks[63], t, e, c, k;
    float *logits, *probs, *reference;
    double *mean;
    int *count, *combo_of;
    fm_status status;

    if (!parse_args(argc, argv, &o)) return 2;
    if ((status = fm_set_isa(o.isa)) != FM_OK) return 1; /* the library logged why */
    combos = (1 << o.modalities) - 1;
    combination_masks(o.modalities, masks);
    rng_state = o.seed;

    logits = (float *)fm_alloc((size_t)o.tokens * o.experts * sizeof(float));
    probs = (float *)fm_alloc((size_t)o.tokens * o.experts * sizeof(float));
    reference = (float *)fm_alloc((size_t)o.tokens * o.experts * sizeof(float));
    mean = (double *)calloc((size_t)combos * o.experts, sizeof(double));
    count = (int *)calloc((size_t)combos, sizeof(int));
    combo_of = (int *)malloc((size_t)o.tokens * sizeof(int));
    if (!logits || !probs || !reference || !mean || !count || !combo_of) {
        fprintf(stderr, "flexmoe_demo: out of memory\n");
        return 1;
    }
    /* each combination prefers expert (c mod E) and, less, its neighbour */
    for (t = 0; t < o.tokens; t++) {
        c = (int)(uniform() * combos);
        combo_of[t] = c;
        for (e = 0; e < o.experts; e++) logits[(size_t)t * o.experts + e] = (float)normal();
        logits[(size_t)t * o.experts + c % o.experts] += 3.0f;
        logits[(size_t)t * o.experts + (c + 1) % o.experts] += 1.5f;
    }

    status = fm_softmax_forward(o.tokens, o.experts, logits, o.experts, probs, o.experts);
    if (status != FM_OK) {
        fprintf(stderr, "flexmoe_demo: fm_softmax_forward: %s\n", fm_status_str(status));
        return 1;
    }
    printf("flexmoe %d.%d.%d: %d tokens, %d experts, %d modalities (%d combinations), %s path\n\n",
           FLEXMOE_VERSION_MAJOR, FLEXMOE_VERSION_MINOR, FLEXMOE_VERSION_PATCH, o.tokens, o.experts,
           o.modalities, combos, fm_isa_name(fm_active_isa()));
    for (t = 0; t < o.tokens; t++) {
        count[combo_of[t]]++;
        for (e = 0; e < o.experts; e++) mean[(size_t)combo_of[t] * o.experts + e] += probs[(size_t)t * o.experts + e];
    }
    printf("mean gate probability per modality combination (rows) and expert (columns, x100)\n");
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
            printf("%4.0f", count[c] ? 100.0 * mean[(size_t)c * o.experts + e] / count[c] : 0.0);
        printf("\n");
    }

    /* every path on this machine against the scalar reference, on the same logits */
    printf("\nagreement with the scalar path (max |difference| over all probabilities):\n");
    fm_set_isa(FM_ISA_SCALAR);
    fm_softmax_forward(o.tokens, o.experts, logits, o.experts, reference, o.experts);
    for (k = FM_ISA_SCALAR; k < FM_ISA_COUNT; k++) {
        double worst = 0.0;
        size_t i;
        if (!fm_isa_supported((fm_isa)k)) continue;
        fm_set_isa((fm_isa)k);
        fm_softmax_forward(o.tokens, o.experts, logits, o.experts, probs, o.experts);
        for (i = 0; i < (size_t)o.tokens * o.experts; i++) worst = fmax(worst, fabs(probs[i] - reference[i]));
        printf("  %-7s %.2e\n", fm_isa_name((fm_isa)k), worst);
    }
    fm_free(logits);
    fm_free(probs);
    fm_free(reference);
    free(mean);
    free(count);
    free(combo_of);
    return 0;
}
