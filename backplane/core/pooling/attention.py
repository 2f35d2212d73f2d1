"""Dense prefill-only attention for pooling requests (no KV cache).

Pooling requests are prefill-only: each is computed in one forward pass and
never decodes, so nothing is written to or read from a KV cache. The pooling
runner therefore does not go through the platform's paged attention backend:
it hands the model this object in the backend's place, which pads the step's
requests into one dense batch and calls ``torch.nn.functional.
scaled_dot_product_attention`` (plain PyTorch, so it runs on whatever device
the platform's runtime gave the model; the core still imports no platform).
It is causal for decoder embedders and bidirectional for encoders (BERT).
See docs/plugins.md, "Pooling models and non-causal attention".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DenseBatchMetadata:
    """Where each flat token sits in the padded [batch, max_len] layout, and the mask."""

    num_tokens: int
    batch: int
    max_len: int
    index: torch.Tensor  # [num_tokens] flat token -> row * max_len + position
    mask: torch.Tensor | None  # [batch, 1, max_len, max_len] True = attend; None = no padding


class DensePrefillAttention:
    """Stands in for the platform backend during pooling forwards (same ``forward`` call)."""

    name = "dense_prefill_sdpa"

    def __init__(self, num_heads: int, num_kv_heads: int, causal: bool,
                 sliding_window: int | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.causal = causal
        self.sliding_window = sliding_window

    def build_metadata(self, seq_lens: list[int], device: torch.device) -> DenseBatchMetadata:
        batch, max_len = len(seq_lens), max(seq_lens)
        lens = torch.tensor(seq_lens)
        pos = torch.arange(max_len)
        index = torch.cat([row * max_len + torch.arange(n) for row, n in enumerate(seq_lens)])
        valid_key = pos[None, :] < lens[:, None]  # [B, L]
        visible = valid_key[:, None, :].expand(batch, max_len, max_len)
        if self.causal:
            visible = visible & (pos[None, :] <= pos[:, None])[None]
        if self.sliding_window is not None:
            visible = visible & (pos[None, :] > pos[:, None] - self.sliding_window)[None]
        # Padding query rows keep one visible key so that no row is all -inf (NaN).
        padding_query = pos[None, :] >= lens[:, None]  # [B, L]
        visible = visible | (padding_query[:, :, None] & (pos == 0)[None, None, :])
        mask = None
        if batch > 1 or self.sliding_window is not None or self.causal:
            mask = visible[:, None].to(device)
        return DenseBatchMetadata(int(lens.sum()), batch, max_len, index.to(device), mask)

    def _pad(self, x: torch.Tensor, meta: DenseBatchMetadata) -> torch.Tensor:
        heads, dim = x.shape[1], x.shape[2]
        out = x.new_zeros(meta.batch * meta.max_len, heads, dim)
        out[meta.index] = x[: meta.num_tokens]
        return out.view(meta.batch, meta.max_len, heads, dim).transpose(1, 2)

    def forward(self, query, key, value, kv_cache, metadata: DenseBatchMetadata, scale):
        """query [n, H, D], key/value [n, Hkv, D] -> [n, H, D]; ``kv_cache`` is unused (None)."""
        q, k, v = (self._pad(t, metadata) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=metadata.mask, scale=scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        heads, dim = out.shape[1], out.shape[3]
        out = out.transpose(1, 2).reshape(metadata.batch * metadata.max_len, heads, dim)
        return out[metadata.index]
