/*
 * The CPU platform's GEMM kernels for x86 CPUs with AVX2 and FMA but without
 * AVX512-BF16 (Zen 2/3, most client Intel parts): the same entry points and the
 * same packed weight layouts as gemm_bf16.c (see backplane/platforms/cpu/linear.py),
 * with float32 FMAs instead of bf16 / VNNI dot products. Without these, bf16
 * linears on such CPUs fall to torch's scalar bf16 matmul (~18 GFLOP/s here).
 *
 * bf16 weights: a packed column pair is 16 rows x 2 columns; 8 rows of it are one
 * 256-bit load whose 32-bit lanes each hold one row's (column 2p, column 2p+1)
 * bf16 pair. A bf16 number is the upper half of a float32, so a shift (column 2p)
 * and a mask (column 2p+1) give both columns as float32 with no shuffles, and two
 * FMAs with the activations' two broadcast columns accumulate 8 outputs. Each
 * weight byte is read once per call; activations are widened to float32 once.
 *
 * int8 weights, bf16 activations (W8A16): the same loop, the pair widened from
 * two bytes per lane by sign-extending shifts; the row scale is applied at the end.
 * fp8 (e4m3) weights the same way, each byte placed as fp16 bits and converted (F16C).
 *
 * W8A8: int8 weights (signed: no +128 offset, unlike the VNNI kernel) in 16-row
 * blocks of 4 consecutive columns, activations quantized per 32-column block.
 * vpmaddubsw multiplies unsigned by signed bytes, so |w| is multiplied by x with
 * w's sign moved onto it (llama.cpp's trick: |w| <= 128 and |x| <= 127 keep the
 * pairwise int16 sums from saturating); vpmaddwd sums the pairs into int32.
 *
 * Accumulation is in float32 (int32 within a W8A8 block); the result is rounded
 * to bf16 (round to nearest even) or written as float32 for the logits.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_common.h"
#include "common.h"
#include "gemm_packing.h"

/* Activation rows per small tile (3 rows x 2 half blocks = 6 accumulators). */
#define MT 3

/* x [M, K] bf16 (row stride xs) -> float32 [M, K], malloc'ed (NULL if out of memory). */
static float *widen_rows(const uint16_t *x, int64_t xs, int64_t m, int64_t k) {
    float *xf = malloc((size_t)(m * k) * sizeof(float));
    if (!xf) return NULL;
#pragma omp parallel for schedule(static) if (m * k > 65536)
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < k; j++) xf[r * k + j] = bf16_to_float(x[r * xs + j]);
    return xf;
}

/* 8 rows of one packed column pair -> (column 2p, column 2p+1) as float32. */
static inline __attribute__((always_inline)) void widen_bf16(const uint16_t *src, __m256 *lo,
                                                             __m256 *hi) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)src);
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline __attribute__((always_inline)) void widen_w8(const int8_t *src, __m256 *lo,
                                                           __m256 *hi) {
    /* each 32-bit lane: one row's (low: column 2p, high: column 2p+1) bytes, sign-extended */
    const __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)src));
    *lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
    *hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 8));
}

/* e4m3 bytes (fp8 weights, gemm_fp8.c's layout and scale convention): each 16-bit
 * lane holds one row's (column 2p, column 2p+1) bytes; a byte s.eeee.mmm placed as
 * the fp16 bits s.0eeee.mmm0000000 is its value times 2^-8 (subnormals included),
 * which F16C's vcvtph2ps widens exactly; the 2^8 is in the row scales. */
static inline __attribute__((always_inline)) __m128i e4m3_as_fp16(__m128i hi_bytes) {
    /* the byte in the upper half of each 16-bit lane: sign stays, the rest moves down 1 */
    return _mm_or_si128(_mm_and_si128(hi_bytes, _mm_set1_epi16((short)0x8000)),
                        _mm_and_si128(_mm_srli_epi16(hi_bytes, 1), _mm_set1_epi16(0x3F80)));
}

