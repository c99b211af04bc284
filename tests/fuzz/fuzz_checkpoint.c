/* libFuzzer target of the checkpoint loader, fm_model_load (flexmoe.h section 12: safetensors).
 *
 * The input is one byte of options, then the checkpoint file itself:
 *   byte 0   bits 0-1: max_samples - 1 (1 .. 4); bit 2: keep the file's crc32 as it is (else the
 *            target writes the right CRC-32 of the data into a "crc32": "xxxxxxxx" entry of the
 *            header, so mutations get past the checksum to the config, the shapes and the
 *            values); bit 3: also save the loaded model and load it again (round trip)
 *   the rest the file, written to a per-process file under /dev/shm (else /tmp), reused.
 * The seeds in tests/fuzz/corpus-checkpoint/ are tiny valid checkpoints saved by fm_model_save
 * from small models of every gate and imputation (one trained, with best.* tensors) plus a few
 * damaged ones; regenerate them with
 *   FUZZ_MAKE_CORPUS=tests/fuzz/corpus-checkpoint build/fuzz/fuzz_checkpoint
 *
 * After each call the target checks (abort() on failure, so the fuzzer reports it):
 *   - the status is an fm_status, FM_OK, FM_ERR_BAD_FILE or FM_ERR_OUT_OF_MEMORY (the file is
 *     always readable), and a failed load leaves the model zeroed;
 *   - a loaded model is usable: its config valid, every parameter finite, a forward (logits
 *     samples x classes, exactly sized) and, with labels, a backward and an Adam step on a tiny
 *     batch of its shapes succeed; with bit 3 the model saved and loaded again has the same
 *     config, training state and arenas, bit for bit; then it is destroyed;
 *   - every block the library allocated is freed (an allocator hook counts them; it also refuses
 *     blocks over 32 MiB, so a config that asks for a huge model is FM_ERR_OUT_OF_MEMORY).
 * FUZZ_TRACE=1 prints the load's status, the library's messages and each later call.
 *
 * Build (scripts/fuzz.sh does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. \
 *         tests/fuzz/fuzz_checkpoint.c build/fuzz/flexmoe_impl.o -o build/fuzz/fuzz_checkpoint -lm
 * (scripts/fuzz.sh builds build/fuzz/flexmoe_impl.o first). */
#define FUZZ_NAME "fuzz_checkpoint"
#define FUZZ_COUNTING_HOOK
#include "fuzz_common.h"

#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- files ------------------------------------------------------------------------------------- */

static char g_path[256], g_path2[256];

static void remove_files(void) {
    char tmp[300];
    unlink(g_path), unlink(g_path2);
    snprintf(tmp, sizeof tmp, "%s.tmp", g_path2);
    unlink(tmp);
}

static void write_file(const char *path, const uint8_t *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n)) die("cannot write %s", path);
    fclose(f);
}

/* zlib's CRC-32 */
static uint32_t crc32_of(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        c ^= p[i];
        for (k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    }
    return c ^ 0xFFFFFFFFu;
}

/* Writes the right CRC-32 of the data into the header's "crc32": "xxxxxxxx", when there is one. */
static void fix_crc(uint8_t *file, size_t n) {
    uint64_t header = 0;
    size_t i;
    char hex[9];
    static const char key[] = "\"crc32\"";
    if (n < 8) return;
    for (i = 0; i < 8; i++) header |= (uint64_t)file[i] << (8 * i);
    if (header > n - 8) return;
    for (i = 8; i + sizeof key - 1 <= 8 + header; i++)
        if (memcmp(file + i, key, sizeof key - 1) == 0) {
            size_t j = i + sizeof key - 1;
            while (j < 8 + header && (file[j] == ' ' || file[j] == ':')) j++;
            if (j + 10 <= 8 + header && file[j] == '"' && file[j + 9] == '"') {
                snprintf(hex, sizeof hex, "%08x", (unsigned)crc32_of(file + 8 + header, n - 8 - (size_t)header));
                memcpy(file + j + 1, hex, 8);
            }
            return;
        }
}

