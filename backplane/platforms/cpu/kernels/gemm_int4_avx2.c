/*
 * 4-bit weight GEMM (GPTQ / AWQ) for x86 CPUs with AVX2 and FMA but without
 * AVX512-BF16: the same entry point, packed layout and scale tables as
 * gemm_int4.c (see backplane/platforms/cpu/int4.py).
 *
 * A packed block is 16 output rows; quad t (columns 4t..4t+3) is 32 bytes, byte
 * 2r+e holding q[r, 4t+e] in its low nibble and q[r, 4t+2+e] in its high one.
 *
 * bf16 activations: the multiplications are integer. Each row's activations are
 * quantized once per call to int16, one scale per chunk of up to 512 columns inside
 * a group (|x| max -> 32767: 15 bits, finer than the bf16 input's 8), and a quad's
 * bytes, zero-extended to 16-bit lanes, give after a mask or a shift the pairs
 * (q[r, 4t], q[r, 4t+1]) or (q[r, 4t+2], q[r, 4t+3]) that vpmaddwd multiplies with
 * a broadcast int16 activation pair into int32 lane r: 16 weights for 3.5 vector
 * ops, where widening each nibble to float32 for an FMA took 7 and kept the kernel
 * compute-bound at about the speed of the bf16 GEMM on a Zen 2. The int32 sums are
 * exact (at most 2 x 256 products of 15 x 32767 per chunk), so per chunk
 *   out += (s_g * xscale) * (sum q x_int - z_g * sum x_int)
 * in float32 is the only rounding, and it is the same for any number of rows.
 *
 * float32 activations (tests, float32 models): eight bytes (rows 4i..4i+3) widened
 * to 32-bit lanes give, after a mask or a shift and a conversion, 8 lanes (row, e)
 * dequantised in registers as (q - z) * s, exactly as the dense float32 weight,
 * that multiply the broadcast pair (x[4t], x[4t+1]) or (x[4t+2], x[4t+3]); a row's
 * two lanes are added at the end. The result matches x @ W.T up to summation order
 * (a float32 model matches its dequantised twin token for token).
 *
 * Either way a row is summed in the same order whatever the number of rows in the
 * call (batch 1 takes several blocks per tile, more rows several rows per tile), so
 * its result does not depend on its batch (speculative decoding's verification must
 * pick the token decoding alone picks).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_common.h"
#include "common.h"

/* float32 rows per tile: 2 rows x 4 accumulators + 4 broadcast pairs + the weights
 * fit AVX2's 16 registers (with 3 rows gcc spilled accumulators in the inner loop). */
#define MT 2

static inline __attribute__((always_inline)) __m256 pair_broadcast(const float *p) {
    return _mm256_castpd_ps(_mm256_broadcast_sd((const double *)p));
}

/* Lanes (row 4i + l / 2, e = l % 2) of 8 per-row values v[0..15] (s or z). */
static inline __attribute__((always_inline)) __m256 row_pairs(const float *v, int i) {
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(v + 4 * i)), dup);
}

/* Rows 4i..4i+3 of quad src: low nibbles (columns 4t, 4t+1) and high (4t+2, 4t+3). */
static inline __attribute__((always_inline)) void widen_rows4(const uint8_t *src, int i,
                                                              __m256 *lo, __m256 *hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * i)));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

/* float32 activations: mt rows x nblk blocks (compile-time constants, mt * nblk <=
 * 2), each weight dequantized in registers as (q - z) * s. xf: row stride xs. */
