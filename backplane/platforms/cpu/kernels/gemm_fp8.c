/*
 * fp8 (e4m3) weight GEMM for the CPU platform's ``--quantization fp8`` (see
 * backplane/platforms/cpu/fp8.py). The CPU has no fp8 dot product, so the weight
 * is stored as e4m3 bytes with one float32 scale per output row and widened in
 * registers to bf16 for AVX512-BF16's dot product (e4m3's 3 mantissa bits are
 * exact in bf16); the row scale is applied once at the end.
 *
 * Layout: blocks of 16 output rows, column pairs interleaved (32 bytes per pair:
 * byte 2r+j = row r, column 2p+j), the layout of the bf16 GEMM's vectors.
 *
 * Widening without a lookup table: an e4m3 byte s.eeee.mmm placed as the fp16
 * bits s.0eeee.mmm0000000 is the same number times 2^-8 (exponent bias 15 vs 7;
 * subnormals included), and vcvtph2ps converts fp16 exactly; the 2^8 is folded
 * into the row scale. NaN (0x7f / 0xff) is not produced by the quantizer.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define MT 8

static inline __attribute__((always_inline)) void store_block(
        __m512 v, void *out, int64_t row, int64_t os, int64_t col, int64_t n,
        const float *bias, int out_f32) {
    const int64_t cols = n - col < 16 ? n - col : 16;
    const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
    if (out_f32) {
        _mm512_mask_storeu_ps((float *)out + row * os + col, mask, v);
    } else {
        const __m256bh h = _mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16((uint16_t *)out + row * os + col, mask, (__m256i)h);
    }
}

static inline __attribute__((always_inline)) __m512 load_scales(const float *scales,
                                                                 int64_t col, int64_t n) {
    const int64_t cols = n - col < 16 ? n - col : 16;
    return _mm512_maskz_loadu_ps((__mmask16)((1u << cols) - 1u), scales + col);
}

/* 32 e4m3 bytes -> 32 bf16 (each the byte's value times 2^-8), in the same order. */
static inline __attribute__((always_inline)) __m512bh widen_fp8(const uint8_t *src) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    const __m512i sign = _mm512_slli_epi16(w, 8);                        /* bit 7 -> 15 */
    const __m512i mag = _mm512_srli_epi16(_mm512_slli_epi16(w, 9), 2);   /* bits 0-6 -> 7-13 */
    /* sign where the mask 0x8000 is set, mag elsewhere: C ? A : B (imm 0xE4) */
    const __m512i h = _mm512_ternarylogic_epi32(sign, mag, _mm512_set1_epi16((short)0x8000),
                                                0xE4);
    const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

static inline __attribute__((always_inline)) void tile_fp8(
        const uint16_t *x, int64_t xs, int64_t m0, const int mt, const uint8_t *w0,
        const uint8_t *w1, int two, int64_t kp, int64_t n, int64_t b0, const float *scales,
        const float *bias, void *out, int64_t os, int out_f32) {
    __m512 acc0[MT], acc1[MT];
    const uint16_t *rows[MT];
#pragma GCC unroll 8
    for (int i = 0; i < mt; i++) {
        acc0[i] = _mm512_setzero_ps();
        acc1[i] = _mm512_setzero_ps();
        rows[i] = x + (m0 + i) * xs;
    }
    for (int64_t p = 0; p < kp; p++) {
        const __m512bh a = widen_fp8(w0 + p * 32);
        const __m512bh c = widen_fp8(w1 + p * 32);
#pragma GCC unroll 8
        for (int i = 0; i < mt; i++) {
            int32_t pair;
            memcpy(&pair, rows[i] + 2 * p, sizeof pair);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc0[i] = _mm512_dpbf16_ps(acc0[i], a, xb);
            acc1[i] = _mm512_dpbf16_ps(acc1[i], c, xb);
        }
    }
    const __m512 s0 = load_scales(scales, b0 * 16, n);
    const __m512 s1 = two ? load_scales(scales, b0 * 16 + 16, n) : s0;
    for (int i = 0; i < mt; i++) {
        store_block(_mm512_mul_ps(acc0[i], s0), out, m0 + i, os, b0 * 16, n, bias, out_f32);
        if (two)
            store_block(_mm512_mul_ps(acc1[i], s1), out, m0 + i, os, b0 * 16 + 16, n, bias,
                        out_f32);
    }
}

/* out = x @ (scales[:, None] * fp8(W)).T (+ bias); x [M, K] bf16 (K even), scales
 * already multiplied by 2^8; out bf16, or float32 if out_f32. */
void gemm_fp8(const uint16_t *x, int64_t xs, int64_t m_total, const uint8_t *packed,
              const float *scales, int64_t n, int64_t k, const float *bias, void *out,
              int64_t os, int out_f32) {
    const int64_t kp = k / 2, nb = (n + 15) / 16, npairs = (nb + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < npairs; bp++) {
        const int64_t b0 = 2 * bp;
        const int two = (b0 + 1) < nb;
        const uint8_t *w0 = packed + b0 * kp * 32;
        const uint8_t *w1 = two ? w0 + kp * 32 : w0;
        for (int64_t m0 = 0; m0 < m_total; m0 += MT) {
            const int64_t left = m_total - m0;
#define TILE(mt) tile_fp8(x, xs, m0, mt, w0, w1, two, kp, n, b0, scales, bias, out, os, out_f32)
            switch (left < MT ? left : MT) {
            case 1: TILE(1); break; case 2: TILE(2); break; case 3: TILE(3); break;
            case 4: TILE(4); break; case 5: TILE(5); break; case 6: TILE(6); break;
            case 7: TILE(7); break; default: TILE(8); break;
            }
#undef TILE
        }
    }
}
