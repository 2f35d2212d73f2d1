/*
 * Weight packing and activation quantization shared by the CPU platform's GEMM
 * kernels for every instruction set (gemm_bf16.c: AVX512-BF16/VNNI, gemm_avx2.c:
 * AVX2/FMA). Plain C: the packed layouts are the same on both, only the
 * multiply loops differ. Included, not compiled alone.
 */
#ifndef BACKPLANE_GEMM_PACKING_H
#define BACKPLANE_GEMM_PACKING_H
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

/* Activation block of the W8A8 kernels: one scale per 32 columns (llama.cpp's Q8_0). */
#define QB 32

/* Symmetric int8 scale of W's row (max |w| / 127; 1 for an all-zero or missing row). */
static float row_scale(const uint16_t *w, int64_t row, int64_t n, int64_t k) {
    float amax = 0.0f;
    if (row < n)
        for (int64_t j = 0; j < k; j++) {
            const float v = bf16_to_float(w[row * k + j]);
            amax = (v < 0 ? -v : v) > amax ? (v < 0 ? -v : v) : amax;
        }
    return amax > 0.0f ? amax / 127.0f : 1.0f;
}

static inline int quantize_int8(float v, float inv_scale) {
    const float q = __builtin_rintf(v * inv_scale);
    return q > 127.0f ? 127 : (q < -127.0f ? -127 : (int)q);
}

/* Quantize W [N, K] (bf16) per row and pack it in blocks of 16 rows x `group`
 * consecutive columns (2: pairs for the bf16 dot product, 4: quads for VNNI),
 * each value stored as (q + offset) in a byte; scales[N] out. */
static void pack_int8(const uint16_t *w, int64_t n, int64_t k, int group, int offset,
                      uint8_t *packed, float *scales) {
    const int64_t nb = (n + 15) / 16, ng = k / group;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < nb * 16; row++) {
        const float scale = row_scale(w, row, n, k), inv = 1.0f / scale;
        if (row < n) scales[row] = scale;
        uint8_t *dst = packed + (row / 16) * ng * 16 * group;
        for (int64_t g = 0; g < ng; g++)
            for (int j = 0; j < group; j++) {
                const int q = row < n ? quantize_int8(bf16_to_float(w[row * k + g * group + j]),
                                                      inv) : 0;
                dst[(g * 16 + row % 16) * group + j] = (uint8_t)(q + offset);
            }
    }
}

void pack_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
    const int64_t nb = (n + 15) / 16, kp = k / 2;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        uint16_t *dst = packed + b * kp * 32;
        for (int64_t p = 0; p < kp; p++) {
            for (int r = 0; r < 16; r++) {
                const int64_t row = b * 16 + r;
                uint16_t lo = 0, hi = 0; /* rows past N are zero */
                if (row < n) {
                    lo = w[row * k + 2 * p];
                    hi = w[row * k + 2 * p + 1];
                }
                dst[(p * 16 + r) * 2] = lo;
                dst[(p * 16 + r) * 2 + 1] = hi;
            }
        }
    }
}

/* Quantize W [N, K] (bf16) symmetrically per row and pack it; scales[N] out. */
void pack_w8_from_bf16(const uint16_t *w, int64_t n, int64_t k, int8_t *packed, float *scales) {
    pack_int8(w, n, k, 2, 0, (uint8_t *)packed, scales);
}

#if defined(__AVX2__)
#include <immintrin.h>

/* One 32-column block of a row, quantize_activations' scalar loop on 8 lanes with the
 * same float operations (so the same bits): |x| max, scale, rint(x / scale) clamped to
 * +-127. Writes the 32 int8 values, returns the scale and stores their sum. At batch 1
 * the scalar loop cost 3 us for a 896-column row and 9 us for 4864 (17 us a layer of
 * the qwen2-0.5b shape, ~0.4 ms a decode step: gcc did not vectorise it). */
