/*
 * Output helpers shared by the CPU platform's AVX2 kernels
 * (gemm_avx2.c, gemm_int4_avx2.c). Included, not compiled alone.
 */
#ifndef BACKPLANE_AVX2_COMMON_H
#define BACKPLANE_AVX2_COMMON_H
#include <immintrin.h>
#include <stdint.h>

#include "common.h"

/* float32 -> bf16, round to nearest even (NaN is not produced by these sums). */
static inline __attribute__((always_inline)) __m128i to_bf16x8(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
    /* packus works per 128-bit lane: gather lanes 0 and 2 of the 64-bit view */
    const __m256i packed = _mm256_packus_epi32(rounded, rounded);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

/* Output columns col..col+7 of one row: x row scale (if scales), + bias, then bf16
 * or float32. Columns past N are not written. */
static inline __attribute__((always_inline)) void store8(
        __m256 v, void *out, int64_t row, int64_t os, int64_t col, int64_t n,
        const float *scales, const float *bias, int out_f32) {
    if (col >= n) return;
    if (col + 8 <= n) {
        if (scales) v = _mm256_mul_ps(v, _mm256_loadu_ps(scales + col));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + col));
        if (out_f32)
            _mm256_storeu_ps((float *)out + row * os + col, v);
        else
            _mm_storeu_si128((__m128i *)((uint16_t *)out + row * os + col), to_bf16x8(v));
        return;
    }
    float vals[8];
    _mm256_storeu_ps(vals, v);
    for (int64_t j = 0; j < n - col; j++) {
        float f = vals[j];
        if (scales) f *= scales[col + j];
        if (bias) f += bias[col + j];
        if (out_f32)
            ((float *)out)[row * os + col + j] = f;
        else
            ((uint16_t *)out)[row * os + col + j] = float_to_bf16(f);
    }
}

#endif
