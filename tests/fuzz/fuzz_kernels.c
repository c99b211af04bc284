/* libFuzzer target of the whole public API of flexmoe.h.
 *
 * The input is a little script: the first byte picks the public function, the following bytes
 * choose its shapes (mostly 1..70, sometimes up to ~1100 experts, zero, negative or extreme),
 * leading dimensions (packed, padded, below the row length), flags, which optional pointers are
 * NULL, index arrays (in range or not, offsets monotone or not) and the float contents (ordinary
 * values, ties, or a palette of NaN, +-Inf, +-1e30, +-3e38, denormals, -0). Exhausted input reads
 * as zero bytes, which always choose the plain option.
 *
 * Every buffer is malloc'ed with exactly the extent its documented shape needs, so
 * AddressSanitizer sees any overrun. On the SIMD paths (whose masked loads and stores ASan does
 * not see) each buffer also gets 16 floats of sentinel on both sides, poisoned for ASan and
 * compared after every call, and its data pointer is misaligned by 0..3 floats.
 *
 * After each call the target checks (abort() on failure, so the fuzzer reports it):
 *   - an error status: no buffer changed (errors come before anything is written), and a call
 *     the header documents as invalid did return an error;
 *   - FM_OK: a call the model expects to succeed did; const inputs unchanged; the gaps between
 *     rows of strided outputs unchanged; and what the header promises about the results (top-k
 *     order and ties, index ranges, routing-plan consistency, NaN policies, formulas where the
 *     inputs are ordinary).
 * The ISA path is the process's (FLEXMOE_ISA=scalar|avx2|avx512, read by fm_setup(NULL)).
 *
 * Build (scripts/fuzz.sh does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. \
 *         tests/fuzz/fuzz_kernels.c -o build/fuzz_kernels -lm
 * Two optional modes widen it (tests/test_robustness.c covers both deterministically):
 * -DFUZZ_CORRUPT_PLAN hands dispatch/combine plans whose rows disagree with their positions (a
 * plan the build never makes), -DFUZZ_GARBAGE_PADDING leaves fuzzed values in the packed
 * weights' padding. */
#define FUZZ_NAME "fuzz_kernels"
/* FUZZ_TRACE=1: each call, with what the header expects of it, and the special values of its buffers */
#define TRACE(...)                                                                                \
    do {                                                                                          \
        if (g_trace) {                                                                            \
            fprintf(stderr, "call (expect %s): ", g_bad ? "an error" : "FM_OK");                   \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fputc('\n', stderr);                                                                  \
        }                                                                                         \
    } while (0)
#define FUZZ_BYTE_READER
#include "fuzz_common.h"

#include <float.h>
#include <limits.h>
#include <math.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUZZ_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define FUZZ_ASAN 1
#endif
#ifdef FUZZ_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
/* fm_alloc of a huge size must return NULL, not make ASan abort. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* ---- failures --------------------------------------------------------------------------- */

static int g_bad; /* the header says this call must fail */

/* Marks the call as one the header says must fail; traced with the target's line. */
static void set_bad(int line) {
    if (g_trace && !g_bad) fprintf(stderr, "  (expected to fail: fuzz_kernels.c:%d)\n", line);
    g_bad = 1;
}

static void trace_offsets(const int32_t *o, int E) {
    int e;
    if (!g_trace || !o || E <= 0 || E > 2000) return;
    fprintf(stderr, "  offsets:");
    for (e = 0; e <= E; e++) fprintf(stderr, " %d", o[e]);
    fputc('\n', stderr);
}

/* ---- the input reader: u8, u16 and rare in fuzz_common.h, the wider integers here ---------- */

static uint32_t u32(void) {
    uint32_t a = u16();
    return a | (uint32_t)u16() << 16;
}
static uint64_t u64(void) {
    uint64_t a = u32();
    return a | (uint64_t)u32() << 32;
}

static int clamp_int(int64_t v) { return v > INT_MAX ? INT_MAX : v < INT_MIN ? INT_MIN : (int)v; }

static int special_int(void) {
    static const int s[] = {0,       -1,      INT_MIN, INT_MAX, INT_MAX - 1, INT_MAX - 63, 1 << 24, (1 << 24) + 1,
                            1 << 30, 46341,   65536,   1024,    1025,        17,           16,      -2};
    return s[u8() % (sizeof s / sizeof s[0])];
}

/* A dimension: mostly 1..max, sometimes up to big, zero, negative or extreme. */
static int dim(int max, int big) {
    unsigned b = u8();
    if (b < 232) return 1 + (int)(b % (unsigned)max);
    if (b < 240) return big > max ? max + 1 + (int)(u16() % (unsigned)(big - max)) : 1 + (int)(b % (unsigned)max);
    if (b < 244) return 0;
    if (b < 248) return -(int)(1 + u8());
    return special_int();
}

/* A leading dimension for rows of `cols`: mostly cols, sometimes padded, short, zero, negative. */
static int ldim(int cols) {
    unsigned b = u8();
    if (b < 176) return cols;
    if (b < 232) return clamp_int((int64_t)cols + 1 + b % 9);
    if (b < 240) return clamp_int((int64_t)cols - 1);
    if (b < 248) return 0;
    if (b < 252) return -(int)(1 + u8());
    return INT_MAX;
}

/* A k for rows of `cols`: mostly 1..min(cols, cap), sometimes cols, cols + 1, 17, 0, -1, extreme. */
static int kdim(int cols, int cap) {
    int m = cols < 1 ? 1 : cols;
    unsigned b = u8();
    if (cap && m > cap) m = cap;
    if (b < 224) return 1 + (int)(b % (unsigned)m);
    if (b < 232) return cols;
    if (b < 236) return clamp_int((int64_t)cols + 1);
    if (b < 240) return 17;
    if (b < 244) return 0;
    if (b < 248) return -1;
    return special_int();
}

static float palette(unsigned b) {
    switch (b % 32) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return 1.0f;
    case 3: return -1.0f;
    case 4: return NAN;
    case 5: return INFINITY;
    case 6: return -INFINITY;
    case 7: return 1e30f;
    case 8: return -1e30f;
    case 9: return 3e38f;
    case 10: return -3e38f;
    case 11: return 1e-40f;
    case 12: return -1e-40f;
    case 13: return FLT_MIN;
    case 14: return 2e19f;
    case 15: return -2e19f;
    case 16: return 88.8f;
    case 17: return -104.0f;
    case 18: return FLT_MAX;
    case 19: return 0.5f;
    case 20: return -NAN;
    case 21: return 1e-7f;
    case 22: return 16777217.0f;
    case 23: return 1e10f;
    default: return (float)((int)(b % 32) - 27) * 0.75f;
    }
}

/* ---- a deterministic PRNG for bulk contents --------------------------------------------- */

static uint64_t rng_state;
static uint64_t rng(void) { return fuzz_splitmix(&rng_state); }
static float rng_uniform(float lo, float hi) { return lo + (hi - lo) * (float)((rng() >> 40) * (1.0 / 16777216.0)); }

/* ---- buffers ------------------------------------------------------------------------------ */

#define MAX_BUFFERS 64
#define SENTINEL_FLOATS 16
#define MAX_ELEMS ((uint64_t)1 << 22)
static const uint32_t sentinel_word = 0x7FA1B2C3u; /* a signalling NaN no kernel produces */

enum { IN = 0, OUT = 1, OPT = 2, NOCHECK = 4, NOFILL = 8, KEEP = 16 /* never NULL */ };

typedef struct {
    unsigned char *base, *p, *snap;
    size_t bytes, front;
    int out, mat, rows, cols, ld;
} buffer;

static buffer bufs[MAX_BUFFERS];
static int nbufs;
static int g_sentinel;   /* sentinels around buffers (the SIMD paths) */
static int g_misalign;   /* floats the data pointers are shifted by (sentinel mode) */
static int g_huge;       /* a buffer too large to allocate was replaced by one float */
static int g_unmodeled;  /* the model cannot tell whether the call should succeed */
static fm_isa g_isa;

static buffer *find_buffer(const void *p) {
    int i;
    for (i = 0; i < nbufs; i++)
        if ((const unsigned char *)p >= bufs[i].p && (const unsigned char *)p < bufs[i].p + bufs[i].bytes) return &bufs[i];
    return NULL;
}

/* The contents a buffer had before the call (for in-place calls). */
static const float *before(const float *p) {
    buffer *b = find_buffer(p);
    return b ? (const float *)(b->snap + ((const unsigned char *)p - b->p)) : p;
}

static void *raw_alloc(uint64_t elems, size_t size, int out) {
    buffer *b;
    size_t i;
    if (nbufs == MAX_BUFFERS) die("target bug: too many buffers");
    if (elems == 0) elems = 1;
    if (elems > MAX_ELEMS) {
        g_huge = 1;
        elems = 1;
    }
    b = &bufs[nbufs++];
    memset(b, 0, sizeof *b);
    b->bytes = (size_t)elems * size;
    b->out = out;
    if (g_sentinel) {
        b->front = (SENTINEL_FLOATS + (size == 4 ? (size_t)g_misalign : 0)) * 4;
        b->base = (unsigned char *)malloc(b->front + b->bytes + SENTINEL_FLOATS * 4);
        if (!b->base) abort();
        b->p = b->base + b->front;
        for (i = 0; i < b->front / 4; i++) memcpy(b->base + 4 * i, &sentinel_word, 4);
        for (i = 0; i < SENTINEL_FLOATS; i++) memcpy(b->p + b->bytes + 4 * i, &sentinel_word, 4);
        POISON(b->base, b->front);
        POISON(b->p + b->bytes, SENTINEL_FLOATS * 4);
    } else {
        b->base = b->p = (unsigned char *)malloc(b->bytes);
        if (!b->base) abort();
    }
    memset(b->p, 0, b->bytes);
    b->snap = (unsigned char *)malloc(b->bytes);
    if (!b->snap) abort();
    return b->p;
}

static void free_all(void) {
    int i;
    for (i = 0; i < nbufs; i++) {
        if (g_sentinel) UNPOISON(bufs[i].base, bufs[i].front + bufs[i].bytes + SENTINEL_FLOATS * 4);
        free(bufs[i].base);
        free(bufs[i].snap);
    }
    nbufs = 0;
}

static void check_sentinels(void) {
    int i;
    size_t j;
    if (!g_sentinel) return;
    for (i = 0; i < nbufs; i++) {
        buffer *b = &bufs[i];
        UNPOISON(b->base, b->front);
        UNPOISON(b->p + b->bytes, SENTINEL_FLOATS * 4);
        for (j = 0; j < b->front / 4; j++)
            CHECK(memcmp(b->base + 4 * j, &sentinel_word, 4) == 0,
                  "buffer %d (%zu bytes): the sentinel %zu floats BEFORE its start was overwritten", i, b->bytes,
                  b->front / 4 - j);
        for (j = 0; j < SENTINEL_FLOATS; j++)
            CHECK(memcmp(b->p + b->bytes + 4 * j, &sentinel_word, 4) == 0,
                  "buffer %d (%zu bytes): the sentinel %zu floats past its end was overwritten", i, b->bytes, j);
        POISON(b->base, b->front);
        POISON(b->p + b->bytes, SENTINEL_FLOATS * 4);
    }
}

/* Float contents. */
static void fill_floats(float *p, size_t n) {
    unsigned mode = u8() % 16;
    size_t i;
    rng_state ^= u16() * 0x100000001B3ull + n;
    switch (mode) {
    case 8:
    case 9: { /* ordinary with a few palette values */
        unsigned count = 1 + u8() % 4, c;
        for (i = 0; i < n; i++) p[i] = rng_uniform(-4.0f, 4.0f);
        for (c = 0; c < count; c++) {
            size_t at = u16() % n;
            p[at] = palette(u8());
        }
        break;
    }
    case 10:
    case 11:
        for (i = 0; i < n; i++) p[i] = palette(u8());
        break;
    case 12: {
        const float v = palette(u8());
        for (i = 0; i < n; i++) p[i] = v;
        break;
    }
    case 13: /* wide magnitudes */
        for (i = 0; i < n; i++) {
            const float m = powf(10.0f, rng_uniform(-45.0f, 38.5f));
            p[i] = (rng() & 1) ? -m : m;
        }
        break;
    case 14: /* small integers: ties */
        for (i = 0; i < n; i++) p[i] = (float)((int)(rng() % 7) - 3);
        break;
    default:
        for (i = 0; i < n; i++) p[i] = rng_uniform(-4.0f, 4.0f);
    }
}

/* What fmat and imat share: NULL where the fuzzer leaves the buffer out, else a buffer of the
 * matrix's extent (one element for an invalid shape), registered as a matrix. flags: OUT, OPT
 * (may be NULL: the fuzzer decides), NOCHECK (the library does not check this buffer here),
 * NOFILL. A required buffer that is NULL or of an invalid shape makes the call invalid (g_bad). */
static void *new_matrix(int rows, int cols, int ld, int flags, size_t elem_size, uint64_t *elems) {
    const int valid = rows > 0 && cols > 0 && ld >= cols;
    void *p;
    *elems = 0;
    if (flags & KEEP) {
    } else if (flags & OPT) {
        if (u8() & 1) return NULL;
    } else if (rare(48)) {
        if (!(flags & NOCHECK)) set_bad(__LINE__);
        return NULL;
    }
    if (!valid && !(flags & NOCHECK)) set_bad(__LINE__);
    *elems = valid ? (uint64_t)(rows - 1) * (uint64_t)ld + (uint64_t)cols : 1;
    p = raw_alloc(*elems, elem_size, flags & OUT);
    if (valid && *elems <= MAX_ELEMS) {
        buffer *b = &bufs[nbufs - 1];
        b->mat = 1, b->rows = rows, b->cols = cols, b->ld = ld;
    }
    return p;
}

/* A rows x cols float matrix with leading dimension ld (flags as new_matrix's). */
static float *fmat(int rows, int cols, int ld, int flags) {
    uint64_t elems;
    float *p = (float *)new_matrix(rows, cols, ld, flags, sizeof(float), &elems);
    if (!p) return NULL;
    if (!(flags & NOFILL)) fill_floats(p, elems > MAX_ELEMS ? 1 : (size_t)elems);
    else memset(p, 0xFF, (elems > MAX_ELEMS ? 1 : (size_t)elems) * sizeof(float));
    return p;
}

/* n floats (a vector). */
static float *fvec(int64_t n, int flags) {
    return fmat(1, n > INT_MAX ? INT_MAX : n < INT_MIN ? INT_MIN : (int)n, n > INT_MAX ? INT_MAX : (int)n, flags);
}

/* Int contents in [lo, hi), with an out-of-range value sprinkled in now and then; returns how many. */
static int fill_ints(int32_t *p, size_t n, int lo, int hi) {
    int bad = 0;
    size_t i;
    unsigned mode = u8() % 8;
    rng_state ^= u16() * 0x100000001B3ull + n;
    for (i = 0; i < n; i++) {
        const uint64_t span = (uint64_t)((int64_t)hi - lo);
        p[i] = span ? (int32_t)(lo + (int64_t)(rng() % span)) : lo;
        if (mode == 1 && span) p[i] = (int32_t)(lo + (int64_t)(i % span)); /* sequential */
        if (mode == 2) p[i] = lo;                                          /* all the same */
    }
    if (rare(10)) {
        static const int32_t outside[] = {-1, INT_MIN, INT_MAX, 0, 1};
        unsigned count = 1 + u8() % 3, c;
        for (c = 0; c < count; c++) {
            const unsigned which = u8() % 5;
            const int32_t v = which == 3 ? hi : which == 4 ? clamp_int((int64_t)hi + 1000) : which == 0 ? clamp_int((int64_t)lo - 1) : outside[which];
            p[u16() % n] = v;
        }
        for (i = 0; i < n; i++) bad += p[i] < lo || p[i] >= hi;
    }
    return bad;
}