/* ---- using a loaded model ---------------------------------------------------------------------- */

static uint64_t rng_state;
static uint64_t rng(void) { return fuzz_splitmix(&rng_state); }

static void use_model(fm_model *model) {
    const fm_model_desc *c = &model->config;
    fm_model_batch batch;
    fm_model_losses losses;
    float *features[FLEXMOE_MODEL_MAX_MODALITIES], *logits;
    uint8_t *observed;
    int32_t *labels;
    const int S = 1 + (int)(rng() % (uint64_t)model->max_samples), M = c->modalities;
    int s, m;
    size_t j;
    fm_status st;
    fm_adam_desc adam;

    CHECK(M >= 1 && M <= FLEXMOE_MODEL_MAX_MODALITIES && c->classes >= 2 && model->tensor_count > 0 && model->params,
          "a loaded model is malformed: %d modalities, %d classes, %d tensors", M, c->classes, model->tensor_count);
    for (j = 0; j < model->param_floats; j++)
        CHECK(isfinite(model->params[j]) && isfinite(model->adam_m[j]) && isfinite(model->adam_v[j]),
              "a loaded model holds a non-finite value at float %zu", j);
    memset(&batch, 0, sizeof batch);
    batch.samples = S;
    for (m = 0; m < M; m++) {
        const size_t n = (size_t)S * c->features[m];
        if (!(features[m] = (float *)malloc(n * sizeof(float)))) abort();
        for (j = 0; j < n; j++) features[m][j] = (float)((int)(rng() % 17) - 8) * 0.25f;
        batch.features[m] = features[m];
    }
    observed = (uint8_t *)malloc((size_t)S * M);
    labels = (int32_t *)malloc((size_t)S * sizeof *labels);
    logits = (float *)malloc((size_t)S * c->classes * sizeof *logits);
    if (!observed || !labels || !logits) abort();
    for (s = 0; s < S; s++) {
        const unsigned mask = 1u + (unsigned)(rng() % ((1u << M) - 1u));
        for (m = 0; m < M; m++) observed[s * M + m] = (uint8_t)(mask >> m & 1);
        labels[s] = (int32_t)(rng() % (uint64_t)c->classes);
    }
    batch.observed = observed;
    batch.labels = rng() & 1 ? labels : NULL;
    batch.training = (int)(rng() & 1);
    batch.seed = rng(), batch.step = rng() % 100;
    st = fm_model_forward(model, &batch, logits, batch.labels ? &losses : NULL);
    TRACE("fm_model_forward (%d samples, labels %s, training %d) = %s", S, batch.labels ? "yes" : "no", batch.training,
          fm_status_str(st));
    CHECK(st == FM_OK, "fm_model_forward on a loaded model = %s", fm_status_str(st));
    if (batch.labels) {
        st = fm_model_backward(model, &batch);
        TRACE("fm_model_backward = %s", fm_status_str(st));
        CHECK(st == FM_OK, "fm_model_backward on a loaded model = %s", fm_status_str(st));
        memset(&adam, 0, sizeof adam);
        st = fm_model_adam_step(model, &adam, model->trained.step + 1);
        TRACE("fm_model_adam_step = %s", fm_status_str(st));
        /* huge loaded weights can overflow to a non-finite gradient: refused, never a crash */
        CHECK(st == FM_OK || st == FM_ERR_INVALID_ARGUMENT, "fm_model_adam_step = %s", fm_status_str(st));
    }
    for (m = 0; m < M; m++) free(features[m]);
    free(observed), free(labels), free(logits);
}

