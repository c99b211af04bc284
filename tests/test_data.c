/* Multi-view data (fm_dataset_*): the handwritten digits of ../shared/data/handwritten loaded
 * and checked against their files, standardisation, the split and the missing-view simulator;
 * then every malformed input the loader must refuse, each in a directory of its own, with the
 * message naming the file and the line. */
#include "fm_test.h"

#include <sys/stat.h>
#include <unistd.h>

#ifndef FM_TEST_SOURCE_ROOT
#define FM_TEST_SOURCE_ROOT "."
#endif

static char last_message[512];

static void keep_message(fm_log_level level, const char *message, void *user_data) {
    (void)level, (void)user_data;
    snprintf(last_message, sizeof last_message, "%s", message);
}

/* ConfSMoE's first imputation stage: with one draw, each missing view's row is exactly an observed
 * pool row of that view; with ten, each row is the mean of ten of them, so over many rows the
 * imputed values average to the pool's mean; observed rows untouched; seeded; a pool without an
 * observer of a view refused. */
static void check_impute(fm_dataset *ds, const int32_t *pool, int count) {
    fm_dataset copy;
    int v, s, i, exact = 1, untouched = 1, missing = 0;
    double worst = 0.0;
    copy = *ds;
    for (v = 0; v < ds->views; v++) {
        copy.values[v] = (float *)malloc((size_t)ds->samples * ds->features[v] * sizeof(float));
        memcpy(copy.values[v], ds->values[v], (size_t)ds->samples * ds->features[v] * sizeof(float));
    }
    FM_CHECK(fm_dataset_impute(&copy, pool, count, 1, 5) == FM_OK, "impute, one draw");
    for (v = 0; v < ds->views; v++)
        for (s = 0; s < ds->samples; s++) {
            const size_t F = (size_t)ds->features[v];
            const float *row = copy.values[v] + (size_t)s * F;
            int found = 0;
            if (ds->observed[(size_t)s * ds->views + v]) {
                untouched &= memcmp(row, ds->values[v] + (size_t)s * F, F * sizeof(float)) == 0;
                continue;
            }
            missing++;
            for (i = 0; i < count && !found; i++)
                found = ds->observed[(size_t)pool[i] * ds->views + v] &&
                        memcmp(row, ds->values[v] + (size_t)pool[i] * F, F * sizeof(float)) == 0;
            exact &= found;
        }
    FM_CHECK(missing > 0 && exact && untouched, "one draw: each of %d missing rows an observed pool row (%d), observed rows kept (%d)",
             missing, exact, untouched);
    FM_CHECK(fm_dataset_impute(&copy, pool, count, 10, 5) == FM_OK, "impute, ten draws");
    for (v = 0; v < ds->views; v++) { /* the imputed rows' mean against the pool's, feature 0 */
        double pool_sum = 0.0, imputed_sum = 0.0;
        int pool_n = 0, imputed_n = 0;
        for (i = 0; i < count; i++)
            if (ds->observed[(size_t)pool[i] * ds->views + v]) pool_sum += ds->values[v][(size_t)pool[i] * ds->features[v]], pool_n++;
        for (s = 0; s < ds->samples; s++)
            if (!ds->observed[(size_t)s * ds->views + v]) imputed_sum += copy.values[v][(size_t)s * ds->features[v]], imputed_n++;
        if (imputed_n > 100) worst = fmax(worst, fabs(imputed_sum / imputed_n - pool_sum / pool_n));
    }
    FM_CHECK(worst < 0.1, "ten draws: imputed means within %.3f of the pool's (standardised features)", worst);
    {
        float keep = copy.values[0][0];
        int32_t none[1];
        for (s = 0; s < ds->samples && ds->observed[(size_t)s * ds->views]; s++) {}
        FM_CHECK(s < ds->samples, "a sample missing view 0");
        none[0] = s;
        last_message[0] = '\0';
        FM_CHECK(fm_dataset_impute(&copy, none, 1, 10, 5) == FM_ERR_INVALID_ARGUMENT && strstr(last_message, ds->names[0]),
                 "a pool without an observer of %s: %s", ds->names[0], last_message);
        FM_CHECK(copy.values[0][0] == keep, "keep");
    }
    for (v = 0; v < ds->views; v++) free(copy.values[v]);
}

