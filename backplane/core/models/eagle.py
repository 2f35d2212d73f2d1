"""EAGLE-1 and EAGLE-3 draft heads for Llama-family targets (speculative decoding).

A draft head is a small decoder that predicts the target's next tokens from
the target's own hidden states. Both published formats are read as their
authors (SafeAILab/EAGLE) save them; vLLM reads the same files.

EAGLE-1 (``architectures``: ``LlamaForCausalLM`` with ``num_hidden_layers``
1 in an EAGLE directory, ``EAGLEModel`` or ``EagleLlamaForCausalLM``)::

    x = fc(cat(embed(token_{p+1}), h_p))      # fc: [H, 2H], optional bias
    x = layers(x)                             # Llama layers; layer 0 has no input norm
    logits = target.lm_head(x)                # no final norm; x is also fed back

Tensors: ``fc.weight`` (+ ``fc.bias``), ``layers.{i}.self_attn.{q,k,v,o}_proj``,
``layers.{i}.mlp.{gate,up,down}_proj``, ``layers.{i}.post_attention_layernorm``,
``layers.{i}.input_layernorm`` for ``i > 0``, optionally ``embed_tokens``; names
may carry a ``model.`` prefix. ``h_p`` is the target's final (normed) hidden
state at position ``p``; later draft steps feed back the head's own output.

EAGLE-3 (``LlamaForCausalLMEagle3`` / ``Eagle3LlamaForCausalLM``)::

    g = fc(cat(aux_0, aux_1, aux_2))           # first step only: [H, 3H], target aux states
    r = hidden_norm(g) if norm_before_residual else g
    x = r + attn(cat(input_layernorm(embed(token)), hidden_norm(g)))   # q/k/v: 2H inputs
    x = x + mlp(post_attention_layernorm(x))   # x (pre-norm) is fed back
    logits = scatter(lm_head(norm(x)), d2t)   # draft vocab -> target vocab, rest -inf

Tensors: ``fc.weight``, ``midlayer.{input_layernorm,hidden_norm,
post_attention_layernorm}``, ``midlayer.self_attn.*``, ``midlayer.mlp.*``,
``norm.weight``, ``lm_head.weight`` ``[draft_vocab_size, H]``, ``d2t``
``[draft_vocab_size]`` (target id = draft id + d2t[draft id]), optionally ``t2d``
(unused) and ``embed_tokens``. The aux states are the residual stream entering
target layers ``eagle_aux_hidden_state_layer_ids`` (config, top level or in
``eagle_config``), by default ``(2, L // 2, L - 3)`` for an L-layer target,
concatenated in ascending layer order as EAGLE and vLLM capture them.

Heads have their own attention layers (indexed from 0 in their own
``ctx.kv_caches``); the rotary embedding is the target's (the same table),
unless the head's config.json sets different rope parameters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from backplane.core.layers.attention import AttentionContext
from backplane.core.layers.embedding import LMHead, VocabEmbedding
from backplane.core.layers.linear import MergedLinear
from backplane.core.layers.norm import RMSNorm
from backplane.core.layers.rotary import RotaryEmbedding, rope_parameters
from backplane.core.loader.model_loader import MissingWeightsError, init_buffers
from backplane.core.loader.weights import iterate_weights, resolve_model_dir, safetensors_files
from backplane.core.models.base import CausalLM, KVCacheShape, WeightShapeError
from backplane.core.models.llama import (
    DecoderAttention,
    DecoderDims,
    DecoderLayer,
    DecoderMLP,
    DecoderOptions,
    LlamaForCausalLM,
)

logger = logging.getLogger(__name__)

EAGLE1_ARCHITECTURES = ("EAGLEModel", "EagleLlamaForCausalLM", "LlamaForCausalLM")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def default_aux_layer_ids(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default target layers: low, middle and high, ``(2, L // 2, L - 3)``."""
    n = num_target_layers
    return (2, n // 2, n - 3)


class EagleHead(CausalLM):
    """Common part of the EAGLE draft heads.

    ``forward(input_ids [n], positions [n], hidden [n, H_in], ctx)`` returns
    ``(hidden for compute_logits, hidden to feed back at the next draft step)``,
    both ``[n, H]``. ``compute_logits`` gives float32 logits over the target's
    vocabulary. Built by `load_eagle_head`.
    """

    method: str = ""
    aux_layer_ids: tuple[int, ...] = ()
    num_attention_layers: int = 1

    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(
        self,
        hf_config: Any,
        target: CausalLM,
        dtype: torch.dtype,
        own_embedding: bool,
        rotary: RotaryEmbedding | None,
    ) -> None:
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.dims = DecoderDims.from_hf_config(hf_config)
        self.options = LlamaForCausalLM.decoder_options(hf_config)
        # The target's modules are plain attributes, not submodules: they are
        # neither registered twice nor expected in the head's checkpoint.
        self.__dict__["_target"] = target
        if own_embedding:
            self.embed_tokens = VocabEmbedding(self.dims.vocab_size, self.dims.hidden_size, dtype)
        else:
            self.__dict__["embed_tokens"] = target.model.embed_tokens
        if rotary is None:
            self.rotary_emb = RotaryEmbedding(
                self.dims.head_dim, self.dims.max_positions, rope_parameters(hf_config)
            )
        else:
            self.__dict__["rotary_emb"] = rotary

    def kv_cache_shape(self) -> KVCacheShape:
        return KVCacheShape(
            num_layers=self.num_attention_layers,
            num_heads=self.dims.num_heads,
            num_kv_heads=self.dims.num_kv_heads,
            head_size=self.dims.head_dim,
        )


class Eagle1Head(EagleHead):
    """EAGLE-1: ``fc(cat(embed, target hidden))`` then Llama layers, target lm_head."""

    method = "eagle"

    def __init__(
        self,
        hf_config: Any,
        target: CausalLM,
        dtype: torch.dtype = torch.float32,
        own_embedding: bool = False,
        rotary: RotaryEmbedding | None = None,
        fc_bias: bool = False,
    ) -> None:
        super().__init__(hf_config, target, dtype, own_embedding, rotary)
        h = self.dims.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=fc_bias, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(self.dims, self.options, i, dtype) for i in range(self.dims.num_layers)
        )
        # EAGLE-1's first layer takes fc's output un-normalised.
        del self.layers[0].input_layernorm
        self.layers[0].input_layernorm = nn.Identity()
        self.num_attention_layers = self.dims.num_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        ctx: AttentionContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        x = self.fc(torch.cat((embeds, hidden), dim=-1))
        cos, sin = self.rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return x, x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target.compute_logits(hidden)


