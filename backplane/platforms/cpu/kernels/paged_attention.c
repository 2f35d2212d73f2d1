/*
 * Paged attention for the CPU platform, compiled at run time by
 * backplane/platforms/cpu/native.py with the geometry fixed by -D flags:
 *
 *   SCALAR_KIND  0 float32, 1 bfloat16, 2 float16 (query, cache and output)
 *   HEAD_SIZE    elements per head
 *   BLOCK_SIZE   tokens per KV block
 *   GROUP        query heads per KV head (grouped-query attention)
 *   CACHE_KIND   0 the cache holds scalar_t (default), 1 fp8 e4m3fn, 2 fp8 e5m2
 *
 * fp8 cache (kv_cache_dtype fp8 / fp8_e4m3 / fp8_e5m2): one byte per element,
 * stored as value / scale (per-layer k_scale, v_scale) rounded to nearest even
 * and saturated to the format's max. Attention decodes the bytes in registers
 * as it loads them (no dequantised copy of a block): to float with integer bit
 * moves (cache_to_float), or, in the bf16 pair layout, 32 at a time to bf16
 * (load_pairs). The scales stay outside the inner loops: the
 * scores are multiplied by k_scale, the output by v_scale, since
 * q.(k_scale k) = k_scale (q.k) and sum p (v_scale v) = v_scale sum p v.
 *
 * Cache layout, per KV head and block (see key_index/value_index below): keys
 * are stored so that a block's keys are contiguous for each head element, so
 * q.K for the whole block is block-wide vector FMAs with no horizontal sums;
 * values are row-major, so p.V is head-wide FMAs.
 *
 * Every query token is one work item per KV head: it reads the blocks of its
 * own request in place (no gather copy) with an online softmax, so decode
 * tokens and prefill tokens (each seeing its causal prefix) share one loop.
 * Math is float32 throughout; inputs are widened on load. In the pair layout a
 * request's blocks are taken CHUNK_TOKENS at a time: all their scores, one
 * softmax pass, then p.V, so the softmax bookkeeping is paid per chunk. CPUs
 * with AVX2 run the same chunked loop on 8-lane vectors over the plain layout
 * (AVX2_LOOP); others a portable loop with a per-block softmax.
 */
#include <math.h>

#include "common.h"

#if SCALAR_KIND == 0
typedef float scalar_t;
static inline float to_float(scalar_t x) { return x; }
static inline scalar_t from_float(float x) { return x; }
#elif SCALAR_KIND == 1
typedef uint16_t scalar_t;
static inline float to_float(scalar_t x) { return bf16_to_float(x); }
static inline scalar_t from_float(float x) { return float_to_bf16(x); }
#else
typedef _Float16 scalar_t;
static inline float to_float(scalar_t x) { return (float)x; }
static inline scalar_t from_float(float x) { return (scalar_t)x; }
#endif

#ifndef CACHE_KIND
#define CACHE_KIND 0
#endif
#if CACHE_KIND == 0
typedef scalar_t cache_t;
static inline float cache_to_float(cache_t x) { return to_float(x); }
static inline cache_t cache_from_input(scalar_t x, float scale) { (void)scale; return x; }
#else
typedef uint8_t cache_t;
#if CACHE_KIND == 1 /* e4m3fn: exponent bias 7, 3 mantissa bits, max 448, no infinities */
#define FP8_MBITS 3
#define FP8_BIAS 7
#define FP8_MAX 448.0f
#define FP8_MAX_CODE 0x7eu
#define FP8_MIN_NORMAL 0x1p-6f
#define FP8_SUB_STEP 0x1p-9f
#else /* e5m2: exponent bias 15, 2 mantissa bits, max 57344 */
#define FP8_MBITS 2
#define FP8_BIAS 15
#define FP8_MAX 57344.0f
#define FP8_MAX_CODE 0x7bu
#define FP8_MIN_NORMAL 0x1p-14f
#define FP8_SUB_STEP 0x1p-16f
#endif
#define FP8_SHIFT (23 - FP8_MBITS)

/* fp8 byte -> float, exact and branch-free (so the loads vectorise): a normal
 * code's exponent and mantissa bits move to float's places and are rebiased; a
 * code with a zero exponent (zero or subnormal) is its mantissa times the
 * subnormal step. Float subnormals never appear, so no denormal slow path. */
