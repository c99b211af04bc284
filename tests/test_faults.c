/* Faults from outside the library: allocations that fail and a process killed while it saves.
 *
 * 1. Allocation failures, through fm_setup's allocator hook: a counting allocator refuses its Nth
 *    allocation, for N = 1, 2, ... until a run completes without reaching N, over the model's
 *    whole life: creation, one training epoch on a small synthetic dataset (the entry points
 *    test_train uses), evaluation, routing, a checkpoint's save and load, fm_safetensors_write,
 *    and the dataset loader on a tiny CSV directory and its imputation. Each refused allocation
 *    must come back as FM_ERR_OUT_OF_MEMORY; the hook's count of live blocks must be back where
 *    it was (nothing leaks: the blocks come from the C library's malloc, so LeakSanitizer and
 *    valgrind see them too); the objects must stay usable (a model whose epoch failed trains an
 *    epoch once the allocator works again; a refused save leaves the old checkpoint byte for
 *    byte and no temporary file) or come back zeroed and destroyable (create, load, the loader).
 *    A refused training run must leave the model as it was (fm_model_train allocates before its
 *    first step), so that the same call again is the uninterrupted run, bit for bit (before that
 *    fix, 8 of the 14 refusals came after the epoch's steps). test_robustness checks the hook itself (both halves, blocks
 *    freed by their own allocator) and tests/demo_alloc_failures.sh the demo program's failure
 *    paths; this is the model's.
 * 2. SIGKILL during a save, beyond test_checkpoint's file-size limits and random kills: a child
 *    saves two distinguishable models over one path in a loop and is killed at moments spread
 *    over a measured save's duration, as soon as the temporary file appears, once it holds a
 *    given fraction of the checkpoint, and just after the rename. After each kill the path must
 *    load as the checkpoint from before or one of the child's, no other file may appear in the
 *    directory, a stale temporary file (path.tmp) must either be refused by the loader or be a
 *    complete checkpoint of the child's, and a resumed run (load, one training step, save) must
 *    carry on from it. */
#include "fm_test.h"

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- the counting allocator ---------------------------------------------------------------- */

/* Every block carries a header with a magic word, so a block freed twice or a pointer the hook
 * never made is caught (and counted) rather than passed to free(). The blocks come from the
 * C library's malloc, not fm_test.h's guarded heap: (malloc)(n) bypasses the macro, so
 * LeakSanitizer and valgrind track them. */
#define FAULT_HEADER 32 /* keeps malloc's alignment (16) for the caller */
#define FAULT_MAGIC 0x464D46415554ull

typedef struct fault_injector {
    long calls;    /* allocations asked for since arm() */
    long fail_at;  /* the one to refuse, 1-based; 0: none */
    long refused;  /* allocations refused since arm() */
    long live;     /* blocks handed out and not freed, all time */
    long bad_free; /* frees of a pointer that is not a live block of the hook */
} fault_injector;

static fault_injector faults;

static void *fault_alloc(size_t size, void *user_data) {
    fault_injector *f = (fault_injector *)user_data;
    unsigned char *raw;
    uint64_t magic = FAULT_MAGIC;
    f->calls++;
    if (f->fail_at > 0 && f->calls == f->fail_at) {
        f->refused++;
        return NULL;
    }
    if (size > SIZE_MAX - FAULT_HEADER || !(raw = (unsigned char *)(malloc)(size + FAULT_HEADER))) return NULL;
    memcpy(raw, &magic, sizeof magic);
    f->live++;
    return raw + FAULT_HEADER;
}

static void fault_free(void *ptr, void *user_data) {
    fault_injector *f = (fault_injector *)user_data;
    unsigned char *raw = (unsigned char *)ptr - FAULT_HEADER;
    uint64_t magic;
    if (!ptr) return;
    memcpy(&magic, raw, sizeof magic);
    if (magic != FAULT_MAGIC) {
        f->bad_free++;
        return;
    }
    magic = 0;
    memcpy(raw, &magic, sizeof magic);
    f->live--;
    (free)(raw);
}

static void arm(long n) { faults.calls = 0, faults.refused = 0, faults.fail_at = n; }
static void disarm(void) { faults.fail_at = 0; }

static int log_messages;

static void quiet_logger(fm_log_level level, const char *message, void *user_data) {
    (void)level, (void)message, (void)user_data;
    log_messages++;
}

