/* flexmoe_train — trains the Flex-MoE model on multi-view data with missing views, one thread.
 *
 * Without --data it trains on an embedded synthetic task that needs several views: 8 classes,
 * three views, each view telling one bit of the class (so a sample missing a view is ambiguous
 * between two classes), so it runs anywhere. With --data DIR it reads the multi-view CSV format
 * of ../shared/data/handwritten (views.txt, <view>.csv, labels.csv; an empty line marks a
 * missing view). Views are dropped at --missing-rate, the samples split 70/15/15 (seeded), each
 * view standardised on the training rows; the model trains with Flex-MoE's recipe (curriculum
 * warm-up, Adam, model selection on validation accuracy) and reports the test metrics, overall
 * and per modality combination. --save keeps a checkpoint after every epoch (safetensors, written
 * atomically), --resume continues one bit for bit, --eval scores one, and --export-problem writes
 * the prepared data and the initial weights for scripts/train_reference.py (the same model in
 * PyTorch). Run with --help for the options.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct train_options {
    const char *data, *save, *resume, *eval, *export_problem;
    float missing_rate, lr, impute_keep;
    int epochs, batch_size, warmup, json, seed_given, report_routing, threads;
    fm_gate_kind gate;
    fm_conf_mode confidence;
    fm_imputation imputation;
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
            "  --gate G            noisy (Flex-MoE's noisy top-k, default) or confidence (ConfSMoE's)\n"
            "  --confidence C      with --gate confidence: token (default) or expert-mean\n"
            "  --imputation I      a missing view's tokens: bank (Flex-MoE's learned bank, default), zero,\n"
            "                      sampled-mean (ConfSMoE's first stage: the view's features imputed as\n"
            "                      the mean of 10 observed training samples' drawn at random, encoded),\n"
            "                      or two-stage (ConfSMoE's both: sampled-mean, then after the experts the\n"
            "                      view's tokens attend over the observed views' expert outputs)\n"
            "  --impute-keep F     with two-stage: the fraction of attention weights kept (default 0.25)\n"
            "  --seed N            split, missingness, initialisation, shuffles, dropout (default 1;\n"
            "                      with --resume or --eval: the checkpoint's)\n"
            "  --save FILE         a checkpoint (safetensors) after every epoch, replaced atomically\n"
            "  --resume FILE       continue the run saved in FILE up to --epochs in all, bit for bit as if\n"
            "                      never stopped (give the same --data, --missing-rate and recipe)\n"
            "  --eval FILE         no training: the test metrics of the best weights in FILE\n"
            "  --export-problem FILE  no training: the prepared data, split and initial weights for\n"
            "                      scripts/train_reference.py (the PyTorch reference)\n"
            "  --report-routing    where the trained model routes the training samples' tokens: each\n"
            "                      expert's load, its CV and entropy, each combination's shares\n"
            "                      (with --json: a \"routing\" object; scripts/routing_heatmap.py draws it)\n"
            "  --json              one machine-readable result line on stdout, no progress\n"
            "  --threads T         threads of the kernels (default: OpenMP's, OMP_NUM_THREADS or one per core;\n"
            "                      1 when built without OpenMP); the results do not depend on it\n"
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
        } else if (strcmp(flag, "--report-routing") == 0) {
            o->report_routing = 1;
            continue;
        } else if (strcmp(flag, "--data") == 0 && value) {
            o->data = value;
        } else if (strcmp(flag, "--save") == 0 && value) {
            o->save = value;
        } else if (strcmp(flag, "--resume") == 0 && value) {
            o->resume = value;
        } else if (strcmp(flag, "--eval") == 0 && value) {
            o->eval = value;
        } else if (strcmp(flag, "--export-problem") == 0 && value) {
            o->export_problem = value;
        } else if (strcmp(flag, "--gate") == 0 && value && (!strcmp(value, "noisy") || !strcmp(value, "confidence"))) {
            o->gate = strcmp(value, "noisy") ? FM_GATE_CONFIDENCE : FM_GATE_NOISY_TOPK;
        } else if (strcmp(flag, "--confidence") == 0 && value && (!strcmp(value, "token") || !strcmp(value, "expert-mean"))) {
            o->confidence = strcmp(value, "token") ? FM_CONF_EXPERT_MEAN : FM_CONF_TOKEN;
        } else if (strcmp(flag, "--imputation") == 0 && value &&
                   (!strcmp(value, "bank") || !strcmp(value, "zero") || !strcmp(value, "sampled-mean") ||
                    !strcmp(value, "two-stage"))) {
            o->imputation = !strcmp(value, "bank")           ? FM_IMPUTE_BANK
                            : !strcmp(value, "zero")         ? FM_IMPUTE_ZERO
                            : !strcmp(value, "sampled-mean") ? FM_IMPUTE_FEATURES
                                                             : FM_IMPUTE_TWO_STAGE;
        } else if (strcmp(flag, "--impute-keep") == 0) {
            if (!parse_number(flag, value, 1e-6, 1.0, &v)) return 0;
            o->impute_keep = (float)v;
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
            o->seed = (uint64_t)v, o->seed_given = 1;
        } else if (strcmp(flag, "--threads") == 0) {
            if (!parse_number(flag, value, 1, 1024, &v)) return 0;
            o->threads = (int)v;
        } else {
            fprintf(stderr, "flexmoe_train: unknown option, or a missing or unknown value: %s %s (try --help)\n", flag,
                    value ? value : "");
            return 0;
        }
        i++;
    }
    if (o->confidence != FM_CONF_TOKEN && o->gate != FM_GATE_CONFIDENCE) {
        fprintf(stderr, "flexmoe_train: --confidence needs --gate confidence\n");
        return 0;
    }
    if (o->impute_keep != 0.0f && o->imputation != FM_IMPUTE_TWO_STAGE) {
        fprintf(stderr, "flexmoe_train: --impute-keep needs --imputation two-stage\n");
        return 0;
    }
    if (o->export_problem && (o->gate != FM_GATE_NOISY_TOPK || o->imputation != FM_IMPUTE_BANK)) {
        fprintf(stderr, "flexmoe_train: --export-problem: scripts/train_reference.py trains the noisy gate with the bank only\n");
        return 0;
    }
    if (o->resume && o->eval) {
        fprintf(stderr, "flexmoe_train: --resume and --eval exclude each other\n");
        return 0;
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
    int tty, train_count, failed_save;
    double start, epoch_start, last_step, training_seconds;
    int64_t samples_trained;
} run_state;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int on_step(const fm_train_progress *p, void *user) {
    run_state *r = (run_state *)user;
    const int width = 30, done = p->step * width / p->steps_per_epoch;
    double elapsed, per_step, left;
    int i;
    r->last_step = now();
    r->samples_trained += p->step < p->steps_per_epoch ? r->o->batch_size : r->train_count - (p->step - 1) * r->o->batch_size;
    if (!r->tty || r->o->json) return 0;
    elapsed = r->last_step - r->epoch_start, per_step = elapsed / p->step;
    left = per_step * ((double)(p->epochs - p->epoch + 1) * p->steps_per_epoch - p->step);
    fprintf(stderr, "\repoch %3d/%d [", p->epoch, p->epochs);
    for (i = 0; i < width; i++) fputc(i < done ? '#' : '.', stderr);
    fprintf(stderr, "] loss %.4f  %5.0f samples/s  %4.0f s left ", p->loss,
            per_step > 0 ? r->o->batch_size / per_step : 0.0, left);
    fflush(stderr);
    return 0;
}

static int on_epoch(const fm_train_progress *p, void *user) {
    run_state *r = (run_state *)user;
    const double seconds = r->last_step - r->epoch_start;
    r->training_seconds += seconds;
    if (!r->o->json)
        fprintf(stderr, "%sepoch %3d/%d  loss %.4f  validation accuracy %.3f%s  %.0f samples/s\n", r->tty ? "\r" : "",
                p->epoch, p->epochs, p->loss, p->validation.accuracy, p->best_epoch == p->epoch ? " (best)" : "       ",
                seconds > 0 ? r->train_count / seconds : 0.0);
    if (r->o->save && fm_model_save(p->model, r->o->save) != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot save the checkpoint %s (the message above says why); stopping\n", r->o->save);
        r->failed_save = 1;
        return 1;
    }
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

/* ---- expert-collapse diagnostics ------------------------------------------------------------ */

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", (unsigned char)*s);
        else putchar(*s);
    }
    putchar('"');
}


