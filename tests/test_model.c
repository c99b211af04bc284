/* The Flex-MoE model (fm_model_*) against its PyTorch reference, llm.c's check against a
 * PyTorch debug state: this program writes a model's parameters and a batch into a safetensors
 * file, tests/model_reference.py (Debian's python3-torch) runs the same model in float64 with
 * the same gate noise and dropout masks (or none), and every path's logits, losses and every
 * parameter gradient must agree within 1e-4 of each tensor's largest value. The reference checks its own
 * gradients against central differences in double (its --selftest, also run here), so the
 * model's backward is checked against finite differences of the double-precision model too.
 * Also: the combination order, the tensor table, the arenas, initialisation and the errors.
 *
 * The configurations and batches come from fixed seeds (FLEXMOE_TEST_SEED changes them): a
 * float32 forward and the float64 reference could choose different experts where two noisy
 * logits are within rounding of each other, and a fixed batch makes such a near-tie either
 * always or never happen (it does not, for these). */
#include "fm_test.h"

#include <sys/wait.h>

#ifndef FM_TEST_SOURCE_ROOT
#define FM_TEST_SOURCE_ROOT "."
#endif

/* Relative to the largest value of each compared tensor (the acceptance criterion). */
#define MODEL_TOLERANCE 1e-4

/* ---- a minimal safetensors writer and reader (the test's own, independent of the library) ---- */

typedef struct st_tensor {
    const char *name, *dtype; /* "F32" or "I32" */
    int rank, shape[4];
    const void *data;
} st_tensor;

static size_t st_bytes(const st_tensor *t) {
    size_t n = 4;
    int i;
    for (i = 0; i < t->rank; i++) n *= (size_t)t->shape[i];
    return n;
}

