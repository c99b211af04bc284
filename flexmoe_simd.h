/* flexmoe_simd.h — the ISA kernels behind flexmoe.h. Included by flexmoe.h's implementation;
 * users never include it themselves, but it must sit beside flexmoe.h.
 *
 * Layout (SLEEF style: explicit per-ISA entry points, BLIS style: primitives apart from loops):
 *   - each ISA section defines a handful of vector primitives named fm__<isa>_<op> (load, store,
 *     partial load/store, segment reductions, exp, ...) with the ISA's target attribute;
 *   - then it includes this file once more with FM__SIMD_TEMPLATE set, which instantiates the
 *     kernel bodies (written once, in "Kernel templates" at the end) over those primitives and
 *     the ISA's kernel table fm__<isa>_kernels, each entry leaving through fm__<isa>_leave
 *     (vzeroupper on x86).
 * x86 paths use __attribute__((target)) so a baseline build carries them all; SIMD types never
 * cross a function boundary without that attribute.
 *
 * exp is computed inline (Kernel templates, FM__OP(exp)) rather than by calling SLEEF: every
 * vector register is caller-saved in the x86-64 and AArch64 ABIs, so a call per vector spills
 * the kernel's state and costs ~15 cycles per 16 floats on Zen 4, 4x the polynomial; with it the
 * softmax stayed at 1.4-1.5x oneDNN, inline it is 2.3x and more (bench/RESULTS.md).
 */
#ifndef FM__SIMD_TEMPLATE
#ifndef FLEXMOE_SIMD_H
#define FLEXMOE_SIMD_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM__HAVE_X86 1
#else
#define FM__HAVE_X86 0
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define FM__HAVE_NEON 1
#else
#define FM__HAVE_NEON 0
#endif

#define FM__CAT_(a, b) a##b
#define FM__CAT(a, b) FM__CAT_(a, b)
/* fm__<isa>_<name> for the ISA being instantiated */
#define FM__OP(name) FM__CAT(FM__CAT(fm__, FM__ISA), FM__CAT(_, name))

/* The power-of-two lane segment that holds a row of `cols` floats in the packed narrow-row path. */
static inline int fm__segment_for(int cols) {
    int segment = 1;
    while (segment < cols) segment <<= 1;
    return segment;
}

/* ==== x86-64: CPU and OS feature detection ================================================= */
#if FM__HAVE_X86
#include <cpuid.h>
/* GCC 12 in C++ mode flags its own _mm512_undefined_ps() (GCC PR 105593). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* XCR0 tells which register state the OS saves on a context switch. */
static unsigned fm__xgetbv0(void) {
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return eax;
}

/* Bit masks of the features we need: bit 0 AVX2 path usable, bit 1 AVX-512 path usable. */
static int fm__x86_features(void) {
    static int cached = -1; /* threads may race to fill it, with the same value: atomic accesses */
    unsigned eax, ebx, ecx, edx, xcr0;
    int features = FM__LOAD(cached);
    if (features >= 0) return features;
    features = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_OSXSAVE) && (ecx & bit_AVX) &&
        (ecx & bit_FMA) && __get_cpuid_max(0, NULL) >= 7) {
        xcr0 = fm__xgetbv0();
        __cpuid_count(7, 0, eax, ebx, ecx, edx);
        if ((xcr0 & 0x6) == 0x6 && (ebx & bit_AVX2)) features |= 1;
        if ((features & 1) && (xcr0 & 0xE6) == 0xE6 && (ebx & bit_AVX512F) &&
            (ebx & bit_AVX512BW) && (ebx & bit_AVX512DQ) && (ebx & bit_AVX512VL))
            features |= 2;
    }
    FM__STORE(cached, features);
    return features;
}

static int fm__cpu_has_avx2(void) { return (fm__x86_features() & 1) != 0; }
static int fm__cpu_has_avx512(void) { return (fm__x86_features() & 2) != 0; }

#define FM__TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FM__TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

/* ==== AVX2 + FMA =========================================================================== */

#define FM__ISA avx2
#define FM__ISA_ID FM_ISA_AVX2
#define FM__TARGET FM__TARGET_AVX2
#define FM__V __m256
#define FM__W 8

/* A window into this table gives the lane mask for the first n lanes of a vector. */
static const int32_t fm__avx2_lane_masks[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

static inline FM__TARGET __m256i fm__avx2_first_lanes(int n) {
    return _mm256_loadu_si256((const __m256i *)(fm__avx2_lane_masks + 8 - n));
}
static inline FM__TARGET __m256 fm__avx2_set1(float v) { return _mm256_set1_ps(v); }
static inline FM__TARGET __m256 fm__avx2_load(const float *p) { return _mm256_loadu_ps(p); }
static inline FM__TARGET void fm__avx2_store(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
/* First n (0 < n < 8) lanes from p, the others `fill`; never touches memory past p + n. */
static inline FM__TARGET __m256 fm__avx2_load_part(const float *p, int n, float fill) {
    __m256i mask = fm__avx2_first_lanes(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
}
static inline FM__TARGET void fm__avx2_store_part(float *p, __m256 v, int n) {
    _mm256_maskstore_ps(p, fm__avx2_first_lanes(n), v);
}
/* A streaming (non-temporal) store; p aligned to 32 bytes. The fence orders streaming stores
 * before whatever the thread does next (another thread reading the output). */
static inline FM__TARGET void fm__avx2_stream(float *p, __m256 v) { _mm256_stream_ps(p, v); }
static inline FM__TARGET void fm__avx2_stream_fence(void) { _mm_sfence(); }
/* Back to baseline code: the upper halves of the YMM registers zeroed (vzeroupper). */
static inline FM__TARGET void fm__avx2_leave(void) { _mm256_zeroupper(); }
static inline FM__TARGET __m256 fm__avx2_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
static inline FM__TARGET __m256 fm__avx2_sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
static inline FM__TARGET __m256 fm__avx2_mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
static inline FM__TARGET __m256 fm__avx2_max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
static inline FM__TARGET __m256 fm__avx2_fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
static inline FM__TARGET __m256 fm__avx2_recip(__m256 a) { return _mm256_div_ps(_mm256_set1_ps(1.0f), a); }
static inline FM__TARGET __m256 fm__avx2_min(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
static inline FM__TARGET __m256 fm__avx2_fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
static inline FM__TARGET __m256 fm__avx2_round(__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* v * 2^n for integral n in [-252, 254], as two exponent-field scalings that each stay normal. */
static inline FM__TARGET __m256 fm__avx2_scale_pow2(__m256 v, __m256 n) {
    const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
    const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(v, a), b);
}
/* Exchange lanes i and i ^ distance (distance a power of two below 8). */
static inline FM__TARGET __m256 fm__avx2_swap(__m256 v, int distance) {
    switch (distance) {
    case 1: return _mm256_permute_ps(v, 0xB1);
    case 2: return _mm256_permute_ps(v, 0x4E);
    default: return _mm256_permute2f128_ps(v, v, 0x01);
    }
}

/* Lanes i with (i & distance) != 0 from b, the others from a. */
static inline FM__TARGET __m256 fm__avx2_blend_upper(__m256 a, __m256 b, int distance) {
    switch (distance) {
    case 1: return _mm256_blend_ps(a, b, 0xAA);
    case 2: return _mm256_blend_ps(a, b, 0xCC);
    default: return _mm256_blend_ps(a, b, 0xF0);
    }
}

/* Comparison masks are all-ones / all-zero lanes. */
#define FM__MASK __m256
static inline FM__TARGET __m256 fm__avx2_greater(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
static inline FM__TARGET __m256 fm__avx2_equal(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
static inline FM__TARGET __m256 fm__avx2_mask_or(__m256 a, __m256 b) { return _mm256_or_ps(a, b); }
static inline FM__TARGET int fm__avx2_any(__m256 mask) { return _mm256_movemask_ps(mask) != 0; }
static inline FM__TARGET __m256 fm__avx2_select(__m256 mask, __m256 if_set, __m256 if_clear) {
    return _mm256_blendv_ps(if_clear, if_set, mask);
}
/* NaN as +Inf, other values unchanged: minps returns its second operand when one is NaN. */
static inline FM__TARGET __m256 fm__avx2_rank_key(__m256 v) { return _mm256_min_ps(v, _mm256_set1_ps(INFINITY)); }
static inline FM__TARGET __m256 fm__avx2_sqrt(__m256 v) { return _mm256_sqrt_ps(v); }
static inline FM__TARGET __m256 fm__avx2_div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
static inline FM__TARGET __m256 fm__avx2_abs(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
/* For positive normal x: x = mantissa * 2^exponent with mantissa in [sqrt(1/2), sqrt(2)); returns
 * the exponent. Subtracting the bits of sqrt(1/2) first makes the exponent field round the right
 * way, so no compare and fix-up is needed. */
static inline FM__TARGET __m256 fm__avx2_split_exponent(__m256 x, __m256 *mantissa) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i exponent = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3F3504F3)), 23);
    *mantissa = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(exponent, 23)));
    return _mm256_cvtepi32_ps(exponent);
}
/* The gate noise's lowbias32 hash of the 32-bit lanes of `state` (bit patterns carried in a float
 * vector) mixed with `key`; the result's bits ride in a float vector too. */
static inline FM__TARGET __m256 fm__avx2_noise_hash(__m256 state, uint32_t key) {
    __m256i h = _mm256_xor_si256(_mm256_castps_si256(state), _mm256_set1_epi32((int)key));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb352d));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x846ca68bu));
    return _mm256_castsi256_ps(_mm256_xor_si256(h, _mm256_srli_epi32(h, 16)));
}
/* y = (((h >> 8) & 0x7FFFFF) + 1/2) / 2^23, the draw's distance from +-1: those bits as the
 * mantissa of 1.0f, minus 1 - 2^-24 (exact). */
static inline FM__TARGET __m256 fm__avx2_hash_distance(__m256 h) {
    const __m256i mantissa = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(h), 8), _mm256_set1_epi32(0x7FFFFF));
    return _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(mantissa, _mm256_set1_epi32(0x3F800000))),
                         _mm256_set1_ps(0x1.fffffep-1f));
}
/* v with its sign bit set where h's is: |v| with the sign of h for v >= 0, -|v| for h = -0. */
static inline FM__TARGET __m256 fm__avx2_with_sign_of(__m256 v, __m256 h) {
    return _mm256_or_ps(v, _mm256_and_ps(h, _mm256_set1_ps(-0.0f)));
}

#define FM__GEMM_NV 2
#define FM__GEMM_DOT_ROWS 2
#define FM__SIMD_TEMPLATE
#include "flexmoe_simd.h" /* instantiates the kernel templates, then undefines FM__ISA etc. */


/* ==== AVX-512 ============================================================================== */

#define FM__ISA avx512
#define FM__ISA_ID FM_ISA_AVX512
#define FM__TARGET FM__TARGET_AVX512
#define FM__V __m512
#define FM__W 16

static inline FM__TARGET __m512 fm__avx512_set1(float v) { return _mm512_set1_ps(v); }
static inline FM__TARGET __m512 fm__avx512_load(const float *p) { return _mm512_loadu_ps(p); }
static inline FM__TARGET void fm__avx512_store(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline FM__TARGET __m512 fm__avx512_load_part(const float *p, int n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), (__mmask16)((1u << n) - 1), p);
}
static inline FM__TARGET void fm__avx512_store_part(float *p, __m512 v, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v);
}
/* p aligned to 64 bytes */
static inline FM__TARGET void fm__avx512_stream(float *p, __m512 v) { _mm512_stream_ps(p, v); }
static inline FM__TARGET void fm__avx512_stream_fence(void) { _mm_sfence(); }
/* vzeroupper zeroes bits 128 and up of ZMM0-15, the state legacy SSE code would pay for;
 * ZMM16-31 are out of SSE's reach. */
static inline FM__TARGET void fm__avx512_leave(void) { _mm256_zeroupper(); }
static inline FM__TARGET __m512 fm__avx512_add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
static inline FM__TARGET __m512 fm__avx512_sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
static inline FM__TARGET __m512 fm__avx512_mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
static inline FM__TARGET __m512 fm__avx512_max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
static inline FM__TARGET __m512 fm__avx512_fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
/* rcp14 plus one Newton step: about 1 ulp, and far cheaper than a 512-bit divide on Zen 4. */
static inline FM__TARGET __m512 fm__avx512_recip(__m512 a) {
    __m512 r = _mm512_rcp14_ps(a);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.0f)));
}
static inline FM__TARGET __m512 fm__avx512_min(__m512 a, __m512 b) { return _mm512_min_ps(a, b); }
static inline FM__TARGET __m512 fm__avx512_fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
static inline FM__TARGET __m512 fm__avx512_round(__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* vscalefps does v * 2^n in one instruction, with IEEE overflow and underflow. */
static inline FM__TARGET __m512 fm__avx512_scale_pow2(__m512 v, __m512 n) { return _mm512_scalef_ps(v, n); }
static inline FM__TARGET __m512 fm__avx512_swap(__m512 v, int distance) {
    switch (distance) {
    case 1: return _mm512_permute_ps(v, 0xB1);
    case 2: return _mm512_permute_ps(v, 0x4E);
    case 4: return _mm512_shuffle_f32x4(v, v, 0xB1);
    default: return _mm512_shuffle_f32x4(v, v, 0x4E);
    }
}

static inline FM__TARGET __m512 fm__avx512_blend_upper(__m512 a, __m512 b, int distance) {
    static const __mmask16 upper[9] = {0, 0xAAAA, 0xCCCC, 0, 0xF0F0, 0, 0, 0, 0xFF00};
    return _mm512_mask_blend_ps(upper[distance], a, b);
}

#define FM__MASK __mmask16
static inline FM__TARGET __mmask16 fm__avx512_greater(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline FM__TARGET __mmask16 fm__avx512_equal(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
static inline FM__TARGET __mmask16 fm__avx512_mask_or(__mmask16 a, __mmask16 b) { return (__mmask16)(a | b); }
static inline FM__TARGET int fm__avx512_any(__mmask16 mask) { return mask != 0; }
static inline FM__TARGET __m512 fm__avx512_select(__mmask16 mask, __m512 if_set, __m512 if_clear) {
    return _mm512_mask_blend_ps(mask, if_clear, if_set);
}
static inline FM__TARGET __m512 fm__avx512_rank_key(__m512 v) { return _mm512_min_ps(v, _mm512_set1_ps(INFINITY)); }
static inline FM__TARGET __m512 fm__avx512_sqrt(__m512 v) { return _mm512_sqrt_ps(v); }
static inline FM__TARGET __m512 fm__avx512_div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
static inline FM__TARGET __m512 fm__avx512_abs(__m512 v) { return _mm512_abs_ps(v); }
static inline FM__TARGET __m512 fm__avx512_split_exponent(__m512 x, __m512 *mantissa) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i exponent = _mm512_srai_epi32(_mm512_sub_epi32(bits, _mm512_set1_epi32(0x3F3504F3)), 23);
    *mantissa = _mm512_castsi512_ps(_mm512_sub_epi32(bits, _mm512_slli_epi32(exponent, 23)));
    return _mm512_cvtepi32_ps(exponent);
}
static inline FM__TARGET __m512 fm__avx512_noise_hash(__m512 state, uint32_t key) {
    __m512i h = _mm512_xor_si512(_mm512_castps_si512(state), _mm512_set1_epi32((int)key));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846ca68bu));
    return _mm512_castsi512_ps(_mm512_xor_si512(h, _mm512_srli_epi32(h, 16)));
}
static inline FM__TARGET __m512 fm__avx512_hash_distance(__m512 h) {
    const __m512i mantissa = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(h), 8), _mm512_set1_epi32(0x7FFFFF));
    return _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(mantissa, _mm512_set1_epi32(0x3F800000))),
                         _mm512_set1_ps(0x1.fffffep-1f));
}
static inline FM__TARGET __m512 fm__avx512_with_sign_of(__m512 v, __m512 h) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), _mm512_and_si512(_mm512_castps_si512(h),
                                                                                        _mm512_set1_epi32((int)0x80000000u))));
}