static void check_handwritten(void) {
    static const char *const names[6] = {"pixel", "fourier", "profile", "zer", "kar", "mor"};
    static const int features[6] = {240, 76, 216, 47, 64, 6};
    fm_dataset ds;
    int32_t *order;
    int train = 0, validation = 0, v, i, per_class[10] = {0}, classes_ok = 1, permutation = 1;
    char *seen;
    fm_test_context = "handwritten";
    FM_CHECK(fm_dataset_load(FM_TEST_SOURCE_ROOT "/../shared/data/handwritten", &ds) == FM_OK, "load: %s", last_message);
    if (!ds.samples) return;
    FM_CHECK(ds.samples == 2000 && ds.views == 6 && ds.classes == 10, "%d samples, %d views, %d classes", ds.samples,
             ds.views, ds.classes);
    for (v = 0; v < 6 && v < ds.views; v++)
        FM_CHECK(strcmp(ds.names[v], names[v]) == 0 && ds.features[v] == features[v], "view %d is %s %d", v, ds.names[v],
                 ds.features[v]);
    for (i = 0; i < ds.samples; i++) per_class[ds.labels[i] % 10]++;
    for (i = 0; i < 10; i++) classes_ok &= per_class[i] == 200;
    FM_CHECK(classes_ok, "200 samples per class");
    /* values against the files' first lines (README: fourier starts 0.06588172; mor 1,0,0,133.15086,...) */
    FM_CHECK(ds.values[1][0] == 0.06588172f && ds.values[5][3] == 133.15086f && ds.values[5][5] == 1620.2218f,
             "first values %.8g %.8g %.8g", ds.values[1][0], ds.values[5][3], ds.values[5][5]);
    for (i = 0, v = 1; i < ds.samples * ds.views; i++) v &= ds.observed[i] == 1;
    FM_CHECK(v, "every view observed");
    /* split: a permutation, 70/15/15, seeded */
    order = (int32_t *)malloc((size_t)ds.samples * sizeof(int32_t));
    seen = (char *)calloc((size_t)ds.samples, 1);
    FM_CHECK(fm_dataset_split(&ds, 11, order, &train, &validation) == FM_OK, "split");
    for (i = 0; i < ds.samples; i++) {
        if (order[i] < 0 || order[i] >= ds.samples || seen[order[i]]) permutation = 0;
        else seen[order[i]] = 1;
    }
    FM_CHECK(permutation && train == 1400 && validation == 300, "a permutation split 1400/300/300 (%d/%d)", train, validation);
    {
        int32_t *again = (int32_t *)malloc((size_t)ds.samples * sizeof(int32_t)), t2, v2;
        fm_dataset_split(&ds, 11, again, &t2, &v2);
        FM_CHECK(memcmp(order, again, (size_t)ds.samples * sizeof(int32_t)) == 0, "the same seed, the same split");
        fm_dataset_split(&ds, 12, again, &t2, &v2);
        FM_CHECK(memcmp(order, again, (size_t)ds.samples * sizeof(int32_t)) != 0, "another seed, another split");
        free(again);
    }
    /* standardised on the training rows: mean 0 and deviation 1 there, for every varying feature */
    FM_CHECK(fm_dataset_standardize(&ds, order, train) == FM_OK, "standardize: %s", last_message);
    {
        double worst = 0.0;
        int j;
        for (v = 0; v < ds.views; v++)
            for (j = 0; j < ds.features[v]; j++) {
                double sum = 0.0, squares = 0.0;
                for (i = 0; i < train; i++) sum += ds.values[v][(size_t)order[i] * ds.features[v] + j];
                for (i = 0; i < train; i++) squares += pow(ds.values[v][(size_t)order[i] * ds.features[v] + j] - sum / train, 2);
                worst = fmax(worst, fabs(sum / train));
                if (squares > 0.0) worst = fmax(worst, fabs(sqrt(squares / train) - 1.0));
            }
        FM_CHECK(worst < 1e-4, "standardised training rows off mean 0 / deviation 1 by %.3g", worst);
    }
    /* missingness: about the rate, at least one view kept, dropped rows zeroed, seeded */
    {
        uint8_t *before;
        int dropped = 0, empty = 0, zeroed = 1, s;
        FM_CHECK(fm_dataset_drop_views(&ds, 0.5f, 3) == FM_OK, "drop views");
        before = (uint8_t *)malloc((size_t)ds.samples * ds.views);
        memcpy(before, ds.observed, (size_t)ds.samples * ds.views);
        for (s = 0; s < ds.samples; s++) {
            int kept = 0;
            for (v = 0; v < ds.views; v++) {
                kept += ds.observed[(size_t)s * ds.views + v];
                if (!ds.observed[(size_t)s * ds.views + v]) {
                    dropped++;
                    for (i = 0; i < ds.features[v]; i++) zeroed &= ds.values[v][(size_t)s * ds.features[v] + i] == 0.0f;
                }
            }
            empty += kept == 0;
        }
        FM_CHECK(empty == 0 && zeroed, "%d samples without a view; dropped rows zeroed: %d", empty, zeroed);
        FM_CHECK(fabs((double)dropped / (ds.samples * ds.views) - 0.5) < 0.03, "%.3f of the views dropped at rate 0.5",
                 (double)dropped / (ds.samples * ds.views));
        free(before);
    }
    check_impute(&ds, order, train);
    free(order), free(seen);
    fm_dataset_free(&ds);
    FM_CHECK(ds.samples == 0 && ds.values[0] == NULL, "free zeroes the dataset");
}

