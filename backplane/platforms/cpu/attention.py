"""Paged attention on the CPU, written as grouped matmuls over gathered KV blocks.

Measured on this project's x86 CI machine (torch 2.13, bf16, one thread):
torch's scaled_dot_product_attention takes ~11x longer than two matmuls and a
softmax for decode (one query token), and ~2x longer for prefill; gathering
whole blocks with index_select is ~5x cheaper than gathering single slots. So:

* The cache is head-major, ``[2, kv_heads, num_blocks, block_size, head_size]``:
  gathering a request's blocks yields ``[kv_heads, tokens, head_size]`` that
  matmul reads as is, with no transpose copy.
* Decode requests are attended together: one gather of every decode request's
  blocks (padded to the longest), then batched matmuls over (kv_head, request)
  with the query heads of a group stacked as rows (grouped-query attention
  without repeating K/V).
* Prefill chunks are attended one request at a time (a loop over requests,
  never tokens), with the causal mask shifted by the cached context, in query
  slices that bound the score matrix's memory.

Masked positions may hold stale keys of a previous owner of the block; they are
finite (the cache starts zeroed and only ever receives real K/V), so their
zero softmax weight removes them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backplane.plugins_sdk import AttentionBackend, CommonAttentionMetadata

# Largest score matrix (query rows x keys x heads) computed at once in prefill.
_MAX_SCORE_ELEMENTS = 1 << 24


@dataclass
class _PrefillChunk:
    query_start: int
    query_end: int
    context_len: int  # tokens already cached before this chunk
    block_ids: torch.Tensor  # [blocks] of the request, covering seq_len


@dataclass
class CpuAttentionMetadata:
    """Per-step plan shared by every layer."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    decode_token_idx: torch.Tensor | None  # [num_decodes] rows of the flat query
    decode_block_ids: torch.Tensor | None  # [num_decodes * max_blocks]
    decode_num_blocks: int
    decode_bias: torch.Tensor | None  # [num_decodes, 1, max_len] 0 or -inf
    prefills: list[_PrefillChunk]


