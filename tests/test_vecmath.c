/* The inline vector math of flexmoe_simd.h in ULP, on every ISA path this machine runs, against
 * two oracles: double-precision libm and SLEEF (its float u10 functions where it has the same
 * function, else its double u10 / u15 functions in a double formula).
 *
 * The functions (the kernel templates' FM__OP(...) instantiated per ISA as fm__<isa>_<name>;
 * the scalar path's counterparts are the functions flexmoe.h's scalar kernels call):
 *   exp            fm__<isa>_exp                      scalar: libm expf (softmax)
 *   log2           fm__<isa>_log2 (positive normals)  scalar: none (its erfinv calls logf)
 *   softplus       fm__<isa>_noise_std(r, 0)           scalar: fm__noise_std(r, 0)
 *   erfinv         fm__<isa>_normal_from_hash(h) = sqrt(2) erfinv(x), x = +-(1 - y) the draw
 *                  of hash h (every one of its 2^24 distinct inputs)  scalar: fm__normal_from_hash
 *   normal_cdf     fm__<isa>_normal_cdf = 0.5 erfc(-z / sqrt 2)      scalar: fm__normal_cdf (double)
 *   gelu_erf[']    fm__<isa>_gelu_row, kind 0, forward and derivative  scalar: fm__scalar_gelu_row
 *   gelu_tanh[']   kind 1 (x sigmoid(2u), the tanh form), forward and derivative
 * There is no standalone erf, tanh or natural log in the vector layer: erf lives inside
 * normal_cdf, tanh inside the tanh-form GELU (as a sigmoid), log inside erfinv and softplus.
 *
 * Inputs: every 2^11-th float bit pattern (4096 per binade) across the whole finite range, both
 * signs; a dense uniform grid of 2^21 points where the function is interesting; +-64 floats around each
 * threshold (overflow, underflow, subnormal onset, clamps, the erfinv tail switch, the GELU
 * derivative's zero), and the special values (+-0, denormals, +-FLT_MIN, +-FLT_MAX, +-Inf, NaN).
 * Where flexmoe documents a flush, a saturation or a special value, that exact behaviour is
 * checked instead of an ULP error (see classify()).
 *
 * ULP: |got - ref| / ulp(ref), ulp the float spacing at |ref| (2^-149 below FLT_MIN), ref in
 * double. The GELU derivatives cross zero near x = -0.75, where Phi(x) + x phi(x) cancels: their
 * error is counted in ulps of the terms' scale |Phi| + |x phi| (for the tanh form,
 * s + |2 x s (1 - s) u'|) instead. Against SLEEF's float functions (exp, log2) the distance is
 * to SLEEF's own float result, so it may reach our error plus SLEEF's (<= 1 ulp).
 *
 * Build (x86-64, with SLEEF; -DFM_VECMATH_SLEEF=0 builds without it, against libm only):
 *   gcc -std=c99 -Wall -Wextra -pedantic -Werror -O2 -I. -Itests tests/test_vecmath.c \
 *       -o build/test_vecmath -lsleef -lm
 * aarch64 (libm only: no arm64 SLEEF in the cross sysroot):
 *   aarch64-linux-gnu-gcc -std=c99 -Wall -Wextra -pedantic -Werror -O2 -I. -Itests \
 *       tests/test_vecmath.c -o build/test_vecmath-aarch64 -lm
 * FLEXMOE_ISA=<path> runs one path only; FM_VECMATH_SPARSE=k thins the grids by 2^k (qemu). */
#define FLEXMOE_IMPLEMENTATION
#include "fm_test.h"

#include <float.h>

#ifndef FM_VECMATH_SLEEF
#if defined(__has_include)
#if __has_include(<sleef.h>)
#define FM_VECMATH_SLEEF 1
#endif
#endif
#endif
#ifndef FM_VECMATH_SLEEF
#define FM_VECMATH_SLEEF 0
#endif
#if FM_VECMATH_SLEEF
#include <sleef.h>
#endif

enum {
    F_EXP,
    F_LOG2,
    F_SOFTPLUS,
    F_ERFINV,
    F_CDF,
    F_GELU_ERF,
    F_GELU_ERF_D,
    F_GELU_TANH,
    F_GELU_TANH_D,
    F_COUNT,
    F_SOFTPLUS_EPS = F_COUNT, /* noise_std(r, 0.01): must be fl(softplus(r) + 0.01), not in the table */
    F_ALL
};

static const char *const function_names[F_COUNT] = {"exp",        "log2",        "softplus",  "erfinv*sqrt2",
                                                    "normal_cdf", "gelu_erf",    "gelu_erf'", "gelu_tanh",
                                                    "gelu_tanh'"};

