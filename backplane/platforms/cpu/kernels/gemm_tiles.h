/*
 * The GEMM building blocks the CPU kernels share (gemm_bf16.c, gemm_fp8.c,
 * gemm_int4.c): packed weights in blocks of 16 output rows with column pairs
 * interleaved (32 values per pair, the operand layout of vdpbf16ps), tiles of up
 * to 8 activation rows against two such blocks, and the masked store of one
 * 16-column output block.
 */
#ifndef BACKPLANE_GEMM_TILES_H
#define BACKPLANE_GEMM_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* Rows per tile: 2 x 8 accumulators + 2 weight vectors + 1 broadcast fit the
 * 32 zmm registers. */
#define TILE_ROWS 8

/* out_f32's value for float32 output written with non-temporal stores (see
 * gemm_bf16's logits): whole 64-byte lines straight to memory, no read for
 * ownership. The caller checks alignment and fences. */
#define F32_STREAMED 2

/* One 16-column output block of one row: + bias, then bf16 (round to nearest
 * even, as torch does) or float32. Columns past N are masked off. */
static inline __attribute__((always_inline)) void store_block(
        __m512 v, void *out, int64_t row, int64_t os, int64_t col, int64_t n,
        const float *bias, int out_f32) {
    const int64_t cols = n - col < 16 ? n - col : 16;
    const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
    if (out_f32 == F32_STREAMED && cols == 16) {
        _mm512_stream_ps((float *)out + row * os + col, v);
    } else if (out_f32) {
        _mm512_mask_storeu_ps((float *)out + row * os + col, mask, v);
    } else {
        const __m256bh h = _mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16((uint16_t *)out + row * os + col, mask, (__m256i)h);
    }
}

/* The output columns of scale row block col / 16, masked like store_block. */
static inline __attribute__((always_inline)) __m512 load_scales(const float *scales,
                                                                 int64_t col, int64_t n) {
    const int64_t cols = n - col < 16 ? n - col : 16;
    return _mm512_maskz_loadu_ps((__mmask16)((1u << cols) - 1u), scales + col);
}

/* A row-tile loop over m_total rows: TILE(mt) for tiles of up to 8 rows, mt a
 * compile-time constant in each call so that the tile's accumulators stay in
 * registers. */
#define ROW_TILES_8(TILE)                                                              \
    for (int64_t m0 = 0; m0 < m_total; m0 += 8) {                                      \
        const int64_t left = m_total - m0;                                             \
        switch (left < 8 ? left : 8) {                                                 \
        case 1: TILE(1); break; case 2: TILE(2); break; case 3: TILE(3); break;        \
        case 4: TILE(4); break; case 5: TILE(5); break; case 6: TILE(6); break;        \
        case 7: TILE(7); break; default: TILE(8); break;                               \
        }                                                                              \
    }

/* A row-tile loop calling FN(x, xs, m0, mt, ...) (FN: a tile function). */
#define ROW_TILES_8_FN(FN, ...)                                                        \
    for (int64_t m0 = 0; m0 < m_total; m0 += 8) {                                      \
        const int64_t left = m_total - m0;                                             \
        switch (left < 8 ? left : 8) {                                                 \
        case 1: FN(x, xs, m0, 1, __VA_ARGS__); break;                                  \
        case 2: FN(x, xs, m0, 2, __VA_ARGS__); break;                                  \
        case 3: FN(x, xs, m0, 3, __VA_ARGS__); break;                                  \
        case 4: FN(x, xs, m0, 4, __VA_ARGS__); break;                                  \
        case 5: FN(x, xs, m0, 5, __VA_ARGS__); break;                                  \
        case 6: FN(x, xs, m0, 6, __VA_ARGS__); break;                                  \
        case 7: FN(x, xs, m0, 7, __VA_ARGS__); break;                                  \
        default: FN(x, xs, m0, 8, __VA_ARGS__); break;                                 \
        }                                                                              \
    }