static void round_trip(const fm_model *model) {
    fm_model again;
    fm_status st = fm_model_save(model, g_path2);
    TRACE("fm_model_save = %s", fm_status_str(st));
    CHECK(st == FM_OK || st == FM_ERR_OUT_OF_MEMORY, "fm_model_save of a loaded model = %s", fm_status_str(st));
    if (st != FM_OK) return;
    st = fm_model_load(g_path2, model->max_samples, &again);
    TRACE("fm_model_load of the saved copy = %s", fm_status_str(st));
    CHECK(st == FM_OK || st == FM_ERR_OUT_OF_MEMORY, "loading the model just saved = %s", fm_status_str(st));
    if (st != FM_OK) return;
    CHECK(memcmp(&again.config, &model->config, sizeof again.config) == 0, "the round trip changed the config");
    CHECK(again.trained.epoch == model->trained.epoch && again.trained.step == model->trained.step &&
              again.trained.seed == model->trained.seed && again.trained.best_epoch == model->trained.best_epoch &&
              memcmp(&again.trained.best_validation, &model->trained.best_validation, sizeof again.trained.best_validation) == 0,
          "the round trip changed the training state");
    CHECK(again.param_floats == model->param_floats, "the round trip changed the arenas' size");
    CHECK(memcmp(again.params, model->params, model->param_floats * sizeof(float)) == 0 &&
              memcmp(again.adam_m, model->adam_m, model->param_floats * sizeof(float)) == 0 &&
              memcmp(again.adam_v, model->adam_v, model->param_floats * sizeof(float)) == 0,
          "the round trip changed the parameters or the moments");
    if (model->trained.best_epoch > 0)
        CHECK(memcmp(again.best, model->best, model->param_floats * sizeof(float)) == 0, "the round trip changed best");
    fm_model_destroy(&again);
}

/* ---- the seed corpus ------------------------------------------------------------------------------ */

static void make_corpus(const char *dir) {
    static const struct {
        const char *name;
        int modalities, f0, f1, classes, patches, dim, heads, experts, top_k, hidden;
        fm_gate_kind gate;
        fm_imputation imputation;
        int trained, no_residual;
        float dropout;
    } seeds[] = {
        {"noisy-bank", 1, 3, 0, 2, 1, 4, 1, 2, 1, 4, FM_GATE_NOISY_TOPK, FM_IMPUTE_BANK, 0, 0, 0.0f},
        {"noisy-two-modalities-trained", 2, 3, 2, 3, 2, 4, 2, 3, 2, 4, FM_GATE_NOISY_TOPK, FM_IMPUTE_BANK, 1, 0, 0.0f},
        {"confidence-two-stage", 2, 2, 3, 2, 1, 4, 1, 2, 2, 2, FM_GATE_CONFIDENCE, FM_IMPUTE_TWO_STAGE, 0, 0, -1.0f},
        {"noisy-zero-official", 2, 1, 1, 2, 1, 2, 2, 1, 1, 2, FM_GATE_NOISY_TOPK, FM_IMPUTE_ZERO, 0, 1, 0.25f},
        {"confidence-features", 1, 2, 0, 3, 2, 2, 1, 2, 1, 3, FM_GATE_CONFIDENCE, FM_IMPUTE_FEATURES, 0, 0, 0.0f},
    };
    char path[512];
    size_t i;
    for (i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        fm_model_desc d;
        fm_model model;
        FILE *f;
        uint8_t *file;
        long n;
        int variant;
        memset(&d, 0, sizeof d);
        d.modalities = seeds[i].modalities, d.features[0] = seeds[i].f0, d.features[1] = seeds[i].f1;
        d.classes = seeds[i].classes, d.patches = seeds[i].patches, d.dim = seeds[i].dim, d.heads = seeds[i].heads;
        d.experts = seeds[i].experts, d.top_k = seeds[i].top_k, d.hidden = seeds[i].hidden, d.gate = seeds[i].gate;
        d.imputation = seeds[i].imputation, d.no_attention_residual = seeds[i].no_residual, d.dropout = seeds[i].dropout;
        if (fm_model_create(&d, 2, &model) != FM_OK || fm_model_init(&model, 1000 + i) != FM_OK) die("make_corpus: create %s", seeds[i].name);
        if (seeds[i].trained) {
            size_t j;
            for (j = 0; j < model.param_floats; j++) model.best[j] = model.params[j] * 0.5f, model.adam_m[j] = 1e-3f;
            model.trained.epoch = 3, model.trained.step = 12, model.trained.seed = 0xFFFFFFFFFFFFFFFFull;
            model.trained.best_epoch = 2, model.trained.best_validation.samples = 7;
            model.trained.best_validation.accuracy = 0.5f, model.trained.best_validation.loss = 0.75f;
        }
        if (fm_model_save(&model, g_path) != FM_OK) die("make_corpus: save %s", seeds[i].name);
        fm_model_destroy(&model);
        if (!(f = fopen(g_path, "rb")) || fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) die("make_corpus: read");
        if (!(file = (uint8_t *)malloc((size_t)n + 1))) abort();
        if (fread(file + 1, 1, (size_t)n, f) != (size_t)n) die("make_corpus: read");
        fclose(f);
        /* the valid file (max_samples 2, round trip); a damaged variant of some */
        for (variant = 0; variant < (i < 3 ? 2 : 1); variant++) {
            size_t len = (size_t)n + 1;
            file[0] = (uint8_t)(1 | 8);
            if (variant == 1 && i == 0) len = (size_t)n - 5; /* truncated */
            if (variant == 1 && i == 1) file[0] = 4 | 2, file[len - 3] ^= 0x40; /* damaged data, crc kept */
            if (variant == 1 && i == 2) file[0] = 0, file[len - 1] = 0xFF, file[len - 2] = 0xFF, file[len - 3] = 0xFF; /* a NaN */
            snprintf(path, sizeof path, "%s/seed-%s%s", dir, seeds[i].name,
                     variant == 0 ? "" : i == 0 ? "-truncated" : i == 1 ? "-bad-crc" : "-nan");
            write_file(path, file, len);
            fprintf(stderr, "fuzz_checkpoint: wrote %s (%zu bytes)\n", path, len);
        }
        free(file);
    }
}

