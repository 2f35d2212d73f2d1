"""Triton kernels for paged attention: KV-cache write and varlen causal attention.

Both kernels take the cache in the SDK's default layout, one tensor per K and V
shaped ``[num_blocks, block_size, num_kv_heads, head_size]`` (contiguous), so a
cache slot ``s`` starts ``s * num_kv_heads * head_size`` elements in.

The attention kernel runs one program per (request, KV head, tile of
``BLOCK_Q`` query tokens). The rows of its score tile are (query token, query
head) pairs over every query head sharing that KV head, so with grouped-query
attention each key/value tile is read once for the whole group rather than
once per query head (decode is bound by those reads). It walks the request's
keys in tiles of ``BLOCK_N`` positions, looks each position's block up in the
block table (so any cache block size works), and keeps a running max / sum
(online softmax) so the full score row is never materialised. Prefill chunks
with cached context, decode tokens and a mix of both are the same code path: a
query token at position ``p`` of its request sees keys ``0..p`` (the last
``window`` of them with a sliding window). Every per-request length is read from
device memory, so a launch is CUDA-graph capturable as long as the grid
(``num_reqs``, KV heads, query tiles) is unchanged between capture and replay.

fp8 KV cache: the cache tensors are torch fp8 (``float8_e4m3fn`` or
``float8_e5m2``) and the kernels see them as raw bytes (``uint8``). The write
kernel stores ``x / scale`` rounded to nearest even and saturated to the
format's max (exactly the SDK's ``quantize_kv_fp8``); the attention kernel
decodes each byte it loads with integer bit moves into the query's dtype (every
fp8 value is exact in fp16, bf16 and fp32) and applies the scales outside the
dot products: the scores by ``k_scale``, the output by ``v_scale``. Decoding
the bits ourselves, rather than through Triton's fp8 types, works on every GPU
(Triton's e4m3 type needs sm89+; MI300 has only the fnuz variants) and in the
interpreter. Both kernels read the scales from a device tensor, so a recorded
graph sees scales set after capture.

Importing this module imports triton; it runs on CPU tensors only under
``TRITON_INTERPRET=1`` (used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# torch fp8 dtype -> (mantissa bits, exponent bias, max, code of +max): the
# constants of the bit-level encode/decode below.
FP8_FORMATS = {
    torch.float8_e4m3fn: (3, 7, 448.0, 0x7E),
    torch.float8_e5m2: (2, 15, 57344.0, 0x7B),
}


@triton.jit
def _fp8_decode(bits, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """fp8 bytes -> float32, exact: a normal code's exponent and mantissa move to
    float's places and are rebiased; a zero exponent (zero, subnormal) is the
    mantissa times 2^(1 - BIAS - MBITS). No float subnormal is ever formed."""
    b = bits.to(tl.int32)
    em = b & 0x7F
    normal = ((em << (23 - MBITS)) + ((127 - BIAS) << 23)).to(tl.float32, bitcast=True)
    sub = em.to(tl.float32) * (2.0 ** (1 - BIAS - MBITS))
    magnitude = tl.where(em >= (1 << MBITS), normal, sub)
    return tl.where((b & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _fp8_encode(x, MBITS: tl.constexpr, BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
                MAX_CODE: tl.constexpr):
    """float32 -> fp8 bytes: round to nearest even, saturate to +-FP8_MAX."""
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.minimum(tl.abs(x), FP8_MAX)
    bits = a.to(tl.int32, bitcast=True)
    SHIFT: tl.constexpr = 23 - MBITS
    # Normal range: round the float's mantissa to MBITS bits (to nearest even), rebias.
    normal = ((bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) >> SHIFT) - (
        (127 - BIAS) << MBITS)
    # Below the smallest normal: a multiple of the subnormal step; adding and removing
    # 2^23 rounds the (< 2^MBITS + 1) multiple to the nearest even integer.
    steps = tl.minimum(a, 2.0 ** (1 - BIAS)) * (2.0 ** (BIAS + MBITS - 1))  # no int overflow
    sub = ((steps + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 2.0 ** (1 - BIAS), sub, normal)
    code = tl.minimum(code, MAX_CODE)
    return (code | sign).to(tl.uint8)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    kv_scales_ptr,
    key_token_stride,
    value_token_stride,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
    MBITS: tl.constexpr,
    BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MAX_CODE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # slot -1 marks a padding token whose K/V must not land anywhere in the cache:
    # its row length becomes 0 (a scalar-vs-block compare, which also keeps the
    # Triton interpreter happy where `block & scalar_bool` masks are not).
    mask = offs < tl.where(slot >= 0, ROW, 0)
    key = tl.load(key_ptr + token * key_token_stride + offs, mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + offs, mask=mask)
    if FP8:
        # div_rn: correctly rounded, like the reference's x / scale (plain `/` may not be).
        k_scale = tl.load(kv_scales_ptr)
        v_scale = tl.load(kv_scales_ptr + 1)
        key = _fp8_encode(tl.math.div_rn(key.to(tl.float32), k_scale),
                          MBITS, BIAS, FP8_MAX, MAX_CODE)
        value = _fp8_encode(tl.math.div_rn(value.to(tl.float32), v_scale),
                            MBITS, BIAS, FP8_MAX, MAX_CODE)
    tl.store(key_cache_ptr + slot * ROW + offs, key, mask=mask)
    tl.store(value_cache_ptr + slot * ROW + offs, value, mask=mask)


@triton.jit
def _paged_attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    kv_scales_ptr,
    scale,
    window,
    query_token_stride,
    query_head_stride,
    out_token_stride,
    out_head_stride,
    block_table_stride,
    NUM_KV_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP8: tl.constexpr,
    MBITS: tl.constexpr,
    BIAS: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)

    query_start = tl.load(query_start_loc_ptr + req)
    query_len = tl.load(query_start_loc_ptr + req + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - query_len

    # Row r of the tile is query token r // QUERIES_PER_KV of the tile, for query
    # head r % QUERIES_PER_KV of this KV head's group; BLOCK_M >= BLOCK_Q * group
    # is padded to a power of two (and >= 16 for tl.dot).
    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (token < query_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_SIZE
    query_pos = context_len + token

    q = tl.load(
        query_ptr
        + (query_start + token)[:, None].to(tl.int64) * query_token_stride
        + head[:, None] * query_head_stride
        + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    # A finite start value keeps exp(m_old - m_new) well defined for rows that
    # have seen only masked scores so far (padding rows of the last tile).
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if FP8:
        # q.(k_scale k) = k_scale (q.k): the key scale joins the softmax scale.
        scale = scale * tl.load(kv_scales_ptr)

    # Causality bounds the keys this tile needs: none past its last query position.
    # An empty tile (past the request's queries) runs no iterations.
    key_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)
    key_end = tl.where(tile * BLOCK_Q < query_len, key_end, 0)
    kv_slot_stride = NUM_KV_HEADS * HEAD_SIZE
    if HAS_WINDOW:
        # Sliding window: a query at position p sees keys p - window + 1 .. p, so the
        # tile's first query bounds the oldest key it needs.
        key_begin = tl.maximum(context_len + tile * BLOCK_Q - window + 1, 0)
        key_begin = (key_begin // BLOCK_N) * BLOCK_N
    else:
        key_begin = 0
    for key_start in range(key_begin, key_end, BLOCK_N):
        offs_n = key_start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < key_end
        block_ids = tl.load(
            block_table_ptr + req * block_table_stride + offs_n // CACHE_BLOCK_SIZE,
            mask=n_valid,
            other=0,
        )
        slots = block_ids.to(tl.int64) * CACHE_BLOCK_SIZE + offs_n % CACHE_BLOCK_SIZE
        kv_offsets = slots[:, None] * kv_slot_stride + kv_head * HEAD_SIZE + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        if FP8:
            k = _fp8_decode(tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0),
                            MBITS, BIAS).to(q.dtype)
        else:
            k = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * scale
        allowed = (offs_n[None, :] <= query_pos[:, None]) & n_valid[None, :]
        if HAS_WINDOW:
            allowed = allowed & (offs_n[None, :] > query_pos[:, None] - window)
        scores = tl.where(allowed, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            v = _fp8_decode(tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0),
                            MBITS, BIAS).to(q.dtype)
        else:
            v = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8:
        acc = acc * tl.load(kv_scales_ptr + 1)  # sum p (v_scale v) = v_scale (sum p v)
    tl.store(
        out_ptr
        + (query_start + token)[:, None].to(tl.int64) * out_token_stride
        + head[:, None] * out_head_stride
        + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [tokens, heads, head_size] with each token's heads packed contiguously."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


def _fp8_args(key_cache: torch.Tensor, value_cache: torch.Tensor,
              kv_scales: torch.Tensor | None, caller: str):
    """(key cache, value cache, scales, fp8 constants) as the kernels take them: an fp8
    cache as raw bytes with its format's constants; else the caches as they are."""
    fmt = FP8_FORMATS.get(key_cache.dtype)
    if fmt is None:
        if value_cache.dtype in FP8_FORMATS:
            raise ValueError(f"{caller}: value_cache is {value_cache.dtype} but key_cache is "
                             f"{key_cache.dtype}; both or neither must be fp8")
        # The scales pointer is never read without FP8; pass any tensor.
        return key_cache, value_cache, key_cache, (False, 0, 0, 0.0, 0)
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(f"{caller}: key_cache is {key_cache.dtype} but value_cache is "
                         f"{value_cache.dtype}")
    if (kv_scales is None or kv_scales.dtype != torch.float32 or kv_scales.numel() != 2
            or kv_scales.device != key_cache.device):
        got = None if kv_scales is None else (kv_scales.dtype, tuple(kv_scales.shape),
                                               str(kv_scales.device))
        raise ValueError(f"{caller}: an fp8 cache needs kv_scales, a float32 [k_scale, "
                         f"v_scale] on {key_cache.device}; got {got}")
    mbits, bias, fp8_max, max_code = fmt
    return (key_cache.view(torch.uint8), value_cache.view(torch.uint8), kv_scales.contiguous(),
            (True, mbits, bias, fp8_max, max_code))


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Store ``key``/``value`` [n, kv_heads, head] at ``slot_mapping`` [n]; slot -1 is skipped.

    An fp8 cache (``float8_e4m3fn`` / ``float8_e5m2``) stores ``key / kv_scales[0]`` and
    ``value / kv_scales[1]``, rounded to nearest even and saturated to the format's max.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("write_kv_cache: key_cache and value_cache must be contiguous")
    key_cache, value_cache, scales, (fp8, mbits, bias, fp8_max, max_code) = _fp8_args(
        key_cache, value_cache, kv_scales, "write_kv_cache")
    key, value = _token_rows(key), _token_rows(value)
    row = key.shape[1] * key.shape[2]
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        scales,
        key.stride(0),
        value.stride(0),
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
        FP8=fp8,
        MBITS=mbits,
        BIAS=bias,
        FP8_MAX=fp8_max,
        MAX_CODE=max_code,
    )