static inline float cache_to_float(cache_t x) {
    uint32_t em = x & 0x7fu;
    uint32_t normal = (em << FP8_SHIFT) + ((uint32_t)(127 - FP8_BIAS) << 23);
    float sub = (float)em * FP8_SUB_STEP;
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    uint32_t bits = ((em >> FP8_MBITS) ? normal : sub_bits) | ((uint32_t)(x & 0x80u) << 24);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* x / scale as fp8: round to nearest even, saturate to +-max (NaN stays NaN).
 * The division, not a multiplication by 1/scale, so that the stored byte is
 * exactly the SDK's quantize_kv_fp8 (x.float() / scale). */
static inline cache_t cache_from_input(scalar_t in, float scale) {
    float f = to_float(in) / scale;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint8_t sign = (uint8_t)((bits >> 24) & 0x80u);
    float a = fabsf(f);
    if (a != a) return (cache_t)(sign | 0x7fu);
    if (a >= FP8_MAX) return (cache_t)(sign | FP8_MAX_CODE);
    if (a < FP8_MIN_NORMAL) return (cache_t)(sign | (uint8_t)rintf(a / FP8_SUB_STEP));
    uint32_t mag = bits & 0x7fffffffu;
    mag += (1u << (FP8_SHIFT - 1)) - 1u + ((mag >> FP8_SHIFT) & 1u); /* to nearest even */
    uint32_t code = (mag >> FP8_SHIFT) - ((uint32_t)(127 - FP8_BIAS) << FP8_MBITS);
    return (cache_t)(sign | (code > FP8_MAX_CODE ? FP8_MAX_CODE : code));
}
#endif

/* Scores minus their running max are <= 0; exp_clamped maps them to [0, 1]. */
static inline float exp_nonpositive(float x) { return exp_clamped(x); }

#define MASKED (-1e30f)

/* Soft-capping (AttentionSpec.logits_soft_cap): s -> cap * tanh(s / cap) on the
 * scaled scores, before the mask and the softmax; cap <= 0 means none. */
static inline void soft_cap_scores(float *s, int count, float cap) {
    for (int j = 0; j < count; j++) s[j] = cap * tanhf(s[j] / cap);
}

/* Where key/value element (token j of the block, head element d) lives in a block.
 * bf16 queries with AVX512-BF16 use a pair layout:
 *   key   [HEAD_SIZE/2][BLOCK_SIZE][2]  (two head elements of a key side by side)
 *   value [BLOCK_SIZE/2][HEAD_SIZE][2]  (the same element of two keys side by side)
 * so one 64-byte load holds 16 keys x 2 elements of q.K, or 16 elements x 2 keys of
 * p.V, whose halves become float32 vectors by a shift and a mask (even_half,
 * odd_half). An fp8 cache uses the same layout in bytes: 32 loaded bytes widen to
 * 32 bf16 (every fp8 value is exact in bf16) first (load_pairs).
 * Otherwise keys are [HEAD_SIZE][BLOCK_SIZE] and values [BLOCK_SIZE][HEAD_SIZE]. */
#if SCALAR_KIND == 1 && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    BLOCK_SIZE % 16 == 0 && HEAD_SIZE % 16 == 0
#define PAIR_LAYOUT 1
#include <immintrin.h>
static inline int64_t key_index(int j, int d) { return ((int64_t)(d >> 1) * BLOCK_SIZE + j) * 2 + (d & 1); }
static inline int64_t value_index(int j, int d) { return ((int64_t)(j >> 1) * HEAD_SIZE + d) * 2 + (j & 1); }
#else
#define PAIR_LAYOUT 0
static inline int64_t key_index(int j, int d) { return (int64_t)d * BLOCK_SIZE + j; }
static inline int64_t value_index(int j, int d) { return (int64_t)j * HEAD_SIZE + d; }
#endif

/* Tokens whose scores are computed before one softmax pass (the pair layout and the
 * AVX2 loop): the running max, the rescaling of the accumulators and the horizontal
 * reductions are paid once per chunk, not once per block. */
#define CHUNK_TOKENS (BLOCK_SIZE > 256 ? BLOCK_SIZE : 256)
#define CHUNK_BLOCKS (CHUNK_TOKENS / BLOCK_SIZE)
/* Blocks ahead of the one being scored whose lines are asked for (1-6 measured alike). */
#define PREFETCH_BLOCKS 2

/* Online softmax over one block's scores s (masked outside [lo, hi)): writes the
 * block's unnormalised weights p and the factor that rescales what was
 * accumulated so far, and updates the running max and sum. */
static inline void softmax_block(float s[GROUP][BLOCK_SIZE], float p[GROUP][BLOCK_SIZE], int lo,
                                 int hi, float run_max[GROUP], float run_sum[GROUP],
                                 float correction[GROUP]) {
    for (int g = 0; g < GROUP; g++) {
        for (int j = 0; j < BLOCK_SIZE; j++)
            if (j < lo || j >= hi) s[g][j] = MASKED;
        float block_max = run_max[g];
        for (int j = 0; j < BLOCK_SIZE; j++) block_max = s[g][j] > block_max ? s[g][j] : block_max;
        correction[g] = exp_nonpositive(run_max[g] - block_max);
        float block_sum = 0.0f;
        for (int j = 0; j < BLOCK_SIZE; j++) {
            float e = exp_nonpositive(s[g][j] - block_max);
            p[g][j] = (j < lo || j >= hi) ? 0.0f : e;
            block_sum += p[g][j];
        }
        run_sum[g] = run_sum[g] * correction[g] + block_sum;
        run_max[g] = block_max;
    }
}

#if PAIR_LAYOUT
#if CACHE_KIND == 0
/* 32 bf16 of the cache (16 pairs). */
static inline __m512bh load_pairs(const cache_t *p, __m512i sub_lut) {
    (void)sub_lut;
    return (__m512bh)_mm512_loadu_si512(p);
}
#else
/* bf16 bits of the fp8 subnormal codes (mantissa m, zero exponent: m x FP8_SUB_STEP),
 * indexed by the code's low bits, for load_pairs. */
static inline __m512i fp8_subnormal_lut(void) {
    uint16_t lut[32] = {0};
    for (int m = 0; m < (1 << FP8_MBITS); m++) lut[m] = float_to_bf16((float)m * FP8_SUB_STEP);
    return _mm512_loadu_si512(lut);
}

/* 32 fp8 bytes (16 pairs) widened to bf16, exactly: a normal code's exponent and
 * mantissa shift into bf16's places and are rebiased; subnormal codes come from
 * the table; the sign moves to bit 15. */
static inline __m512bh load_pairs(const cache_t *p, __m512i sub_lut) {
    __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    __m512i em = _mm512_and_si512(x, _mm512_set1_epi16(0x7f));
    __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(em, 7 - FP8_MBITS),
                                      _mm512_set1_epi16((short)((127 - FP8_BIAS) << 7)));
    __mmask32 subnormal = _mm512_cmplt_epu16_mask(em, _mm512_set1_epi16(1 << FP8_MBITS));
    __m512i magnitude = _mm512_mask_permutexvar_epi16(normal, subnormal, em, sub_lut);
    __m512i sign = _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8);
    return (__m512bh)_mm512_or_si512(magnitude, sign);
}
#endif

/* Lanes c .. c+15 of a block that lie in [lo, hi). */
static inline __mmask16 valid_lanes(int c, int lo, int hi) {
    int from = lo - c, to = hi - c;
    from = from < 0 ? 0 : (from > 16 ? 16 : from);
    to = to < 0 ? 0 : (to > 16 ? 16 : to);
    uint32_t below_to = (1u << to) - 1u, below_from = (1u << from) - 1u;
    return (__mmask16)(below_to & ~below_from);
}

