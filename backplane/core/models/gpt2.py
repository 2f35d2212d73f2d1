"""GPT-2 (``GPT2LMHeadModel``): the GPT-style decoder with GPT-2's checkpoint names.

GPT-2 stores its projections as ``Conv1D`` weights, ``[in, out]``: the
transpose of ``nn.Linear``'s. Loading renames each tensor onto the shared
decoder (``transformer.h.N.attn.c_attn`` -> ``...layers.N.self_attn.qkv_proj``,
whose q/k/v thirds are the fused ``c_attn`` columns) and transposes those
four weights. Names in errors and in `expected_weight_names` stay GPT-2's.
Old exports without the ``transformer.`` prefix, and their causal-mask
buffers (``attn.bias``, ``attn.masked_bias``), are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from backplane.core.models.base import WeightShapeError
from backplane.core.models.gpt_decoder import DECODER_PREFIX, GPTDims, GPTForCausalLM

# (GPT-2 checkpoint prefix, shared-decoder prefix); "{}" stands for a layer index.
_RENAMES = (
    ("transformer.wte.", DECODER_PREFIX + "embed_tokens."),
    ("transformer.wpe.", DECODER_PREFIX + "embed_positions."),
    ("transformer.ln_f.", DECODER_PREFIX + "final_layer_norm."),
    ("transformer.h.{}.ln_1.", DECODER_PREFIX + "layers.{}.self_attn_layer_norm."),
    ("transformer.h.{}.attn.c_attn.", DECODER_PREFIX + "layers.{}.self_attn.qkv_proj."),
    ("transformer.h.{}.attn.c_proj.", DECODER_PREFIX + "layers.{}.self_attn.out_proj."),
    ("transformer.h.{}.ln_2.", DECODER_PREFIX + "layers.{}.final_layer_norm."),
    ("transformer.h.{}.mlp.c_fc.", DECODER_PREFIX + "layers.{}.fc1."),
    ("transformer.h.{}.mlp.c_proj.", DECODER_PREFIX + "layers.{}.fc2."),
)
_TO_CHECKPOINT = tuple((ours, theirs) for theirs, ours in _RENAMES)
# Model parameters whose GPT-2 tensors are Conv1D weights ([in, out]).
_CONV1D_WEIGHTS = ("qkv_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")
# Causal-mask buffers older exports saved with the weights.
_MASK_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
_INDEX = re.compile(r"\.(\d+)\.")


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` with its prefix replaced by the matching pair, unchanged if none matches."""
    match = _INDEX.search(name)
    key = name[: match.start()] + ".{}." + name[match.end():] if match else name
    for old, new in renames:
        if key.startswith(old):
            renamed = new + key[len(old):]
            return renamed.format(match.group(1)) if match else renamed
    return name


class GPT2LMHeadModel(GPTForCausalLM):
    """GPT-2 small ... xl, DistilGPT2 and checkpoints of the same shape."""

    stacked_params = ()

    @classmethod
    def read_dims(cls, hf_config: Any) -> GPTDims:
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention (cross-attention to an encoder) "
                             "is not supported; only the decoder-only GPT2LMHeadModel is")
        hidden = hf_config.n_embd
        return GPTDims(
            vocab_size=hf_config.vocab_size,
            hidden_size=hidden,
            embed_dim=hidden,
            ffn_dim=getattr(hf_config, "n_inner", None) or 4 * hidden,
            num_layers=hf_config.n_layer,
            num_heads=hf_config.n_head,
            max_positions=hf_config.n_positions,
            position_offset=0,
            norm_eps=hf_config.layer_norm_epsilon,
            norm_affine=True,
            bias=True,
            pre_norm=True,
            final_norm=True,
            activation=hf_config.activation_function,
            attn_scale=bool(getattr(hf_config, "scale_attn_weights", True)),
            scale_by_layer=bool(getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)),
        )

    def _model_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if _MASK_BUFFERS.search(name):
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            name = _rename(name, _RENAMES)
            yield name, tensor.t() if name.endswith(_CONV1D_WEIGHTS) else tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        try:
            loaded = super().load_weights(self._model_tensors(weights))
        except WeightShapeError as exc:
            # Report the checkpoint's name and orientation, not the renamed ones.
            flip = exc.name.endswith(_CONV1D_WEIGHTS)
            raise WeightShapeError(
                _rename(exc.name, _TO_CHECKPOINT),
                exc.expected[::-1] if flip else exc.expected,
                exc.got[::-1] if flip else exc.got,
            ) from None
        return {_rename(name, _TO_CHECKPOINT) for name in loaded}

    def expected_weight_names(self) -> set[str]:
        return {_rename(name, _TO_CHECKPOINT) for name, _ in self.named_parameters()}
