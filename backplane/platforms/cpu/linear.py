"""Linear layers with weights prepacked for oneDNN, the CPU's fastest bf16 GEMM path.

torch's plain ``F.linear`` on bf16 CPU tensors re-reads the weight in its
row-major layout on every call; oneDNN's blocked layout, packed once at load,
is what its AVX512-BF16 kernels stream best. Measured on this project's
2-core x86 machine with a Qwen2-0.5B-shaped model (one thread): decode steps
took 134 -> 97 ms at batch 1 and 204 -> 159 ms at batch 16; at batch 64 the
two are even. Only bf16 weights are packed: float32 keeps torch's kernels so
that float32 output stays bit-comparable with transformers.

The output projection (a module exposing ``logits_weight``, as the core's
LMHead does) is packed too: at batch 1 it was a third of the step (30 of 95
ms). When it is tied to the input embedding the packed copy is extra memory
(vocab x hidden x 2 bytes, 272 MiB for Qwen2-0.5B), since the embedding lookup
still needs the plain rows.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from backplane.platforms.cpu.native import KernelBuildError, load_kernel

logger = logging.getLogger(__name__)

# Batch size the packed layout is tuned for; any batch size works with it.
_PACK_BATCH_HINT = 64


def prepacking_supported() -> bool:
    """oneDNN is built in and this CPU runs its bf16 kernels."""
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """Inference-only stand-in for an ``nn.Linear`` whose weight is oneDNN-packed."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACK_BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


class PackedLogitsProjection(nn.Module):
    """Stand-in for an output projection: packed ``[vocab, hidden]`` GEMM, float32 logits."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        weight = head.logits_weight.detach()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            hidden, self.packed_weight, None, "none", [], "").float()


def bf16_gemm_supported() -> bool:
    """This CPU has AVX512-BF16 and the C GEMM kernel builds (BACKPLANE_CPU_BF16_GEMM=0:
    off, oneDNN packing instead)."""
    if os.environ.get("BACKPLANE_CPU_BF16_GEMM", "1") == "0" or not _has_avx512_bf16():
        return False
    try:
        _gemm_lib()
    except KernelBuildError as exc:
        logger.warning("cpu platform: bf16 GEMM kernel unavailable (%s); using oneDNN", exc)
        return False
    return True


@functools.lru_cache(maxsize=1)
def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags.split()


@functools.lru_cache(maxsize=1)
def _gemm_lib() -> ctypes.CDLL:
    lib = load_kernel("gemm_bf16.c", ())
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.pack_bf16.argtypes = [p, i64, i64, p]
    lib.pack_bf16.restype = None
    lib.gemm_bf16.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, ctypes.c_int]
    lib.gemm_bf16.restype = None
    return lib


class BlockedBf16Linear(nn.Module):
    """A bf16 linear (or output projection) on the platform's own GEMM kernel
    (``kernels/gemm_bf16.c``): the weight is packed once into blocks of 16 rows
    whose column pairs interleave, the layout AVX512-BF16's dot-product streams
    without horizontal sums. It replaces the oneDNN packing (one packed copy
    either way): 1.4x faster weight streaming at batch 1, on par at batch 512.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 float_output: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % 2:
            raise ValueError(f"in_features ({self.in_features}) must be even")
        self.float_output = float_output
        weight = weight.detach().contiguous()
        blocks = -(-self.out_features // 16)
        packed = torch.empty(blocks * 16 * self.in_features, dtype=torch.bfloat16)
        _gemm_lib().pack_bf16(weight.data_ptr(), self.out_features, self.in_features,
                              packed.data_ptr())
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features,
                          dtype=torch.float32 if self.float_output else torch.bfloat16)
        if rows.shape[0]:
            _gemm_lib().gemm_bf16(
                rows.data_ptr(), self.in_features, rows.shape[0], self.packed_weight.data_ptr(),
                self.out_features, self.in_features,
                None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
                self.out_features, int(self.float_output))
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packed=bf16-blocks{', float output' if self.float_output else ''}")


def replace_children(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Swap every submodule for ``replacement(child)`` where that is not None; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(module, name, new)
                replaced += 1
    return replaced


def _packed(child: nn.Module, own_gemm: bool) -> nn.Module | None:
    if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
        if own_gemm and child.in_features % 2 == 0:
            return BlockedBf16Linear(child.weight, child.bias, float_output=False)
        return PackedLinear(child)
    weight = getattr(child, "logits_weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16:
        if own_gemm and weight.shape[1] % 2 == 0:
            return BlockedBf16Linear(weight, None, float_output=True)
        return PackedLogitsProjection(child)
    return None


def prepack_linear_weights(model: nn.Module, own_gemm: bool | None = None) -> int:
    """Replace every bf16 ``nn.Linear`` and output projection in ``model``; returns how many.

    ``own_gemm`` (default: when the CPU has AVX512-BF16 and the kernel builds) packs
    for the platform's GEMM kernel, otherwise for oneDNN."""
    if own_gemm is None:
        own_gemm = bf16_gemm_supported()
    return replace_children(model, lambda child: _packed(child, own_gemm))
