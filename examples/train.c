/* flexmoe_train — trains the Flex-MoE model on multi-view data with missing views, one thread.
 *
 * Without --data it trains on an embedded synthetic task that needs several views: 8 classes,
 * three views, each view telling one bit of the class (so a sample missing a view is ambiguous
 * between two classes), so it runs anywhere. With --data DIR it reads the multi-view CSV format
 * of ../shared/data/handwritten (views.txt, <view>.csv, labels.csv; an empty line marks a
 * missing view). Views are dropped at --missing-rate, the samples split 70/15/15 (seeded), each
 * view standardised on the training rows; the model trains with Flex-MoE's recipe (curriculum
 * warm-up, Adam, model selection on validation accuracy) and reports the test metrics, overall
 * and per modality combination. Run with --help for the options.
 */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct train_options {
    const char *data;
    float missing_rate, lr;
    int epochs, batch_size, warmup, json;
    uint64_t seed;
} train_options;

static void usage(FILE *out) {
    fprintf(out,
            "usage: flexmoe_train [options]\n"
            "  --data DIR          multi-view CSV directory (views.txt, <view>.csv, labels.csv);\n"
            "                      default: an embedded synthetic task of 8 classes over 3 views\n"
            "  --missing-rate P    drop each view of each sample with probability P, one kept (default 0.3)\n"
            "  --epochs N          (default 20)\n"
            "  --batch-size N      (default 16)\n"
            "  --lr X              Adam's learning rate (default 1e-3)\n"
            "  --warmup N          curriculum epochs before shuffling (default 5)\n"
            "  --seed N            split, missingness, initialisation, shuffles, dropout (default 1)\n"
            "  --json              one machine-readable result line on stdout, no progress\n"
            "  --help              this text\n");
}

static int parse_number(const char *flag, const char *text, double lo, double hi, double *out) {
    char *end;
    const double v = text ? strtod(text, &end) : 0.0;
    if (!text || !*text || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "flexmoe_train: %s needs a number in [%g, %g], got '%s'\n", flag, lo, hi, text ? text : "(nothing)");
        return 0;
    }
    *out = v;
    return 1;
}

static int parse_args(int argc, char **argv, train_options *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->missing_rate = 0.3f, o->lr = 1e-3f, o->epochs = 20, o->batch_size = 16, o->warmup = 5, o->seed = 1;
    for (i = 1; i < argc; i++) {
        const char *flag = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        double v;
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            usage(stdout);
            exit(0);
        } else if (strcmp(flag, "--json") == 0) {
            o->json = 1;
            continue;
        } else if (strcmp(flag, "--data") == 0 && value) {
            o->data = value;
        } else if (strcmp(flag, "--missing-rate") == 0) {
            if (!parse_number(flag, value, 0.0, 1.0, &v)) return 0;
            o->missing_rate = (float)v;
        } else if (strcmp(flag, "--epochs") == 0) {
            if (!parse_number(flag, value, 1, 100000, &v)) return 0;
            o->epochs = (int)v;
        } else if (strcmp(flag, "--batch-size") == 0) {
            if (!parse_number(flag, value, 1, 4096, &v)) return 0;
            o->batch_size = (int)v;
        } else if (strcmp(flag, "--lr") == 0) {
            if (!parse_number(flag, value, 1e-8, 10.0, &v)) return 0;
            o->lr = (float)v;
        } else if (strcmp(flag, "--warmup") == 0) {
            if (!parse_number(flag, value, 0, 100000, &v)) return 0;
            o->warmup = (int)v;
        } else if (strcmp(flag, "--seed") == 0) {
            if (!parse_number(flag, value, 0, 4294967295.0, &v)) return 0;
            o->seed = (uint64_t)v;
        } else {
            fprintf(stderr, "flexmoe_train: unknown option or missing value: %s (try --help)\n", flag);
            return 0;
        }
        i++;
    }
    return 1;
}

/* ---- the synthetic task ------------------------------------------------------------------- */

static uint64_t rng_state;
static double uniform(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0);
}
static double normal(void) { return sqrt(-2.0 * log(1.0 - uniform())) * cos(6.283185307179586 * uniform()); }

/* 1600 samples, 8 classes; view v (12, 20 and 8 features) carries bit v of the class along a
 * direction of its own, buried in noise. */
