"""A plain, obviously-correct paged attention backend written with torch tensor ops.

`ReferenceAttentionBackend` is a starting point for plugin authors bringing up a
new device (every op it uses exists on any torch device) and a readable
statement of the semantics in `backplane.plugins_sdk.attention`. It loops over
requests in Python and computes softmax(QK^T)V in float32, so it is slow for
large batches; real platforms ship a fused kernel and keep this one as a
fallback or for debugging.

KV cache layout: the SDK default, ``[2, num_blocks, block_size, num_kv_heads, head_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backplane.plugins_sdk.attention import AttentionBackend, CommonAttentionMetadata


@dataclass
class ReferenceAttentionMetadata:
    """Per-step plan: per request, its query rows and the cache slots of all its keys."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64
    query_ranges: list[tuple[int, int]]  # [start, end) rows of the flat query
    key_slots: list[torch.Tensor]  # per request, [seq_len] int64 slots in token order


class ReferenceAttentionBackend(AttentionBackend):
    """Paged causal attention as a loop over requests (any torch device)."""

    name = "reference"
    supports_logits_soft_cap = True

    def build_metadata(self, common: CommonAttentionMetadata) -> ReferenceAttentionMetadata:
        block_size = self.spec.block_size
        qsl = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens_cpu.tolist()
        device = common.slot_mapping.device
        query_ranges, key_slots = [], []
        for row in range(common.num_reqs):
            start, end = int(qsl[row]), int(qsl[row + 1])
            positions = torch.arange(int(seq_lens[row]), dtype=torch.int64, device=device)
            blocks = common.block_table[row].to(device=device, dtype=torch.int64)
            key_slots.append(blocks[positions // block_size] * block_size + positions % block_size)
            query_ranges.append((start, end))
        return ReferenceAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens,
            slot_mapping=common.slot_mapping[: common.num_actual_tokens].to(torch.int64),
            query_ranges=query_ranges,
            key_slots=key_slots,
        )

    def forward(self, query, key, value, kv_cache, metadata: ReferenceAttentionMetadata, scale):
        n = metadata.num_actual_tokens
        heads, kv_heads, head_size = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_size
        key_cache = kv_cache[0].view(-1, kv_heads, head_size)
        value_cache = kv_cache[1].view(-1, kv_heads, head_size)
        # Only real tokens are written: rows past n are padding (slot -1).
        key_cache[metadata.slot_mapping] = key[:n].to(key_cache.dtype)
        value_cache[metadata.slot_mapping] = value[:n].to(value_cache.dtype)

        out = torch.zeros_like(query)
        group = heads // kv_heads
        for (start, end), slots in zip(metadata.query_ranges, metadata.key_slots, strict=True):
            q_len, seq_len = end - start, slots.numel()
            if q_len == 0:
                continue
            q = query[start:end].float().transpose(0, 1)  # [H, q, D]
            k = key_cache[slots].float().transpose(0, 1).repeat_interleave(group, dim=0)
            v = value_cache[slots].float().transpose(0, 1).repeat_interleave(group, dim=0)
            scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q, L]
            cap = self.spec.logits_soft_cap
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            # Query i sits at absolute position (seq_len - q_len + i) and sees keys <= it.
            query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            key_pos = torch.arange(seq_len, device=q.device)
            scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
        return out