static inline __attribute__((always_inline)) void tile_f32(
        const float *xf, int64_t xs, int64_t groups, int64_t gq, int64_t m0, const int mt,
        const int nblk, const uint8_t *const wb[2], const float *const sb[2],
        const float *const zb[2], int64_t n, int64_t b0, const float *bias, void *out,
        int64_t os, int out_f32) {
    __m256 acc[MT][2][4];
#pragma GCC unroll 2
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nblk; j++)
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) acc[i][j][v] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 s[2][4], z[2][4];
#pragma GCC unroll 2
        for (int j = 0; j < nblk; j++)
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                s[j][v] = row_pairs(sb[j] + g * 16, v);
                z[j][v] = row_pairs(zb[j] + g * 16, v);
            }
        for (int64_t t = g * gq; t < (g + 1) * gq; t++) {
            __m256 xl[MT], xh[MT];
#pragma GCC unroll 2
            for (int i = 0; i < mt; i++) {
                xl[i] = pair_broadcast(xf + (m0 + i) * xs + 4 * t);
                xh[i] = pair_broadcast(xf + (m0 + i) * xs + 4 * t + 2);
            }
#pragma GCC unroll 2
            for (int j = 0; j < nblk; j++)
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) {
                    __m256 lo, hi;
                    widen_rows4(wb[j] + t * 32, v, &lo, &hi);
                    lo = _mm256_mul_ps(_mm256_sub_ps(lo, z[j][v]), s[j][v]);
                    hi = _mm256_mul_ps(_mm256_sub_ps(hi, z[j][v]), s[j][v]);
#pragma GCC unroll 2
                    for (int i = 0; i < mt; i++) {
                        acc[i][j][v] = _mm256_fmadd_ps(lo, xl[i], acc[i][j][v]);
                        acc[i][j][v] = _mm256_fmadd_ps(hi, xh[i], acc[i][j][v]);
                    }
                }
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nblk; j++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                /* (rows 0,1,4,5 | 2,3,6,7) of the half block -> rows 0..7 */
                const __m256 v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(
                    _mm256_hadd_ps(acc[i][j][2 * h], acc[i][j][2 * h + 1])), 0xD8));
                store8(v, out, m0 + i, os, (b0 + j) * 16 + 8 * h, n, NULL, bias, out_f32);
            }
}

#define F32_TILE_FN(mt, nblk)                                                          \
    static __attribute__((noinline)) void f32_tile_##mt##x##nblk(                      \
            const float *xf, int64_t xs, int64_t groups, int64_t gq, int64_t m0,       \
            const uint8_t *const wb[2], const float *const sb[2],                      \
            const float *const zb[2], int64_t n, int64_t b0, const float *bias,        \
            void *out, int64_t os, int out_f32) {                                      \
        tile_f32(xf, xs, groups, gq, m0, mt, nblk, wb, sb, zb, n, b0, bias, out, os,   \
                 out_f32);                                                             \
    }
F32_TILE_FN(1, 2) F32_TILE_FN(1, 1) F32_TILE_FN(2, 1)

/* bf16 activations, quantized per row and chunk (quantize_chunks). */
struct int16_rows {
    const int16_t *xq;   /* [M][K] */
    const float *scale;  /* [M][chunks]: x ~ scale * xq */
    const float *sum;    /* [M][chunks]: sum of xq over the chunk (exact) */
    int64_t k, chunks, cq, chunks_per_group; /* cq: quads per chunk */
};

/* Chunk width: the largest multiple of 4 dividing the group, at most 512 columns (so
 * a chunk's int32 sums cannot overflow and its sum of int16 values is exact in float32). */
static int64_t chunk_columns(int64_t group) {
    int64_t c = group < 512 ? group : 512;
    while (group % c) c -= 4;
    return c;
}

static void quantize_chunks(const uint16_t *x, int64_t xs, int64_t m, int64_t k, int64_t c,
                            int16_t *xq, float *scale, float *sum) {
    const int64_t chunks = k / c;
#pragma omp parallel for schedule(static) if (m * k > 65536)
    for (int64_t r = 0; r < m; r++)
        for (int64_t ch = 0; ch < chunks; ch++) {
            const uint16_t *src = x + r * xs + ch * c;
            float amax = 0.0f;
            for (int64_t j = 0; j < c; j++) {
                const float a = __builtin_fabsf(bf16_to_float(src[j]));
                amax = a > amax ? a : amax;
            }
            const float sc = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 32767.0f / amax;
            int32_t total = 0;
            for (int64_t j = 0; j < c; j++) {
                const int32_t q =
                    amax > 0.0f ? (int32_t)__builtin_rintf(bf16_to_float(src[j]) * inv) : 0;
                const int32_t clamped = q > 32767 ? 32767 : (q < -32767 ? -32767 : q);
                xq[r * k + ch * c + j] = (int16_t)clamped;
                total += clamped;
            }
            scale[r * chunks + ch] = sc;
            sum[r * chunks + ch] = (float)total;
        }
}

#define MT16 3 /* rows per int16 tile: 3 x 2 accumulators + 3 x 2 activation pairs */
#define NB16 2 /* blocks per batch-1 tile (with 4, gcc spilled half the accumulators) */

/* mt rows x nblk blocks (compile-time constants; mt == 1 or nblk == 1). Half h of a
 * block quad (16 bytes, rows 8h..8h+7) widened to words: lane pair r = row r's
 * (column 4t, 4t+1) byte, whose low nibbles are one vpmaddwd operand and high
 * nibbles (columns 4t+2, 4t+3) another. */