#define FM__GEMM_NV 4
#define FM__GEMM_DOT_ROWS 4
#define FM__SIMD_TEMPLATE
#include "flexmoe_simd.h" /* instantiates the kernel templates, then undefines FM__ISA etc. */

#endif /* FM__HAVE_X86 */

/* ==== NEON (aarch64) ======================================================================= */
#if FM__HAVE_NEON
#include <arm_neon.h>

#define FM__ISA neon
#define FM__ISA_ID FM_ISA_NEON
#define FM__TARGET
#define FM__V float32x4_t
#define FM__W 4

static inline float32x4_t fm__neon_set1(float v) { return vdupq_n_f32(v); }
static inline float32x4_t fm__neon_load(const float *p) { return vld1q_f32(p); }
static inline void fm__neon_store(float *p, float32x4_t v) { vst1q_f32(p, v); }
/* NEON has no masked memory access: partial vectors go through a small stack buffer. */
static inline float32x4_t fm__neon_load_part(const float *p, int n, float fill) {
    float lanes[4];
    int i;
    for (i = 0; i < 4; i++) lanes[i] = i < n ? p[i] : fill;
    return vld1q_f32(lanes);
}
static inline void fm__neon_store_part(float *p, float32x4_t v, int n) {
    float lanes[4];
    int i;
    vst1q_f32(lanes, v);
    for (i = 0; i < n; i++) p[i] = lanes[i];
}
/* NEON intrinsics have no streaming store (STNP is only a hint): plain stores, nothing to fence. */
static inline void fm__neon_stream(float *p, float32x4_t v) { vst1q_f32(p, v); }
static inline void fm__neon_stream_fence(void) {}
/* AArch64 has no upper-state transition to clean up. */
static inline void fm__neon_leave(void) {}
static inline float32x4_t fm__neon_add(float32x4_t a, float32x4_t b) { return vaddq_f32(a, b); }
static inline float32x4_t fm__neon_sub(float32x4_t a, float32x4_t b) { return vsubq_f32(a, b); }
static inline float32x4_t fm__neon_mul(float32x4_t a, float32x4_t b) { return vmulq_f32(a, b); }
static inline float32x4_t fm__neon_max(float32x4_t a, float32x4_t b) { return vmaxq_f32(a, b); }
static inline float32x4_t fm__neon_fmadd(float32x4_t a, float32x4_t b, float32x4_t c) { return vfmaq_f32(c, a, b); }
static inline float32x4_t fm__neon_recip(float32x4_t a) { return vdivq_f32(vdupq_n_f32(1.0f), a); }
static inline float32x4_t fm__neon_min(float32x4_t a, float32x4_t b) { return vminq_f32(a, b); }
static inline float32x4_t fm__neon_fnmadd(float32x4_t a, float32x4_t b, float32x4_t c) { return vfmsq_f32(c, a, b); }
static inline float32x4_t fm__neon_round(float32x4_t a) { return vrndnq_f32(a); }
static inline float32x4_t fm__neon_scale_pow2(float32x4_t v, float32x4_t n) {
    const int32x4_t ni = vcvtq_s32_f32(n), half = vshrq_n_s32(ni, 1), bias = vdupq_n_s32(127);
    const float32x4_t a = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(half, bias), 23));
    const float32x4_t b = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(ni, half), bias), 23));
    return vmulq_f32(vmulq_f32(v, a), b);
}
static inline float32x4_t fm__neon_swap(float32x4_t v, int distance) {
    return distance == 1 ? vrev64q_f32(v) : vextq_f32(v, v, 2);
}

static inline float32x4_t fm__neon_blend_upper(float32x4_t a, float32x4_t b, int distance) {
    static const uint32_t upper[2][4] = {{0, ~0u, 0, ~0u}, {0, 0, ~0u, ~0u}};
    return vbslq_f32(vld1q_u32(upper[distance >> 1]), b, a);
}

#define FM__MASK uint32x4_t
static inline uint32x4_t fm__neon_greater(float32x4_t a, float32x4_t b) { return vcgtq_f32(a, b); }
static inline uint32x4_t fm__neon_equal(float32x4_t a, float32x4_t b) { return vceqq_f32(a, b); }
static inline uint32x4_t fm__neon_mask_or(uint32x4_t a, uint32x4_t b) { return vorrq_u32(a, b); }
static inline int fm__neon_any(uint32x4_t mask) { return vmaxvq_u32(mask) != 0; }
static inline float32x4_t fm__neon_select(uint32x4_t mask, float32x4_t if_set, float32x4_t if_clear) {
    return vbslq_f32(mask, if_set, if_clear);
}
/* fminnm returns the number when one operand is NaN: NaN becomes +Inf. */
static inline float32x4_t fm__neon_rank_key(float32x4_t v) { return vminnmq_f32(v, vdupq_n_f32(INFINITY)); }
static inline float32x4_t fm__neon_sqrt(float32x4_t v) { return vsqrtq_f32(v); }
static inline float32x4_t fm__neon_div(float32x4_t a, float32x4_t b) { return vdivq_f32(a, b); }
static inline float32x4_t fm__neon_abs(float32x4_t v) { return vabsq_f32(v); }
static inline float32x4_t fm__neon_split_exponent(float32x4_t x, float32x4_t *mantissa) {
    const int32x4_t bits = vreinterpretq_s32_f32(x);
    const int32x4_t exponent = vshrq_n_s32(vsubq_s32(bits, vdupq_n_s32(0x3F3504F3)), 23);
    *mantissa = vreinterpretq_f32_s32(vsubq_s32(bits, vshlq_n_s32(exponent, 23)));
    return vcvtq_f32_s32(exponent);
}
static inline float32x4_t fm__neon_noise_hash(float32x4_t state, uint32_t key) {
    uint32x4_t h = veorq_u32(vreinterpretq_u32_f32(state), vdupq_n_u32(key));
    h = veorq_u32(h, vshrq_n_u32(h, 16));
    h = vmulq_u32(h, vdupq_n_u32(0x7feb352du));
    h = veorq_u32(h, vshrq_n_u32(h, 15));
    h = vmulq_u32(h, vdupq_n_u32(0x846ca68bu));
    return vreinterpretq_f32_u32(veorq_u32(h, vshrq_n_u32(h, 16)));
}
static inline float32x4_t fm__neon_hash_distance(float32x4_t h) {
    const uint32x4_t mantissa = vandq_u32(vshrq_n_u32(vreinterpretq_u32_f32(h), 8), vdupq_n_u32(0x7FFFFF));
    return vsubq_f32(vreinterpretq_f32_u32(vorrq_u32(mantissa, vdupq_n_u32(0x3F800000))), vdupq_n_f32(0x1.fffffep-1f));
}
static inline float32x4_t fm__neon_with_sign_of(float32x4_t v, float32x4_t h) {
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(v), vandq_u32(vreinterpretq_u32_f32(h), vdupq_n_u32(0x80000000u))));
}

#define FM__GEMM_NV 4
#define FM__GEMM_DOT_ROWS 2
#define FM__SIMD_TEMPLATE
#include "flexmoe_simd.h" /* instantiates the kernel templates, then undefines FM__ISA etc. */

#endif /* FM__HAVE_NEON */

#endif /* FLEXMOE_SIMD_H */
#else  /* FM__SIMD_TEMPLATE */

/* ==== Kernel templates ===================================================================== */
/* Instantiated once per ISA over its primitives: FM__V is the vector type, FM__W its lane count,
 * FM__OP(name) the ISA's fm__<isa>_<name>. */

/* Loops over the W rows of a block are unrolled so that their per-row vectors live in registers. */
#define FM__UNROLL_W _Pragma("GCC unroll 16")

/* exp(x) in float, inlined so that no call spills the vector registers around it: x = n ln2 + r
 * with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), exp(r) from Cephes' degree-7 polynomial,
 * then the exact scaling by 2^n. About 1 ulp. The clamp keeps 2^n representable as two normal
 * factors and still gives exactly 0 for x <= -104 (-Inf included) and +Inf past ln(FLT_MAX);
 * the clamp takes x as its second operand, which is the one x86 min/max return for NaN, so NaN
 * stays NaN on every path. exp_lo(x, lo) is exp(x + lo) for x + lo held in two floats (|lo| a few
 * units at most): lo joins after the exact reduction of x, so it is not rounded away. */
static inline FM__TARGET FM__V FM__OP(exp_lo)(FM__V x, FM__V lo) {
    const FM__V clamped = FM__OP(min)(FM__OP(set1)(89.0f), FM__OP(max)(FM__OP(set1)(-110.0f), x));
    const FM__V n = FM__OP(round)(FM__OP(mul)(FM__OP(add)(clamped, lo), FM__OP(set1)(1.44269504088896341f)));
    FM__V r = FM__OP(fnmadd)(n, FM__OP(set1)(0.693359375f), clamped);
    FM__V p = FM__OP(set1)(1.9875691500e-4f);
    r = FM__OP(add)(FM__OP(fnmadd)(n, FM__OP(set1)(-2.12194440e-4f), r), lo);
    p = FM__OP(fmadd)(p, r, FM__OP(set1)(1.3981999507e-3f));
    p = FM__OP(fmadd)(p, r, FM__OP(set1)(8.3334519073e-3f));
    p = FM__OP(fmadd)(p, r, FM__OP(set1)(4.1665795894e-2f));
    p = FM__OP(fmadd)(p, r, FM__OP(set1)(1.6666665459e-1f));
    p = FM__OP(fmadd)(p, r, FM__OP(set1)(5.0000001201e-1f));
    p = FM__OP(fmadd)(FM__OP(mul)(p, r), r, FM__OP(add)(r, FM__OP(set1)(1.0f)));
    return FM__OP(scale_pow2)(p, n);
}
/* lo = -0: x + -0 is x for every x, -0 included, so the compiler drops both adds */
static inline FM__TARGET FM__V FM__OP(exp)(FM__V x) { return FM__OP(exp_lo)(x, FM__OP(set1)(-0.0f)); }

static inline FM__TARGET FM__V FM__OP(combine)(FM__V a, FM__V b, int take_max) {
    return take_max ? FM__OP(max)(a, b) : FM__OP(add)(a, b);
}

/* Max (or sum) over each aligned segment of `segment` lanes (a power of two <= W), left in every
 * lane of the segment: a butterfly of lane exchanges. */
static inline FM__TARGET FM__V FM__OP(segment_reduce)(FM__V v, int segment, int take_max) {
    int distance;
    for (distance = 1; distance < segment; distance <<= 1)
        v = FM__OP(combine)(v, FM__OP(swap)(v, distance), take_max);
    return v;
}

/* Lane r of the result is the max (or sum) of all lanes of v[r], for r < W; v is overwritten.
 * A transposing tree: each level merges pairs of vectors, the lanes with bit `distance` set
 * carrying the second one, so W rows cost W - 1 merges of 4 cheap operations each instead of
 * W butterflies of log2(W) dependent steps. */
static inline FM__TARGET FM__V FM__OP(transpose_reduce)(FM__V *v, int take_max) {
    int distance, r;
    FM__UNROLL_W
    for (distance = FM__W / 2; distance >= 1; distance /= 2) {
        FM__UNROLL_W
        for (r = 0; r < distance; r++) {
            FM__V low = FM__OP(blend_upper)(v[r], v[r + distance], distance);
            FM__V high = FM__OP(blend_upper)(v[r + distance], v[r], distance);
            v[r] = FM__OP(combine)(low, FM__OP(swap)(high, distance), take_max);
        }
    }
    return v[0];
}

/* Rows narrower than half a vector are packed several to a vector: row s of the group occupies
 * lanes [s * segment, s * segment + cols), the rest of its segment holds `fill`. */
static inline FM__TARGET FM__V FM__OP(load_rows)(const float *x, int ld, int nrows, int segment,
                                                 int cols, float fill) {
    float lanes[FM__W];
    int s, j;
    if (cols == segment && ld == cols && nrows * segment == FM__W) return FM__OP(load)(x);
    for (j = 0; j < FM__W; j++) lanes[j] = fill;
    for (s = 0; s < nrows; s++)
        for (j = 0; j < cols; j++) lanes[s * segment + j] = x[(size_t)s * ld + j];
    return FM__OP(load)(lanes);
}
static inline FM__TARGET void FM__OP(store_rows)(float *y, int ld, int nrows, int segment, int cols,
                                                 FM__V v) {
    float lanes[FM__W];
    int s, j;
    if (cols == segment && ld == cols && nrows * segment == FM__W) {
        FM__OP(store)(y, v);
        return;
    }
    FM__OP(store)(lanes, v);
    for (s = 0; s < nrows; s++)
        for (j = 0; j < cols; j++) y[(size_t)s * ld + j] = lanes[s * segment + j];
}

/* Sums (of exp, of products) are blocked so that a lane never adds more than this many terms in
 * a row: the rounding error then grows with the block, not with the row length. */
#define FM__SUM_BLOCK 16
/* Rows of up to FM__SUM_BLOCK vectors go through the row-block path (W rows at a time, at most
 * 16 KiB of AVX-512 data, which stays in L1 between its passes); longer rows go one at a time. */
#define FM__BLOCK_MAX_COLS (FM__SUM_BLOCK * FM__W)

/* ---- softmax forward ---- */

/* Packed narrow rows (2 * cols <= W): W / segment rows per vector. */
static FM__TARGET void FM__OP(softmax_packed)(int rows, int cols, const float *x, int ldx, float *y, int ldy) {
    const int segment = fm__segment_for(cols), per_vector = FM__W / segment;
    int r;
    for (r = 0; r < rows; r += per_vector) {
        const int nrows = rows - r < per_vector ? rows - r : per_vector;
        FM__V v = FM__OP(load_rows)(x + (size_t)r * ldx, ldx, nrows, segment, cols, -INFINITY);
        FM__V e = FM__OP(exp)(FM__OP(sub)(v, FM__OP(segment_reduce)(v, segment, 1)));
        FM__V p = FM__OP(mul)(e, FM__OP(recip)(FM__OP(segment_reduce)(e, segment, 0)));
        FM__OP(store_rows)(y + (size_t)r * ldy, ldy, nrows, segment, cols, p);
    }
}

/* The per-lane maxima of one row. */
static inline FM__TARGET FM__V FM__OP(max_partial)(const float *x, int n) {
    const int full = n - n % FM__W, tail = n - full;
    FM__V m = tail ? FM__OP(load_part)(x + full, tail, -INFINITY) : FM__OP(load)(x);
    int j;
    for (j = tail ? 0 : FM__W; j < full; j += FM__W) m = FM__OP(max)(m, FM__OP(load)(x + j));
    return m;
}

