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
#include "gemm_tiles.h"

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

#if BACKPLANE_AMX
#define AMX_WIDEN widen_fp8
#include "gemm_amx.h"
#endif

/* out = x @ (scales[:, None] * fp8(W)).T (+ bias); x [M, K] bf16 (K even), scales
 * already multiplied by 2^8; out bf16, or float32 if out_f32 (on AMX tiles in a
 * BACKPLANE_AMX build). Returns -1 if scratch memory could not be allocated. */
DEFINE_WIDENED_GEMM(gemm_fp8, uint8_t, widen_fp8)
