/*
 * bfloat16 GEMM for the CPU platform's linear layers (see
 * backplane/platforms/cpu/linear.py), on AVX512-BF16's vdpbf16ps.
 *
 * The weight W [N, K] is packed once at load into blocks of 16 output rows:
 * for every pair of input columns (2p, 2p+1), the 16 rows' two values sit side
 * by side, 32 bf16 = one 512-bit vector. One vdpbf16ps with an activation pair
 * broadcast then accumulates 16 outputs at once, so no horizontal sums are
 * needed, and each block streams from memory exactly once per call: the
 * activation rows (up to 8 per tile) reuse a weight vector while it sits in a
 * register. At batch 1 that is what decoding needs, a weight stream at memory
 * bandwidth (1.4x oneDNN's prepacked GEMV on this project's 2-core Zen 4);
 * with many rows the same loop is compute-bound and matches oneDNN.
 *
 * Accumulation is in float32; the result is rounded to bf16 (round to nearest
 * even, as torch does) or written as float32 for the logits.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "gemm_packing.h"
#include "gemm_tiles.h"

/* ROW_TILES_8 (gemm_tiles.h) for the W8A8 kernel's tiles of up to 4 rows. */
#define ROW_TILES_4(TILE)                                                              \
    for (int64_t m0 = 0; m0 < m_total; m0 += 4) {                                      \
        const int64_t left = m_total - m0;                                             \
        switch (left < 4 ? left : 4) {                                                 \
        case 1: TILE(1); break; case 2: TILE(2); break; case 3: TILE(3); break;        \
        default: TILE(4); break;                                                       \
        }                                                                              \
    }

/* Batch 1 (decoding one sequence): one 16-row block per work item, so each thread
 * reads its share of the weights as one sequential stream instead of two interleaved
 * ones. The GEMV pass over the qwen2-0.5b shape's 97 layers (988 MB) took 0.80-0.95x
 * the time of the two-block tiles on this project's 2-core Zen 4 (medians of 15
 * alternated passes, in four runs); reading four blocks at once was slower than two,
 * and software prefetching slower still. The sums are the tile's (one accumulator per
 * block, column pairs in order), so a row's result does not depend on its batch. */
static void gemv_bf16_avx512(const uint16_t *x, const uint16_t *packed, int64_t n, int64_t k,
                             const float *bias, void *out, int out_f32) {
    const int64_t kp = k / 2, nb = (n + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const uint16_t *w = packed + b * kp * 32;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t p = 0; p < kp; p++) {
            int32_t pair;
            memcpy(&pair, x + 2 * p, sizeof pair);
            acc = _mm512_dpbf16_ps(acc, BF16_PAIR(w + p * 32),
                                   (__m512bh)_mm512_set1_epi32(pair));
        }
        store_block(acc, out, 0, 0, b * 16, n, bias, out_f32);
    }
}

static void gemm_bf16_avx512(const uint16_t *x, int64_t xs, int64_t m_total,
                             const uint16_t *packed, int64_t n, int64_t k, const float *bias,
                             void *out, int64_t os, int out_f32) {
    const int64_t kp = k / 2, nb = (n + 15) / 16, npairs = (nb + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < npairs; bp++) {
        const int64_t b0 = 2 * bp;
        const int two = (b0 + 1) < nb;
        const uint16_t *w0 = packed + b0 * kp * 32;
        const uint16_t *w1 = two ? w0 + kp * 32 : w0;
        /* The next pair's blocks (this thread's next item under the static schedule,
         * but for the last of its share); an odd last block is prefetched twice. */
        const uint16_t *nw0 = bp + 1 < npairs ? w0 + 2 * kp * 32 : NULL;
        const uint16_t *nw1 = nw0 && b0 + 3 < nb ? nw0 + kp * 32 : nw0;
        ROW_TILES_8_FN(tile_bf16_weights, w0, w1, two, kp, n, b0, bias, out, os, out_f32,
                       nw0, nw1, m_total)
    }
}