static inline __attribute__((always_inline)) void widen_fp8(const uint8_t *src, __m256 *lo,
                                                            __m256 *hi) {
    const __m128i v = _mm_loadu_si128((const __m128i *)src);
    *lo = _mm256_cvtph_ps(e4m3_as_fp16(_mm_slli_epi16(v, 8)));
    *hi = _mm256_cvtph_ps(e4m3_as_fp16(v));
}

/* Batch 1 against GEMV_BLOCKS 16-row blocks: one FMA chain per half block (8 in
 * flight), each summing the columns in order (column 2p, then 2p+1) exactly as
 * the row tiles and the panels do, so a row's result does not depend on how many
 * rows share the call (speculative verification and batched decoding must pick
 * the same greedy token as decoding alone). Splitting a row's columns over two
 * chains would be as fast but would round differently. */
#define GEMV_BLOCKS 4

/* Batch 1 over every group of GEMV_BLOCKS 16-row blocks (k * 16 weights of WTYPE each)
 * in parallel: TILE(..., w, v) fills v[2 * GEMV_BLOCKS] (8 outputs each) from the
 * blocks w, and the outputs of the blocks that exist are stored. A group's missing
 * last blocks re-read its first rather than past the end. */
#define GEMV_OVER_GROUPS(WTYPE, packed, nb, k, out, os, n, scales, bias, out_f32, TILE, ...) \
    do {                                                                               \
        const int64_t ng_ = ((nb) + GEMV_BLOCKS - 1) / GEMV_BLOCKS;                    \
        _Pragma("omp parallel for schedule(static)")                                   \
        for (int64_t g = 0; g < ng_; g++) {                                            \
            const int64_t b0 = g * GEMV_BLOCKS;                                        \
            const int have = (nb) - b0 < GEMV_BLOCKS ? (int)((nb) - b0) : GEMV_BLOCKS; \
            const WTYPE *w[GEMV_BLOCKS];                                               \
            for (int j = 0; j < GEMV_BLOCKS; j++)                                      \
                w[j] = (packed) + (b0 + (j < have ? j : 0)) * (k) * 16;                \
            __m256 v[2 * GEMV_BLOCKS];                                                 \
            TILE(__VA_ARGS__, w, v);                                                   \
            for (int j = 0; j < 2 * have; j++)                                         \
                store8(v[j], out, 0, os, b0 * 16 + 8 * j, n, scales, bias, out_f32);   \
        }                                                                              \
    } while (0)
#define GEMV_STEP(WIDEN, i)                                                                 \
    WIDEN(w[i / 2] + p * 32 + (i % 2) * 16, &lo, &hi);                                 \
    a##i = _mm256_fmadd_ps(hi, x1, _mm256_fmadd_ps(lo, x0, a##i));
#define DEFINE_AVX2_GEMV_TILE(NAME, WTYPE, WIDEN)                                      \
    static inline __attribute__((always_inline)) void NAME(                            \
            const float *xr, int64_t k, const WTYPE *const w[GEMV_BLOCKS],             \
            __m256 out[2 * GEMV_BLOCKS]) {                                             \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                    \
        __m256 a4 = a0, a5 = a0, a6 = a0, a7 = a0;                                     \
        for (int64_t p = 0; p < k / 2; p++) {                                          \
            const __m256 x0 = _mm256_broadcast_ss(xr + 2 * p);                         \
            const __m256 x1 = _mm256_broadcast_ss(xr + 2 * p + 1);                     \
            __m256 lo, hi;                                                             \
            GEMV_STEP(WIDEN, 0) GEMV_STEP(WIDEN, 1) GEMV_STEP(WIDEN, 2) GEMV_STEP(WIDEN, 3)\
            GEMV_STEP(WIDEN, 4) GEMV_STEP(WIDEN, 5) GEMV_STEP(WIDEN, 6) GEMV_STEP(WIDEN, 7)\
        }                                                                              \
        out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;                            \
        out[4] = a4; out[5] = a5; out[6] = a6; out[7] = a7;                            \
    }

