"""IBM Granite (3.x): the Llama decoder with Granite's four multipliers."""

from __future__ import annotations

from typing import Any

import torch

from backplane.core.models.llama import DecoderOptions, LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite: scaled embeddings and residual branches, a configured softmax
    scale (``attention_multiplier``) and logits divided by ``logits_scaling``."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            attention_scale=float(hf_config.attention_multiplier),
            embedding_multiplier=float(hf_config.embedding_multiplier),
            residual_multiplier=float(hf_config.residual_multiplier),
        )

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(hf_config, dtype)
        self.logits_scaling = float(getattr(hf_config, "logits_scaling", 1.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling
