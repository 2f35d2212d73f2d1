"""Quantized linear layers as platforms see them (SDK 1.1+).

Two kinds: `Int4Weights` (GPTQ / AWQ 4-bit, below) and `Fp8Weights` (fp8 e4m3
weights of compressed-tensors checkpoints, method ``"compressed-tensors"``).

The core loads a GPTQ or AWQ checkpoint's packed tensors itself (the published
layouts are parsed in ``backplane.core.quantization``), then, when the platform
prepares the model, hands each quantized layer to `Platform.make_quantized_linear`
as one `Int4Weights`: a platform-neutral, unpacked form that any kernel can
repack into its own layout. The platform returns an ``nn.Module`` computing
``x @ W.T + bias`` (or None: the core then runs `linear_int4_reference`, which
dequantizes the whole matrix on every call, correct but slow).

``W[n, k] = (qweight[n, j] - zeros[n, j // group_size]) * scales[n, j // group_size]``
where ``j`` is the position of input column ``k`` in the kernel's column order:
``k = perm[j]`` with act-order (GPTQ ``desc_act``), ``k = j`` without. A kernel
with a permutation gathers its activations first: ``x[..., perm]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int4Weights:
    """One quantized linear layer (or one run of a fused layer's parts), unpacked.

    Attributes:
        qweight: ``[N, K]`` uint8, values 0..15, columns in kernel order (see module doc).
        scales: ``[N, K // group_size]`` float32.
        zeros: ``[N, K // group_size]`` float32, integer values (0..16: GPTQ's classic
            format stores zero - 1 in a nibble, so a stored 15 means 16).
        group_size: input columns per scale/zero group (K for per-channel).
        perm: ``[K]`` int64 or None: kernel column ``j`` is input column ``perm[j]``.
        bias: ``[N]`` float32 or None.
        method: the checkpoint's method, ``"gptq"`` or ``"awq"``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    method: str = "gptq"

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` in input-column order (for references and tests)."""
        groups = torch.arange(self.in_features, device=self.qweight.device) // self.group_size
        w = (self.qweight.float() - self.zeros[:, groups]) * self.scales[:, groups]
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w


def linear_int4_reference(x: torch.Tensor, weights: Int4Weights,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` in float32, cast back to ``x``'s dtype (any torch device)."""
    w = weights.dequantize() if weight is None else weight
    out = x.float() @ w.T
    if weights.bias is not None:
        out = out + weights.bias
    return out.to(x.dtype)


@dataclass
class Fp8Weights:
    """One fp8 linear layer of a compressed-tensors checkpoint (method
    ``"compressed-tensors"``): ``W[n, k] = weight[n, k] * scales[n]``.

    Attributes:
        weight: ``[N, K]`` float8_e4m3fn.
        scales: ``[N]`` float32 (a per-tensor scale is repeated over its rows).
        bias: ``[N]`` float32 or None.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None
    method: str = "compressed-tensors"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]``."""
        return self.weight.float() * self.scales[:, None]


def linear_fp8_reference(x: torch.Tensor, weights: Fp8Weights) -> torch.Tensor:
    """``x @ W.T + bias`` in float32, cast back to ``x``'s dtype (any torch device)."""
    out = x.float() @ weights.dequantize().T
    if weights.bias is not None:
        out = out + weights.bias
    return out.to(x.dtype)