/* The routing of the training rows: printed, or (json) a "routing" object inside the result line. */
static int report_routing(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count, int json) {
    const int E = model->config.experts, combos = fm_combination_count(ds->views);
    float *load = (float *)malloc((size_t)E * sizeof(float)), *share = (float *)malloc((size_t)combos * E * sizeof(float));
    int64_t *tokens = (int64_t *)malloc((size_t)combos * sizeof(int64_t));
    fm_routing_report r;
    int c, e, v, first = 1, ok = 0;
    memset(&r, 0, sizeof r);
    r.load = load, r.share = share, r.combination_tokens = tokens;
    if (load && share && tokens && fm_model_routing(model, ds, rows, count, &r) == FM_OK) {
        ok = 1;
        if (json) {
            printf(", \"routing\": {\"rows\": %d, \"assignments\": %lld, \"experts\": %d, \"load_cv\": %.6f, \"entropy\": %.6f, "
                   "\"normalized_entropy\": %.6f, \"load\": [", count, (long long)r.assignments, E, r.load_cv, r.entropy,
                   r.normalized_entropy);
            for (e = 0; e < E; e++) printf("%s%.6f", e ? ", " : "", load[e]);
            printf("], \"combinations\": [");
        } else {
            printf("\nrouting of the %d training samples (inference): load CV %.3f, normalised entropy %.3f\n%-28s", count,
                   r.load_cv, r.normalized_entropy, "expert");
            for (e = 0; e < E; e++) printf(" %4d", e);
            printf("\n%-28s", "load %");
            for (e = 0; e < E; e++) printf(" %4.1f", 100.0 * load[e]);
            printf("\n%-28s\n", "combination: share % per expert");
        }
        for (c = 0; c < combos; c++) {
            const uint32_t mask = fm_combination_mask(ds->views, c);
            char names[256] = "";
            if (!tokens[c]) continue;
            for (v = 0; v < ds->views; v++)
                if (mask >> v & 1u) snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", *names ? "+" : "", ds->names[v]);
            if (json) {
                printf("%s", first ? "" : ", ");
                print_json_string(names);
            } else {
                printf("%-28.28s", names);
                for (e = 0; e < E; e++) printf(" %4.0f", 100.0 * share[(size_t)c * E + e]);
                printf("\n");
            }
            first = 0;
        }
        if (json) {
            printf("], \"combination_tokens\": [");
            for (c = 0, first = 1; c < combos; c++)
                if (tokens[c]) printf("%s%lld", first ? "" : ", ", (long long)tokens[c]), first = 0;
            printf("], \"share\": [");
            for (c = 0, first = 1; c < combos; c++) {
                if (!tokens[c]) continue;
                printf("%s[", first ? "" : ", "), first = 0;
                for (e = 0; e < E; e++) printf("%s%.6f", e ? ", " : "", share[(size_t)c * E + e]);
                printf("]");
            }
            printf("]}");
        }
    }
    free(load), free(share), free(tokens);
    return ok;
}

