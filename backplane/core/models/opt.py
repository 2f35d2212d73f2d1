"""OPT (``OPTForCausalLM``): the GPT-style decoder with OPT's switches.

Positions are looked up two rows into the learned table (OPT's offset);
``do_layer_norm_before`` False (OPT-350m) gives post-norm blocks without a
final norm, and ``word_embed_proj_dim`` != hidden_size adds the bias-free
``project_in`` / ``project_out`` around the blocks. Checkpoints that name
tensors ``decoder.*`` (no ``model.`` prefix) load as well.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from backplane.core.models.gpt_decoder import GPTDims, GPTForCausalLM

OPT_POSITION_OFFSET = 2


class OPTForCausalLM(GPTForCausalLM):
    """OPT 125m ... 66b, and checkpoints of the same shape."""

    @classmethod
    def read_dims(cls, hf_config: Any) -> GPTDims:
        hidden = hf_config.hidden_size
        pre_norm = bool(getattr(hf_config, "do_layer_norm_before", True))
        remove_final = bool(getattr(hf_config, "_remove_final_layer_norm", False))
        return GPTDims(
            vocab_size=hf_config.vocab_size,
            hidden_size=hidden,
            embed_dim=getattr(hf_config, "word_embed_proj_dim", None) or hidden,
            ffn_dim=hf_config.ffn_dim,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            max_positions=hf_config.max_position_embeddings,
            position_offset=OPT_POSITION_OFFSET,
            norm_eps=1e-5,  # OPT's nn.LayerNorm default
            norm_affine=bool(getattr(hf_config, "layer_norm_elementwise_affine", True)),
            bias=bool(getattr(hf_config, "enable_bias", True)),
            pre_norm=pre_norm,
            final_norm=pre_norm and not remove_final,
            activation=getattr(hf_config, "activation_function", "relu"),
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(
            (f"model.{name}" if name.startswith("decoder.") else name, tensor)
            for name, tensor in weights
        )
