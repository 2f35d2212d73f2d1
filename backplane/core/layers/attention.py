"""The Attention layer every model calls: paged KV write + attention via the platform backend.

Model code hands over projected q/k/v; which kernel runs, and how the KV cache
is laid out, is the platform backend's business (see plugins_sdk.attention).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from backplane.plugins_sdk import AttentionBackend


@dataclass
class AttentionContext:
    """What every Attention layer needs for one forward pass.

    Attributes:
        backend: the platform attention backend instance (shared by all layers).
        metadata: ``backend.build_metadata(...)`` for this step.
        kv_caches: one cache tensor per attention layer, indexed by layer_idx.
        layer_backends, layer_metadata: set when layers differ in their
            AttentionSpec (e.g. Gemma's sliding-window and global layers): per
            layer_idx, the backend instance of that layer's spec and its metadata
            for this step (one instance and one metadata per distinct spec). None:
            every layer uses ``backend`` and ``metadata``.
        kv_scales: with an fp8 KV cache, each layer's float32 ``[k_scale,
            v_scale]`` on the device (passed to the backend as ``kv_scales``);
            None otherwise, and the backend is called without it.
        observe_kv_scales: set for the step that calibrates the scales
            (``--calculate-kv-scales``): called as ``(layer_idx, key, value)``
            before the layer's keys and values are written.
    """

    backend: AttentionBackend
    metadata: Any
    kv_caches: list[torch.Tensor]
    layer_backends: list[AttentionBackend] | None = None
    layer_metadata: list[Any] | None = None
    kv_scales: list[torch.Tensor] | None = None
    observe_kv_scales: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None


# ---------------------------------------------------------------- piecewise graphs
# For piecewise graphs (optimization level O3, model_runner/piecewise_graphs.py) the
# model forward is traced into one operator graph in which each attention call is a
# single opaque op; the graph is cut at those ops, the pieces between them are
# recorded as graphs, and the attention ops run eagerly with the step's metadata.

# Attention layers by key: the opaque op names its layer with an int.
_LAYERS: weakref.WeakValueDictionary[int, Attention] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


class _PiecewiseState(threading.local):
    """Per thread: whether a forward is being traced into pieces, and the step the
    attention ops of a replayed forward serve (None during tracing and capture)."""

    tracing: bool = False
    ctx: AttentionContext | None = None
    num_tokens: int = 0


PIECEWISE = _PiecewiseState()


@torch.library.custom_op("backplane::piecewise_attention", mutates_args=())
def piecewise_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        layer_key: int) -> torch.Tensor:
    """Attention of layer ``layer_key`` for the current step's first ``num_tokens`` rows
    (the rest are padding up to the captured size: zero output, no KV write).

    Declared without mutated arguments although it writes the KV cache: that cache is
    not an argument, and the op only ever runs eagerly between recorded pieces."""
    out = query.new_zeros(query.shape[0], query[0].numel())  # [n, heads * head_size]
    if PIECEWISE.ctx is None:  # tracing or capturing: only the shapes matter
        return out
    n = PIECEWISE.num_tokens
    out[:n] = _LAYERS[layer_key].attend(query[:n], key[:n], value[:n], PIECEWISE.ctx)
    return out


@piecewise_attention.register_fake
def _(query, key, value, layer_key):
    return query.new_empty(query.shape[0], query[0].numel())


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, layer_idx: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.layer_idx = layer_idx
        self.key = next(_KEYS)
        _LAYERS[self.key] = self

    # Under torch.compile (optimization level O1+) the graph is split here: the
    # backend's paged kernels, with their per-step Python planning, run eagerly
    # between the compiled pieces (the "piecewise" scheme vLLM uses too).
    @torch.compiler.disable
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """q: [n, heads*head_size], k/v: [n, kv_heads*head_size] -> [n, heads*head_size]."""
        if PIECEWISE.tracing:
            return torch.ops.backplane.piecewise_attention(q, k, v, self.key)
        return self.attend(q, k, v, ctx)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Write k/v into the paged cache and attend (what `forward` runs eagerly)."""
        n = q.shape[0]
        backend, metadata = ctx.backend, ctx.metadata
        if ctx.layer_backends is not None:
            backend = ctx.layer_backends[self.layer_idx]
            metadata = ctx.layer_metadata[self.layer_idx]
        args = (
            q.view(n, self.num_heads, self.head_size),
            k.view(n, self.num_kv_heads, self.head_size),
            v.view(n, self.num_kv_heads, self.head_size),
            ctx.kv_caches[self.layer_idx],
            metadata,
            self.scale,
        )
        if ctx.kv_scales is None:
            # Unquantized cache: the 1.0 signature, so every backend is called the same way.
            out = backend.forward(*args)
        else:
            if ctx.observe_kv_scales is not None:
                ctx.observe_kv_scales(self.layer_idx, args[1], args[2])
            out = backend.forward(*args, kv_scales=ctx.kv_scales[self.layer_idx])
        return out.reshape(n, self.num_heads * self.head_size)
