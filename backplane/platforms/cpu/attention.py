"""Paged attention on the CPU, written as grouped matmuls over gathered KV blocks.

Measured on this project's x86 CI machine (torch 2.13, bf16, one thread):
torch's scaled_dot_product_attention takes ~11x longer than two matmuls and a
softmax for decode (one query token), and ~2x longer for prefill; gathering
whole blocks with index_select is ~5x cheaper than gathering single slots. So:

* The cache is head-major, ``[2, kv_heads, num_blocks, block_size, head_size]``:
  gathering a request's blocks yields ``[kv_heads, tokens, head_size]`` that
  matmul reads as is, with no transpose copy.
* Decode requests are attended together, in a few groups of similar length:
  one gather of the group's blocks (padded to the group's longest), then
  batched matmuls over (kv_head, request) with the query heads of a GQA group
  stacked as rows (grouped-query attention without repeating K/V).
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

from backplane.platforms.cpu.huge_pages import HeadMajorCpuCache
from backplane.plugins_sdk import CommonAttentionMetadata

# Largest score matrix (query rows x keys x heads) computed at once in prefill.
_MAX_SCORE_ELEMENTS = 1 << 24


@dataclass
class _PrefillChunk:
    query_start: int
    query_end: int
    context_len: int  # tokens already cached before this chunk
    block_ids: torch.Tensor  # [blocks] of the request, covering seq_len


@dataclass
class _DecodeGroup:
    """Decode requests of similar length, attended together (padded to the group's longest)."""

    token_idx: torch.Tensor  # [requests] rows of the flat query
    block_ids: torch.Tensor  # [requests * num_blocks]
    num_blocks: int
    bias: torch.Tensor  # [requests, 1, num_blocks * block_size] 0 or -inf


@dataclass
class CpuAttentionMetadata:
    """Per-step plan shared by every layer."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    decodes: list[_DecodeGroup]
    prefills: list[_PrefillChunk]


# A decode group is closed when the next (shorter) request would waste more than
# this share of the group's padded width: mixed lengths then cost about what they
# hold instead of what the longest request holds (measured: with contexts
# 64..640 at batch 64, one padded group spent 27% of the step in attention).
_MAX_GROUP_PADDING = 0.25


class CpuSdpaAttentionBackend(HeadMajorCpuCache):
    """Paged attention for the CPU from torch matmuls (the name is kept for configs)."""

    name = "cpu_sdpa"
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        block_size = self.spec.block_size
        qsl = common.query_start_loc_cpu
        seq_lens = common.seq_lens_cpu.to(torch.int64)
        query_lens = qsl[1:] - qsl[: common.num_reqs]
        block_table = common.block_table[: common.num_reqs].to("cpu", torch.int64)
        is_decode = query_lens == 1
        decode_rows = torch.nonzero(is_decode).flatten()

        decodes = []
        if decode_rows.numel():
            lens = seq_lens[decode_rows]
            order = torch.argsort(lens, descending=True, stable=True)
            rows_sorted, lens_sorted = decode_rows[order], lens[order]
            blocks_needed = ((lens_sorted + block_size - 1) // block_size).tolist()
            start = 0
            for end in range(1, len(blocks_needed) + 1):
                if end == len(blocks_needed) or (
                    blocks_needed[end] < (1 - _MAX_GROUP_PADDING) * blocks_needed[start]
                ):
                    decodes.append(self._decode_group(
                        rows_sorted[start:end], lens_sorted[start:end], blocks_needed[start],
                        block_table, qsl))
                    start = end

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
            decodes=decodes,
            prefills=prefills,
        )

    def _decode_group(self, rows, lens, num_blocks, block_table, qsl) -> _DecodeGroup:
        block_size = self.spec.block_size
        positions = torch.arange(num_blocks * block_size)
        hidden = positions[None, :] >= lens[:, None]
        if self.spec.sliding_window is not None:
            # A query at position p sees keys in (p - window, p], as transformers does.
            hidden |= positions[None, :] <= lens[:, None] - 1 - self.spec.sliding_window
        bias = torch.zeros(len(rows), 1, len(positions), dtype=torch.float32)
        bias.masked_fill_(hidden[:, None, :], float("-inf"))
        return _DecodeGroup(
            token_idx=qsl[rows].to(torch.int64),
            block_ids=block_table[rows, :num_blocks].flatten(),
            num_blocks=num_blocks,
            bias=bias,
        )

    def forward(self, query, key, value, kv_cache, metadata: CpuAttentionMetadata, scale):
        n = metadata.num_actual_tokens
        num_heads, num_kv_heads = self.spec.num_heads, self.spec.num_kv_heads
        head_size, block_size = self.spec.head_size, self.spec.block_size
        group_size = num_heads // num_kv_heads
        # [kv_heads, num_blocks * block_size, head]: slot-addressable views of the cache.
        key_cache = kv_cache[0].view(num_kv_heads, -1, head_size)
        value_cache = kv_cache[1].view(num_kv_heads, -1, head_size)
        key_cache.index_copy_(1, metadata.slot_mapping, key[:n].transpose(0, 1))
        value_cache.index_copy_(1, metadata.slot_mapping, value[:n].transpose(0, 1))

        out = torch.empty_like(query)
        for group in metadata.decodes:
            num_decodes = len(group.token_idx)
            length = group.num_blocks * block_size
            # [kv_heads, decodes, length, head]
            k = kv_cache[0].index_select(1, group.block_ids).view(
                num_kv_heads, num_decodes, length, head_size)
            v = kv_cache[1].index_select(1, group.block_ids).view(
                num_kv_heads, num_decodes, length, head_size)
            # [decodes, heads, head] -> [kv_heads, decodes, group, head]
            q = query[group.token_idx].view(num_decodes, num_kv_heads, group_size, head_size)
            q = q.transpose(0, 1)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            if self.spec.logits_soft_cap is not None:
                # Before the -inf bias: tanh would turn a masked -inf into a finite -cap.
                scores = torch.tanh(scores / self.spec.logits_soft_cap) * self.spec.logits_soft_cap
            scores += group.bias  # broadcasts over kv_heads and the query-head group
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            o = torch.matmul(probs, v)  # [kv_heads, decodes, group, head]
            out[group.token_idx] = o.transpose(0, 1).reshape(num_decodes, num_heads, head_size)
        for chunk in metadata.prefills:
            self._prefill(query, out, kv_cache, chunk, scale, group_size)
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
            if self.spec.logits_soft_cap is not None:
                scores = torch.tanh(scores / self.spec.logits_soft_cap) * self.spec.logits_soft_cap
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