static int all_zero(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

/* ---- what the scenarios work on -------------------------------------------------------------- */

enum { SAMPLES = 60, CLASSES = FM_TEST_CLASSES, VIEWS = FM_TEST_VIEWS };
#define view_features fm_test_view_features

/* A tiny model (the fault scenarios: fast) or a larger one (the kills: a save long enough to
 * be hit in its middle). */
static fm_model_desc model_desc(int large) {
    fm_model_desc d;
    int v;
    memset(&d, 0, sizeof d);
    d.modalities = VIEWS, d.classes = CLASSES, d.patches = 2, d.heads = 2, d.top_k = 2;
    d.dim = large ? 32 : 8, d.experts = large ? 8 : 4, d.hidden = large ? 64 : 8;
    d.dropout = 0.1f;
    for (v = 0; v < VIEWS; v++) d.features[v] = view_features[v];
    return d;
}

static int same_model(const fm_model *a, const fm_model *b) {
    const size_t bytes = a->param_floats * sizeof(float);
    return a->params && b->params && a->param_floats == b->param_floats &&
           memcmp(&a->config, &b->config, sizeof a->config) == 0 && memcmp(a->params, b->params, bytes) == 0 &&
           memcmp(a->adam_m, b->adam_m, bytes) == 0 && memcmp(a->adam_v, b->adam_v, bytes) == 0 &&
           (a->trained.best_epoch == 0 || memcmp(a->best, b->best, bytes) == 0) &&
           memcmp(&a->trained, &b->trained, sizeof a->trained) == 0;
}

static unsigned char *read_all(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    long n;
    *size = 0;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (data = (unsigned char *)malloc((size_t)n + 1)) != NULL) {
        if (fread(data, 1, (size_t)n, f) == (size_t)n) *size = (size_t)n;
        else free(data), data = NULL;
    }
    fclose(f);
    return data;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    int ok = f && fputs(text, f) >= 0;
    if (f) ok &= fclose(f) == 0;
    return ok;
}

static int exists(const char *path) { return access(path, F_OK) == 0; }

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void sleep_seconds(double s) {
    struct timespec t;
    if (s <= 0) return;
    t.tv_sec = (time_t)s, t.tv_nsec = (long)((s - (double)t.tv_sec) * 1e9);
    nanosleep(&t, NULL);
}

typedef struct world {
    fm_dataset ds;             /* the synthetic task */
    int32_t order[SAMPLES];    /* its split */
    int train, validation;
    fm_model_desc tiny;
    fm_model shared;           /* a trained tiny model: evaluate, routing, save */
    fm_model scratch;          /* the model a scenario works on */
    fm_dataset loaded;         /* the loader's result */
    char dir[160];             /* a temporary directory ($TMPDIR, else /tmp) */
    char checkpoint[200];      /* the shared model's checkpoint (load) */
    char target[200], target_tmp[208]; /* where saves go; an older checkpoint lives there */
    unsigned char *old_bytes;  /* that older checkpoint */
    size_t old_size;
    char data_dir[200];        /* a tiny CSV dataset */
    float *initial;            /* the scratch model's parameters before training */
    fm_model reference;        /* the scratch model after an epoch with a working allocator */
    fm_metrics metrics;        /* the shared model's, with a working allocator */
    float load[4];
} world;

static fm_train_desc one_epoch(void) {
    fm_train_desc td;
    memset(&td, 0, sizeof td);
    td.epochs = 1, td.batch_size = 8, td.warmup_epochs = 1, td.adam.lr = 3e-3f, td.seed = 77;
    return td;
}

/* ---- the scenarios ------------------------------------------------------------------------ */

/* prepare builds what the operation needs (its allocations not counted); operation runs armed;
 * failed checks the objects after a refused allocation; succeeded after the run that completed;
 * cleanup releases what prepare and the operation made. */
typedef struct scenario {
    const char *name;
    void (*prepare)(world *w);
    fm_status (*operation)(world *w);
    void (*failed)(world *w, long n, long base);
    void (*succeeded)(world *w);
    void (*cleanup)(world *w);
} scenario;

static void nothing(world *w) { (void)w; }

/* create */
static fm_status create_op(world *w) { return fm_model_create(&w->tiny, 8, &w->scratch); }
static void create_failed(world *w, long n, long base) {
    FM_CHECK(!w->scratch.params && !w->scratch.grads && !w->scratch.adam_m && !w->scratch.adam_v && !w->scratch.best &&
                 !w->scratch.state,
             "create, allocation %ld refused: the model keeps a pointer", n);
    fm_model_destroy(&w->scratch);
    FM_CHECK(faults.live == base, "create, allocation %ld refused: %ld blocks leaked", n, faults.live - base);
    FM_CHECK(fm_model_create(&w->tiny, 8, &w->scratch) == FM_OK && fm_model_init(&w->scratch, 3) == FM_OK,
             "create, allocation %ld refused: a second create with a working allocator", n);
}
static void create_succeeded(world *w) {
    FM_CHECK(fm_model_init(&w->scratch, 3) == FM_OK, "init after create");
}
static void destroy_scratch(world *w) { fm_model_destroy(&w->scratch); }

