/*
 * Fused bfloat16 element-wise layers for the CPU platform (see
 * backplane/platforms/cpu/fused_layers.py). Each one replaces a chain of
 * torch ops that each read and write the whole activation, convert dtypes
 * and pay dispatch: at batch 64 on a Qwen2-0.5B shape, torch's bf16 RMSNorm
 * took ~300 us per call, 49 calls a decode step.
 *
 * Rounding follows the torch code they replace, so results agree with it to
 * float32 reduction order: RMSNorm normalises in float32, rounds to bf16,
 * then multiplies by the bf16 weight and rounds again (transformers' Llama
 * norm); SiLU is rounded to bf16 before the product with `up`.
 */
#include <math.h>

#include "common.h"

/* out[r] = bf16(weight * bf16(x[r] / sqrt(mean(x[r]^2) + eps))) */
void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out,
                   int64_t out_stride, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden > 16384)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * x_stride;
        uint16_t *dst = out + r * out_stride;
        float sum = 0.0f;
        for (int64_t i = 0; i < hidden; i++) {
            float v = bf16_to_float(row[i]);
            sum += v * v;
        }
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) {
            float normed = round_to_bf16(bf16_to_float(row[i]) * inv);
            dst[i] = float_to_bf16(bf16_to_float(weight[i]) * normed);
        }
    }
}

/* sum[r] = bf16(x[r] + res[r]) (torch's bf16 add), then out[r] = rms_norm(sum[r]) as
 * rms_norm_bf16: the pre-norm decoder's residual add and next norm in one pass. */
void add_rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *res,
                       int64_t res_stride, const uint16_t *weight, uint16_t *out,
                       uint16_t *sum_out, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden > 16384)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * x_stride, *rr = res + r * res_stride;
        uint16_t *sr = sum_out + r * hidden, *dst = out + r * hidden;
        float sum = 0.0f;
        for (int64_t i = 0; i < hidden; i++) {
            const uint16_t h = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(rr[i]));
            const float v = bf16_to_float(h);
            sr[i] = h;
            sum += v * v;
        }
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) {
            float normed = round_to_bf16(bf16_to_float(sr[i]) * inv);
            dst[i] = float_to_bf16(bf16_to_float(weight[i]) * normed);
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SILU_AVX512 1

/* 16 outputs of silu_and_mul_bf16 (common.h's silu_mul_ps16). */
static inline void silu_mul16(const uint16_t *gate, const uint16_t *up, uint16_t *dst) {
    const __m512 g = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)gate));
    const __m512 u = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)up));
    _mm256_storeu_si256((__m256i *)dst, silu_mul_ps16(g, u));
}
#endif

/* out[r] = bf16(bf16(silu(gate)) * up) for x[r] = [gate (d) | up (d)] */
void silu_and_mul_bf16(const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t out_stride,
                       int64_t rows, int64_t d) {
#pragma omp parallel for schedule(static) if (rows * d > 16384)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = x + r * x_stride, *up = gate + d;
        uint16_t *dst = out + r * out_stride;
        int64_t i = 0;
#ifdef SILU_AVX512
        for (; i + 16 <= d; i += 16) silu_mul16(gate + i, up + i, dst + i);
#endif
        for (; i < d; i++) {
            float g = bf16_to_float(gate[i]);
            /* below -88.7, exp(-g) overflows in torch too, giving -0 */
            float silu = g < -88.7f ? -0.0f : g / (1.0f + exp_clamped(-g));
            dst[i] = float_to_bf16(round_to_bf16(silu) * bf16_to_float(up[i]));
        }
    }
}

/* Rotate-half rotary embedding of x [tokens, heads, 2 * half] (token stride
 * x_stride, heads contiguous) by per-token cos, sin [tokens, half] into out
 * [tokens, heads, 2 * half], with torch's bf16 rounding after every op:
 * out1 = bf16(bf16(x1 cos) - bf16(x2 sin)), out2 = bf16(bf16(x2 cos) + bf16(x1 sin)). */