/* A rows x cols int32 matrix with values in [lo, hi); *oor receives the count out of range. */
static int32_t *imat(int rows, int cols, int ld, int flags, int lo, int hi, int *oor) {
    uint64_t elems;
    int32_t *p;
    const int valid = rows > 0 && cols > 0 && ld >= cols;
    int bad;
    if (oor) *oor = 0;
    if (!(p = (int32_t *)new_matrix(rows, cols, ld, flags, sizeof(int32_t), &elems))) return NULL;
    if ((flags & NOFILL) && elems <= MAX_ELEMS) memset(p, 0xFF, (size_t)elems * sizeof(int32_t));
    if (!(flags & NOFILL) && elems <= MAX_ELEMS) {
        int r, c;
        bad = fill_ints(p, (size_t)elems, lo, hi);
        if (oor && valid) { /* count only the elements inside the rows x cols view */
            for (r = 0; r < rows; r++)
                for (c = 0; c < cols; c++) *oor += p[(size_t)r * ld + c] < lo || p[(size_t)r * ld + c] >= hi;
        } else if (oor) {
            *oor = bad;
        }
    }
    return p;
}

static void snap_all(void) {
    int i;
    for (i = 0; i < nbufs; i++) memcpy(bufs[i].snap, bufs[i].p, bufs[i].bytes);
    if (g_trace)
        for (i = 0; i < nbufs; i++) {
            const float *f = (const float *)bufs[i].p;
            size_t j, n = bufs[i].bytes / 4, shown = 0;
            fprintf(stderr, "  buffer %d: %zu elements%s%s", i, n, bufs[i].out ? " (out)" : "",
                    bufs[i].mat ? "" : " (not a matrix)");
            if (bufs[i].mat) fprintf(stderr, " %d x %d ld %d", bufs[i].rows, bufs[i].cols, bufs[i].ld);
            for (j = 0; j < n && shown < 12; j++)
                if (!isfinite(f[j]) || fabsf(f[j]) > 1e18f || (f[j] != 0.0f && fabsf(f[j]) < FLT_MIN)) {
                    fprintf(stderr, "%s[%zu]=%g", shown ? " " : "; as floats, specials: ", j, (double)f[j]);
                    shown++;
                }
            if (n <= 80) {
                fprintf(stderr, "; as int32:");
                for (j = 0; j < n; j++) fprintf(stderr, " %d", ((const int32_t *)f)[j]);
            }
            fputc('\n', stderr);
        }
}

/* What every call must satisfy; returns nonzero when the call succeeded. */
static int after_call(fm_status st) {
    int i;
    check_sentinels();
    CHECK((unsigned)st < FM_STATUS_COUNT, "status %d is not an fm_status", (int)st);
    if (st != FM_OK) {
        for (i = 0; i < nbufs; i++)
            CHECK(memcmp(bufs[i].snap, bufs[i].p, bufs[i].bytes) == 0,
                  "returned %d (%s) but buffer %d (%zu bytes) was modified", (int)st, fm_status_str(st), i,
                  bufs[i].bytes);
        CHECK(!(g_bad == 0 && g_unmodeled == 0), "rejected a call the header allows: %d (%s)", (int)st,
              fm_status_str(st));
        return 0;
    }
    CHECK(!g_bad, "returned FM_OK for a call the header says is invalid");
    for (i = 0; i < nbufs; i++) {
        buffer *b = &bufs[i];
        if (!b->out) {
            CHECK(memcmp(b->snap, b->p, b->bytes) == 0, "a const input (buffer %d, %zu bytes) was modified", i, b->bytes);
        } else if (b->mat && b->ld > b->cols) { /* the gaps between the rows are not the output's */
            int r;
            for (r = 0; r + 1 < b->rows; r++) {
                const size_t at = ((size_t)r * b->ld + b->cols) * 4, len = (size_t)(b->ld - b->cols) * 4;
                CHECK(memcmp(b->snap + at, b->p + at, len) == 0,
                      "wrote into the gap after row %d of an output (buffer %d: %d x %d, ld %d)", r, i, b->rows,
                      b->cols, b->ld);
            }
        }
    }
    return 1;
}

/* ---- numeric helpers ---------------------------------------------------------------------- */

static int is_finite(float v) { return isfinite(v); }
static float rank_key(float v) { return v != v ? INFINITY : v; }
static int same_or_both_nan(float a, float b) { return (a != a && b != b) || memcmp(&a, &b, 4) == 0; }

/* The reference top-k of a row: by key descending, ties (and NaN/+Inf among themselves) to the
 * lower column. */
static void ref_topk(const float *x, int cols, int k, int32_t *out) {
    unsigned char *used = (unsigned char *)calloc((size_t)cols, 1);
    int i, j;
    if (!used) abort();
    for (i = 0; i < k; i++) {
        int best = -1;
        for (j = 0; j < cols; j++)
            if (!used[j] && (best < 0 || rank_key(x[j]) > rank_key(x[best]))) best = j;
        used[best] = 1;
        out[i] = best;
    }
    free(used);
}

static void check_topk_row(const float *x, int cols, int k, const int32_t *idx, const char *what) {
    int32_t stack_ref[64];
    int32_t *ref = k <= 64 ? stack_ref : (int32_t *)malloc((size_t)k * sizeof *ref);
    int i;
    if (!ref) abort();
    for (i = 0; i < k; i++)
        CHECK(idx[i] >= 0 && idx[i] < cols, "%s: index %d at rank %d is outside [0, %d)", what, idx[i], i, cols);
    ref_topk(x, cols, k, ref);
    for (i = 0; i < k; i++)
        CHECK(idx[i] == ref[i], "%s: rank %d is column %d (value %g), the reference says %d (value %g); cols %d k %d",
              what, i, idx[i], (double)x[idx[i]], ref[i], (double)x[ref[i]], cols, k);
    if (ref != stack_ref) free(ref);
}

static double gelu_ref(double x, int kind) {
    if (kind == FM_GELU_TANH) {
        const double u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
        return 0.5 * x * (1.0 + tanh(u));
    }
    return 0.5 * x * erfc(-x / 1.4142135623730951);
}

static double gelu_grad_ref(double x, int kind) {
    if (kind == FM_GELU_TANH) {
        const double c = 0.7978845608028654, u = c * (x + 0.044715 * x * x * x), t = tanh(u);
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
    }
    return 0.5 * erfc(-x / 1.4142135623730951) + x * exp(-0.5 * x * x) / 2.5066282746310002;
}

/* Cap on the work of one input (multiply-adds, roughly). */
#define MAX_WORK 2000000.0
static int too_much(double work) { return work > MAX_WORK; }

/* ---- 3. softmax -------------------------------------------------------------------------- */

static void fuzz_softmax_forward(void) {
    const int rows = dim(70, 600), cols = dim(70, 1100), ldx = ldim(cols), in_place = rare(4);
    const int ldy = in_place ? ldx : ldim(cols);
    float *x, *y;
    fm_status st;
    int r, j;
    if (too_much((double)rows * cols)) return;
    x = fmat(rows, cols, ldx, in_place ? OUT : IN);
    y = in_place ? x : fmat(rows, cols, ldy, OUT);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_softmax_forward(rows %d, cols %d, ldx %d, ldy %d, in_place %d)", rows, cols, ldx, ldy, in_place);
    st = fm_softmax_forward(rows, cols, x, ldx, y, ldy);
    if (!after_call(st)) return;
    for (r = 0; r < rows; r++) {
        const float *xr = before(x) + (size_t)r * ldx, *yr = y + (size_t)r * ldy;
        int nan = 0, pinf = 0, all_ninf = 1;
        double sum = 0.0;
        for (j = 0; j < cols; j++) {
            nan |= xr[j] != xr[j];
            pinf |= xr[j] == INFINITY;
            all_ninf &= xr[j] == -INFINITY;
        }
        for (j = 0; j < cols; j++) {
            if (nan || pinf || all_ninf) {
                CHECK(yr[j] != yr[j], "row %d (NaN %d, +Inf %d, all -Inf %d): y[%d] = %g, not NaN", r, nan, pinf,
                      all_ninf, j, (double)yr[j]);
            } else {
                CHECK(yr[j] >= 0.0f && yr[j] <= 1.0f, "row %d: y[%d] = %g for x = %g", r, j, (double)yr[j], (double)xr[j]);
                if (xr[j] == -INFINITY) CHECK(yr[j] == 0.0f, "row %d: x[%d] = -Inf gives %g, not 0", r, j, (double)yr[j]);
                sum += yr[j];
            }
        }
        if (!(nan || pinf || all_ninf)) CHECK(fabs(sum - 1.0) < 1e-3, "row %d of %d cols sums to %.9g", r, cols, sum);
    }
}

static void fuzz_softmax_backward(void) {
    const int rows = dim(70, 600), cols = dim(70, 1100), ldy = ldim(cols), lddy = ldim(cols), in_place = rare(4);
    const int lddx = in_place ? lddy : ldim(cols);
    float *y, *dy, *dx;
    fm_status st;
    int r, j;
    if (too_much((double)rows * cols)) return;
    y = fmat(rows, cols, ldy, IN);
    dy = fmat(rows, cols, lddy, in_place ? OUT : IN);
    dx = in_place ? dy : fmat(rows, cols, lddx, OUT);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_softmax_backward(rows %d, cols %d, ldy %d, lddy %d, lddx %d, in_place %d)", rows, cols, ldy, lddy, lddx, in_place);
    st = fm_softmax_backward(rows, cols, y, ldy, dy, lddy, dx, lddx);
    if (!after_call(st)) return;
    for (r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * ldy, *dyr = before(dy) + (size_t)r * lddy;
        int nan = 0;
        for (j = 0; j < cols; j++) nan |= yr[j] != yr[j] || dyr[j] != dyr[j];
        if (nan)
            for (j = 0; j < cols; j++)
                CHECK(dx[(size_t)r * lddx + j] != dx[(size_t)r * lddx + j], "row %d has a NaN in y or dy, dx[%d] = %g",
                      r, j, (double)dx[(size_t)r * lddx + j]);
    }
}

/* ---- 4. top-k and gates ------------------------------------------------------------------ */

static void fuzz_topk(void) {
    const int rows = dim(70, 600), cols = dim(70, 1100), k = kdim(cols, 24), ldx = ldim(cols);
    const int ldi = ldim(k), ldv = ldim(k);
    float *x, *values;
    int32_t *indices;
    fm_status st;
    int r, i;
    if (too_much((double)rows * cols * (k >= 1 && k <= cols ? k : 1))) return;
    x = fmat(rows, cols, ldx, IN);
    if (k < 1 || k > cols) set_bad(__LINE__);
    indices = imat(rows, k, ldi, OUT | NOFILL, 0, 1, NULL);
    values = fmat(rows, k, ldv, OUT | OPT | NOFILL);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_topk(rows %d, cols %d, k %d, ldx %d, ldi %d, values %s, ldv %d)", rows, cols, k, ldx, ldi, values ? "yes" : "NULL", ldv);
    st = fm_topk(rows, cols, k, x, ldx, indices, ldi, values, ldv);
    if (!after_call(st)) return;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        const int32_t *idx = indices + (size_t)r * ldi;
        check_topk_row(xr, cols, k, idx, "fm_topk");
        if (values)
            for (i = 0; i < k; i++)
                CHECK(same_or_both_nan(values[(size_t)r * ldv + i], xr[idx[i]]), "row %d: value %d is %g, x[%d] = %g", r,
                      i, (double)values[(size_t)r * ldv + i], idx[i], (double)xr[idx[i]]);
    }
}

static int gate_size_bad(int tokens, int experts, int k) {
    return tokens <= 0 || experts <= 0 || k < 1 || k > experts || k > FLEXMOE_GATE_MAX_TOP_K ||
           experts > FLEXMOE_GATE_MAX_EXPERTS;
}

/* Checks weights against the softmax of the selected logits (all of them when !renormalize). */
static void check_gate_weights(const float *logits, int experts, int k, const int32_t *idx, const float *w,
                               int renormalize, const char *what, int row) {
    double max = -INFINITY, sum = 0.0;
    int i, e, special = 0;
    for (i = 0; i < k; i++) special |= !is_finite(logits[idx[i]]);
    if (!renormalize)
        for (e = 0; e < experts; e++) special |= !is_finite(logits[e]) && logits[e] != -INFINITY;
    if (special) { /* a selected NaN or +Inf makes the row NaN */
        for (i = 0; i < k; i++)
            if (logits[idx[i]] != logits[idx[i]] || logits[idx[i]] == INFINITY)
                for (e = 0; e < k; e++)
                    CHECK(w[e] != w[e], "%s row %d: a selected logit is %g, weight %d = %g (not NaN)", what, row,
                          (double)logits[idx[i]], e, (double)w[e]);
        return;
    }
    if (renormalize) {
        for (i = 0; i < k; i++) max = logits[idx[i]] > max ? logits[idx[i]] : max;
        for (i = 0; i < k; i++) sum += exp((double)logits[idx[i]] - max);
    } else {
        for (e = 0; e < experts; e++) max = logits[e] > max ? logits[e] : max;
        for (e = 0; e < experts; e++) sum += exp((double)logits[e] - max);
    }
    if (max == -INFINITY) return; /* every logit -Inf: not specified */
    for (i = 0; i < k; i++) {
        const double ref = exp((double)logits[idx[i]] - max) / sum;
        CHECK(fabs(w[i] - ref) <= 1e-5 + 1e-4 * ref, "%s row %d: weight %d is %.9g, the reference %.9g", what, row, i,
              (double)w[i], ref);
    }
}

static void fuzz_softmax_topk_forward(void) {
    const int tokens = dim(70, 600), experts = dim(70, 1100), k = kdim(experts, 16), renormalize = u8() & 1;
    const int ldl = ldim(experts), ldi = ldim(k), ldw = ldim(k);
    float *logits, *weights;
    int32_t *indices;
    fm_status st;
    int t;
    if (too_much((double)tokens * experts * 4)) return;
    if (gate_size_bad(tokens, experts, k)) set_bad(__LINE__);
    logits = fmat(tokens, experts, ldl, IN);
    indices = imat(tokens, k, ldi, OUT | NOFILL, 0, 1, NULL);
    weights = fmat(tokens, k, ldw, OUT | NOFILL);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_softmax_topk_forward(tokens %d, experts %d, k %d, renormalize %d, ldl %d, ldi %d, ldw %d)", tokens, experts, k, renormalize, ldl, ldi, ldw);
    st = fm_softmax_topk_forward(tokens, experts, k, renormalize, logits, ldl, indices, ldi, weights, ldw);
    if (!after_call(st)) return;
    for (t = 0; t < tokens; t++) {
        const float *l = logits + (size_t)t * ldl;
        check_topk_row(l, experts, k, indices + (size_t)t * ldi, "fm_softmax_topk_forward");
        check_gate_weights(l, experts, k, indices + (size_t)t * ldi, weights + (size_t)t * ldw, renormalize,
                           "fm_softmax_topk_forward", t);
    }
}

static void fuzz_softmax_topk_backward(void) {
    const int tokens = dim(70, 600), experts = dim(70, 1100), k = kdim(experts, 16), renormalize = u8() & 1;
    const int ldl = ldim(experts), ldi = ldim(k), ldw = ldim(k), lddw = ldim(k), lddl = ldim(experts);
    const int from_forward = u8() & 1;
    float *logits, *weights, *d_weights, *d_logits;
    int32_t *indices;
    int oor = 0;
    fm_status st;
    if (too_much((double)tokens * experts * 4)) return;
    if (gate_size_bad(tokens, experts, k)) set_bad(__LINE__);
    logits = fmat(tokens, experts, ldl, IN);
    indices = imat(tokens, k, ldi, IN, 0, experts > 0 ? experts : 1, &oor);
    weights = fmat(tokens, k, ldw, IN);
    d_weights = fmat(tokens, k, lddw, IN);
    d_logits = fmat(tokens, experts, lddl, OUT | NOFILL);
    if (g_huge && !g_bad) return;
    if (oor) set_bad(__LINE__);
    if (from_forward && !g_bad &&
        fm_softmax_topk_forward(tokens, experts, k, renormalize, logits, ldl, indices, ldi, weights, ldw) != FM_OK)
        die("fm_softmax_topk_forward failed on the backward's valid arguments");
    snap_all();
    TRACE("fm_softmax_topk_backward(tokens %d, experts %d, k %d, renormalize %d, ldl %d, ldi %d, ldw %d, lddw %d, lddl %d, from_forward %d)", tokens, experts, k, renormalize, ldl, ldi, ldw, lddw, lddl, from_forward);
    st = fm_softmax_topk_backward(tokens, experts, k, renormalize, logits, ldl, indices, ldi, weights, ldw, d_weights,
                                  lddw, d_logits, lddl);
    after_call(st);
}

