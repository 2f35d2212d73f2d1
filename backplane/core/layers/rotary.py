"""Rotary position embedding (RoPE) on flat token batches.

The cos/sin table for every position up to the model's limit is computed once
(float32) and indexed by each token's position, so ragged batches of many
requests need no per-request work. Rotation uses the "rotate half" layout
(the first and second halves of the rotated part of a head are the pair), as
transformers' Llama does and as Llama-family checkpoints expect. With a
``partial_rotary_factor`` below 1 (Phi-3 family) only the first
``int(head_dim * partial_rotary_factor)`` channels of a head are rotated and
the rest pass through.

Supported ``rope_type`` values (formulas as transformers' ``modeling_rope_utils``
computes them, float32 throughout so greedy output matches token for token):

- ``default``, ``linear`` (position interpolation) and ``llama3``.
- ``yarn``: NTK-by-parts interpolation between ``beta_fast`` and ``beta_slow``
  rotations over ``original_max_position_embeddings``; cos and sin are both
  multiplied by the attention factor (``attention_factor`` if given, else
  ``0.1 * ln(factor) + 1``, or the ``mscale`` / ``mscale_all_dim`` ratio when
  both are set; ``factor`` defaults to ``max_position_embeddings / original``).
- ``dynamic`` (dynamic NTK): transformers recomputes the base from the
  current sequence length ``L``, ``base * (factor * L / max_pos - factor + 1)
  ** (d / (d - 2))`` with ``L = max(L, max_position_embeddings)``, i.e. the
  frequencies only change once a sequence is longer than
  ``max_position_embeddings``, and then depend on each forward's length and
  on which keys were cached before (transformers keeps the grown frequencies
  for later, shorter calls). Keys in a paged, shared (prefix-cached) KV cache
  cannot be re-rotated per request, so that regime cannot be reproduced
  exactly in a batched engine. With a ``max_model_len`` up to
  ``max_position_embeddings`` Backplane uses the unscaled RoPE transformers
  uses there (exact). Past it, Backplane does what vLLM does: one static base
  for every position, computed for ``L = max_position_embeddings * factor``,
  with a warning that sequences shorter than the limit then differ from
  transformers (`RotaryEmbedding.ensure_positions`). `compute_inv_freq`
  gives the frequencies for any ``seq_len``.
- ``longrope`` (Phi-3's "su"; ``su`` is read as ``longrope`` as transformers
  does): per-frequency ``short_factor`` / ``long_factor`` divisors and the
  attention factor ``sqrt(1 + ln(factor) / ln(original))`` with ``factor =
  max_position_embeddings / original`` unless given. transformers picks the
  long factors for a whole forward when its length exceeds
  ``original_max_position_embeddings`` (Phi-3's ``generate`` recomputes the
  cache at the switch, so a whole sequence uses one set). A batched engine
  cannot switch already cached keys per request, so Backplane picks one set
  per engine from the longest sequence it may run (``max_model_len``, given to
  `RotaryEmbedding.ensure_positions`): ``max_model_len <= original`` uses the
  short factors and matches transformers for every request; a longer
  ``max_model_len`` uses the long factors, which matches transformers for
  every sequence longer than ``original`` (e.g. every prompt past it) but not
  for requests that stay within ``original`` tokens (transformers uses the
  short factors for those); a warning says so when such a model is loaded.
  Serve with ``--max-model-len <original>`` for exact short-context output.

Any other type is refused with the list above.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
# Older names transformers reads as a supported type.
_ROPE_TYPE_ALIASES = {"su": "longrope"}
# Types whose parameters need the pre-scaling context length.
_NEEDS_ORIGINAL = ("llama3", "yarn", "longrope")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a transformers config as one dict with ``rope_theta``.

    transformers 5 stores them in ``rope_parameters``; 4.x in ``rope_theta`` plus
    an optional ``rope_scaling`` dict (``type`` or ``rope_type``). As transformers
    does, a top-level ``original_max_position_embeddings`` (Phi-3) wins for the
    types that use it, else ``max_position_embeddings`` is the default, and a
    top-level ``partial_rotary_factor`` is folded in.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        out = dict(params)
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = out.get("rope_type") or out.get("type") or "default"
    out["rope_type"] = _ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    partial = getattr(hf_config, "partial_rotary_factor", None)
    if partial is not None:
        out.setdefault("partial_rotary_factor", partial)
    if out["rope_type"] in _NEEDS_ORIGINAL:
        original = getattr(hf_config, "original_max_position_embeddings", None)
        if isinstance(original, int):
            out["original_max_position_embeddings"] = original
        limit = getattr(hf_config, "max_position_embeddings", None)
        if isinstance(limit, int):
            out.setdefault("original_max_position_embeddings", limit)
    return out


def _require(params: dict[str, Any], rope_type: str, *keys: str) -> None:
    missing = [key for key in keys if params.get(key) is None]
    if missing:
        raise ValueError(f"{rope_type} rope scaling needs {', '.join(missing)} in rope_parameters")


def rotary_dim(head_dim: int, params: dict[str, Any]) -> int:
    """Channels of a head that are rotated: ``int(head_dim * partial_rotary_factor)``."""
    dim = int(head_dim * float(params.get("partial_rotary_factor") or 1.0))
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(
            f"partial_rotary_factor {params.get('partial_rotary_factor')} gives {dim} rotary "
            f"channels of head_dim {head_dim}; it must be an even number in [2, {head_dim}]"
        )
    return dim


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim


def _scaling_factor(params: dict[str, Any], max_position_embeddings: int | None) -> float:
    """``factor``, or ``max_position_embeddings / original`` when absent (yarn, longrope)."""
    factor = params.get("factor")
    if factor is not None:
        return float(factor)
    if max_position_embeddings is None:
        raise ValueError(f"{params['rope_type']} rope scaling needs 'factor' in rope_parameters "
                         "(or max_position_embeddings to derive it)")
    return max_position_embeddings / params["original_max_position_embeddings"]


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by ``factor``, short
    ones kept, and a smooth blend between the two bands."""
    _require(params, "llama3", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings")
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


def _yarn_inv_freq(dim: int, base: float, factor: float, params: dict[str, Any]) -> torch.Tensor:
    """YaRN: extrapolate fast dimensions, interpolate slow ones, linear ramp between."""
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    original = params["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def attention_factor(params: dict[str, Any], max_position_embeddings: int | None = None) -> float:
    """The factor cos and sin are multiplied by (1.0 except for yarn and longrope)."""
    rope_type = params["rope_type"]
    if rope_type not in ("yarn", "longrope"):
        return 1.0
    given = params.get("attention_factor")
    if given is not None:
        return float(given)
    factor = _scaling_factor(params, max_position_embeddings)
    if rope_type == "longrope":
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(params["original_max_position_embeddings"]))

    def mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def check_rope_type(params: dict[str, Any]) -> str:
    """``params["rope_type"]``; ValueError listing the supported ones when it is not."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    return rope_type


def compute_inv_freq(
    head_dim: int,
    params: dict[str, Any],
    seq_len: int | None = None,
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32) for ``params`` (see `rope_parameters`).

    ``seq_len`` is the length of the whole sequence, read only by the types that
    depend on it: ``dynamic`` (unscaled up to ``max_position_embeddings``) and
    ``longrope`` (long factors when it exceeds ``original_max_position_embeddings``,
    short factors when it does not or is None). ``max_position_embeddings`` is
    needed by ``dynamic``, and by yarn / longrope without a ``factor``.
    """
    rope_type = check_rope_type(params)
    dim = rotary_dim(head_dim, params)
    base = float(params["rope_theta"])
    if rope_type in ("linear", "yarn", "dynamic"):
        if rope_type != "yarn" or max_position_embeddings is None:
            _require(params, rope_type, "factor")
    if rope_type in ("yarn", "longrope"):
        _require(params, rope_type, "original_max_position_embeddings")
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, _scaling_factor(params, max_position_embeddings), params)
    if rope_type == "longrope":
        _require(params, rope_type, "short_factor", "long_factor")
        long = seq_len is not None and seq_len > params["original_max_position_embeddings"]
        factors = params["long_factor" if long else "short_factor"]
        if len(factors) != dim // 2:
            raise ValueError(f"longrope {'long' if long else 'short'}_factor has {len(factors)} "
                             f"values; {dim // 2} expected (rotary dim {dim} / 2)")
        ext = torch.tensor(factors, dtype=torch.float32)
        return 1.0 / (ext * base ** _exponents(dim))
    if rope_type == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("dynamic rope scaling needs max_position_embeddings")
        length = max(seq_len or max_position_embeddings, max_position_embeddings)
        factor = float(params["factor"])
        base = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2)
        )
    inv_freq = 1.0 / (base ** _exponents(dim))
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

    ``max_positions`` at construction is the model's ``max_position_embeddings``
    (what ``dynamic``, and yarn / longrope without a ``factor``, read).
    `ensure_positions` tells the module the longest sequence the engine runs,
    which picks longrope's factor set (see the module docstring).
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = dict(params)
        self.rope_type = check_rope_type(self.params)
        self.rotary_dim = rotary_dim(head_dim, self.params)
        self.max_position_embeddings = max_positions
        # Longest sequence the engine runs; the model's limit until told otherwise.
        self.max_seq_len = max_positions
        self.attention_scaling = attention_factor(self.params, max_positions)
        self._warned_long = False
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        self.build_cache()

    @property
    def uses_long_factors(self) -> bool:
        """longrope only: the long factor set is in the tables."""
        return (self.rope_type == "longrope"
                and self.max_seq_len > self.params["original_max_position_embeddings"])

    def ensure_positions(self, max_positions: int) -> None:
        """Prepare for sequences of up to ``max_positions`` tokens (the engine's max_model_len).

        Grows the tables past the config's limit when needed (RoPE then
        extrapolates), so lookups never go out of range, and picks longrope's
        short or long factors, or ``dynamic``'s static scaled base past
        ``max_position_embeddings`` (see the module docstring).
        """
        if (self.rope_type == "dynamic" and max_positions > self.max_position_embeddings
                and not self._warned_long):
            self._warned_long = True
            logger.warning(
                "dynamic rope: max_model_len %d is past max_position_embeddings (%d), so every "
                "position uses the base scaled for %d tokens, as vLLM does; transformers "
                "rescales per sequence length and uses the unscaled base for sequences within "
                "%d tokens, so such requests can differ from it (a max_model_len <= %d matches "
                "exactly)", max_positions, self.max_position_embeddings,
                self._dynamic_static_length(), self.max_position_embeddings,
                self.max_position_embeddings)
        was_long, was_scaled = self.uses_long_factors, self._dynamic_scaled
        self.max_seq_len = max_positions
        if self.uses_long_factors and not self._warned_long:
            self._warned_long = True
            logger.warning(
                "longrope: sequences may be longer than original_max_position_embeddings (%d), so "
                "every request uses the long factors; transformers uses the short ones for a "
                "sequence that stays within %d tokens, so such requests can differ from it "
                "(a max_model_len <= %d uses the short factors and matches exactly)",
                *(self.params["original_max_position_embeddings"],) * 3,
            )
        if (max_positions > self.max_positions or was_long != self.uses_long_factors
                or was_scaled != self._dynamic_scaled):
            self.max_positions = max(self.max_positions, max_positions)
            self.build_cache()

    @property
    def _dynamic_scaled(self) -> bool:
        """dynamic only: sequences may outgrow max_position_embeddings (static scaled base)."""
        return self.rope_type == "dynamic" and self.max_seq_len > self.max_position_embeddings

    def _dynamic_static_length(self) -> int:
        # vLLM's choice: the base is scaled for the longest context the factor promises.
        return int(self.max_position_embeddings * float(self.params["factor"]))

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
        seq_len = None
        if self.rope_type == "longrope":
            seq_len = self.max_seq_len
        elif self._dynamic_scaled:
            seq_len = self._dynamic_static_length()
        inv_freq = compute_inv_freq(
            self.head_dim, self.params, seq_len=seq_len,
            max_position_embeddings=self.max_position_embeddings,
        )
        positions = torch.arange(self.max_positions, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_pos, rotary_dim/2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        self.cos_cache = cos.to(device)
        self.sin_cache = sin.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(cos, sin)``, each ``[num_tokens, 1, rotary_dim // 2]`` in ``dtype``."""
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_positions={self.max_positions}, {self.params}")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[num_tokens, heads, head_dim]`` by per-token angles (rotate-half pairs).

    With partial rotary (``cos`` narrower than half a head) only the first
    ``2 * cos.shape[-1]`` channels are rotated; the rest pass through.
    """
    half = cos.shape[-1]
    if 2 * half < x.shape[-1]:
        rotated = apply_rotary(x[..., : 2 * half], cos, sin)
        return torch.cat((rotated, x[..., 2 * half :]), dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class ApplyRotary(nn.Module):
    """`apply_rotary` as a layer, so that a platform can swap in its own kernel
    (see Platform.prepare_model): ``(x [tokens, heads, head_dim], cos, sin)`` ->
    a new rotated tensor; ``x`` is left as it is."""

    layer_kind = "rotary"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)