/* Bounds in ulp, per function, held on every path, pointwise: A + K * arg(x), where arg is the
 * magnitude of the argument of the exp inside the function (0 where there is none). An argument
 * rounded to float carries an absolute error of about |arg| 2^-24, which exp turns into a relative
 * error of the same size, i.e. up to about |arg| ulp: a float formula that rounds -z^2 / 2 (the
 * normal tail) or -2u (the tanh GELU) before its exp cannot do better than that, whatever its
 * polynomial. The numbers: measured on x86-64 (AVX2 and AVX-512) and NEON under qemu, rounded up.
 *   exp: "about 1 ulp" (flexmoe_simd.h); measured 1.25 (AVX2 and AVX-512): 1.5.
 *   log2: a 5e-8 relative fit plus the final fma; measured 1.88 near sqrt 2: 2.5.
 *   softplus (noise_std, epsilon 0): the fit is 8e-9 relative, but exp(-|r|) (~1 ulp), 1 / (2 + y)
 *     (rcp14 + one Newton step on AVX-512) and three roundings add up; measured 3.8 (AVX2) and
 *     4.6 (AVX-512) near r = -2.7: 5.
 *   erfinv: Giles' float erfinv, a ~3e-7 relative fit, its log argument rounded once; measured
 *     5.7 (SIMD) and 6.1 (scalar, logf without fma) near x = 0.375: 6.5.
 *   normal_cdf: Numerical Recipes' erfc, 1.2e-7 relative ("everywhere", flexmoe_simd.h) = up to
 *     4 ulp just below 0.5, measured 6.6 (AVX2) and 7.2 (AVX-512, rcp14 for t) near z = 0. Its exp
 *     takes -z^2 / 2 as a float plus its exact rounding error (exp_lo), so the lower tail stays
 *     within that too (before, the rounded argument added up to 3.1 arg: 250 ulp at z = -12.9,
 *     which this test found): 8.
 *   gelu_erf = x Phi(x): Phi's error plus the product's rounding, measured 11.1: 12.
 *   gelu_erf' = Phi + x phi, in ulps of |Phi| + |x phi|: exp(-x^2 / 2) rounds x^2 first; measured
 *     6.9 near 0 and 0.7 arg in the tail: 8 + 1.5 arg (arg = x^2 / 2, both signs).
 *   gelu_tanh = x sigmoid(2u): arg = |2u| for x < 0 (exp(-2u) of a rounded u); measured 3.2 near
 *     0 and 2.7 arg: 4 + 3.5 arg. Where the true exp(-2u) overflows float (x below about -10.07)
 *     the code documents 1 / Inf = 0: the result must be exactly 0 there (classify()).
 *   gelu_tanh' = s + 2 x s (1 - s) u': for x > 0, 1 - s is computed from the rounded s and loses
 *     e^-2u to cancellation (16.5 ulp at x = 5, in ulps of the terms' scale); arg = |2u| on both
 *     sides, measured 2.6 arg: 4 + 3.5 arg; exactly 0 where exp(-2u) overflows, as above. */
static const double bound_a[F_COUNT] = {1.5, 2.5, 5.0, 6.5, 8.0, 12.0, 8.0, 4.0, 4.0};
static const double bound_k[F_COUNT] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 3.5, 3.5};
/* against SLEEF's float exp / log2 the distance may add SLEEF's own <= 1 ulp; elsewhere SLEEF's
 * double functions are as exact as libm's and the bound is the same */
static const double sleef_extra[F_COUNT] = {1.0, 1.0, 0, 0, 0, 0, 0, 0, 0};

#define GELU_C 0.7978845608028654
#define GELU_A 0.044715

/* |2u| of the tanh-form GELU, u = sqrt(2 / pi) (x + 0.044715 x^3) */
static double two_u(double x) { return fabs(2.0 * GELU_C * (x + GELU_A * x * x * x)); }

/* The magnitude of the exp argument that the bound grows with (see above). */
static double exp_argument(int f, double x) {
    switch (f) {
    case F_GELU_ERF_D: return 0.5 * x * x;
    case F_GELU_TANH: return x < 0.0 ? two_u(x) : 0.0;
    case F_GELU_TANH_D: return two_u(x);
    default: return 0.0;
    }
}

static double bound_at(int f, int sleef, float x) {
    return bound_a[f] + bound_k[f] * exp_argument(f, x) + (sleef ? sleef_extra[f] : 0.0);
}

#define BLOCK 4096 /* a multiple of every vector width */
#define EPSILON 0.01f

/* ==== the functions under test, per path =============================================== */

typedef void (*vm_fn)(int n, const float *x, float *y);

static float ones[BLOCK];

