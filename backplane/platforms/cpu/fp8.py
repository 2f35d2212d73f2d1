"""``--quantization fp8`` on the CPU platform: e4m3 weights with one scale per output row.

Each bf16/float linear weight is quantized at load (dynamic, per channel: scale =
max |w| / 448, the e4m3 maximum, as vLLM's online fp8 does) and packed in the bf16
GEMM's 16-row pair layout, one byte per weight. The CPU has no fp8 dot product:
``kernels/gemm_fp8.c`` widens each 32-byte group to bf16 in registers (exact) for
AVX512-BF16's dot product and applies the row scale at the end; on AVX2 CPUs
``kernels/gemm_avx2.c`` widens to float32 (F16C) for its FMA tiles. Activations stay
bf16 (W8A16). The output head stays bf16 (vLLM's fp8 leaves it unquantized too).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from backplane.platforms.cpu.huge_pages import weights_on_huge_pages
from backplane.platforms.cpu.native import KernelBuildError, check_status, load_gemm_kernel

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.lru_cache(maxsize=None)
def _fp8_lib(isa: str = "avx512_bf16") -> ctypes.CDLL:
    """The fp8 GEMM for ``isa`` ("amx": on the tiles where K allows, else AVX512-BF16;
    "avx2": gemm_avx2.c's, widening to float32 with F16C)."""
    lib = load_gemm_kernel("gemm_avx2.c" if isa == "avx2" else "gemm_fp8.c", isa)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemm_fp8.argtypes = [p, i64, i64, p, p, i64, i64, p, p, i64, ctypes.c_int]
    lib.gemm_fp8.restype = ctypes.c_int
    return lib


def fp8_kernel_supported() -> bool:
    """An fp8 kernel (AVX512-BF16 or AVX2 + FMA, like the bf16 GEMM) builds here."""
    from backplane.platforms.cpu.linear import bf16_gemm_supported, gemm_isa

    if not bf16_gemm_supported():
        return False
    try:
        _fp8_lib(gemm_isa())
    except KernelBuildError:
        return False
    return True


def quantize_fp8_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w8 [N, K] float8_e4m3fn, scales [N] float32)`` with ``w ~ w8 * scales[:, None]``."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w8 = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, scales


def pack_fp8(w8: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` e4m3 -> ``[ceil(N/16), K/2, 16, 2]`` bytes (rows past N zero)."""
    n, k = w8.shape
    blocks = -(-n // 16)
    raw = torch.zeros(blocks * 16, k, dtype=torch.uint8)
    raw[:n] = w8.view(torch.uint8)
    return weights_on_huge_pages(raw.view(blocks, 16, k // 2, 2).permute(0, 2, 1, 3))


class Fp8Linear(nn.Module):
    """A linear layer with fp8 (e4m3) weights and per-row float32 scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 scales: torch.Tensor | None = None, isa: str | None = None) -> None:
        """``weight``: float (quantized here, per row) or, with ``scales [N]``, already
        float8_e4m3fn (a checkpoint's). ``isa``: "amx", "avx512_bf16" or "avx2" (default:
        this CPU's, `linear.gemm_isa`)."""
        from backplane.platforms.cpu.linear import gemm_isa

        super().__init__()
        self.isa = isa or gemm_isa()
        self.out_features, self.in_features = weight.shape
        if self.in_features % 2:
            raise ValueError(f"in_features ({self.in_features}) must be even")
        if scales is None:
            w8, scales = quantize_fp8_per_row(weight)
        else:
            if weight.dtype != torch.float8_e4m3fn:
                raise ValueError(f"pre-quantized weight must be float8_e4m3fn, not {weight.dtype}")
            w8, scales = weight.detach().cpu(), scales.detach().float().cpu().contiguous()
        self.register_buffer("packed_weight", pack_fp8(w8), persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        # the kernel's widened values are the e4m3 values times 2^-8
        self.register_buffer("kernel_scales", scales * 256.0, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_out = x.dtype == torch.float32
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.empty(rows.shape[0], self.out_features,
                          dtype=torch.float32 if float_out else torch.bfloat16)
        if rows.shape[0]:
            check_status(_fp8_lib(self.isa).gemm_fp8(
                rows.data_ptr(), self.in_features, rows.shape[0], self.packed_weight.data_ptr(),
                self.kernel_scales.data_ptr(), self.out_features, self.in_features,
                None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
                self.out_features, int(float_out)), "fp8 GEMM")
        out = out.reshape(*lead, self.out_features)
        return out if out.dtype == x.dtype or x.dtype == torch.bfloat16 else out.to(x.dtype)

    def native_gemm(self):
        """This layer as C code calls it (`linear.NativeGemm`, decoder_layer.py)."""
        from backplane.platforms.cpu.linear import NativeGemm, function_address, optional_data_ptr

        return NativeGemm("scaled", function_address(_fp8_lib(self.isa).gemm_fp8),
                          self.packed_weight.data_ptr(), optional_data_ptr(self.bias),
                          self.out_features, self.in_features,
                          scales=self.kernel_scales.data_ptr())

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the kernel computes with (e4m3 value x row scale)."""
        blocks = self.packed_weight.shape[0]
        raw = self.packed_weight.permute(0, 2, 1, 3).reshape(blocks * 16, self.in_features)
        w8 = raw[: self.out_features].contiguous().view(torch.float8_e4m3fn)
        return w8.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fp8 e4m3 weights, per-row scales ({self.isa})")


def quantize_linear_weights_fp8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` (not the output head) with `Fp8Linear`; returns how many."""
    from backplane.platforms.cpu.linear import replace_children

    def swap(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear) and child.in_features % 2 == 0:
            return Fp8Linear(child.weight, child.bias)
        return None

    return replace_children(model, swap)