/* The gate's desc, as fuzzed. */
static void fuzz_gate_desc(fm_gate_desc *d, int with_k) {
    memset(d, 0, sizeof *d);
    d->tokens = dim(64, 300);
    d->experts = dim(64, 1100);
    d->top_k = with_k ? kdim(d->experts, 16) : 0;
    d->training = u8() & 1;
    d->groups = rare(3) ? (int)(u8() % 12) - 1 : 0;
    d->noise_epsilon = rare(3) ? palette(u8()) : 0.0f;
    d->seed = u64();
    d->token_offset = rare(4) ? UINT64_MAX - u8() : u16();
}

static int gate_ld(int raw, int packed) { return raw ? raw : packed; }

static void fuzz_noisy_gate(int backward) {
    fm_gate_desc desc;
    fm_gate_tensors t;
    fm_gate_gradients g;
    int T, E, k, G, tok, i, e, oor_groups = 0, oor_idx = 0, null_desc, null_tensors, null_grads, run_forward;
    float eps;
    fm_status st;
    g_fn = backward ? "fm_noisy_gate_backward" : "fm_noisy_gate_forward";
    fuzz_gate_desc(&desc, 1);
    T = desc.tokens, E = desc.experts, k = desc.top_k;
    G = desc.groups ? desc.groups : 1;
    eps = desc.noise_epsilon != 0.0f ? desc.noise_epsilon : 0.01f;
    if (too_much((double)T * E * 8)) return;
    null_desc = rare(64), null_tensors = rare(64), null_grads = backward && rare(64);
    if (null_desc || null_tensors || null_grads || gate_size_bad(T, E, k) || G < 1 || G > FLEXMOE_GATE_MAX_GROUPS ||
        !(eps >= 0.0f && eps <= FLT_MAX))
        set_bad(__LINE__);
    memset(&t, 0, sizeof t);
    memset(&g, 0, sizeof g);
    t.ld_clean = ldim(E), t.ld_noise = ldim(E), t.ld_indices = ldim(k), t.ld_gates = ldim(k), t.ld_noisy = ldim(E);
    t.clean_logits = fmat(T, E, gate_ld(t.ld_clean, E), IN);
    t.noise_logits = fmat(T, E, gate_ld(t.ld_noise, E), desc.training ? IN : (IN | OPT | NOCHECK));
    t.token_group = imat(1, T, T, IN | OPT, 0, G > 0 ? G : 1, &oor_groups);
    run_forward = backward && (u8() & 1);
    t.indices = imat(T, k, gate_ld(t.ld_indices, k), backward ? IN : (OUT | NOFILL), 0, E > 0 ? E : 1,
                     backward ? &oor_idx : NULL);
    t.gates = fmat(T, k, gate_ld(t.ld_gates, k), backward ? IN : (OUT | NOFILL));
    if (!backward) {
        t.noisy_logits = fmat(T, E, gate_ld(t.ld_noisy, E), OUT | OPT | NOFILL);
        t.importance = fvec((int64_t)G * E, OUT | OPT | NOFILL);
        t.load = fvec((int64_t)G * E, OUT | OPT | NOFILL);
    } else {
        g.ld_d_gates = ldim(k), g.ld_d_noisy = ldim(E), g.ld_d_clean = ldim(E), g.ld_d_noise = ldim(E);
        g.d_gates = fmat(T, k, gate_ld(g.ld_d_gates, k), IN | OPT);
        g.d_importance = fvec((int64_t)G * E, IN | OPT);
        g.d_load = fvec((int64_t)G * E, IN | OPT);
        g.d_noisy_logits = fmat(T, E, gate_ld(g.ld_d_noisy, E), IN | OPT);
        g.d_clean_logits = fmat(T, E, gate_ld(g.ld_d_clean, E), OUT | NOFILL);
        g.d_noise_logits = fmat(T, E, gate_ld(g.ld_d_noise, E), desc.training ? (OUT | NOFILL) : (OUT | OPT | NOFILL | NOCHECK));
    }
    if (g_huge && !g_bad) return;
    /* the backward reads the indices before it checks the gradients (reported) */
    if (oor_groups || oor_idx) set_bad(__LINE__);
    if (run_forward && !g_bad) { /* the backward of a real forward */
        fm_gate_tensors f = t;
        if (fm_noisy_gate_forward(&desc, &f) != FM_OK) die("the forward failed on the backward's valid arguments");
    }
    snap_all();
    TRACE("%s(desc %s: tokens %d experts %d top_k %d training %d groups %d noise_epsilon %g seed %llu token_offset %llu; tensors %s: ld_clean %d ld_noise %d noise %s token_group %s ld_indices %d ld_gates %d noisy %s ld_noisy %d importance %s load %s; grads %s: d_gates %s ld %d, d_importance %s, d_load %s, d_noisy %s ld %d, d_clean ld %d, d_noise %s ld %d; forward first %d)", g_fn, null_desc ? "NULL" : "", desc.tokens, desc.experts, desc.top_k, desc.training, desc.groups, (double)desc.noise_epsilon, (unsigned long long)desc.seed, (unsigned long long)desc.token_offset, null_tensors ? "NULL" : "", t.ld_clean, t.ld_noise, t.noise_logits ? "yes" : "NULL", t.token_group ? "yes" : "NULL", t.ld_indices, t.ld_gates, t.noisy_logits ? "yes" : "NULL", t.ld_noisy, t.importance ? "yes" : "NULL", t.load ? "yes" : "NULL", null_grads ? "NULL" : "", g.d_gates ? "yes" : "NULL", g.ld_d_gates, g.d_importance ? "yes" : "NULL", g.d_load ? "yes" : "NULL", g.d_noisy_logits ? "yes" : "NULL", g.ld_d_noisy, g.ld_d_clean, g.d_noise_logits ? "yes" : "NULL", g.ld_d_noise, run_forward);
    if (backward)
        st = fm_noisy_gate_backward(null_desc ? NULL : &desc, null_tensors ? NULL : &t, null_grads ? NULL : &g);
    else
        st = fm_noisy_gate_forward(null_desc ? NULL : &desc, null_tensors ? NULL : &t);
    if (!after_call(st) || backward) return;
    /* forward promises */
    for (tok = 0; tok < T; tok++) {
        const int32_t *idx = t.indices + (size_t)tok * gate_ld(t.ld_indices, k);
        const float *gates = t.gates + (size_t)tok * gate_ld(t.ld_gates, k);
        const float *clean = t.clean_logits + (size_t)tok * gate_ld(t.ld_clean, E);
        const float *noisy = desc.training ? (t.noisy_logits ? t.noisy_logits + (size_t)tok * gate_ld(t.ld_noisy, E) : NULL)
                                           : clean;
        for (i = 0; i < k; i++) {
            CHECK(idx[i] >= 0 && idx[i] < E, "token %d: index %d = %d outside [0, %d) (training %d, eps %g)", tok, i,
                  idx[i], E, desc.training, (double)eps);
            for (e = 0; e < i; e++) CHECK(idx[e] != idx[i], "token %d: expert %d selected twice", tok, idx[i]);
        }
        if (t.noisy_logits && !desc.training)
            for (e = 0; e < E; e++)
                CHECK(same_or_both_nan(t.noisy_logits[(size_t)tok * gate_ld(t.ld_noisy, E) + e], clean[e]),
                      "inference: noisy[%d][%d] = %g, clean %g", tok, e,
                      (double)t.noisy_logits[(size_t)tok * gate_ld(t.ld_noisy, E) + e], (double)clean[e]);
        if (t.noisy_logits && desc.training) { /* noisy = clean + n * (softplus(r) + eps) */
            const float *r = t.noise_logits + (size_t)tok * gate_ld(t.ld_noise, E);
            for (e = 0; e < E; e++) {
                const double n = fm_gate_noise(desc.seed, desc.token_offset + (uint64_t)tok, e);
                const double sd = (r[e] > 30.0f ? (double)r[e] : log1p(exp((double)r[e]))) + eps;
                const double ref = clean[e] + n * sd;
                if (is_finite(clean[e]) && is_finite(r[e]) && sd < 3e38 && isfinite(ref) && fabs(ref) < 1e37)
                    CHECK(fabs(noisy[e] - ref) <= 1e-4 * (fabs(clean[e]) + fabs(n * sd)) + 1e-30,
                          "token %d expert %d: noisy %.9g, reference %.9g (clean %g, r %g, n %g, eps %g)", tok, e,
                          (double)noisy[e], ref, (double)clean[e], (double)r[e], n, (double)eps);
            }
        }
        if (noisy) {
            check_topk_row(noisy, E, k, idx, g_fn);
            check_gate_weights(noisy, E, k, idx, gates, 1, g_fn, tok);
        }
    }
    if (t.importance || t.load) {
        int grp;
        for (grp = 0; grp < G; grp++) {
            int members = 0;
            for (tok = 0; tok < T; tok++) members += (t.token_group ? t.token_group[tok] : 0) == grp;
            for (e = 0; e < E; e++) {
                double sum = 0.0;
                int count = 0, nan = 0;
                for (tok = 0; tok < T; tok++) {
                    if ((t.token_group ? t.token_group[tok] : 0) != grp) continue;
                    for (i = 0; i < k; i++) {
                        const float gv = t.gates[(size_t)tok * gate_ld(t.ld_gates, k) + i];
                        if (t.indices[(size_t)tok * gate_ld(t.ld_indices, k) + i] != e) continue;
                        count++;
                        sum += gv;
                        nan |= gv != gv;
                    }
                }
                if (t.importance && !nan && isfinite(sum))
                    CHECK(fabs(t.importance[(size_t)grp * E + e] - sum) <= 1e-4 * (count + 1),
                          "importance[%d][%d] = %.9g, the sum of its gates %.9g", grp, e,
                          (double)t.importance[(size_t)grp * E + e], sum);
                if (t.load) {
                    const float l = t.load[(size_t)grp * E + e];
                    if (!desc.training || k == E)
                        CHECK(l == (float)count, "load[%d][%d] = %g, %d tokens routed there (training %d, k %d, E %d)",
                              grp, e, (double)l, count, desc.training, k, E);
                    else
                        CHECK(l != l || (l >= 0.0f && l <= members * (1.0f + 1e-5f) + 1e-5f),
                              "load[%d][%d] = %g outside [0, %d tokens of the group]", grp, e, (double)l, members);
                }
            }
        }
    }
}

static void fuzz_gate_noise_forward(void) {
    fm_gate_desc desc;
    int T, E, ldc, ldn, ldy, lds, null_desc, tok, e;
    float *clean, *noise, *noisy, *std, eps;
    fm_status st;
    fuzz_gate_desc(&desc, 0);
    T = desc.tokens, E = desc.experts;
    ldc = ldim(E), ldn = ldim(E), ldy = ldim(E), lds = ldim(E);
    eps = desc.noise_epsilon != 0.0f ? desc.noise_epsilon : 0.01f;
    if (too_much((double)T * E * 8)) return;
    null_desc = rare(64);
    if (null_desc || !(eps >= 0.0f && eps <= FLT_MAX)) set_bad(__LINE__);
    clean = fmat(T, E, ldc, IN);
    noise = fmat(T, E, ldn, IN);
    noisy = fmat(T, E, ldy, OUT | NOFILL);
    std = fmat(T, E, lds, OUT | OPT | NOFILL);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_gate_noise_forward(desc %s: tokens %d experts %d noise_epsilon %g seed %llu token_offset %llu; ldc %d ldn %d ldy %d std %s lds %d)", null_desc ? "NULL" : "", T, E, (double)desc.noise_epsilon, (unsigned long long)desc.seed, (unsigned long long)desc.token_offset, ldc, ldn, ldy, std ? "yes" : "NULL", lds);
    st = fm_gate_noise_forward(null_desc ? NULL : &desc, clean, ldc, noise, ldn, noisy, ldy, std, lds);
    if (!after_call(st)) return;
    for (tok = 0; tok < T; tok++)
        for (e = 0; e < E; e++) {
            const float c = clean[(size_t)tok * ldc + e], r = noise[(size_t)tok * ldn + e];
            const float y = noisy[(size_t)tok * ldy + e];
            const double n = fm_gate_noise(desc.seed, desc.token_offset + (uint64_t)tok, e);
            const double sd = (r > 30.0f ? (double)r : log1p(exp((double)r))) + eps, ref = c + n * sd;
            if (std && is_finite(r) && sd < 3e38) {
                const float s = std[(size_t)tok * lds + e];
                CHECK(fabs(s - sd) <= 1e-5 * sd + 1e-30 || (sd > 3.4e38 && s == INFINITY),
                      "std[%d][%d] = %.9g, softplus(%g) + %g = %.9g", tok, e, (double)s, (double)r, (double)eps, sd);
            }
            if (is_finite(c) && is_finite(r) && sd < 3e38 && isfinite(ref) && fabs(ref) < 1e37)
                CHECK(fabs(y - ref) <= 1e-4 * (fabs(c) + fabs(n * sd)) + 1e-30,
                      "noisy[%d][%d] = %.9g, reference %.9g (clean %g, r %g, n %g, eps %g)", tok, e, (double)y, ref,
                      (double)c, (double)r, n, (double)eps);
        }
}

static void fuzz_gate_load_forward(void) {
    fm_gate_desc desc;
    int T, E, k, G, ldc, ldn, lds, ldv, null_desc, oor = 0, grp, e, tok;
    float *clean, *noisy, *std, *top, *load;
    int32_t *groups;
    fm_status st;
    fuzz_gate_desc(&desc, 1);
    T = desc.tokens, E = desc.experts, k = desc.top_k;
    G = desc.groups ? desc.groups : 1;
    ldc = ldim(E), ldn = ldim(E), lds = ldim(E), ldv = ldim(k > 0 && k < INT_MAX ? k + 1 : k);
    if (too_much((double)T * E * 4)) return;
    null_desc = rare(64);
    if (null_desc || gate_size_bad(T, E, k) || k >= E || G < 1 || G > FLEXMOE_GATE_MAX_GROUPS) set_bad(__LINE__);
    clean = fmat(T, E, ldc, IN);
    noisy = fmat(T, E, ldn, IN);
    std = fmat(T, E, lds, IN);
    top = fmat(T, k > 0 && k < INT_MAX ? k + 1 : k, ldv, IN);
    if (rare(3) && !g_bad && !g_huge) { /* the real top k + 1 of the noisy logits */
        int32_t *scratch = (int32_t *)malloc(sizeof(int32_t) * (size_t)T * (k + 1));
        if (!scratch) abort();
        if (fm_topk(T, E, k + 1, noisy, ldn, scratch, k + 1, top, ldv) != FM_OK) die("fm_topk failed on valid arguments");
        free(scratch);
    }
    groups = imat(1, T, T, IN | OPT, 0, G > 0 ? G : 1, &oor);
    load = fvec((int64_t)G * E, OUT | NOFILL);
    if (g_huge && !g_bad) return;
    if (oor) set_bad(__LINE__);
    snap_all();
    TRACE("fm_gate_load_forward(desc %s: tokens %d experts %d top_k %d groups %d; ldc %d ldn %d lds %d ldv %d token_group %s)", null_desc ? "NULL" : "", T, E, k, desc.groups, ldc, ldn, lds, ldv, groups ? "yes" : "NULL");
    st = fm_gate_load_forward(null_desc ? NULL : &desc, clean, ldc, noisy, ldn, std, lds, top, ldv, groups, load);
    if (!after_call(st)) return;
    for (grp = 0; grp < G; grp++) {
        int members = 0;
        for (tok = 0; tok < T; tok++) members += (groups ? groups[tok] : 0) == grp;
        for (e = 0; e < E; e++) {
            const float l = load[(size_t)grp * E + e];
            CHECK(l != l || (l >= 0.0f && l <= members * (1.0f + 1e-5f) + 1e-5f),
                  "load[%d][%d] = %g outside [0, %d tokens of the group]", grp, e, (double)l, members);
        }
    }
}

static void fuzz_gate_noise(void) {
    const uint64_t seed = u64(), token = rare(2) ? UINT64_MAX - u16() : u64();
    const int expert = rare(3) ? special_int() : (int)u16();
    float n, again;
    n = fm_gate_noise(seed, token, expert), again = fm_gate_noise(seed, token, expert);
    CHECK(is_finite(n) && fabsf(n) < 6.0f, "fm_gate_noise(%llu, %llu, %d) = %g", (unsigned long long)seed,
          (unsigned long long)token, expert, (double)n);
    CHECK(memcmp(&n, &again, 4) == 0, "fm_gate_noise is not deterministic");
}

