"""Triton 4-bit (GPTQ / AWQ) matmul: the cuda and rocm platforms' ``make_quantized_linear``.

The SDK's `Int4Weights` is repacked once, on the device, into GPTQ's own layout
(``qweight [K/8, N]`` int32, 8 consecutive input columns per word, the
act-order permutation applied to the columns) with ``scales`` and ``zeros``
``[G, N]`` float32. Each program computes a ``BLOCK_M x BLOCK_N`` output tile:
per ``BLOCK_K`` slice of the input (``BLOCK_K`` divides ``group_size``, so one
scale/zero row per slice) it loads the packed words, shifts the nibbles out,
dequantizes ``(q - z) * s`` in registers and feeds ``tl.dot`` in the
activations' dtype, accumulating in float32. The weight is read once per
``BLOCK_M`` rows; nothing is dequantized to memory.

Importing this module imports triton; it runs on CPU tensors only under
``TRITON_INTERPRET=1`` (used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from backplane.plugins_sdk.quantization import Int4Weights


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] (q[k, n] - z[g(k), n]) s[g(k), n] (+ bias[n])."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None], other=0.0)
        words = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk
                        + offs_n[None, :] * stride_qn, mask=mask_n[None, :], other=0)
        q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)
        z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)
        w = (q.to(tl.float32) - z[None, :]) * s[None, :]
        if IEEE_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_k(group_size: int, in_features: int) -> int:
    """The largest power of two <= 64 dividing group_size (and K), at least 16 (tl.dot)."""
    for block in (64, 32, 16):
        if group_size % block == 0 and in_features % block == 0:
            return block
    raise ValueError(f"group_size ({group_size}) must be a multiple of 16 for the Triton "
                     "int4 kernel")


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``W`` given as GPTQ-layout ``qweight [K/8, N]`` (no
    permutation: apply it to ``x`` first), ``scales``/``zeros`` ``[K/group, N]``;
    output in ``x``'s dtype."""
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out,
        m, n, k, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE_DOT=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(group_size, k),
    )
    return out


def pack_gptq_columns(q: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (0..15) -> ``[K/8, N]`` int32, input column ``8i + j`` in nibble ``j``."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"in_features ({k}) must be a multiple of 8")
    v = q.T.to(torch.int64).reshape(k // 8, 8, n)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64).view(1, 8, 1)
    word = (v << shifts).sum(1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


class TritonInt4Linear(nn.Module):
    """``x @ W.T + bias`` with 4-bit weights on the Triton kernel above."""

    def __init__(self, weights: Int4Weights) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.qweight.shape
        self.group_size = weights.group_size
        _block_k(self.group_size, self.in_features)  # refuse unsupported shapes early
        self.register_buffer("qweight", pack_gptq_columns(weights.qweight), persistent=False)
        self.register_buffer("scales", weights.scales.T.float().contiguous(), persistent=False)
        self.register_buffer("zeros", weights.zeros.T.float().contiguous(), persistent=False)
        self.register_buffer("perm", None if weights.perm is None else weights.perm.long(),
                             persistent=False)
        self.register_buffer("bias", None if weights.bias is None else weights.bias.float(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        out = int4_matmul(rows.contiguous(), self.qweight, self.scales, self.zeros,
                          self.group_size, self.bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 (triton), group_size={self.group_size}")
