/* Training and evaluation (fm_model_train, fm_model_evaluate) on a synthetic three-view dataset
 * whose classes need the views together: the model learns it; two runs of the same seed end
 * with the same weights, bit for bit; a callback stops a run; a diverging run stops at the first
 * non-finite loss or gradient with finite weights; a run saved by on_epoch, killed and resumed
 * from its checkpoint ends with the weights of the uninterrupted run, bit for bit; the metrics
 * equal an independent O(n^2) computation (pairwise AUC, confusion-matrix F1) from the model's
 * own logits. */
#include "fm_test.h"

enum { SAMPLES = 600, CLASSES = FM_TEST_CLASSES, VIEWS = FM_TEST_VIEWS };
#define view_features fm_test_view_features

static fm_model_desc small_desc(void) {
    fm_model_desc d;
    int v;
    memset(&d, 0, sizeof d);
    d.modalities = VIEWS, d.classes = CLASSES, d.dim = 16, d.patches = 4, d.heads = 2, d.experts = 4, d.top_k = 2;
    d.dropout = 0.1f;
    for (v = 0; v < VIEWS; v++) d.features[v] = view_features[v];
    return d;
}

typedef struct counter {
    int steps, epochs, stop_after;
} counter;

/* on_epoch of the interrupted run: a checkpoint after every epoch, a stop after stop_epoch. */
typedef struct saver {
    const char *path;
    int stop_epoch, saved;
} saver;

static int save_epoch(const fm_train_progress *p, void *user) {
    saver *s = (saver *)user;
    s->saved += fm_model_save(p->model, s->path) == FM_OK;
    return p->epoch == s->stop_epoch;
}

/* Ten epochs straight, against four, a checkpoint, a fresh process's load and the other six:
 * the same final weights, the same best epoch, the same Adam state. */
static void check_resume(const fm_dataset *ds, const int32_t *order, int train, int validation, const fm_model *straight,
                         const fm_train_desc *straight_desc, const fm_train_result *straight_result) {
    char path[64];
    fm_model first, resumed;
    fm_model_desc desc = small_desc();
    fm_train_desc td = *straight_desc;
    fm_train_result result;
    saver s;
    snprintf(path, sizeof path, "/tmp/flexmoe_test_train_%d.safetensors", (int)getpid());
    s.path = path, s.stop_epoch = 4, s.saved = 0;
    FM_CHECK(fm_model_create(&desc, 16, &first) == FM_OK && fm_model_init(&first, 9) == FM_OK, "model");
    td.on_step = NULL, td.on_epoch = save_epoch, td.user_data = &s;
    FM_CHECK(fm_model_train(&first, ds, order, train, order + train, validation, &td, &result) == FM_OK && result.stopped &&
                 result.epochs_run == 4 && s.saved == 4,
             "the interrupted run stops after epoch %d with %d checkpoints", result.epochs_run, s.saved);
    fm_model_destroy(&first);
    FM_CHECK(fm_model_load(path, 16, &resumed) == FM_OK, "load the checkpoint of epoch 4");
    FM_CHECK(resumed.trained.epoch == 4 && resumed.trained.step == 4 * ((train + 15) / 16) && resumed.trained.seed == td.seed,
             "its training state: epoch %d, step %lld", resumed.trained.epoch, (long long)resumed.trained.step);
    td.on_epoch = NULL;
    FM_CHECK(fm_model_train(&resumed, ds, order, train, order + train, validation, &td, &result) == FM_OK &&
                 result.epochs_run == 10 && result.steps == straight_result->steps,
             "the resumed run ends at epoch %d, step %lld", result.epochs_run, (long long)result.steps);
    FM_CHECK(result.best_epoch == straight_result->best_epoch &&
                 result.best_validation.accuracy == straight_result->best_validation.accuracy,
             "best epoch %d (straight: %d)", result.best_epoch, straight_result->best_epoch);
    FM_CHECK(memcmp(resumed.params, straight->params, straight->param_floats * sizeof(float)) == 0 &&
                 memcmp(resumed.adam_m, straight->adam_m, straight->param_floats * sizeof(float)) == 0 &&
                 memcmp(resumed.adam_v, straight->adam_v, straight->param_floats * sizeof(float)) == 0,
             "the resumed run's weights and Adam moments differ from the uninterrupted run's");
    fm_model_destroy(&resumed);
    remove(path);
}

