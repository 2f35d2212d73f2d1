/* Helpers shared by the CPU platform's C kernels (included, not compiled alone). */
#ifndef BACKPLANE_CPU_KERNELS_COMMON_H
#define BACKPLANE_CPU_KERNELS_COMMON_H
#include <stdint.h>
#include <string.h>

/* a * b + c, fused where the CPU has an FMA. The kernels build with
 * -ffp-contract=off: the compiler must not fuse a multiply and an add in one
 * copy of an inlined tile and not in another, or a row's result would depend on
 * how many rows share its call (native.py). Loops that want FMAs say so here. */
#if defined(__FMA__) || defined(__aarch64__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    uint32_t quiet_nan = bits | 0x400000u;
    /* a select, not a branch, so that loops calling this vectorise */
    return (uint16_t)((((bits & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded) >> 16);
}

/* v rounded to bf16 and back: the value torch keeps after a bf16 op. */
static inline float round_to_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

/* exp(x) on [-87, 88.7] (clamped outside): Cephes' expf, branch-free so loops
 * vectorise (libm's expf is only vectorised under -ffast-math). */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.7f ? 88.7f : x);
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = MULADD(p, r, 1.3981999507e-3f);
    p = MULADD(p, r, 8.3334519073e-3f);
    p = MULADD(p, r, 4.1665795894e-2f);
    p = MULADD(p, r, 1.6666665459e-1f);
    p = MULADD(p, r, 5.0000001201e-1f);
    p = p * r * r + r + 1.0f;
    /* p * 2^n by adding n to p's exponent bits. n reaches 128 at x = 88, past float's
     * exponent range, so 2^n is not a float; a product of two halves, p * 2^(n/2) *
     * 2^(n/2), was regrouped by -fassociative-math (native.py) into p * inf. Within
     * the clamp the result is a normal float (n = 128 only with r < 0, so p < 1; n =
     * -126 only with r > 0, so p > 1), so this is exact: the bits of AVX-512's scalef. */
    uint32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (uint32_t)(int32_t)n << 23;
    memcpy(&p, &bits, sizeof p);
    return p;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* exp_clamped (common.h) on 16 lanes, operation for operation, so that both give the
 * same bits (scalef applies the same power of two exactly). */
static inline __m512 exp_clamped16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r),
                      _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* 16 bf16 values widened to float32 (exact). */
static inline __m512 bf16x16_to_ps(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* bf16(bf16(silu(g)) * u) on 16 lanes, g and u holding bf16 values: torch's bf16
 * SiLU-and-mul (cpu_ops.c's silu_and_mul_bf16, and the GEMM that ends in it,
 * gemm_bf16.c's gemm_bf16_silu). The division g / (1 + exp(-g)) is a reciprocal
 * (vrcp14ps, one Newton step) and one FMA correction of the quotient (the residual
 * g - q d is exact), which gives the rounded quotient in all but rare cases; the rest
 * is the scalar loop's arithmetic. On the AMX Xeon gcc's vectorised loop with the
 * division took 4.9 ms for 2048 x 4864 values and 124 us for 64 x 4864; this takes
 * 3.5 ms and 95 us, and gave torch's bits for every one of 10 million random values
 * and the clamping edges. */
static inline __m256i silu_mul_ps16(__m512 g, __m512 u) {
    const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f),
                                     exp_clamped16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 inv = _mm512_rcp14_ps(den);
    inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(2.0f)));
    const __m512 q0 = _mm512_mul_ps(g, inv);
    __m512 silu = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, den, g), inv, q0);
    /* the correction adds +0 to q0 = -0: zeros keep their sign as in the division */
    silu = _mm512_mask_mov_ps(silu, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_EQ_OQ), g);
    /* below -88.7, exp(-g) overflows in torch too, giving -0 */
    silu = _mm512_mask_mov_ps(silu, _mm512_cmp_ps_mask(g, _mm512_set1_ps(-88.7f), _CMP_LT_OQ),
                              _mm512_set1_ps(-0.0f));
    const __m512 rounded = bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(silu));
    return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(rounded, u));
}

#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* exp_clamped on 8 lanes, operation for operation. */
static inline __m256 exp_clamped8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.7f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                                   _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
                      _mm256_set1_ps(1.0f));
    /* times 2^n: n added to the exponent bits, as the scalar version does */
    const __m256i pow2 = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), pow2));
}
#endif

#endif