/* mt rows (a compile-time constant at each call, <= MT) against one 16-row block:
 * 2 x mt accumulators; the block stays in cache while the row tiles pass over it. */
#define DEFINE_AVX2_ROWS_TILE(NAME, WTYPE, WIDEN)                                      \
    static inline __attribute__((always_inline)) void NAME(                            \
            const float *xf, int64_t k, int64_t m0, const int mt, const WTYPE *w,      \
            int64_t n, int64_t b, const float *scales, const float *bias, void *out,   \
            int64_t os, int out_f32) {                                                 \
        __m256 acc[MT][2];                                                             \
        _Pragma("GCC unroll 4") for (int i = 0; i < mt; i++)                           \
            acc[i][0] = acc[i][1] = _mm256_setzero_ps();                               \
        for (int64_t p = 0; p < k / 2; p++) {                                          \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {                      \
                __m256 lo, hi;                                                         \
                WIDEN(w + p * 32 + h * 16, &lo, &hi);                                  \
                _Pragma("GCC unroll 4") for (int i = 0; i < mt; i++) {                 \
                    const float *xr = xf + (m0 + i) * k + 2 * p;                       \
                    acc[i][h] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(xr), acc[i][h]); \
                    acc[i][h] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(xr + 1),       \
                                                acc[i][h]);                            \
                }                                                                      \
            }                                                                          \
        }                                                                              \
        _Pragma("GCC unroll 4") for (int i = 0; i < mt; i++) {                         \
            store8(acc[i][0], out, m0 + i, os, b * 16, n, scales, bias, out_f32);      \
            store8(acc[i][1], out, m0 + i, os, b * 16 + 8, n, scales, bias, out_f32);  \
        }                                                                              \
    }

/* From PANEL_ROWS activation rows on, each 16-row block is first widened to a
 * float32 panel [K][16] (column j's 16 rows side by side, in cache) and the rows
 * go through the classic 6 x 16 FMA micro-kernel: per column, 2 panel loads and 6
 * broadcasts feed 12 FMAs, and the widening is paid once per block, not per row
 * tile. (Widening in the loop, as the small tiles do, held batch 64 at ~55% of
 * the FMA peak; float32 sgemm reaches ~75% here.) */
#define PANEL_ROWS 4
#define PANEL_MT 6

/* Named accumulators, not an array: gcc keeps an array of 12 vectors on the stack. */
#define PANEL_ROW(i)                                                                   \
    if (mt > i) {                                                                      \
        const __m256 xb = _mm256_broadcast_ss(xf + (m0 + i) * k + j);                  \
        a##i = _mm256_fmadd_ps(w0, xb, a##i);                                          \
        c##i = _mm256_fmadd_ps(w1, xb, c##i);                                          \
    }