static void fuzz_gate_logits(int backward) {
    const int T = dim(64, 300), D = dim(64, 300), E = dim(64, 1100), ldx = ldim(D), lddx = ldim(D);
    const int with_noise = u8() & 1, mismatch = rare(16);
    float *x, *wg, *wn, *clean = NULL, *noise = NULL, *dc = NULL, *dn = NULL, *dx = NULL, *dwg = NULL, *dwn = NULL;
    fm_status st;
    int tok, i, e;
    if (too_much((double)T * D * E * 2)) return;
    x = fmat(T, D, ldx, IN);
    wg = fmat(D, E, E, IN);
    wn = with_noise ? fmat(D, E, E, IN | KEEP) : NULL;
    if (!backward) {
        clean = fmat(T, E, E, OUT | NOFILL);
        noise = (with_noise ^ mismatch) ? fmat(T, E, E, OUT | NOFILL | KEEP) : NULL;
        if (!wn != !noise) set_bad(__LINE__);
    } else {
        dc = fmat(T, E, E, IN);
        dn = (with_noise ^ mismatch) ? fmat(T, E, E, IN | KEEP) : NULL;
        dx = fmat(T, D, lddx, OUT | OPT | NOFILL);
        dwg = fvec((int64_t)D * E, OUT | OPT | NOFILL | NOCHECK);
        dwn = (u8() & 1) ? fvec((int64_t)D * E, OUT | NOFILL | NOCHECK | KEEP) : NULL;
        if (!wn != !dn || (dwn && !dn)) set_bad(__LINE__);
    }
    if (g_huge && !g_bad) return;
    snap_all();
    if (!backward) {
        TRACE("fm_gate_logits_forward(tokens %d dim %d experts %d ldx %d w_noise %s noise %s)", T, D, E, ldx, wn ? "yes" : "NULL", noise ? "yes" : "NULL");
        st = fm_gate_logits_forward(T, D, E, x, ldx, wg, wn, clean, noise);
        if (!after_call(st)) return;
        for (tok = 0; tok < T; tok++)
            for (e = 0; e < E; e++) {
                double ref = 0.0, scale = 0.0;
                int ok = 1;
                for (i = 0; i < D; i++) {
                    const float a = x[(size_t)tok * ldx + i], b = wg[(size_t)i * E + e];
                    ok &= is_finite(a) && is_finite(b);
                    ref += (double)a * b;
                    scale += fabs((double)a * b);
                }
                if (ok && scale < 1e30)
                    CHECK(fabs(clean[(size_t)tok * E + e] - ref) <= 1e-4 * scale + 1e-30, "clean[%d][%d] = %.9g, ref %.9g",
                          tok, e, (double)clean[(size_t)tok * E + e], ref);
            }
    } else {
        TRACE("fm_gate_logits_backward(tokens %d dim %d experts %d ldx %d w_noise %s d_noise %s dx %s lddx %d dw_gate %s dw_noise %s)", T, D, E, ldx, wn ? "yes" : "NULL", dn ? "yes" : "NULL", dx ? "yes" : "NULL", lddx, dwg ? "yes" : "NULL", dwn ? "yes" : "NULL");
        st = fm_gate_logits_backward(T, D, E, x, ldx, wg, wn, dc, dn, dx, lddx, dwg, dwn);
        after_call(st);
    }
}

/* ---- router losses ------------------------------------------------------------------------ */

static void fuzz_cv_squared(void) {
    const int n = dim(70, 1100);
    float *v, *value, *dv;
    fm_status st;
    v = fvec(n, IN);
    value = fvec(1, OUT | NOFILL | KEEP);
    if (rare(48)) value = NULL, set_bad(__LINE__);
    dv = fvec(n, OUT | OPT | NOFILL | NOCHECK);
    if (n <= 0) set_bad(__LINE__);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_cv_squared(n %d, v %s, value %s, dv %s)", n, v ? "yes" : "NULL", value ? "yes" : "NULL", dv ? "yes" : "NULL");
    st = fm_cv_squared(n, v, value, dv);
    if (!after_call(st)) return;
    CHECK(!(*value < 0.0f), "cv^2 = %g < 0", (double)*value);
    if (n == 1) CHECK(*value == 0.0f && (!dv || dv[0] == 0.0f), "n == 1: cv^2 = %g", (double)*value);
}

static void fuzz_cross_entropy(void) {
    const int T = dim(64, 300), E = dim(64, 1100), ldl = ldim(E), lddl = ldim(E);
    float *logits, *value, *dl;
    int32_t *targets;
    int oor = 0, tok, e, counted = 0;
    fm_status st;
    if (too_much((double)T * E * 4)) return;
    logits = fmat(T, E, ldl, IN);
    targets = imat(1, T, T, IN, -2, E > 0 ? E : 1, NULL);
    if (targets && T > 0 && E > 0)
        for (tok = 0; tok < T; tok++) oor += targets[tok] >= E, counted += targets[tok] >= 0;
    value = fvec(1, OUT | NOFILL | KEEP);
    if (rare(48)) value = NULL, set_bad(__LINE__);
    dl = fmat(T, E, lddl, OUT | OPT | NOFILL);
    if (g_huge && !g_bad) return;
    if (oor) set_bad(__LINE__);
    snap_all();
    TRACE("fm_router_cross_entropy(tokens %d experts %d ldl %d targets %s value %s d_logits %s lddl %d)", T, E, ldl, targets ? "yes" : "NULL", value ? "yes" : "NULL", dl ? "yes" : "NULL", lddl);
    st = fm_router_cross_entropy(T, E, logits, ldl, targets, value, dl, lddl);
    if (!after_call(st)) return;
    CHECK(!(*value < -1e-6f), "cross-entropy %g < 0", (double)*value);
    if (!counted) CHECK(*value == 0.0f, "every target ignored, the loss is %g", (double)*value);
    if (dl)
        for (tok = 0; tok < T; tok++)
            if (targets[tok] < 0)
                for (e = 0; e < E; e++)
                    CHECK(dl[(size_t)tok * lddl + e] == 0.0f, "ignored token %d: d_logits[%d] = %g", tok, e,
                          (double)dl[(size_t)tok * lddl + e]);
}

static void fuzz_router_loss(void) {
    const int T = dim(64, 300), E = dim(64, 1100), G = rare(4) ? (int)(u8() % 11) - 1 : 1 + (int)(u8() % 8);
    const int ldl = ldim(E), lddl = ldim(E);
    float *logits, *imp, *load, *value, *dl, *dimp, *dload;
    int32_t *comb;
    int oor = 0, tok;
    fm_status st;
    if (too_much((double)T * E * 4 + (double)G * E)) return;
    if (G < 1 || G > FLEXMOE_GATE_MAX_GROUPS) set_bad(__LINE__);
    logits = fmat(T, E, ldl, IN);
    comb = imat(1, T, T, IN, 0, E > 0 ? E : 1, &oor);
    imp = fvec((int64_t)G * E, IN);
    load = fvec((int64_t)G * E, IN);
    value = fvec(1, OUT | NOFILL | KEEP);
    if (rare(48)) value = NULL, set_bad(__LINE__);
    dl = fmat(T, E, lddl, OUT | OPT | NOFILL);
    dimp = fvec((int64_t)G * E, OUT | OPT | NOFILL | NOCHECK);
    dload = fvec((int64_t)G * E, OUT | OPT | NOFILL | NOCHECK);
    if (g_huge && !g_bad) return;
    if (oor) set_bad(__LINE__);
    snap_all();
    TRACE("fm_flexmoe_router_loss(tokens %d experts %d groups %d ldl %d combination %s value %s d_noisy %s lddl %d d_importance %s d_load %s)", T, E, G, ldl, comb ? "yes" : "NULL", value ? "yes" : "NULL", dl ? "yes" : "NULL", lddl, dimp ? "yes" : "NULL", dload ? "yes" : "NULL");
    st = fm_flexmoe_router_loss(T, E, G, logits, ldl, comb, imp, load, value, dl, lddl, dimp, dload);
    if (!after_call(st)) return;
    CHECK(!(*value < -1e-6f), "router loss %g < 0", (double)*value);
    (void)tok;
}

/* ---- 5. LayerNorm and ConfSMoE ------------------------------------------------------------ */

static float fuzz_eps(void) {
    if (!rare(3)) return 0.0f;
    return palette(u8());
}

static void fuzz_layernorm_forward(void) {
    const int rows = dim(70, 600), cols = dim(70, 1100), ldx = ldim(cols), in_place = rare(4);
    const int ldy = in_place ? ldx : ldim(cols);
    const float eps_in = fuzz_eps(), eps = eps_in == 0.0f ? 1e-5f : eps_in;
    float *x, *y, *gamma, *beta, *mean, *rstd;
    fm_status st;
    int r, j;
    if (too_much((double)rows * cols * 4)) return;
    if (!(eps_in >= 0.0f)) set_bad(__LINE__);
    x = fmat(rows, cols, ldx, in_place ? OUT : IN);
    y = in_place ? x : fmat(rows, cols, ldy, OUT | NOFILL);
    gamma = fvec(cols, IN | OPT | NOCHECK);
    beta = fvec(cols, IN | OPT | NOCHECK);
    mean = fvec(rows, OUT | OPT | NOFILL | NOCHECK);
    rstd = fvec(rows, OUT | OPT | NOFILL | NOCHECK);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("fm_layernorm_forward(rows %d cols %d ldx %d gamma %s beta %s eps %g ldy %d mean %s rstd %s in_place %d)", rows, cols, ldx, gamma ? "yes" : "NULL", beta ? "yes" : "NULL", (double)eps_in, ldy, mean ? "yes" : "NULL", rstd ? "yes" : "NULL", in_place);
    st = fm_layernorm_forward(rows, cols, x, ldx, gamma, beta, eps_in, y, ldy, mean, rstd);
    if (!after_call(st)) return;
    for (r = 0; r < rows; r++) {
        const float *xr = before(x) + (size_t)r * ldx, *yr = y + (size_t)r * ldy;
        int special = 0, moderate = 1;
        double m = 0.0, var = 0.0, rs;
        for (j = 0; j < cols; j++) {
            special |= !is_finite(xr[j]);
            moderate &= fabsf(xr[j]) <= 1e18f;
        }
        if (special) {
            for (j = 0; j < cols; j++) CHECK(yr[j] != yr[j], "row %d has NaN/Inf, y[%d] = %g", r, j, (double)yr[j]);
            if (rstd) CHECK(rstd[r] != rstd[r], "row %d has NaN/Inf, rstd = %g", r, (double)rstd[r]);
            continue;
        }
        for (j = 0; j < cols; j++)
            if ((gamma && gamma[j] != gamma[j]) || (beta && beta[j] != beta[j]))
                CHECK(yr[j] != yr[j], "gamma/beta[%d] is NaN, y[%d][%d] = %g", j, r, j, (double)yr[j]);
        if (!moderate) continue;
        for (j = 0; j < cols; j++) m += xr[j];
        m /= cols;
        for (j = 0; j < cols; j++) var += ((double)xr[j] - m) * ((double)xr[j] - m);
        var /= cols;
        rs = 1.0 / sqrt(var + eps);
        if (rstd) CHECK(rstd[r] >= 0.0f && is_finite(rstd[r]), "row %d: rstd = %g", r, (double)rstd[r]);
        for (j = 0; j < cols; j++) {
            const double gj = gamma ? gamma[j] : 1.0, bj = beta ? beta[j] : 0.0;
            const double xhat = ((double)xr[j] - m) * rs, ref = xhat * gj + bj;
            const double tol = (2e-4 + 1e-5 * fabs(m) * rs) * fabs(gj) * (1.0 + fabs(xhat)) + 1e-6 * fabs(bj) + 1e-30;
            if (!isfinite(gj) || !isfinite(bj) || !isfinite(ref) || fabs(gj) > 1e30 || fabs(bj) > 1e30) continue;
            CHECK(fabs(yr[j] - ref) <= tol, "row %d col %d (%d cols): y = %.9g, reference %.9g (x %g, mean %g, rstd %g)",
                  r, j, cols, (double)yr[j], ref, (double)xr[j], m, rs);
        }
    }
}

static void fuzz_layernorm_backward(void) {
    const int rows = dim(70, 600), cols = dim(70, 1100), ldx = ldim(cols), lddy = ldim(cols), in_place = rare(4);
    const int lddx = in_place ? lddy : ldim(cols);
    const int from_forward = u8() & 1;
    float *x, *gamma, *mean, *rstd, *dy, *dx, *dgamma, *dbeta;
    fm_status st;
    int r, j;
    if (too_much((double)rows * cols * 6)) return;
    x = fmat(rows, cols, ldx, IN);
    gamma = fvec(cols, IN | OPT | NOCHECK);
    mean = fvec(rows, IN);
    rstd = fvec(rows, IN);
    dy = fmat(rows, cols, lddy, in_place ? OUT : IN);
    dx = in_place ? dy : fmat(rows, cols, lddx, OUT | NOFILL);
    dgamma = fvec(cols, OUT | OPT | NOFILL | NOCHECK);
    dbeta = fvec(cols, OUT | OPT | NOFILL | NOCHECK);
    if (g_huge && !g_bad) return;
    if (from_forward && !g_bad) {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)rows * cols);
        if (!scratch) abort();
        if (fm_layernorm_forward(rows, cols, x, ldx, gamma, NULL, 0.0f, scratch, cols, mean, rstd) != FM_OK)
            die("fm_layernorm_forward failed on the backward's valid arguments");
        free(scratch);
    }
    snap_all();
    TRACE("fm_layernorm_backward(rows %d cols %d ldx %d gamma %s lddy %d lddx %d dgamma %s dbeta %s in_place %d from_forward %d)", rows, cols, ldx, gamma ? "yes" : "NULL", lddy, lddx, dgamma ? "yes" : "NULL", dbeta ? "yes" : "NULL", in_place, from_forward);
    st = fm_layernorm_backward(rows, cols, x, ldx, gamma, mean, rstd, dy, lddy, dx, lddx, dgamma, dbeta);
    if (!after_call(st)) return;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx, *dyr = before(dy) + (size_t)r * lddy;
        int nan = mean[r] != mean[r] || rstd[r] != rstd[r];
        for (j = 0; j < cols; j++) nan |= xr[j] != xr[j] || dyr[j] != dyr[j];
        if (nan)
            for (j = 0; j < cols; j++)
                CHECK(dx[(size_t)r * lddx + j] != dx[(size_t)r * lddx + j], "row %d has a NaN, dx[%d] = %g", r, j,
                      (double)dx[(size_t)r * lddx + j]);
    }
    for (j = 0; j < cols; j++) {
        int nan_dy = 0;
        for (r = 0; r < rows; r++) nan_dy |= before(dy)[(size_t)r * lddy + j] != before(dy)[(size_t)r * lddy + j];
        if (nan_dy && dbeta) CHECK(dbeta[j] != dbeta[j], "a NaN in column %d of dy, dbeta = %g", j, (double)dbeta[j]);
        if (nan_dy && dgamma) CHECK(dgamma[j] != dgamma[j], "a NaN in column %d of dy, dgamma = %g", j, (double)dgamma[j]);
    }
}

static void fuzz_confsmoe_desc(fm_confsmoe_desc *d) {
    memset(d, 0, sizeof *d);
    d->tokens = dim(40, 200);
    d->experts = dim(16, 64);
    d->k = kdim(d->experts, 0);
    d->dim = dim(70, 300);
    d->classes = dim(12, 100);
    d->mode = rare(8) ? (fm_conf_mode)((int)(u8() % 4) - 1) : (fm_conf_mode)(u8() & 1);
    d->eps = fuzz_eps();
    d->probe_trains_experts = u8() & 1;
}

static int64_t confsmoe_floats(const fm_confsmoe_desc *d) {
    return 6 * (int64_t)d->tokens * d->k + 2 * (int64_t)d->tokens + 2 * (int64_t)d->experts + 2 * (int64_t)d->dim +
           d->classes;
}

static int confsmoe_shape_bad(const fm_confsmoe_desc *d) {
    return d->tokens <= 0 || d->k <= 0 || d->experts <= 0 || d->dim <= 0 || d->classes <= 0 || d->k > d->experts;
}