/* ---- the problem for the PyTorch reference -------------------------------------------------- */

/* The prepared data (standardised, views dropped), the split and the model's initial weights,
 * with the configuration and the recipe as JSON metadata: what scripts/train_reference.py reads. */
static fm_status export_problem(const train_options *o, const fm_model *model, const fm_dataset *ds, const int32_t *order,
                                int train, int validation) {
    const fm_model_desc *c = &model->config;
    fm_safetensor t[FLEXMOE_MODEL_MAX_TENSORS + FLEXMOE_MODEL_MAX_MODALITIES + 5];
    char config[1024], recipe[512], names[FLEXMOE_MODEL_MAX_MODALITIES][32], features[128] = "";
    const char *metadata[5];
    float *unpacked[2] = {NULL, NULL};
    int32_t *observed = (int32_t *)malloc((size_t)ds->samples * ds->views * sizeof(int32_t));
    int count = 0, i, m, packed = 0;
    fm_status status = FM_ERR_OUT_OF_MEMORY;
    for (m = 0; m < c->modalities; m++) snprintf(features + strlen(features), sizeof features - strlen(features), "%s%d", m ? ", " : "", c->features[m]);
    snprintf(config, sizeof config,
             "{\"modalities\": %d, \"features\": [%s], \"patches\": %d, \"dim\": %d, \"heads\": %d, \"experts\": %d, "
             "\"top_k\": %d, \"hidden\": %d, \"classes\": %d, \"gate_loss_weight\": %.9g, \"attention_residual\": %s, "
             "\"noise_epsilon\": 0.01, \"layernorm_eps\": %.9g}",
             c->modalities, features, c->patches, c->dim, c->heads, c->experts, c->top_k, c->hidden, c->classes,
             c->gate_loss_weight > 0 ? (double)c->gate_loss_weight : 0.0, c->no_attention_residual ? "false" : "true",
             (double)c->layernorm_eps);
    snprintf(recipe, sizeof recipe,
             "{\"epochs\": %d, \"batch_size\": %d, \"warmup_epochs\": %d, \"lr\": %.9g, \"beta1\": 0.9, \"beta2\": 0.999, "
             "\"eps\": 1e-08, \"weight_decay\": 0, \"dropout\": %.9g, \"seed\": %llu, \"missing_rate\": %.9g}",
             o->epochs, o->batch_size, o->warmup, (double)o->lr, c->dropout > 0 ? (double)c->dropout : 0.0,
             (unsigned long long)o->seed, (double)o->missing_rate);
    metadata[0] = "config", metadata[1] = config, metadata[2] = "training", metadata[3] = recipe, metadata[4] = NULL;
    memset(t, 0, sizeof t);
    for (i = 0; i < model->tensor_count; i++) {
        const fm_tensor_info *info = &model->tensors[i];
        t[count].name = info->name, t[count].dtype = "F32", t[count].rank = info->rank;
        memcpy(t[count].shape, info->shape, sizeof t[count].shape);
        t[count].data = model->params + info->offset;
        if (info->packed) { /* the file holds the plain experts x in x out */
            const size_t plain = (size_t)info->shape[0] * info->shape[1] * info->shape[2];
            if (!(unpacked[packed] = (float *)malloc(plain * sizeof(float)))) goto done;
            fm_unpack_weights(info->shape[0], info->shape[1], info->shape[2], FM_WEIGHTS_IN_BY_OUT, model->params + info->offset,
                              unpacked[packed], info->shape[2]);
            t[count].data = unpacked[packed++];
        }
        count++;
    }
    for (m = 0; m < ds->views; m++) {
        snprintf(names[m], sizeof names[m], "data.features.%d", m);
        t[count].name = names[m], t[count].dtype = "F32", t[count].rank = 2;
        t[count].shape[0] = ds->samples, t[count].shape[1] = ds->features[m], t[count++].data = ds->values[m];
    }
    if (!observed) goto done;
    for (i = 0; i < ds->samples * ds->views; i++) observed[i] = ds->observed[i];
    t[count].name = "data.observed", t[count].dtype = "I32", t[count].rank = 2;
    t[count].shape[0] = ds->samples, t[count].shape[1] = ds->views, t[count++].data = observed;
    t[count].name = "data.labels", t[count].dtype = "I32", t[count].rank = 1, t[count].shape[0] = ds->samples;
    t[count++].data = ds->labels;
    t[count].name = "data.train", t[count].dtype = "I32", t[count].rank = 1, t[count].shape[0] = train;
    t[count++].data = order;
    t[count].name = "data.validation", t[count].dtype = "I32", t[count].rank = 1, t[count].shape[0] = validation;
    t[count++].data = order + train;
    t[count].name = "data.test", t[count].dtype = "I32", t[count].rank = 1, t[count].shape[0] = ds->samples - train - validation;
    t[count++].data = order + train + validation;
    status = fm_safetensors_write(o->export_problem, t, count, metadata);
done:
    free(observed), free(unpacked[0]), free(unpacked[1]);
    return status;
}

