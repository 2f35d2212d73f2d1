"""AllenAI OLMo 2: the Llama decoder with norms after each sublayer and q/k norms
over the whole projection."""

from __future__ import annotations

from typing import Any

from backplane.core.models.llama import DecoderOptions, LlamaForCausalLM


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2: x + norm(attn(x)) and x + norm(mlp(x)) (no input norms), and
    RMSNorm over all query / key heads together before rotary."""

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_per_head=False, post_norms=True
        )