static void fuzz_confsmoe_saved_floats(void) {
    fm_confsmoe_desc d;
    size_t *floats = NULL;
    int null_desc;
    fm_status st;
    memset(&d, 0, sizeof d);
    d.tokens = rare(2) ? special_int() : dim(70, 100000);
    d.k = rare(2) ? special_int() : kdim(64, 0);
    d.experts = rare(2) ? special_int() : dim(64, 100000);
    d.dim = rare(2) ? special_int() : dim(70, 100000);
    d.classes = rare(2) ? special_int() : dim(70, 100000);
    null_desc = rare(32);
    floats = (size_t *)raw_alloc(1, sizeof(size_t), OUT);
    if (rare(32)) floats = NULL;
    if (null_desc || !floats || confsmoe_shape_bad(&d)) set_bad(__LINE__);
    if (!g_bad && ((int64_t)d.tokens * d.k > INT32_MAX || confsmoe_floats(&d) > (int64_t)(PTRDIFF_MAX / 4))) set_bad(__LINE__);
    snap_all();
    TRACE("fm_confsmoe_saved_floats(T %d k %d E %d d %d C %d)", d.tokens, d.k, d.experts, d.dim, d.classes);
    st = fm_confsmoe_saved_floats(null_desc ? NULL : &d, floats);
    if (!after_call(st)) return;
    CHECK((int64_t)*floats == confsmoe_floats(&d), "%zu floats, the formula says %lld", *floats,
          (long long)confsmoe_floats(&d));
}

static void fuzz_confsmoe(int backward) {
    fm_confsmoe_desc d;
    fm_confsmoe_params p;
    fm_confsmoe_grads gr;
    float eps, *x, *h, *out = NULL, *conf = NULL, *target = NULL, *losses = NULL, *saved, *dout = NULL, *dx = NULL,
                   *dh = NULL;
    int32_t *experts, *labels;
    int T, K, E, D, C, ldx, ldh, ldo, ldd, lddx, lddh, oor_e = 0, oor_l = 0, null_desc, null_params, null_grads,
                                                       run_forward, with_labels, shape_bad;
    float dloss_conf = 1.0f, dloss_probe = 1.0f;
    size_t s, slots;
    fm_status st;
    g_fn = backward ? "fm_confsmoe_backward" : "fm_confsmoe_forward";
    fuzz_confsmoe_desc(&d);
    T = d.tokens, K = d.k, E = d.experts, D = d.dim, C = d.classes;
    shape_bad = confsmoe_shape_bad(&d);
    eps = d.eps;
    ldx = ldim(D), ldh = ldim(D), ldo = ldim(D), ldd = ldim(D), lddx = ldim(D), lddh = ldim(D);
    if (!shape_bad && too_much((double)T * K * D * ((double)C + 6) * (backward ? 3 : 1))) return;
    null_desc = rare(64), null_params = rare(64), null_grads = rare(4);
    if (null_desc || null_params || shape_bad || !(eps >= 0.0f) || (d.mode != FM_CONF_TOKEN && d.mode != FM_CONF_EXPERT_MEAN))
        set_bad(__LINE__);
    memset(&p, 0, sizeof p);
    memset(&gr, 0, sizeof gr);
    with_labels = !(u8() & 3) ? 0 : 1;
    x = fmat(T, D, ldx, IN);
    h = fmat(shape_bad ? 0 : clamp_int((int64_t)T * K), D, ldh, IN);
    p.w = fmat(E, D, D, IN);
    p.b = fvec(E, IN);
    p.gamma = fvec(D, IN | OPT | NOCHECK);
    p.beta = fvec(D, IN | OPT | NOCHECK);
    labels = with_labels ? imat(1, T, T, IN | NOCHECK, 0, C > 0 ? C : 1, &oor_l) : NULL; /* NULL is allowed */
    p.probe_w = fmat(shape_bad ? 0 : clamp_int((int64_t)E * C), D, D, labels ? IN : (IN | OPT | NOCHECK));
    p.probe_b = fvec(shape_bad ? 0 : (int64_t)E * C, labels ? IN : (IN | OPT | NOCHECK));
    experts = imat(1, shape_bad ? 0 : clamp_int((int64_t)T * K), shape_bad ? 0 : clamp_int((int64_t)T * K), IN, 0,
                   E > 0 ? E : 1, &oor_e);
    saved = fvec(shape_bad ? 0 : confsmoe_floats(&d), OUT);
    if (!backward) {
        out = fmat(T, D, ldo, OUT | NOFILL);
        conf = fvec(shape_bad ? 0 : (int64_t)T * K, OUT | OPT | NOFILL | NOCHECK);
        target = fvec(shape_bad ? 0 : (int64_t)T * K, OUT | OPT | NOFILL | NOCHECK);
        losses = fvec(2, OUT | OPT | NOFILL | NOCHECK);
    } else {
        run_forward = u8() & 1;
        dout = fmat(T, D, ldd, IN);
        dx = fmat(T, D, lddx, OUT | NOFILL);
        dh = fmat(shape_bad ? 0 : clamp_int((int64_t)T * K), D, lddh, OUT | NOFILL);
        dloss_conf = (u8() & 3) ? 1.0f : palette(u8());
        dloss_probe = (u8() & 3) ? 1.0f : palette(u8());
        gr.w = fmat(E, D, D, OUT | OPT | NOFILL | NOCHECK);
        gr.b = fvec(E, OUT | OPT | NOFILL | NOCHECK);
        gr.gamma = fvec(D, OUT | OPT | NOFILL | NOCHECK);
        gr.beta = fvec(D, OUT | OPT | NOFILL | NOCHECK);
        gr.probe_w = fmat(shape_bad ? 0 : clamp_int((int64_t)E * C), D, D, OUT | OPT | NOFILL | NOCHECK);
        gr.probe_b = fvec(shape_bad ? 0 : (int64_t)E * C, OUT | OPT | NOFILL | NOCHECK);
        if (!g_bad && !g_huge && !oor_e && !oor_l && run_forward) {
            float *scratch = (float *)malloc(sizeof(float) * (size_t)T * D);
            if (!scratch) abort();
            if (fm_confsmoe_forward(&d, &p, experts, labels, x, ldx, h, ldh, scratch, D, NULL, NULL, NULL, saved) != FM_OK)
                die("fm_confsmoe_forward failed on the backward's valid arguments");
            free(scratch);
        }
    }
    if (g_huge && !g_bad) return;
    if (oor_e || oor_l) set_bad(__LINE__);
    snap_all();
    TRACE("%s(desc %s: T %d k %d E %d d %d C %d mode %d eps %g probe_trains_experts %d; params %s gamma %s beta %s probe %s; labels %s; ldx %d ldh %d ldout %d conf %s target %s losses %s; lddout %d lddx %d lddh %d dloss %g %g grads %s)", g_fn, null_desc ? "NULL" : "", T, K, E, D, C, (int)d.mode, (double)d.eps, d.probe_trains_experts, null_params ? "NULL" : "", p.gamma ? "yes" : "NULL", p.beta ? "yes" : "NULL", p.probe_w ? "yes" : "NULL", labels ? "yes" : "NULL", ldx, ldh, ldo, conf ? "yes" : "NULL", target ? "yes" : "NULL", losses ? "yes" : "NULL", ldd, lddx, lddh, (double)dloss_conf, (double)dloss_probe, null_grads ? "NULL" : "");
    if (backward) {
        st = fm_confsmoe_backward(null_desc ? NULL : &d, null_params ? NULL : &p, experts, labels, x, ldx, h, ldh, dout,
                                  ldd, dloss_conf, dloss_probe, saved, dx, lddx, dh, lddh, null_grads ? NULL : &gr);
        after_call(st);
        return;
    }
    st = fm_confsmoe_forward(null_desc ? NULL : &d, null_params ? NULL : &p, experts, labels, x, ldx, h, ldh, out, ldo,
                             conf, target, losses, saved);
    if (!after_call(st)) return;
    slots = (size_t)T * K;
    for (s = 0; s < slots; s++) {
        if (conf) CHECK(conf[s] != conf[s] || (conf[s] >= 0.0f && conf[s] <= 1.0f), "conf[%zu] = %g", s, (double)conf[s]);
        if (target && labels)
            CHECK(target[s] != target[s] || (target[s] >= 0.0f && target[s] <= 1.0f), "target[%zu] = %g", s,
                  (double)target[s]);
    }
    if (losses && labels)
        CHECK(!(losses[0] < 0.0f) && !(losses[1] < -1e-6f), "losses %g %g", (double)losses[0], (double)losses[1]);
    if (!labels && target) {
        buffer *b = find_buffer(target);
        CHECK(memcmp(b->snap, b->p, b->bytes) == 0, "labels NULL but target was written");
    }
    if (!labels && losses) {
        buffer *b = find_buffer(losses);
        CHECK(memcmp(b->snap, b->p, b->bytes) == 0, "labels NULL but losses were written");
    }
}

/* ---- 6. routing plan, dispatch, combine --------------------------------------------------- */

static float fuzz_capacity(void) {
    const unsigned b = u8();
    static const float values[] = {0.5f, 1.0f, 1.25f, 2.0f, 0.01f, 1e-30f, 1e30f, 0.3f};
    if (b < 128) return 0.0f;
    if (b < 224) return values[b % 8];
    return palette(u8());
}

typedef struct {
    fm_plan_desc desc;
    fm_routing_plan plan;
    int32_t *indices;
    float *gates;
    int ldi, ldg;
} plan_case;

/* Fuzzes a desc and its inputs and builds a plan. build_is_call: the build is the call under test. */
static int make_plan(plan_case *c, int build_is_call, int big) {
    int T, k, E, oor = 0, null_desc, null_plan, null_array, e;
    size_t a;
    fm_status st;
    memset(c, 0, sizeof *c);
    c->desc.tokens = T = big ? 2048 + (int)u8() : dim(64, 1000);
    c->desc.experts = E = dim(32, 1100);
    c->desc.top_k = k = big ? 1 : kdim(E, 8);
    c->desc.capacity_factor = fuzz_capacity();
    c->desc.drop_policy = rare(16) ? (fm_drop_policy)((int)(u8() % 4) - 1) : (fm_drop_policy)(u8() & 1);
    c->ldi = ldim(k), c->ldg = ldim(k);
    if (T > 0 && k > 0 && !big && too_much((double)T * k * 8)) return 0;
    if (!build_is_call && (T <= 0 || k <= 0 || E <= 0 || k > E || (int64_t)T * k > 100000)) return 0;
    null_desc = build_is_call && rare(64), null_plan = build_is_call && rare(64);
    if (T <= 0 || k <= 0 || E <= 0 || k > E || !(c->desc.capacity_factor >= 0.0f) ||
        (unsigned)c->desc.drop_policy > FM_DROP_BY_GATE || null_desc || null_plan)
        set_bad(__LINE__);
    c->indices = imat(T, k, c->ldi, IN, 0, E > 0 ? E : 1, &oor);
    c->gates = fmat(T, k, c->ldg,
                    c->desc.capacity_factor > 0.0f && c->desc.drop_policy == FM_DROP_BY_GATE ? IN : (IN | OPT | NOCHECK));
    null_array = build_is_call && rare(32) ? 1 + (int)(u8() % 4) : 0;
    c->plan.counts = null_array == 1 ? NULL : (int32_t *)raw_alloc(E > 0 ? (uint64_t)E : 1, 4, OUT);
    c->plan.offsets = null_array == 2 ? NULL : (int32_t *)raw_alloc(E > 0 ? (uint64_t)E + 1 : 1, 4, OUT);
    c->plan.order = null_array == 3 ? NULL : (int32_t *)raw_alloc(T > 0 && k > 0 ? (uint64_t)T * k : 1, 4, OUT);
    c->plan.position = null_array == 4 ? NULL : (int32_t *)raw_alloc(T > 0 && k > 0 ? (uint64_t)T * k : 1, 4, OUT);
    c->plan.dropped_per_expert = (u8() & 1) ? NULL : (int32_t *)raw_alloc(E > 0 ? (uint64_t)E : 1, 4, OUT);
    if (null_array) set_bad(__LINE__);
    if (g_huge && !g_bad) return 0;
    if (oor) set_bad(__LINE__);
    if (!build_is_call) {
        if (g_bad) return 0;
        if (fm_routing_plan_build(&c->desc, c->indices, c->ldi, c->gates, c->ldg, &c->plan) != FM_OK)
            die("fm_routing_plan_build failed on valid arguments");
        return 1;
    }
    snap_all();
    g_fn = "fm_routing_plan_build";
    TRACE("fm_routing_plan_build(tokens %d top_k %d experts %d capacity_factor %g drop_policy %d; ldi %d gates %s ldg %d dropped_per_expert %s)", T, k, E, (double)c->desc.capacity_factor, (int)c->desc.drop_policy, c->ldi, c->gates ? "yes" : "NULL", c->ldg, c->plan.dropped_per_expert ? "yes" : "NULL");
    st = fm_routing_plan_build(null_desc ? NULL : &c->desc, c->indices, c->ldi, c->gates, c->ldg, null_plan ? NULL : &c->plan);
    if (!after_call(st)) return 0;
    /* promises of a plan */
    {
        const fm_routing_plan *p = &c->plan;
        const size_t n = (size_t)T * k;
        const int by_gate = c->desc.drop_policy == FM_DROP_BY_GATE && c->desc.capacity_factor > 0.0f;
        double cap = INFINITY;
        int kept_total = 0, dropped_total = 0;
        int *routed = (int *)calloc((size_t)E, sizeof(int));
        int32_t *worst_kept = (int32_t *)malloc((size_t)E * sizeof(int32_t));
        int32_t *best_dropped = (int32_t *)malloc((size_t)E * sizeof(int32_t));
        unsigned char *nan_gate = (unsigned char *)calloc((size_t)E, 1);
        if (!routed || !worst_kept || !best_dropped || !nan_gate) abort();
        if (c->desc.capacity_factor > 0.0f) {
            cap = ceil((double)c->desc.capacity_factor * (double)n / E);
            if (cap < 1.0) cap = 1.0;
        }
        CHECK(p->tokens == T && p->top_k == k && p->experts == E, "the plan's sizes are not the desc's");
        CHECK(p->offsets[0] == 0, "offsets[0] = %d", p->offsets[0]);
        for (a = 0; a < n; a++) {
            const int ex = c->indices[(a / k) * c->ldi + a % k];
            routed[ex]++;
            if (by_gate && c->gates[(a / k) * c->ldg + a % k] != c->gates[(a / k) * c->ldg + a % k]) nan_gate[ex] = 1;
        }
        for (e = 0; e < E; e++) {
            const int kept = p->counts[e];
            int32_t last = -1;
            int r;
            worst_kept[e] = best_dropped[e] = -1;
            CHECK(p->offsets[e + 1] - p->offsets[e] == kept, "expert %d: counts %d, offsets %d..%d", e, kept,
                  p->offsets[e], p->offsets[e + 1]);
            CHECK(kept == (routed[e] < cap ? routed[e] : (int)cap), "expert %d: %d routed, capacity %g, %d kept", e,
                  routed[e], cap, kept);
            if (p->dropped_per_expert)
                CHECK(p->dropped_per_expert[e] == routed[e] - kept, "expert %d: dropped_per_expert %d, %d routed, %d kept",
                      e, p->dropped_per_expert[e], routed[e], kept);
            kept_total += kept;
            dropped_total += routed[e] - kept;
            for (r = p->offsets[e]; r < p->offsets[e + 1]; r++) {
                const int32_t as = p->order[r];
                CHECK(as >= 0 && (size_t)as < n, "order[%d] = %d outside [0, %zu)", r, as, n);
                CHECK(c->indices[(size_t)(as / k) * c->ldi + as % k] == e, "row %d of expert %d holds assignment %d of expert %d",
                      r, e, as, c->indices[(size_t)(as / k) * c->ldi + as % k]);
                CHECK(as > last, "expert %d's rows are not in assignment order (%d after %d)", e, as, last);
                CHECK(p->position[as] == r, "position[%d] = %d, order says row %d", as, p->position[as], r);
                last = as;
            }
        }
        CHECK(p->rows == kept_total && p->offsets[E] == kept_total, "rows %d, offsets[E] %d, %d kept", p->rows, p->offsets[E],
              kept_total);
        CHECK(p->dropped == dropped_total, "dropped %d, counted %d", p->dropped, dropped_total);
        /* the kept ones of each expert all come before its dropped ones in the drop order */
#define GATE_OF(as) (c->gates[(size_t)((as) / k) * c->ldg + (as) % k])
#define DROP_BEFORE(x, y) (!by_gate ? (x) < (y) \
                           : GATE_OF(x) > GATE_OF(y) || (GATE_OF(x) == GATE_OF(y) && (x) < (y)))
        for (a = 0; a < n; a++) {
            const int32_t pos = p->position[a], as = (int32_t)a;
            const int ex = c->indices[(a / k) * c->ldi + a % k];
            CHECK(pos == -1 || (pos >= 0 && pos < p->rows), "position[%zu] = %d (rows %d)", a, pos, p->rows);
            if (pos >= 0) {
                if (worst_kept[ex] < 0 || DROP_BEFORE(worst_kept[ex], as)) worst_kept[ex] = as;
            } else {
                if (best_dropped[ex] < 0 || DROP_BEFORE(as, best_dropped[ex])) best_dropped[ex] = as;
            }
        }
        for (e = 0; e < E; e++)
            if (worst_kept[e] >= 0 && best_dropped[e] >= 0 && !nan_gate[e])
                CHECK(DROP_BEFORE(worst_kept[e], best_dropped[e]),
                      "expert %d (policy %d): assignment %d dropped but %d kept (gates %g, %g)", e,
                      (int)c->desc.drop_policy, best_dropped[e], worst_kept[e],
                      by_gate ? (double)GATE_OF(best_dropped[e]) : 0.0, by_gate ? (double)GATE_OF(worst_kept[e]) : 0.0);
#undef DROP_BEFORE
#undef GATE_OF
        free(routed), free(worst_kept), free(best_dropped), free(nan_gate);
    }
    return 1;
}

