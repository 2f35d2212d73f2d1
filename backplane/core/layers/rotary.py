"""Rotary position embedding (RoPE) on flat token batches.

The cos/sin table for every position up to the model's limit is computed once
(float32) and indexed by each token's position, so ragged batches of many
requests need no per-request work. Rotation uses the "rotate half" layout
(the first and second halves of a head are the pair), as transformers' Llama
does and as Llama-family checkpoints expect.

Supported ``rope_type`` values: ``default``, ``linear`` and ``llama3``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a transformers config as one dict with ``rope_theta``.

    transformers 5 stores them in ``rope_parameters``; 4.x in ``rope_theta`` plus
    an optional ``rope_scaling`` dict (``type`` or ``rope_type``).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        out = dict(params)
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by ``factor``, short
    ones kept, and a smooth blend between the two bands."""
    required = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in required if key not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling needs {', '.join(missing)} in rope_parameters")
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(in_band, blended, scaled)


def compute_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32) for ``params`` (see `rope_parameters`)."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "linear" and "factor" not in params:
        raise ValueError("linear rope scaling needs 'factor' in rope_parameters")
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif rope_type == "linear":
        # Position interpolation: positions / factor, folded into the frequencies.
        inv_freq = inv_freq / float(params["factor"])
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for positions ``[0, max_positions)``.

    Call `cos_sin(positions)` once per forward and hand the result to every
    layer's `apply_rotary`; the table lookup is then not repeated per layer.
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = dict(params)
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        self.build_cache()

    def ensure_positions(self, max_positions: int) -> None:
        """Grow the tables to cover ``max_positions`` (e.g. a max_model_len past the
        config's limit, where RoPE extrapolates), so lookups never go out of range."""
        if max_positions > self.max_positions:
            self.max_positions = max_positions
            self.build_cache()

    def init_buffers(self, device: torch.device | str) -> None:
        """Loader hook: recompute the tables on ``device`` after meta materialisation."""
        self.build_cache(device)

    @torch.no_grad()
    def build_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables (skipped while the module lives on ``meta``)."""
        if device is None:
            device = self.cos_cache.device
            if device.type == "meta":
                return
        inv_freq = compute_inv_freq(self.head_dim, self.params)
        positions = torch.arange(self.max_positions, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_pos, head_dim/2]
        self.cos_cache = freqs.cos().to(device)
        self.sin_cache = freqs.sin().to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(cos, sin)``, each ``[num_tokens, 1, head_dim // 2]`` in ``dtype``."""
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, {self.params}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[num_tokens, heads, head_dim]`` by per-token angles (rotate-half pairs)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