#define PANEL_STORE(i)                                                                 \
    if (mt > i) {                                                                      \
        store8(a##i, out, m0 + i, os, b * 16, n, scales, bias, out_f32);               \
        store8(c##i, out, m0 + i, os, b * 16 + 8, n, scales, bias, out_f32);           \
    }

static inline __attribute__((always_inline)) void panel_tile(
        const float *xf, int64_t k, int64_t m0, const int mt, const float *panel, int64_t n,
        int64_t b, const float *scales, const float *bias, void *out, int64_t os,
        int out_f32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0;
    for (int64_t j = 0; j < k; j++) {
        const __m256 w0 = _mm256_load_ps(panel + j * 16), w1 = _mm256_load_ps(panel + j * 16 + 8);
        PANEL_ROW(0) PANEL_ROW(1) PANEL_ROW(2) PANEL_ROW(3) PANEL_ROW(4) PANEL_ROW(5)
    }
    PANEL_STORE(0) PANEL_STORE(1) PANEL_STORE(2) PANEL_STORE(3) PANEL_STORE(4) PANEL_STORE(5)
}

/* One function per row count: inlined into a single switch, gcc spilled the
 * accumulators to the stack in every case. */
#define PANEL_TILE_FN(mt)                                                              \
    static __attribute__((noinline)) void panel_tile_##mt(                             \
            const float *xf, int64_t k, int64_t m0, const float *panel, int64_t n,     \
            int64_t b, const float *scales, const float *bias, void *out, int64_t os,  \
            int out_f32) {                                                             \
        panel_tile(xf, k, m0, mt, panel, n, b, scales, bias, out, os, out_f32);        \
    }
PANEL_TILE_FN(1) PANEL_TILE_FN(2) PANEL_TILE_FN(3)
PANEL_TILE_FN(4) PANEL_TILE_FN(5) PANEL_TILE_FN(6)

static void panel_rows(const float *xf, int64_t m_total, int64_t k, const float *panel,
                       int64_t n, int64_t b, const float *scales, const float *bias, void *out,
                       int64_t os, int out_f32) {
    static void (*const tiles[PANEL_MT + 1])(const float *, int64_t, int64_t, const float *,
                                             int64_t, int64_t, const float *, const float *,
                                             void *, int64_t, int) = {
        NULL, panel_tile_1, panel_tile_2, panel_tile_3, panel_tile_4, panel_tile_5,
        panel_tile_6};
    for (int64_t m0 = 0; m0 < m_total; m0 += PANEL_MT)
        tiles[m_total - m0 < PANEL_MT ? m_total - m0 : PANEL_MT](xf, k, m0, panel, n, b,
                                                                   scales, bias, out, os,
                                                                   out_f32);
}

/* The GEMM over a pair-layout weight (bf16 or int8): batch 1 takes GEMV_BLOCKS
 * blocks per tile, 2..PANEL_ROWS-1 rows row tiles against one block at a time, more rows the
 * float32 panels. Returns -1 if a panel could not be allocated. */
#define DEFINE_AVX2_GEMM(NAME, WTYPE, WIDEN)                                           \
    DEFINE_AVX2_GEMV_TILE(NAME##_gemv_tile, WTYPE, WIDEN)                              \
    DEFINE_AVX2_ROWS_TILE(NAME##_rows_tile, WTYPE, WIDEN)                              \
    static void NAME##_panel(const WTYPE *w, int64_t k, float *panel) {                \
        for (int64_t p = 0; p < k / 2; p++) {                                          \
            __m256 lo, hi;                                                             \
            WIDEN(w + p * 32, &lo, &hi);                                               \
            _mm256_store_ps(panel + 2 * p * 16, lo);                                   \
            _mm256_store_ps(panel + (2 * p + 1) * 16, hi);                             \
            WIDEN(w + p * 32 + 16, &lo, &hi);                                          \
            _mm256_store_ps(panel + 2 * p * 16 + 8, lo);                               \
            _mm256_store_ps(panel + (2 * p + 1) * 16 + 8, hi);                         \
        }                                                                              \
    }                                                                                  \
    static int NAME##_run(const float *xf, int64_t m_total, const WTYPE *packed,       \
                          const float *scales, int64_t n, int64_t k, const float *bias, \
                          void *out, int64_t os, int out_f32) {                        \
        const int64_t nb = (n + 15) / 16, npairs = (nb + 1) / 2;                       \
        int failed = 0;                                                                \
        if (m_total == 1) {                                                            \
            GEMV_OVER_GROUPS(WTYPE, packed, nb, k, out, os, n, scales, bias, out_f32,  \
                             NAME##_gemv_tile, xf, k);                                 \
            return 0;                                                                  \
        }                                                                              \
        _Pragma("omp parallel reduction(|:failed)")                                    \
        {                                                                              \
            float *panel = NULL;                                                       \
            if (m_total >= PANEL_ROWS)                                                 \
                panel = aligned_alloc(64, (size_t)k * 16 * sizeof(float));             \
            if (m_total >= PANEL_ROWS && !panel) failed = 1;                           \
            _Pragma("omp for schedule(static)")                                        \
            for (int64_t bp = 0; bp < npairs; bp++) {                                  \
                const int64_t b0 = 2 * bp;                                             \
                const int two = b0 + 1 < nb;                                           \
                const WTYPE *w0 = packed + b0 * (k / 2) * 32;                          \
                for (int b = 0; b <= two; b++) {                                       \
                    const WTYPE *w = w0 + b * (k / 2) * 32;                            \
                    if (panel) {                                                       \
                        NAME##_panel(w, k, panel);                                     \
                        panel_rows(xf, m_total, k, panel, n, b0 + b, scales, bias, out, os, \
                                   out_f32);                                           \
                    } else if (m_total < PANEL_ROWS) {                                 \
                        if (m_total == 2)                                              \
                            NAME##_rows_tile(xf, k, 0, 2, w, n, b0 + b, scales, bias, out, os, out_f32); \
                        else                                                           \
                            NAME##_rows_tile(xf, k, 0, 3, w, n, b0 + b, scales, bias, out, os, out_f32); \
                    }                                                                  \
                }                                                                      \
            }                                                                          \
            free(panel);                                                               \
        }                                                                              \
        return failed ? -1 : 0;                                                        \
    }

DEFINE_AVX2_GEMM(gemm_bf16, uint16_t, widen_bf16)
DEFINE_AVX2_GEMM(gemm_w8, int8_t, widen_w8)
DEFINE_AVX2_GEMM(gemm_fp8, uint8_t, widen_fp8)

/* out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < m_total, n < N.
 * x: [M, K] bf16 with row stride xs (K even); packed: pack_bf16's layout;
 * bias: float32 or NULL; out: [M, N] bf16, or float32 if out_f32, row stride os.
 * Returns 0, or -1 when the float32 copy of x or a panel could not be allocated. */
int gemm_bf16(const uint16_t *x, int64_t xs, int64_t m_total, const uint16_t *packed,
              int64_t n, int64_t k, const float *bias, void *out, int64_t os, int out_f32) {
    float *xf = widen_rows(x, xs, m_total, k);
    if (!xf) return -1;
    const int status = gemm_bf16_run(xf, m_total, packed, NULL, n, k, bias, out, os, out_f32);
    free(xf);
    return status;
}

/* gemm_bf16 for quantized weights with one scale per output row:
 * out = x @ (scales[:, None] * W).T (+ bias), W widened from WTYPE in the tiles. */
#define DEFINE_SCALED_ENTRY(NAME, WTYPE)                                               \
    int NAME(const uint16_t *x, int64_t xs, int64_t m_total, const WTYPE *packed,      \
             const float *scales, int64_t n, int64_t k, const float *bias, void *out,  \
             int64_t os, int out_f32) {                                                \
        float *xf = widen_rows(x, xs, m_total, k);                                     \
        if (!xf) return -1;                                                            \
        const int status = NAME##_run(xf, m_total, packed, scales, n, k, bias, out, os,\
                                      out_f32);                                        \
        free(xf);                                                                      \
        return status;                                                                 \
    }
/* int8 weights (pack_w8_from_bf16's layout) */
DEFINE_SCALED_ENTRY(gemm_w8, int8_t)
/* e4m3 weights (fp8.py's pack_fp8 layout, scales times 2^8, as gemm_fp8.c takes them) */
DEFINE_SCALED_ENTRY(gemm_fp8, uint8_t)

/* ------------------------------------------------------------------------
 * W8A8: signed int8 weights in 16-row blocks of column quads (64 bytes each: row
 * r's 4 bytes at 4r), activations from quantize_activations (gemm_packing.h).
 * ------------------------------------------------------------------------ */

/* Weights are stored without an offset here (the VNNI kernel stores them +128). */
int w8a8_weight_offset(void) { return 0; }

void pack_w8a8_from_bf16(const uint16_t *w, int64_t n, int64_t k, uint8_t *packed,
                         float *scales) {
    pack_int8(w, n, k, 4, 0, packed, scales);
}

/* Activation columns 4 q4 .. 4 q4 + 3 of row x, in every 32-bit lane. */
static inline __attribute__((always_inline)) __m256i quad_at(const int8_t *x, int64_t q4) {
    int32_t quad;
    memcpy(&quad, x + 4 * q4, sizeof quad);
    return _mm256_set1_epi32(quad);
}

/* w . x for one 32-byte weight vector (8 rows x 4 columns) and a broadcast quad of x,
 * added to the int32 accumulator s: |w| x (x with w's sign), pairwise in int16, then
 * the pairs summed into int32. aw = |w| is shared by every row. */
static inline __attribute__((always_inline)) __m256i dot_quads(__m256i s, __m256i aw, __m256i w,
                                                               __m256i xb) {
    const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb, w));
    return _mm256_add_epi32(s, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* mt (1 or 2, a compile-time constant) rows against one 16-row block: four half-block
 * "lanes" (row 0 halves 0-1, row 1 halves 0-1), each an int32 sum within an activation
 * block and a float32 sum across them. Named variables: gcc kept arrays of them on
 * the stack. */
static inline __attribute__((always_inline)) void w8a8_body(
        const int8_t *xq, const float *bscale, int64_t k, int64_t m0, const int mt,
        const int8_t *w0, int64_t n, int64_t b0, const float *scales, const float *bias,
        void *out, int64_t os, int out_f32) {
    const int64_t kb = k / QB;
    const int8_t *x0 = xq + m0 * k, *x1 = xq + (m0 + (mt > 1)) * k;
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t blk = 0; blk < kb; blk++) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
#pragma GCC unroll 8
        for (int q = 0; q < QB / 4; q++) {
            const int64_t q4 = blk * (QB / 4) + q;
            const __m256i xa = quad_at(x0, q4);
            const __m256i wa = _mm256_loadu_si256((const __m256i *)(w0 + q4 * 64));
            const __m256i wb = _mm256_loadu_si256((const __m256i *)(w0 + q4 * 64 + 32));
            const __m256i aa = _mm256_abs_epi8(wa), ab = _mm256_abs_epi8(wb);
            s0 = dot_quads(s0, aa, wa, xa);
            s1 = dot_quads(s1, ab, wb, xa);
            if (mt == 2) {
                const __m256i xb = quad_at(x1, q4);
                s2 = dot_quads(s2, aa, wa, xb);
                s3 = dot_quads(s3, ab, wb, xb);
            }
        }
        const __m256 sa = _mm256_set1_ps(bscale[m0 * kb + blk]);
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), sa, f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), sa, f1);
        if (mt == 2) {
            const __m256 sb = _mm256_set1_ps(bscale[(m0 + 1) * kb + blk]);
            f2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), sb, f2);
            f3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s3), sb, f3);
        }
    }
    store8(f0, out, m0, os, b0 * 16, n, scales, bias, out_f32);
    store8(f1, out, m0, os, b0 * 16 + 8, n, scales, bias, out_f32);
    if (mt == 2) {
        store8(f2, out, m0 + 1, os, b0 * 16, n, scales, bias, out_f32);
        store8(f3, out, m0 + 1, os, b0 * 16 + 8, n, scales, bias, out_f32);
    }
}

