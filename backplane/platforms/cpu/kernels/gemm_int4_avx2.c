/*
 * 4-bit weight GEMM (GPTQ / AWQ) for x86 CPUs with AVX2 and FMA but without
 * AVX512-BF16: the same entry point, packed layout and scale tables as
 * gemm_int4.c (see backplane/platforms/cpu/int4.py), with float32 FMAs.
 *
 * A packed block is 16 output rows; quad t (columns 4t..4t+3) is 32 bytes, byte
 * 2r+e holding q[r, 4t+e] in its low nibble and q[r, 4t+2+e] in its high one.
 * Eight of those bytes (rows 4i..4i+3) zero-extended to 32-bit lanes give, after
 * a mask or a shift and an int->float conversion, 8 lanes (row, e) that multiply
 * the broadcast activation pair (x[4t], x[4t+1]) or (x[4t+2], x[4t+3]): no
 * shuffles in the loop. The two lanes of a row are added at the end.
 *
 * bf16 activations (widened to float32 once per call): the loop multiplies the
 * raw q, a group at a time, and the group's row scale is applied at its end:
 *   out = sum_g s_g * sum_{k in g} x_k q_k  -  sum_g (s_g z_g) * sum_{k in g} x_k,
 * the activations' group sums computed once per call. Each weight byte is read
 * once per call and costs 2.5 vector ops per weight pair (load-widen, mask or
 * shift, convert) before its FMA.
 *
 * float32 activations (tests, float32 models): each weight is dequantised in
 * registers as (q - z) * s, exactly as the dense float32 weight, so the result
 * matches x @ W.T up to summation order (a float32 model matches its dequantised
 * twin token for token).
 *
 * Every row is summed in the same order whatever the number of rows in the call
 * (batch 1 takes two blocks per tile, 2+ rows two rows per tile, 4+ rows read the
 * widened block from a panel), so a row's
 * result does not depend on its batch (speculative decoding's verification must
 * pick the token decoding alone picks).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "avx2_common.h"
#include "common.h"

/* Activation rows per tile: 2 rows x 4 accumulators + 4 broadcast pairs + the weights
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

/* mt rows x nblk blocks (compile-time constants, mt * nblk <= 2). deq = 0: bf16
 * activations, raw q and per-group scaling (header); deq = 1: float32 activations,
 * (q - z) * s in registers. xf: float32 activations with row stride xs. */
static inline __attribute__((always_inline)) void tile(
        const float *xf, int64_t xs, const float *xsum, int64_t groups, int64_t gq,
        int64_t m0, const int mt, const int nblk, const int deq, const uint8_t *const wb[2],
        const float *panel, const float *const sb[2], const float *const zb[2], int64_t n,
        int64_t b0, const float *bias, void *out, int64_t os, int out_f32) {
    __m256 acc[MT][2][4], o[MT][2][4];
#pragma GCC unroll 2
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nblk; j++)
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) acc[i][j][v] = o[i][j][v] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 s[2][4], z[2][4];
        if (deq && !panel) {
#pragma GCC unroll 2
            for (int j = 0; j < nblk; j++)
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) {
                    s[j][v] = row_pairs(sb[j] + g * 16, v);
                    z[j][v] = row_pairs(zb[j] + g * 16, v);
                }
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
                    if (panel) { /* nblk == 1 */
                        lo = _mm256_load_ps(panel + (t * 8 + 2 * v) * 8);
                        hi = _mm256_load_ps(panel + (t * 8 + 2 * v + 1) * 8);
                    } else {
                        widen_rows4(wb[j] + t * 32, v, &lo, &hi);
                        if (deq) {
                            lo = _mm256_mul_ps(_mm256_sub_ps(lo, z[j][v]), s[j][v]);
                            hi = _mm256_mul_ps(_mm256_sub_ps(hi, z[j][v]), s[j][v]);
                        }
                    }