/* ---- the entry points ------------------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    (void)argc, (void)argv;
    fuzz_setup();
    snprintf(g_path, sizeof g_path, "%s/flexmoe-fuzz-checkpoint-%ld.safetensors", base, (long)getpid());
    snprintf(g_path2, sizeof g_path2, "%s/flexmoe-fuzz-checkpoint-%ld-again.safetensors", base, (long)getpid());
    atexit(remove_files);
    if (getenv("FUZZ_MAKE_CORPUS")) {
        make_corpus(getenv("FUZZ_MAKE_CORPUS"));
        exit(0);
    }
    fprintf(stderr, "fuzz_checkpoint: ISA path %s, file %s\n", fm_isa_name(fm_active_isa()), g_path);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fm_model model;
    fm_status st;
    uint8_t *file;
    const int max_samples = size ? 1 + (data[0] & 3) : 1;
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;
    if (size < 1) return 0;
    if (!(file = (uint8_t *)malloc(size))) abort();
    memcpy(file, data + 1, size - 1);
    if (!(data[0] & 4)) fix_crc(file, size - 1);
    write_file(g_path, file, size - 1);
    free(file);
    for (i = 0; i < size; i++) h = (h ^ data[i]) * 0x100000001B3ull;
    rng_state = h;

    hook_live = 0;
    memset(&model, 0xA5, sizeof model);
    st = fm_model_load(g_path, max_samples, &model);
    TRACE("fm_model_load(max_samples %d) = %s", max_samples, fm_status_str(st));
    CHECK(st == FM_OK || st == FM_ERR_BAD_FILE || st == FM_ERR_OUT_OF_MEMORY, "fm_model_load = %d (%s)", (int)st,
          fm_status_str(st));
    if (st != FM_OK) {
        static const fm_model zero;
        CHECK(memcmp(&model, &zero, sizeof model) == 0, "a failed fm_model_load left the model not zeroed");
        fm_model_destroy(&model);
    } else {
        CHECK(model.max_samples == max_samples, "max_samples %d, asked %d", model.max_samples, max_samples);
        if (data[0] & 8) round_trip(&model);
        use_model(&model);
        fm_model_destroy(&model);
    }
    CHECK(hook_live == 0, "%ld blocks of the library's not freed", hook_live);
    return 0;
}