/* ------------------------------------------------------------------------
 * The gate/up projection of a gated MLP with its SiLU-and-mul fused into the
 * store: W = [gate (d rows) | up (d rows)] packed by pack_bf16 (d a multiple of
 * 16, so gate block b and up block b + d / 16 cover the same output columns).
 * A work item takes gate block b and up block b as its two weight blocks and
 * writes act[:, 16 b .. 16 b + 16) = bf16(bf16(silu(gate)) * up) directly: the
 * [m, 2 d] product is never written and read back, and the separate pass over it
 * (1.7% of a batch-64 decode step on the qwen2-0.5b shape) goes. The sums are
 * gemm_bf16's (each block's column pairs in order, rounded to bf16 after the bias)
 * and the activation is silu_and_mul_bf16's (common.h's silu_mul_ps16), so the
 * result is bit-identical to gemm_bf16 followed by silu_and_mul_bf16.
 * ------------------------------------------------------------------------ */

/* One 16-column block of act's row `row`: the gate and up sums + bias, each rounded
 * to bf16 as gemm_bf16 stores them, then the activation. */
static inline __attribute__((always_inline)) void store_silu_block(
        __m512 gate, __m512 up, uint16_t *act, int64_t row, int64_t os, int64_t col,
        int64_t d, const float *bias) {
    if (bias) {
        gate = _mm512_add_ps(gate, _mm512_loadu_ps(bias + col));
        up = _mm512_add_ps(up, _mm512_loadu_ps(bias + d + col));
    }
    const __m512 g = bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(gate));
    const __m512 u = bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(up));
    _mm256_storeu_si256((__m256i *)(act + row * os + col), silu_mul_ps16(g, u));
}

/* A tile's stores, out of line: inlined, the activation's dozen constants were
 * hoisted out of the row-tile loop and crowded the accumulators out of the registers
 * (a batch-64 decode step took 215-222 ms against 187-194 ms for the two steps). */
static __attribute__((noinline)) void store_silu_rows(
        const __m512 *gate, const __m512 *up, int mt, uint16_t *act, int64_t m0, int64_t os,
        int64_t col, int64_t d, const float *bias) {
    for (int i = 0; i < mt; i++) store_silu_block(gate[i], up[i], act, m0 + i, os, col, d, bias);
}

static inline __attribute__((always_inline)) void tile_bf16_silu(
        const uint16_t *x, int64_t xs, int64_t m0, const int mt, const uint16_t *w0,
        const uint16_t *w1, int64_t kp, int64_t d, int64_t b, const float *bias,
        uint16_t *act, int64_t os, int64_t m_total) {
    const uint16_t *pf0, *pf1;
    const int64_t npf = next_block_prefetch(b + 1 < d / 16 ? w0 + kp * 32 : NULL,
                                            w1 + kp * 32, kp, m0, m_total, &pf0, &pf1);
    TILE_ACCUMULATE(BF16_PAIR, pf0, pf1, npf)
    store_silu_rows(acc0, acc1, mt, act, m0, os, b * 16, d, bias);
}

/* act[m, d] = silu_and_mul(x @ W.T + bias) for W [2 d, K] packed by pack_bf16 (d a
 * multiple of 16, K even); x [M, K] bf16 with row stride xs, bias float32 [2 d] or
 * NULL, act bf16 with row stride os. Returns -1, computing nothing, for a d that is not
 * a multiple of 16 (linear.py offers the kernel only for layers where it is). Each
 * work item reads two weight streams, a gate and an up block: at batch 1, where the
 * GEMV reads one, that made a decode step 3 ms slower (decoder_layer_decode keeps the
 * two steps there). */
int gemm_bf16_silu(const uint16_t *x, int64_t xs, int64_t m_total, const uint16_t *packed,
                   int64_t d, int64_t k, const float *bias, uint16_t *act, int64_t os) {
    if (d % 16) return -1;
    const int64_t kp = k / 2, nb = d / 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const uint16_t *w0 = packed + b * kp * 32, *w1 = packed + (b + nb) * kp * 32;
        ROW_TILES_8_FN(tile_bf16_silu, w0, w1, kp, d, b, bias, act, os, m_total)
    }
    return 0;
}

