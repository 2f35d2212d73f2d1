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

/* x [M, K] bf16 -> xq int8, per (row, 32-block) scale, and 128 x the block's sum of
 * int8 values (what weights stored +128, as gemm_bf16.c's VNNI kernel stores them,
 * add to that block's dot products; kernels with signed weights ignore it). */
void quantize_activations(const uint16_t *x, int64_t xs, int64_t m, int64_t k, int8_t *xq,
                          float *bscale, int32_t *bsum) {
    const int64_t kb = k / QB;
#pragma omp parallel for schedule(static) if (m * k > 65536)
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < kb; b++) {
            float vals[QB], amax = 0.0f;
            for (int j = 0; j < QB; j++) {
                vals[j] = bf16_to_float(x[r * xs + b * QB + j]);
                const float a = vals[j] < 0 ? -vals[j] : vals[j];
                amax = a > amax ? a : amax;
            }
            const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
            int32_t sum = 0;
            for (int j = 0; j < QB; j++) {
                const int q = quantize_int8(vals[j], inv);
                xq[r * k + b * QB + j] = (int8_t)q;
                sum += q;
            }
            bscale[r * kb + b] = s;
            bsum[r * kb + b] = 128 * sum; /* the +128 weight offset's share of the block */
        }
    }
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