static int count_step(const fm_train_progress *p, void *user) {
    counter *c = (counter *)user;
    (void)p;
    return ++c->steps == c->stop_after;
}

static int count_epoch(const fm_train_progress *p, void *user) {
    counter *c = (counter *)user;
    FM_CHECK(p->validation.samples > 0 && p->best_epoch >= 1 && p->best_epoch <= p->epoch, "epoch %d's progress", p->epoch);
    c->epochs++;
    return 0;
}

/* The metrics from scratch: pairwise AUC (a tie counts a half), F1 from the confusion matrix. */
static void check_metrics(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count) {
    fm_metrics got;
    float *logits = (float *)malloc((size_t)count * CLASSES * sizeof(float));
    int i, c, correct = 0, f1_classes = 0, auc_classes = 0;
    double f1 = 0.0, auc = 0.0;
    FM_CHECK(fm_model_evaluate(model, ds, rows, count, &got) == FM_OK, "evaluate");
    for (i = 0; i < count; i += model->max_samples) {
        const int n = count - i < model->max_samples ? count - i : model->max_samples;
        float features[VIEWS][64 * 6];
        uint8_t observed[64 * VIEWS];
        fm_model_batch b;
        int k, v;
        memset(&b, 0, sizeof b);
        for (k = 0; k < n; k++) {
            memcpy(observed + k * VIEWS, ds->observed + rows[i + k] * VIEWS, VIEWS);
            for (v = 0; v < VIEWS; v++)
                memcpy(features[v] + k * view_features[v], ds->values[v] + (size_t)rows[i + k] * view_features[v],
                       (size_t)view_features[v] * sizeof(float));
        }
        b.samples = n, b.observed = observed;
        for (v = 0; v < VIEWS; v++) b.features[v] = features[v];
        FM_CHECK(fm_model_forward(model, &b, logits + (size_t)i * CLASSES, NULL) == FM_OK, "forward");
    }
    for (c = 0; c < CLASSES; c++) {
        int tp = 0, fp = 0, fn = 0, j;
        double pairs = 0.0, wins = 0.0;
        for (i = 0; i < count; i++) {
            int best = 0, k;
            const int label = ds->labels[rows[i]];
            for (k = 1; k < CLASSES; k++)
                if (logits[i * CLASSES + k] > logits[i * CLASSES + best]) best = k;
            if (c == 0) correct += best == label;
            tp += best == c && label == c, fp += best == c && label != c, fn += best != c && label == c;
        }
        if (tp + fp + fn) f1 += 2.0 * tp / (2.0 * tp + fp + fn), f1_classes++;
        for (i = 0; i < count; i++) /* the class's softmax probability ranks as its logit minus the log-sum */
            for (j = 0; j < count; j++) {
                double si = 0.0, sj = 0.0;
                int k;
                if (ds->labels[rows[i]] != c || ds->labels[rows[j]] == c) continue;
                for (k = 0; k < CLASSES; k++) si += exp(logits[i * CLASSES + k] - logits[i * CLASSES + c]);
                for (k = 0; k < CLASSES; k++) sj += exp(logits[j * CLASSES + k] - logits[j * CLASSES + c]);
                pairs += 1.0;
                wins += (float)(1.0 / si) > (float)(1.0 / sj) ? 1.0 : (float)(1.0 / si) == (float)(1.0 / sj) ? 0.5 : 0.0;
            }
        if (pairs > 0) auc += wins / pairs, auc_classes++;
    }
    FM_CHECK(fabs(got.accuracy - (double)correct / count) < 1e-6, "accuracy %g, want %g", got.accuracy, (double)correct / count);
    FM_CHECK(fabs(got.macro_f1 - f1 / f1_classes) < 1e-5, "macro-F1 %g, want %g", got.macro_f1, f1 / f1_classes);
    FM_CHECK(fabs(got.macro_auc - auc / auc_classes) < 2e-3, "macro AUC %g, want %g", got.macro_auc, auc / auc_classes);
    FM_CHECK(got.samples == count && got.loss > 0.0f, "samples and loss");
    free(logits);
}