/* Row maxima of up to W rows starting at x, as lanes of one vector. */
static inline FM__TARGET FM__V FM__OP(block_max)(int nrows, int n, const float *x, int ldx) {
    FM__V partial[FM__W];
    int r;
    FM__UNROLL_W
    for (r = 0; r < FM__W; r++) /* rows past nrows repeat the last one: no branch, no harm */
        partial[r] = FM__OP(max_partial)(x + (size_t)(r < nrows ? r : nrows - 1) * ldx, n);
    return FM__OP(transpose_reduce)(partial, 1);
}

/* exp(x - max) of one row into y (max broadcast in every lane); returns the per-lane partial
 * sums, blocked so that a lane never adds more than FM__SUM_BLOCK terms in a row. */
static inline FM__TARGET FM__V FM__OP(exp_row)(const float *x, float *y, int n, FM__V max) {
    const int full = n - n % FM__W, tail = n - full;
    FM__V sum = FM__OP(set1)(0.0f), e;
    int j, block;
    for (block = 0; block < full; block += FM__SUM_BLOCK * FM__W) {
        const int end = block + FM__SUM_BLOCK * FM__W < full ? block + FM__SUM_BLOCK * FM__W : full;
        FM__V partial = FM__OP(set1)(0.0f);
        for (j = block; j < end; j += FM__W) {
            e = FM__OP(exp)(FM__OP(sub)(FM__OP(load)(x + j), max));
            FM__OP(store)(y + j, e);
            partial = FM__OP(add)(partial, e);
        }
        sum = FM__OP(add)(sum, partial);
    }
    if (tail) {
        e = FM__OP(exp)(FM__OP(sub)(FM__OP(load_part)(x + full, tail, -INFINITY), max));
        FM__OP(store_part)(y + full, e, tail);
        sum = FM__OP(add)(sum, e);
    }
    return sum;
}

static inline FM__TARGET void FM__OP(scale_row)(float *y, int n, FM__V factor) {
    const int full = n - n % FM__W, tail = n - full;
    int j;
    for (j = 0; j < full; j += FM__W) FM__OP(store)(y + j, FM__OP(mul)(FM__OP(load)(y + j), factor));
    if (tail) FM__OP(store_part)(y + full, FM__OP(mul)(FM__OP(load_part)(y + full, tail, 0.0f), factor), tail);
}

/* Rows of at most FM__BLOCK_MAX_COLS in blocks of W: row maxima and row sums are per-row partial
 * vectors folded by one transposing reduction per block. The passes are software-pipelined
 * across blocks: while row r of block b goes through exp (the arithmetic-bound step), row r of
 * block b + 1 gets its maximum and row r of block b - 1 its final scaling (load/store-bound
 * steps), so the two kinds of work overlap instead of running as separate phases. */
static FM__TARGET void FM__OP(softmax_blocks)(int rows, int n, const float *x, int ldx, float *y, int ldy) {
    FM__V next_max[FM__W], sums[FM__W];
    float row_max[FM__W], prev_inv[FM__W];
    int b, r;
    FM__OP(store)(row_max, FM__OP(block_max)(rows < FM__W ? rows : FM__W, n, x, ldx));
    for (b = 0; b < rows; b += FM__W) {
        const int nrows = rows - b < FM__W ? rows - b : FM__W, next = b + FM__W, prev = b - FM__W;
        const int next_rows = rows - next < FM__W ? rows - next : FM__W;
        for (r = 0; r < FM__W; r++) {
            sums[r] = r < nrows ? FM__OP(exp_row)(x + (size_t)(b + r) * ldx, y + (size_t)(b + r) * ldy, n,
                                                  FM__OP(set1)(row_max[r]))
                                : FM__OP(set1)(0.0f);
            if (r < next_rows) next_max[r] = FM__OP(max_partial)(x + (size_t)(next + r) * ldx, n);
            if (prev >= 0) FM__OP(scale_row)(y + (size_t)(prev + r) * ldy, n, FM__OP(set1)(prev_inv[r]));
        }
        if (next_rows > 0) FM__OP(store)(row_max, FM__OP(transpose_reduce)(next_max, 1));
        FM__OP(store)(prev_inv, FM__OP(recip)(FM__OP(transpose_reduce)(sums, 0)));
        if (next >= rows)
            for (r = 0; r < nrows; r++) FM__OP(scale_row)(y + (size_t)(b + r) * ldy, n, FM__OP(set1)(prev_inv[r]));
    }
}

/* One long row, three passes over L1-resident data. */
static FM__TARGET void FM__OP(softmax_row)(const float *x, float *y, int n) {
    const FM__V max = FM__OP(segment_reduce)(FM__OP(max_partial)(x, n), FM__W, 1);
    const FM__V sum = FM__OP(segment_reduce)(FM__OP(exp_row)(x, y, n, max), FM__W, 0);
    FM__OP(scale_row)(y, n, FM__OP(recip)(sum));
}

static FM__TARGET void FM__OP(softmax_forward)(int rows, int cols, const float *x, int ldx, float *y,
                                               int ldy) {
    int r;
    if (2 * cols <= FM__W) {
        FM__OP(softmax_packed)(rows, cols, x, ldx, y, ldy);
    } else if (cols <= FM__BLOCK_MAX_COLS) {
        FM__OP(softmax_blocks)(rows, cols, x, ldx, y, ldy);
    } else {
        for (r = 0; r < rows; r++) FM__OP(softmax_row)(x + (size_t)r * ldx, y + (size_t)r * ldy, cols);
    }
}

/* ---- softmax backward: dx = y * (dy - <y, dy>) ---- */

static FM__TARGET void FM__OP(softmax_backward_packed)(int rows, int cols, const float *y, int ldy,
                                                       const float *dy, int lddy, float *dx, int lddx) {
    const int segment = fm__segment_for(cols), per_vector = FM__W / segment;
    int r;
    for (r = 0; r < rows; r += per_vector) {
        const int nrows = rows - r < per_vector ? rows - r : per_vector;
        FM__V yv = FM__OP(load_rows)(y + (size_t)r * ldy, ldy, nrows, segment, cols, 0.0f);
        FM__V dyv = FM__OP(load_rows)(dy + (size_t)r * lddy, lddy, nrows, segment, cols, 0.0f);
        FM__V dot = FM__OP(segment_reduce)(FM__OP(mul)(yv, dyv), segment, 0);
        FM__OP(store_rows)(dx + (size_t)r * lddx, lddx, nrows, segment, cols, FM__OP(mul)(yv, FM__OP(sub)(dyv, dot)));
    }
}

/* The dot product of a row, as a vector of per-lane partial sums (blocked like the exp sums). */
static inline FM__TARGET FM__V FM__OP(dot_partial)(const float *a, const float *b, int n) {
    const int full = n - n % FM__W;
    FM__V dot = FM__OP(set1)(0.0f);
    int j, block;
    for (block = 0; block < full; block += FM__SUM_BLOCK * FM__W) {
        const int end = block + FM__SUM_BLOCK * FM__W < full ? block + FM__SUM_BLOCK * FM__W : full;
        FM__V partial = FM__OP(set1)(0.0f);
        for (j = block; j < end; j += FM__W) partial = FM__OP(fmadd)(FM__OP(load)(a + j), FM__OP(load)(b + j), partial);
        dot = FM__OP(add)(dot, partial);
    }
    if (full < n)
        dot = FM__OP(fmadd)(FM__OP(load_part)(a + full, n - full, 0.0f), FM__OP(load_part)(b + full, n - full, 0.0f), dot);
    return dot;
}

/* dx = y * (dy - dot) over one row, dot broadcast in every lane. */
static inline FM__TARGET void FM__OP(scale_shifted)(const float *y, const float *dy, float *dx, int n, FM__V dot) {
    const int full = n - n % FM__W;
    int j;
    for (j = 0; j < full; j += FM__W)
        FM__OP(store)(dx + j, FM__OP(mul)(FM__OP(load)(y + j), FM__OP(sub)(FM__OP(load)(dy + j), dot)));
    if (full < n) {
        FM__V yv = FM__OP(load_part)(y + full, n - full, 0.0f), dyv = FM__OP(load_part)(dy + full, n - full, 0.0f);
        FM__OP(store_part)(dx + full, FM__OP(mul)(yv, FM__OP(sub)(dyv, dot)), n - full);
    }
}

static FM__TARGET void FM__OP(softmax_backward)(int rows, int cols, const float *y, int ldy,
                                                const float *dy, int lddy, float *dx, int lddx) {
    FM__V partial[FM__W];
    float per_row[FM__W];
    int r, i;
    if (2 * cols <= FM__W) {
        FM__OP(softmax_backward_packed)(rows, cols, y, ldy, dy, lddy, dx, lddx);
    } else if (cols <= 4 * FM__W) { /* measured: past 4 vectors a row, one row at a time wins */
        for (r = 0; r < rows; r += FM__W) {
            const int nrows = rows - r < FM__W ? rows - r : FM__W;
            for (i = 0; i < FM__W; i++)
                partial[i] = i < nrows ? FM__OP(dot_partial)(y + (size_t)(r + i) * ldy, dy + (size_t)(r + i) * lddy, cols)
                                       : FM__OP(set1)(0.0f);
            FM__OP(store)(per_row, FM__OP(transpose_reduce)(partial, 0));
            for (i = 0; i < nrows; i++)
                FM__OP(scale_shifted)(y + (size_t)(r + i) * ldy, dy + (size_t)(r + i) * lddy,
                                      dx + (size_t)(r + i) * lddx, cols, FM__OP(set1)(per_row[i]));
        }
    } else {
        for (r = 0; r < rows; r++) {
            const float *yr = y + (size_t)r * ldy, *dyr = dy + (size_t)r * lddy;
            FM__OP(scale_shifted)(yr, dyr, dx + (size_t)r * lddx, cols,
                                  FM__OP(segment_reduce)(FM__OP(dot_partial)(yr, dyr, cols), FM__W, 0));
        }
    }
}

/* ---- top-k: one row per lane ---- */

/* Transposes the W x W block held in v (v[r] lane c = element (r, c)) in place: log2(W) stages,
 * each exchanging the off-diagonal d x d sub-blocks of every 2d x 2d block. */
static inline FM__TARGET void FM__OP(transpose)(FM__V *v) {
    int distance, r;
    FM__UNROLL_W
    for (distance = FM__W / 2; distance >= 1; distance /= 2) {
        FM__UNROLL_W
        for (r = 0; r < FM__W; r++) {
            if (r & distance) continue;
            {
                const FM__V a = v[r], b = v[r + distance];
                v[r] = FM__OP(blend_upper)(a, FM__OP(swap)(b, distance), distance);
                v[r + distance] = FM__OP(blend_upper)(FM__OP(swap)(a, distance), b, distance);
            }
        }
    }
}

/* Columns [c0, c0 + W) of W rows, transposed: column[j] lane r = x[r][c0 + j]. Rows past nrows
 * repeat the last row; columns past cols read as `fill`. */
static inline FM__TARGET void FM__OP(load_columns)(const float *x, int ldx, int nrows, int c0, int cols,
                                                   float fill, FM__V *column) {
    const int n = cols - c0 < FM__W ? cols - c0 : FM__W;
    int r;
    FM__UNROLL_W
    for (r = 0; r < FM__W; r++) {
        const float *p = x + (size_t)(r < nrows ? r : nrows - 1) * ldx + c0;
        column[r] = n == FM__W ? FM__OP(load)(p) : FM__OP(load_part)(p, n, fill);
    }
    FM__OP(transpose)(column);
}

/* One step of the k-deep insertion network kept in registers: top[0..k) holds each lane's k
 * largest keys so far in descending order, slot[] their columns. A key enters only when strictly
 * greater, and columns arrive in increasing order, so equal keys keep the lower column first.
 * Every comparison reads the old state (levels go from the bottom up), so the k levels do not
 * wait on each other. */
static inline __attribute__((always_inline)) FM__TARGET void FM__OP(topk_insert)(FM__V *top, FM__V *slot, int k,
                                                                                  FM__V key, FM__V column) {
    FM__MASK above = FM__OP(greater)(key, top[k - 1]), above_previous;
    int i;
    FM__UNROLL_W
    for (i = k - 1; i > 0; i--) {
        above_previous = FM__OP(greater)(key, top[i - 1]);
        top[i] = FM__OP(select)(above_previous, top[i - 1], FM__OP(select)(above, key, top[i]));
        slot[i] = FM__OP(select)(above_previous, slot[i - 1], FM__OP(select)(above, column, slot[i]));
        above = above_previous;
    }
    top[0] = FM__OP(select)(above, key, top[0]);
    slot[0] = FM__OP(select)(above, column, slot[0]);
}

/* One chunk of W key columns (key[j] for column c0 + j) through the k-deep network. The state
 * stays in memory between chunks and in registers within one: a few loads and stores per W
 * columns, and one compiled network per depth instead of one per depth and caller. */
static inline __attribute__((always_inline)) FM__TARGET void FM__OP(topk_chunk)(FM__V *top, FM__V *slot, int k,
                                                                                 const FM__V *key, int c0) {
    FM__V t[FLEXMOE_GATE_MAX_TOP_K + 1], s[FLEXMOE_GATE_MAX_TOP_K + 1];
    int i, j;
    for (i = 0; i < k; i++) t[i] = top[i], s[i] = slot[i];
    FM__UNROLL_W
    for (j = 0; j < FM__W; j++) FM__OP(topk_insert)(t, s, k, key[j], FM__OP(set1)((float)(c0 + j)));
    for (i = 0; i < k; i++) top[i] = t[i], slot[i] = s[i];
}

/* The network at fixed depths (unrolled, in registers), and at any depth up to the maximum. */
#define FM__TOPK_CHUNK_AT(K)                                                                       \
    static FM__TARGET void FM__OP(FM__CAT(topk_chunk_, K))(FM__V *top, FM__V *slot, int k, const FM__V *key, \
                                                          int c0) {                                \
        (void)k;                                                                                   \
        FM__OP(topk_chunk)(top, slot, K, key, c0);                                                 \
    }
FM__TOPK_CHUNK_AT(1)
FM__TOPK_CHUNK_AT(2)
FM__TOPK_CHUNK_AT(3)
FM__TOPK_CHUNK_AT(4)
FM__TOPK_CHUNK_AT(5)
FM__TOPK_CHUNK_AT(8)
FM__TOPK_CHUNK_AT(9)
#undef FM__TOPK_CHUNK_AT
static FM__TARGET void FM__OP(topk_chunk_any)(FM__V *top, FM__V *slot, int k, const FM__V *key, int c0) {
    FM__OP(topk_chunk)(top, slot, k, key, c0);
}

typedef void (*FM__OP(topk_chunk_fn))(FM__V *top, FM__V *slot, int k, const FM__V *key, int c0);

static inline FM__TARGET FM__OP(topk_chunk_fn) FM__OP(topk_chunk_for)(int k) {
    switch (k) {
    case 1: return FM__OP(topk_chunk_1);
    case 2: return FM__OP(topk_chunk_2);
    case 3: return FM__OP(topk_chunk_3);
    case 4: return FM__OP(topk_chunk_4);
    case 5: return FM__OP(topk_chunk_5);
    case 8: return FM__OP(topk_chunk_8);
    case 9: return FM__OP(topk_chunk_9);
    default: return FM__OP(topk_chunk_any);
    }
}