static fm_status synthetic(uint64_t seed, fm_dataset *ds) {
    static const int features[3] = {12, 20, 8};
    double direction[3][20];
    int v, j, s;
    memset(ds, 0, sizeof *ds);
    rng_state = seed * 7919 + 17;
    ds->samples = 1600, ds->views = 3, ds->classes = 8;
    ds->observed = (uint8_t *)fm_alloc((size_t)ds->samples * ds->views);
    ds->labels = (int32_t *)fm_alloc((size_t)ds->samples * sizeof(int32_t));
    if (!ds->observed || !ds->labels) return FM_ERR_OUT_OF_MEMORY;
    for (v = 0; v < 3; v++) {
        snprintf(ds->names[v], sizeof ds->names[v], "view%d", v);
        ds->features[v] = features[v];
        if (!(ds->values[v] = (float *)fm_alloc((size_t)ds->samples * features[v] * sizeof(float)))) return FM_ERR_OUT_OF_MEMORY;
        for (j = 0; j < features[v]; j++) direction[v][j] = normal() / sqrt(features[v] / 4.0);
    }
    for (s = 0; s < ds->samples; s++) {
        ds->labels[s] = s % 8;
        for (v = 0; v < 3; v++) {
            const double sign = (ds->labels[s] >> v) & 1 ? 1.0 : -1.0;
            ds->observed[s * 3 + v] = 1;
            for (j = 0; j < features[v]; j++)
                ds->values[v][(size_t)s * features[v] + j] = (float)(sign * direction[v][j] + normal());
        }
    }
    return FM_OK;
}

/* ---- progress ----------------------------------------------------------------------------- */

typedef struct run_state {
    const train_options *o;
    int tty, train_count;
    double start, epoch_start;
} run_state;

static double now(void) { return (double)clock() / CLOCKS_PER_SEC; }

static int on_step(const fm_train_progress *p, void *user) {
    run_state *r = (run_state *)user;
    const int width = 30, done = p->step * width / p->steps_per_epoch;
    const double elapsed = now() - r->epoch_start, per_step = elapsed / p->step;
    const double left = per_step * ((double)(p->epochs - p->epoch + 1) * p->steps_per_epoch - p->step);
    int i;
    if (!r->tty || r->o->json) return 0;
    fprintf(stderr, "\repoch %3d/%d [", p->epoch, p->epochs);
    for (i = 0; i < width; i++) fputc(i < done ? '#' : '.', stderr);
    fprintf(stderr, "] loss %.4f  %5.0f samples/s  %4.0f s left ", p->loss,
            per_step > 0 ? r->o->batch_size / per_step : 0.0, left);
    fflush(stderr);
    return 0;
}

static int on_epoch(const fm_train_progress *p, void *user) {
    run_state *r = (run_state *)user;
    const double seconds = now() - r->epoch_start;
    if (!r->o->json)
        fprintf(stderr, "%sepoch %3d/%d  loss %.4f  validation accuracy %.3f%s  %.0f samples/s\n", r->tty ? "\r" : "",
                p->epoch, p->epochs, p->loss, p->validation.accuracy, p->best_epoch == p->epoch ? " (best)" : "       ",
                seconds > 0 ? r->train_count / seconds : 0.0);
    r->epoch_start = now();
    return 0;
}

/* ---- per combination ---------------------------------------------------------------------- */

static void report_combinations(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count) {
    const int combos = fm_combination_count(ds->views);
    int32_t *subset = (int32_t *)malloc((size_t)count * sizeof(int32_t));
    int c, i, v;
    printf("\n%-44s %8s %9s\n", "observed views", "samples", "accuracy");
    for (c = 0; c < combos && subset; c++) {
        const uint32_t mask = fm_combination_mask(ds->views, c);
        char names[256] = "";
        int n = 0;
        fm_metrics m;
        for (i = 0; i < count; i++) {
            uint32_t have = 0;
            for (v = 0; v < ds->views; v++)
                if (ds->observed[(size_t)rows[i] * ds->views + v]) have |= 1u << v;
            if (have == mask) subset[n++] = rows[i];
        }
        if (n == 0) continue;
        for (v = 0; v < ds->views; v++)
            if (mask >> v & 1u) snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", *names ? "+" : "", ds->names[v]);
        if (fm_model_evaluate(model, ds, subset, n, &m) == FM_OK) printf("%-44s %8d %9.3f\n", names, n, m.accuracy);
    }
    free(subset);
}

