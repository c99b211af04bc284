/* libFuzzer target of the multi-view dataset loader, fm_dataset_load (flexmoe.h section 10), and
 * of what a caller does next with a loaded dataset.
 *
 * The input is the dataset directory as text: its files one after another, separated by '|':
 *   views.txt | labels.csv | the first view's file | the second view's file | ...
 * where the i-th view's file is written as <name>.csv, <name> the first word of the i-th
 * non-empty line of views.txt (the target's own reading of it: a name with '/' or of more than
 * 200 bytes gets no file). A missing section leaves its file out (the loader must say so).
 * The files go into a per-process directory under /dev/shm (else /tmp), removed at exit and
 * emptied before each input. The hand-made seeds are in tests/fuzz/corpus-dataset/.
 *
 * After each call the target checks (abort() on failure, so the fuzzer reports it):
 *   - the status is an fm_status; on failure the dataset is left zeroed;
 *   - on FM_OK: the loader's promises (1 .. 8 views, the labels in 0 .. classes - 1 with
 *     classes >= 2, every sample observing a view, every value finite, a missing view's row
 *     zero), then fm_dataset_split (a permutation, the 70 / 15 % sizes), fm_dataset_drop_views
 *     (every sample keeps a view, only observed views dropped), fm_dataset_impute and
 *     fm_dataset_standardize on the training rows (the values stay finite), and, when the
 *     dataset is small, fm_model_evaluate and fm_model_routing of a tiny model built for it;
 *   - every block the library allocated is freed (an allocator hook counts them; it also refuses
 *     blocks over 32 MiB, so a file that asks for a huge view is FM_ERR_OUT_OF_MEMORY, not a
 *     libFuzzer malloc-limit report).
 * The choices after the load (seeds, drop rate, draws, the model's imputation) come from a hash
 * of the input. FUZZ_TRACE=1 prints the files written, the load's status and each later call.
 *
 * Build (scripts/fuzz.sh does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. \
 *         tests/fuzz/fuzz_dataset.c build/fuzz/flexmoe_impl.o -o build/fuzz/fuzz_dataset -lm
 * (scripts/fuzz.sh builds build/fuzz/flexmoe_impl.o first). */
#define FUZZ_NAME "fuzz_dataset"
#define FUZZ_COUNTING_HOOK
#include "fuzz_common.h"

#include <math.h>
#include <unistd.h>

/* ---- the directory ------------------------------------------------------------------------------ */

static char g_dir[256];
#define MAX_FILES 16
static char g_written[MAX_FILES][300];
static int g_nwritten;

/* The previous input's files. */
static void remove_files(void) {
    int i;
    for (i = 0; i < g_nwritten; i++) unlink(g_written[i]);
    g_nwritten = 0;
}

static void remove_dir(void) {
    remove_files();
    if (g_dir[0]) rmdir(g_dir);
}

static void write_file(const char *name, const uint8_t *p, size_t n) {
    FILE *f;
    if (g_nwritten == MAX_FILES) return;
    snprintf(g_written[g_nwritten], sizeof g_written[0], "%s/%s", g_dir, name);
    if (!(f = fopen(g_written[g_nwritten], "wb"))) die("cannot write %s", g_written[g_nwritten]);
    if (n && fwrite(p, 1, n, f) != n) die("cannot write %s", g_written[g_nwritten]);
    fclose(f);
    TRACE("file %s: %zu bytes", name, n);
    g_nwritten++;
}

/* The i-th view name of views.txt as the target reads it (first word of the i-th non-empty line). */
static int view_name(const uint8_t *p, size_t n, int index, char *name) {
    size_t i = 0;
    int line = 0;
    while (i < n) {
        size_t end = i, a, b;
        while (end < n && p[end] != '\n') end++;
        for (a = i; a < end && (p[a] == ' ' || p[a] == '\t' || p[a] == '\r' || p[a] == '\v' || p[a] == '\f'); a++) {}
        if (a < end && p[a] != '\0') {
            if (line == index) {
                for (b = a; b < end && p[b] != ' ' && p[b] != '\t' && p[b] != '\r' && p[b] != '\v' && p[b] != '\f' &&
                            p[b] != '\0';
                     b++) {}
                if (b - a > 200 || memchr(p + a, '/', b - a)) return 0;
                if ((b - a == 1 && p[a] == '.') || (b - a == 2 && p[a] == '.' && p[a + 1] == '.')) return 0;
                memcpy(name, p + a, b - a);
                name[b - a] = '\0';
                return 1;
            }
            line++;
        }
        i = end + 1;
    }
    return 0;
}