/* ---- main ---------------------------------------------------------------------------------- */


static const char *why(fm_status status) {
    return status == FM_ERR_INVALID_ARGUMENT || status == FM_ERR_BAD_FILE || status == FM_ERR_IO ? "the message above says why"
                                                                                                 : fm_status_str(status);
}

/* The checkpoint to resume or evaluate; its run's seed applies (to the data too) unless --seed. */
static fm_status load_checkpoint(train_options *o, fm_model *model) {
    const char *checkpoint = o->resume ? o->resume : o->eval;
    const fm_status status = fm_model_load(checkpoint, o->batch_size, model);
    if (status != FM_OK) fprintf(stderr, "flexmoe_train: cannot load the checkpoint %s (%s)\n", checkpoint, why(status));
    else {
        if (!o->seed_given) o->seed = model->trained.seed;
        o->imputation = model->config.imputation; /* the data is prepared for the model's imputation */
    }
    return status;
}

static fm_status create_model(const train_options *o, const fm_dataset *ds, fm_model *model) {
    fm_model_desc desc;
    fm_status status;
    int v;
    memset(&desc, 0, sizeof desc);
    desc.modalities = ds->views, desc.classes = ds->classes;
    desc.gate = o->gate, desc.confidence = o->confidence, desc.imputation = o->imputation, desc.impute_keep = o->impute_keep;
    for (v = 0; v < ds->views; v++) desc.features[v] = ds->features[v];
    if ((status = fm_model_create(&desc, o->batch_size, model)) != FM_OK || (status = fm_model_init(model, o->seed)) != FM_OK)
        fprintf(stderr, "flexmoe_train: cannot create the model: %s\n", fm_status_str(status));
    return status;
}