void rotary_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *sin,
                 uint16_t *out, int64_t tokens, int64_t heads, int64_t half) {
#pragma omp parallel for schedule(static) if (tokens * heads * half > 16384)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *x1 = x + t * x_stride + h * 2 * half, *x2 = x1 + half;
            uint16_t *o1 = out + (t * heads + h) * 2 * half, *o2 = o1 + half;
            for (int64_t i = 0; i < half; i++) {
                const float a = bf16_to_float(x1[i]), b = bf16_to_float(x2[i]);
                const float cc = bf16_to_float(c[i]), ss = bf16_to_float(s[i]);
                o1[i] = float_to_bf16(round_to_bf16(a * cc) - round_to_bf16(b * ss));
                o2[i] = float_to_bf16(round_to_bf16(b * cc) + round_to_bf16(a * ss));
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * A whole pre-norm decoder layer for a decode step, in one call (see
 * backplane/platforms/cpu/decoder_layer.py): the same kernels, in the same
 * order and with the same roundings as the layer's modules run them one by
 * one from Python, so the output is bit-identical; what goes is the ~150 us of
 * module calls, checks, allocations and ctypes argument conversions a layer
 * costs when each of its nine kernels is called from Python.
 * ------------------------------------------------------------------------ */

/* The GEMMs of the platform's linear layers (gemm_bf16.c, gemm_avx2.c, gemm_fp8.c,
 * gemm_int4.c): plain bf16 weights, 8-bit weights with one float32 scale per output
 * row, and 4-bit weights with per-group scale, zero and offset tables. */
typedef int (*gemm_fn)(const uint16_t *x, int64_t xs, int64_t m, const void *packed,
                       int64_t n, int64_t k, const float *bias, void *out, int64_t os,
                       int out_f32);
typedef int (*scaled_gemm_fn)(const uint16_t *x, int64_t xs, int64_t m, const void *packed,
                              const float *scales, int64_t n, int64_t k, const float *bias,
                              void *out, int64_t os, int out_f32);
typedef int (*int4_gemm_fn)(const void *x, int64_t xs, int64_t m, int x_f32,
                            const void *packed, const float *scales, const float *zeros,
                            const float *offsets, int64_t n, int64_t k, int64_t group,
                            const float *bias, void *out, int64_t os, int out_f32);

/* gemm_bf16.c's gemm_bf16_silu: a gate/up GEMM ending in SiLU-and-mul. */
typedef int (*gemm_silu_fn)(const uint16_t *x, int64_t xs, int64_t m, const void *packed,
                            int64_t d, int64_t k, const float *bias, uint16_t *act,
                            int64_t os);

/* paged_attention.c's decode_attention (one build per attention geometry). */
typedef void (*decode_attention_fn)(
    const void *query, int64_t query_stride, const void *key, int64_t key_stride,
    const void *value, int64_t value_stride, const int64_t *slots, void *key_cache,
    void *value_cache, int64_t num_blocks, const int32_t *block_tables,
    int64_t block_table_stride, const int32_t *seq_lens, int64_t num_tokens,
    int64_t num_kv_heads, int32_t window, float scale, float soft_cap, const float *kv_scales,
    void *out, int64_t out_stride);

enum { GEMM_BF16 = 0, GEMM_SCALED = 1, GEMM_INT4 = 2 };

/* One GEMM: fn is a gemm_fn, scaled_gemm_fn or int4_gemm_fn by kind. */
typedef struct {
    int64_t kind;
    void *fn;
    const void *packed;
    const float *scales, *zeros, *offsets; /* scaled: scales; int4: all three tables */
    const float *bias;
    int64_t n, k, group;
} native_gemm;

/* A linear layer: up to three GEMMs whose outputs sit side by side (a 4-bit
 * checkpoint's fused q/k/v keeps one GEMM per part). */
#define MAX_PARTS 3
typedef struct {
    int64_t parts;
    native_gemm part[MAX_PARTS];
} native_linear;

/* One layer: fixed at load, except the cache fields the caller sets per call.
 * gate_up_silu: NULL, or the fused form of gate_up (one bf16 part) and SiLU-and-mul. */
typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_size, intermediate;
    float input_eps, post_eps, scale;
    const uint16_t *input_norm, *post_norm;
    native_linear qkv, o, gate_up, down;
    void *key_cache, *value_cache;
    int64_t num_blocks;
    const float *kv_scales;
    gemm_silu_fn gate_up_silu;
} decoder_layer;

/* One decode step, shared by every layer: one query token per request. */
typedef struct {
    decode_attention_fn attention;
    int64_t tokens;
    const uint16_t *cos, *sin; /* [tokens, head_size / 2] */
    const int64_t *slots;
    const int32_t *block_table;
    int64_t block_table_stride;
    const int32_t *seq_lens;
    int32_t window;
    float soft_cap;
} decode_step;

static int run_gemm(const native_gemm *g, const uint16_t *x, int64_t xs, int64_t m,
                    uint16_t *out, int64_t os) {
    switch (g->kind) {
    case GEMM_SCALED:
        return ((scaled_gemm_fn)g->fn)(x, xs, m, g->packed, g->scales, g->n, g->k, g->bias,
                                       out, os, 0);
    case GEMM_INT4:
        return ((int4_gemm_fn)g->fn)(x, xs, m, 0, g->packed, g->scales, g->zeros, g->offsets,
                                     g->n, g->k, g->group, g->bias, out, os, 0);
    default:
        return ((gemm_fn)g->fn)(x, xs, m, g->packed, g->n, g->k, g->bias, out, os, 0);
    }
}

/* out [m, sum of the parts' n] = x @ W.T, each part into its own columns. */
static int run_linear(const native_linear *l, const uint16_t *x, int64_t xs, int64_t m,
                      uint16_t *out) {
    int64_t width = 0;
    for (int64_t i = 0; i < l->parts; i++) width += l->part[i].n;
    for (int64_t i = 0, col = 0; i < l->parts; col += l->part[i].n, i++)
        if (run_gemm(&l->part[i], x, xs, m, out + col, width)) return -1;
    return 0;
}

/* bf16 elements of scratch decoder_layer_decode needs for m tokens. */
int64_t decoder_layer_workspace(const decoder_layer *l, int64_t m) {
    const int64_t q = l->num_heads * l->head_size, kv = l->num_kv_heads * l->head_size;
    return m * (5 * l->hidden + (q + 2 * kv) + (q + kv) + q + 3 * l->intermediate);
}

/* out[i] = bf16(a[i] + b[i]), torch's bf16 add. */
static void add_bf16(const uint16_t *a, const uint16_t *b, uint16_t *out, int64_t count) {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; i++)
        out[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

/* out = h + down(silu_and_mul(gate_up(post_norm(h)))) with h = x + o(attention(rotary(
 * qkv(input_norm(x))))), for step->tokens decode tokens of x [tokens, hidden] (rows
 * contiguous); ws: decoder_layer_workspace elements. Returns -1 if a GEMM could not
 * allocate its scratch memory. */
int decoder_layer_decode(const decoder_layer *l, const decode_step *s, const uint16_t *x,
                         uint16_t *out, uint16_t *ws) {
    const int64_t m = s->tokens, h = l->hidden, hd = l->head_size, inter = l->intermediate;
    const int64_t q = l->num_heads * hd, kv = l->num_kv_heads * hd, qkv_width = q + 2 * kv;
    const int64_t qk_heads = l->num_heads + l->num_kv_heads;
    uint16_t *normed = ws, *qkv = normed + m * h, *qk = qkv + m * qkv_width;
    uint16_t *attn = qk + m * qk_heads * hd, *o = attn + m * q, *sum = o + m * h;
    uint16_t *normed2 = sum + m * h, *gate_up = normed2 + m * h, *act = gate_up + m * 2 * inter;
    uint16_t *down = act + m * inter;

    rms_norm_bf16(x, h, l->input_norm, normed, h, m, h, l->input_eps);
    if (run_linear(&l->qkv, normed, h, m, qkv)) return -1;
    /* queries and keys side by side in each row, rotated in one pass */
    rotary_bf16(qkv, qkv_width, s->cos, s->sin, qk, m, qk_heads, hd / 2);
    s->attention(qk, qk_heads * hd, qk + q, qk_heads * hd, qkv + q + kv, qkv_width, s->slots,
                 l->key_cache, l->value_cache, l->num_blocks, s->block_table,
                 s->block_table_stride, s->seq_lens, m, l->num_kv_heads, s->window, l->scale,
                 s->soft_cap, l->kv_scales, attn, q);
    if (run_linear(&l->o, attn, q, m, o)) return -1;
    add_rms_norm_bf16(o, h, x, h, l->post_norm, normed2, sum, m, h, l->post_eps);
    /* Fused, the gate/up GEMM skips writing and rereading [m, 2 inter] and the separate
     * activation pass: a batch-64 decode step of the qwen2-0.5b shape 2.5-7.6 ms faster
     * (steps alternated in one engine, 2-core Zen 4). At batch 1 its two weight streams
     * per work item cost more than that (3 ms a step), so one token takes the two steps. */
    if (l->gate_up_silu && m > 1) {
        const native_gemm *g = &l->gate_up.part[0];
        if (l->gate_up_silu(normed2, h, m, g->packed, inter, h, g->bias, act, inter)) return -1;
    } else {
        if (run_linear(&l->gate_up, normed2, h, m, gate_up)) return -1;
        silu_and_mul_bf16(gate_up, 2 * inter, act, inter, m, inter);
    }
    if (run_linear(&l->down, act, inter, m, down)) return -1;
    add_bf16(sum, down, out, m * h);
    return 0;
}

/* The most scratch any one of the layers needs for m tokens (they run one by one). */
static int64_t largest_layer_workspace(const decoder_layer *const *layers, int64_t count,
                                       int64_t m) {
    int64_t most = 0;
    for (int64_t i = 0; i < count; i++) {
        const int64_t need = decoder_layer_workspace(layers[i], m);
        most = need > most ? need : most;
    }
    return most;
}

/* bf16 elements of scratch decoder_stack_decode needs for m tokens: the largest layer's
 * own, then two [m, hidden] buffers the layers hand their outputs on in. */
int64_t decoder_stack_workspace(const decoder_layer *const *layers, int64_t count, int64_t m) {
    return largest_layer_workspace(layers, count, m) + 2 * m * layers[0]->hidden;
}

/* The layers of a decode step one after another, layer i's output layer i + 1's input:
 * decoder_layer_decode's result for each, out the last one's (the same kernels in the
 * same order as calling the layers one by one, so the same bits). Called once a step
 * instead of once a layer: the Python between the layers' calls (a module call, a
 * runner's checks, an output tensor) was ~1 ms of a qwen2-0.5b batch-1 step. ws:
 * decoder_stack_workspace elements; every layer's hidden size is layers[0]'s. Returns
 * -1 if a GEMM could not allocate its scratch memory. */
int decoder_stack_decode(const decoder_layer *const *layers, int64_t count,
                         const decode_step *s, const uint16_t *x, uint16_t *out, uint16_t *ws) {
    uint16_t *handoff = ws + largest_layer_workspace(layers, count, s->tokens);
    const int64_t size = s->tokens * layers[0]->hidden;
    const uint16_t *in = x;
    for (int64_t i = 0; i < count; i++) {
        uint16_t *dst = i == count - 1 ? out : handoff + (i % 2) * size;
        if (decoder_layer_decode(layers[i], s, in, dst, ws)) return -1;
        in = dst;
    }
    return 0;
}
