/*
 * bfloat16 and int8-weight GEMMs on AMX tiles (Intel Sapphire Rapids and later),
 * included by gemm_bf16.c when it is built with BACKPLANE_AMX=1.
 *
 * The weight layout is gemm_bf16.c's own: blocks of 16 output rows whose
 * column pairs interleave, 32 bf16 = 64 bytes per pair. Sixteen consecutive
 * pairs of a block (1 KiB) are exactly the "VNNI" B operand of TDPBF16PS
 * (16 rows of 64 bytes, each row the 16 outputs' values of two input columns),
 * so the packed weights feed the tile unit as they are, and one packing serves
 * both kernels. An A operand is 16 activation rows x 32 columns, read in place
 * with the activations' row stride.
 *
 * Work split: each thread takes pairs of 16-row weight blocks (32 outputs) and
 * runs the activation rows against them (a row block at a time, below) in chunks
 * of 32 rows: 2 A tiles x 2 B tiles -> 4 accumulator tiles, 8 of the 8 tile
 * registers. A pair's weights (at most a few hundred KiB) stay in L2 across the
 * chunks of a row block.
 *
 * Measured on a 2-core AMX Xeon (qwen2-0.5b shape, one decode step's 97 linears
 * streamed from memory): 374 -> 64 ms at 64 rows against the AVX512-BF16 kernel,
 * 114 -> 42 ms at 16, even at one row (memory-bound either way). Software prefetch (near or far,
 * into L1 or L2, of this pair or the next) and a 4x1 layout (every row tile
 * against one block, so each weight tile feeds 64 rows as it arrives) were
 * both no faster; the 4x1 one lost 20% with one weight stream per core. Blocking
 * K so a pair's tiles stay in L1 (partial sums stored between K blocks) was
 * slower for K = 4864 and even for K = 896. Spreading the next pair's prefetch
 * over the second chunk's steps (4-16 lines a step) did not help either (a
 * batch-64 step's linears 64-66 -> 67-70 ms): a core streams ~14 GB/s on its
 * own, and the second chunk's compute is what is left unoverlapped. A SiLU-and-
 * mul epilogue for the gate/up projection (gate and up blocks interleaved so a
 * pair holds both; bit for bit the unfused result) was no faster either: W2's
 * prefill spent 7.8 -> 8.0 s in the linears and SiLU, its decode 8.8 -> 9.4 s.
 * The exp and the division are the cost, not the intermediate's memory, and in
 * a separate pass they do not hold up a weight stream.
 *
 * Row blocks: with thousands of rows (a prefill chunk) the activations outgrow L2
 * and every weight pair would stream them again from L3, so each thread runs its
 * pairs over one block of rows at a time, ~1 MiB of activations (576 rows at K =
 * 896, 96 at 4864). 2048 rows, TFLOP/s before -> after: 4864x896 1.3 -> 1.65-1.75,
 * 1152x896 1.2 -> 1.8, 896x4864 1.5 -> 1.7 (256-512 KiB blocks lost at K = 4864).
 *
 * int8 and fp8 weights (W8A16: gemm_w8, gemm_fp8) take the same path: the first
 * chunk of rows widens each weight tile to bf16 (exact for both) as it arrives, into a
 * buffer of the thread's that later chunks read from L2, and the row scales
 * multiply the float32 sums at the store. W8A8 stays on VNNI: its activation
 * scales change every 32 columns, and the tile unit sums 32 or 64 columns into
 * one int32 with no way to scale in between.
 *
 * Rows past the last full 16 (all of them at batch 1) are copied into a
 * 16-row scratch tile first: the tile unit always multiplies 16 rows, and the
 * rows it reads past the copy are never stored. The scratch belongs to the
 * calling thread and is kept between calls (zeroed once, grown as needed): a
 * batch-1 step makes ~100 GEMM calls, each too short to pay for an allocation.
 * Each output row is the same chain of dot products whichever tile it sits in,
 * so a row's result does not depend on its batch.
 */
#ifndef BACKPLANE_GEMM_AMX_H
#define BACKPLANE_GEMM_AMX_H

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "amx_common.h"
#include "gemm_tiles.h"

/* Palette 1: tiles 0-3 accumulators (16 x 16 float32), 4-5 activations
 * (16 rows x 32 bf16), 6-7 weights (16 pairs x 16 outputs x 2). */