/* The data as the run (or the checkpoint's run) saw it: views dropped, split, standardised. */
static fm_status prepare_data(const train_options *o, fm_dataset *ds, int32_t **order, int *train, int *validation) {
    fm_status status = o->data ? fm_dataset_load(o->data, ds) : synthetic(o->seed, ds);
    if (status != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot load %s (%s)\n", o->data ? o->data : "the synthetic task", why(status));
        return status;
    }
    if (!(*order = (int32_t *)malloc((size_t)ds->samples * sizeof(int32_t)))) status = FM_ERR_OUT_OF_MEMORY;
    if (status != FM_OK || (status = fm_dataset_drop_views(ds, o->missing_rate, o->seed)) != FM_OK ||
        (status = fm_dataset_split(ds, o->seed, *order, train, validation)) != FM_OK ||
        (status = fm_dataset_standardize(ds, *order, *train)) != FM_OK ||
        ((o->imputation == FM_IMPUTE_FEATURES || o->imputation == FM_IMPUTE_TWO_STAGE) && (status = fm_dataset_impute(ds, *order, *train, 10, o->seed)) != FM_OK))
        fprintf(stderr, "flexmoe_train: cannot prepare the data (%s)\n", why(status));
    return status;
}

static int check_fits(const fm_model *model, const fm_dataset *ds, const char *checkpoint) {
    int v, fits = model->config.modalities == ds->views && model->config.classes >= ds->classes;
    for (v = 0; fits && v < ds->views; v++) fits = model->config.features[v] == ds->features[v];
    if (!fits)
        fprintf(stderr, "flexmoe_train: the checkpoint %s holds a model of %d modalities and %d classes that does not fit "
                "this data (%d views, %d classes, or other feature counts): give the --data it was trained on\n",
                checkpoint, model->config.modalities, model->config.classes, ds->views, ds->classes);
    return fits;
}

