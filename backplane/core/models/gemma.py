"""Gemma 2 and Gemma 3 (text): the Gemma decoder.

What sets it apart from the Llama decoder (llama.py):

* RMSNorm scales by ``(1 + weight)`` and multiplies in float32 before casting
  back (`GemmaRMSNorm`); every layer has four of them: before and after
  attention, before and after the MLP (the "sandwich" norms).
* Embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the model dtype.
* The MLP is GELU (tanh approximation) gated: ``gelu_tanh(gate) * up``.
* The softmax scale is ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``.
* Layers alternate between local (sliding window) and global attention:
  ``layer_types`` when the config has it, otherwise Gemma 2 makes even layers
  local and Gemma 3 every ``sliding_window_pattern``-th layer global. Gemma 3's
  local layers use their own rope base (``rope_local_base_freq``, or
  ``rope_parameters["sliding_attention"]``).
* Gemma 2 soft-caps attention scores (``attn_logit_softcapping``, through
  `AttentionSpec.logits_soft_cap`, i.e. in the platform's backend) and both
  soft-cap the final logits (``final_logit_softcapping``).
* Gemma 3 normalises each query and key head (``q_norm``/``k_norm``) before rotary.
* Embeddings are tied to the LM head.

Per-layer attention differences reach the backends through
`layer_attention_specs`: the runner makes one backend instance per distinct
spec (global layers get the model-wide spec without its sliding window).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backplane.core.layers.attention import Attention, AttentionContext
from backplane.core.layers.embedding import LMHead, VocabEmbedding
from backplane.core.layers.linear import MergedLinear
from backplane.core.layers.norm import RMSNorm
from backplane.core.layers.rotary import ApplyRotary, RotaryEmbedding, rope_parameters
from backplane.core.models.base import CausalLM, KVCacheShape
from backplane.core.models.llama import LlamaForCausalLM
from backplane.plugins_sdk import AttentionSpec

logger = logging.getLogger(__name__)

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaRMSNorm(RMSNorm):
    """RMSNorm with Gemma's ``(1 + weight)`` scale, computed in float32 (transformers' order).

    Its own ``layer_kind``: platforms' fused ``rms_norm`` kernels implement the
    Llama convention (``weight * x``) and must not replace it.
    """

    layer_kind = "gemma_rms_norm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (self.hidden_size,), None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def _layer_types(config: Any, gemma3: bool) -> list[str]:
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types:
        types = list(types)
        unknown = sorted(set(types) - {SLIDING, FULL})
        if len(types) != n or unknown:
            raise ValueError(f"layer_types must list {n} of {SLIDING!r}/{FULL!r}, got {types}")
        return types
    if not gemma3:
        return [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    pattern = (getattr(config, "sliding_window_pattern", None)
               or getattr(config, "_sliding_window_pattern", None) or 6)
    return [SLIDING if (i + 1) % int(pattern) else FULL for i in range(n)]


def _rope_params(config: Any, gemma3: bool) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer type."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and FULL in params:
        out = {}
        for kind in (SLIDING, FULL):
            p = dict(params.get(kind) or {})
            p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
            out[kind] = p
        return out
    global_params = rope_parameters(config)
    local = dict(global_params)
    if gemma3:
        local = {"rope_type": "default",
                 "rope_theta": float(getattr(config, "rope_local_base_freq", 10000.0))}
    return {SLIDING: local, FULL: global_params}


class GemmaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, qk_norm: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // self.num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias, dtype=dtype)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
        scale = float(getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.rotary = ApplyRotary()
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, layer_idx)

    def forward(self, x, cos, sin, ctx: AttentionContext) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_end = self.q_size + self.kv_size
        q = qkv[:, : self.q_size].view(n, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : qk_end].view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        v = qkv[:, qk_end:].view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, ctx))


class GemmaMLP(nn.Module):
    """``down(gelu_tanh(gate) * up)`` with a fused gate/up projection."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size},
                                         bias=False, dtype=dtype)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        d = gate_up.shape[-1] // 2
        return self.down_proj(F.gelu(gate_up[..., :d], approximate="tanh") * gate_up[..., d:])


