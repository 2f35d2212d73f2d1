"""bf16 RMSNorm, SiLU-and-mul and rotary embedding as single compiled loops
(kernels/cpu_ops.c).

In bf16, torch runs RMSNorm as five ops with two dtype conversions and
SiLU-and-mul as two, each reading and writing the whole activation and
paying dispatch. Measured at batch 64 on a Qwen2-0.5B shape (2 threads):
~300 us per RMSNorm call and ~290 us per SiLU-and-mul, 49 and 24 calls a
decode step. The platform swaps the core's layers for these at load time
(``CpuPlatform.prepare_model``), recognising them by their ``layer_kind``
(the SDK's duck-typed layer contract); any input the kernels do not cover
(another dtype, a non-row-strided view) goes to the original layer.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from backplane.platforms.cpu.linear import replace_children
from backplane.platforms.cpu.native import load_kernel

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


@functools.lru_cache(maxsize=1)
def cpu_ops() -> ctypes.CDLL:
    lib = load_kernel("cpu_ops.c", ())
    lib.rms_norm_bf16.argtypes = [_P, _I64, _P, _P, _I64, _I64, _I64, _F32]
    lib.rms_norm_bf16.restype = None
    lib.add_rms_norm_bf16.argtypes = [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _F32]
    lib.add_rms_norm_bf16.restype = None
    lib.silu_and_mul_bf16.argtypes = [_P, _I64, _P, _I64, _I64, _I64]
    lib.silu_and_mul_bf16.restype = None
    lib.rotary_bf16.argtypes = [_P, _I64, _P, _P, _P, _I64, _I64, _I64]
    lib.rotary_bf16.restype = None
    # decoder_layer.py: (layer struct, step struct, x, out, workspace) by address
    lib.decoder_layer_decode.argtypes = [_P, _P, _P, _P, _P]
    lib.decoder_layer_decode.restype = ctypes.c_int
    lib.decoder_layer_workspace.argtypes = [_P, _I64]
    lib.decoder_layer_workspace.restype = _I64
    lib.decoder_stack_decode.argtypes = [_P, _I64, _P, _P, _P, _P]
    lib.decoder_stack_decode.restype = ctypes.c_int
    lib.decoder_stack_workspace.argtypes = [_P, _I64, _I64]
    lib.decoder_stack_workspace.restype = _I64
    return lib


def _row_stride(x: torch.Tensor) -> int | None:
    """Stride between rows of the last dimension, or None if rows are not evenly spaced."""
    if x.stride(-1) != 1:
        return None
    if x.is_contiguous():
        return x.shape[-1]
    return x.stride(0) if x.dim() == 2 else None


class FusedRMSNorm(nn.Module):
    """The core RMSNorm (same weight), one pass per row for bf16 input; with
    ``residual``, the add before it in the same pass (a bf16 add is ~20 us at batch 64
    on the qwen2-0.5b shape, and after a GEMM has flushed the caches every torch op
    costs tens of microseconds even at batch 1)."""

    layer_kind = "rms_norm"
    accepts_residual = True

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps, self.hidden_size = float(norm.eps), int(norm.hidden_size)
        self._original_forward = norm.forward  # a bound method: not registered as a child

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            return self._add_and_norm(x, residual)
        stride = _row_stride(x)
        if x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16 or stride is None:
            return self._original_forward(x)
        # unpacked sizes: torch parses a Size argument ~3 us slower, per call
        out = torch.empty(*x.shape, dtype=x.dtype)
        rows = x.numel() // self.hidden_size
        cpu_ops().rms_norm_bf16(x.data_ptr(), stride, self.weight.data_ptr(), out.data_ptr(),
                                self.hidden_size, rows, self.hidden_size, self.eps)
        return out

    def _add_and_norm(self, x: torch.Tensor, residual: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        x_stride, res_stride = _row_stride(x), _row_stride(residual)
        if (x.dtype != torch.bfloat16 or residual.dtype != torch.bfloat16
                or self.weight.dtype != torch.bfloat16 or x.shape != residual.shape
                or x_stride is None or res_stride is None):
            summed = x + residual
            return self(summed), summed
        out = torch.empty(*x.shape, dtype=x.dtype)
        summed = torch.empty(*x.shape, dtype=x.dtype)
        cpu_ops().add_rms_norm_bf16(x.data_ptr(), x_stride, residual.data_ptr(), res_stride,
                                    self.weight.data_ptr(), out.data_ptr(), summed.data_ptr(),
                                    x.numel() // self.hidden_size, self.hidden_size, self.eps)
        return out, summed

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, fused=cpu_ops"


class FusedSiluAndMul(nn.Module):
    """``silu(gate) * up`` in one pass for bf16 input."""

    layer_kind = "silu_and_mul"

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self._original_forward = act.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = _row_stride(x)
        if x.dtype != torch.bfloat16 or stride is None:
            return self._original_forward(x)
        d = x.shape[-1] // 2
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
        cpu_ops().silu_and_mul_bf16(x.data_ptr(), stride, out.data_ptr(), d, x.numel() // x.shape[-1], d)
        return out


def _rotary_kernel_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """bf16 ``x [tokens, heads, head_dim]`` with each token's heads contiguous, rotated
    whole (no partial rotary) by contiguous bf16 ``cos``/``sin`` of ``head_dim / 2``."""
    if x.dtype != torch.bfloat16 or x.dim() != 3 or x.stride(2) != 1:
        return False
    n, _, head_dim = x.shape
    return x.stride(1) == head_dim and all(
        t.dtype == torch.bfloat16 and t.is_contiguous() and 2 * t.shape[-1] == head_dim
        and t.numel() * 2 == n * head_dim for t in (cos, sin))


class FusedRotary(nn.Module):
    """The rotate-half rotary embedding in one pass for bf16 queries / keys whose heads
    are contiguous inside each token (e.g. a view of the fused q/k/v projection):
    torch runs it as seven ops over the whole tensor (50-66 us at 64 tokens, 0.7-4.8 ms
    at 2048 on the qwen2-0.5b shape), rounding to bf16 after each, as this does."""

    layer_kind = "rotary"

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self._original_forward = rotary.forward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not _rotary_kernel_takes(x, cos, sin):
            return self._original_forward(x, cos, sin)  # partial rotary, other layouts
        n, heads, head_dim = x.shape
        out = torch.empty(n, heads, head_dim, dtype=torch.bfloat16)
        cpu_ops().rotary_bf16(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(),
                              out.data_ptr(), n, heads, head_dim // 2)
        return out


_FUSED = {"rms_norm": FusedRMSNorm, "silu_and_mul": FusedSiluAndMul, "rotary": FusedRotary}


def _fused(child: nn.Module) -> nn.Module | None:
    fused = _FUSED.get(getattr(type(child), "layer_kind", None))
    return None if fused is None or isinstance(child, fused) else fused(child)


def fuse_layers(model: nn.Module) -> int:
    """Swap every core layer whose ``layer_kind`` has a fused version; returns how many."""
    return replace_children(model, _fused)