static inline float quantize_block32(const uint16_t *x, int8_t *xq, int32_t *sum) {
    __m256 v[4], amax = _mm256_setzero_ps();
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int j = 0; j < 4; j++) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(x + 8 * j));
        v[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        /* |x| first: max returns its second operand for a NaN, as the scalar `>` keeps amax */
        amax = _mm256_max_ps(_mm256_and_ps(v[j], magnitude), amax);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float a = _mm_cvtss_f32(m4);
    const float s = a > 0.0f ? a / 127.0f : 1.0f, inv = 1.0f / s;
    __m256i q[4], total = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
        q[j] = _mm256_cvtps_epi32(r);
        total = _mm256_add_epi32(total, q[j]);
    }
    /* int32 -> int8 (no saturation needed): the packs interleave 128-bit lanes, the
     * permutation puts the 4-byte groups back in column order */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                             _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)xq, _mm256_permutevar8x32_epi32(
        bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
    *sum = _mm_cvtsi128_si32(t);
    return s;
}
#else
static inline float quantize_block32(const uint16_t *x, int8_t *xq, int32_t *sum) {
    float vals[32], amax = 0.0f;
    for (int j = 0; j < 32; j++) {
        vals[j] = bf16_to_float(x[j]);
        const float a = vals[j] < 0 ? -vals[j] : vals[j];
        amax = a > amax ? a : amax;
    }
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
    int32_t total = 0;
    for (int j = 0; j < 32; j++) {
        const int q = quantize_int8(vals[j], inv);
        xq[j] = (int8_t)q;
        total += q;
    }
    *sum = total;
    return s;
}
#endif

/* Block i (row i / kb, block i % kb) of quantize_activations. */
static inline void quantize_block_at(const uint16_t *x, int64_t xs, int64_t k, int8_t *xq,
                                     float *bscale, int32_t *bsum, int64_t i) {
    const int64_t kb = k / QB, r = i / kb, b = i % kb;
    int32_t sum;
    bscale[i] = quantize_block32(x + r * xs + b * QB, xq + r * k + b * QB, &sum);
    bsum[i] = 128 * sum; /* the +128 weight offset's share of the block */
}

/* x [M, K] bf16 -> xq int8, per (row, 32-block) scale, and 128 x the block's sum of
 * int8 values (what weights stored +128, as gemm_bf16.c's VNNI kernel stores them,
 * add to that block's dot products; kernels with signed weights ignore it). A decode
 * step's few rows take a microsecond or two: even a one-thread parallel region (an
 * `if` clause) cost about as much again, so they skip it. */
void quantize_activations(const uint16_t *x, int64_t xs, int64_t m, int64_t k, int8_t *xq,
                          float *bscale, int32_t *bsum) {
    const int64_t blocks = m * (k / QB);
    if (m * k <= 65536) {
        for (int64_t i = 0; i < blocks; i++) quantize_block_at(x, xs, k, xq, bscale, bsum, i);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < blocks; i++) quantize_block_at(x, xs, k, xq, bscale, bsum, i);
}

/* The including file's W8A8 GEMM (packed: its weight layout). */
void gemm_w8a8(const int8_t *xq, const float *bscale, const int32_t *bsum, int64_t m_total,
               const void *packed, const float *scales, int64_t n, int64_t k,
               const float *bias, void *out, int64_t os, int out_f32);

/* W8A8 from bf16 activations x [M, K] (row stride xs) in one call: quantize_activations
 * into scratch of its own, then gemm_w8a8 (one call instead of two, and no scratch
 * tensors to allocate per layer in Python). Returns -1 if the scratch could not be
 * allocated. */
int gemm_w8a8_bf16(const uint16_t *x, int64_t xs, int64_t m, const void *packed,
                   const float *scales, int64_t n, int64_t k, const float *bias, void *out,
                   int64_t os, int out_f32) {
    const int64_t kb = k / QB;
    int8_t *xq = malloc((size_t)(m * k));
    float *bscale = malloc((size_t)(m * kb) * sizeof(float));
    int32_t *bsum = malloc((size_t)(m * kb) * sizeof(int32_t));
    int status = -1;
    if (xq && bscale && bsum) {
        quantize_activations(x, xs, m, k, xq, bscale, bsum);
        gemm_w8a8(xq, bscale, bsum, m, packed, scales, n, k, bias, out, os, out_f32);
        status = 0;
    }
    free(xq);
    free(bscale);
    free(bsum);
    return status;
}

#endif