static inline __attribute__((always_inline)) void tile_int16(
        const struct int16_rows *a, int64_t m0, const int mt, const int nblk,
        const uint8_t *const wb[NB16], const float *const sb[NB16], const float *const zb[NB16],
        int64_t n, int64_t b0, const float *bias, void *out, int64_t os, int out_f32) {
    /* the outputs live in memory between chunks: kept in registers, gcc spilled the
     * accumulators of the inner loop instead */
    float o[MT16][NB16][16] __attribute__((aligned(32))) = {{{0}}};
    const __m256i nib = _mm256_set1_epi16(0xF);
    for (int64_t ch = 0; ch < a->chunks; ch++) {
        __m256i acc[MT16][NB16][2];
#pragma GCC unroll 3
        for (int i = 0; i < mt; i++)
#pragma GCC unroll 4
            for (int j = 0; j < nblk; j++) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_si256();
        for (int64_t t = ch * a->cq; t < (ch + 1) * a->cq; t++) {
            __m256i xl[MT16], xh[MT16];
#pragma GCC unroll 3
            for (int i = 0; i < mt; i++) {
                int32_t pl, ph;
                memcpy(&pl, a->xq + (m0 + i) * a->k + 4 * t, sizeof pl);
                memcpy(&ph, a->xq + (m0 + i) * a->k + 4 * t + 2, sizeof ph);
                xl[i] = _mm256_set1_epi32(pl);
                xh[i] = _mm256_set1_epi32(ph);
            }
#pragma GCC unroll 4
            for (int j = 0; j < nblk; j++)
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const __m256i w = _mm256_cvtepu8_epi16(
                        _mm_loadu_si128((const __m128i *)(wb[j] + t * 32 + 16 * h)));
                    const __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_srli_epi16(w, 4);
#pragma GCC unroll 3
                    for (int i = 0; i < mt; i++) {
                        acc[i][j][h] = _mm256_add_epi32(acc[i][j][h], _mm256_madd_epi16(lo, xl[i]));
                        acc[i][j][h] = _mm256_add_epi32(acc[i][j][h], _mm256_madd_epi16(hi, xh[i]));
                    }
                }
        }
        const int64_t g = ch / a->chunks_per_group;
#pragma GCC unroll 3
        for (int i = 0; i < mt; i++) {
            const __m256 xs = _mm256_set1_ps(a->scale[(m0 + i) * a->chunks + ch]);
            const __m256 xsum = _mm256_set1_ps(a->sum[(m0 + i) * a->chunks + ch]);
#pragma GCC unroll 4
            for (int j = 0; j < nblk; j++)
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const __m256 s = _mm256_loadu_ps(sb[j] + g * 16 + 8 * h);
                    const __m256 z = _mm256_loadu_ps(zb[j] + g * 16 + 8 * h);
                    const __m256 f = _mm256_fnmadd_ps(z, xsum, _mm256_cvtepi32_ps(acc[i][j][h]));
                    _mm256_store_ps(o[i][j] + 8 * h, _mm256_fmadd_ps(
                        _mm256_mul_ps(s, xs), f, _mm256_load_ps(o[i][j] + 8 * h)));
                }
        }
    }
#pragma GCC unroll 3
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nblk; j++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++)
                store8(_mm256_load_ps(o[i][j] + 8 * h), out, m0 + i, os, (b0 + j) * 16 + 8 * h,
                       n, NULL, bias, out_f32);
}

#define INT16_TILE_FN(mt, nblk)                                                        \
    static __attribute__((noinline)) void int16_tile_##mt##x##nblk(                    \
            const struct int16_rows *a, int64_t m0, const uint8_t *const wb[NB16],     \
            const float *const sb[NB16], const float *const zb[NB16], int64_t n,       \
            int64_t b0, const float *bias, void *out, int64_t os, int out_f32) {       \
        tile_int16(a, m0, mt, nblk, wb, sb, zb, n, b0, bias, out, os, out_f32);        \
    }
INT16_TILE_FN(1, 2) INT16_TILE_FN(1, 1) INT16_TILE_FN(2, 1) INT16_TILE_FN(3, 1)

/* bf16 rows: batch 1 takes NB16 blocks per tile (1 at the end), more rows MT16-row
 * tiles against one block at a time; the same sums for a row either way. */