/* The routing report of a trained model: counts that add up, shares that are shares, the CV and
 * entropy of its own load; then a router with zero weights, whose ties send every token to experts
 * 0 and 1 (top-2 of 4): loads 1/2, 1/2, 0, 0, CV 1, normalised entropy ln 2 / ln 4 = 1/2. */
static void check_routing(fm_model *model, const fm_dataset *ds, const int32_t *rows, int count) {
    const int E = model->config.experts, K = model->config.top_k, combos = fm_combination_count(VIEWS);
    const int64_t tokens = (int64_t)count * VIEWS * model->config.patches;
    float load[4], share[7 * 4], *gate = model->params + fm_model_tensor(model, "moe.gate.weight")->offset;
    int64_t per_combination[7], sum_tokens = 0;
    double sum = 0.0, mean, variance = 0.0, entropy = 0.0;
    fm_routing_report r;
    int c, e, rows_ok = 1;
    fm_test_context = "routing";
    memset(&r, 0, sizeof r);
    r.load = load, r.share = share, r.combination_tokens = per_combination;
    FM_CHECK(fm_model_routing(model, ds, rows, count, &r) == FM_OK, "fm_model_routing");
    FM_CHECK(r.assignments == tokens * K, "%lld assignments, want %lld", (long long)r.assignments, (long long)(tokens * K));
    for (c = 0; c < combos; c++) {
        double row = 0.0;
        for (e = 0; e < E; e++) row += share[c * E + e];
        rows_ok &= per_combination[c] == 0 ? row == 0.0 : fabs(row - 1.0) < 1e-5;
        sum_tokens += per_combination[c];
    }
    FM_CHECK(rows_ok && sum_tokens == tokens, "each combination's shares sum to 1 (%lld of %lld tokens)", (long long)sum_tokens,
             (long long)tokens);
    for (e = 0; e < E; e++) sum += load[e];
    mean = sum / E;
    for (e = 0; e < E; e++) {
        variance += (load[e] - mean) * (load[e] - mean) / E;
        if (load[e] > 0) entropy -= load[e] * log(load[e]);
    }
    FM_CHECK(fabs(sum - 1.0) < 1e-5 && fabs(r.load_cv - sqrt(variance) / mean) < 1e-4 && fabs(r.entropy - entropy) < 1e-4 &&
                 fabs(r.normalized_entropy - entropy / log(E)) < 1e-4,
             "loads sum %g, CV %g (%g), entropy %g (%g)", sum, r.load_cv, sqrt(variance) / mean, r.entropy, entropy);
    memset(gate, 0, fm_model_tensor(model, "moe.gate.weight")->floats * sizeof(float));
    FM_CHECK(fm_model_routing(model, ds, rows, count, &r) == FM_OK && load[0] == 0.5f && load[1] == 0.5f && load[2] == 0.0f &&
                 load[3] == 0.0f && fabs(r.load_cv - 1.0) < 1e-6 && fabs(r.normalized_entropy - 0.5) < 1e-6,
             "a zero router: loads %g %g %g %g, CV %g, normalised entropy %g", load[0], load[1], load[2], load[3], r.load_cv,
             r.normalized_entropy);
}

