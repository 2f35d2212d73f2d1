/*
 * 4-bit weight GEMM for GPTQ / AWQ checkpoints on the CPU platform (see
 * backplane/platforms/cpu/int4.py), dequantising in registers.
 *
 * W [N, K] holds 4-bit values q (0..15) with a scale s and zero z per row and
 * group of G consecutive columns: W[n, k] = (q[n, k] - z[n, g]) * s[n, g].
 * It is packed once at load (in Python) into blocks of 16 output rows; within a
 * block, each "quad" of 4 columns (4t .. 4t+3) is 32 bytes: byte 2r+e holds
 * q[r, 4t+e] in its low nibble and q[r, 4t+2+e] in its high nibble. One 256-bit
 * load widened to 32 words then gives, after a mask (low nibbles) or a shift
 * (high nibbles), two vectors in exactly the pair layout vdpbf16ps wants
 * (row r's two columns side by side), with no shuffles.
 *
 * bf16 activations: a nibble q is made the bf16 number 128 + q by OR-ing the
 * exponent bits 0x4300 in (exact), so a group's dot product is
 * sum x (128 + q) = sum x q + 128 sum x, and
 *   out += s * acc - s (128 + z) * sum_group(x),
 * with the activations' per-group sums computed once per call. Each weight
 * byte is read from memory once per call; at batch 1 the kernel streams a
 * quarter of bf16's bytes. From 16 rows on, see gemm_int4_dequant below.
 *
 * float32 activations (tests, float32 models): the weight is dequantised in
 * registers to float32 exactly as (q - z) * s and multiplied with FMAs, so the
 * result matches x @ W.T with W dequantised in float32 up to summation order.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "gemm_tiles.h"

#define MT 4  /* activation rows per tile, bf16 path (<= 2 x 2 x 4 group + 4 output accumulators) */
#define MTF 4 /* rows per tile, float32 path (2 x 4 accumulators + dequantised vectors) */

/* Per-row, per-group sums of bf16 activations (float32): xsum[m * groups + g]. */
static void group_sums(const uint16_t *x, int64_t xs, int64_t m, int64_t k, int64_t group,
                       float *xsum) {
    const int64_t groups = k / group;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            __m512 acc = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 16 <= group; j += 16) {
                const __m256i h = _mm256_loadu_si256((const __m256i *)(x + r * xs + g * group + j));
                acc = _mm512_add_ps(acc, bf16x16_to_ps(h));
            }
            float s = _mm512_reduce_add_ps(acc);
            for (; j < group; j++) s += bf16_to_float(x[r * xs + g * group + j]);
            xsum[r * groups + g] = s;
        }
}

/* One row tile (mt rows, a compile-time constant) against one 16-row block. The
 * low- and high-nibble products go to separate group accumulators, and with
 * fewer than 3 rows consecutive quads alternate between two sets as well, so
 * even batch 1 keeps 4 independent dot-product chains in flight (vdpbf16ps's
 * latency, not memory bandwidth, would otherwise bound it). */
static inline __attribute__((always_inline)) void tile_bf16(
        const uint16_t *x, int64_t xs, const float *xsum, int64_t groups, int64_t m0,
        const int mt, const uint8_t *wb, const float *sb, const float *cb, int64_t gq,
        int64_t n, int64_t b, const float *bias, void *out, int64_t os, int out_f32) {
    enum { U = 2 };
    const int u = mt <= 2 ? 2 : 1; /* accumulator sets (quads interleaved) */
    __m512 o[MT], al[U][MT], ah[U][MT];
    const uint16_t *rows[MT];
    const __m512i nib = _mm512_set1_epi16(0x000F), exp128 = _mm512_set1_epi16(0x4300);
#pragma GCC unroll 4
    for (int i = 0; i < mt; i++) {
        rows[i] = x + (m0 + i) * xs;
        o[i] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < groups; g++) {
#pragma GCC unroll 2
        for (int v = 0; v < u; v++)
#pragma GCC unroll 4
            for (int i = 0; i < mt; i++) {
                al[v][i] = _mm512_setzero_ps();
                ah[v][i] = _mm512_setzero_ps();
            }
        const uint8_t *wg = wb + g * gq * 32;
        const int64_t c0 = g * gq * 4;
        int64_t t = 0;
        for (; t + u <= gq; t += u) {
#pragma GCC unroll 2
            for (int v = 0; v < u; v++) {
                const __m512i w = _mm512_cvtepu8_epi16(
                    _mm256_loadu_si256((const __m256i *)(wg + (t + v) * 32)));
                /* (w & 0xF) | 0x4300 and (w >> 4) | 0x4300: bf16 128 + q */
                const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(w, nib, exp128, 0xEA);
                const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 4), exp128);
#pragma GCC unroll 4
                for (int i = 0; i < mt; i++) {
                    int32_t p0, p1;
                    memcpy(&p0, rows[i] + c0 + 4 * (t + v), sizeof p0);
                    memcpy(&p1, rows[i] + c0 + 4 * (t + v) + 2, sizeof p1);
                    al[v][i] = _mm512_dpbf16_ps(al[v][i], lo, (__m512bh)_mm512_set1_epi32(p0));
                    ah[v][i] = _mm512_dpbf16_ps(ah[v][i], hi, (__m512bh)_mm512_set1_epi32(p1));
                }
            }
        }
        for (; t < gq; t++) { /* an odd quad left (u = 2, odd gq) */
            const __m512i w = _mm512_cvtepu8_epi16(
                _mm256_loadu_si256((const __m256i *)(wg + t * 32)));
            const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(w, nib, exp128, 0xEA);
            const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 4), exp128);
