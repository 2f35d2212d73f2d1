"""The GPT-style decoder shared by GPT-2 and OPT.

Learned absolute position embeddings are added to the token embeddings; every
block is LayerNorm + biased self-attention + a two-matrix MLP with the config's
activation, pre-norm (GPT-2, most OPTs) or post-norm (OPT-350m). Attention goes
through the paged `Attention` layer like every other model.

Parameter names follow OPT checkpoints (``model.decoder.layers.N.fc1`` ...,
q/k/v fused into ``self_attn.qkv_proj``); GPT-2 renames its checkpoint tensors
onto them (gpt2.py). Each architecture only reads its config into `GPTDims`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from backplane.core.layers.attention import Attention, AttentionContext
from backplane.core.layers.embedding import LMHead, VocabEmbedding
from backplane.core.layers.linear import MergedLinear
from backplane.core.models.base import CausalLM, KVCacheShape


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the same function. gelu_new, gelu_fast and
# gelu_pytorch_tanh are all the tanh approximation of GELU.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
}

DECODER_PREFIX = "model.decoder."


@dataclass(frozen=True)
class GPTDims:
    """Sizes and switches of the GPT-style decoder, read from a transformers config.

    Attributes:
        embed_dim: width of the token embeddings and of the logits projection
            (OPT's ``word_embed_proj_dim``); when it differs from hidden_size,
            ``project_in`` / ``project_out`` map between the two.
        ffn_dim: inner size of the MLP.
        max_positions: rows of the position table, not counting position_offset.
        position_offset: added to every position before the table lookup (2 for OPT).
        norm_affine: LayerNorms carry a weight and a bias.
        bias: the attention and MLP projections carry biases.
        pre_norm: LayerNorm before attention / MLP (else after the residual add).
        final_norm: a LayerNorm after the last block.
        activation: an `ACTIVATIONS` name.
        attn_scale: 1/sqrt(head_dim) on the scores (GPT-2's ``scale_attn_weights``).
        scale_by_layer: scores further divided by layer index + 1 (GPT-2 option).
    """

    vocab_size: int
    hidden_size: int
    embed_dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_positions: int
    position_offset: int
    norm_eps: float
    norm_affine: bool
    bias: bool
    pre_norm: bool
    final_norm: bool
    activation: str
    attn_scale: bool = True
    scale_by_layer: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size ({self.hidden_size}) must be a multiple of the "
                             f"number of attention heads ({self.num_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation function {self.activation!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_norm(self, dtype: torch.dtype) -> nn.LayerNorm:
        return nn.LayerNorm(self.hidden_size, eps=self.norm_eps,
                            elementwise_affine=self.norm_affine, dtype=dtype)


class GPTAttention(nn.Module):
    """Fused biased q/k/v projection, paged attention, output projection (no rotary)."""

    def __init__(self, dims: GPTDims, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        size = dims.hidden_size
        self.qkv_proj = MergedLinear(size, {"q": size, "k": size, "v": size}, bias=dims.bias,
                                     dtype=dtype)
        self.out_proj = nn.Linear(size, size, bias=dims.bias, dtype=dtype)
        scale = dims.head_dim**-0.5 if dims.attn_scale else 1.0
        if dims.scale_by_layer:
            scale /= layer_idx + 1
        self.attn = Attention(dims.num_heads, dims.num_heads, dims.head_dim, scale, layer_idx)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, ctx))


class GPTLayer(nn.Module):
    """Attention and MLP with residuals, each normalised before (pre-norm) or after."""

    def __init__(self, dims: GPTDims, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.pre_norm = dims.pre_norm
        self.self_attn_layer_norm = dims.layer_norm(dtype)
        self.self_attn = GPTAttention(dims, layer_idx, dtype)
        self.final_layer_norm = dims.layer_norm(dtype)
        self.fc1 = nn.Linear(dims.hidden_size, dims.ffn_dim, bias=dims.bias, dtype=dtype)
        self.fc2 = nn.Linear(dims.ffn_dim, dims.hidden_size, bias=dims.bias, dtype=dtype)
        self.act = ACTIVATIONS[dims.activation]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), ctx)
            return x + self.mlp(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, ctx))
        return self.final_layer_norm(x + self.mlp(x))


class GPTDecoder(nn.Module):
    """Token + learned position embeddings, the blocks, the optional final norm."""

    def __init__(self, dims: GPTDims, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(dims.vocab_size, dims.embed_dim, dtype=dtype)
        self.position_offset = dims.position_offset
        self.embed_positions = nn.Embedding(dims.max_positions + dims.position_offset,
                                            dims.hidden_size, dtype=dtype)
        projected = dims.embed_dim != dims.hidden_size
        self.project_in = (nn.Linear(dims.embed_dim, dims.hidden_size, bias=False, dtype=dtype)
                           if projected else None)
        self.project_out = (nn.Linear(dims.hidden_size, dims.embed_dim, bias=False, dtype=dtype)
                            if projected else None)
        self.layers = nn.ModuleList(GPTLayer(dims, i, dtype) for i in range(dims.num_layers))
        self.final_layer_norm = dims.layer_norm(dtype) if dims.final_norm else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.position_offset:
            positions = positions + self.position_offset
        hidden = hidden + self.embed_positions(positions)
        for layer in self.layers:
            hidden = layer(hidden, ctx)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class GPTForCausalLM(CausalLM):
    """A causal LM over `GPTDecoder`; subclasses implement `read_dims` for their config."""

    stacked_params: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    )

    @classmethod
    def read_dims(cls, hf_config: Any) -> GPTDims:
        """The decoder's sizes and switches for this architecture's config."""
        raise NotImplementedError

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.dims = self.read_dims(hf_config)
        decoder = GPTDecoder(self.dims, dtype)
        # "model.decoder." as in OPT checkpoints.
        self.model = nn.ModuleDict({"decoder": decoder})
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = LMHead(
            self.dims.vocab_size,
            self.dims.embed_dim,
            dtype=dtype,
            tied_to=decoder.embed_tokens if self.tie_word_embeddings else None,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Flat token ids and positions ``[num_tokens]`` -> final hidden states."""
        return self.model["decoder"](input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_cache_shape(self) -> KVCacheShape:
        heads = self.dims.num_heads
        return KVCacheShape(num_layers=self.dims.num_layers, num_heads=heads,
                            num_kv_heads=heads, head_size=self.dims.head_dim)

    def skipped_weight_names(self) -> tuple[str, ...]:
        return ("lm_head.weight",) if self.tie_word_embeddings else ()