class GemmaDecoderLayer(nn.Module):
    """x + post_attn_norm(attn(input_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, config: Any, layer_idx: int, layer_type: str, qk_norm: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = layer_type
        self.input_layernorm = GemmaRMSNorm(h, eps, dtype=dtype)
        self.self_attn = GemmaAttention(config, layer_idx, qk_norm, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, dtype=dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype=dtype)
        self.mlp = GemmaMLP(config, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype=dtype)

    def forward(self, x, cos, sin, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin,
                                                             ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    """Scaled embedding, decoder layers and final norm (the ``model.`` prefix)."""

    def __init__(self, config: Any, layer_types: list[str], gemma3: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden_size = int(config.hidden_size)
        self.dtype = dtype
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, layer_types[i], gemma3, dtype)
            for i in range(len(layer_types))
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        head_dim = self.layers[0].self_attn.head_dim
        rope = _rope_params(config, gemma3)
        max_pos = int(config.max_position_embeddings)
        # Gemma 2 uses one rope everywhere; Gemma 3 a second one for its local layers.
        self.rotary_emb = RotaryEmbedding(head_dim, max_pos, rope[FULL])
        self.rotary_emb_local = (RotaryEmbedding(head_dim, max_pos, rope[SLIDING])
                                 if rope[SLIDING] != rope[FULL] else None)

    def forward(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the model dtype first, as transformers does.
        hidden = hidden * torch.tensor(self.hidden_size**0.5, dtype=hidden.dtype)
        rope_global = self.rotary_emb.cos_sin(positions, hidden.dtype)
        rope_local = (rope_global if self.rotary_emb_local is None
                      else self.rotary_emb_local.cos_sin(positions, hidden.dtype))
        for layer in self.layers:
            cos, sin = rope_local if layer.layer_type == SLIDING else rope_global
            hidden = layer(hidden, cos, sin, ctx)
        return self.norm(hidden)


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2: soft-capped attention and final logits, alternating local/global layers."""

    gemma3 = False
    # Same checkpoint names and fusing as Llama (q/k/v and gate/up).
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        act = getattr(hf_config, "hidden_activation", None) or getattr(
            hf_config, "hidden_act", "gelu_pytorch_tanh")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_activation {act!r} is not supported; supported: "
                             f"{list(SUPPORTED_ACTIVATIONS)}")
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention (embedding Gemma) is not supported: "
                             "Backplane's Gemma models are causal")
        self.config = hf_config
        self.dtype = dtype
        self.layer_types = _layer_types(hf_config, self.gemma3)
        self.model = GemmaModel(hf_config, self.layer_types, self.gemma3, dtype)
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, dtype=dtype,
                              tied_to=self.model.embed_tokens)
        cap = getattr(hf_config, "final_logit_softcapping", None)
        self.final_logit_softcap = float(cap) if cap else None

    def attn_logits_soft_cap(self) -> float | None:
        cap = getattr(self.config, "attn_logit_softcapping", None)
        return float(cap) if cap else None

    def forward(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def kv_cache_shape(self) -> KVCacheShape:
        attn = self.model.layers[0].self_attn
        window = getattr(self.config, "sliding_window", None) if SLIDING in self.layer_types \
            else None
        return KVCacheShape(len(self.layer_types), attn.num_heads, attn.num_kv_heads,
                            attn.head_dim, window)

    def layer_attention_specs(self, spec: AttentionSpec) -> list[AttentionSpec]:
        cap = self.attn_logits_soft_cap()
        local = dataclasses.replace(spec, logits_soft_cap=cap)
        full = dataclasses.replace(spec, sliding_window=None, logits_soft_cap=cap)
        return [local if t == SLIDING else full for t in self.layer_types]

    def skipped_weight_names(self) -> tuple[str, ...]:
        return ("lm_head.weight",)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: q/k norms, every N-th layer global, a local rope base.

    ``attn_logit_softcapping`` is ignored, as transformers' Gemma 3 ignores it.
    """

    gemma3 = True

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(hf_config, dtype)
        if getattr(hf_config, "attn_logit_softcapping", None):
            logger.warning("Gemma 3: attn_logit_softcapping=%s is ignored (as in transformers)",
                           hf_config.attn_logit_softcapping)

    def attn_logits_soft_cap(self) -> float | None:
        return None