/* The online softmax step of a chunk's scores s[g][0, count) (count a multiple of
 * 16; lanes outside [lo, hi) masked): the unnormalised weights go to p (0 where
 * masked) and the factor that rescales what was accumulated so far to correction. */
static inline void softmax_chunk_avx512(float s[GROUP][CHUNK_TOKENS], int count, int lo,
                                        int hi, float run_max[GROUP], float run_sum[GROUP],
                                        float correction[GROUP], float p[GROUP][CHUNK_TOKENS]) {
    for (int g = 0; g < GROUP; g++) {
        __m512 vmax = _mm512_set1_ps(run_max[g]);
        for (int c = 0; c < count; c += 16)
            vmax = _mm512_mask_max_ps(vmax, valid_lanes(c, lo, hi), vmax,
                                      _mm512_loadu_ps(&s[g][c]));
        const float chunk_max = _mm512_reduce_max_ps(vmax);
        correction[g] = exp_nonpositive(run_max[g] - chunk_max);
        const __m512 max16 = _mm512_set1_ps(chunk_max);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < count; c += 16) {
            __m512 e = exp_clamped16(_mm512_sub_ps(_mm512_loadu_ps(&s[g][c]), max16));
            e = _mm512_maskz_mov_ps(valid_lanes(c, lo, hi), e);
            sum = _mm512_add_ps(sum, e);
            _mm512_storeu_ps(&p[g][c], e);
        }
        run_sum[g] = run_sum[g] * correction[g] + _mm512_reduce_add_ps(sum);
        run_max[g] = chunk_max;
    }
}

/* The two bf16 halves of each 32-bit lane of a pair load as float32: the even
 * element (low half) and the odd one (high half). */
static inline __m512 even_half(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
static inline __m512 odd_half(__m512i pairs) {
    return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xffff0000u)));
}
#endif

/* AMX builds (BACKPLANE_AMX=1, where the platform runs its GEMMs on tiles): q.K of a
 * bf16 cache on TDPBF16PS. The pair layout's keys are the instruction's B operand as
 * they lie: rows of 16 keys x 2 head elements, one 64-byte row per element pair, so
 * a 16-key group against GROUP query heads is HEAD_SIZE / 32 tile multiplies (query
 * tiles of GROUP rows x 32 elements, loaded once per item). On the AMX Xeon this
 * takes ~1/8 of the FMA time; p.V stays on FMAs. Tiles: the query slices first, then
 * two key tiles, then two score accumulators used in turn, so one group's scores are
 * stored while the next group's multiplies run. */
#if defined(BACKPLANE_AMX) && BACKPLANE_AMX
#include "amx_common.h" /* amx_enable, which the loader calls, in every AMX build */
#endif
#if PAIR_LAYOUT && defined(BACKPLANE_AMX) && BACKPLANE_AMX && CACHE_KIND == 0 && \
    GROUP <= 16 && (HEAD_SIZE == 64 || HEAD_SIZE == 128)
#define AMX_SCORES 1
/* Tile numbers are spelt out: the intrinsics paste them into the assembly. */
#if HEAD_SIZE == 64
#define Q_TILES 2
#define KEY_TILE_A 2
#define KEY_TILE_B 3
#define SCORE_TILE_A 4
#define SCORE_TILE_B 5
#else
#define Q_TILES 4
#define KEY_TILE_A 4
#define KEY_TILE_B 5
#define SCORE_TILE_A 6
#define SCORE_TILE_B 7
#endif