/* one training epoch */
static void train_prepare(world *w) {
    FM_CHECK(fm_model_create(&w->tiny, 8, &w->scratch) == FM_OK && fm_model_init(&w->scratch, 9) == FM_OK, "train: model");
}
static fm_status train_op(world *w) {
    fm_train_desc td = one_epoch();
    fm_train_result r;
    return fm_model_train(&w->scratch, &w->ds, w->order, w->train, w->order + w->train, w->validation, &td, &r);
}
static void train_failed(world *w, long n, long base) {
    fm_train_desc td = one_epoch();
    fm_train_result r;
    const int untouched = memcmp(w->scratch.params, w->initial, w->scratch.param_floats * sizeof(float)) == 0 &&
                          w->scratch.trained.step == 0;
    FM_CHECK(faults.live == base, "train, allocation %ld refused: %ld blocks leaked", n, faults.live - base);
    FM_CHECK(w->scratch.trained.epoch == 0, "train, allocation %ld refused: epoch %d recorded as done", n,
             w->scratch.trained.epoch);
    /* fm_model_train takes all it allocates before its first step (its manual) */
    FM_CHECK(untouched, "train, allocation %ld refused: the model changed (steps taken before the failure)", n);
    /* usable: the epoch again, the allocator working */
    FM_CHECK(fm_model_train(&w->scratch, &w->ds, w->order, w->train, w->order + w->train, w->validation, &td, &r) == FM_OK &&
                 r.epochs_run == 1,
             "train, allocation %ld refused: the epoch again with a working allocator", n);
    FM_CHECK(faults.live == base, "train, allocation %ld refused: the second run leaked %ld blocks", n, faults.live - base);
    /* nothing had happened: the retry is the uninterrupted run, bit for bit */
    FM_CHECK(same_model(&w->scratch, &w->reference), "train, allocation %ld refused: the retried epoch differs from the "
             "uninterrupted one", n);
}
static void train_succeeded(world *w) {
    FM_CHECK(same_model(&w->scratch, &w->reference), "train: the counted run differs from the reference run");
}

/* evaluate and routing on the shared model */
static fm_status evaluate_op(world *w) {
    fm_metrics m;
    fm_status s = fm_model_evaluate(&w->shared, &w->ds, w->order, SAMPLES, &m);
    if (s == FM_OK)
        FM_CHECK(memcmp(&m, &w->metrics, sizeof m) == 0, "evaluate: metrics differ from the reference (accuracy %g, %g)",
                 m.accuracy, w->metrics.accuracy);
    return s;
}
static void shared_failed(world *w, long n, long base) {
    FM_CHECK(faults.live == base, "%s, allocation %ld refused: %ld blocks leaked", fm_test_context, n, faults.live - base);
    (void)w;
}
static fm_status routing_op(world *w) {
    fm_routing_report r;
    float load[4];
    fm_status s;
    memset(&r, 0, sizeof r);
    r.load = load;
    s = fm_model_routing(&w->shared, &w->ds, w->order, SAMPLES, &r);
    if (s == FM_OK) FM_CHECK(memcmp(load, w->load, sizeof load) == 0, "routing: loads differ from the reference");
    return s;
}

/* save over an older checkpoint */
static fm_status save_op(world *w) { return fm_model_save(&w->shared, w->target); }
static void save_failed(world *w, long n, long base) {
    size_t size;
    unsigned char *now = read_all(w->target, &size);
    FM_CHECK(faults.live == base, "save, allocation %ld refused: %ld blocks leaked", n, faults.live - base);
    FM_CHECK(now && size == w->old_size && memcmp(now, w->old_bytes, size) == 0,
             "save, allocation %ld refused: the older checkpoint changed", n);
    FM_CHECK(!exists(w->target_tmp), "save, allocation %ld refused: %s left behind", n, w->target_tmp);
    free(now);
}
static void save_succeeded(world *w) {
    fm_model back;
    FM_CHECK(!exists(w->target_tmp), "save: %s left behind", w->target_tmp);
    FM_CHECK(fm_model_load(w->target, 8, &back) == FM_OK && same_model(&back, &w->shared), "save: the new checkpoint loads");
    fm_model_destroy(&back);
}
static void save_cleanup(world *w) { /* the older checkpoint back for the next run */
    FILE *f = fopen(w->target, "wb");
    FM_CHECK(f && fwrite(w->old_bytes, 1, w->old_size, f) == w->old_size && fclose(f) == 0, "restore %s", w->target);
}