static void fuzz_plan_build(void) {
    plan_case c;
    make_plan(&c, 1, 0);
}

#ifdef FUZZ_CORRUPT_PLAN
static void maybe_corrupt(fm_routing_plan *p) {
    if (rare(8)) p->rows = (int)(u8() % (unsigned)(p->rows + 1));
}
#else
#define maybe_corrupt(p) ((void)(p))
#endif

static void fuzz_dispatch_combine(int which) {
    static const char *const names[] = {"fm_dispatch_forward", "fm_dispatch_backward", "fm_combine_forward",
                                        "fm_combine_backward"};
    plan_case c;
    fm_routing_plan *p;
    int D, T, k, rows, t, i, j, ld1, ld2, ld3, ld4, ld5, null_plan;
    float *x = NULL, *xe = NULL, *ye = NULL, *gates = NULL, *y = NULL, *dye = NULL, *dg = NULL;
    fm_status st;
    /* big: outputs past FM__STREAM_MIN_BYTES (8 MiB), written with streaming stores */
    const int big = rare(24);
    if (!make_plan(&c, 0, big)) return;
    g_fn = names[which];
    p = &c.plan;
    T = p->tokens, k = p->top_k, rows = p->rows;
    D = big ? 1024 + (int)(u8() % 97) : dim(70, 600);
    if (!big && too_much((double)T * k * (D > 0 ? D : 1) * 2)) return;
    ld1 = ldim(D), ld2 = ldim(D), ld3 = ldim(k), ld4 = ldim(D), ld5 = ldim(k);
    snap_all(); /* the plan's arrays are the build's now: inputs from here on */
    for (i = 0; i < nbufs; i++) bufs[i].out = 0;
    null_plan = rare(64);
    if (null_plan || D <= 0) set_bad(__LINE__);
    maybe_corrupt(p);
    TRACE("plan: tokens %d top_k %d experts %d capacity_factor %g drop_policy %d -> rows %d dropped %d; %s dim %d, lds %d %d %d %d %d", T, k, p->experts, (double)c.desc.capacity_factor, (int)c.desc.drop_policy, p->rows, p->dropped, g_fn, D, ld1, ld2, ld3, ld4, ld5);
    switch (which) {
    case 0: /* dispatch forward: x (T x D) -> xe (rows x D) */
        x = fmat(T, D, ld1, IN);
        xe = fmat(rows, D, ld2, OUT | NOFILL | (rows == 0 ? OPT | NOCHECK : 0));
        if (g_huge && !g_bad) return;
        snap_all();
        st = fm_dispatch_forward(null_plan ? NULL : p, D, x, ld1, xe, ld2);
        if (!after_call(st)) return;
        for (j = 0; j < rows; j++) {
            const int32_t tok = p->order[j] / k;
            CHECK(memcmp(xe + (size_t)j * ld2, x + (size_t)tok * ld1, (size_t)D * 4) == 0, "xe[%d] is not x[%d]", j, tok);
        }
        break;
    case 1: /* dispatch backward: dxe (rows x D) -> dx (T x D) */
        xe = fmat(rows, D, ld2, IN | (rows == 0 ? OPT | NOCHECK : 0));
        x = fmat(T, D, ld1, OUT | NOFILL);
        if (g_huge && !g_bad) return;
        snap_all();
        st = fm_dispatch_backward(null_plan ? NULL : p, D, xe, ld2, x, ld1);
        if (!after_call(st)) return;
        for (t = 0; t < T; t++) {
            int kept = 0, last = -1;
            for (i = 0; i < k; i++)
                if (p->position[t * k + i] >= 0) kept++, last = p->position[t * k + i];
            for (j = 0; j < D; j++) {
                const float v = x[(size_t)t * ld1 + j];
                if (kept == 0) CHECK(v == 0.0f, "token %d has no kept assignment, dx[%d] = %g", t, j, (double)v);
                if (kept == 1)
                    CHECK(same_or_both_nan(v, xe[(size_t)last * ld2 + j]), "token %d: dx[%d] = %g, its one row %g", t, j,
                          (double)v, (double)xe[(size_t)last * ld2 + j]);
            }
        }
        break;
    case 2: /* combine forward: ye (rows x D), gates -> y (T x D) */
        ye = fmat(rows, D, ld2, IN | (rows == 0 ? OPT | NOCHECK : 0));
        gates = fmat(T, k, ld3, IN);
        y = fmat(T, D, ld4, OUT | NOFILL);
        if (g_huge && !g_bad) return;
        snap_all();
        st = fm_combine_forward(null_plan ? NULL : p, D, ye, ld2, gates, ld3, y, ld4);
        if (!after_call(st)) return;
        for (t = 0; t < T; t++)
            for (j = 0; j < D; j++) {
                double ref = 0.0, scale = 0.0;
                int kept = 0, ok = 1;
                const float v = y[(size_t)t * ld4 + j];
                for (i = 0; i < k; i++) {
                    const int32_t pos = p->position[t * k + i];
                    double term;
                    if (pos < 0) continue;
                    kept++;
                    term = (double)gates[(size_t)t * ld3 + i] * ye[(size_t)pos * ld2 + j];
                    ok &= isfinite(term);
                    ref += term;
                    scale += fabs(term);
                }
                if (kept == 0) CHECK(v == 0.0f, "token %d has no kept assignment, y[%d] = %g", t, j, (double)v);
                if (ok && kept && scale < 1e37)
                    CHECK(fabs(v - ref) <= 1e-5 * scale + 1e-35, "y[%d][%d] = %.9g, reference %.9g", t, j, (double)v, ref);
            }
        break;
    default: { /* combine backward: ye, gates, dy -> dye, d_gates */
        float *dy;
        const int ld6 = ldim(D);
        const int want_dye = u8() & 1, want_dg = u8() & 1;
        ye = fmat(rows, D, ld2, IN | (rows == 0 || !want_dg ? OPT | NOCHECK : 0));
        gates = fmat(T, k, ld3, IN);
        dy = fmat(T, D, ld4, IN);
        dye = want_dye ? fmat(rows, D, ld6, OUT | NOFILL | KEEP | (rows == 0 ? NOCHECK : 0)) : NULL;
        dg = want_dg ? fmat(T, k, ld5, OUT | NOFILL | KEEP) : NULL;
        if (g_huge && !g_bad) return;
        snap_all();
        st = fm_combine_backward(null_plan ? NULL : p, D, ye, ld2, gates, ld3, dy, ld4, dye, ld6, dg, ld5);
        if (!after_call(st)) return;
        for (t = 0; t < T; t++)
            for (i = 0; i < k; i++) {
                const int32_t pos = p->position[t * k + i];
                const float gv = gates[(size_t)t * ld3 + i];
                if (dg && pos < 0)
                    CHECK(dg[(size_t)t * ld5 + i] == 0.0f, "dropped assignment %d: d_gates = %g", t * k + i,
                          (double)dg[(size_t)t * ld5 + i]);
                if (pos < 0) continue;
                if (dye)
                    for (j = 0; j < D; j++) {
                        const float want = gv * dy[(size_t)t * ld4 + j], got = dye[(size_t)pos * ld6 + j];
                        CHECK(same_or_both_nan(got, want), "dye[%d][%d] = %.9g, gate * dy = %.9g", pos, j, (double)got,
                              (double)want);
                    }
                if (dg) {
                    double ref = 0.0, scale = 0.0;
                    int ok = 1;
                    for (j = 0; j < D; j++) {
                        const double term = (double)dy[(size_t)t * ld4 + j] * ye[(size_t)pos * ld2 + j];
                        ok &= isfinite(term);
                        ref += term;
                        scale += fabs(term);
                    }
                    if (ok && scale < 1e37)
                        CHECK(fabs(dg[(size_t)t * ld5 + i] - ref) <= 1e-5 * scale + 1e-35, "d_gates[%d][%d] = %.9g, ref %.9g",
                              t, i, (double)dg[(size_t)t * ld5 + i], ref);
                }
            }
    }
    }
}

/* ---- 7. grouped GEMM, GELU, expert FFN ---------------------------------------------------- */

static void fuzz_packed_weight_floats(void) {
    const int in = rare(2) ? special_int() : dim(300, 100000), out = rare(2) ? special_int() : dim(300, 100000);
    size_t got, want;
    got = fm_packed_weight_floats(in, out);
    want = in > 0 && out > 0 && in <= FLEXMOE_MAX_DIM && out <= FLEXMOE_MAX_DIM
               ? (size_t)(((int64_t)out + 63) / 64) * 64 * (size_t)in
               : 0;
    CHECK(got == want, "fm_packed_weight_floats(%d, %d) = %zu, want %zu", in, out, got, want);
}

static uint64_t packed_floats(int in, int out) {
    return in > 0 && out > 0 ? (uint64_t)(((int64_t)out + 63) / 64) * 64 * (uint64_t)in : 0;
}

static void fuzz_pack(int unpack) {
    const int E = dim(8, 64), in = dim(70, 300), out = dim(140, 300);
    const fm_weight_layout layout = rare(16) ? (fm_weight_layout)((int)(u8() % 4) - 1) : (fm_weight_layout)(u8() & 1);
    const int rows = layout == FM_WEIGHTS_OUT_BY_IN ? out : in, cols = layout == FM_WEIGHTS_OUT_BY_IN ? in : out;
    const int ldw = ldim(cols);
    const uint64_t per = packed_floats(in, out);
    float *w, *packed;
    fm_status st;
    int e, kk, j;
    if (E > 0 && in > 0 && out > 0 && too_much((double)E * per)) return;
    if (layout != FM_WEIGHTS_IN_BY_OUT && layout != FM_WEIGHTS_OUT_BY_IN) set_bad(__LINE__);
    if (E <= 0 || in <= 0 || out <= 0 || (int64_t)E * rows > INT32_MAX) set_bad(__LINE__);
    w = fmat(E > 0 && rows > 0 ? clamp_int((int64_t)E * rows) : 0, cols, ldw, unpack ? (OUT | NOFILL) : IN);
    packed = fvec(g_bad ? 1 : (int64_t)(E * per), unpack ? IN : (OUT | NOFILL));
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("%s(experts %d in %d out %d layout %d ldw %d)", unpack ? "fm_unpack_weights" : "fm_pack_weights", E, in, out, (int)layout, ldw);
    st = unpack ? fm_unpack_weights(E, in, out, layout, packed, w, ldw) : fm_pack_weights(E, in, out, layout, w, ldw, packed);
    if (!after_call(st)) return;
    for (e = 0; e < E; e++)
        for (kk = 0; kk < in; kk++)
            for (j = 0; j < (int)((out + 63) / 64 * 64); j++) {
                const float pv = packed[(size_t)e * per + ((size_t)(j / 64) * in + kk) * 64 + j % 64];
                const size_t wi = layout == FM_WEIGHTS_OUT_BY_IN ? ((size_t)e * out + j) * ldw + kk
                                                                 : ((size_t)e * in + kk) * ldw + j;
                if (j >= out) {
                    if (!unpack) CHECK(memcmp(&pv, &(float){0.0f}, 4) == 0, "padding column %d of expert %d is %g", j, e, (double)pv);
                    continue;
                }
                CHECK(memcmp(&pv, &w[wi], 4) == 0, "expert %d W[%d][%d]: packed %g, plain %g", e, kk, j, (double)pv,
                      (double)w[wi]);
            }
}

/* Packed weights as fm_pack_weights leaves them: the columns past out_features are zero (the
 * layout says so). -DFUZZ_GARBAGE_PADDING leaves the fuzzed contents there. */
static void zero_padding(float *w, int E, int in, int out) {
#ifndef FUZZ_GARBAGE_PADDING
    const uint64_t per = packed_floats(in, out);
    int e, kk, j;
    if (!w || E <= 0 || in <= 0 || out <= 0 || in > FLEXMOE_MAX_DIM || out > FLEXMOE_MAX_DIM || g_huge ||
        (out % 64) == 0)
        return;
    for (e = 0; e < E; e++)
        for (kk = 0; kk < in; kk++)
            for (j = out; j < (out + 63) / 64 * 64; j++) w[e * per + ((size_t)(j / 64) * in + kk) * 64 + j % 64] = 0.0f;
#else
    (void)w, (void)E, (void)in, (void)out;
#endif
}

/* Offsets of a grouped GEMM: start, then per-expert counts; sometimes broken. */
static int32_t *fuzz_offsets(int E, int *rows, int *broken) {
    int32_t *o;
    int e, start;
    const int big = rare(6);
    *broken = 0;
    *rows = 0;
    o = (int32_t *)raw_alloc(E > 0 ? (uint64_t)E + 1 : 1, 4, IN);
    if (rare(48)) {
        set_bad(__LINE__);
        return NULL;
    }
    if (E <= 0 || g_huge) return o;
    start = rare(4) ? (int)(u8() % 40) : 0;
    o[0] = start;
    for (e = 0; e < E; e++) {
        unsigned b = u8();
        const int count = b < 64 ? 0 : big ? (int)(b % 300) : (int)(b % 12);
        o[e + 1] = o[e] + count;
        if (o[e + 1] > 20000) o[e + 1] = o[e];
    }
    if (rare(12)) { /* broken: non-monotone, or a negative start */
        const unsigned how = u8() % 3;
        if (how == 0 || E < 1) o[0] = -1 - (int)(u8() % 4);
        else {
            const int at = 1 + (int)(u16() % (unsigned)E);
            o[at] = o[at - 1] - 1 - (int)(u8() % 4);
        }
        *broken = 1;
        set_bad(__LINE__);
    }
    *rows = o[E];
    return o;
}