static inline void configure_attention_tiles(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < Q_TILES + 4; t++) {
        const int key = t == KEY_TILE_A || t == KEY_TILE_B;
        cfg.rows[t] = key ? 16 : GROUP;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* The query slices of one item into tiles 0 .. Q_TILES-1. */
static inline void load_query_tiles(const scalar_t *q_row) {
    _tile_loadd(0, q_row, HEAD_SIZE * 2);
    _tile_loadd(1, q_row + 32, HEAD_SIZE * 2);
#if HEAD_SIZE == 128
    _tile_loadd(2, q_row + 64, HEAD_SIZE * 2);
    _tile_loadd(3, q_row + 96, HEAD_SIZE * 2);
#endif
}

/* Scores of keys c .. c+15 of block kb against every query head, into tile S. */
#define SCORE_GROUP(S, kb, c)                                                          \
    do {                                                                               \
        _tile_zero(S);                                                                 \
        _tile_loadd(KEY_TILE_A, (kb) + key_index((c), 0), BLOCK_SIZE * 4);            \
        _tile_dpbf16ps(S, 0, KEY_TILE_A);                                              \
        _tile_loadd(KEY_TILE_B, (kb) + key_index((c), 32), BLOCK_SIZE * 4);           \
        _tile_dpbf16ps(S, 1, KEY_TILE_B);                                              \
        SCORE_GROUP_128(S, kb, c);                                                     \
    } while (0)
#if HEAD_SIZE == 128
#define SCORE_GROUP_128(S, kb, c)                                                      \
    do {                                                                               \
        _tile_loadd(KEY_TILE_A, (kb) + key_index((c), 64), BLOCK_SIZE * 4);           \
        _tile_dpbf16ps(S, 2, KEY_TILE_A);                                              \
        _tile_loadd(KEY_TILE_B, (kb) + key_index((c), 96), BLOCK_SIZE * 4);           \
        _tile_dpbf16ps(S, 3, KEY_TILE_B);                                              \
    } while (0)
#else
#define SCORE_GROUP_128(S, kb, c) do { } while (0)
#endif
#define ATTENTION_TILES_BEGIN configure_attention_tiles()
#define ATTENTION_TILES_END _tile_release()
#else
#define AMX_SCORES 0
#define ATTENTION_TILES_BEGIN do { } while (0)
#define ATTENTION_TILES_END do { } while (0)
#endif

/* Ask for the next block's keys and values while this one is computed. A decode
 * step reads each layer's blocks once, long after the weights of the layers in
 * between have pushed them out of the caches; without this each block waits on
 * memory (a batch-1 call took ~40 us in the engine against ~15 us warm). */
static inline void prefetch_block(int64_t block, const cache_t *key_cache,
                                  const cache_t *value_cache) {
    const char *k = (const char *)(key_cache + block * (HEAD_SIZE * BLOCK_SIZE));
    const char *v = (const char *)(value_cache + block * (BLOCK_SIZE * HEAD_SIZE));
    for (int64_t off = 0; off < (int64_t)(HEAD_SIZE * BLOCK_SIZE * sizeof(cache_t)); off += 64) {
        __builtin_prefetch(k + off);
        __builtin_prefetch(v + off);
    }
}

/* Blocks cb .. cb+nblk-1 of a chunk (at most CHUNK_BLOCKS, up to end_block), and the
 * range [lo, hi) of the chunk's token offsets the query sees (keys first .. seq_len-1). */
static inline void chunk_bounds(int32_t cb, int32_t end_block, int32_t first, int32_t seq_len,
                                int *nblk, int *lo, int *hi) {
    *nblk = end_block - cb < CHUNK_BLOCKS ? end_block - cb : CHUNK_BLOCKS;
    const int32_t base = cb * BLOCK_SIZE;
    *lo = first > base ? first - base : 0;
    *hi = seq_len - base < *nblk * BLOCK_SIZE ? seq_len - base : *nblk * BLOCK_SIZE;
}

/* The keys and values of the block PREFETCH_BLOCKS after block b of the request, to be
 * asked for while b is scored (NULL past the request's last block). */
static inline void block_ahead(int32_t b, int32_t end_block, int64_t head_base,
                               const int32_t *block_table, const cache_t *key_cache,
                               const cache_t *value_cache, const char **pf_k,
                               const char **pf_v) {
    *pf_k = *pf_v = NULL;
    if (b + PREFETCH_BLOCKS < end_block) {
        const int64_t ahead = head_base + block_table[b + PREFETCH_BLOCKS];
        *pf_k = (const char *)(key_cache + ahead * (HEAD_SIZE * BLOCK_SIZE));
        *pf_v = (const char *)(value_cache + ahead * (BLOCK_SIZE * HEAD_SIZE));
    }
}

#if PAIR_LAYOUT
/* Scores of the 16 keys of block kb at c .. c+15 against every query head of the
 * group: one 64-byte load of key pairs feeds GROUP x 2 float32 FMAs. float32 FMAs,
 * not vdpbf16ps: on Sapphire Rapids one vdpbf16ps issues every ~2 cycles (32
 * products) while two FMAs issue per cycle (32 products), so splitting the pairs
 * into their float halves and using FMAs takes about half the time. */
static inline void block_scores(const cache_t *kb, int c, const float q[GROUP][HEAD_SIZE],
                                __m512i sub_lut, float mult, float s[GROUP][CHUNK_TOKENS], int at,
                                const char *pf_k, const char *pf_v) {
    __m512 dot[GROUP];
    for (int g = 0; g < GROUP; g++) dot[g] = _mm512_setzero_ps();
    for (int dp = 0; dp < HEAD_SIZE / 2; dp++) {
        if (pf_k) {
            /* One line of a later block's keys and one of its values per step: spread
             * out, the prefetches never wait for a free fill buffer. */
            const int64_t off = ((int64_t)(c / 16) * (HEAD_SIZE / 2) + dp) * 32 * (int64_t)sizeof(cache_t);
            __builtin_prefetch(pf_k + off);
            __builtin_prefetch(pf_v + off);
        }
        const __m512i keys = (__m512i)load_pairs(kb + key_index(c, 2 * dp), sub_lut);
        const __m512 even = even_half(keys), odd = odd_half(keys);
        for (int g = 0; g < GROUP; g++) {
            dot[g] = _mm512_fmadd_ps(even, _mm512_set1_ps(q[g][2 * dp]), dot[g]);
            dot[g] = _mm512_fmadd_ps(odd, _mm512_set1_ps(q[g][2 * dp + 1]), dot[g]);
        }
    }
    for (int g = 0; g < GROUP; g++)
        _mm512_storeu_ps(&s[g][at], _mm512_mul_ps(dot[g], _mm512_set1_ps(mult)));
}
#endif

/* x86 CPUs with AVX2 + FMA outside the pair layout (every dtype on AVX2-only CPUs,
 * float32 and float16 on AVX-512 ones): the pair layout's chunked loop on 8-lane
 * vectors over the plain layout. Per head element, one load of 8 contiguous keys
 * feeds GROUP FMAs (one per query head); the softmax runs once per chunk on whole
 * vectors; p.V takes 8 head elements of a value row per load (16 keys and 16 head
 * elements per broadcast where GROUP <= 6: SCORE_LANES, VALUE_LANES). The portable loop
 * below (per-block softmax, gcc's vectorisation) ran at ~11 GFLOP/s on a Zen 2.
 * BACKPLANE_PORTABLE_ATTENTION=1 builds the portable loop anyway (tests). */
#if !PAIR_LAYOUT && defined(__AVX2__) && defined(__FMA__) && BLOCK_SIZE % 8 == 0 && \
    HEAD_SIZE % 8 == 0 && (SCALAR_KIND != 2 || defined(__F16C__)) &&                    \
    !(defined(BACKPLANE_PORTABLE_ATTENTION) && BACKPLANE_PORTABLE_ATTENTION)
#define AVX2_LOOP 1
#include <immintrin.h>

/* 8 consecutive cache elements as float32, exactly (cache_to_float on 8 lanes). */
static inline __attribute__((always_inline)) __m256 load8(const cache_t *p) {
#if CACHE_KIND == 0 && SCALAR_KIND == 0
    return _mm256_loadu_ps(p);
#elif CACHE_KIND == 0 && SCALAR_KIND == 1
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
#elif CACHE_KIND == 0
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i em = _mm256_and_si256(x, _mm256_set1_epi32(0x7f));
    const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(em, FP8_SHIFT),
                                            _mm256_set1_epi32((127 - FP8_BIAS) << 23));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(FP8_SUB_STEP));
    const __m256i is_normal = _mm256_cmpgt_epi32(_mm256_srli_epi32(em, FP8_MBITS),
                                                 _mm256_setzero_si256());
    const __m256i magnitude = _mm256_blendv_epi8(_mm256_castps_si256(sub), normal, is_normal);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
    return _mm256_castsi256_ps(_mm256_or_si256(magnitude, sign));