/* ------------------------------------------------------------------------
 * int8 weights (W8A16): W [N, K] as int8 with one float32 scale per output row,
 * packed like the bf16 blocks (16 rows x K/2 column pairs, 32 int8 per pair
 * group). Each group is widened to bf16 in registers (int8 values are exact in
 * bf16) and fed to the same dot product; the row scale is applied once at the
 * end. Half the bytes of bf16 to stream per token.
 * ------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) __m512bh widen_w8(const int8_t *src) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)src);
    const __m512i lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes));
    const __m512i hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1));
    /* cvtne2ps_pbh(a, b) puts b in the low half: elements 0..15 from lo. */
    return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(hi), _mm512_cvtepi32_ps(lo));
}

#if BACKPLANE_AMX
#define AMX_WIDEN widen_w8
#include "gemm_amx.h"
#endif

/* gemm_w8: gemm_bf16 for int8 weights, out = x @ (scales[:, None] * Wq).T (+ bias). */
DEFINE_WIDENED_GEMM(gemm_w8, int8_t, widen_w8)

/* float32 outputs of at least this many bytes (a decode step's logits from ~14 rows
 * of a 151936-word vocabulary) are written with non-temporal stores: they outgrow
 * the caches before the sampler reads them, so caching them only costs a read for
 * ownership of every line. Head GEMM + argmax, qwen2-0.5b shape, Zen 4, alternated:
 * 16 rows -0.8 ms, 32 rows -2.5, 64 rows -3.4 / -3.7 (of ~55), 128 rows -8.5 / -10;
 * 4 and 8 rows (below the threshold) streamed were no faster. */
#ifndef STREAM_BYTES
#define STREAM_BYTES (8 << 20)
#endif

/* out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < m_total, n < N.
 * x: [M, K] bf16 with row stride xs (K even); packed: pack_bf16's layout;
 * bias: float32 or NULL; out: [M, N] bf16, or float32 if out_f32, row stride os.
 * Built with BACKPLANE_AMX=1, layers whose K is a multiple of 32 run on AMX tiles
 * (gemm_amx.h); the choice depends on the layer only, never on the batch. Large
 * float32 outputs are streamed (STREAM_BYTES), with the same values. Returns -1 if
 * scratch memory could not be allocated. */
int gemm_bf16(const uint16_t *x, int64_t xs, int64_t m_total, const uint16_t *packed,
              int64_t n, int64_t k, const float *bias, void *out, int64_t os, int out_f32) {
#if BACKPLANE_AMX
    if (k % AMX_K == 0)
        return gemm_amx(x, xs, m_total, packed, NULL, NULL, n, k, bias, out, os, out_f32);
#endif
    if (m_total == 1) {
        gemv_bf16_avx512(x, packed, n, k, bias, out, out_f32);
        return 0;
    }
    const int stream = out_f32 && m_total * n * 4 >= STREAM_BYTES &&
                       (uintptr_t)out % 64 == 0 && (os * 4) % 64 == 0;
    gemm_bf16_avx512(x, xs, m_total, packed, n, k, bias, out, os,
                     stream ? F32_STREAMED : out_f32);
    if (stream) _mm_sfence(); /* the streamed lines reach memory before the sampler reads */
    return 0;
}

/* ------------------------------------------------------------------------
 * W8A8 (dynamic activations): int8 weights, one scale per output row, and
 * activations quantized per token in blocks of 32 (one scale each, like
 * llama.cpp's Q8_0), multiplied with AVX512-VNNI's vpdpbusd (u8 x s8 -> s32).
 * Weights are stored offset by +128 (unsigned) in 16-row blocks of 4
 * consecutive columns (64 bytes per vector); the offset's contribution,
 * 128 x sum(x block), is subtracted per block before the block scale.
 * ------------------------------------------------------------------------ */

#define MT8 4   /* token rows per tile (integer + float accumulators fit the registers) */

/* Weights are stored +128 (vpdpbusd's unsigned operand); gemm_avx2.c stores them signed. */
int w8a8_weight_offset(void) { return 128; }

void pack_w8a8_from_bf16(const uint16_t *w, int64_t n, int64_t k, uint8_t *packed,
                         float *scales) {
    pack_int8(w, n, k, 4, 128, packed, scales);
}

