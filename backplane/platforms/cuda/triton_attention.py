"""``triton_paged``: the default attention backend of the cuda and rocm platforms.

Two Triton kernels (see `triton_kernels`): one writes the step's K/V into the
paged cache, one computes causal attention for the whole flat batch (prefill
chunks with cached context and decode tokens in one launch). The backend needs
no per-step host work beyond reading two integers, which keeps decode steps
cheap and graph-capturable.

Block sizes: the kernel looks every key position up in the block table, so any
cache block size works; head sizes up to 256 fit its register tile. Sliding
windows follow transformers: a query at position p sees keys p - window + 1 .. p.

fp8 KV cache (``kv_cache_dtype`` fp8 / fp8_e4m3 / fp8_e5m2): the cache tensor is
torch's fp8 dtype in the same layout; the write kernel quantises with the
layer's ``kv_scales`` and the attention kernel decodes in registers (see
`triton_kernels`). Both read the scales from the device tensor, so graph
capture is unaffected.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from backplane.plugins_sdk import AttentionBackend, AttentionSpec, CommonAttentionMetadata
from backplane.plugins_sdk.attention import FP8_KV_CACHE_DTYPES

MAX_HEAD_SIZE = 256


@dataclass
class TritonAttentionMetadata:
    """What both kernels need for one step (device tensors plus host grid sizes)."""

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class TritonPagedAttentionBackend(AttentionBackend):
    """Paged attention with Triton kernels (NVIDIA and AMD GPUs)."""

    name = "triton_paged"
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supported_kv_cache_dtypes = ("auto", *FP8_KV_CACHE_DTYPES)
    supports_sliding_window = True
    # Decode metadata is the common tensors themselves and the kernels skip slot -1:
    # a recorded decode step replays correctly over rewritten buffers.
    supports_graph_capture = True

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install 'backplane-llm[cuda]')")
        if spec.head_size > MAX_HEAD_SIZE:
            reasons.append(f"head_size {spec.head_size} exceeds {MAX_HEAD_SIZE}")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(
                f"num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                f"{spec.num_kv_heads}"
            )
        return reasons

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        # Imported here, not at module level, so listing backends never needs triton.
        from backplane.platforms.cuda import triton_kernels

        self._kernels = triton_kernels

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(
            num_reqs=common.num_reqs,
            num_actual_tokens=common.num_actual_tokens,
            max_query_len=common.max_query_len,
            query_start_loc=common.query_start_loc,
            seq_lens=common.seq_lens,
            block_table=common.block_table,
            slot_mapping=common.slot_mapping,
        )

    def forward(self, query, key, value, kv_cache, metadata: TritonAttentionMetadata, scale,
                *, kv_scales: torch.Tensor | None = None):
        # Padding tokens past num_actual_tokens carry slot -1 and are skipped by the
        # kernel, so the whole (possibly padded) batch is written in one launch.
        n = min(metadata.slot_mapping.shape[0], key.shape[0])
        self._kernels.write_kv_cache(
            key[:n], value[:n], kv_cache[0], kv_cache[1], metadata.slot_mapping[:n],
            kv_scales=kv_scales,
        )
        out = torch.empty_like(query)
        self._kernels.paged_attention(
            query,
            kv_cache[0],
            kv_cache[1],
            out,
            metadata.block_table,
            metadata.query_start_loc,
            metadata.seq_lens,
            num_reqs=metadata.num_reqs,
            max_query_len=metadata.max_query_len,
            scale=scale,
            sliding_window=self.spec.sliding_window,
            kv_scales=kv_scales,
        )
        return out