#pragma GCC unroll 4
            for (int i = 0; i < mt; i++) {
                int32_t p0, p1;
                memcpy(&p0, rows[i] + c0 + 4 * t, sizeof p0);
                memcpy(&p1, rows[i] + c0 + 4 * t + 2, sizeof p1);
                al[0][i] = _mm512_dpbf16_ps(al[0][i], lo, (__m512bh)_mm512_set1_epi32(p0));
                ah[0][i] = _mm512_dpbf16_ps(ah[0][i], hi, (__m512bh)_mm512_set1_epi32(p1));
            }
        }
        const __m512 s = _mm512_loadu_ps(sb + g * 16), c = _mm512_loadu_ps(cb + g * 16);
#pragma GCC unroll 4
        for (int i = 0; i < mt; i++) {
            __m512 a = _mm512_add_ps(al[0][i], ah[0][i]);
            if (u == 2) a = _mm512_add_ps(a, _mm512_add_ps(al[1][i], ah[1][i]));
            o[i] = _mm512_fmadd_ps(s, a, o[i]);
            o[i] = _mm512_fnmadd_ps(c, _mm512_set1_ps(xsum[(m0 + i) * groups + g]), o[i]);
        }
    }
    for (int i = 0; i < mt; i++) store_block(o[i], out, m0 + i, os, b * 16, n, bias, out_f32);
}

static inline __attribute__((always_inline)) __m512 pair_broadcast(const float *p) {
    double d;
    memcpy(&d, p, sizeof d);
    return _mm512_castpd_ps(_mm512_set1_pd(d));
}

static inline __attribute__((always_inline)) void tile_f32(
        const float *x, int64_t xs, int64_t groups, int64_t m0, const int mt,
        const uint8_t *wb, const float *sb, const float *zb, int64_t gq, int64_t n, int64_t b,
        const float *bias, void *out, int64_t os, int out_f32) {
    /* Lane l of a "low" vector is row l / 2, column e = l % 2 of a pair; "high": row 8 + l / 2. */
    __m512 accl[MTF], acch[MTF];
    const float *rows[MTF];
    const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
    const __m512i nib = _mm512_set1_epi32(0xF);
#pragma GCC unroll 4
    for (int i = 0; i < mt; i++) {
        accl[i] = _mm512_setzero_ps();
        acch[i] = _mm512_setzero_ps();
        rows[i] = x + (m0 + i) * xs;
    }
    for (int64_t g = 0; g < groups; g++) {
        const __m512 s16 = _mm512_loadu_ps(sb + g * 16), z16 = _mm512_loadu_ps(zb + g * 16);
        const __m512 sl = _mm512_permutexvar_ps(dup_lo, s16), sh = _mm512_permutexvar_ps(dup_hi, s16);
        const __m512 zl = _mm512_permutexvar_ps(dup_lo, z16), zh = _mm512_permutexvar_ps(dup_hi, z16);
        const uint8_t *wg = wb + g * gq * 32;
        const int64_t c0 = g * gq * 4;
        for (int64_t t = 0; t < gq; t++) {
            const __m512i bl = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wg + t * 32)));
            const __m512i bh = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wg + t * 32 + 16)));
            const __m512 wl0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bl, nib)), zl), sl);
            const __m512 wl1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bl, 4)), zl), sl);
            const __m512 wh0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bh, nib)), zh), sh);
            const __m512 wh1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bh, 4)), zh), sh);
#pragma GCC unroll 4
            for (int i = 0; i < mt; i++) {
                const __m512 x0 = pair_broadcast(rows[i] + c0 + 4 * t);
                const __m512 x1 = pair_broadcast(rows[i] + c0 + 4 * t + 2);
                accl[i] = _mm512_fmadd_ps(wl0, x0, accl[i]);
                accl[i] = _mm512_fmadd_ps(wl1, x1, accl[i]);
                acch[i] = _mm512_fmadd_ps(wh0, x0, acch[i]);
                acch[i] = _mm512_fmadd_ps(wh1, x1, acch[i]);
            }
        }
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int i = 0; i < mt; i++) {
        const __m512 v = _mm512_add_ps(_mm512_permutex2var_ps(accl[i], even, acch[i]),
                                       _mm512_permutex2var_ps(accl[i], odd, acch[i]));
        store_block(v, out, m0 + i, os, b * 16, n, bias, out_f32);
    }
}