#define W8A8_TILE_FN(mt)                                                               \
    static __attribute__((noinline)) void w8a8_tile_##mt(                              \
            const int8_t *xq, const float *bscale, int64_t k, int64_t m0,              \
            const int8_t *w0, int64_t n, int64_t b0, const float *scales,              \
            const float *bias, void *out, int64_t os, int out_f32) {                   \
        w8a8_body(xq, bscale, k, m0, mt, w0, n, b0, scales, bias, out, os, out_f32);   \
    }
W8A8_TILE_FN(1) W8A8_TILE_FN(2)

/* Batch 1 against GEMV_BLOCKS 16-row blocks at once: GEMV_BLOCKS weight streams in
 * flight instead of two (the memory system keeps more lines coming). Each half
 * block sums exactly as w8a8_body does (an int32 sum per activation block, then one
 * FMA per block in order), so a row's result does not depend on its batch. */
#define W8A8_GEMV_LANE(i)                                                              \
    {                                                                                  \
        const __m256i w =                                                              \
            _mm256_loadu_si256((const __m256i *)(wb[i / 2] + q4 * 64 + (i % 2) * 32));  \
        s##i = dot_quads(s##i, _mm256_abs_epi8(w), w, xa);                             \
    }
#define W8A8_GEMV_SCALE(i) f##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s##i), sa, f##i);
static __attribute__((noinline)) void w8a8_gemv_tile(
        const int8_t *xq, const float *bscale, int64_t k, const int8_t *const wb[GEMV_BLOCKS],
        __m256 out[2 * GEMV_BLOCKS]) {
    const int64_t kb = k / QB;
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0,
           f7 = f0;
    for (int64_t blk = 0; blk < kb; blk++) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0,
                s6 = s0, s7 = s0;
#pragma GCC unroll 8
        for (int q = 0; q < QB / 4; q++) {
            const int64_t q4 = blk * (QB / 4) + q;
            const __m256i xa = quad_at(xq, q4);
            W8A8_GEMV_LANE(0) W8A8_GEMV_LANE(1) W8A8_GEMV_LANE(2) W8A8_GEMV_LANE(3)
            W8A8_GEMV_LANE(4) W8A8_GEMV_LANE(5) W8A8_GEMV_LANE(6) W8A8_GEMV_LANE(7)
        }
        const __m256 sa = _mm256_set1_ps(bscale[blk]);
        W8A8_GEMV_SCALE(0) W8A8_GEMV_SCALE(1) W8A8_GEMV_SCALE(2) W8A8_GEMV_SCALE(3)
        W8A8_GEMV_SCALE(4) W8A8_GEMV_SCALE(5) W8A8_GEMV_SCALE(6) W8A8_GEMV_SCALE(7)
    }
    out[0] = f0; out[1] = f1; out[2] = f2; out[3] = f3;
    out[4] = f4; out[5] = f5; out[6] = f6; out[7] = f7;
}