/* fm_safetensors_write */
static fm_status safetensors_op(world *w) {
    static const float a[6] = {1, 2, 3, 4, 5, 6};
    static const int32_t b[3] = {7, 8, 9};
    static const char *const metadata[] = {"who", "test_faults", "what", "two \"tensors\"\n", NULL};
    fm_safetensor t[2];
    memset(t, 0, sizeof t);
    t[0].name = "a", t[0].dtype = "F32", t[0].rank = 2, t[0].shape[0] = 2, t[0].shape[1] = 3, t[0].data = a;
    t[1].name = "b", t[1].dtype = "I32", t[1].rank = 1, t[1].shape[0] = 3, t[1].data = b;
    return fm_safetensors_write(w->target, t, 2, metadata);
}

/* load */
static fm_status load_op(world *w) { return fm_model_load(w->checkpoint, 8, &w->scratch); }
static void load_failed(world *w, long n, long base) {
    FM_CHECK(all_zero(&w->scratch, sizeof w->scratch), "load, allocation %ld refused: the model is not zeroed", n);
    fm_model_destroy(&w->scratch);
    FM_CHECK(faults.live == base, "load, allocation %ld refused: %ld blocks leaked", n, faults.live - base);
}
static void load_succeeded(world *w) {
    FM_CHECK(same_model(&w->scratch, &w->shared), "load: the checkpoint's model differs from the saved one");
}

/* the dataset loader */
static fm_status dataset_op(world *w) { return fm_dataset_load(w->data_dir, &w->loaded); }
static void dataset_failed(world *w, long n, long base) {
    FM_CHECK(all_zero(&w->loaded, sizeof w->loaded), "dataset load, allocation %ld refused: the dataset is not zeroed", n);
    fm_dataset_free(&w->loaded);
    FM_CHECK(faults.live == base, "dataset load, allocation %ld refused: %ld blocks leaked", n, faults.live - base);
}
static void dataset_succeeded(world *w) {
    const fm_dataset *d = &w->loaded;
    FM_CHECK(d->samples == 5 && d->views == 2 && d->classes == 3 && d->features[0] == 3 && d->features[1] == 2 &&
                 strcmp(d->names[1], "beta") == 0,
             "dataset load: %d samples, %d views, %d classes", d->samples, d->views, d->classes);
    if (d->samples == 5 && d->views == 2)
        FM_CHECK(d->values[0][4] == 5.0f && d->values[1][2] == 0.0f && d->observed[1 * 2 + 1] == 0 && d->observed[1 * 2] == 1 &&
                     d->labels[4] == 2,
                 "dataset load: values, a missing view, labels");
}
static void dataset_cleanup(world *w) { fm_dataset_free(&w->loaded); }

/* imputation (one scratch block) on a copy of the tiny dataset */
static void impute_prepare(world *w) {
    FM_CHECK(fm_dataset_load(w->data_dir, &w->loaded) == FM_OK, "impute: load");
}
static fm_status impute_op(world *w) {
    const int32_t pool[5] = {0, 1, 2, 3, 4};
    return fm_dataset_impute(&w->loaded, pool, w->loaded.samples, 2, 5);
}
static void impute_failed(world *w, long n, long base) {
    FM_CHECK(w->loaded.values[1][2] == 0.0f && w->loaded.values[1][3] == 0.0f,
             "impute, allocation %ld refused: the missing row changed", n);
    FM_CHECK(faults.live == base, "impute, allocation %ld refused: %ld blocks leaked", n, faults.live - base);
}
static void impute_succeeded(world *w) {
    FM_CHECK(w->loaded.values[1][2] != 0.0f && w->loaded.observed[1 * 2 + 1] == 0, "impute: the missing row filled");
}

/* Refuses allocation 1, 2, ... of the operation until a run completes without reaching it;
 * returns the allocation points (the runs that reached their refusal). */