/* ---- a hash of the input for the later choices -------------------------------------------------- */

static uint64_t rng_state;
static uint64_t rng(void) { return fuzz_splitmix(&rng_state); }

/* ---- checks of a loaded dataset ----------------------------------------------------------------- */

static void check_dataset(const fm_dataset *ds, const char *when) {
    int s, v, j, any;
    CHECK(ds->samples >= 1 && ds->views >= 1 && ds->views <= FLEXMOE_MODEL_MAX_MODALITIES && ds->classes >= 2,
          "%s: samples %d, views %d, classes %d", when, ds->samples, ds->views, ds->classes);
    CHECK(ds->observed && ds->labels, "%s: observed or labels is NULL", when);
    for (v = 0; v < ds->views; v++)
        CHECK(ds->values[v] && ds->features[v] >= 1 && strlen(ds->names[v]) < 32, "%s: view %d malformed", when, v);
    for (s = 0; s < ds->samples; s++) {
        CHECK(ds->labels[s] >= 0 && ds->labels[s] < ds->classes, "%s: label %d of sample %d outside [0, %d)", when,
              ds->labels[s], s, ds->classes);
        for (any = 0, v = 0; v < ds->views; v++) any |= ds->observed[(size_t)s * ds->views + v] != 0;
        CHECK(any, "%s: sample %d observes no view", when, s);
    }
    for (v = 0; v < ds->views; v++)
        for (s = 0; s < ds->samples; s++)
            for (j = 0; j < ds->features[v]; j++) {
                const float x = ds->values[v][(size_t)s * ds->features[v] + j];
                CHECK(isfinite(x), "%s: view %s sample %d feature %d = %g", when, ds->names[v], s, j, (double)x);
            }
}

static void check_missing_zero(const fm_dataset *ds) {
    int s, v, j;
    for (v = 0; v < ds->views; v++)
        for (s = 0; s < ds->samples; s++)
            if (!ds->observed[(size_t)s * ds->views + v])
                for (j = 0; j < ds->features[v]; j++)
                    CHECK(ds->values[v][(size_t)s * ds->features[v] + j] == 0.0f,
                          "view %s: missing sample %d has feature %d = %g, want 0", ds->names[v], s, j,
                          (double)ds->values[v][(size_t)s * ds->features[v] + j]);
}