#endif
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* All-ones in the lanes c .. c+7 that lie in [lo, hi). */
static inline __m256 valid8(int c, int lo, int hi) {
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(c),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_castsi256_ps(_mm256_and_si256(
        _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(lo - 1)),
        _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), idx)));
}

/* softmax_chunk_avx512 on 8 lanes: masked lanes (which may hold scores of stale
 * cache rows past the sequence) take no part in the max and get weight 0. */
static inline void softmax_chunk_avx2(float s[GROUP][CHUNK_TOKENS], int count, int lo, int hi,
                                      float run_max[GROUP], float run_sum[GROUP],
                                      float correction[GROUP], float p[GROUP][CHUNK_TOKENS]) {
    for (int g = 0; g < GROUP; g++) {
        __m256 vmax = _mm256_set1_ps(run_max[g]);
        for (int c = 0; c < count; c += 8)
            vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(vmax, _mm256_loadu_ps(&s[g][c]),
                                                        valid8(c, lo, hi)));
        const float chunk_max = hmax8(vmax);
        correction[g] = exp_nonpositive(run_max[g] - chunk_max);
        const __m256 max8 = _mm256_set1_ps(chunk_max);
        __m256 sum = _mm256_setzero_ps();
        for (int c = 0; c < count; c += 8) {
            __m256 e = exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(&s[g][c]), max8));
            e = _mm256_and_ps(e, valid8(c, lo, hi));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(&p[g][c], e);
        }
        run_sum[g] = run_sum[g] * correction[g] + hsum8(sum);
        run_max[g] = chunk_max;
    }
}

/* Keys one scoring pass takes: 16 (two vectors per query head) where the 2 x GROUP
 * accumulators, two key vectors and a broadcast fit the 16 ymm registers, else 8. */
#define SCORE_LANES (GROUP <= 6 && BLOCK_SIZE % 16 == 0 ? 16 : 8)
/* Head elements whose SCORE_LANES keys fill one cache line (the loop below asks for one
 * line of a later block's keys and one of its values per such run). */
#define KEY_RUN_BYTES (SCORE_LANES * (int)sizeof(cache_t))
#define ELEMS_PER_LINE (KEY_RUN_BYTES < 64 ? 64 / KEY_RUN_BYTES : 1)

/* Scores of keys c .. c+SCORE_LANES-1 of block kb against every query head (q already
 * scaled), summed over the head elements in order, as the portable loop does. pf_k,
 * pf_v: a later block's keys and values (or NULL), whose lines are asked for a few at
 * a time: the whole block at once (prefetch_block) filled the fill buffers, and on a
 * Zen 3 a 64-request step at 1000-token contexts ran at ~5 GB/s. */
static inline void block_scores_avx2(const cache_t *kb, int c, const float q[GROUP][HEAD_SIZE],
                                     float s[GROUP][CHUNK_TOKENS], int at, const char *pf_k,
                                     const char *pf_v) {
    enum { K = SCORE_LANES / 8 };
    __m256 dot[GROUP][K];
    for (int g = 0; g < GROUP; g++)
        for (int h = 0; h < K; h++) dot[g][h] = _mm256_setzero_ps();
    for (int d0 = 0; d0 < HEAD_SIZE; d0 += ELEMS_PER_LINE) {
        if (pf_k) {
            /* keys c.. of elements d0.. are this many bytes into the block's keys */
            const int64_t off = ((int64_t)(c / SCORE_LANES) * HEAD_SIZE + d0) * SCORE_LANES *
                                (int64_t)sizeof(cache_t);
            __builtin_prefetch(pf_k + off);
            __builtin_prefetch(pf_v + off);
        }
        for (int d = d0; d < d0 + ELEMS_PER_LINE; d++) {
            __m256 keys[K];
            for (int h = 0; h < K; h++) keys[h] = load8(kb + key_index(c + 8 * h, d));
            for (int g = 0; g < GROUP; g++) {
                const __m256 w = _mm256_broadcast_ss(&q[g][d]);
                for (int h = 0; h < K; h++) dot[g][h] = _mm256_fmadd_ps(w, keys[h], dot[g][h]);
            }
        }
    }
    for (int g = 0; g < GROUP; g++)
        for (int h = 0; h < K; h++) _mm256_storeu_ps(&s[g][at + 8 * h], dot[g][h]);
}

/* Value columns one p.V pass accumulates: two 8-lane vectors per query head where the
 * 2 x GROUP accumulators, the two value vectors and a broadcast fit the 16 ymm
 * registers, so each broadcast weight feeds two FMAs; else one (at GROUP 7 the
 * spilled accumulator cost what the broadcasts saved). */
#define VALUE_LANES (GROUP <= 6 && HEAD_SIZE % 16 == 0 ? 16 : 8)

/* acc[g][dc .. dc+VALUE_LANES-1] = acc * correction + sum over the chunk's tokens of
 * p x value: each load of a value row's 8 elements feeds GROUP FMAs. */
static inline void accumulate_values_avx2(const cache_t *value_cache, int64_t head_base,
                                          const int32_t *blocks, int nblk, int lo, int hi,
                                          int dc, const float p[GROUP][CHUNK_TOKENS],
                                          const float correction[GROUP],
                                          float acc[GROUP][HEAD_SIZE]) {
    enum { V = VALUE_LANES / 8 };
    __m256 out[GROUP][V];
    for (int g = 0; g < GROUP; g++)
        for (int h = 0; h < V; h++)
            out[g][h] = _mm256_mul_ps(_mm256_loadu_ps(&acc[g][dc + 8 * h]),
                                      _mm256_set1_ps(correction[g]));
    for (int i = 0; i < nblk; i++) {
        const cache_t *vb = value_cache + (head_base + blocks[i]) * (BLOCK_SIZE * HEAD_SIZE);
        const int jlo = lo > i * BLOCK_SIZE ? lo - i * BLOCK_SIZE : 0;
        const int jhi = hi - i * BLOCK_SIZE < BLOCK_SIZE ? hi - i * BLOCK_SIZE : BLOCK_SIZE;
        for (int j = jlo; j < jhi; j++) {
            __m256 v[V];
            for (int h = 0; h < V; h++) v[h] = load8(vb + value_index(j, dc + 8 * h));
            for (int g = 0; g < GROUP; g++) {
                const __m256 w = _mm256_broadcast_ss(&p[g][i * BLOCK_SIZE + j]);
                for (int h = 0; h < V; h++) out[g][h] = _mm256_fmadd_ps(w, v[h], out[g][h]);
            }
        }
    }
    for (int g = 0; g < GROUP; g++)
        for (int h = 0; h < V; h++) _mm256_storeu_ps(&acc[g][dc + 8 * h], out[g][h]);
}
#else
#define AVX2_LOOP 0
#endif

