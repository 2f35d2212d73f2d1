"""What every Backplane causal LM offers the model runner and the loader.

A model takes a flat batch (all requests' tokens one after another) and an
`AttentionContext`; it never sees requests, padding policy or hardware.

Weight loading maps checkpoint tensor names onto parameters. Fused layers
(`MergedLinear`) receive several checkpoint tensors each; subclasses list
those in ``stacked_params`` as ``(fused_name, checkpoint_name, shard)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from backplane.core.layers.linear import MergedLinear
from backplane.plugins_sdk import AttentionSpec

logger = logging.getLogger(__name__)


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""

    def __init__(self, name: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(
            f"weight {name!r} has shape {list(got)} in the checkpoint but the model "
            f"expects {list(expected)}; the checkpoint does not match config.json"
        )
        self.name, self.expected, self.got = name, expected, got


@dataclass(frozen=True)
class KVCacheShape:
    """The attention geometry the KV cache is sized from.

    Attributes:
        num_layers: attention layers, one KV cache tensor each.
        num_heads: query heads.
        num_kv_heads: key/value heads (fewer than num_heads with GQA).
        head_size: size of one head.
        sliding_window: the model's attention window, None for full attention.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    sliding_window: int | None = None

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Memory of one KV block over all layers (keys and values)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_size * itemsize


class CausalLM(nn.Module, ABC):
    """Base class of decoder-only language models.

    Subclasses are built as ``cls(hf_config, dtype)`` and implement
    ``forward(input_ids [n], positions [n], ctx: AttentionContext) -> hidden [n, d]``,
    `compute_logits` and `kv_cache_shape`.
    """

    # (fused parameter prefix, checkpoint prefix, shard name), e.g.
    # ("qkv_proj", "q_proj", "q"): "...q_proj.weight" goes into "...qkv_proj.weight".
    stacked_params: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    # Checkpoint names matching any of these substrings are skipped silently:
    # buffers some exporters save that we recompute.
    ignored_weight_patterns: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden] -> [n, vocab]`` float32 logits."""

    @abstractmethod
    def kv_cache_shape(self) -> KVCacheShape:
        """Geometry of the attention layers, for sizing and allocating the KV cache."""

    def attention_spec(
        self,
        block_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        max_model_len: int | None = None,
    ) -> AttentionSpec:
        """The `AttentionSpec` backends are asked to serve.

        A sliding window is only reported when requests can be longer than it;
        below that, windowed and full attention are the same computation.
        """
        shape = self.kv_cache_shape()
        window = shape.sliding_window
        if window is not None and max_model_len is not None and max_model_len <= window:
            window = None
        return AttentionSpec(
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            head_size=shape.head_size,
            dtype=dtype,
            block_size=block_size,
            kv_cache_dtype=kv_cache_dtype,
            sliding_window=window,
        )

    def layer_attention_specs(self, spec: AttentionSpec) -> list[AttentionSpec]:
        """The AttentionSpec of each attention layer, given the model-wide ``spec``.

        The model-wide spec (from the config) carries every feature any layer
        uses; a model whose layers differ (Gemma: global layers without the
        sliding window, soft-capped scores) returns per-layer variants of it,
        each needing no feature the model-wide spec lacks. The runner makes one
        backend instance per distinct spec. Default: every layer uses ``spec``.
        """
        return [spec] * self.kv_cache_shape().num_layers

    def set_aux_hidden_layers(self, layer_ids: Sequence[int]) -> None:
        """Record the hidden states entering these layers on every forward (EAGLE-3).

        Layer index ``num_layers`` means the last layer's output before the final
        norm; an empty sequence turns the capture off. Models that cannot expose
        their residual stream keep this default, which refuses.
        """
        raise NotImplementedError(
            f"EAGLE-3 needs auxiliary hidden states, which {type(self).__name__} does not expose"
        )

    def aux_hidden_states(self) -> torch.Tensor:
        """The states captured by the last forward: ``[n, len(layer_ids) * hidden]``.

        Concatenated in the order given to `set_aux_hidden_layers`.
        """
        raise NotImplementedError(
            f"EAGLE-3 needs auxiliary hidden states, which {type(self).__name__} does not expose"
        )

    def skipped_weight_names(self) -> tuple[str, ...]:
        """Checkpoint names accepted but not loaded (e.g. lm_head when embeddings are tied)."""
        return ()

    def expected_weight_names(self) -> set[str]:
        """Every checkpoint tensor name this model needs, as the checkpoint spells it."""
        fused = {fused: [] for fused, _, _ in self.stacked_params}
        for fused_name, ckpt_name, shard in self.stacked_params:
            fused[fused_name].append((ckpt_name, shard))
        names = set()
        for name, _ in self.named_parameters():
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            if isinstance(module, MergedLinear):
                prefix, _, fused_name = module_name.rpartition(".")
                for ckpt_name, _shard in fused[fused_name]:
                    names.add(f"{prefix}.{ckpt_name}.{attr}" if prefix else f"{ckpt_name}.{attr}")
            else:
                names.add(name)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters (casting to the model dtype).

        Returns the checkpoint names that were loaded. Raises `WeightShapeError`
        on a shape mismatch. Names the model does not know are logged and skipped.
        """
        params = dict(self.named_parameters())
        skipped = set(self.skipped_weight_names())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name in skipped or any(p in name for p in self.ignored_weight_patterns):
                continue
            target = self._fused_target(name)
            if target is None:
                param = params.get(name)
                if param is None:
                    unexpected.append(name)
                    continue
                target = param.data
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightShapeError(name, tuple(target.shape), tuple(tensor.shape))
            target.copy_(tensor)
            loaded.add(name)
        if unexpected:
            logger.warning(
                "ignored %d checkpoint tensors the model does not use: %s%s",
                len(unexpected), ", ".join(unexpected[:5]), " ..." if len(unexpected) > 5 else "",
            )
        return loaded

    def _fused_target(self, name: str) -> torch.Tensor | None:
        """The slice of a fused parameter that checkpoint tensor ``name`` fills, if any."""
        for fused_name, ckpt_name, shard in self.stacked_params:
            marker = f".{ckpt_name}."
            if marker not in f".{name}":
                continue
            fused = f".{name}".replace(marker, f".{fused_name}.", 1)[1:]
            module_name, _, attr = fused.rpartition(".")
            try:
                module = self.get_submodule(module_name)
            except AttributeError:
                return None
            if isinstance(module, MergedLinear) and hasattr(module, attr):
                return module.shard_view(attr, shard)
        return None