/* A tiny model on the dataset: evaluate and route every row. */
static void model_on(const fm_dataset *ds, int imputed) {
    fm_model_desc d;
    fm_model model;
    fm_metrics metrics;
    fm_routing_report report;
    int32_t *rows;
    float *load, *share;
    int64_t *tokens;
    fm_status st;
    int v, i, combos;
    memset(&d, 0, sizeof d);
    d.modalities = ds->views;
    for (v = 0; v < ds->views; v++) d.features[v] = ds->features[v];
    d.classes = ds->classes;
    d.patches = 1 + (int)(rng() % 2), d.dim = 4, d.heads = 1 + (int)(rng() % 2), d.experts = 1 + (int)(rng() % 3);
    d.top_k = 1 + (int)(rng() % (uint64_t)d.experts), d.hidden = 4;
    d.gate = rng() & 1 ? FM_GATE_CONFIDENCE : FM_GATE_NOISY_TOPK;
    d.imputation = imputed ? (fm_imputation)(FM_IMPUTE_FEATURES + (int)(rng() & 1)) : (fm_imputation)(rng() % 2);
    st = fm_model_create(&d, 1 + (int)(rng() % 3), &model);
    TRACE("fm_model_create (views %d, classes %d, imputation %d) = %s", d.modalities, d.classes, (int)d.imputation,
          fm_status_str(st));
    if (st == FM_ERR_OUT_OF_MEMORY) return;
    CHECK(st == FM_OK, "fm_model_create of a tiny model for the dataset = %s", fm_status_str(st));
    CHECK(fm_model_init(&model, rng()) == FM_OK, "fm_model_init failed");
    rows = (int32_t *)malloc((size_t)ds->samples * sizeof *rows);
    if (!rows) abort();
    for (i = 0; i < ds->samples; i++) rows[i] = i;
    st = fm_model_evaluate(&model, ds, rows, ds->samples, &metrics);
    TRACE("fm_model_evaluate = %s", fm_status_str(st));
    CHECK(st == FM_OK || st == FM_ERR_OUT_OF_MEMORY, "fm_model_evaluate = %s", fm_status_str(st));
    if (st == FM_OK)
        CHECK(metrics.samples == ds->samples && metrics.accuracy >= 0.0f && metrics.accuracy <= 1.0f,
              "metrics: %d samples, accuracy %g", metrics.samples, (double)metrics.accuracy);
    combos = fm_combination_count(ds->views);
    memset(&report, 0, sizeof report);
    load = (float *)malloc((size_t)d.experts * sizeof *load);
    share = (float *)malloc((size_t)combos * d.experts * sizeof *share);
    tokens = (int64_t *)malloc((size_t)combos * sizeof *tokens);
    if (!load || !share || !tokens) abort();
    report.load = load, report.share = share, report.combination_tokens = tokens;
    st = fm_model_routing(&model, ds, rows, ds->samples, &report);
    TRACE("fm_model_routing = %s", fm_status_str(st));
    CHECK(st == FM_OK || st == FM_ERR_OUT_OF_MEMORY, "fm_model_routing = %s", fm_status_str(st));
    free(load), free(share), free(tokens), free(rows);
    fm_model_destroy(&model);
}

static void after_load(fm_dataset *ds) {
    int32_t *order;
    uint8_t *before;
    int train = -1, validation = -1, i, s, v, any;
    const size_t cells = (size_t)ds->samples * ds->views;
    fm_status st;
    float rate;
    int imputed = 0;
    check_dataset(ds, "fm_dataset_load");
    check_missing_zero(ds);

    order = (int32_t *)malloc((size_t)ds->samples * sizeof *order);
    before = (uint8_t *)malloc(cells);
    if (!order || !before) abort();
    st = fm_dataset_split(ds, rng(), order, &train, &validation);
    TRACE("fm_dataset_split = %s: train %d, validation %d", fm_status_str(st), train, validation);
    CHECK(st == FM_OK, "fm_dataset_split = %s", fm_status_str(st));
    CHECK(train == (int)((int64_t)ds->samples * 70 / 100) && validation == (int)((int64_t)ds->samples * 15 / 100),
          "split sizes %d, %d of %d", train, validation, ds->samples);
    memset(before, 0, cells);
    for (i = 0; i < ds->samples; i++) {
        CHECK(order[i] >= 0 && order[i] < ds->samples && !before[order[i]], "split order is not a permutation");
        before[order[i]] = 1;
    }

    {
        static const float rates[] = {0.0f, 0.3f, 0.5f, 0.9f, 1.0f, -0.5f, 1.5f, NAN, INFINITY};
        rate = rates[rng() % (sizeof rates / sizeof rates[0])];
    }
    memcpy(before, ds->observed, cells);
    st = fm_dataset_drop_views(ds, rate, rng());
    TRACE("fm_dataset_drop_views(%g) = %s", (double)rate, fm_status_str(st));
    CHECK(valid_status(st), "fm_dataset_drop_views = %d", (int)st);
    if (rate >= 0.0f && rate <= 1.0f) CHECK(st == FM_OK, "fm_dataset_drop_views(%g) = %s", (double)rate, fm_status_str(st));
    if (st != FM_OK) CHECK(memcmp(before, ds->observed, cells) == 0, "a failed fm_dataset_drop_views changed the mask");
    for (s = 0; s < ds->samples; s++) {
        for (any = 0, v = 0; v < ds->views; v++) {
            const size_t c = (size_t)s * ds->views + v;
            CHECK(!ds->observed[c] || before[c], "drop_views made sample %d observe view %d", s, v);
            any |= ds->observed[c] != 0;
        }
        CHECK(any, "drop_views left sample %d without a view", s);
    }

    if (train > 0 && (rng() & 1)) {
        const int draws = 1 + (int)(rng() % 3);
        st = fm_dataset_impute(ds, order, train, draws, rng());
        TRACE("fm_dataset_impute(%d rows, %d draws) = %s", train, draws, fm_status_str(st));
        CHECK(st == FM_OK || st == FM_ERR_INVALID_ARGUMENT, "fm_dataset_impute = %s", fm_status_str(st));
        imputed = st == FM_OK;
    }
    if (train > 0) {
        st = fm_dataset_standardize(ds, order, train);
        TRACE("fm_dataset_standardize(%d rows) = %s", train, fm_status_str(st));
        CHECK(st == FM_OK || st == FM_ERR_INVALID_ARGUMENT, "fm_dataset_standardize = %s", fm_status_str(st));
    }
    check_dataset(ds, "after split, drop_views, impute and standardize");
    if (!imputed) check_missing_zero(ds);

    {
        size_t cost = 0;
        for (v = 0; v < ds->views; v++) cost += (size_t)ds->features[v];
        if (ds->classes <= 16 && cost <= 256 && ds->samples <= 64) model_on(ds, imputed);
    }
    free(order);
    free(before);
}