static void fuzz_grouped_gemm(int backward) {
    const int E = dim(8, 1100), in = dim(70, 300), out = dim(140, 300);
    int rows, broken, first, e, r, j, kk;
    const int ldx = ldim(in), ldy = ldim(out), ldd = ldim(in);
    int32_t *offsets;
    uint64_t per;
    float *x = NULL, *w = NULL, *bias = NULL, *y = NULL, *dy = NULL, *dx = NULL, *dw = NULL, *db = NULL;
    fm_status st;
    g_fn = backward ? "fm_grouped_gemm_backward" : "fm_grouped_gemm_forward";
    offsets = fuzz_offsets(E, &rows, &broken);
    if (E <= 0 || in <= 0 || out <= 0) set_bad(__LINE__);
    per = packed_floats(in, out);
    if (!g_bad && too_much((double)rows * in * out * (backward ? 3 : 1) + (double)E * per)) return;
    if (g_bad && (E <= 0 || in <= 0 || out <= 0)) rows = 0;
    if (rows < 0) rows = 0;
    first = offsets && E > 0 ? offsets[0] : 0;
    if (!backward) {
        x = fmat(rows, in, ldx, IN | (rows == 0 ? OPT | NOCHECK : 0));
        w = fvec(E > 0 && per ? (int64_t)(E * per) : 0, IN | (E <= 0 || !per ? NOCHECK : 0));
        zero_padding(w, E, in, out);
        bias = fvec(E > 0 && out > 0 ? (int64_t)E * out : 0, IN | OPT | NOCHECK);
        y = fmat(rows, out, ldy, OUT | NOFILL | (rows == 0 ? OPT | NOCHECK : 0));
    } else {
        const int want_dx = u8() & 1, want_dw = u8() & 1;
        dy = fmat(rows, out, ldy, IN | (rows == 0 ? OPT | NOCHECK : 0));
        x = fmat(rows, in, ldx, IN | (rows == 0 || !want_dw ? OPT | NOCHECK : 0));
        w = fvec(E > 0 && per ? (int64_t)(E * per) : 0, IN | (rows == 0 || !want_dx ? OPT | NOCHECK : 0));
        zero_padding(w, E, in, out);
        dx = want_dx ? fmat(rows, in, ldd, OUT | NOFILL | KEEP | (rows == 0 ? NOCHECK : 0)) : NULL;
        dw = want_dw ? fvec(E > 0 && per ? (int64_t)(E * per) : 0, OUT | NOFILL | NOCHECK | KEEP) : NULL;
        db = fvec(E > 0 && out > 0 ? (int64_t)E * out : 0, OUT | OPT | NOFILL | NOCHECK);
    }
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("%s(experts %d in %d out %d rows %d offsets[0] %d broken %d ldx %d ldy %d ld_dx %d bias %s dx %s dW %s d_bias %s)", g_fn, E, in, out, rows, first, broken, ldx, ldy, ldd, bias ? "yes" : "NULL", dx ? "yes" : "NULL", dw ? "yes" : "NULL", db ? "yes" : "NULL"); trace_offsets(offsets, E);
    if (!backward) {
        st = fm_grouped_gemm_forward(E, offsets, in, out, x, ldx, w, bias, y, ldy);
        if (!after_call(st) || rows == 0) return;
        for (r = 0; r < first; r++) {
            buffer *b = find_buffer(y);
            CHECK(memcmp(b->snap + (size_t)r * ldy * 4, b->p + (size_t)r * ldy * 4, (size_t)out * 4) == 0,
                  "row %d below offsets[0] = %d was written", r, first);
        }
        for (e = 0; e < E; e++)
            for (r = offsets[e]; r < offsets[e + 1]; r++)
                for (j = 0; j < out; j++) {
                    double ref = bias ? bias[(size_t)e * out + j] : 0.0, scale = fabs(ref);
                    int ok = isfinite(ref);
                    for (kk = 0; kk < in; kk++) {
                        const double term = (double)x[(size_t)r * ldx + kk] * w[e * per + ((size_t)(j / 64) * in + kk) * 64 + j % 64];
                        ok &= isfinite(term);
                        ref += term;
                        scale += fabs(term);
                    }
                    if (ok && scale < 1e37)
                        CHECK(fabs(y[(size_t)r * ldy + j] - ref) <= 1e-5 * scale + 1e-35,
                              "expert %d row %d col %d: y = %.9g, reference %.9g (in %d, out %d)", e, r, j,
                              (double)y[(size_t)r * ldy + j], ref, in, out);
                }
        return;
    }
    st = fm_grouped_gemm_backward(E, offsets, in, out, x, ldx, w, dy, ldy, dx, ldd, dw, db);
    if (!after_call(st)) return;
    if (dx && rows > 0)
        for (r = 0; r < first; r++) {
            buffer *b = find_buffer(dx);
            CHECK(memcmp(b->snap + (size_t)r * ldd * 4, b->p + (size_t)r * ldd * 4, (size_t)in * 4) == 0,
                  "dx row %d below offsets[0] = %d was written", r, first);
        }
    for (e = 0; e < E; e++) {
        const int count = offsets[e + 1] - offsets[e];
        if (dw)
            for (kk = 0; kk < in; kk++)
                for (j = 0; j < (int)((out + 63) / 64 * 64); j++) {
                    const float v = dw[e * per + ((size_t)(j / 64) * in + kk) * 64 + j % 64];
                    if (j >= out || count == 0) {
                        CHECK(v == 0.0f, "d_packed_w expert %d (%d rows) [%d][%d] = %g, want 0 (out %d)", e, count, kk, j,
                              (double)v, out);
                    } else {
                        double ref = 0.0, scale = 0.0;
                        int ok = 1;
                        for (r = offsets[e]; r < offsets[e + 1]; r++) {
                            const double term = (double)x[(size_t)r * ldx + kk] * dy[(size_t)r * ldy + j];
                            ok &= isfinite(term);
                            ref += term;
                            scale += fabs(term);
                        }
                        if (ok && scale < 1e37)
                            CHECK(fabs(v - ref) <= 1e-5 * scale + 1e-35, "d_packed_w expert %d [%d][%d] = %.9g, ref %.9g", e,
                                  kk, j, (double)v, ref);
                    }
                }
        if (db)
            for (j = 0; j < out; j++) {
                double ref = 0.0, scale = 0.0;
                int ok = 1;
                for (r = offsets[e]; r < offsets[e + 1]; r++) {
                    ok &= is_finite(dy[(size_t)r * ldy + j]);
                    ref += dy[(size_t)r * ldy + j];
                    scale += fabs(dy[(size_t)r * ldy + j]);
                }
                if (count == 0) CHECK(db[(size_t)e * out + j] == 0.0f, "d_bias of empty expert %d = %g", e, (double)db[(size_t)e * out + j]);
                if (ok && scale < 1e37)
                    CHECK(fabs(db[(size_t)e * out + j] - ref) <= 1e-5 * scale + 1e-35, "d_bias[%d][%d] = %.9g, ref %.9g", e,
                          j, (double)db[(size_t)e * out + j], ref);
            }
        if (dx)
            for (r = offsets[e]; r < offsets[e + 1]; r++)
                for (kk = 0; kk < in; kk++) {
                    double ref = 0.0, scale = 0.0;
                    int ok = 1;
                    for (j = 0; j < out; j++) {
                        const double term = (double)dy[(size_t)r * ldy + j] * w[e * per + ((size_t)(j / 64) * in + kk) * 64 + j % 64];
                        ok &= isfinite(term);
                        ref += term;
                        scale += fabs(term);
                    }
                    if (ok && scale < 1e37)
                        CHECK(fabs(dx[(size_t)r * ldd + kk] - ref) <= 1e-5 * scale + 1e-35,
                              "dx expert %d (%d rows) row %d col %d = %.9g, ref %.9g", e, count, r, kk,
                              (double)dx[(size_t)r * ldd + kk], ref);
                }
    }
}

static void fuzz_gelu(int backward) {
    const int rows = dim(70, 600), cols = dim(70, 1100), ldx = ldim(cols), lddy = ldim(cols);
    const fm_gelu kind = rare(16) ? (fm_gelu)((int)(u8() % 4) - 1) : (fm_gelu)(u8() & 1);
    const unsigned alias = u8() % 4; /* 1: output aliases x, 2: aliases dy (backward) */
    int ldo = alias == 1 ? ldx : alias == 2 && backward ? lddy : ldim(cols);
    float *x, *dy = NULL, *y;
    fm_status st;
    int r, j;
    if (too_much((double)rows * cols * 4)) return;
    if (kind != FM_GELU_ERF && kind != FM_GELU_TANH) set_bad(__LINE__);
    x = fmat(rows, cols, ldx, alias == 1 ? OUT : IN);
    if (backward) dy = fmat(rows, cols, lddy, alias == 2 ? OUT : IN);
    y = alias == 1 ? x : alias == 2 && backward ? dy : fmat(rows, cols, ldo, OUT | NOFILL);
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("%s(rows %d cols %d kind %d ldx %d lddy %d ld_out %d alias %u)", backward ? "fm_gelu_backward" : "fm_gelu_forward", rows, cols, (int)kind, ldx, lddy, ldo, alias);
    st = backward ? fm_gelu_backward(rows, cols, kind, x, ldx, dy, lddy, y, ldo) : fm_gelu_forward(rows, cols, kind, x, ldx, y, ldo);
    if (!after_call(st)) return;
    for (r = 0; r < rows; r++)
        for (j = 0; j < cols; j++) {
            const float xv = before(x)[(size_t)r * ldx + j], v = y[(size_t)r * ldo + j];
            if (!backward) {
                if (xv != xv) CHECK(v != v, "gelu(NaN) = %g", (double)v);
                else if (xv == INFINITY) CHECK(v == INFINITY, "gelu(+Inf) = %g", (double)v);
                else if (xv == -INFINITY) CHECK(v != v, "gelu(-Inf) = %g, not NaN", (double)v);
                else {
                    const double ref = gelu_ref(xv, kind);
                    CHECK(fabs(v - ref) <= 1e-5 * fabs(ref) + 2e-6 * fabs((double)xv) + 1e-30,
                          "gelu(%d)(%.9g) = %.9g, reference %.9g", (int)kind, (double)xv, (double)v, ref);
                }
            } else {
                const float dv = before(dy)[(size_t)r * lddy + j];
                double ref;
                if (!is_finite(xv) || !is_finite(dv)) {
                    if (xv != xv || dv != dv) CHECK(v != v, "a NaN in x or dy, dx = %g", (double)v);
                    continue;
                }
                ref = (double)dv * gelu_grad_ref(xv, kind);
                if (!isfinite(ref) || fabs(ref) > 3e38) continue;
                CHECK(v == v, "gelu'(%d) at x = %.9g, dy = %g: dx is NaN", (int)kind, (double)xv, (double)dv);
                CHECK(fabs(v - ref) <= 2e-4 * fabs((double)dv) + 1e-30, "gelu'(%d) at x = %.9g, dy = %g: dx = %.9g, ref %.9g",
                      (int)kind, (double)xv, (double)dv, (double)v, ref);
            }
        }
}

static void fuzz_expert_ffn(int backward) {
    fm_expert_ffn_desc d;
    fm_expert_ffn_params p;
    fm_expert_ffn_grads g;
    int rows, broken, first, D, H, E, ldx, ldy, ldh, ldp, lddh, lddx, null_desc, null_params, null_grads, r;
    uint64_t p1, p2;
    int32_t *offsets;
    float *x, *y = NULL, *hidden, *pre, *dy = NULL, *dx = NULL, *dh = NULL;
    fm_status st;
    g_fn = backward ? "fm_expert_ffn_backward" : "fm_expert_ffn_forward";
    memset(&d, 0, sizeof d);
    memset(&p, 0, sizeof p);
    memset(&g, 0, sizeof g);
    d.experts = E = dim(8, 300);
    d.dim = D = dim(70, 200);
    d.hidden = H = dim(140, 300);
    d.gelu = rare(16) ? (fm_gelu)((int)(u8() % 4) - 1) : (fm_gelu)(u8() & 1);
    ldx = ldim(D), ldy = ldim(D), ldh = ldim(H), ldp = ldim(H), lddh = ldim(H), lddx = ldim(D);
    offsets = fuzz_offsets(E, &rows, &broken);
    null_desc = rare(64), null_params = rare(64), null_grads = rare(4);
    if (null_desc || null_params || E <= 0 || D <= 0 || H <= 0 || (d.gelu != FM_GELU_ERF && d.gelu != FM_GELU_TANH)) set_bad(__LINE__);
    p1 = packed_floats(D, H), p2 = packed_floats(H, D);
    if (!g_bad && too_much((double)rows * D * H * (backward ? 6 : 2) + (double)E * (p1 + p2))) return;
    if (g_bad && (E <= 0 || D <= 0 || H <= 0)) rows = 0;
    if (rows < 0) rows = 0;
    first = offsets && E > 0 ? offsets[0] : 0;
    p.w1 = fvec(E > 0 && p1 ? (int64_t)(E * p1) : 0, IN | (E <= 0 || !p1 ? NOCHECK : 0));
    p.b1 = fvec(E > 0 && H > 0 ? (int64_t)E * H : 0, IN | OPT | NOCHECK);
    p.w2 = fvec(E > 0 && p2 ? (int64_t)(E * p2) : 0, IN | (E <= 0 || !p2 ? NOCHECK : 0));
    p.b2 = fvec(E > 0 && D > 0 ? (int64_t)E * D : 0, IN | OPT | NOCHECK);
    zero_padding((float *)p.w1, E, D, H);
    zero_padding((float *)p.w2, E, H, D);
    if (!backward) {
        const int none = rows == first; /* no rows to go through: nothing else is looked at */
        x = fmat(rows, D, ldx, IN | (none ? OPT | NOCHECK : 0));
        y = fmat(rows, D, ldy, OUT | NOFILL | (none ? OPT | NOCHECK : 0));
        hidden = fmat(rows, H, ldh, OUT | NOFILL | (none ? OPT | NOCHECK : 0));
        pre = fmat(rows, H, ldp, OUT | OPT | NOFILL | (none ? NOCHECK : 0));
    } else {
        const int none = rows == 0;
        x = fmat(rows, D, ldx, IN | (none ? OPT | NOCHECK : 0));
        pre = fmat(rows, H, ldp, IN | (none ? OPT | NOCHECK : 0));
        hidden = fmat(rows, H, ldh, IN | OPT | (none ? NOCHECK : 0));
        if (hidden && pre && rows > 0 && !g_bad && !g_huge && (u8() & 1)) { /* hidden = GELU(pre), as the forward saves it */
            if (fm_gelu_forward(rows, H, d.gelu, pre, ldp, hidden, ldh) != FM_OK) die("fm_gelu_forward failed");
        }
        dy = fmat(rows, D, ldy, IN | (none ? OPT | NOCHECK : 0));
        dx = fmat(rows, D, lddx, OUT | OPT | NOFILL | (none ? NOCHECK : 0));
        dh = fmat(rows, H, lddh, OUT | NOFILL | (none ? OPT | NOCHECK : 0));
        g.w1 = fvec(E > 0 && p1 ? (int64_t)(E * p1) : 0, OUT | OPT | NOFILL | NOCHECK);
        g.b1 = fvec(E > 0 && H > 0 ? (int64_t)E * H : 0, OUT | OPT | NOFILL | NOCHECK);
        g.w2 = fvec(E > 0 && p2 ? (int64_t)(E * p2) : 0, OUT | OPT | NOFILL | NOCHECK);
        g.b2 = fvec(E > 0 && D > 0 ? (int64_t)E * D : 0, OUT | OPT | NOFILL | NOCHECK);
    }
    if (g_huge && !g_bad) return;
    snap_all();
    TRACE("%s(experts %d dim %d hidden %d gelu %d rows %d offsets[0] %d; ldx %d ldy %d ldh %d pre %s ldp %d b1 %s b2 %s; hidden %s dx %s lddx %d lddh %d grads %s w1 %s b1 %s w2 %s b2 %s)", g_fn, E, D, H, (int)d.gelu, rows, first, ldx, ldy, ldh, pre ? "yes" : "NULL", ldp, p.b1 ? "yes" : "NULL", p.b2 ? "yes" : "NULL", hidden ? "yes" : "NULL", dx ? "yes" : "NULL", lddx, lddh, null_grads ? "NULL" : "", g.w1 ? "yes" : "NULL", g.b1 ? "yes" : "NULL", g.w2 ? "yes" : "NULL", g.b2 ? "yes" : "NULL"); trace_offsets(offsets, E);
    if (!backward) {
        st = fm_expert_ffn_forward(null_desc ? NULL : &d, offsets, null_params ? NULL : &p, x, ldx, y, ldy, hidden, ldh,
                                   pre, ldp);
        if (!after_call(st) || rows == first) return;
        for (r = 0; r < first; r++) {
            buffer *b = find_buffer(y), *bh = find_buffer(hidden);
            CHECK(memcmp(b->snap + (size_t)r * ldy * 4, b->p + (size_t)r * ldy * 4, (size_t)D * 4) == 0,
                  "y row %d below offsets[0] = %d was written", r, first);
            CHECK(memcmp(bh->snap + (size_t)r * ldh * 4, bh->p + (size_t)r * ldh * 4, (size_t)H * 4) == 0,
                  "hidden row %d below offsets[0] = %d was written", r, first);
        }
        return;
    }
    st = fm_expert_ffn_backward(null_desc ? NULL : &d, offsets, null_params ? NULL : &p, x, ldx, pre, ldp, hidden, ldh, dy,
                                ldy, dx, lddx, null_grads ? NULL : &g, dh, lddh);
    if (!after_call(st)) return;
    if (dx && rows > 0)
        for (r = 0; r < first; r++) {
            buffer *b = find_buffer(dx);
            CHECK(memcmp(b->snap + (size_t)r * lddx * 4, b->p + (size_t)r * lddx * 4, (size_t)D * 4) == 0,
                  "dx row %d below offsets[0] = %d was written", r, first);
        }
    if (!null_grads && (g.w1 || g.w2)) { /* padding of the packed gradients is zero, empty experts get zero */
        int e, kk, j;
        for (e = 0; e < E; e++) {
            const int count = offsets[e + 1] - offsets[e];
            if (g.w1)
                for (kk = 0; kk < D; kk++)
                    for (j = 0; j < (H + 63) / 64 * 64; j++) {
                        const float v = g.w1[e * p1 + ((size_t)(j / 64) * D + kk) * 64 + j % 64];
                        if (j >= H || count == 0) CHECK(v == 0.0f, "dW1 expert %d [%d][%d] = %g, want 0", e, kk, j, (double)v);
                    }
            if (g.w2)
                for (kk = 0; kk < H; kk++)
                    for (j = 0; j < (D + 63) / 64 * 64; j++) {
                        const float v = g.w2[e * p2 + ((size_t)(j / 64) * H + kk) * 64 + j % 64];
                        if (j >= D || count == 0) CHECK(v == 0.0f, "dW2 expert %d [%d][%d] = %g, want 0", e, kk, j, (double)v);
                    }
        }
    }
}