static long run_scenario(world *w, const scenario *s) {
    const long limit = 10000;
    long n, points = -1;
    fm_test_context = s->name;
    for (n = 1; n <= limit; n++) {
        const long before = faults.live;
        long base;
        fm_status status;
        s->prepare(w);
        base = faults.live;
        arm(n);
        status = s->operation(w);
        disarm();
        if (faults.calls < n) { /* not reached: the run is complete */
            FM_CHECK(status == FM_OK, "%s: completed without a refusal but returned %s", s->name, fm_status_str(status));
            if (s->succeeded) s->succeeded(w);
            s->cleanup(w);
            FM_CHECK(faults.live == before, "%s: %ld blocks left after the clean-up", s->name, faults.live - before);
            points = n - 1;
            break;
        }
        FM_CHECK(faults.refused == 1 && status == FM_ERR_OUT_OF_MEMORY, "%s: allocation %ld of %ld refused: %s", s->name, n,
                 faults.calls, fm_status_str(status));
        s->failed(w, n, base);
        s->cleanup(w);
        FM_CHECK(faults.live == before, "%s, allocation %ld refused: %ld blocks left after the clean-up", s->name, n,
                 faults.live - before);
    }
    FM_CHECK(points >= 0, "%s: still refusing at allocation %ld", s->name, limit);
    FM_CHECK(faults.bad_free == 0, "%s: %ld frees of pointers the allocator did not hand out", s->name, faults.bad_free);
    printf("test_faults: %-22s %3ld allocation points, each refused once: FM_ERR_OUT_OF_MEMORY, nothing leaked\n", s->name,
           points);
    return points;
}

static void write_tiny_dataset(world *w) {
    char path[240];
    int ok;
    snprintf(w->data_dir, sizeof w->data_dir, "%s/data", w->dir);
    ok = mkdir(w->data_dir, 0755) == 0;
    snprintf(path, sizeof path, "%s/views.txt", w->data_dir);
    ok &= write_text(path, "alpha 3\nbeta 2\n");
    snprintf(path, sizeof path, "%s/alpha.csv", w->data_dir);
    ok &= write_text(path, "1,2,3\n4,5,6\n7,8,9\n1.5,2.5,3.5\n0,0,1\n");
    snprintf(path, sizeof path, "%s/beta.csv", w->data_dir);
    ok &= write_text(path, "1,1\n\n2,2\n3,3\n\n"); /* samples 1 and 4 miss beta */
    snprintf(path, sizeof path, "%s/labels.csv", w->data_dir);
    ok &= write_text(path, "0\n1\n2\n1\n2\n");
    FM_CHECK(ok, "write the tiny dataset in %s", w->data_dir);
}

static void check_allocation_failures(world *w) {
    static const scenario scenarios[] = {
        {"model create", nothing, create_op, create_failed, create_succeeded, destroy_scratch},
        {"train one epoch", train_prepare, train_op, train_failed, train_succeeded, destroy_scratch},
        {"evaluate", nothing, evaluate_op, shared_failed, NULL, nothing},
        {"routing", nothing, routing_op, shared_failed, NULL, nothing},
        {"checkpoint save", nothing, save_op, save_failed, save_succeeded, save_cleanup},
        {"safetensors write", nothing, safetensors_op, save_failed, NULL, save_cleanup},
        {"checkpoint load", nothing, load_op, load_failed, load_succeeded, destroy_scratch},
        {"dataset load", nothing, dataset_op, dataset_failed, dataset_succeeded, dataset_cleanup},
        {"dataset impute", impute_prepare, impute_op, impute_failed, impute_succeeded, dataset_cleanup},
    };
    fm_train_desc td = one_epoch();
    fm_train_result r;
    fm_routing_report report;
    size_t i;
    long total = 0;
    /* the references, with a working allocator */
    FM_CHECK(fm_model_create(&w->tiny, 8, &w->reference) == FM_OK && fm_model_init(&w->reference, 9) == FM_OK, "reference");
    w->initial = (float *)malloc(w->reference.param_floats * sizeof(float));
    memcpy(w->initial, w->reference.params, w->reference.param_floats * sizeof(float));
    FM_CHECK(fm_model_train(&w->reference, &w->ds, w->order, w->train, w->order + w->train, w->validation, &td, &r) == FM_OK,
             "the reference epoch");
    FM_CHECK(fm_model_create(&w->tiny, 8, &w->shared) == FM_OK && fm_model_init(&w->shared, 5) == FM_OK, "shared model");
    td.epochs = 2;
    FM_CHECK(fm_model_train(&w->shared, &w->ds, w->order, w->train, w->order + w->train, w->validation, &td, &r) == FM_OK &&
                 w->shared.trained.best_epoch > 0,
             "the shared model trains (best epoch %d: its checkpoint holds best.*)", w->shared.trained.best_epoch);
    FM_CHECK(fm_model_evaluate(&w->shared, &w->ds, w->order, SAMPLES, &w->metrics) == FM_OK, "reference metrics");
    memset(&report, 0, sizeof report);
    report.load = w->load;
    FM_CHECK(fm_model_routing(&w->shared, &w->ds, w->order, SAMPLES, &report) == FM_OK, "reference routing");
    snprintf(w->checkpoint, sizeof w->checkpoint, "%s/shared.safetensors", w->dir);
    snprintf(w->target, sizeof w->target, "%s/target.safetensors", w->dir);
    snprintf(w->target_tmp, sizeof w->target_tmp, "%s.tmp", w->target);
    FM_CHECK(fm_model_save(&w->shared, w->checkpoint) == FM_OK && fm_model_save(&w->reference, w->target) == FM_OK,
             "the checkpoints to load and to overwrite");
    w->old_bytes = read_all(w->target, &w->old_size);
    write_tiny_dataset(w);
    for (i = 0; i < sizeof scenarios / sizeof *scenarios; i++) total += run_scenario(w, &scenarios[i]);
    fm_test_context = "faults";
    printf("test_faults: %ld allocation points in all\n", total);
    fm_model_destroy(&w->reference);
    fm_model_destroy(&w->shared);
    free(w->initial), free(w->old_bytes);
    remove(w->checkpoint), remove(w->target), remove(w->target_tmp);
}

