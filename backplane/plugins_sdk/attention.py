"""Attention backend contract.

The core lays out a step's tokens flat (all requests' query tokens one after
another) and describes them with `CommonAttentionMetadata`. A backend turns that
into whatever its kernels need (`build_metadata`) and computes paged attention:
it first writes the step's keys and values into the KV cache at
``slot_mapping``, then attends each query token to every cached token of its
request up to and including itself (causal).

KV cache layout is backend-owned (`kv_cache_shape`); the core only allocates a
tensor of that shape per layer and hands it back.

Only causal attention is asked of a backend. Non-causal, prefill-only work
(pooling models run with ``--runner pooling``: BERT-style encoders, and decoder
embedders, which are causal but never decode) never reaches a backend: the
core's pooling runner computes it without a KV cache, with plain
``torch.nn.functional.scaled_dot_product_attention`` on a padded dense batch
(`backplane.core.pooling.attention`). A backend therefore needs no flag or
refusal for it (docs/plugins.md, "Pooling models and non-causal attention").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class AttentionSpec:
    """The shape of attention a model needs; backends say whether they can serve it.

    Attributes:
        num_heads, num_kv_heads: query and key/value heads of one tensor-parallel
            rank (num_heads is a multiple of num_kv_heads: MHA, GQA or MQA).
        head_size: dimension of one head.
        dtype: dtype of queries, keys, values and the output.
        block_size: tokens per KV cache block.
        kv_cache_dtype: ``"auto"`` stores K/V in ``dtype``; other names are
            formats a backend declares in ``supported_kv_cache_dtypes``. The fp8
            names (`FP8_KV_CACHE_DTYPES`: ``fp8`` = ``fp8_e4m3``, ``fp8_e5m2``)
            make the cache tensor that torch fp8 dtype (`kv_cache_torch_dtype`)
            and give `AttentionBackend.forward` the layer's ``kv_scales``.
        sliding_window: None for full causal attention. Otherwise the query at
            (0-based) position p of its request sees only the keys at positions
            ``p - sliding_window + 1 .. p``: itself and the ``sliding_window - 1``
            tokens before it (the transformers convention; the cpu kernels
            compute it as ``max(0, seq_len - sliding_window) .. seq_len - 1`` with
            ``seq_len = p + 1``). The core sets it only when requests can be
            longer than the window. A backend that does not declare
            ``supports_sliding_window`` is never given one.
        logits_soft_cap: None for plain softmax attention. Otherwise every
            scaled score ``s = scale * q.k`` is soft-capped to
            ``logits_soft_cap * tanh(s / logits_soft_cap)`` before the mask and
            the softmax (Gemma 2's ``attn_logit_softcapping``). A backend that
            does not declare ``supports_logits_soft_cap`` is never given one
            (SDK 1.1).
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int
    kv_cache_dtype: str = "auto"
    sliding_window: int | None = None
    logits_soft_cap: float | None = None


# kv_cache_dtype names of the fp8 formats -> dtype of the cache tensor. Plain
# ``fp8`` is e4m3 (3 mantissa bits, max 448), as in vLLM: K/V need precision
# more than range once a scale brings them near the format's maximum; e5m2
# (2 mantissa bits, max 57344) is there for checkpoints calibrated for it.
FP8_KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
# The unquantized kv_cache_dtype names besides "auto".
_PLAIN_KV_CACHE_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}


