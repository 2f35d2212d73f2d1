"""The Llama decoder, shared by every Llama-family architecture.

Llama, Mistral, Qwen2, Qwen3, Granite and OLMo 2 differ only in small switches
(biases on the q/k/v projections, RMSNorm on queries and keys, explicit
head_dim, norm placement, Granite's multipliers), collected in `DecoderOptions`;
each architecture class just picks them.

Projections are fused: q/k/v is one matmul (``qkv_proj``) and gate/up another
(``gate_up_proj``); the loader stacks the separate checkpoint tensors into them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from backplane.core.distributed.parallel_state import get_pp_group, get_tp_group
from backplane.core.distributed.pipeline import (
    head_cost_in_layers,
    receive_activations,
    send_activations,
    stage_layers,
)
from backplane.core.layers.activation import SiluAndMul
from backplane.core.layers.attention import Attention, AttentionContext
from backplane.core.layers.embedding import LMHead, VocabEmbedding, gather_logits
from backplane.core.layers.linear import MergedLinear
from backplane.core.layers.norm import RMSNorm
from backplane.core.layers.parallel import (
    Shard,
    even_split,
    shard_column_parallel,
    shard_row_parallel,
)
from backplane.core.layers.rotary import ApplyRotary, RotaryEmbedding, rope_parameters
from backplane.core.models.base import CausalLM, KVCacheShape
from backplane.plugins_sdk import DecoderBlock

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class DecoderOptions:
    """Architecture switches of the shared decoder.

    Attributes:
        qkv_bias: q/k/v projections carry a bias.
        o_bias: the output projection carries a bias.
        mlp_bias: gate/up/down projections carry a bias.
        qk_norm: RMSNorm on queries and keys before rotary (Qwen3, OLMo 2).
        qk_norm_per_head: with qk_norm, one norm per head; False normalises the
            whole query / key projection at once (OLMo 2).
        post_norms: norm each sublayer's output instead of its input:
            x + norm(attn(x)), then x + norm(mlp(x)) (OLMo 2).
        attention_scale: softmax scale; None means ``head_dim ** -0.5``.
        embedding_multiplier: scales the token embeddings (Granite).
        residual_multiplier: scales each sublayer's output before the residual add (Granite).
    """

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    qk_norm_per_head: bool = True
    post_norms: bool = False
    attention_scale: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0


@dataclass(frozen=True)
class DecoderDims:
    """Sizes read from the transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int

    @classmethod
    def from_hf_config(cls, config: Any) -> DecoderDims:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        act = getattr(config, "hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: "
                             f"{list(SUPPORTED_ACTIVATIONS)}")
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
            max_positions=config.max_position_embeddings,
        )


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one tensor-parallel rank holds: a share, or one replicated head when
    there are fewer KV heads than ranks."""
    return max(1, num_kv_heads // tp_size)


class DecoderAttention(nn.Module):
    """Fused q/k/v projection, optional q/k norm, rotary, paged attention, output projection.

    Under tensor parallelism each rank holds ``num_heads / tp`` query heads and the
    KV heads they read (``num_kv_heads / tp``, or one replicated head when there
    are fewer KV heads than ranks); o_proj sums the ranks' partial outputs.
    """

    def __init__(
        self, dims: DecoderDims, options: DecoderOptions, layer_idx: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.tp = tp = get_tp_group()
        self.num_heads = even_split(dims.num_heads, tp.size, tp.rank,
                                    "num_attention_heads").length
        self.num_kv_heads = kv_heads_per_rank(dims.num_kv_heads, tp.size)
        self.head_dim = dims.head_dim
        self.q_size = self.num_heads * dims.head_dim
        self.kv_size = self.num_kv_heads * dims.head_dim
        self.qkv_proj = MergedLinear(
            dims.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=options.qkv_bias,
            dtype=dtype,
        )
        self.o_proj = nn.Linear(self.q_size, dims.hidden_size, bias=options.o_bias, dtype=dtype)
        if tp.size > 1:
            if dims.num_kv_heads >= tp.size and dims.num_kv_heads % tp.size:
                raise ValueError(f"num_key_value_heads ({dims.num_kv_heads}) is not divisible by "
                                 f"tensor_parallel_size ({tp.size})")
            if dims.num_kv_heads < tp.size and tp.size % dims.num_kv_heads:
                raise ValueError(f"tensor_parallel_size ({tp.size}) must be a multiple of "
                                 f"num_key_value_heads ({dims.num_kv_heads})")
            if options.qk_norm and not options.qk_norm_per_head:
                raise ValueError("a q/k norm over the whole projection (OLMo 2) needs every "
                                 "head on one rank: tensor_parallel_size must be 1")
            # The KV heads of this rank's query heads (all map to one head when replicated).
            kv_start = tp.rank * dims.num_kv_heads // tp.size * dims.head_dim
            q_start = tp.rank * self.q_size
            shard_column_parallel(self.qkv_proj, {
                "q": Shard(0, q_start, self.q_size),
                "k": Shard(0, kv_start, self.kv_size),
                "v": Shard(0, kv_start, self.kv_size),
            })
            shard_row_parallel(self.o_proj, Shard(1, q_start, self.q_size), tp.rank)
        self.qk_norm, self.qk_norm_per_head = options.qk_norm, options.qk_norm_per_head
        if options.qk_norm:
            per_head = options.qk_norm_per_head
            q_width, k_width = (dims.head_dim,) * 2 if per_head else (self.q_size, self.kv_size)
            self.q_norm = RMSNorm(q_width, dims.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(k_width, dims.rms_norm_eps, dtype=dtype)
        self.rotary = ApplyRotary()
        scale = options.attention_scale
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, dims.head_dim,
            dims.head_dim**-0.5 if scale is None else scale, layer_idx,
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_end = self.q_size + self.kv_size
        if self.qk_norm:
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size : qk_end]
            if self.qk_norm_per_head:
                q, k = q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim)
            q = self.q_norm(q).view(n, self.num_heads, self.head_dim)
            k = self.k_norm(k).view(n, self.num_kv_heads, self.head_dim)
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        else:
            # Queries and keys sit side by side in each row: rotate them in one op.
            qk = qkv[:, :qk_end].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = self.rotary(qk, cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, qk_end:].view(n, self.num_kv_heads, self.head_dim)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, ctx)))


class DecoderMLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    # A platform may compute act(gate_up_proj(x)) in one call (plugins_sdk.decoder_block).
    layer_kind = "gated_mlp"
    # Set by `set_gate_up_activation`; None: the projection and the activation run apart.
    gate_up_activation: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, dims: DecoderDims, options: DecoderOptions, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp = get_tp_group()
        rows = even_split(dims.intermediate_size, tp.size, tp.rank, "intermediate_size")
        size = rows.length
        self.gate_up_proj = MergedLinear(
            dims.hidden_size, {"gate": size, "up": size}, bias=options.mlp_bias, dtype=dtype
        )
        self.down_proj = nn.Linear(size, dims.hidden_size, bias=options.mlp_bias, dtype=dtype)
        if tp.size > 1:
            shard_column_parallel(self.gate_up_proj, {"gate": rows, "up": rows})
            shard_row_parallel(self.down_proj, Shard(1, rows.start, size), tp.rank)
        self.act = SiluAndMul()

    def set_gate_up_activation(
            self, fn: Callable[[torch.Tensor], torch.Tensor | None] | None) -> None:
        """``fn(x)`` is tried for ``act(gate_up_proj(x))`` at every forward; a None result
        means it declined that input (plugins_sdk.decoder_block)."""
        self.gate_up_activation = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_activation
        h = fused(x) if fused is not None else None
        if h is None:
            h = self.act(self.gate_up_proj(x))
        return self.tp.all_reduce(self.down_proj(h))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With ``options.post_norms`` (OLMo 2) the norms move to the sublayer outputs:
    x + norm(attn(x)), then x + norm(mlp(x)); the checkpoint then names them
    ``post_attention_layernorm`` and ``post_feedforward_layernorm``.
    """

    def __init__(
        self, dims: DecoderDims, options: DecoderOptions, layer_idx: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.post_norms = options.post_norms
        self.residual_multiplier = options.residual_multiplier
        if not options.post_norms:
            self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype=dtype)
        self.self_attn = DecoderAttention(dims, options, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype=dtype)
        if options.post_norms:
            self.post_feedforward_layernorm = RMSNorm(
                dims.hidden_size, dims.rms_norm_eps, dtype=dtype
            )
        self.mlp = DecoderMLP(dims, options, dtype)

    # A platform may run the whole layer in one call (plugins_sdk.decoder_block).
    layer_kind = "decoder_layer"
    # Set by `set_block_runner`; None: the modules run one by one.
    block_runner: Callable[..., torch.Tensor | None] | None = None

    def block(self) -> DecoderBlock | None:
        """This layer's modules as a `DecoderBlock`, or None when it is not the plain
        pre-norm block (q/k norms, post-norms, a residual multiplier, tensor-parallel
        shards whose outputs are all-reduced, a mixture-of-experts MLP)."""
        attn, mlp = self.self_attn, self.mlp
        if (type(self).forward is not DecoderLayer.forward  # a subclass computes more
                or not isinstance(mlp, DecoderMLP) or self.post_norms
                or self.residual_multiplier != 1.0 or attn.qk_norm
                or attn.tp.size > 1 or mlp.tp.size > 1):
            return None
        return DecoderBlock(
            input_norm=self.input_layernorm, qkv_proj=attn.qkv_proj, rotary=attn.rotary,
            attention=attn.attn, o_proj=attn.o_proj,
            post_attention_norm=self.post_attention_layernorm,
            gate_up_proj=mlp.gate_up_proj, activation=mlp.act, down_proj=mlp.down_proj,
            num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
            head_size=attn.head_dim, layer_idx=attn.attn.layer_idx, scale=attn.attn.scale)

    def set_block_runner(self, runner: Callable[..., torch.Tensor | None] | None) -> None:
        """``runner(x, cos, sin, ctx)`` is tried before the modules at every forward; a
        None result means it declined that step (plugins_sdk.decoder_block)."""
        self.block_runner = runner

    def _residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return x + out

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        if self.block_runner is not None:
            out = self.block_runner(x, cos, sin, ctx)
            if out is not None:
                return out
        if self.post_norms:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, ctx))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        attn = self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        norm = self.post_attention_layernorm
        if self.residual_multiplier == 1.0 and getattr(norm, "accepts_residual", False):
            # the residual add and the next norm in one call (one kernel where the
            # platform fuses them): the same sums, one pass over the hidden states fewer
            normed, x = norm(attn, residual=x)
            return x + self.mlp(normed)
        x = self._residual(x, attn)
        return self._residual(x, self.mlp(norm(x)))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix of checkpoints).

    Auxiliary hidden states (EAGLE-3): when ``aux_hidden_layers`` is non-empty,
    each forward stores in ``aux_hidden_states`` the residual stream entering
    each listed layer (index ``num_layers``: the last layer's output before the
    final norm), in the listed order. Empty (the default) costs nothing.
    """

    aux_hidden_layers: tuple[int, ...] = ()
    # plugins_sdk.decoder_block: the layers' platform runners in one call per step
    layer_kind = "decoder_stack"
    # Set by `set_stack_runner`; None: the layers run one by one.
    stack_runner: Callable[..., torch.Tensor | None] | None = None

    def __init__(self, dims: DecoderDims, options: DecoderOptions, hf_config: Any,
                 dtype: torch.dtype) -> None:
        super().__init__()
        # Pipeline parallel: this stage's layers only (the others are empty
        # placeholders, so layer indices and checkpoint names stay as they are);
        # stage 0 also holds the embedding and the final norm (distributed/pipeline.py).
        self.pp = pp = get_pp_group()
        self.hidden_size, self.dtype = dims.hidden_size, dtype
        # Stage 0 also runs the output head: it takes fewer layers to balance the stages.
        self.local_layers = stage_layers(dims.num_layers, pp.size, pp.rank, head_cost_in_layers(
            dims.vocab_size, dims.hidden_size, dims.intermediate_size, dims.num_heads,
            dims.num_kv_heads, dims.head_dim))
        self.embed_tokens = (VocabEmbedding(dims.vocab_size, dims.hidden_size, dtype=dtype,
                                            parallel=True) if pp.is_first else None)
        self.layers = nn.ModuleList(
            DecoderLayer(dims, options, i, dtype) if i in self.local_layers else nn.Identity()
            for i in range(dims.num_layers)
        )
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype=dtype) if pp.is_first \
            else None
        self.embedding_multiplier = options.embedding_multiplier
        self.rotary_emb = RotaryEmbedding(
            dims.head_dim, dims.max_positions, rope_parameters(hf_config)
        )
        self.aux_hidden_states: list[torch.Tensor] = []

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Final hidden states. Split into pipeline stages, stage 0 returns None (its
        result comes back later through `receive_pipeline_output`) and the other
        stages return their activations, which only the next stage reads."""
        if self.pp.size > 1:
            return self._forward_stage(input_ids, positions, ctx)
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        # One table lookup per step, shared by all layers.
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        if self.aux_hidden_layers:
            return self._forward_capturing(hidden, cos, sin, ctx)
        if self.stack_runner is not None:
            out = self.stack_runner(hidden, cos, sin, ctx)
            if out is not None:
                return self.norm(out)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, ctx)
        return self.norm(hidden)

    def set_stack_runner(self, runner: Callable[..., torch.Tensor | None] | None) -> None:
        """``runner(hidden, cos, sin, ctx)``, tried first at every single-stage forward
        without auxiliary hidden states, runs all the decoder layers and returns the last
        one's output, or None to decline the step (the layers then run one by one;
        plugins_sdk.decoder_block)."""
        self.stack_runner = runner

    def _forward_stage(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """This pipeline stage's part of `forward`: receive, run own layers, pass on.

        Stage 0 does not wait for the activations to come back round: it may start
        the next batch first (several batches in flight keep every stage busy)."""
        shape = (input_ids.shape[0], self.hidden_size)
        if self.pp.is_first:
            hidden = self.embed_tokens(input_ids)
            if self.embedding_multiplier != 1.0:
                hidden = hidden * self.embedding_multiplier
        else:
            hidden = receive_activations(self.pp, shape, self.dtype, positions.device)
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        for idx in self.local_layers:
            hidden = self.layers[idx](hidden, cos, sin, ctx)
        send_activations(self.pp, hidden)
        return None if self.pp.is_first else hidden

    def receive_pipeline_output(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Stage 0: the last stage's activations of the oldest batch in flight, normed."""
        shape = (num_tokens, self.hidden_size)
        return self.norm(receive_activations(self.pp, shape, self.dtype, device))

    def _forward_capturing(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """The layer loop of `forward`, also recording ``aux_hidden_states``."""
        wanted = set(self.aux_hidden_layers)
        captured: dict[int, torch.Tensor] = {}
        for idx, layer in enumerate(self.layers):
            if idx in wanted:
                captured[idx] = hidden
            hidden = layer(hidden, cos, sin, ctx)
        captured[len(self.layers)] = hidden
        self.aux_hidden_states = [captured[idx] for idx in self.aux_hidden_layers]
        return self.norm(hidden)


class LlamaForCausalLM(CausalLM):
    """Llama 2/3 (incl. llama3 rope scaling), TinyLlama, SmolLM and look-alikes."""

    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", "gate"),
        ("gate_up_proj", "up_proj", "up"),
    )

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """The switches this architecture uses, given its config."""
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False))
        )

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.dims = DecoderDims.from_hf_config(hf_config)
        # The groups this model was built for (its layers hold them too): read once here,
        # so an engine of another size in the same process cannot change them later.
        self.tp = get_tp_group()
        self.options = self.decoder_options(hf_config)
        self.model = DecoderModel(self.dims, self.options, hf_config, dtype)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if not get_pp_group().is_first else LMHead(
            self.dims.vocab_size,
            self.dims.hidden_size,
            dtype=dtype,
            tied_to=self.model.embed_tokens if self.tie_word_embeddings else None,
            parallel=True,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Flat token ids and positions ``[num_tokens]`` -> final hidden states."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.lm_head(hidden), self.dims.vocab_size, self.tp)

    def receive_pipeline_output(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        return self.model.receive_pipeline_output(num_tokens, device)

    def set_aux_hidden_layers(self, layer_ids) -> None:
        ids = tuple(int(i) for i in layer_ids)
        bad = [i for i in ids if not 0 <= i <= self.dims.num_layers]
        if bad:
            raise ValueError(
                f"auxiliary hidden state layer ids {bad} are out of range for "
                f"{type(self).__name__} with {self.dims.num_layers} layers "
                f"(valid: 0..{self.dims.num_layers})"
            )
        self.model.aux_hidden_layers = ids
        self.model.aux_hidden_states = []

    def aux_hidden_states(self) -> torch.Tensor:
        if not self.model.aux_hidden_layers:
            raise RuntimeError("no auxiliary hidden state layers are set: call "
                               "set_aux_hidden_layers first")
        if not self.model.aux_hidden_states:
            raise RuntimeError("no auxiliary hidden states yet: run a forward first")
        return torch.cat(self.model.aux_hidden_states, dim=-1)

    def kv_cache_shape(self) -> KVCacheShape:
        window = None
        if getattr(self.config, "use_sliding_window", True):
            window = getattr(self.config, "sliding_window", None)
        tp_size = self.tp.size
        return KVCacheShape(
            num_layers=self.dims.num_layers,
            num_heads=self.dims.num_heads // tp_size,
            num_kv_heads=kv_heads_per_rank(self.dims.num_kv_heads, tp_size),
            head_size=self.dims.head_dim,
            sliding_window=window,
        )

    def skipped_weight_names(self) -> tuple[str, ...]:
        # Some tied checkpoints still store a copy of the embedding as lm_head.
        return ("lm_head.weight",) if self.tie_word_embeddings else ()

    def local_layer_ids(self) -> range:
        return self.model.local_layers

    def foreign_weight_prefixes(self) -> tuple[str, ...]:
        if self.model.pp.size == 1:
            return ()
        others = tuple(f"model.layers.{i}." for i in range(self.dims.num_layers)
                       if i not in self.model.local_layers)
        if self.model.pp.is_first:
            return others
        return (*others, "model.embed_tokens.", "model.norm.", "lm_head.")


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama decoder (its sliding window is reported in the attention spec)."""