/* ---- SIGKILL during saves ------------------------------------------------------------------ */

enum { KILL_TIMED, KILL_AT_CREATE, KILL_AT_FRACTION, KILL_AFTER_RENAME, KILL_MODES };
static const char *const kill_mode_names[KILL_MODES] = {"at a delay spread over three saves", "as the temporary file appears",
                                                        "at a fraction of the file written", "just after the rename"};

typedef struct kill_stats {
    int trials[KILL_MODES], missed[KILL_MODES];
    double seconds[KILL_MODES], resume_seconds;
    int held_previous, held_a, held_b, lost, strays, stale, stale_refused, stale_complete, stale_damaged, resumed;
} kill_stats;

static int stop_first_step(const fm_train_progress *p, void *user) {
    (void)p, (void)user;
    return 1;
}

/* Loads `path` as `model`: the previous checkpoint, a or b; 0 (lost) when it is none of them. */
static int classify(const char *path, const fm_model *previous, const fm_model *a, const fm_model *b, kill_stats *k) {
    fm_model loaded;
    int which = 0;
    if (fm_model_load(path, 8, &loaded) == FM_OK) {
        if (same_model(&loaded, a)) which = 1, k->held_a++;
        else if (same_model(&loaded, b)) which = 2, k->held_b++;
        else if (same_model(&loaded, previous)) which = 3, k->held_previous++;
    }
    fm_model_destroy(&loaded);
    return which;
}

/* Nothing in the directory but the checkpoint and its temporary file. */
static int strays_in(const char *dir, const char *name, const char *tmp_name) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int strays = 0;
    if (!d) return 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strcmp(e->d_name, name) && strcmp(e->d_name, tmp_name)) strays++;
    closedir(d);
    return strays;
}

static off_t file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