def is_fp8_kv_cache(kv_cache_dtype: str) -> bool:
    """Whether ``kv_cache_dtype`` names an fp8 format (the cache then needs K/V scales)."""
    return kv_cache_dtype in FP8_KV_CACHE_DTYPES


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the cache tensor for ``kv_cache_dtype`` with model dtype ``dtype``.

    Raises ValueError naming the value and the known names when it is none of them.
    """
    if kv_cache_dtype == "auto":
        return dtype
    found = FP8_KV_CACHE_DTYPES.get(kv_cache_dtype) or _PLAIN_KV_CACHE_DTYPES.get(kv_cache_dtype)
    if found is None:
        known = ["auto", *_PLAIN_KV_CACHE_DTYPES, *FP8_KV_CACHE_DTYPES]
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {known}")
    return found


def quantize_kv_fp8(x: torch.Tensor, scale: float | torch.Tensor,
                    fp8_dtype: torch.dtype) -> torch.Tensor:
    """The fp8 contract's quantizer: ``x / scale`` saturated to the format's max, rounded
    to nearest even. What a backend stores must equal this; dequantizing is
    ``stored.float() * scale``. (A plain ``.to(fp8)`` would turn values past the
    max into NaN for e4m3 and inf for e5m2, so saturate first.)"""
    limit = torch.finfo(fp8_dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(fp8_dtype)


@dataclass
class CommonAttentionMetadata:
    """Backend-independent description of one step's flat batch.

    Tensors without the ``_cpu`` suffix live on the platform device; ``_cpu``
    copies exist so that backends needing host-side loops do not synchronise.

    Attributes:
        num_reqs: requests in the step.
        num_actual_tokens: real query tokens (inputs may be padded past this).
        max_query_len: longest query of the step.
        max_seq_len: longest (context + query) of the step.
        query_start_loc: [num_reqs + 1] int32 cumulative query offsets.
        seq_lens: [num_reqs] int32, tokens in the cache after this step (context + query).
        block_table: [num_reqs, max_blocks_per_req] int32 block ids (rows padded with 0).
        slot_mapping: [num_tokens] int64 flat cache slot for each query token;
            -1 marks padding tokens that must not be written.
    """

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor

    @property
    def is_pure_decode(self) -> bool:
        """Every request advances by exactly one token."""
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """A paged attention implementation a platform offers.

    Subclasses declare what they support as class attributes; `unsupported_reasons`
    turns those into human-readable refusals for a given spec.

    Instances: the model runner creates one instance per distinct layer spec
    (``backend_cls(spec)`` with a per-rank `AttentionSpec`, once, when the
    engine loads the model). Most models have one spec, so one instance serves
    every attention layer; a model whose layers differ (Gemma's local layers
    with a sliding window next to global ones) gets one instance per distinct
    spec, all of the one class selected for the model-wide spec (which carries
    every feature any layer uses). Each step the runner calls `build_metadata`
    once per instance, then every layer calls `forward` on its spec's instance
    with its own ``kv_cache`` tensor (one per layer, allocated with
    `allocate_kv_cache`) and its own ``scale``. Keep no per-layer state on the
    instance; per-step state belongs in the metadata.

    Graph capture (SDK 1.1): a backend that sets ``supports_graph_capture``
    promises that for a pure decode step (every query has length 1)
    `build_metadata` reads nothing from the device on the host and keeps
    references to, not copies of, the tensors of `CommonAttentionMetadata`,
    and that `forward` launches the same work whatever values those tensors
    hold. The runner then builds the metadata once per captured batch size over
    its static buffers (``max_seq_len`` is then ``max_model_len``, the ``_cpu``
    copies hold capture-time values and must not be read), records the step,
    and before each replay rewrites the buffers in place. Padding rows of a
    replayed batch carry slot -1 (never written), sequence length 1 and block
    table row zeros; their output is discarded.
    """

    name: ClassVar[str]
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    )
    # None means any head size / block size.
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None
    supported_block_sizes: ClassVar[tuple[int, ...] | None] = None
    supported_kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto",)
    supports_sliding_window: ClassVar[bool] = False
    # SDK 1.1: whether `AttentionSpec.logits_soft_cap` is implemented.
    supports_logits_soft_cap: ClassVar[bool] = False
    # SDK 1.1: whether uniform decode steps may be recorded as graphs (see
    # "Graph capture" in the class docstring). False: those steps run eagerly.
    supports_graph_capture: ClassVar[bool] = False

    @classmethod
    def unsupported_reasons(cls, spec: AttentionSpec) -> list[str]:
        """Every reason this backend cannot serve ``spec``; empty when it can."""
        reasons = []
        if spec.dtype not in cls.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in cls.supported_dtypes)
            reasons.append(f"dtype {str(spec.dtype).removeprefix('torch.')} not in ({names})")
        if cls.supported_head_sizes is not None and spec.head_size not in cls.supported_head_sizes:
            reasons.append(f"head_size {spec.head_size} not in {cls.supported_head_sizes}")
        if (
            cls.supported_block_sizes is not None
            and spec.block_size not in cls.supported_block_sizes
        ):
            reasons.append(f"block_size {spec.block_size} not in {cls.supported_block_sizes}")
        if spec.kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            reasons.append(
                f"kv_cache_dtype {spec.kv_cache_dtype!r} not in {cls.supported_kv_cache_dtypes}"
            )
        if spec.sliding_window is not None and not cls.supports_sliding_window:
            reasons.append("sliding window attention is not supported")
        if spec.logits_soft_cap is not None and not cls.supports_logits_soft_cap:
            reasons.append("attention logit soft-capping (logits_soft_cap) is not supported")
        return reasons

    @classmethod
    def kv_cache_shape(
        cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor. Default: [2, blocks, block_size, kv_heads, head]."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def allocate_kv_cache(
        cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """One layer's KV cache of ``shape``, zero-filled (optional; SDK 1.1+).

        Zeros matter: backends read whole blocks and mask the unused tail, and
        masked garbage (NaN x 0) would still poison the output. Override to
        choose how the memory is obtained (huge pages, a device pool, ...).
        """
        return torch.zeros(shape, dtype=dtype, device=device)

    def __init__(self, spec: AttentionSpec) -> None:
        """One instance per model, shared by all its attention layers (see the class)."""
        self.spec = spec

    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Turn the common metadata into this backend's own; called once per step."""
        return common

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        scale: float,
        *,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write key/value at the metadata's slots, then attend causally over the cache.

        Args:
            query: [num_tokens, num_heads, head_size]
            key, value: [num_tokens, num_kv_heads, head_size]
            kv_cache: this layer's cache, shaped by `kv_cache_shape`.
            metadata: what `build_metadata` returned for this step.
            scale: softmax scale: the output is ``softmax(scale * q.k^T) v`` over
                the keys the query may see (causal, and within
                ``spec.sliding_window`` when set; with ``spec.logits_soft_cap``
                the scaled scores are soft-capped first). The layer passes what the
                model gives it: the in-tree models pass ``1 / sqrt(head_size)``;
                a model may define another, so use this value, never a
                constant derived from the head size.
            kv_scales: given only with an fp8 ``spec.kv_cache_dtype`` (so a backend
                that does not declare fp8 never sees it): this layer's float32
                tensor ``[k_scale, v_scale]`` on the device. Store
                `quantize_kv_fp8` ``(key, k_scale)`` / ``(value, v_scale)`` and
                attend as if the cache held ``stored * scale``. Read the values
                from the tensor at each call (never cache them on the host): the
                core may set them after the first step (``--calculate-kv-scales``)
                and a recorded graph must see the new values.

        Returns:
            [num_tokens, num_heads, head_size]; rows past num_actual_tokens are undefined.
        """