/* The accumulation of a tile: rows m0..m0+mt of x against two 16-row weight blocks
 * w0, w1 whose column pair p (32 values at w + 32 p) becomes a bf16 vector by
 * LOAD(ptr), into acc0[i] and acc1[i] for row m0 + i. The first NPF iterations also
 * prefetch one cache line at PF0 + 32 p and one at PF1 + 32 p into L2 (the next work
 * item's weights: see next_block_prefetch; NPF 0 prefetches nothing). */
#define TILE_ACCUMULATE(LOAD, PF0, PF1, NPF)                                           \
    __m512 acc0[TILE_ROWS], acc1[TILE_ROWS];                                           \
    const uint16_t *rows[TILE_ROWS];                                                   \
    _Pragma("GCC unroll 8")                                                            \
    for (int i = 0; i < mt; i++) {                                                     \
        acc0[i] = _mm512_setzero_ps();                                                 \
        acc1[i] = _mm512_setzero_ps();                                                 \
        rows[i] = x + (m0 + i) * xs;                                                   \
    }                                                                                  \
    for (int64_t p = 0; p < kp; p++) {                                                 \
        if (p < (NPF)) {                                                               \
            _mm_prefetch((const char *)((PF0) + p * 32), _MM_HINT_T1);                 \
            _mm_prefetch((const char *)((PF1) + p * 32), _MM_HINT_T1);                 \
        }                                                                              \
        const __m512bh a = LOAD(w0 + p * 32);                                          \
        const __m512bh c = LOAD(w1 + p * 32);                                          \
        _Pragma("GCC unroll 8")                                                        \
        for (int i = 0; i < mt; i++) {                                                 \
            int32_t pair;                                                              \
            memcpy(&pair, rows[i] + 2 * p, sizeof pair);                               \
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);                     \
            acc0[i] = _mm512_dpbf16_ps(acc0[i], a, xb);                                \
            acc1[i] = _mm512_dpbf16_ps(acc1[i], c, xb);                                \
        }                                                                              \
    }

/* The share of the next work item's two weight blocks (nw0, nw1: kp column pairs of
 * 64 bytes each, NULL if there is none) that the tile of rows m0.. of an m_total-row
 * call prefetches: the blocks split evenly over the call's tiles, so that they reach
 * L2 while this item's tiles compute instead of all at once when the next item's
 * first tile asks for them. A full tile reads 128 bytes of weights per 16 vdpbf16ps
 * (~27 GB/s a core on this project's Zen 4), more than the cores' share of DRAM
 * bandwidth, so a first tile fed from memory stalls: with weights too large for the
 * caches (every decode step) a batch-64 step's GEMMs ran at 300-370 GFLOP/s against
 * ~435 with the same weights cached. A one-tile call
 * (m_total <= 8) is a weight stream the hardware prefetcher already keeps at
 * bandwidth: it prefetches nothing. Sets *pf0, *pf1 and returns the line count. */
static inline int64_t next_block_prefetch(const uint16_t *nw0, const uint16_t *nw1,
                                          int64_t kp, int64_t m0, int64_t m_total,
                                          const uint16_t **pf0, const uint16_t **pf1) {
    const int64_t tiles = (m_total + TILE_ROWS - 1) / TILE_ROWS;
    *pf0 = nw0;
    *pf1 = nw1;
    if (!nw0 || tiles < 2) return 0;
    const int64_t share = (kp + tiles - 1) / tiles, start = (m0 / TILE_ROWS) * share;
    if (start >= kp) return 0;
    *pf0 = nw0 + start * 32;
    *pf1 = nw1 + start * 32;
    return kp - start < share ? kp - start : share;
}

/* The body of a tile: TILE_ACCUMULATE, then each output block's accumulators go
 * through SCALE(acc, block) before the store (w1's block b0 + 1 only if two).
 * TILE_BODY prefetches nothing. */
#define TILE_BODY_PF(LOAD, SCALE, PF0, PF1, NPF)                                       \
    TILE_ACCUMULATE(LOAD, PF0, PF1, NPF)                                               \
    for (int i = 0; i < mt; i++) {                                                     \
        store_block(SCALE(acc0[i], b0), out, m0 + i, os, b0 * 16, n, bias, out_f32);   \
        if (two)                                                                       \
            store_block(SCALE(acc1[i], b0 + 1), out, m0 + i, os, b0 * 16 + 16, n,      \
                        bias, out_f32);                                                \
    }