static inline __attribute__((always_inline)) void tile_w8a8(
        const int8_t *xq, const float *bscale, const int32_t *bsum, int64_t k, int64_t m0,
        const int mt, const uint8_t *w0, const uint8_t *w1, const int two, int64_t n, int64_t b0,
        const float *scales, const float *bias, void *out, int64_t os, int out_f32) {
    const int64_t kb = k / QB;
    __m512 f0[MT8], f1[MT8];
#pragma GCC unroll 4
    for (int i = 0; i < mt; i++) { f0[i] = _mm512_setzero_ps(); f1[i] = _mm512_setzero_ps(); }
    for (int64_t b = 0; b < kb; b++) {
        __m512i s0[MT8], s1[MT8];
#pragma GCC unroll 4
        for (int i = 0; i < mt; i++) { s0[i] = _mm512_setzero_si512(); s1[i] = _mm512_setzero_si512(); }
#pragma GCC unroll 8
        for (int q = 0; q < QB / 4; q++) {
            const int64_t q4 = b * (QB / 4) + q;
            const __m512i a = _mm512_loadu_si512(w0 + q4 * 64);
            const __m512i c = two ? _mm512_loadu_si512(w1 + q4 * 64) : a;
#pragma GCC unroll 4
            for (int i = 0; i < mt; i++) {
                int32_t quad;
                memcpy(&quad, xq + (m0 + i) * k + 4 * q4, sizeof quad);
                const __m512i xb = _mm512_set1_epi32(quad);
                s0[i] = _mm512_dpbusd_epi32(s0[i], a, xb);
                if (two) s1[i] = _mm512_dpbusd_epi32(s1[i], c, xb);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < mt; i++) {
            const __m512i corr = _mm512_set1_epi32(bsum[(m0 + i) * kb + b]);
            const __m512 sc = _mm512_set1_ps(bscale[(m0 + i) * kb + b]);
            f0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s0[i], corr)), sc, f0[i]);
            if (two)
                f1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s1[i], corr)), sc,
                                        f1[i]);
        }
    }
    const __m512 w0s = load_scales(scales, b0 * 16, n);
    const __m512 w1s = two ? load_scales(scales, b0 * 16 + 16, n) : w0s;
    for (int i = 0; i < mt; i++) {
        store_block(_mm512_mul_ps(f0[i], w0s), out, m0 + i, os, b0 * 16, n, bias, out_f32);
        if (two)
            store_block(_mm512_mul_ps(f1[i], w1s), out, m0 + i, os, b0 * 16 + 16, n, bias,
                        out_f32);
    }
}

/* out = dequant(xq) @ (scales[:, None] * Wq).T (+ bias); K a multiple of 32. A tile
 * reads two 16-row blocks, the last of an odd count one; a batch-1 call reads one per
 * work item, a sequential weight stream per thread as gemv_bf16_avx512 (the 97 W8A8
 * layers of the qwen2-0.5b shape on a Zen 4: 1.04-1.14x faster than pairs, same sums). */
void gemm_w8a8(const int8_t *xq, const float *bscale, const int32_t *bsum, int64_t m_total,
               const void *packed_weights, const float *scales, int64_t n, int64_t k,
               const float *bias, void *out, int64_t os, int out_f32) {
    const uint8_t *packed = packed_weights;
    const int64_t kq = k / 4, nb = (n + 15) / 16, npairs = (nb + 1) / 2;
    if (m_total == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < nb; b++)
            tile_w8a8(xq, bscale, bsum, k, 0, 1, packed + b * kq * 64, NULL, 0, n, b, scales,
                      bias, out, os, out_f32);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < npairs; bp++) {
        const int64_t b0 = 2 * bp;
        const uint8_t *w0 = packed + b0 * kq * 64;
#define TILE(mt)                                                                        \
    do {                                                                                \
        if ((b0 + 1) < nb)                                                              \
            tile_w8a8(xq, bscale, bsum, k, m0, mt, w0, w0 + kq * 64, 1, n, b0, scales,  \
                      bias, out, os, out_f32);                                          \
        else                                                                            \
            tile_w8a8(xq, bscale, bsum, k, m0, mt, w0, NULL, 0, n, b0, scales, bias,    \
                      out, os, out_f32);                                                \
    } while (0)
        ROW_TILES_4(TILE)
#undef TILE
    }
}