/* ---- 1-2. status strings, ISA selection, allocator --------------------------------------- */

static size_t hook_live, hook_calls;
static void *hook_alloc(size_t size, void *user) {
    (void)user;
    hook_calls++;
    if (hook_calls % 5 == 4) return NULL; /* an allocator that fails now and then */
    hook_live++;
    return malloc(size);
}
static void hook_free(void *ptr, void *user) {
    (void)user;
    hook_live--;
    free(ptr);
}
static void quiet_log(fm_log_level level, const char *message, void *user) {
    (void)level, (void)user;
    CHECK(message && strlen(message) < 256, "a log message is NULL or too long");
}

static void restore_isa(void) {
    fm_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.logger.func = quiet_log;
    if (fm_setup(&desc) != FM_OK || fm_active_isa() != g_isa) die("could not restore the ISA path");
}

/* A kernel call while no path is active must return the selection's error and write nothing. */
static void call_without_path(fm_status expected) {
    float *x = (float *)raw_alloc(12, 4, IN), *y = (float *)raw_alloc(12, 4, OUT);
    int32_t *idx = (int32_t *)raw_alloc(6, 4, OUT);
    fm_status st;
    int i;
    for (i = 0; i < 12; i++) x[i] = (float)i, y[i] = -1.0f;
    snap_all();
    st = fm_softmax_forward(3, 4, x, 4, y, 4);
    CHECK(st == expected, "softmax with no active path returned %d, the selection %d", (int)st, (int)expected);
    st = fm_topk(3, 4, 2, x, 4, idx, 2, NULL, 0);
    CHECK(st == expected, "top-k with no active path returned %d, the selection %d", (int)st, (int)expected);
    g_unmodeled = 1;
    after_call(st);
}

static void fuzz_api(void) {
    const unsigned op = u8() % 6;
    g_fn = "api";
    switch (op) {
    case 0: { /* fm_setup with a desc */
        fm_desc desc;
        fm_status st;
        const int isa = rare(4) ? (int)(u8() % 9) - 2 : (int)(u8() % FM_ISA_COUNT);
        memset(&desc, 0, sizeof desc);
        desc.isa = (fm_isa)isa;
        if (u8() & 1) desc.allocator.alloc = hook_alloc;
        if (u8() & 1) desc.allocator.free = hook_free;
        desc.logger.func = quiet_log;
        g_fn = "fm_setup";
        hook_live = hook_calls = 0;
        st = fm_setup(&desc);
        if (!desc.allocator.alloc != !desc.allocator.free) {
            CHECK(st == FM_ERR_INVALID_ARGUMENT, "fm_setup with one allocator hook = %d, want FM_ERR_INVALID_ARGUMENT",
                  (int)st);
        } else if (isa == FM_ISA_AUTO) {
            CHECK(st == FM_OK, "fm_setup(auto) = %d", (int)st);
        } else if (isa < 0 || isa >= FM_ISA_COUNT) {
            CHECK(st == FM_ERR_UNKNOWN_ISA, "fm_setup(isa %d) = %d, want FM_ERR_UNKNOWN_ISA", isa, (int)st);
        } else {
            CHECK((st == FM_OK) == (fm_isa_supported((fm_isa)isa) != 0), "fm_setup(%s) = %d, supported %d",
                  fm_isa_name((fm_isa)isa), (int)st, fm_isa_supported((fm_isa)isa));
            if (st != FM_OK) CHECK(st == FM_ERR_UNSUPPORTED_ISA, "fm_setup(%s) = %d", fm_isa_name((fm_isa)isa), (int)st);
        }
        if (st == FM_OK) {
            unsigned i, n = 1 + u8() % 4;
            void *blocks[4];
            CHECK(isa == FM_ISA_AUTO || fm_active_isa() == (fm_isa)isa, "fm_setup(%d) OK but the path is %d", isa,
                  (int)fm_active_isa());
            for (i = 0; i < n; i++) {
                const size_t size = 1 + u16() % 5000;
                blocks[i] = fm_alloc(size);
                if (blocks[i]) {
                    CHECK(((uintptr_t)blocks[i] & 63) == 0, "fm_alloc(%zu) is not 64-byte aligned", size);
                    memset(blocks[i], 0xAB, size);
                }
            }
            for (i = 0; i < n; i++) fm_free(blocks[i]);
            if (desc.allocator.alloc && desc.allocator.free)
                CHECK(hook_live == 0, "%zu blocks of the allocator hooks not freed", hook_live);
        } else if (st == FM_ERR_INVALID_ARGUMENT) { /* a half allocator: refused, nothing changed */
            CHECK(fm_active_isa() == g_isa, "a refused fm_setup changed the path to %d", (int)fm_active_isa());
        } else {
            call_without_path(st);
        }
        restore_isa();
        break;
    }
    case 1: { /* fm_set_isa */
        const int isa = rare(4) ? special_int() : (int)(u8() % FM_ISA_COUNT);
        fm_status st;
        const char *name = fm_isa_name((fm_isa)isa);
        g_fn = "fm_set_isa";
        CHECK(name && *name, "fm_isa_name(%d) is empty", isa);
        CHECK((isa >= 0 && isa < FM_ISA_COUNT) || strcmp(name, "unknown") == 0, "fm_isa_name(%d) = %s", isa, name);
        st = fm_set_isa((fm_isa)isa);
        if (isa >= 0 && isa < FM_ISA_COUNT) {
            CHECK((st == FM_OK) == (fm_isa_supported((fm_isa)isa) != 0), "fm_set_isa(%s) = %d", name, (int)st);
        } else {
            CHECK(st == FM_ERR_UNKNOWN_ISA, "fm_set_isa(%d) = %d", isa, (int)st);
            CHECK(!fm_isa_supported((fm_isa)isa), "fm_isa_supported(%d) is true", isa);
        }
        if (st != FM_OK) {
            CHECK(fm_active_isa() == FM_ISA_AUTO, "fm_set_isa failed but a path is active");
            call_without_path(st);
        }
        restore_isa();
        break;
    }
    case 2: { /* fm_isa_from_name */
        static const char *const names[] = {"auto", "scalar", "avx2", "avx512", "neon", "Scalar", "avx", "avx5120", ""};
        const int canned = u8() & 1;
        const char *src = canned ? names[u8() % 9] : NULL;
        const unsigned len = canned ? (unsigned)strlen(src) : u8() % 12;
        char *name = (char *)raw_alloc(len + 1, 1, IN);
        int *isa;
        unsigned i;
        fm_status st;
        int want = -1;
        g_fn = "fm_isa_from_name";
        if (canned) memcpy(name, src, len + 1);
        else {
            for (i = 0; i < len; i++) name[i] = (char)(1 + u8() % 255);
            name[len] = 0;
        }
        for (i = 0; i < FM_ISA_COUNT; i++)
            if (strcmp(name, fm_isa_name((fm_isa)i)) == 0) want = (int)i;
        isa = (int *)raw_alloc(1, sizeof(fm_isa), OUT);
        *isa = 77;
        if (rare(8)) isa = NULL;
        if (rare(8)) name = NULL;
        snap_all();
        st = fm_isa_from_name(name, (fm_isa *)isa);
        if (!name || !isa || want < 0) set_bad(__LINE__);
        if (after_call(st)) CHECK(*isa == want, "fm_isa_from_name(%s) gave %d", name, *isa);
        break;
    }
    case 3: { /* fm_status_str, fm_isa_name on anything */
        const int v = rare(2) ? special_int() : (int)(u8() % 12) - 2;
        const char *s = fm_status_str((fm_status)v), *n = fm_isa_name((fm_isa)v);
        g_fn = "fm_status_str";
        CHECK(s && *s && strlen(s) < 200, "fm_status_str(%d)", v);
        CHECK(n && *n, "fm_isa_name(%d)", v);
        CHECK(fm_isa_supported(FM_ISA_SCALAR) && fm_isa_supported(FM_ISA_AUTO), "scalar or auto unsupported");
        break;
    }
    default: { /* fm_alloc / fm_free */
        static const size_t sizes[] = {0, 1, 63, 64, 65, 4096, SIZE_MAX, SIZE_MAX - 64, SIZE_MAX - 72, SIZE_MAX - 80,
                                       (size_t)1 << 62, (size_t)1 << 41};
        const size_t size = rare(2) ? sizes[u8() % 12] : u16();
        void *p;
        g_fn = "fm_alloc";
        p = fm_alloc(size);
        if (size == 0) CHECK(!p, "fm_alloc(0) is not NULL");
        if (p) {
            CHECK(((uintptr_t)p & 63) == 0, "fm_alloc(%zu) is not 64-byte aligned", size);
            if (size <= 65536) memset(p, 0x5A, size);
        }
        fm_free(p);
        fm_free(NULL);
    }
    }
}

/* ---- the entry points ---------------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    fm_status st;
    const char *forced = getenv("FLEXMOE_ISA");
    (void)argc, (void)argv;
    st = fm_setup(NULL);
    if (st != FM_OK) {
        fprintf(stderr, "fuzz_kernels: fm_setup(NULL) failed: %s (FLEXMOE_ISA=%s)\n", fm_status_str(st),
                forced ? forced : "");
        exit(1);
    }
    g_isa = fm_active_isa();
    g_trace = getenv("FUZZ_TRACE") && atoi(getenv("FUZZ_TRACE")) != 0;
    restore_isa(); /* the same path, with a quiet logger: forced failures below would flood the log */
    g_sentinel = g_isa != FM_ISA_SCALAR;
    if (getenv("FUZZ_SENTINEL")) g_sentinel = atoi(getenv("FUZZ_SENTINEL")) != 0;
    fprintf(stderr, "fuzz_kernels: ISA path %s, sentinels %s\n", fm_isa_name(g_isa), g_sentinel ? "on" : "off");
    return 0;
}

enum {
    F_SOFTMAX_FWD, F_SOFTMAX_BWD, F_TOPK, F_SOFTMAX_TOPK_FWD, F_SOFTMAX_TOPK_BWD, F_GATE_FWD, F_GATE_BWD,
    F_GATE_NOISE_FWD, F_GATE_LOAD, F_GATE_NOISE, F_GATE_LOGITS_FWD, F_GATE_LOGITS_BWD, F_CV, F_CE, F_ROUTER_LOSS,
    F_LN_FWD, F_LN_BWD, F_CONF_FLOATS, F_CONF_FWD, F_CONF_BWD, F_PLAN, F_DISPATCH_FWD, F_DISPATCH_BWD, F_COMBINE_FWD,
    F_COMBINE_BWD, F_PACKED_FLOATS, F_PACK, F_UNPACK, F_GEMM_FWD, F_GEMM_BWD, F_GELU_FWD, F_GELU_BWD, F_FFN_FWD,
    F_FFN_BWD, F_API, F_COUNT
};

static const char *const function_names[F_COUNT] = {
    "fm_softmax_forward", "fm_softmax_backward", "fm_topk", "fm_softmax_topk_forward", "fm_softmax_topk_backward",
    "fm_noisy_gate_forward", "fm_noisy_gate_backward", "fm_gate_noise_forward", "fm_gate_load_forward", "fm_gate_noise",
    "fm_gate_logits_forward", "fm_gate_logits_backward", "fm_cv_squared", "fm_router_cross_entropy",
    "fm_flexmoe_router_loss", "fm_layernorm_forward", "fm_layernorm_backward", "fm_confsmoe_saved_floats",
    "fm_confsmoe_forward", "fm_confsmoe_backward", "fm_routing_plan_build", "fm_dispatch_forward",
    "fm_dispatch_backward", "fm_combine_forward", "fm_combine_backward", "fm_packed_weight_floats", "fm_pack_weights",
    "fm_unpack_weights", "fm_grouped_gemm_forward", "fm_grouped_gemm_backward", "fm_gelu_forward", "fm_gelu_backward",
    "fm_expert_ffn_forward", "fm_expert_ffn_backward", "api"};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned f;
    if (size < 1) return 0;
    fuzz_read_from(data, size);
    f = u8() % F_COUNT;
    g_fn = function_names[f];
    g_bad = g_huge = g_unmodeled = 0;
    g_misalign = (int)(u8() % 4);
    rng_state = 0x243F6A8885A308D3ull ^ (uint64_t)size;
    switch (f) {
    case F_SOFTMAX_FWD: fuzz_softmax_forward(); break;
    case F_SOFTMAX_BWD: fuzz_softmax_backward(); break;
    case F_TOPK: fuzz_topk(); break;
    case F_SOFTMAX_TOPK_FWD: fuzz_softmax_topk_forward(); break;
    case F_SOFTMAX_TOPK_BWD: fuzz_softmax_topk_backward(); break;
    case F_GATE_FWD: fuzz_noisy_gate(0); break;
    case F_GATE_BWD: fuzz_noisy_gate(1); break;
    case F_GATE_NOISE_FWD: fuzz_gate_noise_forward(); break;
    case F_GATE_LOAD: fuzz_gate_load_forward(); break;
    case F_GATE_NOISE: fuzz_gate_noise(); break;
    case F_GATE_LOGITS_FWD: fuzz_gate_logits(0); break;
    case F_GATE_LOGITS_BWD: fuzz_gate_logits(1); break;
    case F_CV: fuzz_cv_squared(); break;
    case F_CE: fuzz_cross_entropy(); break;
    case F_ROUTER_LOSS: fuzz_router_loss(); break;
    case F_LN_FWD: fuzz_layernorm_forward(); break;
    case F_LN_BWD: fuzz_layernorm_backward(); break;
    case F_CONF_FLOATS: fuzz_confsmoe_saved_floats(); break;
    case F_CONF_FWD: fuzz_confsmoe(0); break;
    case F_CONF_BWD: fuzz_confsmoe(1); break;
    case F_PLAN: fuzz_plan_build(); break;
    case F_DISPATCH_FWD: fuzz_dispatch_combine(0); break;
    case F_DISPATCH_BWD: fuzz_dispatch_combine(1); break;
    case F_COMBINE_FWD: fuzz_dispatch_combine(2); break;
    case F_COMBINE_BWD: fuzz_dispatch_combine(3); break;
    case F_PACKED_FLOATS: fuzz_packed_weight_floats(); break;
    case F_PACK: fuzz_pack(0); break;
    case F_UNPACK: fuzz_pack(1); break;
    case F_GEMM_FWD: fuzz_grouped_gemm(0); break;
    case F_GEMM_BWD: fuzz_grouped_gemm(1); break;
    case F_GELU_FWD: fuzz_gelu(0); break;
    case F_GELU_BWD: fuzz_gelu(1); break;
    case F_FFN_FWD: fuzz_expert_ffn(0); break;
    case F_FFN_BWD: fuzz_expert_ffn(1); break;
    default: fuzz_api(); break;
    }
    free_all();
    return 0;
}