/* An empty network: keys -Inf (only greater keys enter), columns -1. */
static inline FM__TARGET void FM__OP(topk_reset)(FM__V *top, FM__V *slot, int k) {
    int i;
    for (i = 0; i < k; i++) {
        top[i] = FM__OP(set1)(-INFINITY);
        slot[i] = FM__OP(set1)(-1.0f);
    }
}

/* Writes the indices (and values copied from x) of up to W rows from the network's columns, one
 * level at a time through one vector of buffer. */
static FM__TARGET void FM__OP(topk_write)(int nrows, int cols, int k, const float *x, int ldx, const FM__V *slot,
                                          int32_t *indices, int ldi, float *values, int ldv) {
    float column[FM__W];
    int i, r;
    for (i = 0; i < k; i++) {
        FM__OP(store)(column, slot[i]);
        for (r = 0; r < nrows; r++) indices[(size_t)r * ldi + i] = (int32_t)column[r];
    }
    for (r = 0; r < nrows; r++) {
        int32_t *row_indices = indices + (size_t)r * ldi;
        if (row_indices[k - 1] < 0) fm__topk_fill_missing(cols, k, row_indices);
        if (values)
            for (i = 0; i < k; i++) values[(size_t)r * ldv + i] = x[(size_t)r * ldx + row_indices[i]];
    }
}

/* The network carries column numbers in float lanes, exact up to 2^24. */
#define FM__EXACT_FLOAT_INTEGERS (1 << 24)

/* W rows per block, one per lane; rows past the end repeat the last one, columns past the end
 * read as -Inf and never enter. k above the network's depth, or rows wider than the float lanes
 * can number exactly, run the scalar insertion. */
static FM__TARGET void FM__OP(topk)(int rows, int cols, int k, const float *x, int ldx, int32_t *indices,
                                    int ldi, float *values, int ldv) {
    const FM__OP(topk_chunk_fn) chunk = FM__OP(topk_chunk_for)(k);
    FM__V top[FLEXMOE_GATE_MAX_TOP_K], slot[FLEXMOE_GATE_MAX_TOP_K], column[FM__W];
    int r, c0, j;
    if (k > FLEXMOE_GATE_MAX_TOP_K || cols > FM__EXACT_FLOAT_INTEGERS) {
        fm__scalar_topk(rows, cols, k, x, ldx, indices, ldi, values, ldv);
        return;
    }
    for (r = 0; r < rows; r += FM__W) {
        const int nrows = rows - r < FM__W ? rows - r : FM__W;
        const float *block = x + (size_t)r * ldx;
        FM__OP(topk_reset)(top, slot, k);
        for (c0 = 0; c0 < cols; c0 += FM__W) {
            FM__OP(load_columns)(block, ldx, nrows, c0, cols, -INFINITY, column);
            FM__UNROLL_W
            for (j = 0; j < FM__W; j++) column[j] = FM__OP(rank_key)(column[j]);
            chunk(top, slot, k, column, c0);
        }
        FM__OP(topk_write)(nrows, cols, k, block, ldx, slot, indices + (size_t)r * ldi, ldi,
                           values ? values + (size_t)r * ldv : NULL, ldv);
    }
}

/* ---- routing gates ---- */

/* log2(x) for positive normal x: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log2(m) = u Q(u) with
 * u = m - 1 and Q a degree-8 least-squares fit of log2(1 + u) / u (5e-8 relative), so the
 * result is e + u Q(u), one fma. */