#define VM_SIMD(isa, TARGET, W)                                                                               \
    static TARGET void vm_##isa##_exp(int n, const float *x, float *y) {                                      \
        int i;                                                                                                \
        for (i = 0; i < n; i += W) fm__##isa##_store(y + i, fm__##isa##_exp(fm__##isa##_load(x + i)));         \
    }                                                                                                         \
    static TARGET void vm_##isa##_log2(int n, const float *x, float *y) {                                     \
        int i;                                                                                                \
        for (i = 0; i < n; i += W) fm__##isa##_store(y + i, fm__##isa##_log2(fm__##isa##_load(x + i)));        \
    }                                                                                                         \
    static TARGET void vm_##isa##_softplus(int n, const float *x, float *y) {                                 \
        int i;                                                                                                \
        for (i = 0; i < n; i += W)                                                                            \
            fm__##isa##_store(y + i, fm__##isa##_noise_std(fm__##isa##_load(x + i), fm__##isa##_set1(0.0f))); \
    }                                                                                                         \
    static TARGET void vm_##isa##_softplus_eps(int n, const float *x, float *y) {                             \
        int i;                                                                                                \
        for (i = 0; i < n; i += W)                                                                            \
            fm__##isa##_store(y + i, fm__##isa##_noise_std(fm__##isa##_load(x + i), fm__##isa##_set1(EPSILON))); \
    }                                                                                                         \
    static TARGET void vm_##isa##_erfinv(int n, const float *x, float *y) {                                   \
        int i;                                                                                                \
        for (i = 0; i < n; i += W)                                                                            \
            fm__##isa##_store(y + i, fm__##isa##_normal_from_hash(fm__##isa##_load(x + i)));                  \
    }                                                                                                         \
    static TARGET void vm_##isa##_cdf(int n, const float *x, float *y) {                                      \
        int i;                                                                                                \
        for (i = 0; i < n; i += W) fm__##isa##_store(y + i, fm__##isa##_normal_cdf(fm__##isa##_load(x + i))); \
    }                                                                                                         \
    static void vm_##isa##_gelu_erf(int n, const float *x, float *y) { fm__##isa##_gelu_row(n, 0, x, NULL, y); } \
    static void vm_##isa##_gelu_erf_d(int n, const float *x, float *y) { fm__##isa##_gelu_row(n, 0, x, ones, y); } \
    static void vm_##isa##_gelu_tanh(int n, const float *x, float *y) { fm__##isa##_gelu_row(n, 1, x, NULL, y); } \
    static void vm_##isa##_gelu_tanh_d(int n, const float *x, float *y) { fm__##isa##_gelu_row(n, 1, x, ones, y); }