int main(int argc, char **argv) {
    train_options o;
    fm_dataset ds;
    fm_model model;
    fm_train_desc td;
    fm_train_result result;
    fm_metrics test;
    run_state state;
    int32_t *order = NULL;
    int train = 0, validation = 0, test_count, exit_code = 1;
    fm_status status;
    memset(&ds, 0, sizeof ds);
    memset(&model, 0, sizeof model);
    memset(&result, 0, sizeof result);
    if (!parse_args(argc, argv, &o)) return 2;
    fm_set_threads(o.threads);
    if ((o.resume || o.eval) && load_checkpoint(&o, &model) != FM_OK) goto done;
    if (prepare_data(&o, &ds, &order, &train, &validation) != FM_OK) goto done;
    if (o.resume || o.eval ? !check_fits(&model, &ds, o.resume ? o.resume : o.eval) : create_model(&o, &ds, &model) != FM_OK)
        goto done;
    test_count = ds.samples - train - validation;
    if (o.export_problem) {
        if ((status = export_problem(&o, &model, &ds, order, train, validation)) != FM_OK) {
            fprintf(stderr, "flexmoe_train: cannot write %s (%s)\n", o.export_problem, why(status));
            goto done;
        }
        if (!o.json) fprintf(stderr, "wrote %s: the data, the split and the initial weights\n", o.export_problem);
        exit_code = 0;
        goto done;
    }
    if (!o.json)
        fprintf(stderr, "%s: %d samples (%d train, %d validation, %d test), %d views, %d classes, missing rate %.2f\n",
                o.data ? o.data : "synthetic", ds.samples, train, validation, test_count, ds.views, ds.classes,
                (double)o.missing_rate);
    if (!o.json && o.resume) fprintf(stderr, "resuming %s after epoch %d of %d\n", o.resume, model.trained.epoch, o.epochs);
    memset(&state, 0, sizeof state);
    state.o = &o, state.tty = isatty(2), state.train_count = train, state.start = state.epoch_start = now();
    if (o.eval) {
        fm_model_restore_best(&model);
        result.epochs_run = model.trained.epoch, result.best_epoch = model.trained.best_epoch;
        result.best_validation = model.trained.best_validation;
    } else {
        memset(&td, 0, sizeof td);
        td.epochs = o.epochs, td.batch_size = o.batch_size, td.warmup_epochs = o.warmup > 0 ? o.warmup : -1;
        td.adam.lr = o.lr, td.seed = o.seed, td.on_step = on_step, td.on_epoch = on_epoch, td.user_data = &state;
        status = fm_model_train(&model, &ds, order, train, order + train, validation, &td, &result);
        if (status != FM_OK || state.failed_save) {
            if (status != FM_OK) fprintf(stderr, "flexmoe_train: training stopped (%s)\n", why(status));
            goto done;
        }
    }
    if ((status = fm_model_evaluate(&model, &ds, order + train + validation, test_count, &test)) != FM_OK) {
        fprintf(stderr, "flexmoe_train: cannot evaluate: %s\n", fm_status_str(status));
        goto done;
    }
    if (o.json) {
        printf("{\"impl\": \"flexmoe\", \"data\": ");
        print_json_string(o.data ? o.data : "synthetic");
        printf(", \"gate\": \"%s\", \"imputation\": \"%s\"", model.config.gate == FM_GATE_CONFIDENCE ? "confidence" : "noisy",
               model.config.imputation == FM_IMPUTE_ZERO        ? "zero"
               : model.config.imputation == FM_IMPUTE_FEATURES  ? "sampled-mean"
               : model.config.imputation == FM_IMPUTE_TWO_STAGE ? "two-stage"
                                                                : "bank");
        printf(", \"missing_rate\": %g, \"seed\": %llu, \"epochs\": %d, "
               "\"best_epoch\": %d, \"validation_accuracy\": %.6f, \"test_accuracy\": %.6f, \"test_macro_f1\": %.6f, "
               "\"test_macro_auc\": %.6f, \"train_samples_per_second\": %.2f, \"seconds\": %.2f",
               (double)o.missing_rate, (unsigned long long)o.seed, result.epochs_run,
               result.best_epoch, result.best_validation.accuracy, test.accuracy, test.macro_f1, test.macro_auc,
               state.training_seconds > 0 ? (double)state.samples_trained / state.training_seconds : 0.0,
               now() - state.start);
        printf(", \"threads\": %d", fm_threads());
        if (o.report_routing && !report_routing(&model, &ds, order, train, 1)) {
            fprintf(stderr, "flexmoe_train: cannot compute the routing report\n");
            goto done;
        }
        printf("}\n");
    } else {
        printf("best epoch %d of %d (validation accuracy %.3f)%s%s\n\n", result.best_epoch, result.epochs_run,
               result.best_validation.accuracy, o.save ? "; checkpoint: " : "", o.save ? o.save : "");
        printf("%-10s %8s %9s %9s %9s\n", "test", "samples", "accuracy", "macro-F1", "AUC");
        printf("%-10s %8d %9.3f %9.3f %9.3f\n", "", test.samples, test.accuracy, test.macro_f1, test.macro_auc);
        if (state.training_seconds > 0)
            printf("training: %.0f samples/s over %lld samples, one thread\n", (double)state.samples_trained / state.training_seconds,
                   (long long)state.samples_trained);
        report_combinations(&model, &ds, order + train + validation, test_count);
        if (o.report_routing && !report_routing(&model, &ds, order, train, 0)) {
            fprintf(stderr, "flexmoe_train: cannot compute the routing report\n");
            goto done;
        }
    }
    exit_code = 0;
done:
    free(order);
    fm_model_destroy(&model);
    fm_dataset_free(&ds);
    return exit_code;
}
