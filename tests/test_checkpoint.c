/* Checkpoints (fm_model_save, fm_model_load, fm_safetensors_write): a save and a load give back
 * every arena, the configuration and the training state, bit for bit; the file is safetensors
 * as its specification and flexmoe.h describe it (checked here by an independent reader: the
 * header, the offsets, the unpacked expert weights, zlib's CRC-32); every damaged, truncated,
 * foreign or mismatched file is refused with a message that says what is wrong and a zeroed
 * model; and a process killed at any point of a save never loses the previous checkpoint: a
 * child is stopped by the file-size limit after every N bytes of the write (N across the whole
 * file) and by SIGKILL at random moments, and each time the file on disk loads as the old
 * checkpoint or the new one, never anything else. */
#include "fm_test.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static char last_message[512];

static void keep_message(fm_log_level level, const char *message, void *user_data) {
    (void)level, (void)user_data;
    snprintf(last_message, sizeof last_message, "%s", message);
}

static fm_model_desc small_desc(void) {
    fm_model_desc d;
    memset(&d, 0, sizeof d);
    d.modalities = 3, d.classes = 5, d.dim = 16, d.patches = 4, d.heads = 2, d.experts = 4, d.top_k = 2, d.hidden = 24;
    d.features[0] = 7, d.features[1] = 12, d.features[2] = 3;
    d.dropout = 0.25f, d.gate_loss_weight = -1.0f;
    return d;
}

/* A model with every arena and the training state filled (random moments, best weights). */
static void make_model(fm_model *model, uint64_t seed) {
    fm_model_desc d = small_desc();
    size_t i;
    int t;
    FM_CHECK(fm_model_create(&d, 8, model) == FM_OK && fm_model_init(model, seed) == FM_OK, "create");
    for (t = 0; t < model->tensor_count; t++) { /* packed padding stays zero, as Adam keeps it */
        const fm_tensor_info *info = &model->tensors[t];
        if (info->packed) {
            const size_t plain = (size_t)info->shape[0] * info->shape[1] * info->shape[2];
            float *values = (float *)malloc(plain * sizeof(float));
            int a;
            for (a = 0; a < 3; a++) {
                float *arena = a == 0 ? model->adam_m : a == 1 ? model->adam_v : model->best;
                for (i = 0; i < plain; i++) values[i] = (float)(a == 1 ? fm_test_uniform() : fm_test_normal());
                fm_pack_weights(info->shape[0], info->shape[1], info->shape[2], FM_WEIGHTS_IN_BY_OUT, values, info->shape[2],
                                arena + info->offset);
            }
            free(values);
        } else {
            for (i = 0; i < info->floats; i++) {
                model->adam_m[info->offset + i] = (float)fm_test_normal();
                model->adam_v[info->offset + i] = (float)fm_test_uniform();
                model->best[info->offset + i] = (float)fm_test_normal();
            }
        }
    }
    model->trained.epoch = 7, model->trained.step = 431, model->trained.seed = 0xFEDCBA9876543210ull + seed;
    model->trained.best_epoch = 5, model->trained.best_validation.samples = 300;
    model->trained.best_validation.accuracy = 0.913333f, model->trained.best_validation.macro_f1 = 0.9101f;
    model->trained.best_validation.macro_auc = 0.99123f, model->trained.best_validation.loss = 0.3141f;
}

static int same_model(const fm_model *a, const fm_model *b) {
    const size_t bytes = a->param_floats * sizeof(float);
    return b->params && a->param_floats == b->param_floats && memcmp(&a->config, &b->config, sizeof a->config) == 0 &&
           memcmp(a->params, b->params, bytes) == 0 && memcmp(a->adam_m, b->adam_m, bytes) == 0 &&
           memcmp(a->adam_v, b->adam_v, bytes) == 0 &&
           (a->trained.best_epoch == 0 || memcmp(a->best, b->best, bytes) == 0) &&
           memcmp(&a->trained, &b->trained, sizeof a->trained) == 0;
}

static unsigned char *read_all(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *data;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = (unsigned char *)malloc((size_t)n + 1);
    *size = fread(data, 1, (size_t)n, f);
    fclose(f);
    return data;
}

static void write_all(const char *path, const unsigned char *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (f) {
        if (size) fwrite(data, 1, size, f);
        fclose(f);
    }
}