#pragma GCC unroll 2
                    for (int i = 0; i < mt; i++) {
                        acc[i][j][v] = _mm256_fmadd_ps(lo, xl[i], acc[i][j][v]);
                        acc[i][j][v] = _mm256_fmadd_ps(hi, xh[i], acc[i][j][v]);
                    }
                }
        }
        if (!deq) {
#pragma GCC unroll 2
            for (int j = 0; j < nblk; j++)
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) {
                    const __m256 sv = row_pairs(sb[j] + g * 16, v);
#pragma GCC unroll 2
                    for (int i = 0; i < mt; i++) {
                        o[i][j][v] = _mm256_fmadd_ps(sv, acc[i][j][v], o[i][j][v]);
                        acc[i][j][v] = _mm256_setzero_ps();
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
                const __m256 *r = deq ? acc[i][j] : o[i][j];
                /* (rows 0,1,4,5 | 2,3,6,7) of the half block -> rows 0..7 */
                __m256 v = _mm256_castpd_ps(_mm256_permute4x64_pd(
                    _mm256_castps_pd(_mm256_hadd_ps(r[2 * h], r[2 * h + 1])), 0xD8));
                if (!deq) { /* the zero points' share: sum_g (s_g z_g) * xsum_g */
                    __m256 c = _mm256_setzero_ps();
                    for (int64_t g = 0; g < groups; g++) {
                        const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(sb[j] + g * 16 + 8 * h),
                                                        _mm256_loadu_ps(zb[j] + g * 16 + 8 * h));
                        c = _mm256_fmadd_ps(sz, _mm256_set1_ps(xsum[(m0 + i) * groups + g]), c);
                    }
                    v = _mm256_sub_ps(v, c);
                }
                store8(v, out, m0 + i, os, (b0 + j) * 16 + 8 * h, n, NULL, bias, out_f32);
            }
}

#define TILE_FN(mt, nblk, deq, from_panel)                                             \
    static __attribute__((noinline)) void tile_##mt##x##nblk##_##deq##from_panel(      \
            const float *xf, int64_t xs, const float *xsum, int64_t groups, int64_t gq,\
            int64_t m0, const uint8_t *const wb[2], const float *panel,                \
            const float *const sb[2], const float *const zb[2], int64_t n, int64_t b0, \
            const float *bias, void *out, int64_t os, int out_f32) {                   \
        tile(xf, xs, xsum, groups, gq, m0, mt, nblk, deq, wb, from_panel ? panel : NULL,\
             sb, zb, n, b0, bias, out, os, out_f32);                                   \
    }
TILE_FN(1, 2, 0, 0) TILE_FN(1, 1, 0, 0) TILE_FN(2, 1, 0, 0)
TILE_FN(1, 2, 1, 0) TILE_FN(1, 1, 1, 0) TILE_FN(2, 1, 1, 0)
TILE_FN(1, 1, 0, 1) TILE_FN(2, 1, 0, 1) TILE_FN(1, 1, 1, 1) TILE_FN(2, 1, 1, 1)

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t,
                        const uint8_t *const[2], const float *, const float *const[2],
                        const float *const[2], int64_t, int64_t, const float *, void *,
                        int64_t, int);

/* From PANEL_ROWS rows on, a block is widened once per call into a float32 panel
 * holding exactly the vectors the tiles would widen in registers (raw q, or
 * (q - z) * s for float32 activations), in loop order; every row tile then reads it
 * from cache (widening in the loop made batch 64 1.75x slower than bf16's panels). */
#define PANEL_ROWS 4

static void build_panel(const uint8_t *wb, const float *sb, const float *zb, int64_t groups,
                        int64_t gq, int deq, float *panel) {
    for (int64_t g = 0; g < groups; g++)
        for (int64_t t = g * gq; t < (g + 1) * gq; t++)
            for (int v = 0; v < 4; v++) {
                __m256 lo, hi;
                widen_rows4(wb + t * 32, v, &lo, &hi);
                if (deq) {
                    const __m256 s = row_pairs(sb + g * 16, v), z = row_pairs(zb + g * 16, v);
                    lo = _mm256_mul_ps(_mm256_sub_ps(lo, z), s);
                    hi = _mm256_mul_ps(_mm256_sub_ps(hi, z), s);
                }
                _mm256_store_ps(panel + (t * 8 + 2 * v) * 8, lo);
                _mm256_store_ps(panel + (t * 8 + 2 * v + 1) * 8, hi);
            }
}

