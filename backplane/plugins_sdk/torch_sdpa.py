"""``torch_sdpa_paged``: a portable paged attention backend on plain PyTorch ops.

Part of the SDK (since 1.1) so that any platform can offer it without importing
another platform's package: the cuda and rocm platforms use it as the fallback
behind their Triton kernel (no triton, or a spec Triton refuses), the tpu
platform as its only backend. It runs on any torch device: keys are gathered
from the paged cache with index ops and handed to
``torch.nn.functional.scaled_dot_product_attention``. Unlike
`ReferenceAttentionBackend` it batches all decode tokens of a step into one
call, so it is a usable production fallback, not only a statement of semantics.

Plan per step (built once in `build_metadata`, shared by every layer):
decode tokens (query length 1) of all requests are attended together in one
batched SDPA call over keys padded to the longest decode sequence; each
prefill chunk is attended on its own with a causal mask shifted by the
request's cached context. Host-side loops run over requests, never tokens, and
read only the ``_cpu`` copies of the metadata, so building the plan does not
wait for the device. Sliding windows follow transformers: a query at position
p sees keys p - window + 1 .. p. With ``AttentionSpec.logits_soft_cap`` (which
SDPA cannot apply) the same plan runs through explicit matmuls, tanh capping
and a softmax instead of SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backplane.plugins_sdk.attention import AttentionBackend, CommonAttentionMetadata


@dataclass
class _DecodeBatch:
    token_rows: torch.Tensor  # [B] rows of the flat query
    key_slots: torch.Tensor  # [B, max_len] cache slots (padded positions point at slot 0)
    mask: torch.Tensor  # [B, 1, 1, max_len] True = attend


@dataclass
class _PrefillChunk:
    start: int
    end: int
    key_slots: torch.Tensor  # [seq_len]
    mask: torch.Tensor | None  # [q, seq_len] True = attend; None = plain causal


@dataclass
class SdpaPagedMetadata:
    """The step plan: where to write K/V and which keys each query group reads."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    decode: _DecodeBatch | None
    prefills: list[_PrefillChunk]


def _attend(q, k, v, mask, is_causal: bool, scale: float, gqa: bool, soft_cap: float | None):
    """SDPA, or (with a soft cap) the same computation in explicit float32 ops."""
    if soft_cap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


class TorchSdpaPagedAttentionBackend(AttentionBackend):
    """Device-agnostic paged attention (gather + torch SDPA)."""

    name = "torch_sdpa_paged"
    supports_sliding_window = True
    supports_logits_soft_cap = True

    def build_metadata(self, common: CommonAttentionMetadata) -> SdpaPagedMetadata:
        device = common.block_table.device
        block_size = self.spec.block_size
        window = self.spec.sliding_window
        num_reqs = common.num_reqs
        qsl = common.query_start_loc_cpu[: num_reqs + 1].to(torch.int64)
        seq_lens = common.seq_lens_cpu[:num_reqs].to(torch.int64)
        query_lens = qsl[1:] - qsl[:-1]
        block_table = common.block_table[:num_reqs]

        decode = None
        decode_rows = torch.nonzero(query_lens == 1).flatten()
        if decode_rows.numel():
            lens = seq_lens[decode_rows]
            positions = torch.arange(int(lens.max()), dtype=torch.int64)
            rows_dev = decode_rows.to(device)
            pos_dev = positions.to(device)
            blocks = block_table[rows_dev][:, pos_dev // block_size].to(torch.int64)
            visible = positions[None, :] < lens[:, None]
            if window is not None:
                visible &= positions[None, :] >= lens[:, None] - window
            decode = _DecodeBatch(
                token_rows=qsl[decode_rows].to(device),
                key_slots=blocks * block_size + pos_dev % block_size,
                mask=visible[:, None, None, :].to(device),
            )

        prefills = []
        for row in torch.nonzero(query_lens > 1).flatten().tolist():
            start, end, seq_len = int(qsl[row]), int(qsl[row + 1]), int(seq_lens[row])
            context = seq_len - (end - start)
            positions = torch.arange(seq_len, device=device)
            key_slots = (
                block_table[row, positions // block_size].to(torch.int64) * block_size
                + positions % block_size
            )
            mask = None
            if context or window is not None:
                # query i sits at position context + i and may see keys 0..context + i
                key_pos = torch.arange(seq_len)[None, :]
                query_pos = torch.arange(context, seq_len)[:, None]
                visible = key_pos <= query_pos
                if window is not None:
                    visible &= key_pos > query_pos - window
                mask = visible.to(device)
            prefills.append(_PrefillChunk(start, end, key_slots, mask))

        return SdpaPagedMetadata(
            num_actual_tokens=common.num_actual_tokens,
            slot_mapping=common.slot_mapping[: common.num_actual_tokens],
            decode=decode,
            prefills=prefills,
        )

    def forward(self, query, key, value, kv_cache, metadata: SdpaPagedMetadata, scale):
        n = metadata.num_actual_tokens
        num_kv_heads, head_size = self.spec.num_kv_heads, self.spec.head_size
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_size)
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_size)
        # Real tokens never carry slot -1; padding rows past n are not written at all.
        key_cache.index_copy_(0, metadata.slot_mapping, key[:n])
        value_cache.index_copy_(0, metadata.slot_mapping, value[:n])

        gqa = self.spec.num_heads != num_kv_heads
        out = torch.zeros_like(query)
        if metadata.decode is not None:
            d = metadata.decode
            q = query[d.token_rows].unsqueeze(2)  # [B, H, 1, D]
            k = key_cache[d.key_slots].transpose(1, 2)  # [B, Hkv, L, D]
            v = value_cache[d.key_slots].transpose(1, 2)
            o = _attend(q, k, v, d.mask, False, scale, gqa, self.spec.logits_soft_cap)
            out[d.token_rows] = o.squeeze(2)
        for chunk in metadata.prefills:
            q = query[chunk.start : chunk.end].transpose(0, 1)  # [H, q, D]
            k = key_cache[chunk.key_slots].transpose(0, 1)  # [Hkv, L, D]
            v = value_cache[chunk.key_slots].transpose(0, 1)
            o = _attend(q, k, v, chunk.mask, chunk.mask is None, scale, gqa,
                        self.spec.logits_soft_cap)
            out[chunk.start : chunk.end] = o.transpose(0, 1)
        return out