def default_tiles(max_query_len: int, queries_per_kv: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_N) for a step: about 64 score rows for prefill, 16 for decode."""
    target_rows = 16 if max_query_len <= 16 else 64
    block_q = max(1, target_rows // queries_per_kv)
    return min(block_q, triton.next_power_of_2(max_query_len)), 64


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_reqs: int,
    max_query_len: int,
    scale: float,
    block_q: int | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a flat varlen batch over the paged cache, written into ``out``.

    Args:
        query: [num_tokens, num_heads, head_size].
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], contiguous.
        out: like ``query``; rows of tokens outside every request are left untouched.
        block_table: [>= num_reqs, max_blocks] int32 block ids per request.
        query_start_loc: [num_reqs + 1] int32; seq_lens: [num_reqs] int32 (context + query).
        num_reqs, max_query_len: host-side grid sizes.
        block_q: query tokens per program; block_n: keys per inner step (a power of
            two >= 16). Both default by step shape (`default_tiles`).
        sliding_window: when set, a query at position p attends to keys
            p - sliding_window + 1 .. p only (the transformers convention).
        kv_scales: with an fp8 cache, the float32 [k_scale, v_scale] on the device:
            attention runs over ``stored * scale``.
    """
    if num_reqs == 0 or max_query_len == 0:
        return out
    _, cache_block_size, num_kv_heads, head_size = key_cache.shape
    num_heads = query.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("paged_attention: key_cache and value_cache must be contiguous")
    if query.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("paged_attention: query and out must be contiguous in head_size")
    key_cache, value_cache, scales, (fp8, mbits, bias, _, _) = _fp8_args(
        key_cache, value_cache, kv_scales, "paged_attention")
    queries_per_kv = num_heads // num_kv_heads
    default_q, default_n = default_tiles(max_query_len, queries_per_kv)
    block_q, block_n = block_q or default_q, block_n or default_n
    grid = (num_reqs, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        block_table,
        query_start_loc,
        seq_lens,
        scales,
        scale,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        QUERIES_PER_KV=queries_per_kv,
        HEAD_SIZE=head_size,
        CACHE_BLOCK_SIZE=cache_block_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_size)),
        BLOCK_Q=block_q,
        BLOCK_M=max(16, triton.next_power_of_2(block_q * queries_per_kv)),
        BLOCK_N=block_n,
        IEEE_DOT=query.dtype == torch.float32,
        HAS_WINDOW=sliding_window is not None,
        FP8=fp8,
        MBITS=mbits,
        BIAS=bias,
    )
    return out