class CpuSdpaAttentionBackend(AttentionBackend):
    """Paged attention for the CPU from torch matmuls (the name is kept for configs)."""

    name = "cpu_sdpa"
    supports_sliding_window = True

    @classmethod
    def kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_kv_heads, num_blocks, block_size, head_size)

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        block_size = self.spec.block_size
        qsl = common.query_start_loc_cpu
        seq_lens = common.seq_lens_cpu.to(torch.int64)
        query_lens = qsl[1:] - qsl[: common.num_reqs]
        block_table = common.block_table[: common.num_reqs].to("cpu", torch.int64)
        is_decode = query_lens == 1
        decode_rows = torch.nonzero(is_decode).flatten()

        decode_token_idx = decode_block_ids = decode_bias = None
        decode_num_blocks = 0
        if decode_rows.numel():
            lens = seq_lens[decode_rows]
            decode_num_blocks = int(-(-int(lens.max()) // block_size))
            decode_block_ids = block_table[decode_rows, :decode_num_blocks].flatten()
            positions = torch.arange(decode_num_blocks * block_size)
            decode_bias = torch.zeros(len(decode_rows), 1, len(positions), dtype=torch.float32)
            hidden = positions[None, :] >= lens[:, None]
            if self.spec.sliding_window is not None:
                # A query at position p sees keys in (p - window, p], as transformers does.
                hidden |= positions[None, :] <= lens[:, None] - 1 - self.spec.sliding_window
            decode_bias.masked_fill_(hidden[:, None, :], float("-inf"))
            decode_token_idx = qsl[decode_rows].to(torch.int64)

        prefills = []
        for row in torch.nonzero(~is_decode).flatten().tolist():
            start, end = int(qsl[row]), int(qsl[row + 1])
            seq_len = int(seq_lens[row])
            num_blocks = -(-seq_len // block_size)
            prefills.append(_PrefillChunk(start, end, seq_len - (end - start),
                                          block_table[row, :num_blocks]))
        return CpuAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens,
            slot_mapping=common.slot_mapping[: common.num_actual_tokens].to("cpu", torch.int64),
            decode_token_idx=decode_token_idx,
            decode_block_ids=decode_block_ids,
            decode_num_blocks=decode_num_blocks,
            decode_bias=decode_bias,
            prefills=prefills,
        )

    def forward(self, query, key, value, kv_cache, metadata: CpuAttentionMetadata, scale):
        n = metadata.num_actual_tokens
        num_heads, num_kv_heads = self.spec.num_heads, self.spec.num_kv_heads
        head_size, block_size = self.spec.head_size, self.spec.block_size
        group = num_heads // num_kv_heads
        # [kv_heads, num_blocks * block_size, head]: slot-addressable views of the cache.
        key_cache = kv_cache[0].view(num_kv_heads, -1, head_size)
        value_cache = kv_cache[1].view(num_kv_heads, -1, head_size)
        key_cache.index_copy_(1, metadata.slot_mapping, key[:n].transpose(0, 1))
        value_cache.index_copy_(1, metadata.slot_mapping, value[:n].transpose(0, 1))

        out = torch.empty_like(query)
        if metadata.decode_token_idx is not None:
            num_decodes = len(metadata.decode_token_idx)
            length = metadata.decode_num_blocks * block_size
            # [kv_heads, decodes, length, head]
            k = kv_cache[0].index_select(1, metadata.decode_block_ids).view(
                num_kv_heads, num_decodes, length, head_size)
            v = kv_cache[1].index_select(1, metadata.decode_block_ids).view(
                num_kv_heads, num_decodes, length, head_size)
            # [decodes, heads, head] -> [kv_heads, decodes, group, head]
            q = query[metadata.decode_token_idx].view(num_decodes, num_kv_heads, group, head_size)
            q = q.transpose(0, 1)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            scores += metadata.decode_bias  # broadcasts over kv_heads and group
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            o = torch.matmul(probs, v)  # [kv_heads, decodes, group, head]
            out[metadata.decode_token_idx] = o.transpose(0, 1).reshape(
                num_decodes, num_heads, head_size)
        for chunk in metadata.prefills:
            self._prefill(query, out, kv_cache, chunk, scale, group)
        return out

    def _prefill(self, query, out, kv_cache, chunk: _PrefillChunk, scale, group) -> None:
        num_kv_heads, head_size = self.spec.num_kv_heads, self.spec.head_size
        q_len = chunk.query_end - chunk.query_start
        seq_len = chunk.context_len + q_len
        k = kv_cache[0].index_select(1, chunk.block_ids).view(num_kv_heads, -1, head_size)
        v = kv_cache[1].index_select(1, chunk.block_ids).view(num_kv_heads, -1, head_size)
        k, v = k[:, :seq_len], v[:, :seq_len]
        rows_per_slice = max(1, _MAX_SCORE_ELEMENTS // (seq_len * self.spec.num_heads))
        for lo in range(0, q_len, rows_per_slice):
            hi = min(lo + rows_per_slice, q_len)
            rows = hi - lo
            q = query[chunk.query_start + lo : chunk.query_start + hi]
            # [rows, heads, head] -> [kv_heads, group * rows, head]
            q = q.view(rows, num_kv_heads, group, head_size).permute(1, 2, 0, 3)
            q = q.reshape(num_kv_heads, group * rows, head_size)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            scores = scores.view(num_kv_heads, group, rows, seq_len)
            query_pos = torch.arange(chunk.context_len + lo, chunk.context_len + hi)
            key_pos = torch.arange(seq_len)[None, :]
            hidden = key_pos > query_pos[:, None]
            if self.spec.sliding_window is not None:
                hidden |= key_pos <= query_pos[:, None] - self.spec.sliding_window
            scores.masked_fill_(hidden, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(v.dtype).view(
                num_kv_heads, group * rows, seq_len)
            o = torch.matmul(probs, v).view(num_kv_heads, group, rows, head_size)
            out[chunk.query_start + lo : chunk.query_start + hi] = o.permute(2, 0, 1, 3).reshape(
                rows, -1, head_size)