/* A directory of the given files (NULL content: not written) under a fresh temporary root. */
typedef struct file_spec {
    const char *name, *content;
} file_spec;

static void write_directory(const char *dir, const file_spec *files, int count) {
    char path[512];
    int i;
    mkdir(dir, 0700);
    for (i = 0; i < count; i++) {
        FILE *f;
        snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
        remove(path);
        if (!files[i].content) continue;
        f = fopen(path, "wb");
        if (f) fputs(files[i].content, f), fclose(f);
    }
}

static void remove_directory(const char *dir, const file_spec *files, int count) {
    char path[512];
    int i;
    for (i = 0; i < count; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
        remove(path);
    }
    rmdir(dir);
}

typedef struct bad_case {
    const char *what;
    const char *views, *a, *b, *labels;
    const char *expect; /* in the message */
} bad_case;

static void check_malformed(void) {
    /* a good directory first: views a (3 features) and b (2), the second sample missing b */
    static const bad_case cases[] = {
        {"a good directory", "a 3\nb 2\n", "1,2,3\n4,5,6\n7,8,9\n", "1,2\n\n5,6\n", "0\n1\n1\n", NULL},
        {"CRLF line ends", "a 3\r\nb 2\r\n", "1,2,3\r\n4,5,6\r\n7,8,9\r\n", "1,2\r\n\r\n5,6\r\n", "0\r\n1\r\n1\r\n", NULL},
        {"no views.txt", NULL, "1,2,3\n", "1,2\n", "0\n1\n", "views.txt"},
        {"an empty views.txt", "", "1,2,3\n", "1,2\n", "0\n1\n", "views.txt is empty"},
        {"a bad views.txt line", "a 3\nb two\n", "1,2,3\n", "1,2\n", "0\n1\n", "views.txt line 2"},
        {"no view file", "a 3\nb 2\n", "1,2,3\n4,5,6\n", NULL, "0\n1\n", "b.csv"},
        {"no labels", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4\n", NULL, "labels.csv"},
        {"a ragged row", "a 3\nb 2\n", "1,2,3\n4,5\n", "1,2\n3,4\n", "0\n1\n", "a.csv line 2: 2 fields"},
        {"a long row", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4,5\n", "0\n1\n", "b.csv line 2: 3 fields"},
        {"a word", "a 3\nb 2\n", "1,2,3\n4,x,6\n", "1,2\n3,4\n", "0\n1\n", "a.csv line 2: \"x,6\" is not a finite number"},
        {"a NaN", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "nan,2\n3,4\n", "0\n1\n", "b.csv line 1"},
        {"an infinity", "a 3\nb 2\n", "1,2,3\n4,5,1e99\n", "1,2\n3,4\n", "0\n1\n", "a.csv line 2"},
        {"an empty field", "a 3\nb 2\n", "1,,3\n4,5,6\n", "1,2\n3,4\n", "0\n1\n", "a.csv line 1"},
        {"fewer lines", "a 3\nb 2\n", "1,2,3\n", "1,2\n3,4\n", "0\n1\n", "a.csv has 1 lines, labels.csv 2"},
        {"more lines", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4\n5,6\n", "0\n1\n", "b.csv has 3 lines"},
        {"a negative label", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4\n", "0\n-1\n", "labels.csv line 2"},
        {"a label that is not a number", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4\n", "0\n1.5\n", "labels.csv line 2"},
        {"an empty label", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4\n", "0\n\n", "labels.csv line 2"},
        {"one class", "a 3\nb 2\n", "1,2,3\n4,5,6\n", "1,2\n3,4\n", "0\n0\n", "one class"},
        {"a sample with no view", "a 3\nb 2\n", "1,2,3\n\n", "1,2\n\n", "0\n1\n", "sample 1 (line 2"},
        {"nine views", "a 3\nb 2\nc 1\nd 1\ne 1\nf 1\ng 1\nh 1\ni 1\n", "1,2,3\n", "1,2\n", "0\n1\n", "more than 8 views"},
    };
    const file_spec names[4] = {{"views.txt", NULL}, {"a.csv", NULL}, {"b.csv", NULL}, {"labels.csv", NULL}};
    char dir[256];
    size_t c;
    snprintf(dir, sizeof dir, "/tmp/flexmoe_test_data_%d", (int)getpid());
    for (c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const bad_case *bc = &cases[c];
        const file_spec files[4] = {{"views.txt", bc->views}, {"a.csv", bc->a}, {"b.csv", bc->b}, {"labels.csv", bc->labels}};
        fm_dataset ds;
        fm_status status;
        write_directory(dir, files, 4);
        last_message[0] = '\0';
        status = fm_dataset_load(dir, &ds);
        fm_test_context = bc->what;
        if (!bc->expect) {
            FM_CHECK(status == FM_OK && ds.samples == 3 && ds.views == 2 && ds.classes == 2, "refused: %s", last_message);
            if (status == FM_OK) {
                FM_CHECK(ds.observed[0] && ds.observed[1] && ds.observed[2] && !ds.observed[3] && ds.observed[5],
                         "an empty line marks the view missing");
                FM_CHECK(ds.values[1][2] == 0.0f && ds.values[1][5] == 6.0f && ds.values[0][4] == 5.0f, "values");
            }
        } else {
            FM_CHECK(status == FM_ERR_INVALID_ARGUMENT && ds.samples == 0 && ds.values[0] == NULL && ds.labels == NULL,
                     "status %s, dataset left set", fm_status_str(status));
            FM_CHECK(strstr(last_message, bc->expect) != NULL, "the message \"%s\" does not say \"%s\"", last_message, bc->expect);
        }
        fm_dataset_free(&ds);
    }
    {
        const file_spec files[4] = {{"views.txt", "a 3\nb 2\n"}, {"a.csv", "1,2,3\n1,5,3\n"}, {"b.csv", "1,2\n1,2\n"},
                                    {"labels.csv", "0\n1\n"}};
        const int32_t rows[2] = {0, 1};
        fm_dataset ds;
        fm_test_context = "zero variance";
        write_directory(dir, files, 4);
        FM_CHECK(fm_dataset_load(dir, &ds) == FM_OK, "load: %s", last_message);
        FM_CHECK(fm_dataset_standardize(&ds, rows, 2) == FM_ERR_INVALID_ARGUMENT && strstr(last_message, "view b has zero variance"),
                 "a constant view: %s", last_message);
        fm_dataset_free(&ds);
    }
    remove_directory(dir, names, 4);
    fm_test_context = "arguments";
    FM_CHECK(fm_dataset_load(NULL, NULL) == FM_ERR_NULL_POINTER, "NULL");
    FM_CHECK(fm_dataset_drop_views(NULL, 0.5f, 1) == FM_ERR_NULL_POINTER, "NULL dataset");
}

int main(void) {
    fm_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.logger.func = keep_message;
    fm_test_seed("test_data");
    FM_CHECK(fm_setup(&desc) == FM_OK, "fm_setup");
    check_handwritten();
    check_malformed();
    return fm_test_finish("test_data");
}
