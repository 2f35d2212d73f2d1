"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): the Llama decoder with checkpoint-fused projections.

Phi-3 checkpoints already store q/k/v as one ``qkv_proj`` (rows q, then k, then
v) and gate/up as one ``gate_up_proj`` (gate rows first, as the shared
`SiluAndMul` expects), which is exactly how the shared decoder fuses them, so
the tensors load as they are. Everything else is switched on by the config
through the shared layers: ``longrope`` (or the older ``su``) rope scaling with
Phi-3's top-level ``original_max_position_embeddings`` and a
``partial_rotary_factor`` (`backplane.core.layers.rotary`), and a
``sliding_window`` reported in the attention spec as for Mistral.
"""

from __future__ import annotations

from typing import Any

from backplane.core.models.llama import DecoderOptions, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 family: no biases; fused qkv_proj / gate_up_proj in the checkpoint."""

    # Checkpoint-fused projections / experts are not split over ranks yet.
    supports_tensor_parallel = False
    supports_pipeline_parallel = False

    # Nothing to stack: the checkpoint names are the fused parameters' own names.
    stacked_params = ()

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions()

    def expected_weight_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}