static void gemm_int16(const struct int16_rows *a, int64_t m_total, const uint8_t *packed,
                       const float *sblk, const float *zblk, int64_t n, int64_t k,
                       int64_t groups, const float *bias, void *out, int64_t os, int out_f32) {
    const int64_t nb = (n + 15) / 16, bstride = (k / 4) * 32, tstride = groups * 16;
    const int64_t per = m_total == 1 ? NB16 : 1, units = (nb + per - 1) / per;
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t b0 = u * per;
        const int have = nb - b0 < per ? (int)(nb - b0) : (int)per;
        const uint8_t *wb[NB16];
        const float *sb[NB16], *zb[NB16];
        for (int j = 0; j < NB16; j++) {
            const int64_t b = b0 + (j < have ? j : 0);
            wb[j] = packed + b * bstride;
            sb[j] = sblk + b * tstride;
            zb[j] = zblk + b * tstride;
        }
        if (m_total == 1) {
            if (have == NB16) {
                int16_tile_1x2(a, 0, wb, sb, zb, n, b0, bias, out, os, out_f32);
            } else {
                for (int j = 0; j < have; j++) {
                    const uint8_t *w1[NB16] = {wb[j]};
                    const float *s1[NB16] = {sb[j]}, *z1[NB16] = {zb[j]};
                    int16_tile_1x1(a, 0, w1, s1, z1, n, b0 + j, bias, out, os, out_f32);
                }
            }
            continue;
        }
        int64_t m0 = 0;
        for (; m0 + MT16 <= m_total; m0 += MT16)
            int16_tile_3x1(a, m0, wb, sb, zb, n, b0, bias, out, os, out_f32);
        if (m_total - m0 == 2)
            int16_tile_2x1(a, m0, wb, sb, zb, n, b0, bias, out, os, out_f32);
        else if (m_total - m0 == 1)
            int16_tile_1x1(a, m0, wb, sb, zb, n, b0, bias, out, os, out_f32);
    }
}

/* out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), m < m_total, n < N: gemm_int4.c's
 * contract (cblk, its bf16 offset table, is not used here). Returns -1 if the int16
 * copy of bf16 activations could not be allocated. */
int gemm_int4(const void *x, int64_t xs, int64_t m_total, int x_f32, const uint8_t *packed,
              const float *sblk, const float *zblk, const float *cblk, int64_t n, int64_t k,
              int64_t group, const float *bias, void *out, int64_t os, int out_f32) {
    (void)cblk;
    const int64_t nb = (n + 15) / 16, groups = k / group, gq = group / 4;
    const int64_t bstride = (k / 4) * 32, tstride = groups * 16;
    if (!x_f32) {
        const int64_t c = chunk_columns(group), chunks = k / c;
        int16_t *xq = malloc(sizeof(int16_t) * (size_t)(m_total * k + 1));
        float *scale = malloc(sizeof(float) * (size_t)(m_total * chunks + 1));
        float *sum = malloc(sizeof(float) * (size_t)(m_total * chunks + 1));
        int status = -1;
        if (xq && scale && sum) {
            quantize_chunks((const uint16_t *)x, xs, m_total, k, c, xq, scale, sum);
            const struct int16_rows a = {xq, scale, sum, k, chunks, c / 4, group / c};
            gemm_int16(&a, m_total, packed, sblk, zblk, n, k, groups, bias, out, os, out_f32);
            status = 0;
        }
        free(xq);
        free(scale);
        free(sum);
        return status;
    }
    const float *xf = x;
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < (nb + 1) / 2; bp++) {
        const int64_t b0 = 2 * bp;
        const int two = b0 + 1 < nb;
        const uint8_t *wb[2] = {packed + b0 * bstride, packed + (b0 + two) * bstride};
        const float *sb[2] = {sblk + b0 * tstride, sblk + (b0 + two) * tstride};
        const float *zb[2] = {zblk + b0 * tstride, zblk + (b0 + two) * tstride};
        if (m_total == 1 && two) {
            f32_tile_1x2(xf, xs, groups, gq, 0, wb, sb, zb, n, b0, bias, out, os, out_f32);
            continue;
        }
        for (int j = 0; j <= two; j++) {
            const uint8_t *w1[2] = {wb[j]};
            const float *s1[2] = {sb[j]}, *z1[2] = {zb[j]};
            int64_t m0 = 0;
            for (; m0 + 2 <= m_total; m0 += 2)
                f32_tile_2x1(xf, xs, groups, gq, m0, w1, s1, z1, n, b0 + j, bias, out, os,
                             out_f32);
            if (m0 < m_total)
                f32_tile_1x1(xf, xs, groups, gq, m0, w1, s1, z1, n, b0 + j, bias, out, os,
                             out_f32);
        }
    }
    return 0;
}
