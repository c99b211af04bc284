/* The API around the kernels: status strings, ISA names and selection (forced, unsupported,
 * unknown, through fm_set_isa and FLEXMOE_ISA), the logger and allocator hooks, and argument
 * checking (errors are returned before anything is written). */
#define _POSIX_C_SOURCE 200112L /* setenv */
#include "fm_test.h"

#include <limits.h>
#include <string.h>

static int log_count;
static fm_log_level last_level;
static char last_message[256];

static void capture_log(fm_log_level level, const char *message, void *user_data) {
    (void)user_data;
    log_count++;
    last_level = level;
    strncpy(last_message, message, sizeof last_message - 1);
}

static size_t live_blocks;

static void *counting_alloc(size_t size, void *user_data) {
    *(size_t *)user_data += 1;
    return malloc(size);
}

static void counting_free(void *ptr, void *user_data) {
    *(size_t *)user_data -= 1;
    free(ptr);
}

/* strcmp on these lets GCC 12 -O3 fold the whole check and warn that it did (-Wstring-compare). */
static int same_text(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static void check_status_strings(void) {
    int i, j, distinct = 1;
    for (i = 0; i < FM_STATUS_COUNT; i++)
        for (j = 0; j < i; j++) distinct &= !same_text(fm_status_str((fm_status)i), fm_status_str((fm_status)j));
    FM_CHECK(distinct, "status strings must be distinct");
    FM_CHECK(same_text(fm_status_str(FM_OK), "ok"), "FM_OK reads \"ok\"");
    FM_CHECK(same_text(fm_status_str((fm_status)999), "unknown status code"), "out-of-range status");
}

static void check_isa_names(void) {
    int i, round_trips = 1;
    fm_isa isa;
    for (i = 0; i < FM_ISA_COUNT; i++)
        round_trips &= fm_isa_from_name(fm_isa_name((fm_isa)i), &isa) == FM_OK && isa == (fm_isa)i;
    FM_CHECK(round_trips, "fm_isa_from_name(fm_isa_name(i)) == i");
    FM_CHECK(fm_isa_from_name("AVX2", &isa) == FM_ERR_UNKNOWN_ISA, "names are case-sensitive");
    FM_CHECK(fm_isa_from_name(NULL, &isa) == FM_ERR_NULL_POINTER, "NULL name");
    FM_CHECK(strcmp(fm_isa_name((fm_isa)42), "unknown") == 0, "out-of-range fm_isa name");
    FM_CHECK(fm_isa_supported(FM_ISA_SCALAR) && fm_isa_supported(FM_ISA_AUTO), "scalar and auto always run");
#if defined(__x86_64__)
    FM_CHECK(!fm_isa_supported(FM_ISA_NEON), "no NEON on x86-64");
#elif defined(__aarch64__)
    FM_CHECK(fm_isa_supported(FM_ISA_NEON) && !fm_isa_supported(FM_ISA_AVX2) && !fm_isa_supported(FM_ISA_AVX512),
             "NEON and only NEON on aarch64");
#endif
}

/* A path this machine cannot run, to force: NEON on x86, AVX2 elsewhere. */
static fm_isa foreign_isa(void) {
    int i;
    for (i = FM_ISA_SCALAR; i < FM_ISA_COUNT; i++)
        if (!fm_isa_supported((fm_isa)i)) return (fm_isa)i;
    return FM_ISA_AUTO;
}

static void check_selection(void) {
    float x[3] = {1, 2, 3}, y[3] = {-1, -1, -1};
    const fm_isa foreign = foreign_isa();
    fm_desc desc;
    fm_status status;

    memset(&desc, 0, sizeof desc);
    desc.logger.func = capture_log;
    FM_CHECK(fm_setup(&desc) == FM_OK, "fm_setup with a logger");

    if (foreign != FM_ISA_AUTO) {
        log_count = 0;
        status = fm_set_isa(foreign);
        FM_CHECK(status == FM_ERR_UNSUPPORTED_ISA, "forcing %s: %s", fm_isa_name(foreign), fm_status_str(status));
        FM_CHECK(log_count == 1 && last_level == FM_LOG_ERROR && strstr(last_message, fm_isa_name(foreign)),
                 "forcing %s logs one error naming it (got %d: %s)", fm_isa_name(foreign), log_count, last_message);
        FM_CHECK(fm_active_isa() == FM_ISA_AUTO, "no path active after a failed force");
        status = fm_softmax_forward(1, 3, x, 3, y, 3);
        FM_CHECK(status == FM_ERR_UNSUPPORTED_ISA && y[0] == -1, "kernels refuse to run: %s", fm_status_str(status));
    }
    FM_CHECK(fm_set_isa((fm_isa)77) == FM_ERR_UNKNOWN_ISA, "an out-of-range fm_isa is unknown");

    setenv("FLEXMOE_ISA", "sse9", 1);
    log_count = 0;
    FM_CHECK(fm_set_isa(FM_ISA_AUTO) == FM_ERR_UNKNOWN_ISA && log_count == 1 && strstr(last_message, "sse9"),
             "FLEXMOE_ISA=sse9 is an unknown name, logged (%s)", last_message);
    if (foreign != FM_ISA_AUTO) {
        setenv("FLEXMOE_ISA", fm_isa_name(foreign), 1);
        FM_CHECK(fm_set_isa(FM_ISA_AUTO) == FM_ERR_UNSUPPORTED_ISA, "FLEXMOE_ISA=%s is unsupported here",
                 fm_isa_name(foreign));
    }
    setenv("FLEXMOE_ISA", "scalar", 1);
    FM_CHECK(fm_set_isa(FM_ISA_AUTO) == FM_OK && fm_active_isa() == FM_ISA_SCALAR, "FLEXMOE_ISA=scalar");
    setenv("FLEXMOE_ISA", "", 1);
    FM_CHECK(fm_set_isa(FM_ISA_AUTO) == FM_OK && fm_active_isa() != FM_ISA_AUTO, "empty FLEXMOE_ISA selects the best");
#if defined(__aarch64__)
    FM_CHECK(fm_active_isa() == FM_ISA_NEON, "aarch64 selects NEON");
#elif defined(__x86_64__)
    FM_CHECK(fm_active_isa() == (fm_isa_supported(FM_ISA_AVX512) ? FM_ISA_AVX512
                                 : fm_isa_supported(FM_ISA_AVX2) ? FM_ISA_AVX2 : FM_ISA_SCALAR),
             "x86-64 selects the widest supported path (got %s)", fm_isa_name(fm_active_isa()));
#endif
    status = fm_softmax_forward(1, 3, x, 3, y, 3);
    FM_CHECK(status == FM_OK && fabs(y[0] + y[1] + y[2] - 1.0) < 1e-6, "kernels run again after reselection");
    FM_CHECK(fm_setup(NULL) == FM_OK, "fm_setup(NULL) restores every default");
}

static void check_allocator(void) {
    fm_desc desc;
    void *a, *b;
    memset(&desc, 0, sizeof desc);
    desc.allocator.alloc = counting_alloc;
    desc.allocator.free = counting_free;
    desc.allocator.user_data = &live_blocks;
    fm_setup(&desc);
    a = fm_alloc(1);
    b = fm_alloc(1000);
    FM_CHECK(a && b && ((uintptr_t)a % 64) == 0 && ((uintptr_t)b % 64) == 0, "fm_alloc is 64-byte aligned");
    FM_CHECK(live_blocks == 2, "fm_alloc goes through the allocator hook (%zu live)", live_blocks);
    memset(b, 0xAB, 1000); /* the whole block is usable (AddressSanitizer checks) */
    fm_free(a);
    fm_free(b);
    fm_free(NULL);
    FM_CHECK(live_blocks == 0, "fm_free returns blocks through the hook (%zu live)", live_blocks);
    FM_CHECK(fm_alloc(0) == NULL && fm_alloc((size_t)-1) == NULL, "fm_alloc(0) and an impossible size give NULL");
    fm_setup(NULL);
}

static void check_arguments(void) {
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8], dy[8];
    int untouched, i;
    for (i = 0; i < 8; i++) y[i] = dy[i] = -7.0f;
#define EXPECT(call, want)                                                                      \
    do {                                                                                        \
        fm_status got_ = (call);                                                                \
        for (untouched = 1, i = 0; i < 8; i++) untouched &= y[i] == -7.0f;                      \
        FM_CHECK(got_ == (want) && untouched, "%s: %s (want %s)", #call, fm_status_str(got_),   \
                 fm_status_str(want));                                                          \
    } while (0)
    EXPECT(fm_softmax_forward(0, 4, x, 4, y, 4), FM_ERR_INVALID_SHAPE);
    EXPECT(fm_softmax_forward(2, 0, x, 4, y, 4), FM_ERR_INVALID_SHAPE);
    EXPECT(fm_softmax_forward(-1, 4, x, 4, y, 4), FM_ERR_INVALID_SHAPE);
    EXPECT(fm_softmax_forward(2, 4, x, 3, y, 4), FM_ERR_INVALID_SHAPE);
    EXPECT(fm_softmax_forward(2, 4, x, 4, y, 3), FM_ERR_INVALID_SHAPE);
    EXPECT(fm_softmax_forward(2, 4, NULL, 4, y, 4), FM_ERR_NULL_POINTER);
    EXPECT(fm_softmax_forward(2, 4, x, 4, NULL, 4), FM_ERR_NULL_POINTER);
    EXPECT(fm_softmax_forward(INT_MAX, 4, x, INT_MAX, y, INT_MAX), FM_ERR_OVERFLOW); /* 2^64 bytes */
    EXPECT(fm_softmax_backward(2, 4, x, 4, dy, 4, y, 2), FM_ERR_INVALID_SHAPE);
    EXPECT(fm_softmax_backward(2, 4, x, 4, NULL, 4, y, 4), FM_ERR_NULL_POINTER);
    EXPECT(fm_softmax_backward(2, 4, NULL, 4, dy, 4, y, 4), FM_ERR_NULL_POINTER);
    EXPECT(fm_softmax_backward(2, -4, x, 4, dy, 4, y, 4), FM_ERR_INVALID_SHAPE);
#undef EXPECT
    FM_CHECK(fm_softmax_forward(2, 4, x, 4, y, 4) == FM_OK && y[0] != -7.0f, "the same call with valid arguments");
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    fm_test_isas(isas); /* under FLEXMOE_ISA: is the forced path really the active one? */
    check_status_strings();
    check_isa_names();
    check_allocator();
    check_arguments();
    check_selection();
    return fm_test_finish("test_api");
}
