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

from backplane.core.loader.weights import CheckpointTensor
from backplane.plugins_sdk import AttentionSpec

logger = logging.getLogger(__name__)


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""

    def __init__(self, name: str, expected: tuple[int, ...], got: tuple[int, ...],
                 note: str = "") -> None:
        super().__init__(
            f"weight {name!r} has shape {list(got)} in the checkpoint but the model "
            f"expects {list(expected)}{note}; the checkpoint does not match config.json"
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
    # Whether the layers split over tensor-parallel ranks (layers/parallel.py) and
    # the layer stack over pipeline stages; the loader refuses other models at size > 1.
    supports_tensor_parallel: ClassVar[bool] = False
    supports_pipeline_parallel: ClassVar[bool] = False

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
            if hasattr(module, "output_sizes"):  # fused (MergedLinear or a quantized one)
                prefix, _, fused_name = module_name.rpartition(".")
                for ckpt_name, _shard in fused[fused_name]:
                    names.add(f"{prefix}.{ckpt_name}.{attr}" if prefix else f"{ckpt_name}.{attr}")
            else:
                names.add(name)
        return names

    @torch.no_grad()
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]
    ) -> set[str]:
        """Copy checkpoint tensors into the parameters (casting to the model dtype).

        ``weights`` yields tensors or lazy `CheckpointTensor`s; a layer split over
        tensor-parallel ranks (``checkpoint_shards``, see layers/parallel.py) reads
        only its slice. A module with its own ``load_checkpoint_tensor(attr, part,
        source)`` (e.g. a quantized layer with packed tensors) loads its tensors
        itself. Returns the checkpoint names that were loaded. Raises
        `WeightShapeError` on a shape mismatch. Names the model does not know are
        logged and skipped.
        """
        skipped = set(self.skipped_weight_names())
        params = dict(self.named_parameters())
        foreign = self.foreign_weight_prefixes()
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, source in weights:
            if name in skipped or any(p in name for p in self.ignored_weight_patterns):
                continue
            if isinstance(source, torch.Tensor):
                source = CheckpointTensor.from_tensor(name, source)
            view = self._fused_target(name)
            if view is not None:  # a model's own fused layout (stacked MoE experts)
                if tuple(view.shape) != source.shape:
                    raise WeightShapeError(name, tuple(view.shape), source.shape)
                view.copy_(source.read())
                loaded.add(name)
                continue
            found = self._checkpoint_target(name, params)
            if found is None:
                if not name.startswith(foreign):  # other pipeline stages' layers: expected
                    unexpected.append(name)
                continue
            module, attr, part = found
            custom = getattr(module, "load_checkpoint_tensor", None)
            if custom is not None:
                custom(attr, part, source)
            else:
                _copy_checkpoint_tensor(module, attr, part, source)
            loaded.add(name)
        if unexpected:
            logger.warning(
                "ignored %d checkpoint tensors the model does not use: %s%s",
                len(unexpected), ", ".join(unexpected[:5]), " ..." if len(unexpected) > 5 else "",
            )
        return loaded

    def local_layer_ids(self) -> range:
        """The attention layers this process holds (all of them, unless the model is split
        into pipeline stages); only these get a KV cache."""
        return range(self.kv_cache_shape().num_layers)

    def receive_pipeline_output(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Pipeline stage 0 (models with ``supports_pipeline_parallel``): the final hidden
        states ``[num_tokens, hidden]`` of the oldest batch whose forward returned None,
        received from the last stage."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support pipeline parallelism")

    def foreign_weight_prefixes(self) -> tuple[str, ...]:
        """Checkpoint name prefixes this process does not hold on purpose (the layers of
        other pipeline stages); skipped without a warning."""
        return ()

    def _fused_target(self, name: str) -> torch.Tensor | None:
        """A view of a parameter that checkpoint tensor ``name`` fills in a layout of the
        model's own (e.g. one expert of a stacked MoE weight); None for the standard
        resolution of `_checkpoint_target`."""
        return None

    def _checkpoint_target(self, name: str, params: dict) -> tuple[nn.Module, str, str | None] | None:
        """``(module, attribute, fused part)`` that checkpoint tensor ``name`` fills, if any."""
        for fused_name, ckpt_name, part in self.stacked_params:
            marker = f".{ckpt_name}."
            if marker not in f".{name}":
                continue
            fused = f".{name}".replace(marker, f".{fused_name}.", 1)[1:]
            module_name, _, attr = fused.rpartition(".")
            try:
                module = self.get_submodule(module_name)
            except AttributeError:
                return None
            if hasattr(module, "output_sizes") and hasattr(module, attr):
                return module, attr, part
            return None
        if name not in params:
            return None
        module_name, _, attr = name.rpartition(".")
        return (self.get_submodule(module_name) if module_name else self), attr, None


def _copy_checkpoint_tensor(module: nn.Module, attr: str, part: str | None,
                            source: CheckpointTensor) -> None:
    """Fill ``module.<attr>`` (fused ``part`` of it) from ``source``, or this rank's slice."""
    target = module.shard_view(attr, part) if part is not None else getattr(module, attr).data
    shard = getattr(module, "checkpoint_shards", {}).get((attr, part))
    if shard is None:
        if tuple(target.shape) != source.shape:
            raise WeightShapeError(source.name, tuple(target.shape), source.shape)
        target.copy_(source.read())
        return
    if shard.zero:
        target.zero_()
        return
    other = [s for d, s in enumerate(target.shape) if d != shard.dim]
    if ([s for d, s in enumerate(source.shape) if d != shard.dim] != other
            or shard.start + shard.length > source.shape[shard.dim]):
        raise WeightShapeError(
            source.name, tuple(target.shape), source.shape,
            note=f" (this tensor-parallel rank holds {shard.length} entries of dim "
                 f"{shard.dim} from {shard.start})")
    values = source.read_slice(shard.dim, shard.start, shard.length)
    held = target.shape[shard.dim]
    target.narrow(shard.dim, 0, shard.length).copy_(values)
    if held > shard.length:  # vocabulary padding: rows no token id reaches
        target.narrow(shard.dim, shard.length, held - shard.length).zero_()