/* ---- the entry points ------------------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    (void)argc, (void)argv;
    fuzz_setup();
    snprintf(g_dir, sizeof g_dir, "%s/flexmoe-fuzz-dataset-XXXXXX", base);
    if (!mkdtemp(g_dir)) {
        fprintf(stderr, "fuzz_dataset: cannot create %s\n", g_dir);
        exit(1);
    }
    atexit(remove_dir);
    fprintf(stderr, "fuzz_dataset: ISA path %s, files in %s\n", fm_isa_name(fm_active_isa()), g_dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *sections[2 + FLEXMOE_MODEL_MAX_MODALITIES + 1];
    size_t lengths[2 + FLEXMOE_MODEL_MAX_MODALITIES + 1], i, start = 0;
    int nsections = 0, v;
    fm_dataset ds;
    fm_status st;
    const int max_sections = 2 + FLEXMOE_MODEL_MAX_MODALITIES + 1; /* one view past the limit */
    uint64_t h = 0xcbf29ce484222325ull;

    remove_files();
    for (i = 0; i <= size && nsections < max_sections; i++)
        if (i == size || data[i] == '|') {
            sections[nsections] = data + start, lengths[nsections++] = i - start;
            start = i + 1;
        }
    for (i = 0; i < size; i++) h = (h ^ data[i]) * 0x100000001B3ull;
    rng_state = h;

    if (nsections > 0) write_file("views.txt", sections[0], lengths[0]);
    if (nsections > 1) write_file("labels.csv", sections[1], lengths[1]);
    for (v = 0; v + 2 < nsections; v++) {
        char name[256], file[300];
        if (!view_name(sections[0], lengths[0], v, name)) continue;
        snprintf(file, sizeof file, "%s.csv", name);
        write_file(file, sections[2 + v], lengths[2 + v]);
    }

    hook_live = 0;
    memset(&ds, 0xA5, sizeof ds);
    st = fm_dataset_load(g_dir, &ds);
    TRACE("fm_dataset_load = %s", fm_status_str(st));
    CHECK(valid_status(st), "fm_dataset_load returned %d", (int)st);
    if (st != FM_OK) {
        static const fm_dataset zero;
        CHECK(memcmp(&ds, &zero, sizeof ds) == 0, "a failed fm_dataset_load (%s) left the dataset not zeroed",
              fm_status_str(st));
        CHECK(st == FM_ERR_INVALID_ARGUMENT || st == FM_ERR_OUT_OF_MEMORY, "fm_dataset_load = %s", fm_status_str(st));
    } else {
        after_load(&ds);
        fm_dataset_free(&ds);
    }
    CHECK(hook_live == 0, "%ld blocks of the library's not freed", hook_live);
    return 0;
}