static void check_kills(world *w) {
    char dir[200], path[240], tmp[248];
    fm_model a, b, previous;
    fm_model_desc desc = model_desc(1);
    fm_train_desc td = one_epoch();
    kill_stats k;
    double save_time, t0;
    off_t full;
    int trial, saves = 0, mode;
    const int per_mode[KILL_MODES] = {80, 40, 40, 40};
    fm_test_context = "kills";
    fm_set_threads(1); /* an OpenMP build: no worker threads spinning beside the child and the polls */
    memset(&k, 0, sizeof k);
    snprintf(dir, sizeof dir, "%s/kills", w->dir);
    FM_CHECK(mkdir(dir, 0755) == 0, "mkdir %s", dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    /* a and b: different weights, moments and training state, the seed of the resumed runs */
    FM_CHECK(fm_model_create(&desc, 8, &a) == FM_OK && fm_model_init(&a, 1) == FM_OK, "model a");
    FM_CHECK(fm_model_create(&desc, 8, &b) == FM_OK && fm_model_init(&b, 2) == FM_OK, "model b");
    a.trained.epoch = 3, a.trained.step = 30, a.trained.seed = td.seed;
    b.trained.epoch = 4, b.trained.step = 40, b.trained.seed = td.seed;
    a.adam_m[0] = 1.0f, b.adam_m[0] = 2.0f;
    FM_CHECK(fm_model_create(&desc, 8, &previous) == FM_OK && fm_model_init(&previous, 3) == FM_OK, "the first checkpoint");
    previous.trained.seed = td.seed;
    FM_CHECK(fm_model_save(&previous, path) == FM_OK, "save the first checkpoint");
    full = file_size(path);
    /* how long one save takes here */
    t0 = now_seconds();
    while (saves < 5 || (now_seconds() - t0 < 0.2 && saves < 50)) {
        FM_CHECK(fm_model_save(&previous, path) == FM_OK, "timed save");
        saves++;
    }
    save_time = (now_seconds() - t0) / saves;
    for (mode = 0; mode < KILL_MODES; k.seconds[mode] = now_seconds() - k.seconds[mode], mode++)
        for (trial = 0, k.seconds[mode] = now_seconds(); trial < per_mode[mode]; trial++) {
            int ready[2], status = 0, which;
            char byte;
            pid_t child;
            double fraction = (trial + 0.5) / per_mode[mode];
            remove(tmp); /* so that its creation can be seen */
            FM_CHECK(pipe(ready) == 0, "pipe");
            child = fork();
            if (child == 0) {
                struct rlimit none = {0, 0};
                setrlimit(RLIMIT_CORE, &none);
                close(ready[0]);
                if (write(ready[1], "r", 1) != 1) _exit(2);
                for (;;) {
                    fm_model_save(&a, path);
                    fm_model_save(&b, path);
                }
            }
            close(ready[1]);
            FM_CHECK(child > 0 && read(ready[0], &byte, 1) == 1, "fork and the child's start");
            close(ready[0]);
            if (child <= 0) break;
            k.trials[mode]++;
            t0 = now_seconds();
            if (mode == KILL_TIMED) { /* over the first three saves or so, jittered */
                sleep_seconds(3.5 * save_time * (trial + fm_test_uniform()) / per_mode[mode]);
            } else { /* polling the temporary file every few microseconds (the child needs the CPU too); at most 2 s */
                const off_t want = (off_t)(0.95 * fraction * (double)full); /* the last few tensors go by in a flash */
                int hit = 0;
                while (!hit && now_seconds() - t0 < 2.0) {
                    const off_t size = file_size(tmp);
                    hit = mode == KILL_AT_CREATE ? size >= 0 : mode == KILL_AT_FRACTION ? size >= want : 0;
                    if (mode == KILL_AFTER_RENAME && size >= 0)
                        while (!hit && now_seconds() - t0 < 2.0) hit = !exists(tmp) || (sleep_seconds(2e-6), 0);
                    if (!hit) sleep_seconds(2e-6);
                }
                k.missed[mode] += !hit;
            }
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            FM_CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "the child was killed (status %d)", status);
            /* the checkpoint: the one before, or one of the child's */
            which = classify(path, &previous, &a, &b, &k);
            k.lost += which == 0;
            FM_CHECK(which != 0, "%s, trial %d: the checkpoint at %s is lost", kill_mode_names[mode], trial, path);
            k.strays += strays_in(dir, "model.safetensors", "model.safetensors.tmp");
            /* a stale temporary file: refused by the loader, or a whole checkpoint of the child's */
            if (exists(tmp)) {
                fm_model t;
                const fm_status s = fm_model_load(tmp, 8, &t);
                k.stale++;
                if (s == FM_OK && (same_model(&t, &a) || same_model(&t, &b))) k.stale_complete++;
                else if (s == FM_ERR_BAD_FILE) k.stale_refused++;
                else k.stale_damaged++;
                fm_model_destroy(&t);
            }
            /* the resumed run: load, one training step, save, and it loads as that */
            t0 = now_seconds();
            {
                fm_model resumed, again;
                fm_train_result r;
                fm_train_desc step = td;
                int ok = fm_model_load(path, 8, &resumed) == FM_OK;
                const int64_t steps = resumed.trained.step;
                step.epochs = resumed.trained.epoch + 1, step.on_step = stop_first_step;
                ok = ok && fm_model_train(&resumed, &w->ds, w->order, w->train, w->order + w->train, w->validation, &step, &r) == FM_OK &&
                     r.stopped && resumed.trained.step == steps + 1;
                ok = ok && fm_model_save(&resumed, path) == FM_OK && !exists(tmp);
                ok = ok && fm_model_load(path, 8, &again) == FM_OK && same_model(&again, &resumed);
                FM_CHECK(ok, "%s, trial %d: the resumed run (load, a step, save, load)", kill_mode_names[mode], trial);
                k.resumed += ok;
                if (ok) { /* the next trial's checkpoint from before */
                    fm_model_destroy(&previous);
                    previous = resumed;
                } else {
                    fm_model_destroy(&resumed);
                    FM_CHECK(fm_model_save(&previous, path) == FM_OK, "put the previous checkpoint back");
                }
                fm_model_destroy(&again);
            }
            k.resume_seconds += now_seconds() - t0;
        }
    {
        int trials = 0, missed = 0;
        for (mode = 0; mode < KILL_MODES; mode++) trials += k.trials[mode], missed += k.missed[mode];
        FM_CHECK(trials == 200 && k.lost == 0 && k.strays == 0 && k.stale_damaged == 0 && k.resumed == trials,
                 "%d trials, %d lost, %d strays, %d damaged temporary files, %d resumed", trials, k.lost, k.strays,
                 k.stale_damaged, k.resumed);
        printf("test_faults: a save of %.0f KiB takes %.2f ms here; %d saves killed by SIGKILL (", (double)full / 1024.0,
               save_time * 1e3, trials);
        for (mode = 0; mode < KILL_MODES; mode++)
            printf("%s%d %s", mode ? ", " : "", k.trials[mode], kill_mode_names[mode]);
        printf("; %d polls timed out)\n", missed);
        printf("test_faults: seconds per kind of kill: %.1f %.1f %.1f %.1f, of which %.1f in the resumed runs\n", k.seconds[0],
               k.seconds[1], k.seconds[2], k.seconds[3], k.resume_seconds);
        printf("test_faults: after the kills the path held the checkpoint from before %d times, the child's first model %d, "
               "its second %d; %d lost, %d other files; %d stale temporary files (%d refused by the loader as damaged, %d "
               "whole checkpoints, %d anything else); %d resumed runs continued\n",
               k.held_previous, k.held_a, k.held_b, k.lost, k.strays, k.stale, k.stale_refused, k.stale_complete,
               k.stale_damaged, k.resumed);
    }
    fm_model_destroy(&a);
    fm_model_destroy(&b);
    fm_model_destroy(&previous);
    remove(path), remove(tmp), rmdir(dir);
    fm_set_threads(0);
}