/* k_scale, v_scale: the cache's dequantisation scales (1 unless CACHE_KIND is fp8). */
static void attend_one(const scalar_t *q_row, const cache_t *key_cache,
                       const cache_t *value_cache, int64_t num_blocks_total,
                       const int32_t *block_table, int32_t seq_len, int32_t window,
                       int64_t kv_head, float scale, float soft_cap, float k_scale,
                       float v_scale, scalar_t *out_row) {
    float acc[GROUP][HEAD_SIZE];
    float run_max[GROUP], run_sum[GROUP], correction[GROUP];
    for (int g = 0; g < GROUP; g++) {
        for (int d = 0; d < HEAD_SIZE; d++) acc[g][d] = 0.0f;
        run_max[g] = MASKED;
        run_sum[g] = 0.0f;
    }
    /* A query at position seq_len - 1 sees keys [first, seq_len). */
    const int32_t first = (window > 0 && seq_len > window) ? seq_len - window : 0;
    const int32_t end_block = (seq_len + BLOCK_SIZE - 1) / BLOCK_SIZE;
    const int64_t head_base = kv_head * num_blocks_total;
#if PAIR_LAYOUT
#if !AMX_SCORES
    float q[GROUP][HEAD_SIZE];
    for (int g = 0; g < GROUP; g++)
        for (int d = 0; d < HEAD_SIZE; d++) q[g][d] = to_float(q_row[g * HEAD_SIZE + d]);
#endif
#if CACHE_KIND == 0
    const __m512i sub_lut = _mm512_setzero_si512();
#else
    const __m512i sub_lut = fp8_subnormal_lut();
#endif
    float s[GROUP][CHUNK_TOKENS], p[GROUP][CHUNK_TOKENS];
#if AMX_SCORES
    load_query_tiles(q_row);
#endif
    for (int32_t b = first / BLOCK_SIZE; b < end_block && b < first / BLOCK_SIZE + PREFETCH_BLOCKS; b++)
        prefetch_block(head_base + block_table[b], key_cache, value_cache);
    for (int32_t cb = first / BLOCK_SIZE; cb < end_block; cb += CHUNK_BLOCKS) {
        int nblk, lo, hi;
        chunk_bounds(cb, end_block, first, seq_len, &nblk, &lo, &hi);
#if AMX_SCORES
        /* 16-key groups in turn on two accumulators: group j's scores are stored once
         * group j + 1's multiplies are queued behind them. */
        const int groups = nblk * (BLOCK_SIZE / 16);
        for (int j = 0; j <= groups; j++) {
            if (j < groups) {
                const int i = j / (BLOCK_SIZE / 16), c = (j % (BLOCK_SIZE / 16)) * 16;
                if (c == 0 && cb + i + PREFETCH_BLOCKS < end_block)
                    prefetch_block(head_base + block_table[cb + i + PREFETCH_BLOCKS], key_cache,
                                   value_cache);
                const cache_t *kb = key_cache + (head_base + block_table[cb + i]) * (HEAD_SIZE * BLOCK_SIZE);
                if (j & 1) SCORE_GROUP(SCORE_TILE_B, kb, c);
                else SCORE_GROUP(SCORE_TILE_A, kb, c);
            }
            if (j > 0) {
                if (j & 1) _tile_stored(SCORE_TILE_A, &s[0][(j - 1) * 16], CHUNK_TOKENS * 4);
                else _tile_stored(SCORE_TILE_B, &s[0][(j - 1) * 16], CHUNK_TOKENS * 4);
            }
        }
        const __m512 mult = _mm512_set1_ps(scale * k_scale);
        for (int g = 0; g < GROUP; g++)
            for (int c = 0; c < nblk * BLOCK_SIZE; c += 16)
                _mm512_storeu_ps(&s[g][c], _mm512_mul_ps(_mm512_loadu_ps(&s[g][c]), mult));
#else
        for (int i = 0; i < nblk; i++) {
            const char *pf_k, *pf_v;
            block_ahead(cb + i, end_block, head_base, block_table, key_cache, value_cache,
                        &pf_k, &pf_v);
            const cache_t *kb = key_cache + (head_base + block_table[cb + i]) * (HEAD_SIZE * BLOCK_SIZE);
            for (int c = 0; c < BLOCK_SIZE; c += 16)
                block_scores(kb, c, q, sub_lut, scale * k_scale, s, i * BLOCK_SIZE + c, pf_k, pf_v);
        }
#endif
        if (soft_cap > 0.0f)
            for (int g = 0; g < GROUP; g++) soft_cap_scores(s[g], nblk * BLOCK_SIZE, soft_cap);
        softmax_chunk_avx512(s, nblk * BLOCK_SIZE, lo, hi, run_max, run_sum, correction, p);
        for (int dc = 0; dc < HEAD_SIZE; dc += 16) {
            __m512 out[GROUP];
            for (int g = 0; g < GROUP; g++)
                out[g] = _mm512_mul_ps(_mm512_loadu_ps(&acc[g][dc]), _mm512_set1_ps(correction[g]));
            for (int i = 0; i < nblk; i++) {
                const cache_t *vb = value_cache + (head_base + block_table[cb + i]) * (BLOCK_SIZE * HEAD_SIZE);
                const int jlo = lo > i * BLOCK_SIZE ? lo - i * BLOCK_SIZE : 0;
                const int jhi = hi - i * BLOCK_SIZE < BLOCK_SIZE ? hi - i * BLOCK_SIZE : BLOCK_SIZE;
                const float *p_block = &p[0][i * BLOCK_SIZE];
                for (int jp = jlo / 2; jp < (jhi + 1) / 2; jp++) {
                    const __m512i values = (__m512i)load_pairs(vb + value_index(2 * jp, dc), sub_lut);
                    const __m512 even = even_half(values), odd = odd_half(values);
                    for (int g = 0; g < GROUP; g++) {
                        const float *pg = p_block + g * CHUNK_TOKENS + 2 * jp;
                        out[g] = _mm512_fmadd_ps(even, _mm512_set1_ps(pg[0]), out[g]);
                        out[g] = _mm512_fmadd_ps(odd, _mm512_set1_ps(pg[1]), out[g]);
                    }
                }
            }
            for (int g = 0; g < GROUP; g++) _mm512_storeu_ps(&acc[g][dc], out[g]);
        }
    }
#else
    float q[GROUP][HEAD_SIZE];
    for (int g = 0; g < GROUP; g++)
        for (int d = 0; d < HEAD_SIZE; d++)
            q[g][d] = to_float(q_row[g * HEAD_SIZE + d]) * scale * k_scale;
#if AVX2_LOOP
    float s[GROUP][CHUNK_TOKENS], p[GROUP][CHUNK_TOKENS];
    for (int32_t b = first / BLOCK_SIZE; b < end_block && b < first / BLOCK_SIZE + PREFETCH_BLOCKS; b++)
        prefetch_block(head_base + block_table[b], key_cache, value_cache);
    for (int32_t cb = first / BLOCK_SIZE; cb < end_block; cb += CHUNK_BLOCKS) {
        int nblk, lo, hi;
        chunk_bounds(cb, end_block, first, seq_len, &nblk, &lo, &hi);
        for (int i = 0; i < nblk; i++) {
            const char *pf_k, *pf_v;
            block_ahead(cb + i, end_block, head_base, block_table, key_cache, value_cache,
                        &pf_k, &pf_v);
            const cache_t *kb = key_cache + (head_base + block_table[cb + i]) * (HEAD_SIZE * BLOCK_SIZE);
            for (int c = 0; c < BLOCK_SIZE; c += SCORE_LANES)
                block_scores_avx2(kb, c, q, s, i * BLOCK_SIZE + c, pf_k, pf_v);
        }
        if (soft_cap > 0.0f)
            for (int g = 0; g < GROUP; g++) soft_cap_scores(s[g], nblk * BLOCK_SIZE, soft_cap);
        softmax_chunk_avx2(s, nblk * BLOCK_SIZE, lo, hi, run_max, run_sum, correction, p);
        for (int dc = 0; dc < HEAD_SIZE; dc += VALUE_LANES)
            accumulate_values_avx2(value_cache, head_base, block_table + cb, nblk, lo, hi, dc,
                                   p, correction, acc);
    }
#else
    for (int32_t b = first / BLOCK_SIZE; b < end_block; b++) {
        const int64_t block = head_base + block_table[b];
        const cache_t *kb = key_cache + block * (HEAD_SIZE * BLOCK_SIZE);
        const cache_t *vb = value_cache + block * (BLOCK_SIZE * HEAD_SIZE);
        if (b + 1 < end_block) prefetch_block(head_base + block_table[b + 1], key_cache, value_cache);
        int lo = first - b * BLOCK_SIZE;
        lo = lo < 0 ? 0 : lo;
        int hi = seq_len - b * BLOCK_SIZE;
        hi = hi > BLOCK_SIZE ? BLOCK_SIZE : hi;
        float s[GROUP][BLOCK_SIZE], p[GROUP][BLOCK_SIZE];
        for (int g = 0; g < GROUP; g++)
            for (int j = 0; j < BLOCK_SIZE; j++) s[g][j] = 0.0f;
        for (int d = 0; d < HEAD_SIZE; d++) {
            float k[BLOCK_SIZE];
            for (int j = 0; j < BLOCK_SIZE; j++) k[j] = cache_to_float(kb[key_index(j, d)]);
            for (int g = 0; g < GROUP; g++)
                for (int j = 0; j < BLOCK_SIZE; j++) s[g][j] = MULADD(q[g][d], k[j], s[g][j]);
        }
        if (soft_cap > 0.0f) soft_cap_scores(&s[0][0], GROUP * BLOCK_SIZE, soft_cap);
        softmax_block(s, p, lo, hi, run_max, run_sum, correction);
        for (int g = 0; g < GROUP; g++)
            for (int d = 0; d < HEAD_SIZE; d++) acc[g][d] *= correction[g];
        for (int j = lo; j < hi; j++) {
            float v[HEAD_SIZE];
            for (int d = 0; d < HEAD_SIZE; d++) v[d] = cache_to_float(vb[value_index(j, d)]);
            for (int g = 0; g < GROUP; g++)
                for (int d = 0; d < HEAD_SIZE; d++) acc[g][d] = MULADD(p[g][j], v[d], acc[g][d]);
        }
    }
#endif
#endif
    for (int g = 0; g < GROUP; g++) {
        float inv = run_sum[g] > 0.0f ? v_scale / run_sum[g] : 0.0f;
        for (int d = 0; d < HEAD_SIZE; d++) out_row[g * HEAD_SIZE + d] = from_float(acc[g][d] * inv);
    }
}

