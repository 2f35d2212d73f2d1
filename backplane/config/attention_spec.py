"""The AttentionSpec a model needs, derived from its Hugging Face config.

Validation (`EngineConfig.check`) and the model runner must ask the platform
for a backend with the same spec, so both build it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from backplane.plugins_sdk import AttentionSpec

if TYPE_CHECKING:
    from backplane.config.engine import EngineConfig


def head_size_of(hf_config: Any) -> int:
    """``head_dim`` when the config has one, else hidden_size / num_attention_heads."""
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden = getattr(hf_config, "hidden_size", None)
    heads = getattr(hf_config, "num_attention_heads", None)
    if not hidden or not heads:
        raise ValueError(
            "the model config has neither head_dim nor hidden_size and num_attention_heads; "
            "cannot size attention"
        )
    return int(hidden) // int(heads)


def sliding_window_of(hf_config: Any, max_model_len: int | None) -> int | None:
    """The model's sliding window, or None when it attends to the full context.

    A window the config disables (``use_sliding_window: false``, as in Qwen2) or
    one at least as long as the context changes nothing, so it is not reported.
    """
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    if max_model_len is not None and window >= max_model_len:
        return None
    return int(window)


def logits_soft_cap_of(hf_config: Any) -> float | None:
    """The attention logit soft-cap (``attn_logit_softcapping``, Gemma 2), or None.

    Gemma 3 configs carry the field too, but transformers' Gemma 3 never applies
    it, so neither does Backplane (the model-wide spec keeps the cap only for
    Gemma 2; a model's `layer_attention_specs` is the final word per layer).
    """
    cap = getattr(hf_config, "attn_logit_softcapping", None)
    if not cap or str(getattr(hf_config, "model_type", "")).startswith("gemma3"):
        return None
    return float(cap)


def attention_spec_from_hf(
    hf_config: Any,
    dtype: torch.dtype,
    block_size: int,
    kv_cache_dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
) -> AttentionSpec:
    """The per-rank AttentionSpec of a model (heads split over tensor-parallel ranks)."""
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    tp = max(1, tensor_parallel_size)
    return AttentionSpec(
        num_heads=max(1, heads // tp),
        num_kv_heads=max(1, kv_heads // tp),
        head_size=head_size_of(hf_config),
        dtype=dtype,
        block_size=block_size,
        kv_cache_dtype=kv_cache_dtype,
        sliding_window=sliding_window_of(hf_config, max_model_len),
        logits_soft_cap=logits_soft_cap_of(hf_config),
    )


def attention_spec_from_config(config: EngineConfig) -> AttentionSpec:
    """AttentionSpec of a (finalized) EngineConfig."""
    mc = config.model_config
    if mc.hf_config is None or mc.torch_dtype is None:
        raise ValueError("attention spec needs the model config and a resolved dtype (finalize)")
    return attention_spec_from_hf(
        mc.hf_config,
        mc.torch_dtype,
        config.cache_config.block_size,
        config.cache_config.kv_cache_dtype,
        mc.max_model_len,
        config.parallel_config.tensor_parallel_size,
    )