#define VM_TABLE(isa)                                                                                        \
    {vm_##isa##_exp,       vm_##isa##_log2,      vm_##isa##_softplus,  vm_##isa##_erfinv,                     \
     vm_##isa##_cdf,       vm_##isa##_gelu_erf,  vm_##isa##_gelu_erf_d, vm_##isa##_gelu_tanh,                \
     vm_##isa##_gelu_tanh_d, vm_##isa##_softplus_eps}

#if FM__HAVE_X86
VM_SIMD(avx2, FM__TARGET_AVX2, 8)
VM_SIMD(avx512, FM__TARGET_AVX512, 16)
#endif
#if FM__HAVE_NEON
#define VM_NO_TARGET
VM_SIMD(neon, VM_NO_TARGET, 4)
#endif

static uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}
static float float_of(uint32_t u) {
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static void vm_scalar_exp(int n, const float *x, float *y) {
    int i;
    for (i = 0; i < n; i++) y[i] = expf(x[i]);
}
static void vm_scalar_softplus(int n, const float *x, float *y) {
    int i;
    for (i = 0; i < n; i++) y[i] = fm__noise_std(x[i], 0.0f);
}
static void vm_scalar_softplus_eps(int n, const float *x, float *y) {
    int i;
    for (i = 0; i < n; i++) y[i] = fm__noise_std(x[i], EPSILON);
}
static void vm_scalar_erfinv(int n, const float *x, float *y) {
    int i;
    for (i = 0; i < n; i++) y[i] = fm__normal_from_hash(bits_of(x[i]));
}
static void vm_scalar_cdf(int n, const float *x, float *y) {
    int i;
    for (i = 0; i < n; i++) y[i] = (float)fm__normal_cdf(x[i]);
}
static void vm_scalar_gelu_erf(int n, const float *x, float *y) { fm__scalar_gelu_row(n, 0, x, NULL, y); }
static void vm_scalar_gelu_erf_d(int n, const float *x, float *y) { fm__scalar_gelu_row(n, 0, x, ones, y); }
static void vm_scalar_gelu_tanh(int n, const float *x, float *y) { fm__scalar_gelu_row(n, 1, x, NULL, y); }
static void vm_scalar_gelu_tanh_d(int n, const float *x, float *y) { fm__scalar_gelu_row(n, 1, x, ones, y); }

typedef struct vm_path {
    fm_isa isa;
    vm_fn fn[F_ALL];
} vm_path;

static const vm_path all_paths[] = {
    {FM_ISA_SCALAR,
     {vm_scalar_exp, NULL, vm_scalar_softplus, vm_scalar_erfinv, vm_scalar_cdf, vm_scalar_gelu_erf,
      vm_scalar_gelu_erf_d, vm_scalar_gelu_tanh, vm_scalar_gelu_tanh_d, vm_scalar_softplus_eps}},
#if FM__HAVE_X86
    {FM_ISA_AVX2, VM_TABLE(avx2)},
    {FM_ISA_AVX512, VM_TABLE(avx512)},
#endif
#if FM__HAVE_NEON
    {FM_ISA_NEON, VM_TABLE(neon)},
#endif
};
#define N_ALL_PATHS ((int)(sizeof all_paths / sizeof all_paths[0]))

/* ==== the oracles ========================================================================= */

typedef struct vm_math {
    const char *name;
    double (*exp)(double);
    double (*log1p)(double);
    double (*log2)(double);
    double (*erf)(double);
    double (*erfc)(double);
    float (*expf)(float);  /* the float function compared directly, where the oracle has one */
    float (*log2f)(float);
} vm_math;

static const vm_math libm_math = {"libm (double)", exp, log1p, log2, erf, erfc, NULL, NULL};
#if FM_VECMATH_SLEEF
/* (sleef.h declares them with a const-qualified return type: wrappers give plain pointers) */
static double sleef_exp(double x) { return Sleef_exp_u10(x); }
static double sleef_log1p(double x) { return Sleef_log1p_u10(x); }
static double sleef_log2(double x) { return Sleef_log2_u10(x); }
static double sleef_erf(double x) { return Sleef_erf_u10(x); }
static double sleef_erfc(double x) { return Sleef_erfc_u15(x); }
static float sleef_expf(float x) { return Sleef_expf_u10(x); }
static float sleef_log2f(float x) { return Sleef_log2f_u10(x); }
static const vm_math sleef_math = {"SLEEF u10", sleef_exp,  sleef_log1p, sleef_log2, sleef_erf,
                                   sleef_erfc,  sleef_expf, sleef_log2f};
#define N_ORACLES 2
#else
#define N_ORACLES 1
#endif
static const vm_math *oracles[2];

#define SQRT1_2 0.70710678118654752440
#define SQRT_2 1.41421356237309504880
#define INV_SQRT_2PI 0.39894228040143267794
#define TWO_OVER_SQRT_PI 1.12837916709551257390
/* sqrt(2) erfinv(1 - y) for the draw's distance y in (0, 1), by Newton's method on erf(w) = 1 - y
 * (or erfc(w) = y, which keeps the tail's precision) from Winitzki's approximation (~2e-3), or
 * from the previous root when the grid's previous y was within 1e-4 (fewer steps, same root). */
static double sqrt2_erfinv_1my(const vm_math *m, double y) {
    static double last_y[2] = {-1.0, -1.0}, last_w[2]; /* per oracle */
    const int k = m == &libm_math ? 0 : 1;
    const double x = 1.0 - y;
    double w, step;
    int it;
    if (fabs(y - last_y[k]) < 1e-4 * y) {
        w = last_w[k];
    } else {
        const double a = 0.147, ln = m->log1p(-x * x) /* log(y (2 - y)) */;
        const double t1 = 2.0 / (3.14159265358979323846 * a) + 0.5 * ln;
        w = sqrt(sqrt(t1 * t1 - ln / a) - t1);
    }
    for (it = 0; it < 12; it++) {
        const double slope = TWO_OVER_SQRT_PI * m->exp(-w * w);
        step = x <= 0.5 ? (m->erf(w) - x) / slope : (y - m->erfc(w)) / slope;
        w -= step;
        if (fabs(step) <= 1e-13 * w) break; /* quadratic: what is left is ~1e-26, below erf's noise */
    }
    last_y[k] = y, last_w[k] = w;
    return SQRT_2 * w;
}

/* The draw's distance y and value x = +-(1 - y) of hash h, as flexmoe.h defines them. */
static double hash_distance(uint32_t h) { return ((double)((h >> 8) & 0x7FFFFFu) + 0.5) * 0x1p-23; }

/* ref: the function's value in double; scale: the size whose ulps count the error (|ref|, or
 * the terms' size where they cancel). */
static void oracle(int f, const vm_math *m, float xf, double *ref, double *scale) {
    const double x = xf;
    double r, s = -1.0;
    switch (f) {
    case F_EXP: r = m->expf ? (double)m->expf(xf) : m->exp(x); break;
    case F_LOG2: r = m->log2f ? (double)m->log2f(xf) : m->log2(x); break;
    case F_SOFTPLUS: r = (x > 0.0 ? x : 0.0) + m->log1p(m->exp(-fabs(x))); break;
    case F_ERFINV: {
        const uint32_t h = bits_of(xf);
        r = sqrt2_erfinv_1my(m, hash_distance(h));
        if (h >> 31) r = -r;
        break;
    }
    case F_CDF: r = 0.5 * m->erfc(-x * SQRT1_2); break;
    case F_GELU_ERF: r = x * (0.5 * m->erfc(-x * SQRT1_2)); break;
    case F_GELU_ERF_D: {
        const double cdf = 0.5 * m->erfc(-x * SQRT1_2), xpdf = x * (INV_SQRT_2PI * m->exp(-0.5 * x * x));
        r = cdf + xpdf;
        s = fabs(cdf) + fabs(xpdf);
        break;
    }
    default: { /* the tanh form, as x sigmoid(2u) */
        const double u = GELU_C * (x + GELU_A * x * x * x), sig = 1.0 / (1.0 + m->exp(-2.0 * u));
        if (f == F_GELU_TANH) {
            r = x * sig;
        } else {
            const double second = 2.0 * x * sig * (1.0 - sig) * GELU_C * (1.0 + 3.0 * GELU_A * x * x);
            r = sig + second;
            s = fabs(sig) + fabs(second);
        }
        break;
    }
    }
    *ref = r;
    *scale = s >= 0.0 && s == s ? s : fabs(r);
}

/* The float spacing at |v| (2^-149 in the subnormal range). */
static double ulp_at(double v) {
    int e;
    v = fabs(v);
    if (v < FLT_MIN) return 0x1p-149;
    (void)frexp(v, &e); /* v = f 2^e, f in [0.5, 1): float spacing 2^(e - 24) */
    return ldexp(1.0, e - 24);
}

/* got against ref in ulps of scale; a NaN, an infinity or a result out of float range must be
 * matched exactly (else +Inf). */
static double ulp_error(float got, double ref, double scale) {
    const float rounded = (float)ref;
    if (ref != ref) return got != got ? 0.0 : INFINITY;
    if (isinf(rounded)) return got == rounded ? 0.0 : INFINITY;
    if (!isfinite(got)) return INFINITY;
    return fabs((double)got - ref) / ulp_at(scale);
}

/* ==== inputs and the documented behaviour ================================================ */

static int sparse; /* FM_VECMATH_SPARSE: thin the grids by 2^sparse */

/* Classes of inputs: ULP (error measured), or an exact value the documentation promises. */
/* C_FLUSH: exactly 0 on the SIMD paths (a documented flush), measured on the scalar path, whose
 * double formula has no such flush. */
enum { C_SKIP, C_ULP, C_EXACT, C_ULP_OR_ZERO, C_FLUSH };

static float exp_overflow; /* the least float whose true exp rounds to +Inf in float */

/* Where flexmoe_simd.h / flexmoe.h promise an exact result, *want is it (NaN: any NaN). */
static int classify(int f, float x, float *want) {
    const float big = 20.0f;
    if (f == F_ERFINV) return C_ULP; /* every hash is a valid input */
    if (x != x) {
        if (f == F_LOG2) return C_SKIP;
        *want = NAN; /* NaN in, NaN out: documented for exp, softplus, normal_cdf, GELU */
        return C_EXACT;
    }
    switch (f) {
    case F_EXP:
        /* "exactly 0 for x <= -104 (-Inf included) and +Inf past ln(FLT_MAX)"; exp(denormal) = 1 */
        if (x <= -104.0f) return *want = 0.0f, C_EXACT;
        if (x >= exp_overflow) return *want = INFINITY, C_EXACT;
        if (fabsf(x) < FLT_MIN) return *want = 1.0f, C_EXACT;
        return C_ULP;
    case F_LOG2: {
        /* "for positive normal x"; a power of two is exact */
        int e;
        if (!(x >= FLT_MIN && x <= FLT_MAX)) return C_SKIP;
        if (frexpf(x, &e) == 0.5f) return *want = (float)(e - 1), C_EXACT;
        return C_ULP;
    }
    case F_SOFTPLUS:
        if (isinf(x)) return *want = x > 0 ? INFINITY : 0.0f, C_EXACT; /* max(r, 0) + log1p(0) */
        return C_ULP;
    case F_CDF:
        /* |z| capped at 42 "where erfc is 0 in float anyway" */
        if (x >= 42.0f) return *want = 1.0f, C_EXACT;
        if (x <= -42.0f) return *want = 0.0f, C_EXACT;
        return C_ULP;
    case F_GELU_TANH:
    case F_GELU_TANH_D:
        /* "exp overflows to +Inf for x below about -10, and 1 / Inf must be 0": exactly 0 where
         * the true exp(-2u) is past FLT_MAX with room for u's rounding, either side near it */
        if (isfinite(x) && x < 0.0f && x >= -big) {
            const double arg = two_u(x);
            if (arg > 89.5) return *want = 0.0f, C_FLUSH;
            if (arg > 87.5) return C_ULP_OR_ZERO;
            return C_ULP;
        }
        if (f == F_GELU_TANH_D) goto derivative;
        /* fall through */
    case F_GELU_ERF:
        /* "+Inf gives +Inf, -Inf gives NaN; past |x| = 20, GELU(x) = x or 0" */
        if (isinf(x)) return *want = x > 0 ? INFINITY : NAN, C_EXACT;
        if (x > big) return *want = x, C_EXACT;
        if (x < -big) return *want = 0.0f, C_EXACT;
        return C_ULP;
    default: /* the derivatives: "GELU'(x) = 1 or 0 past |x| = 20; at +-Inf, NaN" */
    derivative:
        if (isinf(x)) return *want = NAN, C_EXACT;
        if (x > big) return *want = 1.0f, C_EXACT;
        if (x < -big) return *want = 0.0f, C_EXACT;
        return C_ULP;
    }
}

static int exact_ok(float got, float want) { return want != want ? got != got : got == want; }

/* Inputs of function f: grows *n, returns the array (hash bit patterns carried in floats for
 * erfinv). */
typedef struct grid {
    float *x;
    size_t n, cap;
} grid;

static void push(grid *g, float v) {
    if (g->n == g->cap) {
        float *bigger;
        g->cap = g->cap ? 2 * g->cap : 1 << 16;
        bigger = (float *)malloc(g->cap * sizeof(float));
        if (g->n) memcpy(bigger, g->x, g->n * sizeof(float));
        free(g->x);
        g->x = bigger;
    }
    g->x[g->n++] = v;
}

/* v and the 64 floats either side of it */
static void push_around(grid *g, float v) {
    float lo = v, hi = v;
    int i;
    push(g, v);
    for (i = 0; i < 64; i++) {
        lo = nextafterf(lo, -INFINITY);
        hi = nextafterf(hi, INFINITY);
        push(g, lo);
        push(g, hi);
    }
}

static void push_specials(grid *g) {
    static const float specials[] = {0.0f, -0.0f, 0x1p-149f, -0x1p-149f, 0x1.fffffcp-127f, -0x1.fffffcp-127f,
                                     FLT_MIN, -FLT_MIN, FLT_MAX, -FLT_MAX, INFINITY, -INFINITY, NAN, -NAN,
                                     1.0f, -1.0f, 0.5f, 2.0f};
    size_t i;
    for (i = 0; i < sizeof specials / sizeof specials[0]; i++) push(g, specials[i]);
}

static grid make_grid(int f) {
    grid g = {NULL, 0, 0};
    const uint32_t stride = 2048u << sparse;
    const int dense = (1 << 21) >> sparse;
    double lo = 0, hi = 0;
    uint32_t u;
    int i;
    if (f == F_ERFINV) { /* every distinct draw on the positive side; the negative side is its mirror */
        for (u = 0; u < 0x800000u; u += 1u << sparse) push(&g, float_of(u << 8));
        for (u = 0; u < 4096; u++) push(&g, float_of(u << 8)), push(&g, float_of((0x7FFFFFu - u) << 8));
        /* the tail branch starts at c > 2.5, y(2 - y) < e^-5: y ~ 0.00337, m ~ 28270 */
        for (u = 28000; u < 28600; u++) push(&g, float_of(u << 8));
        return g;
    }
    for (u = 0; u < 0x7F800000u; u += stride) {
        push(&g, float_of(u));
        if (f != F_LOG2) push(&g, float_of(u | 0x80000000u));
    }
    push(&g, FLT_MAX);
    push(&g, -FLT_MAX);
    push_specials(&g);
    switch (f) {
    case F_EXP:
        lo = -104.0, hi = 89.0;
        push_around(&g, exp_overflow);
        push_around(&g, 88.0f);
        push_around(&g, -87.336544750553102f); /* ln FLT_MIN: the subnormals begin */
        push_around(&g, -103.27892990343185f); /* ln 2^-149 */
        push_around(&g, -103.97207708399179f); /* ln 2^-150: 0 below */
        push_around(&g, -104.0f);
        push_around(&g, -110.0f);
        push_around(&g, 89.0f);
        push_around(&g, 0.0f);
        push_around(&g, 0.34657359f);  /* ln2 / 2: n switches */
        push_around(&g, -0.34657359f);
        break;
    case F_LOG2:
        lo = 0.5, hi = 2.0;
        push_around(&g, 1.0f);
        push_around(&g, 0.70710677f); /* sqrt(1/2) and sqrt(2): split_exponent's switch */
        push_around(&g, 1.4142135f);
        push_around(&g, FLT_MIN);
        push_around(&g, FLT_MAX);
        push_around(&g, 0x1p-23f); /* the erfinv draw's smallest y (2 - y) */
        break;
    case F_SOFTPLUS:
        lo = -110.0, hi = 30.0;
        push_around(&g, 0.0f);
        push_around(&g, -87.336544750553102f);
        push_around(&g, -104.0f);
        push_around(&g, 16.635532f); /* log1p(exp(-r)) below half an ulp of r beyond */
        push_around(&g, 88.72f);
        break;
    case F_CDF:
        lo = -15.0, hi = 8.0;
        push_around(&g, 0.0f);
        push_around(&g, 42.0f);
        push_around(&g, -42.0f);
        push_around(&g, -13.0f);   /* Phi below FLT_MIN */
        push_around(&g, -14.0f);   /* and below 2^-149 just past */
        push_around(&g, 5.4f);     /* Phi rounds to 1 */
        break;
    default: /* GELU */
        lo = -25.0, hi = 25.0;
        push_around(&g, 0.0f);
        push_around(&g, 20.0f);
        push_around(&g, -20.0f);
        push_around(&g, -0.75179165f); /* the derivative's zero */
        push_around(&g, -10.0f);
        push_around(&g, -5.0f);
        break;
    }
    for (i = 0; i < dense; i++) push(&g, (float)(lo + (hi - lo) * i / (dense - 1)));
    return g;
}

/* ==== measurement ========================================================================== */

typedef struct worst {
    double err, ratio; /* the worst error, and the worst error / bound(x) */
    float x, ratio_x;
} worst;

typedef struct result {
    worst ulp[2];       /* per oracle */
    size_t measured;     /* inputs with an ULP error */
    size_t exact_bad;    /* documented values missed */
    float exact_x, exact_got, exact_want;
    size_t other_bad;    /* erfinv symmetry / lane mixing, softplus + epsilon */
    char other_what[160];
    double seconds;
} result;

static result results[F_COUNT][FM_ISA_COUNT];
static int ran[F_COUNT][FM_ISA_COUNT];

static void note_other(result *r, const char *what, float x, float got, float want) {
    if (r->other_bad++ == 0)
        snprintf(r->other_what, sizeof r->other_what, "%s at %a (bits 0x%08x): got %a, want %a", what, x, bits_of(x),
                 got, want);
}

/* Runs function f over its grid on the selected paths. */
static void run_function(int f, const vm_path *const *paths, int n_paths) {
    static float in[BLOCK], out[BLOCK], out2[BLOCK], mixed[BLOCK], tail[BLOCK], tail_out[BLOCK], want[BLOCK];
    static double ref[2][BLOCK], scale[2][BLOCK];
    static int cls[BLOCK];
    grid g = make_grid(f);
    size_t start;
    int p, o, i;
    double t0;
    for (p = 0; p < n_paths; p++) memset(&results[f][paths[p]->isa], 0, sizeof(result));
    for (start = 0; start < g.n; start += BLOCK) {
        const int n = g.n - start < BLOCK ? (int)(g.n - start) : BLOCK;
        /* pad the last block with a harmless input */
        for (i = 0; i < BLOCK; i++) in[i] = i < n ? g.x[start + i] : (f == F_ERFINV ? float_of(1u << 30) : 1.0f);
        for (i = 0; i < n; i++) {
            cls[i] = classify(f, in[i], &want[i]);
            if (cls[i] == C_ULP || cls[i] == C_ULP_OR_ZERO || cls[i] == C_FLUSH)
                for (o = 0; o < N_ORACLES; o++) oracle(f, oracles[o], in[i], &ref[o][i], &scale[o][i]);
        }
        for (p = 0; p < n_paths; p++) {
            const vm_path *path = paths[p];
            result *r = &results[f][path->isa];
            if (!path->fn[f]) continue;
            ran[f][path->isa] = 1;
            t0 = (double)clock();
            path->fn[f](BLOCK, in, out);
            r->seconds += ((double)clock() - t0) / CLOCKS_PER_SEC;
            for (i = 0; i < n; i++) {
                if (cls[i] == C_EXACT || (cls[i] == C_FLUSH && path->isa != FM_ISA_SCALAR)) {
                    if (!exact_ok(out[i], want[i]) && r->exact_bad++ == 0)
                        r->exact_x = in[i], r->exact_got = out[i], r->exact_want = want[i];
                } else if (cls[i] == C_ULP || cls[i] == C_FLUSH || (cls[i] == C_ULP_OR_ZERO && out[i] != 0.0f)) {
                    r->measured++;
                    for (o = 0; o < N_ORACLES; o++) {
                        const double e = ulp_error(out[i], ref[o][i], scale[o][i]), q = e / bound_at(f, o, in[i]);
                        if (e > r->ulp[o].err) r->ulp[o].err = e, r->ulp[o].x = in[i];
                        if (q > r->ulp[o].ratio) r->ulp[o].ratio = q, r->ulp[o].ratio_x = in[i];
                    }
                }
            }
            if (f == F_ERFINV) {
                /* the negative draws: exactly the mirror image (the sign is or-ed into x) */
                for (i = 0; i < BLOCK; i++) mixed[i] = float_of(bits_of(in[i]) | 0x80000000u);
                path->fn[f](BLOCK, mixed, out2);
                for (i = 0; i < n; i++)
                    if (bits_of(out2[i]) != (bits_of(out[i]) ^ 0x80000000u))
                        note_other(r, "erfinv(-x) != -erfinv(x)", mixed[i], out2[i], -out[i]);
                /* lane independence: tail-branch draws (y < 0.002) in every other lane */
                for (i = 0; i < BLOCK; i++) tail[i] = float_of((uint32_t)((start + i) % 16384u) << 8 | (uint32_t)(i & 2) << 30);
                path->fn[f](BLOCK, tail, tail_out);
                for (i = 0; i < BLOCK; i++) mixed[i] = i & 1 ? in[i] : tail[i];
                path->fn[f](BLOCK, mixed, out2);
                for (i = 0; i < n; i++) {
                    const float expect = i & 1 ? out[i] : tail_out[i];
                    if (bits_of(out2[i]) != bits_of(expect)) note_other(r, "lane mixing changed a result", mixed[i], out2[i], expect);
                }
            }
            if (f == F_SOFTPLUS && path->fn[F_SOFTPLUS_EPS]) {
                /* noise_std(r, eps) is softplus(r) + eps with one rounding more */
                path->fn[F_SOFTPLUS_EPS](BLOCK, in, out2);
                for (i = 0; i < n; i++) {
                    const float expect = out[i] + EPSILON;
                    if (!exact_ok(out2[i], expect)) note_other(r, "noise_std(r, 0.01) != softplus(r) + 0.01", in[i], out2[i], expect);
                }
            }
        }
    }
    free(g.x);
}

/* Out-of-domain log2 (zero, negatives, subnormals, Inf, NaN): not specified, printed only. */
static void show_log2_outside(const vm_path *path) {
    static const float xs[8] = {0.0f, -1.0f, 0x1p-149f, 0x1p-130f, INFINITY, NAN, -0.0f, -INFINITY};
    float in[BLOCK], out[BLOCK];
    int i;
    if (!path->fn[F_LOG2]) return;
    for (i = 0; i < BLOCK; i++) in[i] = xs[i % 8];
    path->fn[F_LOG2](BLOCK, in, out);
    printf("  log2 outside its domain (%s, unspecified):", fm_isa_name(path->isa));
    for (i = 0; i < 8; i++) printf(" log2(%g)=%g", xs[i], out[i]);
    printf("\n");
}

int main(void) {
    fm_isa isas[FM_ISA_COUNT];
    const vm_path *paths[FM_ISA_COUNT];
    int n_isas, n_paths = 0, k, f, p, o;
    const char *env = getenv("FM_VECMATH_SPARSE");
    clock_t start = clock();
    sparse = env ? atoi(env) : 0;
    if (sparse < 0 || sparse > 8) sparse = 0;
    for (k = 0; k < BLOCK; k++) ones[k] = 1.0f;
    oracles[0] = &libm_math;
#if FM_VECMATH_SLEEF
    oracles[1] = &sleef_math;
#endif
    /* the least float x with exp(x) >= FLT_MAX + half an ulp */
    exp_overflow = 88.0f;
    while (!isinf((float)exp((double)exp_overflow))) exp_overflow = nextafterf(exp_overflow, INFINITY);
    printf("test_vecmath: oracles libm (double)%s; grids %s\n", FM_VECMATH_SLEEF ? " and SLEEF u10" : " only (no SLEEF)",
           sparse ? "thinned (FM_VECMATH_SPARSE)" : "full");
    n_isas = fm_test_isas(isas);
    for (k = 0; k < n_isas; k++) {
        fm_test_use_isa(isas[k]);
        for (p = 0; p < N_ALL_PATHS; p++)
            if (all_paths[p].isa == isas[k]) paths[n_paths++] = &all_paths[p];
    }
    fm_test_context = "vecmath";
    for (f = 0; f < F_COUNT; f++) {
        const clock_t t = clock();
        run_function(f, paths, n_paths);
        printf("  %-13s %.2f s (oracles included)\n", function_names[f], (double)(clock() - t) / CLOCKS_PER_SEC);
    }

    printf("\nworst error in ulp (x: where), and the worst error / bound(x) with bound = A + K arg(x)\n");
    printf("%-13s %-7s %9s %-15s", "function", "path", "libm", "at x");
    if (N_ORACLES > 1) printf(" %9s %-15s", "SLEEF", "at x");
    printf(" %4s %4s %6s %6s %9s %7s\n", "A", "K", "/bound", N_ORACLES > 1 ? "/bound" : "", "points", "seconds");
    for (f = 0; f < F_COUNT; f++)
        for (p = 0; p < n_paths; p++) {
            const fm_isa isa = paths[p]->isa;
            const result *r = &results[f][isa];
            if (!ran[f][isa]) {
                printf("%-13s %-7s %9s (no such function on this path)\n", function_names[f], fm_isa_name(isa), "-");
                continue;
            }
            fm_test_context = fm_isa_name(isa);
            printf("%-13s %-7s", function_names[f], fm_isa_name(isa));
            for (o = 0; o < N_ORACLES; o++) {
                float x = r->ulp[o].x;
                if (f == F_ERFINV) /* show the draw x = 1 - y rather than the hash bits */
                    x = (float)((bits_of(x) >> 31 ? -1.0 : 1.0) * (1.0 - hash_distance(bits_of(x))));
                printf(" %9.3f %-15.8g", r->ulp[o].err, x);
            }
            printf(" %4.1f %4.1f", bound_a[f], bound_k[f]);
            for (o = 0; o < 2; o++)
                if (o < N_ORACLES) printf(" %6.3f", r->ulp[o].ratio);
                else printf(" %6s", "");
            printf(" %9lu %7.2f\n", (unsigned long)r->measured, r->seconds);
            FM_CHECK(r->measured > 0, "%s: nothing measured", function_names[f]);
            for (o = 0; o < N_ORACLES; o++)
                FM_CHECK(r->ulp[o].ratio <= 1.0, "%s: %.3f ulp against %s at x = %a, over the bound %.2f there",
                         function_names[f], r->ulp[o].ratio * bound_at(f, o, r->ulp[o].ratio_x), oracles[o]->name,
                         r->ulp[o].ratio_x, bound_at(f, o, r->ulp[o].ratio_x));
            FM_CHECK(r->exact_bad == 0, "%s: %lu documented values missed, first at x = %a: got %a, want %a",
                     function_names[f], (unsigned long)r->exact_bad, r->exact_x, r->exact_got, r->exact_want);
            FM_CHECK(r->other_bad == 0, "%s: %lu mismatches, first: %s", function_names[f],
                     (unsigned long)r->other_bad, r->other_what);
        }
    printf("\n");
    for (p = 0; p < n_paths; p++) show_log2_outside(paths[p]);
    printf("test_vecmath: %.1f s of CPU\n", (double)(clock() - start) / CLOCKS_PER_SEC);
    return fm_test_finish("test_vecmath");
}