/* out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), m < m_total, n < N: gemm_int4.c's
 * contract (cblk, its bf16 offset table, is not used here). Returns -1 if the float32
 * copy of bf16 activations or a panel could not be allocated. */
int gemm_int4(const void *x, int64_t xs, int64_t m_total, int x_f32, const uint8_t *packed,
              const float *sblk, const float *zblk, const float *cblk, int64_t n, int64_t k,
              int64_t group, const float *bias, void *out, int64_t os, int out_f32) {
    (void)cblk;
    const int64_t nb = (n + 15) / 16, groups = k / group, gq = group / 4;
    const int64_t bstride = (k / 4) * 32, tstride = groups * 16;
    const float *xf = x;
    float *widened = NULL, *xsum = NULL;
    if (!x_f32) {
        widened = widen_rows((const uint16_t *)x, xs, m_total, k);
        xsum = malloc(sizeof(float) * (size_t)(m_total * groups + 1));
        if (!widened || !xsum) {
            free(widened);
            free(xsum);
            return -1;
        }
        xf = widened;
        xs = k;
        for (int64_t r = 0; r < m_total; r++)
            for (int64_t g = 0; g < groups; g++) {
                float sum = 0.0f;
                for (int64_t c = 0; c < group; c++) sum += xf[r * k + g * group + c];
                xsum[r * groups + g] = sum;
            }
    }
    /* [from a panel][float32 activations][rows] */
    static const tile_fn tiles[2][2][MT + 1] = {
        {{NULL, tile_1x1_00, tile_2x1_00}, {NULL, tile_1x1_10, tile_2x1_10}},
        {{NULL, tile_1x1_01, tile_2x1_01}, {NULL, tile_1x1_11, tile_2x1_11}}};
    const tile_fn pair_tile = x_f32 ? tile_1x2_10 : tile_1x2_00;
    const int use_panel = m_total >= PANEL_ROWS;
    int failed = 0;
#pragma omp parallel reduction(|:failed)
    {
        float *panel = use_panel ? aligned_alloc(32, (size_t)k * 16 * sizeof(float)) : NULL;
        if (use_panel && !panel) failed = 1;
#pragma omp for schedule(static)
        for (int64_t bp = 0; bp < (nb + 1) / 2; bp++) {
            const int64_t b0 = 2 * bp;
            const int two = b0 + 1 < nb;
            const uint8_t *wb[2] = {packed + b0 * bstride, packed + (b0 + two) * bstride};
            const float *sb[2] = {sblk + b0 * tstride, sblk + (b0 + two) * tstride};
            const float *zb[2] = {zblk + b0 * tstride, zblk + (b0 + two) * tstride};
            if (m_total == 1 && two) {
                pair_tile(xf, xs, xsum, groups, gq, 0, wb, NULL, sb, zb, n, b0, bias, out, os,
                          out_f32);
                continue;
            }
            if (use_panel && !panel) continue;
            for (int j = 0; j <= two; j++) {
                const uint8_t *w1[2] = {wb[j], wb[j]};
                const float *s1[2] = {sb[j], sb[j]}, *z1[2] = {zb[j], zb[j]};
                if (panel) build_panel(wb[j], sb[j], zb[j], groups, gq, x_f32, panel);
                for (int64_t m0 = 0; m0 < m_total; m0 += MT) {
                    const int64_t left = m_total - m0 < MT ? m_total - m0 : MT;
                    tiles[use_panel][x_f32][left](xf, xs, xsum, groups, gq, m0, w1, panel, s1,
                                                  z1, n, b0 + j, bias, out, os, out_f32);
                }
            }
        }
        free(panel);
    }
    free(widened);
    free(xsum);
    return failed ? -1 : 0;
}
