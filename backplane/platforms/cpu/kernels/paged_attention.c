/*
 * Paged attention for the CPU platform, compiled at run time by
 * backplane/platforms/cpu/native.py with the geometry fixed by -D flags:
 *
 *   SCALAR_KIND  0 float32, 1 bfloat16, 2 float16 (query, cache and output)
 *   HEAD_SIZE    elements per head
 *   BLOCK_SIZE   tokens per KV block
 *   GROUP        query heads per KV head (grouped-query attention)
 *
 * Cache layout, per KV head and block (see CpuPagedAttentionBackend):
 *   key   [HEAD_SIZE][BLOCK_SIZE]  transposed: the block's keys are contiguous
 *                                  for each head element, so q.K for the whole
 *                                  block is BLOCK_SIZE-wide vector FMAs with no
 *                                  horizontal sums;
 *   value [BLOCK_SIZE][HEAD_SIZE]  row-major: p.V is HEAD_SIZE-wide FMAs.
 *
 * Every query token is one work item per KV head: it reads the blocks of its
 * own request in place (no gather copy) with an online softmax, so decode
 * tokens and prefill tokens (each seeing its causal prefix) share one loop.
 * Math is float32 throughout; inputs are widened on load.
 */
#include <stdint.h>
#include <string.h>

#if SCALAR_KIND == 0
typedef float scalar_t;
static inline float to_float(scalar_t x) { return x; }
static inline scalar_t from_float(float x) { return x; }
#elif SCALAR_KIND == 1
typedef uint16_t scalar_t;
static inline float to_float(scalar_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline scalar_t from_float(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (scalar_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (scalar_t)(bits >> 16);
}
#else
typedef _Float16 scalar_t;
static inline float to_float(scalar_t x) { return (float)x; }
static inline scalar_t from_float(float x) { return (scalar_t)x; }
#endif

/* exp(x) for x <= 0 (scores minus their running max): Cephes' expf reduction
 * and polynomial, written branch-free so the compiler vectorises it (libm's
 * expf is not vectorised without -ffast-math, which would also switch the
 * whole process to flush-to-zero). Relative error ~2e-7. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#define MASKED (-1e30f)

static void attend_one(const scalar_t *q_row, const scalar_t *key_cache,
                       const scalar_t *value_cache, int64_t num_blocks_total,
                       const int32_t *block_table, int32_t seq_len, int32_t window,
                       int64_t kv_head, float scale, scalar_t *out_row) {
    float q[GROUP][HEAD_SIZE];
    float acc[GROUP][HEAD_SIZE];
    float run_max[GROUP], run_sum[GROUP];
    for (int g = 0; g < GROUP; g++) {
        for (int d = 0; d < HEAD_SIZE; d++) {
            q[g][d] = to_float(q_row[g * HEAD_SIZE + d]) * scale;
            acc[g][d] = 0.0f;
        }
        run_max[g] = MASKED;
        run_sum[g] = 0.0f;
    }
    /* A query at position seq_len - 1 sees keys [first, seq_len). */
    int32_t first = (window > 0 && seq_len > window) ? seq_len - window : 0;
    const int64_t head_base = kv_head * num_blocks_total;
    for (int32_t b = first / BLOCK_SIZE; b * BLOCK_SIZE < seq_len; b++) {
        const int64_t block = head_base + block_table[b];
        const scalar_t *kb = key_cache + block * (HEAD_SIZE * BLOCK_SIZE);
        const scalar_t *vb = value_cache + block * (BLOCK_SIZE * HEAD_SIZE);
        int lo = first - b * BLOCK_SIZE;
        lo = lo < 0 ? 0 : lo;
        int hi = seq_len - b * BLOCK_SIZE;
        hi = hi > BLOCK_SIZE ? BLOCK_SIZE : hi;

        float s[GROUP][BLOCK_SIZE];
        for (int g = 0; g < GROUP; g++)
            for (int j = 0; j < BLOCK_SIZE; j++) s[g][j] = 0.0f;
        for (int d = 0; d < HEAD_SIZE; d++) {
            float k[BLOCK_SIZE];
            for (int j = 0; j < BLOCK_SIZE; j++) k[j] = to_float(kb[d * BLOCK_SIZE + j]);
            for (int g = 0; g < GROUP; g++)
                for (int j = 0; j < BLOCK_SIZE; j++) s[g][j] += q[g][d] * k[j];
        }

        float p[GROUP][BLOCK_SIZE];
        for (int g = 0; g < GROUP; g++) {
            for (int j = 0; j < BLOCK_SIZE; j++)
                if (j < lo || j >= hi) s[g][j] = MASKED;
            float block_max = run_max[g];
            for (int j = 0; j < BLOCK_SIZE; j++) block_max = s[g][j] > block_max ? s[g][j] : block_max;
            float correction = exp_nonpositive(run_max[g] - block_max);
            float block_sum = 0.0f;
            for (int j = 0; j < BLOCK_SIZE; j++) {
                float e = exp_nonpositive(s[g][j] - block_max);
                p[g][j] = (j < lo || j >= hi) ? 0.0f : e;
                block_sum += p[g][j];
            }
            run_sum[g] = run_sum[g] * correction + block_sum;
            run_max[g] = block_max;
            for (int d = 0; d < HEAD_SIZE; d++) acc[g][d] *= correction;
        }
        for (int j = lo; j < hi; j++) {
            float v[HEAD_SIZE];
            for (int d = 0; d < HEAD_SIZE; d++) v[d] = to_float(vb[j * HEAD_SIZE + d]);
            for (int g = 0; g < GROUP; g++)
                for (int d = 0; d < HEAD_SIZE; d++) acc[g][d] += p[g][j] * v[d];
        }
    }
    for (int g = 0; g < GROUP; g++) {
        float inv = run_sum[g] > 0.0f ? 1.0f / run_sum[g] : 0.0f;
        for (int d = 0; d < HEAD_SIZE; d++) out_row[g * HEAD_SIZE + d] = from_float(acc[g][d] * inv);
    }
}

/* Attention of tokens [0, num_tokens) of a flat batch over the paged cache.
 * token_reqs[t]: the request (row of block_tables) of token t;
 * token_seq_lens[t]: keys token t sees (its position + 1).
 * query/out rows: token t, head h at row + t * token_stride + h * HEAD_SIZE. */
void paged_attention(const scalar_t *query, int64_t query_token_stride,
                     const scalar_t *key_cache, const scalar_t *value_cache,
                     int64_t num_blocks_total, const int32_t *block_tables,
                     int64_t block_table_stride, const int32_t *token_reqs,
                     const int32_t *token_seq_lens, int64_t num_tokens,
                     int64_t num_kv_heads, int32_t window, float scale, scalar_t *out,
                     int64_t out_token_stride) {
    const int64_t items = num_tokens * num_kv_heads;
#pragma omp parallel for schedule(dynamic, 2)
    for (int64_t i = 0; i < items; i++) {
        const int64_t t = i / num_kv_heads, h = i % num_kv_heads;
        attend_one(query + t * query_token_stride + h * GROUP * HEAD_SIZE, key_cache,
                   value_cache, num_blocks_total,
                   block_tables + (int64_t)token_reqs[t] * block_table_stride,
                   token_seq_lens[t], window, h, scale,
                   out + t * out_token_stride + h * GROUP * HEAD_SIZE);
    }
}

/* Store the step's keys and values at their slots; slot -1 marks padding. */
void write_kv(const scalar_t *key, int64_t key_token_stride, const scalar_t *value,
              int64_t value_token_stride, const int64_t *slots, int64_t num_tokens,
              int64_t num_kv_heads, int64_t num_blocks_total, scalar_t *key_cache,
              scalar_t *value_cache) {
#pragma omp parallel for schedule(static) if (num_tokens > 64)
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const int64_t block = slot / BLOCK_SIZE, offset = slot % BLOCK_SIZE;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t base = (h * num_blocks_total + block) * (HEAD_SIZE * BLOCK_SIZE);
            const scalar_t *k = key + t * key_token_stride + h * HEAD_SIZE;
            const scalar_t *v = value + t * value_token_stride + h * HEAD_SIZE;
            for (int d = 0; d < HEAD_SIZE; d++) {
                key_cache[base + d * BLOCK_SIZE + offset] = k[d];
                value_cache[base + offset * HEAD_SIZE + d] = v[d];
            }
        }
    }
}