int main(void) {
    fm_dataset ds;
    fm_model a, b;
    fm_model_desc desc = small_desc();
    fm_train_desc td;
    fm_train_result result;
    fm_metrics before, after;
    int32_t order[SAMPLES];
    int train = 0, validation = 0;
    counter count = {0, 0, 0};
    fm_test_seed("test_train");
    fm_test_synthetic(&ds, SAMPLES);
    FM_CHECK(fm_dataset_split(&ds, 4, order, &train, &validation) == FM_OK, "split");
    FM_CHECK(fm_dataset_standardize(&ds, order, train) == FM_OK, "standardize");
    FM_CHECK(fm_model_create(&desc, 16, &a) == FM_OK && fm_model_init(&a, 9) == FM_OK, "model a");
    FM_CHECK(fm_model_create(&desc, 16, &b) == FM_OK && fm_model_init(&b, 9) == FM_OK, "model b");
    FM_CHECK(fm_model_evaluate(&a, &ds, order + train, validation, &before) == FM_OK, "evaluate before");
    memset(&td, 0, sizeof td);
    td.epochs = 10, td.warmup_epochs = 2, td.adam.lr = 3e-3f, td.seed = 77;
    td.on_step = count_step, td.on_epoch = count_epoch, td.user_data = &count;
    fm_test_context = "train";
    FM_CHECK(fm_model_train(&a, &ds, order, train, order + train, validation, &td, &result) == FM_OK, "train");
    FM_CHECK(result.epochs_run == 10 && count.epochs == 10 && result.steps == 10 * ((train + 15) / 16) && count.steps == result.steps,
             "%d epochs, %lld steps, %d callbacks", result.epochs_run, (long long)result.steps, count.steps);
    FM_CHECK(fm_model_evaluate(&a, &ds, order + train, validation, &after) == FM_OK, "evaluate after");
    FM_CHECK(after.accuracy == result.best_validation.accuracy, "the model keeps the best epoch's weights (%g, %g)",
             after.accuracy, result.best_validation.accuracy);
    FM_CHECK(after.accuracy >= 0.8f && after.accuracy > before.accuracy + 0.2f,
             "validation accuracy %.3f -> %.3f after 10 epochs", before.accuracy, after.accuracy);
    check_metrics(&a, &ds, order + train + validation, SAMPLES - train - validation);
    {
        fm_model copy;
        FM_CHECK(fm_model_create(&desc, 16, &copy) == FM_OK, "a copy for the routing checks");
        memcpy(copy.params, a.params, a.param_floats * sizeof(float));
        check_routing(&copy, &ds, order, train);
        fm_model_destroy(&copy);
    }
    /* the same seed, the same weights */
    td.on_step = NULL, td.on_epoch = NULL;
    FM_CHECK(fm_model_train(&b, &ds, order, train, order + train, validation, &td, &result) == FM_OK, "train again");
    FM_CHECK(memcmp(a.params, b.params, a.param_floats * sizeof(float)) == 0, "two runs of one seed differ");
    check_resume(&ds, order, train, validation, &a, &td, &result);
    /* a model that has trained its epochs has nothing left to do */
    FM_CHECK(fm_model_train(&b, &ds, order, train, order + train, validation, &td, &result) == FM_OK &&
                 result.epochs_run == 10 && memcmp(a.params, b.params, a.param_floats * sizeof(float)) == 0,
             "training a finished model again changes it");
    FM_CHECK(fm_model_init(&b, 9) == FM_OK && b.trained.epoch == 0 && b.trained.step == 0, "init resets the training state");
    /* a callback stops the run */
    count.steps = 0, count.stop_after = 3;
    td.on_step = count_step, td.user_data = &count;
    FM_CHECK(fm_model_train(&b, &ds, order, train, order + train, validation, &td, &result) == FM_OK && result.stopped &&
                 result.steps == 3,
             "stopped after %lld steps", (long long)result.steps);
    /* divergence stops at the first non-finite loss or gradient, the weights finite */
    {
        size_t i;
        int finite = 1;
        td.on_step = NULL, td.adam.lr = 1e25f, td.epochs = 3;
        FM_CHECK(fm_model_train(&b, &ds, order, train, order + train, validation, &td, &result) == FM_ERR_INVALID_ARGUMENT,
                 "a diverging run is stopped");
        for (i = 0; i < b.param_floats; i++) finite &= b.params[i] - b.params[i] == 0.0f;
        FM_CHECK(finite, "the weights before the non-finite step are kept");
    }
    fm_model_destroy(&a);
    fm_model_destroy(&b);
    fm_dataset_free(&ds);
    return fm_test_finish("test_train");
}
