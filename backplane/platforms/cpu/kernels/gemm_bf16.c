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

/* Rows per tile: 2 x 8 accumulators + 2 weight vectors + 1 broadcast fit the
 * 32 zmm registers. */
#define MT 8

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

/* One tile: rows m0..m0+mt of x against two 16-row weight blocks. `mt` is a
 * compile-time constant in each call below, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(
        const uint16_t *x, int64_t xs, int64_t m0, const int mt, const uint16_t *w0,
        const uint16_t *w1, int two, int64_t kp, int64_t n, int64_t b0, const float *bias,
        void *out, int64_t os, int out_f32) {
    __m512 acc0[MT], acc1[MT];
    const uint16_t *rows[MT];
#pragma GCC unroll 8
    for (int i = 0; i < mt; i++) {
        acc0[i] = _mm512_setzero_ps();
        acc1[i] = _mm512_setzero_ps();
        rows[i] = x + (m0 + i) * xs;
    }
    for (int64_t p = 0; p < kp; p++) {
        const __m512bh a = (__m512bh)_mm512_loadu_si512(w0 + p * 32);
        const __m512bh c = (__m512bh)_mm512_loadu_si512(w1 + p * 32);
#pragma GCC unroll 8
        for (int i = 0; i < mt; i++) {
            int32_t pair;
            memcpy(&pair, rows[i] + 2 * p, sizeof pair);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc0[i] = _mm512_dpbf16_ps(acc0[i], a, xb);
            acc1[i] = _mm512_dpbf16_ps(acc1[i], c, xb);
        }
    }
    for (int i = 0; i < mt; i++) {
        for (int half = 0; half < (two ? 2 : 1); half++) {
            __m512 v = half ? acc1[i] : acc0[i];
            const int64_t col = (b0 + half) * 16;
            const int64_t cols = n - col < 16 ? n - col : 16;
            const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
            if (out_f32) {
                _mm512_mask_storeu_ps((float *)out + (m0 + i) * os + col, mask, v);
            } else {
                const __m256bh h = _mm512_cvtneps_pbh(v);
                _mm256_mask_storeu_epi16((uint16_t *)out + (m0 + i) * os + col, mask,
                                         (__m256i)h);
            }
        }
    }
}

/* out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < m_total, n < N.
 * x: [M, K] bf16 with row stride xs (K even); packed: pack_bf16's layout;
 * bias: float32 or NULL; out: [M, N] bf16, or float32 if out_f32, row stride os. */
void gemm_bf16(const uint16_t *x, int64_t xs, int64_t m_total, const uint16_t *packed,
               int64_t n, int64_t k, const float *bias, void *out, int64_t os, int out_f32) {
    const int64_t kp = k / 2, nb = (n + 15) / 16, npairs = (nb + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < npairs; bp++) {
        const int64_t b0 = 2 * bp;
        const int two = (b0 + 1) < nb;
        const uint16_t *w0 = packed + b0 * kp * 32;
        const uint16_t *w1 = two ? w0 + kp * 32 : w0;
        for (int64_t m0 = 0; m0 < m_total; m0 += MT) {
            const int64_t left = m_total - m0;
            switch (left < MT ? left : MT) {
            case 1: tile(x, xs, m0, 1, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            case 2: tile(x, xs, m0, 2, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            case 3: tile(x, xs, m0, 3, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            case 4: tile(x, xs, m0, 4, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            case 5: tile(x, xs, m0, 5, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            case 6: tile(x, xs, m0, 6, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            case 7: tile(x, xs, m0, 7, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            default: tile(x, xs, m0, 8, w0, w1, two, kp, n, b0, bias, out, os, out_f32); break;
            }
        }
    }
}