/* test_faults [allocations | kills]: both parts by default; scripts/valgrind.sh runs the first
 * alone (its kills would fork valgrind 200 times). */
int main(int argc, char **argv) {
    static world w;
    fm_desc setup;
    double t0;
    const int allocations = argc < 2 || strcmp(argv[1], "kills") != 0, kills = argc < 2 || strcmp(argv[1], "allocations") != 0;
    if (argc > 2 || (argc == 2 && strcmp(argv[1], "kills") != 0 && strcmp(argv[1], "allocations") != 0)) {
        fprintf(stderr, "usage: test_faults [allocations | kills]\n");
        return 2;
    }
    fm_test_seed("test_faults");
    memset(&setup, 0, sizeof setup);
    setup.allocator.alloc = fault_alloc, setup.allocator.free = fault_free, setup.allocator.user_data = &faults;
    setup.logger.func = quiet_logger;
    FM_CHECK(fm_setup(&setup) == FM_OK, "fm_setup with the counting allocator");
    snprintf(w.dir, sizeof w.dir, "%s/flexmoe_test_faults_XXXXXX", getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    FM_CHECK(mkdtemp(w.dir) != NULL, "mkdtemp");
    w.tiny = model_desc(0);
    fm_test_synthetic(&w.ds, SAMPLES);
    FM_CHECK(fm_dataset_split(&w.ds, 4, w.order, &w.train, &w.validation) == FM_OK &&
                 fm_dataset_standardize(&w.ds, w.order, w.train) == FM_OK,
             "split and standardise");
    if (allocations) {
        t0 = now_seconds();
        check_allocation_failures(&w);
        printf("test_faults: allocation failures in %.1f s\n", now_seconds() - t0);
    }
    if (kills) {
        t0 = now_seconds();
        check_kills(&w);
        printf("test_faults: kills in %.1f s\n", now_seconds() - t0);
    }
    fm_dataset_free(&w.ds);
    {
        char path[240];
        const char *names[] = {"views.txt", "alpha.csv", "beta.csv", "labels.csv"};
        size_t i;
        for (i = 0; w.data_dir[0] && i < 4; i++) snprintf(path, sizeof path, "%s/%s", w.data_dir, names[i]), remove(path);
        if (w.data_dir[0]) rmdir(w.data_dir);
        rmdir(w.dir);
    }
    FM_CHECK(faults.live == 0, "%ld blocks of the library still live at the end", faults.live);
    fm_setup(NULL);
    return fm_test_finish("test_faults");
}