class Eagle3Layer(nn.Module):
    """EAGLE-3's single decoder layer (``midlayer``): q/k/v see [norm(embeds), norm(hidden)]."""

    def __init__(
        self, dims: DecoderDims, options: DecoderOptions, dtype: torch.dtype,
        norm_before_residual: bool,
    ) -> None:
        super().__init__()
        h, eps = dims.hidden_size, dims.rms_norm_eps
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = RMSNorm(h, eps, dtype=dtype)
        self.hidden_norm = RMSNorm(h, eps, dtype=dtype)
        self.self_attn = DecoderAttention(dims, options, 0, dtype)
        attn = self.self_attn
        attn.qkv_proj = MergedLinear(
            2 * h, {"q": attn.q_size, "k": attn.kv_size, "v": attn.kv_size},
            bias=options.qkv_bias, dtype=dtype,
        )
        self.post_attention_layernorm = RMSNorm(h, eps, dtype=dtype)
        self.mlp = DecoderMLP(dims, options, dtype)

    def forward(
        self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        ctx: AttentionContext,
    ) -> torch.Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        x = residual + self.self_attn(x, cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(EagleHead):
    """EAGLE-3: fused target aux states, one ``midlayer``, own norm and draft-vocab lm_head."""

    method = "eagle3"

    def __init__(
        self,
        hf_config: Any,
        target: CausalLM,
        dtype: torch.dtype = torch.float32,
        own_embedding: bool = False,
        rotary: RotaryEmbedding | None = None,
        fc_bias: bool = False,
        aux_layer_ids: tuple[int, ...] = (),
        draft_vocab_size: int | None = None,
        own_lm_head: bool = True,
        has_d2t: bool = True,
    ) -> None:
        super().__init__(hf_config, target, dtype, own_embedding, rotary)
        h = self.dims.hidden_size
        self.aux_layer_ids = tuple(aux_layer_ids)
        self.fc = nn.Linear(len(self.aux_layer_ids) * h, h, bias=fc_bias, dtype=dtype)
        self.midlayer = Eagle3Layer(
            self.dims, self.options, dtype,
            bool(getattr(hf_config, "norm_before_residual", False)),
        )
        self.norm = RMSNorm(h, self.dims.rms_norm_eps, dtype=dtype)
        self.draft_vocab_size = draft_vocab_size or self.dims.vocab_size
        if own_lm_head:
            self.lm_head = LMHead(self.draft_vocab_size, h, dtype=dtype)
        else:
            self.__dict__["lm_head"] = target.lm_head
        # target id = draft id + d2t[draft id]; None when the vocabularies are the same.
        if has_d2t:
            self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        else:
            self.d2t = None
        self.register_buffer("draft_to_target", None, persistent=False)
        self.num_attention_layers = 1

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        ctx: AttentionContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.shape[-1] == self.fc.in_features and hidden.shape[-1] != self.dims.hidden_size:
            hidden = self.fc(hidden)  # first step: the target's concatenated aux states
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        x = self.midlayer(embeds, hidden, cos, sin, ctx)
        return self.norm(x), x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.draft_to_target is None:
            return logits
        out = logits.new_full((logits.shape[0], self.dims.vocab_size), float("-inf"))
        out[:, self.draft_to_target] = logits
        return out

    def finish_loading(self) -> None:
        """Check ``d2t`` and precompute the draft -> target id map."""
        if self.d2t is None:
            return
        ids = torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.dims.vocab_size):
            raise ValueError(
                f"d2t maps draft ids to target ids outside [0, {self.dims.vocab_size}): "
                "the checkpoint's d2t does not fit the target vocabulary"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("d2t maps two draft ids to the same target id")
        self.draft_to_target = ids

    def expected_weight_names(self) -> set[str]:
        names = super().expected_weight_names()
        if self.d2t is not None:
            names.add("d2t")
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        special: set[str] = set()

        def rest() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name == "t2d":
                    continue  # target -> draft membership mask; d2t says it all
                if name == "d2t":
                    if self.d2t is None:
                        continue
                    if tuple(tensor.shape) != tuple(self.d2t.shape):
                        raise WeightShapeError(name, tuple(self.d2t.shape), tuple(tensor.shape))
                    self.d2t.copy_(tensor.to(torch.int64))
                    special.add(name)
                    continue
                yield name, tensor

        loaded = super().load_weights(rest())
        return loaded | special


def _normalise_name(name: str, method: str) -> str:
    """Checkpoint name -> the head's parameter name (``model.`` prefix, layer naming)."""
    name = name.removeprefix("model.")
    if method == "eagle3" and name.startswith("layers.0."):
        name = "midlayer." + name.removeprefix("layers.0.")
    return name


def _checkpoint_names(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes of the checkpoint, read from the safetensors headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _target_decoder(target: CausalLM) -> Any:
    model = getattr(target, "model", None)
    if not isinstance(target, LlamaForCausalLM) or model is None:
        raise ValueError(
            f"EAGLE draft heads need a Llama-family target model; {type(target).__name__} "
            "is not one"
        )
    return model


def _aux_layer_ids(raw: dict[str, Any], num_target_layers: int, config_path: str) -> tuple:
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    eagle_config = raw.get("eagle_config")
    if ids is None and isinstance(eagle_config, dict):
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids, source = default_aux_layer_ids(num_target_layers), "default"
    else:
        source = "eagle_aux_hidden_state_layer_ids"
    ids = tuple(int(i) for i in ids)
    if (len(ids) != 3 or len(set(ids)) != len(ids)
            or any(not 0 <= i <= num_target_layers for i in ids)):
        raise ValueError(
            f"{config_path}: EAGLE-3 needs 3 distinct target layers in 0..{num_target_layers}; "
            f"the {source} layer ids are {list(ids)} for a target with {num_target_layers} "
            "layers (set eagle_aux_hidden_state_layer_ids in config.json)"
        )
    # EAGLE and vLLM capture the states in layer order, whatever order the config lists.
    return tuple(sorted(ids))


def load_eagle_head(
    path: str, target: CausalLM, dtype: torch.dtype, device: torch.device | str
) -> EagleHead:
    """Read an EAGLE-1 / EAGLE-3 head from ``path`` (config.json + safetensors) for ``target``.

    The head is built on ``device`` in ``dtype``; it shares the target's
    ``embed_tokens`` (and, for EAGLE-1 or an EAGLE-3 head without one, its
    lm_head) unless the checkpoint has its own.

    Raises:
        FileNotFoundError: config.json or the safetensors weights are missing.
        ValueError: not an EAGLE head Backplane supports (names the file and
            field), a hidden size / vocabulary that does not match the target's,
            missing tensors or shape mismatches (named).
    """
    from transformers import LlamaConfig

    device = torch.device(device)
    model_dir = resolve_model_dir(path)
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"EAGLE head directory {model_dir!r} has no config.json")
    with open(config_path) as f:
        raw = json.load(f)
    files = safetensors_files(model_dir)
    archs = list(raw.get("architectures") or [])
    if any(a in EAGLE3_ARCHITECTURES for a in archs):
        method = "eagle3"
    elif any(a in EAGLE1_ARCHITECTURES for a in archs):
        method = "eagle"
    else:
        raise ValueError(
            f"{config_path}: architectures {archs} is not an EAGLE draft head Backplane "
            f"supports; supported: {list(EAGLE1_ARCHITECTURES + EAGLE3_ARCHITECTURES)}"
        )
    shapes = {_normalise_name(n, method): s for n, s in _checkpoint_names(files).items()}
    if "fc.weight" not in shapes:
        raise ValueError(
            f"{model_dir}: the checkpoint has no 'fc.weight' tensor, so it is not an EAGLE "
            f"draft head (architectures {archs} in {config_path})"
        )

    decoder = _target_decoder(target)
    target_dims = target.dims
    hidden = raw.get("hidden_size")
    target_hidden = raw.get("target_hidden_size") or hidden
    if hidden != target_dims.hidden_size or target_hidden != target_dims.hidden_size:
        raise ValueError(
            f"{config_path}: hidden_size {hidden}"
            + (f" (target_hidden_size {target_hidden})" if target_hidden != hidden else "")
            + f" does not match the target model's hidden_size {target_dims.hidden_size}; "
            "the head was trained for a different target"
        )
    if raw.get("vocab_size") != target_dims.vocab_size:
        raise ValueError(
            f"{config_path}: vocab_size {raw.get('vocab_size')} does not match the target "
            f"model's vocab_size {target_dims.vocab_size}"
        )
    if raw.get("add_para_norm"):
        raise ValueError(f"{config_path}: add_para_norm (the HASS variant) is not supported")
    config = LlamaConfig.from_dict(raw)
    if not getattr(config, "max_position_embeddings", None):
        config.max_position_embeddings = target_dims.max_positions
    dims = DecoderDims.from_hf_config(config)

    # Rotary: the target's table unless the head's config sets its own rope.
    target_rotary = decoder.rotary_emb
    rotary = target_rotary
    if any(key in raw for key in _ROPE_KEYS) and (
        rope_parameters(config) != target_rotary.params or dims.head_dim != target_rotary.head_dim
    ):
        rotary = None
        logger.warning("EAGLE head %s sets rope parameters different from the target's; "
                       "using the head's", model_dir)
    common = dict(
        own_embedding="embed_tokens.weight" in shapes,
        rotary=rotary,
        fc_bias="fc.bias" in shapes,
    )
    if method == "eagle":
        head_cls, kwargs = Eagle1Head, common
    else:
        if dims.num_layers != 1:
            raise ValueError(
                f"{config_path}: num_hidden_layers {dims.num_layers}; Backplane supports "
                "EAGLE-3 heads with one decoder layer (midlayer)"
            )
        draft_vocab = raw.get("draft_vocab_size") or target_dims.vocab_size
        has_d2t = "d2t" in shapes
        if draft_vocab != target_dims.vocab_size and not has_d2t:
            raise ValueError(
                f"{model_dir}: draft_vocab_size {draft_vocab} differs from the target's "
                f"vocab_size {target_dims.vocab_size} but the checkpoint has no 'd2t' tensor"
            )
        own_lm_head = "lm_head.weight" in shapes
        if not own_lm_head and draft_vocab != target_dims.vocab_size:
            raise ValueError(
                f"{model_dir}: the checkpoint has no 'lm_head.weight' for its draft "
                f"vocabulary of {draft_vocab} tokens"
            )
        head_cls = Eagle3Head
        kwargs = dict(
            common,
            aux_layer_ids=_aux_layer_ids(raw, target_dims.num_layers, config_path),
            draft_vocab_size=draft_vocab,
            own_lm_head=own_lm_head,
            has_d2t=has_d2t,
        )

    with torch.device("meta"):
        head = head_cls(config, target, dtype, **kwargs)
    head.to_empty(device=device)
    init_buffers(head, device)
    if rotary is None:
        head.rotary_emb.ensure_positions(max(target_rotary.max_seq_len, dims.max_positions))
    weights = ((_normalise_name(n, method), t) for n, t in iterate_weights(files))
    loaded = head.load_weights(weights)
    missing = sorted(head.expected_weight_names() - loaded)
    if missing:
        raise MissingWeightsError(model_dir, missing)
    if isinstance(head, Eagle3Head):
        head.finish_loading()
    head.requires_grad_(False)
    head.eval()
    logger.info("loaded %s draft head from %s (%d tensors)", method, model_dir, len(loaded))
    return head
