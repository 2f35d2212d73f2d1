"""Acme's attention backend: the SDK's reference paged attention, with Acme's limits,
plus a decode path that can be recorded as a graph.

A real plugin would call its device kernels in ``forward``; this one reuses
`backplane.plugins_sdk.ReferenceAttentionBackend` (plain torch ops) for steps
with prefill chunks and only declares what the "hardware" supports, so
Backplane can explain refusals. Uniform decode steps take a path written in
fixed-shape tensor ops with no host reads, which is what lets the backend
declare ``supports_graph_capture``: Backplane then records decode steps through
`backplane_acme.graph.RecordingGraphRunner` and replays them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from backplane.plugins_sdk import CommonAttentionMetadata, ReferenceAttentionBackend


@dataclass
class AcmeDecodeMetadata:
    """A uniform decode step: the common tensors themselves (never copies)."""

    slot_mapping: torch.Tensor  # [B] int64, -1 for padding rows
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32


class AcmeAttentionBackend(ReferenceAttentionBackend):
    """Paged attention for Acme: float32/bfloat16, block sizes 8, 16 or 32."""

    name = "acme_paged"
    supported_dtypes = (torch.float32, torch.bfloat16)
    supported_block_sizes = (8, 16, 32)
    supports_graph_capture = True

    def build_metadata(self, common: CommonAttentionMetadata):
        if common.is_pure_decode and common.num_actual_tokens == common.num_reqs:
            return AcmeDecodeMetadata(common.slot_mapping, common.seq_lens, common.block_table)
        return super().build_metadata(common)

    def forward(self, query, key, value, kv_cache, metadata, scale):
        if isinstance(metadata, AcmeDecodeMetadata):
            return self._decode(query, key, value, kv_cache, metadata, scale)
        return super().forward(query, key, value, kv_cache, metadata, scale)

    def _decode(self, query, key, value, kv_cache, meta: AcmeDecodeMetadata, scale):
        """One query per request, keys gathered by whole blocks and masked by length."""
        spec = self.spec
        heads, kv_heads, head_size = spec.num_heads, spec.num_kv_heads, spec.head_size
        block_size = self.spec.block_size
        padded_rows = query.shape[0]
        # One row per request; the inputs may carry padding rows past them.
        batch = meta.seq_lens.shape[0]
        query, key, value = query[:batch], key[:batch], value[:batch]
        slot_mapping = meta.slot_mapping[:batch]
        key_cache = kv_cache[0].view(-1, kv_heads, head_size)
        value_cache = kv_cache[1].view(-1, kv_heads, head_size)
        # Padding rows (slot -1) must write nothing. A fixed-shape write cannot skip
        # rows, so they repeat row 0's write (the same value to the same slot); when
        # row 0 is padding too (every row is, while recording), each row writes
        # slot 0's own value back.
        real = slot_mapping >= 0
        source = torch.where(real, torch.arange(batch, device=query.device), 0)
        slots_w = slot_mapping[source].clamp(min=0)
        keep = ~real[source][:, None, None]
        for cache, new in ((key_cache, key), (value_cache, value)):
            rows = torch.where(keep, cache[slots_w], new[source].to(cache.dtype))
            cache.index_copy_(0, slots_w, rows)

        blocks = meta.block_table.to(torch.int64)  # [B, W]
        offsets = torch.arange(block_size, device=query.device)
        slots = (blocks[:, :, None] * block_size + offsets).flatten(1)  # [B, W * block_size]
        group = heads // kv_heads
        k = key_cache[slots].float().repeat_interleave(group, dim=2)  # [B, L, H, D]
        v = value_cache[slots].float().repeat_interleave(group, dim=2)
        scores = torch.einsum("bhd,blhd->bhl", query.float(), k) * scale
        cap = self.spec.logits_soft_cap
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        positions = torch.arange(slots.shape[1], device=query.device)
        visible = positions[None, :] < meta.seq_lens[:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        out = torch.zeros(padded_rows, heads, head_size, dtype=query.dtype, device=query.device)
        out[:batch] = torch.einsum("bhl,blhd->bhd", torch.softmax(scores, dim=-1), v)
        return out