/* Which layout this build stores blocks in (1: pair layout), for tests reading the cache. */
int pair_layout(void) { return PAIR_LAYOUT; }

/* Whether this build runs the AVX2 loop (1) rather than the pair layout's or the
 * portable one, for tests. */
int avx2_loop(void) { return AVX2_LOOP; }

/* Store one token's key and value of KV head h at its slot (-1: padding, skipped). */
static inline void write_token_head(const scalar_t *k, const scalar_t *v, int64_t slot,
                                    int64_t h, int64_t num_blocks_total, float k_scale,
                                    float v_scale, cache_t *key_cache, cache_t *value_cache) {
    if (slot < 0) return;
    const int64_t block = slot / BLOCK_SIZE, offset = slot % BLOCK_SIZE;
    const int64_t base = (h * num_blocks_total + block) * (HEAD_SIZE * BLOCK_SIZE);
    for (int d = 0; d < HEAD_SIZE; d++) {
        key_cache[base + key_index((int)offset, d)] = cache_from_input(k[d], k_scale);
        value_cache[base + value_index((int)offset, d)] = cache_from_input(v[d], v_scale);
    }
}

/* The work items (token t, KV head h) of a call, shared by paged_attention and
 * decode_attention. With `slots` (decode_attention), each item first stores its
 * token's key and value of head h (key/value rows as write_kv takes them); with
 * token_reqs NULL, token t is request t's. */
