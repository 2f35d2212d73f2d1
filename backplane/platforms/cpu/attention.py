"""Paged attention on the CPU with torch's scaled_dot_product_attention.

Decode requests (one query token) are attended together in one batched SDPA
call over keys gathered from their blocks; prefill chunks are attended one
request at a time (a Python loop over requests, never over tokens), with a
causal mask shifted by the request's cached context. The gather indices and
masks are built once per step in `build_metadata` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backplane.plugins_sdk import AttentionBackend, CommonAttentionMetadata


@dataclass
class _PrefillChunk:
    query_start: int
    query_end: int
    key_slots: torch.Tensor  # [seq_len] flat cache slots of every key of the request
    mask: torch.Tensor | None  # [q, seq_len] bool (True = attend); None -> plain causal


@dataclass
class CpuAttentionMetadata:
    """Per-step plan shared by every layer."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    decode_token_idx: torch.Tensor | None  # [num_decodes] rows of the flat query
    decode_key_slots: torch.Tensor | None  # [num_decodes, max_len]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_len] bool
    prefills: list[_PrefillChunk]


def _slots_for(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(length, dtype=torch.int64)
    return block_table_row[positions // block_size].to(torch.int64) * block_size + (
        positions % block_size
    )


class CpuSdpaAttentionBackend(AttentionBackend):
    """Reference-quality, reasonably fast paged attention for the CPU."""

    name = "cpu_sdpa"

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        block_size = self.spec.block_size
        qsl = common.query_start_loc_cpu
        seq_lens = common.seq_lens_cpu
        query_lens = qsl[1:] - qsl[: common.num_reqs]
        block_table = common.block_table[: common.num_reqs]
        is_decode = query_lens == 1
        decode_rows = torch.nonzero(is_decode).flatten()

        decode_token_idx = decode_key_slots = decode_mask = None
        if decode_rows.numel():
            lens = seq_lens[decode_rows].to(torch.int64)
            max_len = int(lens.max())
            positions = torch.arange(max_len, dtype=torch.int64)
            blocks = block_table[decode_rows][:, positions // block_size].to(torch.int64)
            decode_key_slots = blocks * block_size + positions % block_size
            decode_mask = (positions[None, :] < lens[:, None])[:, None, None, :]
            decode_token_idx = qsl[decode_rows].to(torch.int64)

        prefills = []
        for row in torch.nonzero(~is_decode).flatten().tolist():
            start, end = int(qsl[row]), int(qsl[row + 1])
            seq_len = int(seq_lens[row])
            q_len = end - start
            context = seq_len - q_len
            mask = None
            if context:
                key_pos = torch.arange(seq_len)
                query_pos = torch.arange(context, seq_len)
                mask = key_pos[None, :] <= query_pos[:, None]
            prefills.append(
                _PrefillChunk(start, end, _slots_for(block_table[row], seq_len, block_size), mask)
            )
        return CpuAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens,
            slot_mapping=common.slot_mapping[: common.num_actual_tokens],
            decode_token_idx=decode_token_idx,
            decode_key_slots=decode_key_slots,
            decode_mask=decode_mask,
            prefills=prefills,
        )

    def forward(self, query, key, value, kv_cache, metadata: CpuAttentionMetadata, scale):
        n = metadata.num_actual_tokens
        num_kv_heads, head_size = self.spec.num_kv_heads, self.spec.head_size
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_size)
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_size)
        key_cache.index_copy_(0, metadata.slot_mapping, key[:n])
        value_cache.index_copy_(0, metadata.slot_mapping, value[:n])

        gqa = self.spec.num_heads != num_kv_heads
        out = torch.empty_like(query)
        if metadata.decode_token_idx is not None:
            slots = metadata.decode_key_slots
            q = query[metadata.decode_token_idx].unsqueeze(2)  # [B, H, 1, D]
            k = key_cache[slots].transpose(1, 2)  # [B, Hkv, L, D]
            v = value_cache[slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=metadata.decode_mask, scale=scale, enable_gqa=gqa
            )
            out[metadata.decode_token_idx] = o.squeeze(2)
        for chunk in metadata.prefills:
            q = query[chunk.query_start : chunk.query_end].transpose(0, 1)  # [H, q, D]
            k = key_cache[chunk.key_slots].transpose(0, 1)  # [Hkv, L, D]
            v = value_cache[chunk.key_slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale,
                enable_gqa=gqa,
            )
            out[chunk.query_start : chunk.query_end] = o.transpose(0, 1)
        return out