/* out = dequant(xq) @ (scales[:, None] * Wq).T (+ bias); K a multiple of 32. bsum
 * (quantize_activations' offset correction) is not needed with signed weights. */
void gemm_w8a8(const int8_t *xq, const float *bscale, const int32_t *bsum, int64_t m_total,
               const void *packed_weights, const float *scales, int64_t n, int64_t k,
               const float *bias, void *out, int64_t os, int out_f32) {
    const int8_t *packed = packed_weights;
    (void)bsum;
    const int64_t nb = (n + 15) / 16, npairs = (nb + 1) / 2;
    if (m_total == 1) {
        GEMV_OVER_GROUPS(int8_t, packed, nb, k, out, os, n, scales, bias, out_f32,
                         w8a8_gemv_tile, xq, bscale, k);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < npairs; bp++) {
        const int64_t b0 = 2 * bp;
        const int8_t *w0 = packed + b0 * k * 16;
        const int two = b0 + 1 < nb;
        for (int b = 0; b <= two; b++) {
            const int8_t *w = w0 + b * k * 16;
            int64_t m0 = 0;
            for (; m0 + 2 <= m_total; m0 += 2)
                w8a8_tile_2(xq, bscale, k, m0, w, n, b0 + b, scales, bias, out, os, out_f32);
            if (m0 < m_total)
                w8a8_tile_1(xq, bscale, k, m0, w, n, b0 + b, scales, bias, out, os, out_f32);
        }
    }
}