#define TILE_BODY(LOAD, SCALE) TILE_BODY_PF(LOAD, SCALE, w0, w1, 0)

#define BF16_PAIR(ptr) ((__m512bh)_mm512_loadu_si512(ptr))
#define UNSCALED(acc, block) (acc)
#define ROW_SCALED(acc, block) _mm512_mul_ps((acc), load_scales(scales, (block) * 16, n))

/* A tile of bf16 packed weights (gemm_bf16, and gemm_int4's dequantised blocks),
 * prefetching its share of the next work item's blocks nw0, nw1 (NULL: none) of an
 * m_total-row call. */
static inline __attribute__((always_inline)) void tile_bf16_weights(
        const uint16_t *x, int64_t xs, int64_t m0, const int mt, const uint16_t *w0,
        const uint16_t *w1, int two, int64_t kp, int64_t n, int64_t b0, const float *bias,
        void *out, int64_t os, int out_f32, const uint16_t *nw0, const uint16_t *nw1,
        int64_t m_total) {
    const uint16_t *pf0, *pf1;
    const int64_t npf = next_block_prefetch(nw0, nw1, kp, m0, m_total, &pf0, &pf1);
    TILE_BODY_PF(BF16_PAIR, UNSCALED, pf0, pf1, npf)
}

/* In a BACKPLANE_AMX build (gemm_amx.h included first), a widened GEMM's call on the
 * tiles when K allows it (the choice depends on the layer, never on the batch). */
#if BACKPLANE_AMX
#define WIDENED_ON_AMX()                                                               \
    if (k % AMX_K == 0)                                                                \
        return gemm_amx(x, xs, m_total, NULL, packed, scales, n, k, bias, out, os, out_f32)
#else
#define WIDENED_ON_AMX() (void)0
#endif

/* A GEMM over 8-bit weights (int8, fp8 e4m3) with one float32 scale per output row:
 * each 32-byte column pair is widened to 32 bf16 in registers by WIDEN(ptr) (a
 * function of the including file), and the row scales are applied once per output
 * block. Defines int NAME(x, xs, m_total, packed, scales, n, k, bias, out, os,
 * out_f32): out = x @ (scales[:, None] * widen(W)).T (+ bias); x [M, K] bf16 (K even);
 * out bf16, or float32 if out_f32; on AMX tiles in a BACKPLANE_AMX build (the
 * includer's AMX_WIDEN being WIDEN). Returns -1 if scratch memory could not be
 * allocated (AMX builds only). */
#define DEFINE_WIDENED_GEMM(NAME, WTYPE, WIDEN)                                        \
    static inline __attribute__((always_inline)) void NAME##_tile(                     \
            const uint16_t *x, int64_t xs, int64_t m0, const int mt, const WTYPE *w0,  \
            const WTYPE *w1, int two, int64_t kp, int64_t n, int64_t b0,               \
            const float *scales, const float *bias, void *out, int64_t os,             \
            int out_f32) {                                                             \
        TILE_BODY(WIDEN, ROW_SCALED)                                                   \
    }                                                                                  \
    int NAME(const uint16_t *x, int64_t xs, int64_t m_total, const WTYPE *packed,      \
             const float *scales, int64_t n, int64_t k, const float *bias, void *out,   \
             int64_t os, int out_f32) {                                                \
        WIDENED_ON_AMX();                                                              \
        const int64_t kp = k / 2, nb = (n + 15) / 16, npairs = (nb + 1) / 2;           \
        _Pragma("omp parallel for schedule(static)")                                   \
        for (int64_t bp = 0; bp < npairs; bp++) {                                      \
            const int64_t b0 = 2 * bp;                                                 \
            const int two = (b0 + 1) < nb;                                             \
            const WTYPE *w0 = packed + b0 * kp * 32;                                   \
            const WTYPE *w1 = two ? w0 + kp * 32 : w0;                                 \
            ROW_TILES_8_FN(NAME##_tile, w0, w1, two, kp, n, b0, scales, bias, out, os, \
                           out_f32)                                                    \
        }                                                                              \
        return 0;                                                                      \
    }

#endif
