"""GPTQ and AWQ 4-bit packed layouts, and round-to-nearest quantization.

Unpacked form (``Int4Weights``-like): ``q [N, K]`` (0..15), ``scales [N, G]``,
``zeros [N, G]`` (integer), with ``W = (q - zeros[:, g(k)]) * scales[:, g(k)]``.

GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format: gptq``):

- ``qweight`` int32 ``[K / 8, N]``: nibble ``j`` (bits 4j..4j+3) of ``qweight[i, n]``
  is ``q[n, 8 i + j]``.
- ``qzeros`` int32 ``[G, N / 8]``: nibble ``j`` of ``qzeros[g, c]`` is the zero of
  column ``8 c + j``, stored minus one (the v1 format's well-known offset; a
  stored nibble ``z`` means zero ``z + 1``, so 15 means 16). ``gptq_v2`` stores
  the zero itself.
- ``scales`` float16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input
  column (``k // group_size`` without act-order).

AWQ (AutoAWQ, ``version: gemm``):

- ``qweight`` int32 ``[K, N / 8]``: nibble ``i`` of ``qweight[k, c]`` is
  ``q[8 c + AWQ_ORDER[i], k]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
- ``qzeros`` int32 ``[G, N / 8]``: the same interleaved order, zeros as is.
- ``scales`` float16 ``[G, N]``; groups are contiguous (``k // group_size``).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int32_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Split each int32 into its 8 nibbles (least significant first) along ``dim``:
    ``[..., n, ...] -> [..., 8 n, ...]``, as uint8."""
    p = packed.to(torch.int32).movedim(dim, -1)
    nib = (p.unsqueeze(-1) >> _SHIFTS.to(p.device)) & 0xF
    return nib.reshape(*p.shape[:-1], p.shape[-1] * 8).movedim(-1, dim).to(torch.uint8)


def pack_int32_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `unpack_int32_nibbles`: 8 consecutive values (0..15) along ``dim``
    become one int32, the first in the lowest bits."""
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % 8:
        raise ValueError(f"dimension {dim} ({v.shape[-1]}) must be a multiple of 8 to pack")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8) & 0xF
    word = (v << _SHIFTS.to(v.device).to(torch.int64)).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret as int32
    return word.to(torch.int32).movedim(-1, dim)


# --- GPTQ ---------------------------------------------------------------------------------


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [N, K] uint8, zeros [N, G] float32, scales [N, G] float32)`` from GPTQ tensors
    (``zero_offset`` 1 for the classic format, 0 for gptq_v2)."""
    q = unpack_int32_nibbles(qweight, 0).T.contiguous()
    zeros = unpack_int32_nibbles(qzeros, 1).float() + zero_offset
    return q, zeros.T.contiguous(), scales.float().T.contiguous()


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ ``(qweight, qzeros, scales fp16)`` from ``q [N, K]``, ``zeros [N, G]``,
    ``scales [N, G]`` (the inverse of `gptq_unpack`; a zero of 0 wraps to 15 in v1)."""
    qweight = pack_int32_nibbles(q.T, 0)
    stored = (zeros.round().to(torch.int64) - zero_offset) & 0xF
    qzeros = pack_int32_nibbles(stored.T, 1)
    return qweight, qzeros, scales.T.to(torch.float16).contiguous()


# --- AWQ ----------------------------------------------------------------------------------


def _awq_reorder(unpacked: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Permute the last dim within each run of 8: ``out[..., 8c + j] = x[..., 8c + order[j]]``."""
    *lead, n = unpacked.shape
    x = unpacked.reshape(*lead, n // 8, 8)
    return x[..., list(order)].reshape(*lead, n)


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [N, K] uint8, zeros [N, G] float32, scales [N, G] float32)`` from AWQ tensors."""
    q = _awq_reorder(unpack_int32_nibbles(qweight, 1), AWQ_REVERSE_ORDER)  # [K, N]
    zeros = _awq_reorder(unpack_int32_nibbles(qzeros, 1), AWQ_REVERSE_ORDER)  # [G, N]
    return q.T.contiguous(), zeros.float().T.contiguous(), scales.float().T.contiguous()


def awq_pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ ``(qweight, qzeros, scales fp16)`` from ``q [N, K]``, ``zeros [N, G]``, ``scales``."""
    qweight = pack_int32_nibbles(_awq_reorder(q.T, AWQ_ORDER), 1)
    qzeros = pack_int32_nibbles(_awq_reorder(zeros.round().to(torch.int64).T, AWQ_ORDER), 1)
    return qweight, qzeros, scales.T.to(torch.float16).contiguous()


# --- round-to-nearest quantization -------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, group_size: int, sym: bool,
                 g_idx: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of ``weight [N, K]`` per group of columns.

    Groups are ``k // group_size`` or, with ``g_idx [K]``, ``g_idx[k]`` (act-order
    fixtures). Symmetric: zero 8, scale ``2 max|w| / 15`` (GPTQ's convention);
    asymmetric: scale ``(max - min) / 15``, zero ``round(-min / scale)``. Scales are
    rounded to float16 first (what the checkpoint stores), so ``q`` is the nearest
    level for the stored scale. Returns ``(q [N, K] uint8, zeros [N, G] float32,
    scales [N, G] float32)``.
    """
    w = weight.float()
    n, k = w.shape
    if g_idx is None:
        if k % group_size:
            raise ValueError(f"in_features ({k}) must be a multiple of group_size ({group_size})")
        g_idx = torch.arange(k) // group_size
    g_idx = g_idx.to(torch.int64)
    groups = int(g_idx.max()) + 1
    big = torch.finfo(torch.float32).max
    wmax = torch.full((n, groups), -big).scatter_reduce(1, g_idx.expand(n, k), w, "amax")
    wmin = torch.full((n, groups), big).scatter_reduce(1, g_idx.expand(n, k), w, "amin")
    wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)  # zero must be representable
    if sym:
        amax = torch.maximum(wmax, -wmin)
        scales = (2 * amax / 15)
        zeros = torch.full_like(scales, 8.0)
    else:
        scales = (wmax - wmin) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).half().float()
    if not sym:
        zeros = torch.round(-wmin / scales).clamp(0, 15)
    q = torch.round(w / scales[:, g_idx]) + zeros[:, g_idx]
    return q.clamp(0, 15).to(torch.uint8), zeros, scales


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """``(q - zeros[:, g]) * scales[:, g]`` in float32, ``g = g_idx`` or ``k // group_size``."""
    if g_idx is None:
        g_idx = torch.arange(q.shape[1], device=q.device) // group_size
    g_idx = g_idx.to(torch.int64)
    return (q.float() - zeros[:, g_idx]) * scales[:, g_idx]