int main(int argc, char **argv) {
    train_options o;
    fm_dataset ds;
    fm_model model;
    fm_model_desc desc;
    fm_train_desc td;
    fm_train_result result;
    fm_metrics test;
    run_state state;
    int32_t *order;
    int train = 0, validation = 0, v;
    fm_status status;
    if (!parse_args(argc, argv, &o)) return 2;
    status = o.data ? fm_dataset_load(o.data, &ds) : synthetic(o.seed, &ds);
    if (status != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot load %s (%s)\n", o.data ? o.data : "the synthetic task",
                status == FM_ERR_INVALID_ARGUMENT ? "the message above says why" : fm_status_str(status));
        fm_dataset_free(&ds);
        return 1;
    }
    order = (int32_t *)malloc((size_t)ds.samples * sizeof(int32_t));
    if (!order || (status = fm_dataset_drop_views(&ds, o.missing_rate, o.seed)) != FM_OK ||
        (status = fm_dataset_split(&ds, o.seed, order, &train, &validation)) != FM_OK ||
        (status = fm_dataset_standardize(&ds, order, train)) != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot prepare the data (%s)\n",
                !order ? "out of memory" : status == FM_ERR_INVALID_ARGUMENT ? "the message above says why" : fm_status_str(status));
        return 1;
    }
    memset(&desc, 0, sizeof desc);
    desc.modalities = ds.views, desc.classes = ds.classes;
    for (v = 0; v < ds.views; v++) desc.features[v] = ds.features[v];
    if ((status = fm_model_create(&desc, o.batch_size, &model)) != FM_OK || (status = fm_model_init(&model, o.seed)) != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot create the model: %s\n", fm_status_str(status));
        return 1;
    }
    if (!o.json)
        fprintf(stderr, "%s: %d samples (%d train, %d validation, %d test), %d views, %d classes, missing rate %.2f\n",
                o.data ? o.data : "synthetic", ds.samples, train, validation, ds.samples - train - validation, ds.views,
                ds.classes, (double)o.missing_rate);
    memset(&state, 0, sizeof state);
    state.o = &o, state.tty = isatty(2), state.train_count = train, state.start = state.epoch_start = now();
    memset(&td, 0, sizeof td);
    td.epochs = o.epochs, td.batch_size = o.batch_size, td.warmup_epochs = o.warmup > 0 ? o.warmup : -1;
    td.adam.lr = o.lr, td.seed = o.seed, td.on_step = on_step, td.on_epoch = on_epoch, td.user_data = &state;
    status = fm_model_train(&model, &ds, order, train, order + train, validation, &td, &result);
    if (status != FM_OK) {
        fprintf(stderr, "flexmoe_train: training stopped (%s)\n",
                status == FM_ERR_INVALID_ARGUMENT ? "the message above says why" : fm_status_str(status));
        return 1;
    }
    if ((status = fm_model_evaluate(&model, &ds, order + train + validation, ds.samples - train - validation, &test)) != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot evaluate: %s\n", fm_status_str(status));
        return 1;
    }
    if (o.json) {
        printf("{\"data\": \"%s\", \"missing_rate\": %g, \"seed\": %llu, \"epochs\": %d, \"best_epoch\": %d, "
               "\"validation_accuracy\": %.6f, \"test_accuracy\": %.6f, \"test_macro_f1\": %.6f, \"test_macro_auc\": %.6f, "
               "\"seconds\": %.2f}\n",
               o.data ? o.data : "synthetic", (double)o.missing_rate, (unsigned long long)o.seed, result.epochs_run,
               result.best_epoch, result.best_validation.accuracy, test.accuracy, test.macro_f1, test.macro_auc,
               now() - state.start);
    } else {
        printf("best epoch %d (validation accuracy %.3f)\n\n", result.best_epoch, result.best_validation.accuracy);
        printf("%-10s %8s %9s %9s %9s\n", "test", "samples", "accuracy", "macro-F1", "AUC");
        printf("%-10s %8d %9.3f %9.3f %9.3f\n", "", test.samples, test.accuracy, test.macro_f1, test.macro_auc);
        report_combinations(&model, &ds, order + train + validation, ds.samples - train - validation);
    }
    free(order);
    fm_model_destroy(&model);
    fm_dataset_free(&ds);
    return 0;
}
