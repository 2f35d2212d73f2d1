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

Importing this module imports triton; it runs on CPU tensors only under
``TRITON_INTERPRET=1`` (used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    key_token_stride,
    value_token_stride,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
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
        v = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
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


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` [n, kv_heads, head] at ``slot_mapping`` [n]; slot -1 is skipped."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("write_kv_cache: key_cache and value_cache must be contiguous")
    key, value = _token_rows(key), _token_rows(value)
    row = key.shape[1] * key.shape[2]
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
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
    )
    return out