/* ------------------------------------------------------------------------
 * Many bf16 rows: unpacking in the inner loop would make the kernel compute-bound
 * (4 integer ops per 64 weights per row tile). Instead each pair of 16-row blocks
 * is dequantised once per call into a bf16 buffer in the bf16 GEMM's pair layout,
 * (q - z) * s rounded to bf16 (the precision of a bf16 checkpoint), and every row
 * tile streams it from cache with one dot product per weight vector.
 * ------------------------------------------------------------------------ */


/* Block b of packed (16 rows x K) -> dst [K/2][32] bf16 pairs, (q - z) * s. */
static void dequant_block(const uint8_t *wb, const float *sb, const float *zb, int64_t k,
                          int64_t groups, int64_t gq, uint16_t *dst) {
    const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
    const __m512i nib = _mm512_set1_epi32(0xF);
    (void)k;
    for (int64_t g = 0; g < groups; g++) {
        const __m512 s16 = _mm512_loadu_ps(sb + g * 16), z16 = _mm512_loadu_ps(zb + g * 16);
        const __m512 sl = _mm512_permutexvar_ps(dup_lo, s16), sh = _mm512_permutexvar_ps(dup_hi, s16);
        const __m512 zl = _mm512_permutexvar_ps(dup_lo, z16), zh = _mm512_permutexvar_ps(dup_hi, z16);
        for (int64_t t = 0; t < gq; t++) {
            const uint8_t *src = wb + (g * gq + t) * 32;
            const __m512i bl = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
            const __m512i bh = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16)));
            const __m512 wl0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bl, nib)), zl), sl);
            const __m512 wl1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bl, 4)), zl), sl);
            const __m512 wh0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bh, nib)), zh), sh);
            const __m512 wh1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bh, 4)), zh), sh);
            /* pair 2t: low nibbles (rows 0-7 in wl0, 8-15 in wh0); pair 2t+1: high nibbles.
             * cvtne2ps_pbh(a, b) puts b in the low half. */
            const int64_t p = (g * gq + t) * 2;
            _mm512_storeu_si512(dst + p * 32, (__m512i)_mm512_cvtne2ps_pbh(wh0, wl0));
            _mm512_storeu_si512(dst + (p + 1) * 32, (__m512i)_mm512_cvtne2ps_pbh(wh1, wl1));
        }
    }
}

#if BACKPLANE_AMX
#include "gemm_amx.h"

/* gemm_int4_dequant with the tile unit multiplying each dequantised pair. */
static int gemm_int4_dequant_amx(const uint16_t *x, int64_t xs, int64_t m_total,
                                 const uint8_t *packed, const float *sblk, const float *zblk,
                                 int64_t n, int64_t k, int64_t group, const float *bias,
                                 void *out, int64_t os, int out_f32) {
    const int64_t nb = (n + 15) / 16, npairs = (nb + 1) / 2, groups = k / group;
    const int64_t gq = group / 4, kp = k / 2;
    struct amx_rows rows;
    if (amx_rows_init(&rows, x, xs, m_total, k)) return -1;
    int failed = 0;
#pragma omp parallel
    {
        uint16_t *buf = amx_pair_buffer(k);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t bp = 0; bp < npairs; bp++) {
            if (!buf) continue;
            const int64_t b0 = 2 * bp;
            const int two = (b0 + 1) < nb;
            for (int j = 0; j < 1 + two; j++)
                dequant_block(packed + (b0 + j) * (k / 4) * 32, sblk + (b0 + j) * groups * 16,
                              zblk + (b0 + j) * groups * 16, k, groups, gq, buf + j * kp * 32);
            amx_pair(&rows, buf, two ? buf + kp * 32 : buf, two, NULL, NULL, n, b0, NULL, bias,
                     out, os, out_f32);
        }
        _tile_release();
    }
    return failed ? -1 : 0;
}
#endif