static void attend_items(const scalar_t *query, int64_t query_token_stride, const scalar_t *key,
                         int64_t key_token_stride, const scalar_t *value,
                         int64_t value_token_stride, const int64_t *slots, cache_t *key_cache,
                         cache_t *value_cache, int64_t num_blocks_total,
                         const int32_t *block_tables, int64_t block_table_stride,
                         const int32_t *token_reqs, const int32_t *token_seq_lens,
                         int64_t num_tokens, int64_t num_kv_heads, int32_t window, float scale,
                         float soft_cap, const float *kv_scales, scalar_t *out,
                         int64_t out_token_stride) {
    const int64_t items = num_tokens * num_kv_heads;
    const float k_scale = kv_scales[0], v_scale = kv_scales[1];
#pragma omp parallel
    {
        ATTENTION_TILES_BEGIN;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            const int64_t t = i / num_kv_heads, h = i % num_kv_heads;
            if (slots)
                write_token_head(key + t * key_token_stride + h * HEAD_SIZE,
                                 value + t * value_token_stride + h * HEAD_SIZE, slots[t], h,
                                 num_blocks_total, k_scale, v_scale, key_cache, value_cache);
            const int64_t req = token_reqs ? token_reqs[t] : t;
            attend_one(query + t * query_token_stride + h * GROUP * HEAD_SIZE, key_cache,
                       value_cache, num_blocks_total, block_tables + req * block_table_stride,
                       token_seq_lens[t], window, h, scale, soft_cap, k_scale, v_scale,
                       out + t * out_token_stride + h * GROUP * HEAD_SIZE);
        }
        ATTENTION_TILES_END;
    }
}

/* Attention of tokens [0, num_tokens) of a flat batch over the paged cache.
 * token_reqs[t]: the request (row of block_tables) of token t;
 * token_seq_lens[t]: keys token t sees (its position + 1).
 * query/out rows: token t, head h at row + t * token_stride + h * HEAD_SIZE.
 * kv_scales: the layer's [k_scale, v_scale] (read here, at each call, so an
 * update of the tensor in place takes effect at once). */
void paged_attention(const scalar_t *query, int64_t query_token_stride,
                     const cache_t *key_cache, const cache_t *value_cache,
                     int64_t num_blocks_total, const int32_t *block_tables,
                     int64_t block_table_stride, const int32_t *token_reqs,
                     const int32_t *token_seq_lens, int64_t num_tokens,
                     int64_t num_kv_heads, int32_t window, float scale, float soft_cap,
                     const float *kv_scales, scalar_t *out, int64_t out_token_stride) {
    /* no slots: nothing is written, the cache pointers are only read */
    attend_items(query, query_token_stride, NULL, 0, NULL, 0, NULL, (cache_t *)key_cache,
                 (cache_t *)value_cache, num_blocks_total, block_tables, block_table_stride,
                 token_reqs, token_seq_lens, num_tokens, num_kv_heads, window, scale, soft_cap,
                 kv_scales, out, out_token_stride);
}

/* paged_attention for a batch of one query token per request (decode) that also
 * stores each token's key and value (write_kv's arguments): the work item of token
 * t and KV head h writes them, then attends. Nothing else reads them in this call,
 * and the item reads that block right after, so the lines the write brings in are
 * the ones it reads: a separate write_kv waited on memory for each of them (~140 us
 * a layer at 64 requests, the block last touched a whole step earlier). */
void decode_attention(const scalar_t *query, int64_t query_token_stride, const scalar_t *key,
                      int64_t key_token_stride, const scalar_t *value,
                      int64_t value_token_stride, const int64_t *slots, cache_t *key_cache,
                      cache_t *value_cache, int64_t num_blocks_total,
                      const int32_t *block_tables, int64_t block_table_stride,
                      const int32_t *token_seq_lens, int64_t num_tokens, int64_t num_kv_heads,
                      int32_t window, float scale, float soft_cap, const float *kv_scales,
                      scalar_t *out, int64_t out_token_stride) {
    attend_items(query, query_token_stride, key, key_token_stride, value, value_token_stride,
                 slots, key_cache, value_cache, num_blocks_total, block_tables,
                 block_table_stride, NULL, token_seq_lens, num_tokens, num_kv_heads, window,
                 scale, soft_cap, kv_scales, out, out_token_stride);
}

/* Store the step's keys and values at their slots; slot -1 marks padding. An fp8
 * cache stores key / k_scale and value / v_scale (kv_scales as in paged_attention). */
void write_kv(const scalar_t *key, int64_t key_token_stride, const scalar_t *value,
              int64_t value_token_stride, const int64_t *slots, int64_t num_tokens,
              int64_t num_kv_heads, int64_t num_blocks_total, const float *kv_scales,
              cache_t *key_cache, cache_t *value_cache) {
    const float k_scale = kv_scales[0], v_scale = kv_scales[1];
#pragma omp parallel for schedule(static) if (num_tokens > 64)
    for (int64_t t = 0; t < num_tokens; t++)
        for (int64_t h = 0; h < num_kv_heads; h++)
            write_token_head(key + t * key_token_stride + h * HEAD_SIZE,
                             value + t * value_token_stride + h * HEAD_SIZE, slots[t], h,
                             num_blocks_total, k_scale, v_scale, key_cache, value_cache);
}