/* Bit by bit, as the CRC-32 specification reads (no table): the independent check of the library's. */
static uint32_t crc32_bitwise(const unsigned char *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
    int k;
    while (n--)
        for (crc ^= *p++, k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    return ~crc;
}

/* The file as safetensors, read without the library: the header's length and JSON, each
 * parameter's entry and bytes (moe.w1 unpacked: experts x dim x hidden), the checksum. */
static void check_format(const char *path, const fm_model *model) {
    size_t size = 0, header_length = 0, data_start;
    unsigned char *file = read_all(path, &size);
    char *header, needle[160], crc_text[16];
    int i, t;
    FM_CHECK(file && size > 8, "read the file");
    if (!file || size <= 8) return;
    for (i = 0; i < 8; i++) header_length |= (size_t)file[i] << (8 * i);
    data_start = 8 + header_length;
    FM_CHECK(data_start <= size && data_start % 8 == 0, "the header's length %zu (file %zu bytes)", header_length, size);
    header = (char *)malloc(header_length + 1);
    memcpy(header, file + 8, header_length);
    header[header_length] = '\0';
    FM_CHECK(header[0] == '{' && strstr(header, "\"format\":\"flexmoe.checkpoint\"") && strstr(header, "\"version\":\"1\""),
             "format and version in __metadata__");
    FM_CHECK(strstr(header, "\"config\":\"{\\\"modalities\\\":3,\\\"features\\\":[7,12,3],") != NULL,
             "the config as escaped JSON: %.200s", header);
    FM_CHECK(strstr(header, "\\\"epoch\\\":7,\\\"step\\\":431,") != NULL, "the training state in __metadata__");
    snprintf(crc_text, sizeof crc_text, "%08lx", (unsigned long)crc32_bitwise(file + data_start, size - data_start));
    snprintf(needle, sizeof needle, "\"crc32\":\"%s\"", crc_text);
    FM_CHECK(strstr(header, needle) != NULL, "the data's CRC-32 is %s: %s", crc_text, needle);
    for (t = 0; t < model->tensor_count; t++) {
        const fm_tensor_info *info = &model->tensors[t];
        char *entry;
        unsigned long long begin = 0, end = 0;
        size_t plain = 1;
        int n, d;
        snprintf(needle, sizeof needle, "\"%s\":{\"dtype\":\"F32\",\"shape\":[", info->name);
        entry = strstr(header, needle);
        FM_CHECK(entry != NULL, "%s in the header", info->name);
        if (!entry) continue;
        entry += strlen(needle);
        for (d = 0; d < info->rank; d++) {
            int dim = 0;
            FM_CHECK(sscanf(entry, "%d%n", &dim, &n) == 1 && dim == info->shape[d], "%s dimension %d", info->name, d);
            entry += n + (d + 1 < info->rank);
            plain *= (size_t)info->shape[d];
        }
        FM_CHECK(sscanf(entry, "],\"data_offsets\":[%llu,%llu]}", &begin, &end) == 2 && end - begin == plain * 4 &&
                     data_start + end <= size,
                 "%s's data_offsets [%llu, %llu]", info->name, begin, end);
        if (end - begin != plain * 4 || data_start + end > size) continue;
        {
            float *values = (float *)malloc(plain * sizeof(float)), *expected = (float *)malloc(plain * sizeof(float));
            memcpy(values, file + data_start + begin, plain * sizeof(float));
            if (info->packed)
                fm_unpack_weights(info->shape[0], info->shape[1], info->shape[2], FM_WEIGHTS_IN_BY_OUT,
                                  model->params + info->offset, expected, info->shape[2]);
            else
                memcpy(expected, model->params + info->offset, plain * sizeof(float));
            FM_CHECK(memcmp(values, expected, plain * sizeof(float)) == 0, "%s's values in the file", info->name);
            free(values), free(expected);
        }
    }
    free(header);
    free(file);
}

/* A file the loader must refuse: the status, a message containing `why`, a zeroed model. */
static void check_refused(const char *path, fm_status want, const char *why, const char *what) {
    fm_model m;
    fm_status got;
    last_message[0] = '\0';
    got = fm_model_load(path, 8, &m);
    FM_CHECK(got == want && strstr(last_message, why) != NULL && m.params == NULL && m.tensor_count == 0,
             "%s: status %s, message \"%s\" (want %s, \"%s\")", what, fm_status_str(got), last_message, fm_status_str(want), why);
    fm_model_destroy(&m);
}

/* The checkpoint with its text edited (the first `from` in the header becomes `to`, the same length). */
static void write_edited(const char *path, const unsigned char *file, size_t size, const char *from, const char *to) {
    unsigned char *copy = (unsigned char *)malloc(size);
    char *at;
    memcpy(copy, file, size);
    copy[size - 1] = copy[size - 1]; /* keep the data */
    at = strstr((char *)copy + 8, from);
    FM_CHECK(at != NULL && strlen(from) == strlen(to), "edit %s", from);
    if (at) memcpy(at, to, strlen(to));
    write_all(path, copy, size);
    free(copy);
}

static void check_refusals(const char *good, const char *bad, const fm_model *model) {
    size_t size = 0, cut, header_length = 0;
    unsigned char *file = read_all(good, &size), *copy;
    int i, truncations = 0, flips = 0;
    if (!file) return;
    for (i = 0; i < 8; i++) header_length |= (size_t)file[i] << (8 * i);
    check_refused("/nonexistent/flexmoe.safetensors", FM_ERR_IO, "cannot open", "a missing file");
    write_all(bad, file, 0);
    check_refused(bad, FM_ERR_BAD_FILE, "not even the 8", "an empty file");
    write_all(bad, (const unsigned char *)"{\"a\": 1}\n", 9);
    check_refused(bad, FM_ERR_BAD_FILE, "header length", "a JSON file");
    /* truncated at every 1/64 of the file and at the edges of the header and the data */
    for (cut = 1; cut < size; cut = cut < 16 ? cut + 1 : cut + size / 64) {
        fm_model m;
        write_all(bad, file, cut);
        truncations += fm_model_load(bad, 8, &m) == FM_ERR_BAD_FILE && m.params == NULL;
        fm_model_destroy(&m);
        if (cut == 15) {
            write_all(bad, file, 8 + header_length);
            check_refused(bad, FM_ERR_BAD_FILE, "it is truncated", "truncated after the header");
            write_all(bad, file, size - 1);
            check_refused(bad, FM_ERR_BAD_FILE, "it is truncated", "one byte short");
        }
    }
    FM_CHECK(truncations == (int)(15 + (size - 16) / (size / 64) + 1), "%d truncations refused", truncations);
    /* one flipped bit anywhere in the data: the checksum */
    copy = (unsigned char *)malloc(size + 8);
    for (i = 0; i < 40; i++) {
        const size_t at = 8 + header_length + (size_t)fm_test_int(0, (int)(size - 9 - header_length));
        fm_model m;
        memcpy(copy, file, size);
        copy[at] ^= (unsigned char)(1u << fm_test_int(0, 7));
        write_all(bad, copy, size);
        last_message[0] = '\0';
        flips += fm_model_load(bad, 8, &m) == FM_ERR_BAD_FILE && strstr(last_message, "CRC-32") != NULL;
        fm_model_destroy(&m);
    }
    FM_CHECK(flips == 40, "%d of 40 flipped bits in the data refused by the checksum", flips);
    memcpy(copy, file, size);
    memcpy(copy + size, "\0\0\0\0\0\0\0\0", 8);
    write_all(bad, copy, size + 8);
    check_refused(bad, FM_ERR_BAD_FILE, "bytes past its last tensor", "8 bytes appended");
    memcpy(copy, file, size);
    copy[7] = 0x40;
    write_all(bad, copy, size);
    check_refused(bad, FM_ERR_BAD_FILE, "header length", "a header length of 2^62");
    free(copy);
    /* edits of the header (the data and its checksum intact) */
    write_edited(bad, file, size, "\"version\":\"1\"", "\"version\":\"2\"");
    check_refused(bad, FM_ERR_BAD_FILE, "version 2", "format version 2");
    write_edited(bad, file, size, "flexmoe.checkpoint", "flexmoe.something!");
    check_refused(bad, FM_ERR_BAD_FILE, "not a flexmoe checkpoint", "another format");
    write_edited(bad, file, size, "\\\"dim\\\":16", "\\\"dim\\\":32");
    check_refused(bad, FM_ERR_BAD_FILE, "does not match the config", "a config that does not match the tensors");
    write_edited(bad, file, size, "\\\"heads\\\":2", "\\\"heads\\\":3");
    check_refused(bad, FM_ERR_BAD_FILE, "not a valid model", "an invalid config");
    write_edited(bad, file, size, "\"dtype\":\"F32\"", "\"dtype\":\"I32\"");
    check_refused(bad, FM_ERR_BAD_FILE, "checkpoints hold F32", "an I32 tensor");
    write_edited(bad, file, size, "\"dtype\":\"F32\"", "\"dtype\":\"X32\"");
    check_refused(bad, FM_ERR_BAD_FILE, "does not define", "an unknown dtype");
    write_edited(bad, file, size, "\"data_offsets\":[0,", "\"data_offsets\":[4,");
    check_refused(bad, FM_ERR_BAD_FILE, "do not hold", "offsets off by 4");
    write_edited(bad, file, size, "encoder.0.weight", "encoder.9.weight");
    check_refused(bad, FM_ERR_BAD_FILE, "is not part of", "a tensor the model does not have");
    write_edited(bad, file, size, "{\"__metadata__\":{", "[\"__metadata__\":{");
    check_refused(bad, FM_ERR_BAD_FILE, "does not begin with '{'", "a header that is not an object");
    write_edited(bad, file, size, "{\"__metadata__\":{", "{\"__metadata__\":[");
    check_refused(bad, FM_ERR_BAD_FILE, "__metadata__ is not an object", "metadata that is not an object");
    write_edited(bad, file, size, "\"best_epoch\\\":5", "\"best_epoch\\\":9");
    check_refused(bad, FM_ERR_BAD_FILE, "best_epoch", "a best epoch after the last");
    write_edited(bad, file, size, "\"crc32\":\"", "\"crc33\":\"");
    check_refused(bad, FM_ERR_BAD_FILE, "no crc32", "no checksum");
    /* files written by fm_safetensors_write: valid safetensors, but not what a checkpoint needs */
    {
        const float values[4] = {1.0f, 2.0f, 3.0f, 4.0f}, five[5] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
        fm_safetensor t;
        char config[512];
        const char *metadata[9];
        memset(&t, 0, sizeof t);
        t.name = "weights", t.dtype = "F32", t.rank = 2, t.shape[0] = 2, t.shape[1] = 2, t.data = values;
        FM_CHECK(fm_safetensors_write(bad, &t, 1, NULL) == FM_OK, "fm_safetensors_write");
        check_refused(bad, FM_ERR_BAD_FILE, "not a flexmoe checkpoint", "a foreign safetensors file");
        /* the checkpoint's own metadata, but tensors missing */
        snprintf(config, sizeof config, "{\"modalities\": 3, \"features\": [7, 12, 3], \"classes\": 5, \"patches\": 4, "
                 "\"dim\": 16, \"heads\": 2, \"experts\": 4, \"top_k\": 2, \"hidden\": 24, \"dropout\": 0.25, "
                 "\"gate_loss_weight\": -1, \"no_attention_residual\": 0, \"layernorm_eps\": 1e-5}");
        metadata[0] = "format", metadata[1] = "flexmoe.checkpoint", metadata[2] = "version", metadata[3] = "1";
        metadata[4] = "config", metadata[5] = config, metadata[6] = "training";
        metadata[7] = "{\"epoch\": 0, \"step\": 0, \"seed\": 18446744073709551615, \"best_epoch\": 0, \"best_samples\": 0, "
                      "\"best_accuracy\": 0, \"best_macro_f1\": 0, \"best_macro_auc\": 0, \"best_loss\": 0}";
        metadata[8] = NULL;
        t.name = "head.bias", t.rank = 1, t.shape[0] = 4;
        FM_CHECK(fm_safetensors_write(bad, &t, 1, metadata) == FM_OK, "fm_safetensors_write");
        check_refused(bad, FM_ERR_BAD_FILE, "shape does not match", "a tensor of the wrong shape");
        t.shape[0] = 5, t.data = five;
        FM_CHECK(fm_safetensors_write(bad, &t, 1, metadata) == FM_OK, "fm_safetensors_write");
        check_refused(bad, FM_ERR_BAD_FILE, "lacks tensor encoder.0.weight", "a checkpoint missing tensors");
        metadata[7] = "{\"epoch\": 0, \"step\": 0, \"best_epoch\": 0}";
        FM_CHECK(fm_safetensors_write(bad, &t, 1, metadata) == FM_OK, "fm_safetensors_write");
        check_refused(bad, FM_ERR_BAD_FILE, "best_samples is missing", "a training state without its fields");
        metadata[2] = "crc32";
        FM_CHECK(fm_safetensors_write(bad, &t, 1, metadata) == FM_ERR_INVALID_ARGUMENT, "a crc32 key of the caller's refused");
        t.dtype = "F31";
        FM_CHECK(fm_safetensors_write(bad, &t, 1, NULL) == FM_ERR_INVALID_ARGUMENT, "an unknown dtype refused");
    }
    /* a NaN among the values, with a correct checksum: the whole model, one value replaced */
    {
        fm_model m;
        float keep;
        make_model(&m, 3);
        keep = m.params[m.tensors[2].offset + 1];
        m.params[m.tensors[2].offset + 1] = NAN;
        FM_CHECK(fm_model_save(&m, bad) == FM_OK, "save a model holding a NaN");
        check_refused(bad, FM_ERR_BAD_FILE, "holds NaN at element 1", "a NaN in a tensor");
        m.params[m.tensors[2].offset + 1] = keep;
        fm_model_destroy(&m);
    }
    free(file);
    (void)model;
}

/* ---- killed during a save ------------------------------------------------------------------- */

/* Saves `next` over path in a child that the file-size limit stops after `limit` bytes (0: a
 * child that saves in a loop until SIGKILL arrives after `delay_us`). The file must then load
 * as `previous` or `next`. Returns 1 when it did. */
static int kill_during_save(const char *path, const fm_model *previous, const fm_model *next, long limit, long delay_us,
                            int *killed) {
    fm_model loaded;
    int status = 0, ok;
    const pid_t child = fork();
    if (child == 0) {
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        if (limit > 0) {
            struct rlimit size;
            size.rlim_cur = size.rlim_max = (rlim_t)limit;
            setrlimit(RLIMIT_FSIZE, &size);
            fm_model_save(next, path);
        } else {
            for (;;) fm_model_save(next, path);
        }
        _exit(0);
    }
    if (child < 0) return 0;
    if (limit <= 0) {
        struct timespec pause;
        pause.tv_sec = delay_us / 1000000, pause.tv_nsec = delay_us % 1000000 * 1000;
        nanosleep(&pause, NULL);
        kill(child, SIGKILL);
    }
    waitpid(child, &status, 0);
    *killed += WIFSIGNALED(status);
    ok = fm_model_load(path, 8, &loaded) == FM_OK && (same_model(previous, &loaded) || same_model(next, &loaded));
    fm_model_destroy(&loaded);
    return ok;
}

static void check_kills(const char *path) {
    fm_model a, b;
    size_t size = 0;
    unsigned char *file;
    long limit;
    int trials = 0, intact = 0, killed = 0, i;
    make_model(&a, 1);
    make_model(&b, 2);
    b.trained.epoch = 8, b.trained.step = 500;
    FM_CHECK(fm_model_save(&a, path) == FM_OK, "save the previous checkpoint");
    file = read_all(path, &size);
    free(file);
    signal(SIGXFSZ, SIG_DFL);
    for (limit = 1; limit < (long)size; limit += limit < 64 ? 7 : (long)size / 97) {
        /* put a back each time, so every trial overwrites the same previous file */
        if (fm_model_save(&a, path) != FM_OK) break;
        trials++;
        intact += kill_during_save(path, &a, &b, limit, 0, &killed);
    }
    FM_CHECK(trials > 100 && intact == trials && killed == trials,
             "file-size kills: %d of %d trials left a loadable checkpoint (%d children killed)", intact, trials, killed);
    printf("test_checkpoint: %d saves stopped by the file-size limit at byte offsets 1 .. %zu, %d checkpoints intact\n",
           trials, size, intact);
    trials = intact = killed = 0;
    for (i = 0; i < 40; i++) {
        trials++;
        intact += kill_during_save(path, &a, &b, 0, fm_test_int(0, 3000), &killed);
    }
    FM_CHECK(intact == trials, "SIGKILL: %d of %d trials left a loadable checkpoint", intact, trials);
    printf("test_checkpoint: %d saves killed by SIGKILL at random moments (%d while running), %d checkpoints intact\n",
           trials, killed, intact);
    /* a stale temporary file from a killed save does not disturb the next one */
    FM_CHECK(fm_model_save(&b, path) == FM_OK, "save after the kills");
    {
        fm_model loaded;
        FM_CHECK(fm_model_load(path, 8, &loaded) == FM_OK && same_model(&b, &loaded), "the new checkpoint loads");
        fm_model_destroy(&loaded);
    }
    fm_model_destroy(&a);
    fm_model_destroy(&b);
}

int main(void) {
    char good[96], bad[96], temp[112];
    fm_desc setup;
    fm_model a, loaded;
    fm_test_seed("test_checkpoint");
    memset(&setup, 0, sizeof setup);
    setup.logger.func = keep_message;
    FM_CHECK(fm_setup(&setup) == FM_OK, "fm_setup");
    snprintf(good, sizeof good, "/tmp/flexmoe_test_checkpoint_%d.safetensors", (int)getpid());
    snprintf(bad, sizeof bad, "/tmp/flexmoe_test_checkpoint_%d_bad.safetensors", (int)getpid());
    make_model(&a, 1);
    FM_CHECK(fm_model_save(&a, good) == FM_OK, "save: %s", last_message);
    FM_CHECK(fm_model_load(good, 8, &loaded) == FM_OK && same_model(&a, &loaded),
             "a loaded checkpoint equals the saved model: %s", last_message);
    FM_CHECK(loaded.max_samples == 8 && loaded.config.gate_loss_weight == -1.0f && loaded.config.dropout == 0.25f,
             "max_samples and the config");
    fm_model_destroy(&loaded);
    snprintf(temp, sizeof temp, "%s.tmp", good);
    FM_CHECK(access(temp, F_OK) != 0, "no temporary file left after a save");
    check_format(good, &a);
    /* a fresh model (no best epoch): no best.* tensors, and it loads */
    FM_CHECK(fm_model_init(&a, 4) == FM_OK && fm_model_save(&a, good) == FM_OK && fm_model_load(good, 8, &loaded) == FM_OK &&
                 same_model(&a, &loaded),
             "a fresh model's checkpoint");
    fm_model_destroy(&loaded);
    fm_model_destroy(&a);
    { /* ConfSMoE's gate with zero imputation: other tensors (no bank, no noise weight, the probes) */
        fm_model_desc d = small_desc();
        d.gate = FM_GATE_CONFIDENCE, d.confidence = FM_CONF_EXPERT_MEAN, d.imputation = FM_IMPUTE_ZERO;
        FM_CHECK(fm_model_create(&d, 8, &a) == FM_OK && fm_model_init(&a, 6) == FM_OK && !fm_model_tensor(&a, "bank") &&
                     fm_model_tensor(&a, "moe.probe.weight") && fm_model_save(&a, good) == FM_OK &&
                     fm_model_load(good, 8, &loaded) == FM_OK && same_model(&a, &loaded) &&
                     loaded.config.gate == FM_GATE_CONFIDENCE && loaded.config.confidence == FM_CONF_EXPERT_MEAN &&
                     loaded.config.imputation == FM_IMPUTE_ZERO,
                 "a ConfSMoE model's checkpoint: %s", last_message);
        fm_model_destroy(&loaded);
        fm_model_destroy(&a);
        /* ConfSMoE's two imputation stages: the stage's tensors and its kept fraction */
        d.imputation = FM_IMPUTE_TWO_STAGE, d.impute_keep = 0.3f;
        FM_CHECK(fm_model_create(&d, 8, &a) == FM_OK && fm_model_init(&a, 7) == FM_OK &&
                     fm_model_tensor(&a, "moe.impute.kv.weight") && fm_model_save(&a, good) == FM_OK &&
                     fm_model_load(good, 8, &loaded) == FM_OK && same_model(&a, &loaded) &&
                     loaded.config.imputation == FM_IMPUTE_TWO_STAGE && loaded.config.impute_keep == 0.3f,
                 "a two-stage ConfSMoE model's checkpoint: %s", last_message);
        fm_model_destroy(&loaded);
        fm_model_destroy(&a);
    }
    make_model(&a, 1);
    FM_CHECK(fm_model_save(&a, "/nonexistent/dir/x.safetensors") == FM_ERR_IO && strstr(last_message, "cannot create"),
             "saving into a missing directory: %s", last_message);
    FM_CHECK(fm_model_save(&a, good) == FM_OK, "save");
    check_refusals(good, bad, &a);
    fm_model_destroy(&a);
    check_kills(good);
    remove(good), remove(bad), remove(temp);
    return fm_test_finish("test_checkpoint");
}