static void gemm_int4_dequant(const uint16_t *x, int64_t xs, int64_t m_total,
                              const uint8_t *packed, const float *sblk, const float *zblk,
                              int64_t n, int64_t k, int64_t group, const float *bias, void *out,
                              int64_t os, int out_f32) {
    const int64_t nb = (n + 15) / 16, npairs = (nb + 1) / 2, groups = k / group;
    const int64_t gq = group / 4, kp = k / 2;
#pragma omp parallel
    {
        uint16_t *buf = (uint16_t *)aligned_alloc(64, (size_t)(2 * kp * 32 * 2 + 64));
#pragma omp for schedule(static)
        for (int64_t bp = 0; bp < npairs; bp++) {
            const int64_t b0 = 2 * bp;
            const int two = (b0 + 1) < nb;
            for (int j = 0; j < 1 + two; j++)
                dequant_block(packed + (b0 + j) * (k / 4) * 32, sblk + (b0 + j) * groups * 16,
                              zblk + (b0 + j) * groups * 16, k, groups, gq, buf + j * kp * 32);
            const uint16_t *w0 = buf, *w1 = two ? buf + kp * 32 : buf;
            ROW_TILES_8_FN(tile_bf16_weights, w0, w1, two, kp, n, b0, bias, out, os,
                           out_f32, NULL, NULL, m_total)
        }
        free(buf);
    }
}

/* Rows from which bf16 activations use the dequantised-buffer path. */
#ifndef DEQUANT_ROWS
#define DEQUANT_ROWS 16
#endif

/* out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), m < m_total, n < N. Built with
 * BACKPLANE_AMX=1, bf16 calls of DEQUANT_ROWS rows or more multiply the dequantised
 * blocks on AMX tiles (K a multiple of 32). Returns -1 if scratch memory could not be
 * allocated.
 * x: [M, K] bf16 (x_f32 = 0) or float32 (x_f32 = 1), row stride xs; K and group
 * multiples of 4, K a multiple of group. packed: [ceil(N/16)][K/4][32] bytes;
 * sblk, zblk, cblk: [ceil(N/16)][K/group][16] float32 scale, zero and s * (128 + z).
 * out: [M, N] bf16, or float32 if out_f32, row stride os. */
int gemm_int4(const void *x, int64_t xs, int64_t m_total, int x_f32, const uint8_t *packed,
              const float *sblk, const float *zblk, const float *cblk, int64_t n, int64_t k,
              int64_t group, const float *bias, void *out, int64_t os, int out_f32) {
    const int64_t nb = (n + 15) / 16, groups = k / group, gq = group / 4;
    if (!x_f32 && m_total >= DEQUANT_ROWS) {
#if BACKPLANE_AMX
        if (k % AMX_K == 0)
            return gemm_int4_dequant_amx((const uint16_t *)x, xs, m_total, packed, sblk, zblk,
                                         n, k, group, bias, out, os, out_f32);
#endif
        gemm_int4_dequant((const uint16_t *)x, xs, m_total, packed, sblk, zblk, n, k, group,
                          bias, out, os, out_f32);
        return 0;
    }
    float *xsum = NULL;
    if (!x_f32) {
        xsum = (float *)malloc(sizeof(float) * (size_t)(m_total * groups + 1));
        group_sums((const uint16_t *)x, xs, m_total, k, group, xsum);
    }
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < (nb + 1) / 2; bp++) {
        const int64_t b0 = 2 * bp;
        const int two = b0 + 1 < nb;
        const int64_t bstride = (k / 4) * 32, tstride = groups * 16;
        const uint8_t *wb = packed + b0 * bstride;
        const float *sb = sblk + b0 * tstride, *zb = zblk + b0 * tstride,
                    *cb = cblk + b0 * tstride;
        if (!x_f32) {
            const uint16_t *xh = (const uint16_t *)x;
            for (int64_t m0 = 0; m0 < m_total; m0 += MT) {
                const int64_t left = m_total - m0;
#define TILE(mt, j) tile_bf16(xh, xs, xsum, groups, m0, mt, wb + (j) * bstride,        \
                               sb + (j) * tstride, cb + (j) * tstride, gq, n, b0 + (j),    \
                               bias, out, os, out_f32)
                for (int j = 0; j < 1 + two; j++) {
                    switch (left < MT ? left : MT) {
                    case 1: TILE(1, j); break; case 2: TILE(2, j); break;
                    case 3: TILE(3, j); break; default: TILE(4, j); break;
                    }
                }
#undef TILE
            }
        } else {
            const float *xf = (const float *)x;
            for (int j = 0; j < 1 + two; j++)
                for (int64_t m0 = 0; m0 < m_total; m0 += MTF) {
                    const int64_t left = m_total - m0;
#define TILE(mt) tile_f32(xf, xs, groups, m0, mt, wb + j * bstride, sb + j * tstride, \
                          zb + j * tstride, gq, n, b0 + j, bias, out, os, out_f32)
                    switch (left < MTF ? left : MTF) {
                    case 1: TILE(1); break; case 2: TILE(2); break; case 3: TILE(3); break;
                    default: TILE(4); break;
                    }
#undef TILE
                }
        }
    }
    free(xsum);
    return 0;
}
