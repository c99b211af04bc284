/* fuzz_common.h — what the libFuzzer targets of tests/fuzz/ share: libFuzzer's entry points, a
 * failure that names the call and the ISA path (die, CHECK), FUZZ_TRACE's printing (TRACE; a
 * target may define its own first), and, with FUZZ_COUNTING_HOOK, the allocator hook and logger
 * of the targets above the kernels: the hook counts live blocks (a leak fails the input) and
 * refuses blocks over 32 MiB (a file that asks for more must come back as FM_ERR_OUT_OF_MEMORY);
 * the logger checks every message; with FUZZ_BYTE_READER, the byte reader of the targets that build
 * their calls from the input. Each target defines FUZZ_NAME before including this. */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include "flexmoe.h" /* the implementation: tests/flexmoe_impl.c, instrumented alike (scripts/fuzz.sh) */

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *g_fn = FUZZ_NAME; /* the call under test, once a target names one */
static int g_trace;                   /* FUZZ_TRACE=1 */

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2), noreturn))
#endif
static void die(const char *format, ...) {
    va_list args;
    fprintf(stderr, "\nFUZZ FAILURE in %s [%s]: ", g_fn, fm_isa_name(fm_active_isa()));
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fputc('\n', stderr);
    abort();
}

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) die(__VA_ARGS__);                                                            \
    } while (0)

#ifndef TRACE
#define TRACE(...)                                                                                \
    do {                                                                                          \
        if (g_trace) {                                                                            \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fputc('\n', stderr);                                                                  \
        }                                                                                         \
    } while (0)
#endif

/* splitmix64: deterministic bulk contents from a seed the input chose */
static inline uint64_t fuzz_splitmix(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#ifdef FUZZ_BYTE_READER
/* The input, read a byte at a time (fuzz_read_from first); zeros once it is exhausted. Wider
 * integers are each target's own: their decodings differ, and the kept reproducers depend on them. */
static const uint8_t *in_p;
static size_t in_n;
static void fuzz_read_from(const uint8_t *data, size_t size) { in_p = data, in_n = size; }
static unsigned u8(void) {
    if (!in_n) return 0;
    in_n--;
    return *in_p++;
}
static unsigned u16(void) {
    unsigned a = u8();
    return a | u8() << 8;
}
/* true with probability 1/n; never once the input is exhausted */
static int rare(unsigned n) { return u8() % n == n - 1; }
#endif

#ifdef FUZZ_COUNTING_HOOK
#define HOOK_LIMIT ((size_t)32 << 20)
static long hook_live;
static void *hook_alloc(size_t size, void *user) {
    void *p;
    (void)user;
    if (size > HOOK_LIMIT) return NULL;
    if ((p = malloc(size))) hook_live++;
    return p;
}
static void hook_free(void *ptr, void *user) {
    (void)user;
    if (ptr) hook_live--;
    free(ptr);
}
static void logger(fm_log_level level, const char *message, void *user) {
    (void)level, (void)user;
    CHECK(message && strlen(message) < 1024, "a log message is NULL or too long");
    if (g_trace) fprintf(stderr, "  log: %s\n", message);
}
static inline int valid_status(fm_status st) { return st >= FM_OK && st <= FM_ERR_BAD_FILE; }

/* FUZZ_TRACE, and flexmoe set up with the hook and the logger on the path FLEXMOE_ISA names. */
static void fuzz_setup(void) {
    fm_desc desc;
    g_trace = getenv("FUZZ_TRACE") && atoi(getenv("FUZZ_TRACE")) != 0;
    memset(&desc, 0, sizeof desc);
    desc.allocator.alloc = hook_alloc, desc.allocator.free = hook_free;
    desc.logger.func = logger;
    if (fm_setup(&desc) != FM_OK) {
        fprintf(stderr, "%s: fm_setup failed (FLEXMOE_ISA=%s)\n", FUZZ_NAME, getenv("FLEXMOE_ISA") ? getenv("FLEXMOE_ISA") : "");
        exit(1);
    }
}
#endif

#endif