static int st_write(const char *path, const st_tensor *tensors, int count, const char *config_json) {
    char *header = (char *)malloc(1 << 20), *escaped = (char *)malloc(2 * strlen(config_json) + 1);
    size_t used = 0, offset = 0, length, i;
    uint64_t n;
    FILE *f;
    int t, k;
    for (i = 0, k = 0; config_json[i]; i++) {
        if (config_json[i] == '"' || config_json[i] == '\\') escaped[k++] = '\\';
        escaped[k++] = config_json[i];
    }
    escaped[k] = 0;
    used += (size_t)sprintf(header + used, "{\"__metadata__\":{\"config\":\"%s\"}", escaped);
    for (t = 0; t < count; t++) {
        used += (size_t)sprintf(header + used, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", tensors[t].name, tensors[t].dtype);
        for (k = 0; k < tensors[t].rank; k++) used += (size_t)sprintf(header + used, "%s%d", k ? "," : "", tensors[t].shape[k]);
        used += (size_t)sprintf(header + used, "],\"data_offsets\":[%zu,%zu]}", offset, offset + st_bytes(&tensors[t]));
        offset += st_bytes(&tensors[t]);
    }
    header[used++] = '}';
    while (used % 8) header[used++] = ' ';
    length = used;
    n = (uint64_t)length;
    if (!(f = fopen(path, "wb"))) return 0;
    fwrite(&n, 8, 1, f); /* little-endian: the test runs on x86-64 and aarch64 */
    fwrite(header, 1, length, f);
    for (t = 0; t < count; t++) fwrite(tensors[t].data, 1, st_bytes(&tensors[t]), f);
    free(header);
    free(escaped);
    return fclose(f) == 0;
}

typedef struct st_file {
    char *header;
    unsigned char *data;
    size_t data_bytes;
} st_file;

static int st_read(const char *path, st_file *file) {
    FILE *f = fopen(path, "rb");
    uint64_t n = 0;
    long end;
    memset(file, 0, sizeof *file);
    if (!f) return 0;
    if (fread(&n, 8, 1, f) != 1 || n > (1u << 26) || fseek(f, 0, SEEK_END) != 0 || (end = ftell(f)) < (long)(8 + n)) {
        fclose(f);
        return 0;
    }
    file->header = (char *)calloc(n + 1, 1);
    file->data_bytes = (size_t)end - 8 - n;
    file->data = (unsigned char *)malloc(file->data_bytes + 1);
    fseek(f, 8, SEEK_SET);
    if (fread(file->header, 1, n, f) != n || fread(file->data, 1, file->data_bytes, f) != file->data_bytes) {
        fclose(f);
        return 0;
    }
    fclose(f);
    return 1;
}

/* The named tensor as doubles (F64 or F32), its element count in *count; NULL if absent. */
static double *st_get(const st_file *file, const char *name, size_t *count) {
    char key[96];
    const char *at, *dtype, *offsets;
    size_t begin, end, i, width;
    double *values;
    snprintf(key, sizeof key, "\"%s\":", name);
    if (!(at = strstr(file->header, key)) || !(dtype = strstr(at, "\"dtype\"")) || !(offsets = strstr(at, "\"data_offsets\"")))
        return NULL;
    if (sscanf(offsets, "\"data_offsets\": [%zu, %zu]", &begin, &end) != 2 &&
        sscanf(offsets, "\"data_offsets\":[%zu,%zu]", &begin, &end) != 2)
        return NULL;
    dtype += strlen("\"dtype\"");
    while (*dtype == ':' || *dtype == ' ' || *dtype == '"') dtype++;
    if (strncmp(dtype, "F64", 3) && strncmp(dtype, "F32", 3)) return NULL;
    width = strncmp(dtype, "F64", 3) == 0 ? 8 : 4;
    if (end > file->data_bytes || end < begin || (end - begin) % width) return NULL;
    *count = (end - begin) / width;
    values = (double *)malloc((*count ? *count : 1) * sizeof(double));
    for (i = 0; i < *count; i++) {
        if (width == 8) memcpy(&values[i], file->data + begin + 8 * i, 8);
        else {
            float f;
            memcpy(&f, file->data + begin + 4 * i, 4);
            values[i] = f;
        }
    }
    return values;
}

/* ---- the cases ----------------------------------------------------------------------------- */

typedef struct model_case {
    const char *name;
    fm_model_desc desc;
    int samples, training, class_weights;
} model_case;

typedef struct batch_data {
    float *features[FLEXMOE_MODEL_MAX_MODALITIES], *class_weights, *noise, *dropout[2];
    uint8_t *observed;
    int32_t *observed32, *labels, *combination;
    fm_model_batch batch;
} batch_data;

static void new_batch(const fm_model *model, const model_case *mc, batch_data *bd) {
    const fm_model_desc *c = &model->config;
    const int S = mc->samples, M = c->modalities, T = S * c->patches;
    int s, m, t, e;
    memset(bd, 0, sizeof *bd);
    bd->observed = (uint8_t *)malloc((size_t)S * M);
    bd->observed32 = (int32_t *)malloc((size_t)S * M * sizeof(int32_t));
    bd->labels = (int32_t *)malloc((size_t)S * sizeof(int32_t));
    bd->combination = (int32_t *)malloc((size_t)S * sizeof(int32_t));
    for (s = 0; s < S; s++) {
        uint32_t mask = s == 0 ? (1u << M) - 1 : 0; /* one full sample, the others random non-empty */
        while (!mask) mask = (uint32_t)fm_test_next() & ((1u << M) - 1);
        for (m = 0; m < M; m++) bd->observed[(size_t)s * M + m] = (uint8_t)((mask >> m) & 1u);
        for (m = 0; m < M; m++) bd->observed32[(size_t)s * M + m] = (mask >> m) & 1u;
        bd->labels[s] = fm_test_int(0, c->classes - 1);
        bd->combination[s] = fm_combination_index(M, mask);
    }
    for (m = 0; m < M; m++) {
        const size_t n = (size_t)S * c->features[m];
        size_t i;
        bd->features[m] = (float *)malloc(n * sizeof(float));
        for (i = 0; i < n; i++) bd->features[m][i] = (float)fm_test_normal();
        for (s = 0; s < S && c->imputation != FM_IMPUTE_FEATURES && c->imputation != FM_IMPUTE_TWO_STAGE; s++) /* a missing modality's row is never read: poison it */
            if (!bd->observed[(size_t)s * M + m])
                for (i = 0; i < (size_t)c->features[m]; i++) bd->features[m][(size_t)s * c->features[m] + i] = NAN;
    }
    bd->batch.samples = S;
    for (m = 0; m < M; m++) bd->batch.features[m] = bd->features[m];
    bd->batch.observed = bd->observed;
    bd->batch.labels = bd->labels;
    bd->batch.training = mc->training;
    bd->batch.seed = fm_test_next(), bd->batch.step = (uint64_t)fm_test_int(0, 1000);
    if (mc->class_weights) {
        bd->class_weights = (float *)malloc((size_t)c->classes * sizeof(float));
        for (e = 0; e < c->classes; e++) bd->class_weights[e] = (float)(0.25 + fm_test_uniform());
        bd->batch.class_weights = bd->class_weights;
    }
    bd->noise = (float *)malloc((size_t)M * T * c->experts * sizeof(float));
    for (m = 0; m < M; m++)
        for (t = 0; t < T; t++)
            for (e = 0; e < c->experts; e++)
                bd->noise[((size_t)m * T + t) * c->experts + e] = fm_gate_noise(fm_model_noise_seed(&bd->batch), (uint64_t)m * T + (uint64_t)t, e);
    if (mc->training && c->dropout > 0.0f) { /* the masks the model applies, for the reference */
        const size_t n = (size_t)T * M * c->dim;
        for (m = 0; m < 2; m++) {
            bd->dropout[m] = (float *)malloc(n * sizeof(float));
            FM_CHECK(fm_model_dropout_mask(model, &bd->batch, (fm_model_dropout_site)m, bd->dropout[m]) == FM_OK,
                     "%s: fm_model_dropout_mask", mc->name);
        }
        {
            const float keep = 1.0f / (1.0f - c->dropout);
            size_t i, dropped = 0, other = 0, same = 0;
            for (i = 0; i < n; i++) {
                dropped += bd->dropout[0][i] == 0.0f;
                other += bd->dropout[0][i] != 0.0f && bd->dropout[0][i] != keep;
                same += bd->dropout[0][i] == bd->dropout[1][i];
            }
            FM_CHECK(other == 0 && fabs((double)dropped / n - c->dropout) < 0.05 && same < n * 3 / 4,
                     "%s: the masks are not inverted dropout at %g, independent per site (%zu of %zu dropped)", mc->name,
                     (double)c->dropout, dropped, n);
        }
    }
}

static void free_batch(batch_data *bd) {
    int m;
    for (m = 0; m < FLEXMOE_MODEL_MAX_MODALITIES; m++) free(bd->features[m]);
    free(bd->class_weights), free(bd->noise), free(bd->observed), free(bd->observed32), free(bd->labels), free(bd->combination);
    free(bd->dropout[0]), free(bd->dropout[1]);
}

/* Runs the reference on the model's parameters and the batch; the output file's contents. */
static int run_reference(const fm_model *model, const model_case *mc, const batch_data *bd, st_file *out) {
    const fm_model_desc *c = &model->config;
    st_tensor tensors[FLEXMOE_MODEL_MAX_TENSORS + FLEXMOE_MODEL_MAX_MODALITIES + 8];
    char config[1024], in_path[256], out_path[256], command[1024], names[FLEXMOE_MODEL_MAX_MODALITIES][32];
    float *plain[2] = {NULL, NULL};
    int count = 0, i, m, used, ok, plain_used = 0;
    used = snprintf(config, sizeof config, "{\"modalities\": %d, \"features\": [", c->modalities);
    for (m = 0; m < c->modalities; m++) used += snprintf(config + used, sizeof config - used, "%s%d", m ? ", " : "", c->features[m]);
    snprintf(config + used, sizeof config - used,
             "], \"patches\": %d, \"dim\": %d, \"heads\": %d, \"experts\": %d, \"top_k\": %d, \"hidden\": %d, "
             "\"classes\": %d, \"gate_loss_weight\": %.9g, \"attention_residual\": %s, \"noise_epsilon\": 0.01, "
             "\"layernorm_eps\": %.9g, \"gate\": \"%s\", \"confidence_mode\": \"%s\", \"imputation\": \"%s\", "
             "\"impute_keep\": %.9g}",
             c->patches, c->dim, c->heads, c->experts, c->top_k, c->hidden, c->classes,
             c->gate_loss_weight > 0 ? c->gate_loss_weight : 0.0, c->no_attention_residual ? "false" : "true",
             c->layernorm_eps, c->gate == FM_GATE_CONFIDENCE ? "confidence" : "noisy",
             c->confidence == FM_CONF_EXPERT_MEAN ? "expert_mean" : "token",
             c->imputation == FM_IMPUTE_ZERO       ? "zero"
             : c->imputation == FM_IMPUTE_FEATURES ? "features"
             : c->imputation == FM_IMPUTE_TWO_STAGE ? "two_stage"
                                                    : "bank",
             (double)c->impute_keep);
    for (i = 0; i < model->tensor_count; i++) {
        const fm_tensor_info *t = &model->tensors[i];
        st_tensor *s = &tensors[count++];
        s->name = t->name, s->dtype = "F32", s->rank = t->rank;
        memcpy(s->shape, t->shape, sizeof s->shape);
        s->data = model->params + t->offset;
        if (t->packed) { /* files hold expert weights unpacked */
            plain[plain_used] = (float *)malloc((size_t)t->shape[0] * t->shape[1] * t->shape[2] * sizeof(float));
            fm_unpack_weights(t->shape[0], t->shape[1], t->shape[2], FM_WEIGHTS_IN_BY_OUT, model->params + t->offset,
                              plain[plain_used], t->shape[2]);
            s->data = plain[plain_used++];
        }
    }
    for (m = 0; m < c->modalities; m++) {
        st_tensor *s = &tensors[count++];
        snprintf(names[m], sizeof names[m], "input.features.%d", m);
        s->name = names[m], s->dtype = "F32", s->rank = 2, s->shape[0] = mc->samples, s->shape[1] = c->features[m];
        s->data = bd->features[m];
    }
    tensors[count++] = (st_tensor){"input.observed", "I32", 2, {mc->samples, c->modalities, 0, 0}, bd->observed32};
    tensors[count++] = (st_tensor){"input.labels", "I32", 1, {mc->samples, 0, 0, 0}, bd->labels};
    tensors[count++] = (st_tensor){"input.combination", "I32", 1, {mc->samples, 0, 0, 0}, bd->combination};
    if (bd->class_weights) tensors[count++] = (st_tensor){"input.class_weights", "F32", 1, {c->classes, 0, 0, 0}, bd->class_weights};
    if (mc->training)
        tensors[count++] = (st_tensor){"input.gate_noise", "F32", 3, {c->modalities, mc->samples * c->patches, c->experts, 0}, bd->noise};
    if (bd->dropout[0]) {
        tensors[count++] = (st_tensor){"input.dropout.attention", "F32", 3, {mc->samples, c->modalities * c->patches, c->dim, 0},
                                       bd->dropout[0]};
        tensors[count++] = (st_tensor){"input.dropout.moe", "F32", 3, {c->modalities, mc->samples * c->patches, c->dim, 0},
                                       bd->dropout[1]};
    }
    snprintf(in_path, sizeof in_path, "/tmp/flexmoe_test_model_%d_in.safetensors", (int)getpid());
    snprintf(out_path, sizeof out_path, "/tmp/flexmoe_test_model_%d_out.safetensors", (int)getpid());
    ok = st_write(in_path, tensors, count, config);
    for (i = 0; i < plain_used; i++) free(plain[i]);
    FM_CHECK(ok, "%s: cannot write %s", mc->name, in_path);
    if (!ok) return 0;
    snprintf(command, sizeof command, "/usr/bin/python3 %s/tests/model_reference.py %s %s", FM_TEST_SOURCE_ROOT, in_path, out_path);
    ok = system(command) == 0;
    FM_CHECK(ok, "%s: the PyTorch reference failed (%s)", mc->name, command);
    ok = ok && st_read(out_path, out);
    FM_CHECK(ok, "%s: cannot read the reference's %s", mc->name, out_path);
    remove(in_path);
    remove(out_path);
    return ok;
}

/* max |got - want| / max |want| over n values, NaN-aware (a NaN anywhere fails). */
static double relative_error(const float *got, const double *want, size_t n) {
    double scale = 0.0, worst = 0.0;
    size_t i;
    for (i = 0; i < n; i++)
        if (fabs(want[i]) > scale) scale = fabs(want[i]);
    for (i = 0; i < n; i++) {
        const double e = fabs((double)got[i] - want[i]);
        if (!(e <= worst)) worst = e; /* NaN sticks */
    }
    return scale > 0.0 ? worst / scale : worst;
}

/* The reference, with stage 2 (two-stage imputation) kept well conditioned. At initialisation the
 * expert outputs are tiny and stage 2's attention nearly uniform, so its kept fraction is decided by
 * differences below float rounding and a float model cannot keep what the double reference keeps.
 * So: expert outputs of order 1 (moe.b2), zero-padded patches apart (position), queries sqrt(dim)
 * times sharper (scores of order 1 and more);
 * then up to 8 draws until the reference's out.impute_margin (the relative gap at the kept sets'
 * edges) is 1e-5 or more, ten times float's rounding of the weights, like test_layer keeps routing
 * away from ties. */
static int run_reference_conditioned(fm_model *model, const model_case *mc, const batch_data *bd, st_file *out) {
    const fm_tensor_info *b2 = fm_model_tensor(model, "moe.b2"), *wq = fm_model_tensor(model, "moe.impute.q.weight");
    const fm_tensor_info *position = fm_model_tensor(model, "position");
    double margin = 0.0, *value;
    size_t j, n;
    int attempt;
    if (model->config.imputation != FM_IMPUTE_TWO_STAGE) return run_reference(model, mc, bd, out);
    for (j = 0; j < wq->floats; j++) model->params[wq->offset + j] *= sqrtf((float)model->config.dim);
    for (attempt = 0; attempt < 8; attempt++) {
        for (j = 0; j < b2->floats; j++) model->params[b2->offset + j] = (float)fm_test_normal();
        for (j = 0; j < position->floats; j++) model->params[position->offset + j] = (float)fm_test_normal();
        if (!run_reference(model, mc, bd, out)) return 0;
        value = st_get(out, "out.impute_margin", &n);
        margin = value && n == 1 ? value[0] : 0.0;
        free(value);
        if (margin >= 1e-5) return 1;
        free(out->header), free(out->data);
    }
    FM_CHECK(0, "%s: no problem in 8 draws whose stage-2 kept sets are 1e-5 (relative) from changing (last %.3g)",
             mc->name, margin);
    return 0;
}

static void compare_case(const model_case *mc, fm_isa isa) {
    fm_model model;
    batch_data bd;
    st_file ref;
    fm_model_losses losses;
    float *logits;
    size_t n;
    double *want, err, worst = 0.0;
    int i;
    fm_test_context = fm_isa_name(isa);
    FM_CHECK(fm_model_create(&mc->desc, mc->samples, &model) == FM_OK, "%s: create", mc->name);
    FM_CHECK(fm_model_init(&model, 1234) == FM_OK, "%s: init", mc->name);
    new_batch(&model, mc, &bd);
    logits = (float *)malloc((size_t)mc->samples * model.config.classes * sizeof(float));
    /* the reference on this case's parameters and batch (the same on every path) */
    if (!run_reference_conditioned(&model, mc, &bd, &ref)) {
        free(logits), free_batch(&bd), fm_model_destroy(&model);
        return;
    }
    fm_test_use_isa(isa);
    FM_CHECK(fm_model_forward(&model, &bd.batch, logits, &losses) == FM_OK, "%s: forward", mc->name);
    FM_CHECK(fm_model_backward(&model, &bd.batch) == FM_OK, "%s: backward", mc->name);
    want = st_get(&ref, "out.logits", &n);
    FM_CHECK(want && n == (size_t)mc->samples * model.config.classes, "%s: out.logits", mc->name);
    if (want) {
        err = relative_error(logits, want, n);
        FM_CHECK(err <= MODEL_TOLERANCE, "%s: logits off by %.3g of the largest", mc->name, err);
        free(want);
    }
    {
        const char *names[5] = {"out.loss", "out.task_loss", "out.gate_loss", "out.confidence_loss", "out.probe_loss"};
        const float got[5] = {losses.loss, losses.task, losses.gate, losses.confidence, losses.probe};
        for (i = 0; i < 5; i++) {
            want = st_get(&ref, names[i], &n);
            FM_CHECK(want && n == 1, "%s: %s missing", mc->name, names[i]);
            if (want) {
                err = fabs(got[i] - want[0]) / (fabs(want[0]) > 1e-3 ? fabs(want[0]) : 1e-3);
                FM_CHECK(err <= MODEL_TOLERANCE, "%s: %s %.7g, reference %.7g", mc->name, names[i], got[i], want[0]);
                free(want);
            }
        }
    }
    for (i = 0; i < model.tensor_count; i++) {
        const fm_tensor_info *t = &model.tensors[i];
        char name[64];
        const size_t plain_n = t->packed ? (size_t)t->shape[0] * t->shape[1] * t->shape[2] : t->floats;
        float *got = model.grads + t->offset, *unpacked = NULL;
        snprintf(name, sizeof name, "grad.%s", t->name);
        want = st_get(&ref, name, &n);
        FM_CHECK(want && n == plain_n, "%s: %s missing or of %zu values, not %zu", mc->name, name, want ? n : 0, plain_n);
        if (!want || n != plain_n) {
            free(want);
            continue;
        }
        if (t->packed) {
            unpacked = (float *)malloc(plain_n * sizeof(float));
            fm_unpack_weights(t->shape[0], t->shape[1], t->shape[2], FM_WEIGHTS_IN_BY_OUT, got, unpacked, t->shape[2]);
            got = unpacked;
        }
        err = relative_error(got, want, n);
        FM_CHECK(err <= MODEL_TOLERANCE, "%s: %s off by %.3g of its largest value", mc->name, name, err);
        if (!(err <= worst)) worst = err;
        free(unpacked);
        free(want);
    }
    printf("%-32s %-7s the worst gradient is off by %.2g of its largest value\n", mc->name, fm_isa_name(isa), worst);
    free(ref.header), free(ref.data);
    free(logits);
    free_batch(&bd);
    fm_model_destroy(&model);
}

/* ---- the rest of the API ------------------------------------------------------------------- */

static void check_combinations(void) {
    /* DESIGN.md's example for M = 4 */
    static const uint32_t m4[15] = {0xF, 0x7, 0xB, 0xD, 0xE, 0x3, 0x5, 0x9, 0x6, 0xA, 0xC, 0x1, 0x2, 0x4, 0x8};
    int i, M;
    fm_test_context = "combinations";
    for (i = 0; i < 15; i++) {
        FM_CHECK(fm_combination_index(4, m4[i]) == i, "index of mask 0x%X is %d, not %d", m4[i], fm_combination_index(4, m4[i]), i);
        FM_CHECK(fm_combination_mask(4, i) == m4[i], "mask of index %d", i);
    }
    for (M = 1; M <= 8; M++) {
        int seen[255] = {0}, distinct = 1;
        uint32_t mask;
        FM_CHECK(fm_combination_count(M) == (1 << M) - 1, "count for M = %d", M);
        for (mask = 1; mask < (1u << M); mask++) {
            const int index = fm_combination_index(M, mask);
            if (index < 0 || index >= (1 << M) - 1 || seen[index]++) distinct = 0;
        }
        FM_CHECK(distinct, "M = %d: the indices are not a permutation", M);
    }
    FM_CHECK(fm_combination_index(3, 0) == -1 && fm_combination_index(3, 8) == -1 && fm_combination_index(0, 1) == -1,
             "invalid masks");
    FM_CHECK(fm_combination_mask(3, 7) == 0 && fm_combination_mask(3, -1) == 0, "invalid indices");
}

static void check_model_api(void) {
    fm_model_desc desc;
    fm_model model, again;
    const fm_tensor_info *t;
    int i, ordered = 1, aligned = 1, same = 1;
    size_t j;
    fm_test_context = "api";
    memset(&desc, 0, sizeof desc);
    desc.modalities = 6, desc.classes = 10;
    for (i = 0; i < 6; i++) desc.features[i] = 40 + 37 * i;
    FM_CHECK(fm_model_create(&desc, 16, &model) == FM_OK, "create with the defaults");
    FM_CHECK(model.config.dim == 128 && model.config.patches == 16 && model.config.heads == 4 && model.config.experts == 16 &&
                 model.config.top_k == 4 && model.config.hidden == 256 && model.config.dropout == 0.5f &&
                 model.config.gate_loss_weight == 0.01f && !model.config.no_attention_residual,
             "the defaults are the reference's");
    FM_CHECK(model.tensor_count == 2 * 6 + 18, "%d tensors", model.tensor_count);
    for (i = 0; i < model.tensor_count; i++) {
        if (model.tensors[i].offset % 16) aligned = 0;
        if (i && model.tensors[i].offset < model.tensors[i - 1].offset + model.tensors[i - 1].floats) ordered = 0;
    }
    FM_CHECK(aligned && ordered, "tensors 64-byte aligned and disjoint");
    FM_CHECK(((uintptr_t)model.params | (uintptr_t)model.grads | (uintptr_t)model.adam_m | (uintptr_t)model.adam_v) % 64 == 0,
             "arenas 64-byte aligned");
    t = fm_model_tensor(&model, "bank");
    FM_CHECK(t && t->rank == 4 && t->shape[0] == 63 && t->shape[1] == 6 && t->shape[2] == 16 && t->shape[3] == 128, "bank's shape");
    t = fm_model_tensor(&model, "encoder.2.weight");
    FM_CHECK(t && t->shape[0] == (40 + 74 + 15) / 16 && t->shape[1] == 128, "encoder 2's patch width");
    FM_CHECK(fm_model_tensor(&model, "moe.w1") && fm_model_tensor(&model, "moe.w1")->packed, "moe.w1 packed");
    FM_CHECK(!fm_model_tensor(&model, "nothing"), "unknown name");
    FM_CHECK(fm_model_init(&model, 99) == FM_OK, "init");
    FM_CHECK(fm_model_create(&desc, 16, &again) == FM_OK && fm_model_init(&again, 99) == FM_OK, "a second model");
    for (j = 0; j < model.param_floats; j++)
        if (memcmp(&model.params[j], &again.params[j], sizeof(float))) same = 0;
    FM_CHECK(same, "the same seed gives the same parameters");
    {
        const fm_tensor_info *bank = fm_model_tensor(&model, "bank"), *pos = fm_model_tensor(&model, "position");
        const fm_tensor_info *q = fm_model_tensor(&model, "attention.q.weight");
        double mean = 0.0, var = 0.0, qmax = 0.0;
        int zero = 1;
        for (j = 0; j < bank->floats; j++) mean += model.params[bank->offset + j];
        mean /= (double)bank->floats;
        for (j = 0; j < bank->floats; j++) var += pow(model.params[bank->offset + j] - mean, 2);
        var /= (double)bank->floats;
        FM_CHECK(fabs(mean) < 0.02 && fabs(var - 1.0) < 0.03, "bank ~ N(0, 1): mean %.4f, variance %.4f", mean, var);
        for (j = 0; j < pos->floats; j++)
            if (model.params[pos->offset + j] != 0.0f) zero = 0;
        FM_CHECK(zero, "position starts at zero");
        for (j = 0; j < q->floats; j++) qmax = fmax(qmax, fabs(model.params[q->offset + j]));
        FM_CHECK(qmax <= 1.0 / sqrt(128.0) && qmax > 0.9 / sqrt(128.0), "q ~ U(+-1/sqrt(dim)): max %.4f", qmax);
    }
    fm_model_destroy(&again);
    fm_model_destroy(&model);
    fm_model_destroy(&model); /* destroying twice is harmless */
    {
        fm_model_desc bad = desc;
        bad.modalities = 9;
        FM_CHECK(fm_model_create(&bad, 4, &model) == FM_ERR_INVALID_ARGUMENT && !model.params, "9 modalities");
        bad = desc, bad.classes = 1;
        FM_CHECK(fm_model_create(&bad, 4, &model) == FM_ERR_INVALID_ARGUMENT, "1 class");
        bad = desc, bad.heads = 5;
        FM_CHECK(fm_model_create(&bad, 4, &model) == FM_ERR_INVALID_ARGUMENT, "heads not dividing dim");
        bad = desc, bad.features[3] = 0;
        FM_CHECK(fm_model_create(&bad, 4, &model) == FM_ERR_INVALID_ARGUMENT, "a modality without features");
        bad = desc, bad.dropout = 1.0f;
        FM_CHECK(fm_model_create(&bad, 4, &model) == FM_ERR_INVALID_ARGUMENT, "dropout 1");
        FM_CHECK(fm_model_create(&desc, 0, &model) == FM_ERR_INVALID_SHAPE, "no samples");
        FM_CHECK(fm_model_create(NULL, 4, &model) == FM_ERR_NULL_POINTER, "NULL desc");
    }
    {
        fm_model small;
        fm_model_desc d;
        fm_model_batch b;
        float f[4] = {1, 2, 3, 4};
        uint8_t observed[2] = {0, 0};
        int32_t label = 0;
        memset(&d, 0, sizeof d);
        d.modalities = 2, d.features[0] = d.features[1] = 2, d.classes = 2, d.dim = 8, d.heads = 2, d.experts = 2, d.top_k = 1;
        FM_CHECK(fm_model_create(&d, 1, &small) == FM_OK && fm_model_init(&small, 1) == FM_OK, "a small model");
        memset(&b, 0, sizeof b);
        b.samples = 1, b.features[0] = f, b.features[1] = f, b.observed = observed, b.labels = &label;
        FM_CHECK(fm_model_forward(&small, &b, NULL, NULL) == FM_ERR_INVALID_ARGUMENT, "a sample without a modality");
        observed[0] = 1, label = 2;
        FM_CHECK(fm_model_forward(&small, &b, NULL, NULL) == FM_ERR_INVALID_ARGUMENT, "a label out of range");
        label = 1, b.samples = 2;
        FM_CHECK(fm_model_forward(&small, &b, NULL, NULL) == FM_ERR_INVALID_SHAPE, "more samples than max_samples");
        b.samples = 1, b.features[0] = NULL;
        FM_CHECK(fm_model_forward(&small, &b, NULL, NULL) == FM_ERR_NULL_POINTER, "an observed modality without features");
        b.features[0] = f;
        FM_CHECK(fm_model_backward(&small, &b) == FM_ERR_INVALID_ARGUMENT, "a backward without its forward");
        FM_CHECK(fm_model_forward(&small, &b, NULL, NULL) == FM_OK && fm_model_backward(&small, &b) == FM_OK, "a valid step");
        fm_model_destroy(&small);
    }
}

/* One Adam step from the same state on every path this machine runs: the scalar path's bits. */
static void check_adam_paths(fm_model *model, const fm_adam_desc *adam) {
    const size_t bytes = model->param_floats * sizeof(float);
    const fm_isa active = fm_active_isa();
    float *start[3], *want[3];
    float *const arenas[3] = {model->params, model->adam_m, model->adam_v};
    int a, isa, same = 1, paths = 0;
    for (a = 0; a < 3; a++) {
        start[a] = (float *)malloc(bytes), want[a] = (float *)malloc(bytes);
        memcpy(start[a], arenas[a], bytes);
    }
    for (isa = FM_ISA_SCALAR; isa < FM_ISA_COUNT; isa++) {
        if (!fm_isa_supported((fm_isa)isa) || fm_set_isa((fm_isa)isa) != FM_OK) continue;
        for (a = 0; a < 3; a++) memcpy(arenas[a], start[a], bytes);
        FM_CHECK(fm_model_adam_step(model, adam, 5) == FM_OK, "step on %s", fm_isa_name((fm_isa)isa));
        for (a = 0; a < 3; a++) {
            if (isa == FM_ISA_SCALAR) memcpy(want[a], arenas[a], bytes);
            else same &= memcmp(want[a], arenas[a], bytes) == 0;
        }
        paths++;
    }
    FM_CHECK(same && paths >= 1, "Adam on %d paths: every path gives the scalar path's bits", paths);
    fm_set_isa(active);
    for (a = 0; a < 3; a++) free(start[a]), free(want[a]);
}

/* Adam against the formula in double over three steps, its argument checks, a refused
 * non-finite gradient, and a model that learns a fixed batch. */
static void check_adam(void) {
    fm_model_desc desc;
    fm_model model;
    fm_adam_desc adam;
    double *p, *m, *v;
    size_t i, n;
    int step, ok = 1;
    fm_test_context = "adam";
    memset(&desc, 0, sizeof desc);
    desc.modalities = 2, desc.features[0] = 9, desc.features[1] = 30, desc.classes = 3, desc.dim = 16, desc.experts = 4;
    desc.top_k = 2, desc.dropout = -1;
    FM_CHECK(fm_model_create(&desc, 8, &model) == FM_OK && fm_model_init(&model, 5) == FM_OK, "create");
    n = model.param_floats;
    p = (double *)malloc(n * sizeof(double)), m = (double *)calloc(n, sizeof(double)), v = (double *)calloc(n, sizeof(double));
    for (i = 0; i < n; i++) p[i] = model.params[i];
    memset(&adam, 0, sizeof adam);
    adam.lr = 0.01f, adam.weight_decay = 0.1f;
    for (step = 1; step <= 3; step++) {
        const double c1 = 1.0 - pow(0.9, step), c2 = 1.0 - pow(0.999, step);
        for (i = 0; i < n; i++) { /* a gradient on every tensor element, none on the padding */
            model.grads[i] = 0.0f;
        }
        for (i = 0; i < (size_t)model.tensor_count; i++) {
            const fm_tensor_info *t = &model.tensors[i];
            size_t j;
            for (j = 0; j < t->floats; j++) model.grads[t->offset + j] = t->packed ? 0.0f : (float)fm_test_normal();
        }
        FM_CHECK(fm_model_adam_step(&model, &adam, step) == FM_OK, "step %d", step);
        for (i = 0; i < n; i++) {
            const double g = model.grads[i] + 0.1 * p[i];
            m[i] = 0.9 * m[i] + 0.1 * g, v[i] = 0.999 * v[i] + 0.001 * g * g;
            p[i] -= 0.01 * (m[i] / c1) / (sqrt(v[i] / c2) + 1e-8);
            if (!(fabs(p[i] - model.params[i]) <= 1e-5 * (1.0 + fabs(p[i])))) ok = 0;
        }
    }
    FM_CHECK(ok, "three steps of Adam differ from the formula in double");
    {
        float *before = (float *)malloc(n * sizeof(float));
        memcpy(before, model.params, n * sizeof(float));
        model.grads[model.tensors[3].offset + 1] = NAN;
        FM_CHECK(fm_model_adam_step(&model, &adam, 4) == FM_ERR_INVALID_ARGUMENT, "a NaN gradient is refused");
        model.grads[model.tensors[3].offset + 1] = INFINITY;
        FM_CHECK(fm_model_adam_step(&model, &adam, 4) == FM_ERR_INVALID_ARGUMENT, "an infinite gradient is refused");
        FM_CHECK(memcmp(before, model.params, n * sizeof(float)) == 0, "a refused step changed the parameters");
        free(before);
        model.grads[model.tensors[3].offset + 1] = 0.0f;
        model.grads[n - 1] = NAN; /* the padding's last float: the vectors' tail */
        FM_CHECK(fm_model_adam_step(&model, &adam, 4) == FM_ERR_INVALID_ARGUMENT, "a NaN in the arena's last float is refused");
        model.grads[n - 1] = 0.0f;
        check_adam_paths(&model, &adam);
        adam.beta1 = 1.0f;
        FM_CHECK(fm_model_adam_step(&model, &adam, 4) == FM_ERR_INVALID_ARGUMENT, "beta1 = 1");
        adam.beta1 = 0.0f;
        FM_CHECK(fm_model_adam_step(&model, &adam, 0) == FM_ERR_INVALID_ARGUMENT, "step 0");
    }
    { /* thirty steps on one batch at lr 3e-3: the model fits it */
        float f0[8 * 9], f1[8 * 30];
        uint8_t observed[16];
        int32_t labels[8];
        fm_model_batch b;
        fm_model_losses first, last;
        memset(&adam, 0, sizeof adam);
        adam.lr = 3e-3f;
        FM_CHECK(fm_model_init(&model, 6) == FM_OK, "init again");
        for (i = 0; i < 8 * 9; i++) f0[i] = (float)fm_test_normal();
        for (i = 0; i < 8 * 30; i++) f1[i] = (float)fm_test_normal();
        for (i = 0; i < 8; i++) {
            observed[2 * i] = i % 3 != 1, observed[2 * i + 1] = i % 3 != 2;
            labels[i] = (int32_t)(i % 3);
        }
        memset(&b, 0, sizeof b);
        b.samples = 8, b.features[0] = f0, b.features[1] = f1, b.observed = observed, b.labels = labels, b.training = 1;
        for (step = 1; step <= 30; step++) {
            b.step = (uint64_t)step;
            FM_CHECK(fm_model_forward(&model, &b, NULL, step == 1 ? &first : &last) == FM_OK &&
                         fm_model_backward(&model, &b) == FM_OK && fm_model_adam_step(&model, &adam, step) == FM_OK,
                     "training step %d", step);
        }
        FM_CHECK(last.task < 0.5 * first.task, "thirty Adam steps on one batch: task loss %.4f -> %.4f", first.task, last.task);
    }
    free(p), free(m), free(v);
    fm_model_destroy(&model);
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    int n, i, c;
    model_case cases[11];
    const char *given = getenv("FLEXMOE_TEST_SEED");
    fm_test_rng_state = given ? strtoull(given, NULL, 0) : 20261201u;
    printf("test_model: seed %llu (FLEXMOE_TEST_SEED changes it)\n", (unsigned long long)fm_test_rng_state);
    memset(cases, 0, sizeof cases);
    /* the acceptance's small configuration: M = 3, d = 16, 4 experts; training gate, class weights */
    cases[0].name = "M3-d16-E4", cases[0].samples = 6, cases[0].training = 1, cases[0].class_weights = 1;
    cases[0].desc.modalities = 3, cases[0].desc.features[0] = 5, cases[0].desc.features[1] = 20, cases[0].desc.features[2] = 33;
    cases[0].desc.classes = 3, cases[0].desc.dim = 16, cases[0].desc.experts = 4, cases[0].desc.top_k = 2, cases[0].desc.dropout = -1;
    /* the same without the attention residual (the official code's) and with the inference gate */
    cases[1] = cases[0];
    cases[1].name = "M3-d16-E4-no-residual-inference", cases[1].training = 0, cases[1].class_weights = 0;
    cases[1].desc.no_attention_residual = 1;
    /* the reference's sizes: six views (the handwritten digits' feature counts), d 128, 16 experts, top-4 */
    cases[2].name = "M6-d128-E16", cases[2].samples = 4, cases[2].training = 1;
    cases[2].desc.modalities = 6, cases[2].desc.classes = 10, cases[2].desc.dropout = -1;
    {
        static const int views[6] = {76, 216, 64, 240, 47, 6};
        for (i = 0; i < 6; i++) cases[2].desc.features[i] = views[i];
    }
    /* the first with dropout 0.5 on: its masks (fm_model_dropout_mask) go to the reference */
    cases[3] = cases[0];
    cases[3].name = "M3-d16-E4-dropout", cases[3].desc.dropout = 0.0f;
    /* eight modalities, the most a model takes (255 combinations, 34 tensors) */
    cases[4].name = "M8-d16-E4", cases[4].samples = 5, cases[4].training = 1;
    cases[4].desc.modalities = 8, cases[4].desc.classes = 4, cases[4].desc.dim = 16, cases[4].desc.experts = 4;
    cases[4].desc.top_k = 2, cases[4].desc.dropout = -1;
    for (i = 0; i < 8; i++) cases[4].desc.features[i] = 3 + 5 * i;
    /* ConfSMoE's gate: per-token confidence with zero imputation and dropout, and the experts' mean
     * confidence with the bank and a larger weight on the S-Router term */
    cases[5] = cases[3];
    cases[5].name = "M3-d16-E4-confidence-token-zero", cases[5].desc.gate = FM_GATE_CONFIDENCE;
    cases[5].desc.imputation = FM_IMPUTE_ZERO;
    cases[6] = cases[0];
    cases[6].name = "M3-d16-E4-confidence-expert-mean", cases[6].desc.gate = FM_GATE_CONFIDENCE;
    cases[6].desc.confidence = FM_CONF_EXPERT_MEAN, cases[6].desc.gate_loss_weight = 0.3f;
    /* ConfSMoE's first imputation stage: the missing modalities' (imputed) features encoded */
    cases[7] = cases[5];
    cases[7].name = "M3-d16-E4-confidence-features", cases[7].desc.imputation = FM_IMPUTE_FEATURES;
    /* ConfSMoE's two stages: with its gate and dropout; with the noisy gate and a third of the
     * weights kept; at the reference's sizes (six views: up to 5 * 16 * 4 = 320 keys a token) */
    cases[8] = cases[5];
    cases[8].name = "M3-d16-E4-confidence-two-stage", cases[8].desc.imputation = FM_IMPUTE_TWO_STAGE;
    cases[9] = cases[0];
    cases[9].name = "M3-d16-E4-noisy-two-stage", cases[9].desc.imputation = FM_IMPUTE_TWO_STAGE;
    cases[9].desc.impute_keep = 1.0f / 3.0f;
    cases[10] = cases[2];
    cases[10].name = "M6-d128-E16-confidence-two-stage", cases[10].desc.gate = FM_GATE_CONFIDENCE, cases[10].samples = 3;
    cases[10].desc.imputation = FM_IMPUTE_TWO_STAGE;
    check_combinations();
    check_model_api();
    check_adam();
    n = fm_test_isas(isas);
    for (c = 0; c < (int)(sizeof cases / sizeof *cases); c++)
        for (i = 0; i < n; i++) {
            const uint64_t state = fm_test_rng_state;
            compare_case(&cases[c], isas[i]);
            if (i + 1 < n) fm_test_rng_state = state; /* the same parameters and batch on every path */
        }
    {
        char command[512];
        snprintf(command, sizeof command, "/usr/bin/python3 %s/tests/model_reference.py --selftest >/dev/null",
                 FM_TEST_SOURCE_ROOT);
        fm_test_context = "reference";
        FM_CHECK(system(command) == 0, "the reference's own finite-difference check failed (%s)", command);
    }
    return fm_test_finish("test_model");
}