static inline void configure_tiles(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Input columns per tile step (64 bytes of bf16 per A row). */
#define AMX_K 32

/* The activation rows of one call as the tile loops read them: whole tiles of 16
 * rows in place, the last m % 16 rows from the calling thread's scratch copy. */
struct amx_rows {
    const uint16_t *x, *tail_rows;
    int64_t xs, k, full, tail, tiles;
};

/* Fills `rows` for x [m, k] (row stride xs); -1 if the scratch cannot be allocated. */
static int amx_rows_init(struct amx_rows *rows, const uint16_t *x, int64_t xs, int64_t m,
                         int64_t k) {
    static __thread uint16_t *scratch = NULL;
    static __thread int64_t scratch_k = 0;
    const int64_t full = m / 16, tail = m % 16;
    if (tail) {
        if (scratch_k < k) {
            uint16_t *grown = calloc((size_t)(16 * k), sizeof(uint16_t));
            if (!grown) return -1;
            free(scratch);
            scratch = grown;
            scratch_k = k;
        }
        for (int64_t r = 0; r < tail; r++)
            memcpy(scratch + r * k, x + (full * 16 + r) * xs, (size_t)k * sizeof(uint16_t));
    }
    *rows = (struct amx_rows){.x = x, .tail_rows = scratch, .xs = xs, .k = k, .full = full,
                              .tail = tail, .tiles = full + (tail ? 1 : 0)};
    return 0;
}

#define AMX_ROW_BLOCK_BYTES (1 << 20)
/* Row tiles per block: a block's activations (rows x K bf16) stay in L2 while every
 * weight pair of the thread passes over them. */
static inline int64_t amx_row_block_tiles(int64_t k) {
    int64_t tiles = AMX_ROW_BLOCK_BYTES / (16 * k * 2);
    tiles -= tiles % 2;  /* whole chunks of 32 rows */
    return tiles < 2 ? 2 : tiles;
}

/* Row tiles [t0, t0 + count) of `rows` (clipped), addressed from their first row. */
static inline struct amx_rows amx_rows_slice(const struct amx_rows *rows, int64_t t0,
                                             int64_t count) {
    struct amx_rows s = *rows;
    const int64_t end = t0 + count < rows->tiles ? t0 + count : rows->tiles;
    s.x = rows->x + t0 * 16 * rows->xs;
    s.tiles = end - t0;
    s.full = rows->full > t0 ? (rows->full < end ? rows->full : end) - t0 : 0;
    s.tail = end == rows->tiles ? rows->tail : 0;
    return s;
}

/* Stores accumulator tile TILE (16 rows x 16 float32) for output rows row0..row0+nrows
 * and the 16 columns of weight block `block` (times the row scales, if any). */
#define AMX_STORE(TILE, row0, nrows, block)                                            \
    do {                                                                               \
        _tile_stored(TILE, acc, 64);                                                   \
        const __m512 row_scales = scales ? load_scales(scales, (block) * 16, n)        \
                                         : _mm512_set1_ps(1.0f);                       \
        for (int r = 0; r < (nrows); r++) {                                            \
            __m512 v = _mm512_loadu_ps(acc + r * 16);                                  \
            if (scales) v = _mm512_mul_ps(v, row_scales);                              \
            store_block(v, out, (row0) + r, os, (block) * 16, n, bias, out_f32);       \
        }                                                                              \
    } while (0)

#ifdef AMX_WIDEN
/* AMX_WIDEN(ptr): the includer's widening of 32 packed 8-bit weights to 32 bf16, in
 * order (gemm_bf16.c: int8, widen_w8; gemm_fp8.c: e4m3, widen_fp8). 16 column pairs
 * of a 16-row 8-bit block (512 bytes) -> the bf16 B tile (1 KiB). */
static inline __attribute__((always_inline)) void widen_tile(uint16_t *dst, const uint8_t *src) {
#pragma GCC unroll 16
    for (int p = 0; p < 16; p++)
        _mm512_storeu_si512(dst + p * 32, (__m512i)AMX_WIDEN((const void *)(src + p * 32)));
}
/* 8-bit weights: the first chunk widens this step's tiles as they arrive. */
#define AMX_WIDEN_STEP(t)                                                              \
    if (src8 && i == 0) {                                                              \
        widen_tile(wide + (t) * 16 * 32, src8 + (t) * 16 * 32);                        \
        if (two) widen_tile(wide + (kp + (t) * 16) * 32, src8 + (kp + (t) * 16) * 32); \
    }
#else
#define AMX_WIDEN_STEP(t)
#endif

/* One chunk: A tiles at a0 (and a1 if TWO_A), row strides as0/as1 (bytes), against
 * the weight blocks w0 and w1 (w1 == w0 for a lone last block). */
#define AMX_CHUNK(TWO_A)                                                               \
    do {                                                                               \
        _tile_zero(0); _tile_zero(1);                                                  \
        if (TWO_A) { _tile_zero(2); _tile_zero(3); }                                   \
        for (int64_t t = 0; t < kt; t++) {                                             \
            AMX_WIDEN_STEP(t)                                                          \
            _tile_loadd(6, w0 + t * 16 * 32, 64);                                      \
            _tile_loadd(7, w1 + t * 16 * 32, 64);                                      \
            _tile_loadd(4, a0 + t * AMX_K, as0);                                       \
            _tile_dpbf16ps(0, 4, 6);                                                   \
            _tile_dpbf16ps(1, 4, 7);                                                   \
            if (TWO_A) {                                                               \
                _tile_loadd(5, a1 + t * AMX_K, as1);                                   \
                _tile_dpbf16ps(2, 5, 6);                                               \
                _tile_dpbf16ps(3, 5, 7);                                               \
            }                                                                          \
        }                                                                              \
    } while (0)

/* Every activation row against the weight blocks b0 (at w0) and b0 + 1 (at w1, if
 * `two`), in chunks of 32 rows; in a thread whose tiles are configured. With src8
 * (8-bit blocks, AMX_WIDEN builds only), w0/w1 point into the thread's buffer
 * `wide`, which the first chunk fills from src8. */
static inline __attribute__((always_inline)) void amx_pair(
        const struct amx_rows *rows, const uint16_t *w0, const uint16_t *w1, int two,
        const uint8_t *src8, uint16_t *wide, int64_t n, int64_t b0, const float *scales,
        const float *bias, void *out, int64_t os, int out_f32) {
    const int64_t k = rows->k, kp = k / 2, kt = k / AMX_K, full = rows->full;
    float acc[16 * 16] __attribute__((aligned(64)));
    (void)src8; (void)wide; (void)kp;
    for (int64_t i = 0; i < rows->tiles; i += 2) {
        /* A tile i: rows 16 i.. of x, or the scratch copy of the tail. */
        const uint16_t *a0 = i < full ? rows->x + i * 16 * rows->xs : rows->tail_rows;
        const int64_t as0 = (i < full ? rows->xs : k) * 2;
        const int rows0 = i < full ? 16 : (int)rows->tail;
        if (i + 1 < rows->tiles) {
            const uint16_t *a1 = i + 1 < full ? rows->x + (i + 1) * 16 * rows->xs
                                              : rows->tail_rows;
            const int64_t as1 = (i + 1 < full ? rows->xs : k) * 2;
            const int rows1 = i + 1 < full ? 16 : (int)rows->tail;
            AMX_CHUNK(1);
            AMX_STORE(0, i * 16, rows0, b0);
            AMX_STORE(2, (i + 1) * 16, rows1, b0);
            if (two) {
                AMX_STORE(1, i * 16, rows0, b0 + 1);
                AMX_STORE(3, (i + 1) * 16, rows1, b0 + 1);
            }
        } else {
            const uint16_t *a1 = a0;
            const int64_t as1 = as0;
            (void)a1; (void)as1;
            AMX_CHUNK(0);
            AMX_STORE(0, i * 16, rows0, b0);
            if (two) AMX_STORE(1, i * 16, rows0, b0 + 1);
        }
    }
}

/* A thread's buffer for two widened (or dequantised) 16-row bf16 blocks of K columns,
 * kept between calls (the OpenMP threads are pooled); NULL if it cannot be allocated. */
static uint16_t *amx_pair_buffer(int64_t k) {
    static __thread uint16_t *buf = NULL;
    static __thread int64_t buf_k = 0;
    if (buf_k < k) {
        free(buf);
        buf = aligned_alloc(64, (size_t)(2 * 16 * k) * sizeof(uint16_t));
        buf_k = buf ? k : 0;
    }
    return buf;
}

/* gemm_bf16 (packed8 NULL) or a widened 8-bit GEMM (packed8: 16-row blocks of
 * 32-byte column pairs that AMX_WIDEN turns into bf16, as gemm_w8 and gemm_fp8 take
 * them; scales: their row scales) on tiles; K a multiple of 32 (the callers check).
 * Returns -1 if the scratch tile or a widening buffer cannot be allocated. */
static int gemm_amx(const uint16_t *x, int64_t xs, int64_t m_total, const uint16_t *packed,
                    const void *packed8, const float *scales, int64_t n, int64_t k,
                    const float *bias, void *out, int64_t os, int out_f32) {
    const int64_t kp = k / 2, nb = (n + 15) / 16, npairs = (nb + 1) / 2;
    struct amx_rows rows;
    if (amx_rows_init(&rows, x, xs, m_total, k)) return -1;
    int failed = 0;
#pragma omp parallel
    {
        uint16_t *wide = packed8 ? amx_pair_buffer(k) : NULL;
        const int ready = !packed8 || wide != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        configure_tiles();
        /* This thread's pairs, as `omp for schedule(static)` would hand them out. */
        const int64_t nthreads = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t per = npairs / nthreads, extra = npairs % nthreads;
        const int64_t bp_lo = me * per + (me < extra ? me : extra);
        const int64_t bp_hi = bp_lo + per + (me < extra ? 1 : 0);
        const int64_t block_tiles = amx_row_block_tiles(k);
        for (int64_t t0 = 0; ready && t0 < rows.tiles; t0 += block_tiles) {
            struct amx_rows slice = amx_rows_slice(&rows, t0, block_tiles);
            void *slice_out = (char *)out + t0 * 16 * os * (out_f32 ? 4 : 2);
            for (int64_t bp = bp_lo; bp < bp_hi; bp++) {
                const int64_t b0 = 2 * bp;
                const int two = (b0 + 1) < nb;
                const uint8_t *src8 = packed8 ? (const uint8_t *)packed8 + b0 * kp * 32 : NULL;
                const uint16_t *w0 = packed8 ? wide : packed + b0 * kp * 32;
                amx_pair(&slice, w0, two ? w0 + kp * 32 : w0, two, src8, wide, n, b0, scales,
                         bias, slice_out, os, out_f32);
            }
        }
        _tile_release();
    }
    return failed ? -1 : 0;
}

#endif