static inline FM__TARGET FM__V FM__OP(log2)(FM__V x) {
    FM__V m, e = FM__OP(split_exponent)(x, &m), u, q;
    u = FM__OP(sub)(m, FM__OP(set1)(1.0f));
    q = FM__OP(set1)(0.122805297f);
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(-0.205705613f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(0.216119125f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(-0.2391949f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(0.287901759f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(-0.360692114f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(0.480910778f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(-0.721347511f));
    q = FM__OP(fmadd)(q, u, FM__OP(set1)(1.44269502f));
    return FM__OP(fmadd)(q, u, e);
}

/* softplus(r) + epsilon = max(r, 0) + log1p(y) + epsilon with y = exp(-|r|) in (0, 1]: never
 * overflows. log1p(y) = 2 atanh(s), s = y / (2 + y) <= 1/3, = s P(s^2) with P a degree-4
 * least-squares fit of 2 atanh(s) / s (8e-9 relative): cheaper than a general log. NaN in r
 * gives NaN. */
static inline FM__TARGET FM__V FM__OP(noise_std)(FM__V r, FM__V epsilon) {
    const FM__V y = FM__OP(exp)(FM__OP(with_sign_of)(r, FM__OP(set1)(-0.0f)));
    const FM__V s = FM__OP(mul)(y, FM__OP(recip)(FM__OP(add)(y, FM__OP(set1)(2.0f)))), s2 = FM__OP(mul)(s, s);
    FM__V p = FM__OP(set1)(0.281614542f);
    p = FM__OP(fmadd)(p, s2, FM__OP(set1)(0.279643446f));
    p = FM__OP(fmadd)(p, s2, FM__OP(set1)(0.400246501f));
    p = FM__OP(fmadd)(p, s2, FM__OP(set1)(0.666663229f));
    p = FM__OP(fmadd)(p, s2, FM__OP(set1)(2.0f));
    return FM__OP(add)(FM__OP(fmadd)(p, s, FM__OP(max)(r, FM__OP(set1)(0.0f))), epsilon);
}

/* N(0, 1) as sqrt(2) erfinv(x) for the draw x = (-1)^(h >> 31) (1 - y), y = hash_distance(h),
 * with Giles' single-precision erfinv ("Approximating the erfinv function", GPU Computing Gems,
 * 2011), sqrt(2) folded into its coefficients; its tail branch runs only for vectors that need it.
 * 1 - x^2 = y (2 - y) with one rounding, so the tails stay accurate. */
static inline FM__TARGET FM__V FM__OP(normal_from_hash)(FM__V h) {
    const FM__V y = FM__OP(hash_distance)(h);
    const FM__V x = FM__OP(with_sign_of)(FM__OP(sub)(FM__OP(set1)(1.0f), y), h);
    /* c = w - 2.5 with w = -log(1 - x^2) */
    const FM__V c = FM__OP(fmadd)(FM__OP(log2)(FM__OP(fnmadd)(y, y, FM__OP(add)(y, y))), FM__OP(set1)(-0.693147181f),
                                  FM__OP(set1)(-2.5f));
    const FM__MASK tail = FM__OP(greater)(c, FM__OP(set1)(2.5f));
    FM__V p = FM__OP(set1)(3.97426021e-08f);
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(4.85462635e-07f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(-4.9828227e-06f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(-6.21052823e-06f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(0.00030912002f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(-0.00177303492f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(-0.00590813393f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(0.348802656f));
    p = FM__OP(fmadd)(p, c, FM__OP(set1)(2.12331367f));
    if (FM__OP(any)(tail)) { /* |x| > 0.9966 in some lane: 1 in 300 draws */
        const FM__V t = FM__OP(sub)(FM__OP(sqrt)(FM__OP(add)(c, FM__OP(set1)(2.5f))), FM__OP(set1)(3.0f));
        FM__V q = FM__OP(set1)(-0.000283145724f);
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(0.000142765653f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(0.00190825947f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(-0.00519501232f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(0.00811688974f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(-0.0107797878f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(0.0133485785f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(1.41658103f));
        q = FM__OP(fmadd)(q, t, FM__OP(set1)(4.00643444f));
        p = FM__OP(select)(tail, q, p);
    }
    return FM__OP(mul)(p, x);
}

/* The standard normal CDF, 0.5 erfc(-z / sqrt 2), with the Chebyshev-fitted erfc of Numerical
 * Recipes (relative error below 1.2e-7 everywhere, so the far tails stay accurate too):
 * 0.5 erfc(a) = t exp(-a^2 + P(t) - ln 2), t = 1 / (1 + a / 2), a = |z| / sqrt 2. */
static inline FM__TARGET FM__V FM__OP(normal_cdf)(FM__V z) {
    /* |z| capped where erfc is 0 in float anyway, so that t stays finite for |z| = Inf (the cap
     * takes the value as its second operand: NaN passes through) */
    const FM__V abs_z = FM__OP(min)(FM__OP(set1)(42.0f), FM__OP(abs)(z));
    /* a^2 = z^2 / 2 as zz / 2 + its exact rounding error: exp's argument near -z^2 / 2 would
     * otherwise carry z^2 2^-25 of error into the tail (250 ulp at z = -12.9) */
    const FM__V zz = FM__OP(mul)(abs_z, abs_z), zz_lo = FM__OP(fmadd)(abs_z, abs_z, FM__OP(mul)(zz, FM__OP(set1)(-1.0f)));
    const FM__V t = FM__OP(recip)(FM__OP(fmadd)(abs_z, FM__OP(set1)(0.353553391f), FM__OP(set1)(1.0f)));
    FM__V p = FM__OP(set1)(0.17087277f), half_erfc;
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(-0.82215223f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(1.48851587f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(-1.13520398f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(0.27886807f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(-0.18628806f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(0.09678418f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(0.37409196f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(1.00002368f));
    p = FM__OP(fmadd)(p, t, FM__OP(set1)(-1.95865941f)); /* -1.26551223 - ln 2 */
    half_erfc = FM__OP(mul)(t, FM__OP(exp_lo)(FM__OP(mul)(zz, FM__OP(set1)(-0.5f)),
                                              FM__OP(fnmadd)(zz_lo, FM__OP(set1)(0.5f), p)));
    return FM__OP(select)(FM__OP(greater)(z, FM__OP(set1)(0.0f)), FM__OP(sub)(FM__OP(set1)(1.0f), half_erfc), half_erfc);
}

/* Writes W column vectors (column[j] lane r = element (r, c0 + j)) back as rows. */
static inline FM__TARGET void FM__OP(store_columns)(float *y, int ldy, int nrows, int c0, int cols, FM__V *column) {
    const int n = cols - c0 < FM__W ? cols - c0 : FM__W;
    int r;
    FM__OP(transpose)(column);
    for (r = 0; r < nrows; r++) {
        float *p = y + (size_t)r * ldy + c0;
        if (n == FM__W) FM__OP(store)(p, column[r]);
        else FM__OP(store_part)(p, column[r], n);
    }
}

/* The noise counters' per-token states of a block of tokens, one per lane (lanes past nrows
 * repeat the first token); the bit patterns ride in a float vector. */
static inline FM__TARGET FM__V FM__OP(token_states)(const fm__gate_job *job, int row0, int nrows) {
    uint32_t states[FM__W];
    float lanes[FM__W];
    int r;
    for (r = 0; r < FM__W; r++)
        states[r] = fm__noise_token_state(job->seed, job->token_offset + (uint64_t)(row0 + (r < nrows ? r : 0)));
    memcpy(lanes, states, sizeof states);
    return FM__OP(load)(lanes);
}

/* The noise step of W expert columns starting at c0: noise[j] (the noise logits) becomes
 * std = softplus + epsilon, and noisy[j] = clean[j] + n * std. A loop, not unrolled: the
 * temporaries of one draw alone fill the registers. */
static inline FM__TARGET void FM__OP(noise_chunk)(FM__V state, FM__V epsilon, int c0, const FM__V *clean, FM__V *noise,
                                                  FM__V *noisy) {
    int j;
    for (j = 0; j < FM__W; j++) {
        noise[j] = FM__OP(noise_std)(noise[j], epsilon);
        noisy[j] = FM__OP(fmadd)(FM__OP(normal_from_hash)(FM__OP(noise_hash)(state, fm__noise_expert_key(c0 + j))), noise[j],
                                 clean[j]);
    }
}

/* Where the load pass finds each expert's noisy logit, std and clean logit for a block of
 * tokens (one per lane): experts below tile_experts in the fused gate's tile (tile[e][0], [1] and
 * [2], lane r: nothing to transpose again); the others drawn again from the clean and noise
 * logits (noise not NULL: the same noise_chunk, so the same floats), or read from the noisy and
 * std matrices of the noise kernel (the load kernel on its own). */
typedef struct FM__OP(load_source) {
    const float (*tile)[3][FM__W];
    int tile_experts;
    const float *clean, *noise, *noisy, *std;
    int ld_clean, ld_noise, ld_noisy, ld_std;
    FM__V state, epsilon;
} FM__OP(load_source);

/* Adds FastMoE's load probabilities of one block of up to W tokens (one per lane) to
 * load[g][e]: Phi((clean - threshold) / std), the threshold being the (k+1)-th noisy logit when
 * noisy > that value (the expert is in the top k) and the k-th otherwise. Sums over the lanes of
 * each group are folded by one transposing reduction per W experts. */
static FM__TARGET void FM__OP(load_block)(int nrows, int E, int group_count, const int32_t *groups,
                                          const FM__OP(load_source) *src, FM__V in_threshold, FM__V out_threshold,
                                          float *load) {
    FM__MASK group_mask[FLEXMOE_GATE_MAX_GROUPS];
    FM__V cl[FM__W], nz[FM__W], sd[FM__W], p[FM__W];
    FM__V *const masked = cl; /* free once p is made */
    float mask_lanes[FM__W], sums[FM__W];
    int g, r, c0, j;
    for (g = 0; g < group_count; g++) {
        for (r = 0; r < FM__W; r++) mask_lanes[r] = r < nrows && (groups ? groups[r] : 0) == g ? 1.0f : 0.0f;
        group_mask[g] = FM__OP(greater)(FM__OP(load)(mask_lanes), FM__OP(set1)(0.5f));
    }
    for (c0 = 0; c0 < E; c0 += FM__W) {
        const int n = E - c0 < FM__W ? E - c0 : FM__W, tiled = c0 < src->tile_experts;
        if (!tiled) {
            FM__OP(load_columns)(src->clean, src->ld_clean, nrows, c0, E, 0.0f, cl);
            if (src->noise) {
                FM__OP(load_columns)(src->noise, src->ld_noise, nrows, c0, E, 0.0f, sd);
                FM__OP(noise_chunk)(src->state, src->epsilon, c0, cl, sd, nz);
            } else {
                FM__OP(load_columns)(src->noisy, src->ld_noisy, nrows, c0, E, 0.0f, nz);
                FM__OP(load_columns)(src->std, src->ld_std, nrows, c0, E, 1.0f, sd);
            }
        }
        FM__UNROLL_W
        for (j = 0; j < FM__W; j++) {
            const int e = c0 + j < E ? c0 + j : c0;
            const FM__V v = tiled ? FM__OP(load)(src->tile[e][0]) : nz[j];
            const FM__V s = tiled ? FM__OP(load)(src->tile[e][1]) : sd[j];
            const FM__V c = tiled ? FM__OP(load)(src->tile[e][2]) : cl[j];
            const FM__V threshold = FM__OP(select)(FM__OP(greater)(v, in_threshold), in_threshold, out_threshold);
            p[j] = j < n ? FM__OP(normal_cdf)(FM__OP(mul)(FM__OP(sub)(c, threshold), FM__OP(recip)(s)))
                         : FM__OP(set1)(0.0f);
        }
        for (g = 0; g < group_count; g++) {
            FM__UNROLL_W
            for (j = 0; j < FM__W; j++) masked[j] = FM__OP(select)(group_mask[g], p[j], FM__OP(set1)(0.0f));
            FM__OP(store)(sums, FM__OP(transpose_reduce)(masked, 0));
            for (j = 0; j < n; j++) load[(size_t)g * E + c0 + j] += sums[j];
        }
    }
}

/* Experts whose noise the fused gate keeps in a tile on its stack (3 KiB at any vector width:
 * 16 experts on AVX-512, Flex-MoE's count): past them, and without a caller workspace, the load
 * pass draws the noise again. */
#define FM__GATE_STACK_TILE_EXPERTS (768 / (3 * FM__W))

/* The fused gate over one block of up to W tokens, one token per lane: a first pass over the
 * expert columns makes the noisy logits and runs them through the top-(k+1) network; the gates
 * come from the network's registers; a second pass makes the load probabilities (training with
 * k < E) from a tile of the first pass's noisy logits, std and clean logits, or the softmax
 * denominator over all experts from the clean logits read again.
 * Nothing of size tokens x experts is written unless the caller asked for the noisy logits. */
static inline __attribute__((always_inline)) FM__TARGET void FM__OP(gate_block)(const fm__gate_job *job, int row0,
                                                                                int nrows, int levels,
                                                                                FM__OP(topk_chunk_fn) chunk,
                                                                                float (*stack_tile)[3][FM__W]) {
    const int E = job->experts, k = job->top_k, with_load = job->training && job->load && k < E;
    const FM__V epsilon = FM__OP(set1)(job->noise_epsilon);
    const float *clean = job->clean + (size_t)row0 * job->ld_clean;
    const float *noise = job->training ? job->noise + (size_t)row0 * job->ld_noise : NULL;
    /* the outputs as locals: stores through them cannot change them, unlike job's fields */
    int32_t *const indices = job->indices + (size_t)row0 * job->ld_indices;
    float *const gates = job->gates + (size_t)row0 * job->ld_gates, *const importance = job->importance, *const load = job->load;
    float *const noisy_out = job->noisy ? job->noisy + (size_t)row0 * job->ld_noisy : NULL;
    const int32_t *const groups = job->token_group ? job->token_group + row0 : NULL;
    const int ld_indices = job->ld_indices, ld_gates = job->ld_gates;
    FM__V top[FLEXMOE_GATE_MAX_TOP_K + 1], slot[FLEXMOE_GATE_MAX_TOP_K + 1], cl[FM__W], nz[FM__W], v[FM__W];
    FM__V *const noisy_v = job->training ? v : cl, *const keys = nz; /* nz is free once the tile has it */
    FM__V state = FM__OP(set1)(0.0f);
    FM__V sum = FM__OP(set1)(0.0f);
    float(*const tile)[3][FM__W] = job->tile ? (float(*)[3][FM__W])job->tile : stack_tile;
    const int tile_experts = job->tile ? E : FM__GATE_STACK_TILE_EXPERTS;
    int i, j, c0, r;

    if (job->training) state = FM__OP(token_states)(job, row0, nrows);
    FM__OP(topk_reset)(top, slot, levels);
    for (c0 = 0; c0 < E; c0 += FM__W) {
        FM__OP(load_columns)(clean, job->ld_clean, nrows, c0, E, -INFINITY, cl);
        if (job->training) {
            FM__OP(load_columns)(noise, job->ld_noise, nrows, c0, E, 0.0f, nz);
            /* the noise of the whole chunk first, then the network over the chunk: interleaved,
             * the two spill each other's registers */
            FM__OP(noise_chunk)(state, epsilon, c0, cl, nz, v);
            for (j = 0; with_load && c0 < tile_experts && j < FM__W && c0 + j < E; j++) {
                FM__OP(store)(tile[c0 + j][0], v[j]);
                FM__OP(store)(tile[c0 + j][1], nz[j]);
                FM__OP(store)(tile[c0 + j][2], cl[j]);
            }
        }
        /* columns past the last expert are -Inf whatever the noise made of them (with a huge std,
         * -Inf + n * std is NaN, which would rank above every real expert) */
        FM__UNROLL_W
        for (j = 0; j < FM__W; j++) keys[j] = c0 + j < E ? FM__OP(rank_key)(noisy_v[j]) : FM__OP(set1)(-INFINITY);
        chunk(top, slot, levels, keys, c0);
        if (noisy_out) FM__OP(store_columns)(noisy_out, job->ld_noisy, nrows, c0, E, noisy_v);
    }

    if (!job->renormalize) { /* softmax over all experts, then top-k (Mixtral without renormalising) */
        for (c0 = 0; c0 < E; c0 += FM__W) {
            FM__OP(load_columns)(clean, job->ld_clean, nrows, c0, E, -INFINITY, cl);
            FM__UNROLL_W
            for (j = 0; j < FM__W; j++) sum = FM__OP(add)(sum, FM__OP(exp)(FM__OP(sub)(FM__OP(rank_key)(cl[j]), top[0])));
        }
    }
    { /* one level of every token at a time, through two vectors of buffer rather than k: the
       * exp is taken twice, for the sum and for the gate, instead of being kept in k vectors */
        FM__V total = FM__OP(set1)(0.0f);
        float columns[FM__W], weights[FM__W];
        for (i = 0; i < k; i++) total = FM__OP(add)(total, FM__OP(exp)(FM__OP(sub)(top[i], top[0])));
        total = FM__OP(recip)(job->renormalize ? total : sum);
        for (i = 0; i < k; i++) {
            FM__OP(store)(columns, slot[i]);
            FM__OP(store)(weights, FM__OP(mul)(FM__OP(exp)(FM__OP(sub)(top[i], top[0])), total));
            for (r = 0; r < nrows; r++) {
                indices[(size_t)r * ld_indices + i] = (int32_t)columns[r];
                gates[(size_t)r * ld_gates + i] = weights[r];
            }
        }
    }
    for (r = 0; r < nrows; r++) {
        int32_t *idx = indices + (size_t)r * ld_indices;
        const float *g = gates + (size_t)r * ld_gates;
        const size_t group_row = (size_t)(groups ? groups[r] : 0) * E;
        if (idx[k - 1] < 0) fm__topk_fill_missing(E, k, idx);
        if (importance)
            for (i = 0; i < k; i++) importance[group_row + idx[i]] += g[i];
        if (load && !with_load)
            for (i = 0; i < k; i++) load[group_row + idx[i]] += 1.0f;
    }

    if (with_load) {
        FM__OP(load_source) src;
        memset(&src, 0, sizeof src);
        src.tile = (const float(*)[3][FM__W])tile;
        src.tile_experts = tile_experts;
        src.clean = clean;
        src.ld_clean = job->ld_clean;
        src.noise = noise;
        src.ld_noise = job->ld_noise;
        src.state = state;
        src.epsilon = epsilon;
        FM__OP(load_block)(nrows, E, job->groups, groups, &src, top[k], top[k - 1], load);
    }
}

/* The load kernel on its own, from the noise step's noisy logits and std and the top k + 1
 * noisy values (leading dimension ld_values). */
static FM__TARGET void FM__OP(gate_load)(const fm__gate_job *job) {
    const int k = job->top_k, ld = job->ld_values;
    float in_lanes[FM__W], out_lanes[FM__W];
    FM__OP(load_source) src;
    int row0, r;
    memset(&src, 0, sizeof src);
    src.ld_clean = job->ld_clean;
    src.ld_noisy = job->ld_noisy;
    src.ld_std = job->ld_stds;
    for (row0 = 0; row0 < job->tokens; row0 += FM__W) {
        const int nrows = job->tokens - row0 < FM__W ? job->tokens - row0 : FM__W;
        const float *values = job->top_values + (size_t)row0 * ld;
        for (r = 0; r < FM__W; r++) {
            in_lanes[r] = fm__rank_key(values[(size_t)(r < nrows ? r : 0) * ld + k]);
            out_lanes[r] = fm__rank_key(values[(size_t)(r < nrows ? r : 0) * ld + k - 1]);
        }
        src.clean = job->clean + (size_t)row0 * job->ld_clean;
        src.noisy = job->noisy_in + (size_t)row0 * job->ld_noisy;
        src.std = job->stds_in + (size_t)row0 * job->ld_stds;
        FM__OP(load_block)(nrows, job->experts, job->groups, job->token_group ? job->token_group + row0 : NULL, &src,
                           FM__OP(load)(in_lanes), FM__OP(load)(out_lanes), job->load);
    }
}

/* The noise step alone, one token per lane like the fused gate, so both make the same floats. */
static FM__TARGET void FM__OP(gate_noise)(const fm__gate_job *job) {
    const FM__V epsilon = FM__OP(set1)(job->noise_epsilon);
    FM__V cl[FM__W], nz[FM__W], v[FM__W];
    int row0, c0;
    for (row0 = 0; row0 < job->tokens; row0 += FM__W) {
        const int nrows = job->tokens - row0 < FM__W ? job->tokens - row0 : FM__W;
        const FM__V state = FM__OP(token_states)(job, row0, nrows);
        for (c0 = 0; c0 < job->experts; c0 += FM__W) {
            FM__OP(load_columns)(job->clean + (size_t)row0 * job->ld_clean, job->ld_clean, nrows, c0, job->experts, 0.0f, cl);
            FM__OP(load_columns)(job->noise + (size_t)row0 * job->ld_noise, job->ld_noise, nrows, c0, job->experts, 0.0f, nz);
            FM__OP(noise_chunk)(state, epsilon, c0, cl, nz, v);
            FM__OP(store_columns)(job->noisy + (size_t)row0 * job->ld_noisy, job->ld_noisy, nrows, c0, job->experts, v);
            if (job->stds)
                FM__OP(store_columns)(job->stds + (size_t)row0 * job->ld_stds, job->ld_stds, nrows, c0, job->experts, nz);
        }
    }
}

/* The blocks of a gate with a caller workspace for the load pass's tile, and without one: the
 * stack tile (3 KiB) only lives in the frame that uses it, so a caller that passes a workspace
 * (the SMoE layer) keeps those 3 KiB of its stack bound. */
static FM__TARGET void FM__OP(gate_blocks_with_workspace)(const fm__gate_job *job, int levels, FM__OP(topk_chunk_fn) chunk) {
    int r;
    for (r = 0; r < job->tokens; r += FM__W)
        FM__OP(gate_block)(job, r, job->tokens - r < FM__W ? job->tokens - r : FM__W, levels, chunk, NULL);
}

static FM__TARGET void FM__OP(gate_blocks_with_stack_tile)(const fm__gate_job *job, int levels, FM__OP(topk_chunk_fn) chunk) {
    float stack_tile[FM__GATE_STACK_TILE_EXPERTS][3][FM__W];
    int r;
    for (r = 0; r < job->tokens; r += FM__W)
        FM__OP(gate_block)(job, r, job->tokens - r < FM__W ? job->tokens - r : FM__W, levels, chunk, stack_tile);
}

static FM__TARGET void FM__OP(gate)(const fm__gate_job *job) {
    const int levels = job->training && job->load && job->top_k < job->experts ? job->top_k + 1 : job->top_k;
    const FM__OP(topk_chunk_fn) chunk = FM__OP(topk_chunk_for)(levels);
    if (job->tile) FM__OP(gate_blocks_with_workspace)(job, levels, chunk);
    else FM__OP(gate_blocks_with_stack_tile)(job, levels, chunk);
}

/* ---- LayerNorm ---- */

/* The sum of all lanes. */
static inline FM__TARGET float FM__OP(hsum)(FM__V v) {
    float lanes[FM__W];
    FM__OP(store)(lanes, FM__OP(segment_reduce)(v, FM__W, 0));
    return lanes[0];
}

/* Per-lane partial sums of one row, blocked like dot_partial. */
static inline FM__TARGET FM__V FM__OP(sum_partial)(const float *x, int n) {
    const int full = n - n % FM__W;
    FM__V sum = FM__OP(set1)(0.0f);
    int j, block;
    for (block = 0; block < full; block += FM__SUM_BLOCK * FM__W) {
        const int end = block + FM__SUM_BLOCK * FM__W < full ? block + FM__SUM_BLOCK * FM__W : full;
        FM__V partial = FM__OP(set1)(0.0f);
        for (j = block; j < end; j += FM__W) partial = FM__OP(add)(partial, FM__OP(load)(x + j));
        sum = FM__OP(add)(sum, partial);
    }
    if (full < n) sum = FM__OP(add)(sum, FM__OP(load_part)(x + full, n - full, 0.0f));
    return sum;
}

/* Per-lane partial sums of (x - mean) and (x - mean)^2 over one row. The tail is filled with the
 * mean itself so that it contributes exact zeros. */
static inline FM__TARGET void FM__OP(deviation_partial)(const float *x, int n, float mean, FM__V *dev,
                                                        FM__V *sq) {
    const int full = n - n % FM__W;
    const FM__V m = FM__OP(set1)(mean);
    FM__V s1 = FM__OP(set1)(0.0f), s2 = FM__OP(set1)(0.0f), t;
    int j, block;
    for (block = 0; block < full; block += FM__SUM_BLOCK * FM__W) {
        const int end = block + FM__SUM_BLOCK * FM__W < full ? block + FM__SUM_BLOCK * FM__W : full;
        FM__V p1 = FM__OP(set1)(0.0f), p2 = FM__OP(set1)(0.0f);
        for (j = block; j < end; j += FM__W) {
            t = FM__OP(sub)(FM__OP(load)(x + j), m);
            p1 = FM__OP(add)(p1, t);
            p2 = FM__OP(fmadd)(t, t, p2);
        }
        s1 = FM__OP(add)(s1, p1);
        s2 = FM__OP(add)(s2, p2);
    }
    if (full < n) {
        t = FM__OP(sub)(FM__OP(load_part)(x + full, n - full, mean), m);
        s1 = FM__OP(add)(s1, t);
        s2 = FM__OP(fmadd)(t, t, s2);
    }
    *dev = s1;
    *sq = s2;
}

/* The corrected two-pass algorithm (Chan, Golub, LeVeque): the float mean of the first pass is
 * off by a few ulp of the row's magnitude, which for a row with a large common offset is a large
 * error relative to its spread; the second pass measures that error as the mean deviation and
 * removes it from both the mean and the variance. */
static FM__TARGET void FM__OP(layernorm_forward)(int rows, int cols, const float *x, int ldx,
                                                 const float *gamma, const float *beta, float eps,
                                                 float *y, int ldy, float *mean, float *rstd) {
    const int full = cols - cols % FM__W, tail = cols - full;
    const FM__V one = FM__OP(set1)(1.0f), zero = FM__OP(set1)(0.0f);
    int r, j;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        FM__V dev, sq, m, c, s;
        float m0 = FM__OP(hsum)(FM__OP(sum_partial)(xr, cols)) / (float)cols, d1, d2, mf, var, rs;
        FM__OP(deviation_partial)(xr, cols, m0, &dev, &sq);
        d1 = FM__OP(hsum)(dev) / (float)cols;
        d2 = FM__OP(hsum)(sq) / (float)cols;
        /* a sum that is +-Inf or NaN is the mean, as on the scalar path: the correction would be
         * Inf - Inf */
        mf = m0 - m0 == 0.0f ? m0 + d1 : m0;
        var = d2 - d1 * d1;
        var = var > 0.0f ? var : (var == var ? 0.0f : var); /* rounding may leave it a hair below 0 */
        rs = (float)(1.0 / sqrt((double)var + (double)eps));
        if (mean) mean[r] = mf;
        if (rstd) rstd[r] = rs;
        /* (x - m0) - d1 rather than x - (m0 + d1): the float sum m0 + d1 rounds at the scale of
         * the mean, which for a row with a large offset is far coarser than its spread */
        m = FM__OP(set1)(m0);
        c = FM__OP(set1)(d1);
        s = FM__OP(set1)(rs);
        for (j = 0; j < full; j += FM__W) {
            FM__V t = FM__OP(mul)(FM__OP(sub)(FM__OP(sub)(FM__OP(load)(xr + j), m), c), s);
            FM__V g = gamma ? FM__OP(load)(gamma + j) : one, b = beta ? FM__OP(load)(beta + j) : zero;
            FM__OP(store)(yr + j, FM__OP(fmadd)(t, g, b));
        }
        if (tail) {
            FM__V t = FM__OP(mul)(FM__OP(sub)(FM__OP(sub)(FM__OP(load_part)(xr + full, tail, 0.0f), m), c), s);
            FM__V g = gamma ? FM__OP(load_part)(gamma + full, tail, 1.0f) : one;
            FM__V b = beta ? FM__OP(load_part)(beta + full, tail, 0.0f) : zero;
            FM__OP(store_part)(yr + full, FM__OP(fmadd)(t, g, b), tail);
        }
    }
}

/* dx = rstd * (g - avg(g) - xhat * avg(g * xhat)), g = dy * gamma: one pass for the two sums,
 * one for dx. Every load of x and dy at column j precedes the store to dx at j, so dx may alias
 * x or dy. */
static FM__TARGET void FM__OP(layernorm_backward)(int rows, int cols, const float *x, int ldx,
                                                  const float *gamma, const float *mean,
                                                  const float *rstd, const float *dy, int lddy,
                                                  float *dx, int lddx) {
    const int full = cols - cols % FM__W, tail = cols - full;
    const FM__V one = FM__OP(set1)(1.0f);
    int r, j, block;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx, *dyr = dy + (size_t)r * lddy;
        float *dxr = dx + (size_t)r * lddx;
        const FM__V m = FM__OP(set1)(mean[r]), s = FM__OP(set1)(rstd[r]);
        FM__V sg = FM__OP(set1)(0.0f), sgx = FM__OP(set1)(0.0f), xhat, g, a, q;
        for (block = 0; block < full; block += FM__SUM_BLOCK * FM__W) {
            const int end = block + FM__SUM_BLOCK * FM__W < full ? block + FM__SUM_BLOCK * FM__W : full;
            FM__V pg = FM__OP(set1)(0.0f), pgx = FM__OP(set1)(0.0f);
            for (j = block; j < end; j += FM__W) {
                xhat = FM__OP(mul)(FM__OP(sub)(FM__OP(load)(xr + j), m), s);
                g = FM__OP(mul)(FM__OP(load)(dyr + j), gamma ? FM__OP(load)(gamma + j) : one);
                pg = FM__OP(add)(pg, g);
                pgx = FM__OP(fmadd)(g, xhat, pgx);
            }
            sg = FM__OP(add)(sg, pg);
            sgx = FM__OP(add)(sgx, pgx);
        }
        if (tail) { /* x filled with the mean and dy with 0: the tail lanes add exact zeros */
            xhat = FM__OP(mul)(FM__OP(sub)(FM__OP(load_part)(xr + full, tail, mean[r]), m), s);
            g = FM__OP(mul)(FM__OP(load_part)(dyr + full, tail, 0.0f),
                            gamma ? FM__OP(load_part)(gamma + full, tail, 1.0f) : one);
            sg = FM__OP(add)(sg, g);
            sgx = FM__OP(fmadd)(g, xhat, sgx);
        }
        a = FM__OP(set1)(FM__OP(hsum)(sg) / (float)cols);
        q = FM__OP(set1)(FM__OP(hsum)(sgx) / (float)cols);
        for (j = 0; j < full; j += FM__W) {
            xhat = FM__OP(mul)(FM__OP(sub)(FM__OP(load)(xr + j), m), s);
            g = FM__OP(mul)(FM__OP(load)(dyr + j), gamma ? FM__OP(load)(gamma + j) : one);
            FM__OP(store)(dxr + j, FM__OP(mul)(s, FM__OP(fnmadd)(xhat, q, FM__OP(sub)(g, a))));
        }
        if (tail) {
            xhat = FM__OP(mul)(FM__OP(sub)(FM__OP(load_part)(xr + full, tail, 0.0f), m), s);
            g = FM__OP(mul)(FM__OP(load_part)(dyr + full, tail, 0.0f),
                            gamma ? FM__OP(load_part)(gamma + full, tail, 1.0f) : one);
            FM__OP(store_part)(dxr + full, FM__OP(mul)(s, FM__OP(fnmadd)(xhat, q, FM__OP(sub)(g, a))), tail);
        }
    }
}

/* dgamma, dbeta over one range of columns, summed over all rows in row order: one vector of
 * columns at a time, the row sums blocked like the others. Either output may be NULL. */
static FM__TARGET void FM__OP(layernorm_param_grad)(int rows, int cols, const float *x, int ldx,
                                                    const float *mean, const float *rstd,
                                                    const float *dy, int lddy, float *dgamma,
                                                    float *dbeta) {
    int r, j, block;
    for (j = 0; j < cols; j += FM__W) {
        const int n = cols - j < FM__W ? cols - j : FM__W;
        FM__V sg = FM__OP(set1)(0.0f), sb = FM__OP(set1)(0.0f);
        for (block = 0; block < rows; block += FM__SUM_BLOCK) {
            const int end = block + FM__SUM_BLOCK < rows ? block + FM__SUM_BLOCK : rows;
            FM__V pg = FM__OP(set1)(0.0f), pb = FM__OP(set1)(0.0f);
            for (r = block; r < end; r++) {
                const float *xr = x + (size_t)r * ldx + j, *dyr = dy + (size_t)r * lddy + j;
                FM__V xv = n == FM__W ? FM__OP(load)(xr) : FM__OP(load_part)(xr, n, 0.0f);
                FM__V dv = n == FM__W ? FM__OP(load)(dyr) : FM__OP(load_part)(dyr, n, 0.0f);
                FM__V xhat = FM__OP(mul)(FM__OP(sub)(xv, FM__OP(set1)(mean[r])), FM__OP(set1)(rstd[r]));
                pg = FM__OP(fmadd)(dv, xhat, pg);
                pb = FM__OP(add)(pb, dv);
            }
            sg = FM__OP(add)(sg, pg);
            sb = FM__OP(add)(sb, pb);
        }
        if (n == FM__W) {
            if (dgamma) FM__OP(store)(dgamma + j, sg);
            if (dbeta) FM__OP(store)(dbeta + j, sb);
        } else {
            if (dgamma) FM__OP(store_part)(dgamma + j, sg, n);
            if (dbeta) FM__OP(store_part)(dbeta + j, sb, n);
        }
    }
}

/* ---- GELU ---- */

/* GELU (kind 0: x Phi(x), the exact erf form; kind 1: the tanh approximation, written as
 * x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), which needs one exp and no tanh) and, when
 * `derivative` is set, its derivative instead: Phi(x) + x phi(x), or s + 2 x s (1 - s) du/dx. */
static inline FM__TARGET FM__V FM__OP(gelu)(FM__V x, int kind, int derivative) {
    if (kind == 0) {
        const FM__V cdf = FM__OP(normal_cdf)(x);
        if (!derivative) return FM__OP(mul)(x, cdf);
        {
            const FM__V pdf = FM__OP(mul)(FM__OP(set1)(0.39894228040143268f),
                                          FM__OP(exp)(FM__OP(mul)(FM__OP(mul)(x, x), FM__OP(set1)(-0.5f))));
            return FM__OP(fmadd)(x, pdf, cdf);
        }
    } else {
        /* past |x| = 20 the sigmoid is exactly 0 or 1 in float and its slope exactly 0; clamped,
         * x^2 and x^3 cannot overflow into Inf * 0 (the clamp passes NaN through) */
        const FM__V xc = FM__OP(min)(FM__OP(set1)(20.0f), FM__OP(max)(FM__OP(set1)(-20.0f), x));
        const FM__V x2 = FM__OP(mul)(xc, xc);
        const FM__V u = FM__OP(mul)(FM__OP(mul)(xc, FM__OP(set1)(0.7978845608028654f)),
                                    FM__OP(fmadd)(x2, FM__OP(set1)(0.044715f), FM__OP(set1)(1.0f)));
        /* a true division: exp overflows to +Inf for x below about -10, and 1 / Inf must be 0 */
        const FM__V sig = FM__OP(div)(FM__OP(set1)(1.0f),
                                      FM__OP(add)(FM__OP(set1)(1.0f), FM__OP(exp)(FM__OP(mul)(u, FM__OP(set1)(-2.0f)))));
        if (!derivative) return FM__OP(mul)(x, sig);
        {
            const FM__V du = FM__OP(mul)(FM__OP(set1)(0.7978845608028654f),
                                         FM__OP(fmadd)(x2, FM__OP(set1)(3.0f * 0.044715f), FM__OP(set1)(1.0f)));
            const FM__V slope = FM__OP(mul)(FM__OP(mul)(sig, FM__OP(sub)(FM__OP(set1)(1.0f), sig)), FM__OP(mul)(du, FM__OP(set1)(2.0f)));
            return FM__OP(fmadd)(x, slope, sig);
        }
    }
}

/* y = GELU(x), or with dy: y = dy * GELU'(x); y may alias x or dy. */
static FM__TARGET void FM__OP(gelu_row)(int n, int kind, const float *x, const float *dy, float *y) {
    const int full = n - n % FM__W, tail = n - full;
    int j;
    for (j = 0; j < full; j += FM__W) {
        const FM__V g = FM__OP(gelu)(FM__OP(load)(x + j), kind, dy != NULL);
        FM__OP(store)(y + j, dy ? FM__OP(mul)(g, FM__OP(load)(dy + j)) : g);
    }
    if (tail) {
        const FM__V g = FM__OP(gelu)(FM__OP(load_part)(x + full, tail, 0.0f), kind, dy != NULL);
        FM__OP(store_part)(y + full, dy ? FM__OP(mul)(g, FM__OP(load_part)(dy + full, tail, 0.0f)) : g, tail);
    }
}

/* ---- small dense helpers for the ConfSMoE glue ---- */

/* out[r] = a[r] . v for each row of a: W rows at a time, folded by one transposing reduction. */
static FM__TARGET void FM__OP(gemv)(int rows, int cols, const float *a, int lda, const float *v, float *out) {
    FM__V partial[FM__W];
    float per_row[FM__W];
    int r, i;
    for (r = 0; r < rows; r += FM__W) {
        const int nrows = rows - r < FM__W ? rows - r : FM__W;
        if (nrows == 1) { /* the common single-row call skips the W-row fold */
            out[r] = FM__OP(hsum)(FM__OP(dot_partial)(a + (size_t)r * lda, v, cols));
            continue;
        }
        for (i = 0; i < FM__W; i++)
            partial[i] = i < nrows ? FM__OP(dot_partial)(a + (size_t)(r + i) * lda, v, cols) : FM__OP(set1)(0.0f);
        FM__OP(store)(per_row, FM__OP(transpose_reduce)(partial, 0));
        for (i = 0; i < nrows; i++) out[r + i] = per_row[i];
    }
}

/* y += alpha * x */
static FM__TARGET void FM__OP(axpy)(int n, float alpha, const float *x, float *y) {
    const int full = n - n % FM__W;
    const FM__V a = FM__OP(set1)(alpha);
    int j;
    for (j = 0; j < full; j += FM__W) FM__OP(store)(y + j, FM__OP(fmadd)(a, FM__OP(load)(x + j), FM__OP(load)(y + j)));
    if (full < n)
        FM__OP(store_part)(y + full, FM__OP(fmadd)(a, FM__OP(load_part)(x + full, n - full, 0.0f),
                                                    FM__OP(load_part)(y + full, n - full, 0.0f)), n - full);
}

/* ---- the optimiser ---- */

static FM__TARGET int FM__OP(all_finite)(size_t n, const float *x) {
    const FM__V zero = FM__OP(set1)(0.0f);
    FM__V sum = zero; /* x * 0 is 0 for finite x and NaN otherwise, and a NaN stays */
    float lanes[FM__W];
    size_t j;
    int i, finite = 1;
    for (j = 0; j + FM__W <= n; j += FM__W) sum = FM__OP(add)(sum, FM__OP(mul)(FM__OP(load)(x + j), zero));
    if (j < n) sum = FM__OP(add)(sum, FM__OP(mul)(FM__OP(load_part)(x + j, (int)(n - j), 0.0f), zero));
    FM__OP(store)(lanes, sum);
    for (i = 0; i < FM__W; i++) finite &= lanes[i] == 0.0f;
    return finite;
}

/* The scalar path's operations in its order, no fused multiply-add: the same bits on every path. */
static FM__TARGET void FM__OP(adam)(size_t n, const float *hyper, float *param, const float *grad, float *m, float *v) {
    const FM__V beta1 = FM__OP(set1)(hyper[0]), keep1 = FM__OP(set1)(1.0f - hyper[0]), beta2 = FM__OP(set1)(hyper[1]),
                keep2 = FM__OP(set1)(1.0f - hyper[1]), step_size = FM__OP(set1)(hyper[2]), root2 = FM__OP(set1)(hyper[3]),
                eps = FM__OP(set1)(hyper[4]), decay = FM__OP(set1)(hyper[5]);
    size_t j;
    for (j = 0; j < n; j += FM__W) {
        const int count = n - j < FM__W ? (int)(n - j) : FM__W;
        const FM__V p = count == FM__W ? FM__OP(load)(param + j) : FM__OP(load_part)(param + j, count, 0.0f);
        const FM__V d = count == FM__W ? FM__OP(load)(grad + j) : FM__OP(load_part)(grad + j, count, 0.0f);
        const FM__V m0 = count == FM__W ? FM__OP(load)(m + j) : FM__OP(load_part)(m + j, count, 0.0f);
        const FM__V v0 = count == FM__W ? FM__OP(load)(v + j) : FM__OP(load_part)(v + j, count, 0.0f);
        const FM__V g = FM__OP(add)(d, FM__OP(mul)(decay, p));
        const FM__V m1 = FM__OP(add)(FM__OP(mul)(beta1, m0), FM__OP(mul)(keep1, g));
        const FM__V v1 = FM__OP(add)(FM__OP(mul)(beta2, v0), FM__OP(mul)(FM__OP(mul)(keep2, g), g));
        const FM__V update = FM__OP(div)(FM__OP(mul)(step_size, m1),
                                         FM__OP(add)(FM__OP(div)(FM__OP(sqrt)(v1), root2), eps));
        const FM__V p1 = FM__OP(sub)(p, update);
        if (count == FM__W) {
            FM__OP(store)(m + j, m1), FM__OP(store)(v + j, v1), FM__OP(store)(param + j, p1);
        } else {
            FM__OP(store_part)(m + j, m1, count), FM__OP(store_part)(v + j, v1, count), FM__OP(store_part)(param + j, p1, count);
        }
    }
}

/* ---- dispatch and combine: rows moved and summed a vector at a time ---- */

/* Streaming stores need an address aligned to the vector: the rows of a matrix whose leading
 * dimension breaks that alignment take ordinary stores. */
static inline FM__TARGET int FM__OP(streams)(int stream, const float *row) {
    return stream && (uintptr_t)row % sizeof(FM__V) == 0;
}

static inline FM__TARGET void FM__OP(put)(float *p, FM__V v, int streamed) {
    if (streamed)
        FM__OP(stream)(p, v);
    else
        FM__OP(store)(p, v);
}

/* Token by token: each source row is read once, in order, and written to its k destination rows
 * from L1, so a top-k dispatch reads x once and sequentially instead of k times in expert order. */
static FM__TARGET void FM__OP(scatter_rows)(int tokens, int k, int dim, const float *src, int ld_src,
                                            const int32_t *position, const float *scale, int ld_scale, float *dst,
                                            int ld_dst, int stream) {
    const int full = dim - dim % FM__W, tail = dim - full;
    int t, i, j;
    for (t = 0; t < tokens; t++) {
        const float *s = src + (size_t)t * ld_src;
        for (i = 0; i < k; i++) {
            const int32_t row = position[(size_t)t * k + i];
            float *d;
            int streamed;
            if (row < 0) continue;
            d = dst + (size_t)row * ld_dst;
            streamed = FM__OP(streams)(stream, d);
            if (scale) {
                const FM__V f = FM__OP(set1)(scale[(size_t)t * ld_scale + i]);
                for (j = 0; j < full; j += FM__W) FM__OP(put)(d + j, FM__OP(mul)(f, FM__OP(load)(s + j)), streamed);
                if (tail) FM__OP(store_part)(d + full, FM__OP(mul)(f, FM__OP(load_part)(s + full, tail, 0.0f)), tail);
            } else {
                for (j = 0; j < full; j += FM__W) FM__OP(put)(d + j, FM__OP(load)(s + j), streamed);
                if (tail) FM__OP(store_part)(d + full, FM__OP(load_part)(s + full, tail, 0.0f), tail);
            }
        }
    }
    if (stream) FM__OP(stream_fence)();
}

/* Combine's backward in dispatched-row order: dst[r] = scale[a] * src[a / k] and dots[a] =
 * <src[a / k], dot_src[r]> for a = order[r]. dot_src and dst stream through in order; only the
 * src rows are gathered, and each is read k times while it is still in cache. The dot is summed
 * as dot_partial does. */
static FM__TARGET void FM__OP(gather_scale_dot)(int rows, int dim, const float *src, int ld_src, const int32_t *order,
                                                int k, const float *scale, int ld_scale, const float *dot_src,
                                                int ld_dot, float *dst, int ld_dst, float *dots, int ld_dots,
                                                int stream) {
    const int full = dim - dim % FM__W, tail = dim - full;
    float lanes[FM__W];
    int r, j, block;
    for (r = 0; r < rows; r++) {
        const int32_t a = order[r];
        const float *s = src + (size_t)(a / k) * ld_src, *o = dot_src + (size_t)r * ld_dot;
        float *d = dst + (size_t)r * ld_dst;
        const int streamed = FM__OP(streams)(stream, d);
        const FM__V f = FM__OP(set1)(scale[(size_t)(a / k) * ld_scale + a % k]);
        FM__V dot = FM__OP(set1)(0.0f);
        for (block = 0; block < full; block += FM__SUM_BLOCK * FM__W) {
            const int end = block + FM__SUM_BLOCK * FM__W < full ? block + FM__SUM_BLOCK * FM__W : full;
            FM__V partial = FM__OP(set1)(0.0f);
            for (j = block; j < end; j += FM__W) {
                const FM__V v = FM__OP(load)(s + j);
                FM__OP(put)(d + j, FM__OP(mul)(f, v), streamed);
                partial = FM__OP(fmadd)(v, FM__OP(load)(o + j), partial);
            }
            dot = FM__OP(add)(dot, partial);
        }
        if (tail) {
            const FM__V v = FM__OP(load_part)(s + full, tail, 0.0f);
            FM__OP(store_part)(d + full, FM__OP(mul)(f, v), tail);
            dot = FM__OP(fmadd)(v, FM__OP(load_part)(o + full, tail, 0.0f), dot);
        }
        FM__OP(store)(lanes, FM__OP(segment_reduce)(dot, FM__W, 0));
        dots[(size_t)(a / k) * ld_dots + a % k] = lanes[0];
    }
    if (stream) FM__OP(stream_fence)();
}

/* Vectors of an output row that combine sums in registers at a time. */
#define FM__COMBINE_VECTORS 8
/* Cache lines at the start of each of the next token's rows requested one token early. */
#define FM__COMBINE_PREFETCH_LINES 4

/* acc[0, vectors) = the token's kept rows at column j (the first `lanes` only when lanes > 0,
 * vectors then 1), weighted: the first kept row scaled, the others added in slot order; zero
 * when all were dropped. */
static inline FM__TARGET void FM__OP(weighted_rows)(int k, const int32_t *rows, const float *weights, const float *src,
                                                    int ld_src, int j, int vectors, int lanes, FM__V *acc) {
    int i, v, first = 1;
    for (v = 0; v < vectors; v++) acc[v] = FM__OP(set1)(0.0f);
    for (i = 0; i < k; i++) {
        const float *s;
        FM__V w;
        if (rows[i] < 0) continue;
        s = src + (size_t)rows[i] * ld_src + j;
        w = FM__OP(set1)(weights ? weights[i] : 1.0f);
        if (first)
            for (v = 0; v < vectors; v++)
                acc[v] = FM__OP(mul)(w, lanes ? FM__OP(load_part)(s, lanes, 0.0f) : FM__OP(load)(s + v * FM__W));
        else
            for (v = 0; v < vectors; v++)
                acc[v] = FM__OP(fmadd)(w, lanes ? FM__OP(load_part)(s, lanes, 0.0f) : FM__OP(load)(s + v * FM__W), acc[v]);
        first = 0;
    }
}

/* Token by token, a block of the output row at a time summed in registers over the token's k
 * rows and stored once: summing into the output row in L1 (a store after each row) ran at half
 * this rate at k = 4 on Zen 4. A token's rows lie in k different expert segments, where the
 * hardware prefetcher has to find each one afresh, so the first lines of the next token's rows
 * are requested one token early. */
static FM__TARGET void FM__OP(combine_rows)(int tokens, int k, int dim, const float *src, int ld_src,
                                            const int32_t *position, const float *weights, int ldw, float *dst,
                                            int ld_dst, int stream) {
    const int full = dim - dim % FM__W, tail = dim - full;
    const int blocked = full - full % (FM__COMBINE_VECTORS * FM__W);
    FM__V acc[FM__COMBINE_VECTORS];
    int t, i, j, v;
    for (t = 0; t < tokens; t++) {
        const int32_t *rows = position + (size_t)t * k;
        const float *w = weights ? weights + (size_t)t * ldw : NULL;
        float *d = dst + (size_t)t * ld_dst;
        const int streamed = FM__OP(streams)(stream, d);
        for (i = 0; t + 1 < tokens && i < k; i++)
            for (j = 0; rows[k + i] >= 0 && j < FM__COMBINE_PREFETCH_LINES * 16 && j < dim; j += 16)
                __builtin_prefetch(src + (size_t)rows[k + i] * ld_src + j); /* 16 floats: one 64-byte line */
        for (j = 0; j < blocked; j += FM__COMBINE_VECTORS * FM__W) {
            FM__OP(weighted_rows)(k, rows, w, src, ld_src, j, FM__COMBINE_VECTORS, 0, acc);
            for (v = 0; v < FM__COMBINE_VECTORS; v++) FM__OP(put)(d + j + v * FM__W, acc[v], streamed);
        }
        for (; j < full; j += FM__W) {
            FM__OP(weighted_rows)(k, rows, w, src, ld_src, j, 1, 0, acc);
            FM__OP(put)(d + j, acc[0], streamed);
        }
        if (tail) {
            FM__OP(weighted_rows)(k, rows, w, src, ld_src, full, 1, tail, acc);
            FM__OP(store_part)(d + full, acc[0], tail);
        }
    }
    if (stream) FM__OP(stream_fence)();
}

static FM__TARGET void FM__OP(row_dots)(int tokens, int k, int dim, const float *a, int lda, const float *src, int ld_src,
                                        const int32_t *position, float *out, int ldo) {
    int t, i;
    float lanes[FM__W];
    for (t = 0; t < tokens; t++)
        for (i = 0; i < k; i++) {
            const int32_t row = position[(size_t)t * k + i];
            if (row < 0) {
                out[(size_t)t * ldo + i] = 0.0f;
                continue;
            }
            FM__OP(store)(lanes, FM__OP(segment_reduce)(FM__OP(dot_partial)(a + (size_t)t * lda, src + (size_t)row * ld_src, dim),
                                                        FM__W, 0));
            out[(size_t)t * ldo + i] = lanes[0];
        }
}

/* ---- grouped GEMM: register-blocked micro-kernels and the loops over one packed panel ---- */
/* A micro-tile is FM__GEMM_MR rows by FM__GEMM_NV vectors of columns, held in registers for the
 * whole depth: per depth step it loads FM__GEMM_NV vectors of the panel and broadcasts one A
 * value per row, so the loads per FMA are (NV + MR) / (NV * MR). Each ISA section sets
 * FM__GEMM_NV and FM__GEMM_DOT_ROWS (below) to fit its register file. */
#define FM__GEMM_MR 6
#define FM__GEMM_NR (FM__GEMM_NV * FM__W)

/* C[m x cols] (+)= bias + A[m x depth] . B[depth x NR], for m <= MR and cols <= NR: a(i, p) is
 * a[i * a_row + p * a_depth], B's rows are ldb floats apart (FM_GEMM_PANEL: a packed panel), bias
 * (cols floats, may be NULL) is added once, accumulate adds C's old values. The epilogue: with
 * act, GELU(C) of kind gelu_kind goes to act (ldact) as well, and when act is C only GELU(C) is
 * stored; the activation is computed while the tile is still in registers, instead of in a
 * pass of its own over the stored C. */
static inline __attribute__((always_inline)) FM__TARGET void FM__OP(gemm_tile)(const int m, int depth, const float *a, ptrdiff_t a_row,
                                                ptrdiff_t a_depth, const float *b, ptrdiff_t ldb, const float *bias,
                                                int accumulate, float *c, ptrdiff_t ldc, int cols,
                                                int gelu_kind, float *act, ptrdiff_t ldact) {
    FM__V acc[FM__GEMM_MR][FM__GEMM_NV];
    const float *row[FM__GEMM_MR];
    int i, v, p;
    FM__UNROLL_W
    for (i = 0; i < m; i++) {
        row[i] = a + i * a_row;
        FM__UNROLL_W
        for (v = 0; v < FM__GEMM_NV; v++) {
            const int n = cols - v * FM__W;
            acc[i][v] = !bias || n <= 0 ? FM__OP(set1)(0.0f)
                        : n >= FM__W    ? FM__OP(load)(bias + v * FM__W)
                                        : FM__OP(load_part)(bias + v * FM__W, n, 0.0f);
        }
    }
    for (p = 0; p < depth; p++) {
        FM__V panel_row[FM__GEMM_NV];
        FM__UNROLL_W
        for (v = 0; v < FM__GEMM_NV; v++) panel_row[v] = FM__OP(load)(b + p * ldb + v * FM__W);
        FM__UNROLL_W
        for (i = 0; i < m; i++) {
            const FM__V ai = FM__OP(set1)(row[i][p * a_depth]);
            FM__UNROLL_W
            for (v = 0; v < FM__GEMM_NV; v++) acc[i][v] = FM__OP(fmadd)(ai, panel_row[v], acc[i][v]);
        }
    }
    if (act) {
        FM__UNROLL_W
        for (i = 0; i < m; i++) {
            float *ci = c + i * ldc, *ai = act + i * ldact;
            FM__UNROLL_W
            for (v = 0; v < FM__GEMM_NV; v++) {
                const int n = cols - v * FM__W;
                FM__V out = acc[i][v];
                if (n <= 0) continue;
                if (accumulate)
                    out = FM__OP(add)(out, n >= FM__W ? FM__OP(load)(ci + v * FM__W) : FM__OP(load_part)(ci + v * FM__W, n, 0.0f));
                if (ai != ci) {
                    if (n >= FM__W) FM__OP(store)(ci + v * FM__W, out);
                    else FM__OP(store_part)(ci + v * FM__W, out, n);
                }
                out = FM__OP(gelu)(out, gelu_kind, 0);
                if (n >= FM__W) FM__OP(store)(ai + v * FM__W, out);
                else FM__OP(store_part)(ai + v * FM__W, out, n);
            }
        }
        return;
    }
    FM__UNROLL_W
    for (i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        FM__UNROLL_W
        for (v = 0; v < FM__GEMM_NV; v++) {
            const int n = cols - v * FM__W;
            if (n >= FM__W)
                FM__OP(store)(ci + v * FM__W, accumulate ? FM__OP(add)(acc[i][v], FM__OP(load)(ci + v * FM__W)) : acc[i][v]);
            else if (n > 0)
                FM__OP(store_part)(ci + v * FM__W,
                                   accumulate ? FM__OP(add)(acc[i][v], FM__OP(load_part)(ci + v * FM__W, n, 0.0f)) : acc[i][v], n);
        }
    }
}

/* The tile at each fixed row count, compiled once each so the accumulators stay in registers. */
#define FM__GEMM_TILE_AT(M)                                                                            \
    static FM__TARGET void FM__OP(FM__CAT(gemm_tile_, M))(int depth, const float *a, ptrdiff_t a_row,    \
                                                          ptrdiff_t a_depth, const float *b, ptrdiff_t ldb, \
                                                          const float *bias, int accumulate, float *c,  \
                                                          ptrdiff_t ldc, int cols, int gelu_kind,       \
                                                          float *act, ptrdiff_t ldact) {                \
        FM__OP(gemm_tile)(M, depth, a, a_row, a_depth, b, ldb, bias, accumulate, c, ldc, cols, gelu_kind, act, ldact); \
    }
FM__GEMM_TILE_AT(1)
FM__GEMM_TILE_AT(2)
FM__GEMM_TILE_AT(3)
FM__GEMM_TILE_AT(4)
FM__GEMM_TILE_AT(5)
FM__GEMM_TILE_AT(6)
#undef FM__GEMM_TILE_AT

/* C[rows x cols] (+)= bias + A[rows x depth] . P[depth x cols] for one packed panel P (cols <=
 * FM_GEMM_PANEL): micro-panels of NR columns outside, so each stays in L1 while every row block
 * of A streams past it. Row blocks are as few as MR allows and within one row of each other (8
 * rows run as 4 + 4, not 6 + 2, whose 2-row tile would load as many panel vectors as it does
 * FMAs). */
static FM__TARGET void FM__OP(gemm_panel_ex)(int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth,
                                             const float *panel, ptrdiff_t ldp, const float *bias, int accumulate, float *c,
                                             ptrdiff_t ldc, int cols, int gelu_kind, float *act, ptrdiff_t ldact) {
    typedef void (*tile_fn)(int, const float *, ptrdiff_t, ptrdiff_t, const float *, ptrdiff_t, const float *, int,
                            float *, ptrdiff_t, int, int, float *, ptrdiff_t);
    static const tile_fn tile_for_rows[FM__GEMM_MR + 1] = {NULL, FM__OP(gemm_tile_1), FM__OP(gemm_tile_2),
                                                           FM__OP(gemm_tile_3), FM__OP(gemm_tile_4),
                                                           FM__OP(gemm_tile_5), FM__OP(gemm_tile_6)};
    const int blocks = (rows + FM__GEMM_MR - 1) / FM__GEMM_MR;
    int col0, block, r;
    for (col0 = 0; col0 < cols; col0 += FM__GEMM_NR) {
        const int n = cols - col0 < FM__GEMM_NR ? cols - col0 : FM__GEMM_NR;
        const float *b = bias ? bias + col0 : NULL;
        for (block = 0, r = 0; block < blocks; block++) {
            const int m = (rows - r) / (blocks - block) + ((rows - r) % (blocks - block) != 0);
            tile_for_rows[m](depth, a + r * a_row, a_row, a_depth, panel + col0, ldp, b, accumulate, c + r * ldc + col0,
                             ldc, n, gelu_kind, act ? act + r * ldact + col0 : NULL, ldact);
            r += m;
        }
    }
}

static FM__TARGET void FM__OP(gemm_panel)(int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth,
                                          const float *panel, const float *bias, int accumulate, float *c,
                                          ptrdiff_t ldc, int cols) {
    FM__OP(gemm_panel_ex)(rows, depth, a, a_row, a_depth, panel, FM_GEMM_PANEL, bias, accumulate, c, ldc, cols, 0, NULL,
                          0);
}

/* dx = dy . W^T over the packed panels: dx[r][k] = <dy[r][0..out), row k of W>. A tile of
 * `tile_rows` rows of dy by W / tile_rows rows of W (k) keeps W per-lane partial dots in registers
 * over the whole of out, then one transposing reduction folds them into a vector of W results.
 * k past the edge repeats the last row of W and is not stored. */
static inline __attribute__((always_inline)) FM__TARGET void FM__OP(gemm_dot_tile)(
    const int tile_rows, int k_begin, int k_end, int in_features, int out_features, const float *dy, ptrdiff_t lddy,
    const float *packed, float *dx, ptrdiff_t lddx) {
    const int tile_cols = FM__W / tile_rows;
    const size_t panel_floats = (size_t)in_features * FM_GEMM_PANEL;
    const int full = out_features - out_features % FM__W, tail = out_features - full;
    FM__V acc[FM__W], wv_tail[FM__W];
    float sums[FM__W];
    const float *w_row[FM__W];
    int k, i, q, j;
    for (k = k_begin; k < k_end; k += tile_cols) {
        FM__UNROLL_W
        for (q = 0; q < tile_cols; q++) w_row[q] = packed + (size_t)(k + q < k_end ? k + q : k_end - 1) * FM_GEMM_PANEL;
        FM__UNROLL_W
        for (i = 0; i < FM__W; i++) acc[i] = FM__OP(set1)(0.0f);
        for (j = 0; j < full; j += FM__W) {
            const size_t w_offset = (size_t)(j / FM_GEMM_PANEL) * panel_floats + j % FM_GEMM_PANEL;
            FM__V wv[FM__W];
            FM__UNROLL_W
            for (q = 0; q < tile_cols; q++) wv[q] = FM__OP(load)(w_row[q] + w_offset);
            FM__UNROLL_W
            for (i = 0; i < tile_rows; i++) {
                const FM__V dyv = FM__OP(load)(dy + i * lddy + j);
                FM__UNROLL_W
                for (q = 0; q < tile_cols; q++) acc[i * tile_cols + q] = FM__OP(fmadd)(dyv, wv[q], acc[i * tile_cols + q]);
            }
        }
        if (tail) { /* partial loads of W too: whatever the panel's padding holds (NaN) never enters */
            const size_t w_offset = (size_t)(full / FM_GEMM_PANEL) * panel_floats + full % FM_GEMM_PANEL;
            FM__UNROLL_W
            for (q = 0; q < tile_cols; q++) wv_tail[q] = FM__OP(load_part)(w_row[q] + w_offset, tail, 0.0f);
            FM__UNROLL_W
            for (i = 0; i < tile_rows; i++) {
                const FM__V dyv = FM__OP(load_part)(dy + i * lddy + full, tail, 0.0f);
                FM__UNROLL_W
                for (q = 0; q < tile_cols; q++) acc[i * tile_cols + q] = FM__OP(fmadd)(dyv, wv_tail[q], acc[i * tile_cols + q]);
            }
        }
        FM__OP(store)(sums, FM__OP(transpose_reduce)(acc, 0));
        for (i = 0; i < tile_rows; i++)
            for (q = 0; q < tile_cols && k + q < k_end; q++) dx[i * lddx + k + q] = sums[i * tile_cols + q];
    }
}

#define FM__GEMM_DOT_AT(R)                                                                              \
    static FM__TARGET void FM__OP(FM__CAT(gemm_dot_, R))(int k_begin, int k_end, int in_features,         \
                                                         int out_features, const float *dy, ptrdiff_t lddy, \
                                                         const float *packed, float *dx, ptrdiff_t lddx) { \
        FM__OP(gemm_dot_tile)(R, k_begin, k_end, in_features, out_features, dy, lddy, packed, dx, lddx);  \
    }
FM__GEMM_DOT_AT(1)
FM__GEMM_DOT_AT(2)
#if FM__GEMM_DOT_ROWS == 4
FM__GEMM_DOT_AT(4)
#endif
#undef FM__GEMM_DOT_AT

/* dst[j][k] = W[k0 + k][j0 + j] for j < depth, k < FM_GEMM_PANEL (zero for k0 + k >= in_features):
 * a depth block of a panel of W^T, built from W's packed panels by W x W in-register transposes,
 * so that for many rows dx = dy . W^T runs on the forward's micro-kernel. j0 is a multiple of
 * FM_GEMM_PANEL; rows j past out_features come out zero, from the packed padding. */
static FM__TARGET void FM__OP(gemm_transpose_block)(const float *packed, int in_features, int k0, int j0, int depth,
                                                    float *dst) {
    FM__V tile[FM__W];
    int kt, jt, i;
    for (jt = 0; jt < depth; jt += FM__W) {
        const int j = j0 + jt;
        const float *column = packed + (size_t)(j / FM_GEMM_PANEL) * in_features * FM_GEMM_PANEL + j % FM_GEMM_PANEL;
        for (kt = 0; kt < FM_GEMM_PANEL; kt += FM__W) {
            FM__UNROLL_W
            for (i = 0; i < FM__W; i++)
                tile[i] = k0 + kt + i < in_features ? FM__OP(load)(column + (size_t)(k0 + kt + i) * FM_GEMM_PANEL)
                                                    : FM__OP(set1)(0.0f);
            FM__OP(transpose)(tile);
            for (i = 0; i < FM__W && jt + i < depth; i++) FM__OP(store)(dst + (size_t)(jt + i) * FM_GEMM_PANEL + kt, tile[i]);
        }
    }
}

/* Rows of W are taken a chunk at a time (they stay in L1 or L2 while every row block of dy
 * passes), rows of dy in tiles of FM__GEMM_DOT_ROWS, then 2, then 1. */
#define FM__GEMM_DOT_K_CHUNK 32
static FM__TARGET void FM__OP(gemm_dot)(int rows, int in_features, int out_features, const float *dy, ptrdiff_t lddy,
                                        const float *packed, float *dx, ptrdiff_t lddx) {
    int k0, r;
    for (k0 = 0; k0 < in_features; k0 += FM__GEMM_DOT_K_CHUNK) {
        const int k1 = in_features - k0 < FM__GEMM_DOT_K_CHUNK ? in_features : k0 + FM__GEMM_DOT_K_CHUNK;
        for (r = 0; r < rows;) {
            const float *dy_r = dy + r * lddy;
            float *dx_r = dx + r * lddx;
#if FM__GEMM_DOT_ROWS == 4
            if (rows - r >= 4) {
                FM__OP(gemm_dot_4)(k0, k1, in_features, out_features, dy_r, lddy, packed, dx_r, lddx);
                r += 4;
                continue;
            }
#endif
            if (rows - r >= 2) {
                FM__OP(gemm_dot_2)(k0, k1, in_features, out_features, dy_r, lddy, packed, dx_r, lddx);
                r += 2;
            } else {
                FM__OP(gemm_dot_1)(k0, k1, in_features, out_features, dy_r, lddy, packed, dx_r, lddx);
                r += 1;
            }
        }
    }
}
#undef FM__GEMM_DOT_K_CHUNK
#undef FM__GEMM_MR
#undef FM__GEMM_NR

/* ---- the kernel table ---- */
/* What the table holds: each kernel behind an entry that leaves through FM__OP(leave) (vzeroupper
 * on x86), so the caller's SSE and scalar code never runs with the upper vector state dirty,
 * whatever the compiler chose to inline (a dirty state costs every later SSE instruction a
 * transition penalty: the router loss after the gate ran 20-25x slower). */
#define FM__ENTRY(name, params, args)                                                             \
    static FM__TARGET void FM__OP(FM__CAT(name, _entry)) params {                                 \
        FM__OP(name) args;                                                                        \
        FM__OP(leave)();                                                                          \
    }
FM__ENTRY(softmax_forward, (int rows, int cols, const float *x, int ldx, float *y, int ldy),
          (rows, cols, x, ldx, y, ldy))
FM__ENTRY(softmax_backward, (int rows, int cols, const float *y, int ldy, const float *dy, int lddy, float *dx, int lddx),
          (rows, cols, y, ldy, dy, lddy, dx, lddx))
FM__ENTRY(topk, (int rows, int cols, int k, const float *x, int ldx, int32_t *indices, int ldi, float *values, int ldv),
          (rows, cols, k, x, ldx, indices, ldi, values, ldv))
FM__ENTRY(gate, (const fm__gate_job *job),
          (job))
FM__ENTRY(gate_noise, (const fm__gate_job *job),
          (job))
FM__ENTRY(gate_load, (const fm__gate_job *job),
          (job))
FM__ENTRY(layernorm_forward, (int rows, int cols, const float *x, int ldx, const float *gamma, const float *beta, float eps, float *y, int ldy, float *mean, float *rstd),
          (rows, cols, x, ldx, gamma, beta, eps, y, ldy, mean, rstd))
FM__ENTRY(layernorm_backward, (int rows, int cols, const float *x, int ldx, const float *gamma, const float *mean, const float *rstd, const float *dy, int lddy, float *dx, int lddx),
          (rows, cols, x, ldx, gamma, mean, rstd, dy, lddy, dx, lddx))
FM__ENTRY(layernorm_param_grad, (int rows, int cols, const float *x, int ldx, const float *mean, const float *rstd, const float *dy, int lddy, float *dgamma, float *dbeta),
          (rows, cols, x, ldx, mean, rstd, dy, lddy, dgamma, dbeta))
FM__ENTRY(gemv, (int rows, int cols, const float *a, int lda, const float *v, float *out),
          (rows, cols, a, lda, v, out))
FM__ENTRY(axpy, (int n, float alpha, const float *x, float *y),
          (n, alpha, x, y))
FM__ENTRY(scatter_rows, (int tokens, int k, int dim, const float *src, int ld_src, const int32_t *position, const float *scale, int ld_scale, float *dst, int ld_dst, int stream),
          (tokens, k, dim, src, ld_src, position, scale, ld_scale, dst, ld_dst, stream))
FM__ENTRY(combine_rows, (int tokens, int k, int dim, const float *src, int ld_src, const int32_t *position, const float *weights, int ldw, float *dst, int ld_dst, int stream),
          (tokens, k, dim, src, ld_src, position, weights, ldw, dst, ld_dst, stream))
FM__ENTRY(row_dots, (int tokens, int k, int dim, const float *a, int lda, const float *src, int ld_src, const int32_t *position, float *out, int ldo),
          (tokens, k, dim, a, lda, src, ld_src, position, out, ldo))
FM__ENTRY(gemm_panel, (int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth, const float *panel, const float *bias, int accumulate, float *c, ptrdiff_t ldc, int cols),
          (rows, depth, a, a_row, a_depth, panel, bias, accumulate, c, ldc, cols))
FM__ENTRY(gemm_panel_ex, (int rows, int depth, const float *a, ptrdiff_t a_row, ptrdiff_t a_depth, const float *panel, ptrdiff_t ldp, const float *bias, int accumulate, float *c, ptrdiff_t ldc, int cols, int gelu_kind, float *act, ptrdiff_t ldact),
          (rows, depth, a, a_row, a_depth, panel, ldp, bias, accumulate, c, ldc, cols, gelu_kind, act, ldact))
FM__ENTRY(gemm_dot, (int rows, int in_features, int out_features, const float *dy, ptrdiff_t lddy, const float *packed, float *dx, ptrdiff_t lddx),
          (rows, in_features, out_features, dy, lddy, packed, dx, lddx))
FM__ENTRY(gelu_row, (int n, int kind, const float *x, const float *dy, float *y),
          (n, kind, x, dy, y))
FM__ENTRY(gemm_transpose_block, (const float *packed, int in_features, int k0, int j0, int depth, float *dst),
          (packed, in_features, k0, j0, depth, dst))
FM__ENTRY(gather_scale_dot, (int rows, int dim, const float *src, int ld_src, const int32_t *order, int k, const float *scale, int ld_scale, const float *dot_src, int ld_dot, float *dst, int ld_dst, float *dots, int ld_dots, int stream),
          (rows, dim, src, ld_src, order, k, scale, ld_scale, dot_src, ld_dot, dst, ld_dst, dots, ld_dots, stream))
FM__ENTRY(adam, (size_t n, const float *hyper, float *param, const float *grad, float *m, float *v),
          (n, hyper, param, grad, m, v))
#undef FM__ENTRY
static FM__TARGET int FM__OP(all_finite_entry)(size_t n, const float *x) {
    const int finite = FM__OP(all_finite)(n, x);
    FM__OP(leave)();
    return finite;
}

static const fm__kernel_table FM__OP(kernels) = {
    FM__ISA_ID,
    FM__OP(softmax_forward_entry),
    FM__OP(softmax_backward_entry),
    FM__OP(topk_entry),
    FM__OP(gate_entry),
    FM__OP(gate_noise_entry),
    FM__OP(gate_load_entry),
    FM__OP(layernorm_forward_entry),
    FM__OP(layernorm_backward_entry),
    FM__OP(layernorm_param_grad_entry),
    FM__OP(gemv_entry),
    FM__OP(axpy_entry),
    FM__OP(scatter_rows_entry),
    FM__OP(combine_rows_entry),
    FM__OP(row_dots_entry),
    FM__OP(gemm_panel_entry),
    FM__OP(gemm_panel_ex_entry),
    FM__OP(gemm_dot_entry),
    FM__OP(gelu_row_entry),
    FM__OP(gemm_transpose_block_entry),
    FM__OP(gather_scale_dot_entry),
    FM__OP(all_finite_entry),
    FM__OP(adam_entry),
};

#undef FM__COMBINE_VECTORS
#undef FM__COMBINE_PREFETCH_LINES
#undef FM__UNROLL_W
#undef FM__BLOCK_MAX_COLS
#undef FM__SUM_BLOCK
#undef FM__EXACT_FLOAT_INTEGERS
#undef FM__GATE_STACK_TILE_EXPERTS
#undef FM__ISA
#undef FM__ISA_ID
#undef FM__TARGET
#undef FM__V
#undef FM__W
#undef FM__MASK
#undef FM__GEMM_NV
#undef FM__GEMM_DOT_ROWS
#undef FM__SIMD_TEMPLATE
#endif /* FM__SIMD_TEMPLATE */
