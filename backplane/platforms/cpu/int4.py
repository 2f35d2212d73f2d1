"""4-bit (GPTQ / AWQ) linear layers on the CPU platform's own kernels
(kernels/gemm_int4.c with AVX512-BF16, kernels/gemm_int4_avx2.c with AVX2 + FMA).

The core hands each quantized layer over as an `Int4Weights` (unpacked values,
scales, zeros, act-order permutation); `Int4Linear` repacks it once into the
kernel's blocked layout (16 output rows x 4 columns per 32 bytes, see the C
file) plus per-block scale/zero tables, and keeps nothing else. At batch 1 the
kernel streams half a byte per weight (a quarter of bf16), dequantising in
registers; scale and zero are applied once per group of columns.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from backplane.platforms.cpu.huge_pages import weights_on_huge_pages
from backplane.platforms.cpu.native import KernelBuildError, check_status, load_gemm_kernel
from backplane.plugins_sdk.quantization import Int4Weights


@functools.lru_cache(maxsize=None)
def _int4_lib(isa: str = "avx512_bf16") -> ctypes.CDLL:
    """The int4 GEMM for ``isa`` ("amx": batches of 16+ rows multiply the dequantised
    blocks on AMX tiles; "avx2": kernels/gemm_int4_avx2.c, int16 products for bf16
    activations)."""
    lib = load_gemm_kernel("gemm_int4_avx2.c" if isa == "avx2" else "gemm_int4.c", isa)
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gemm_int4.argtypes = [p, i64, i64, c_int, p, p, p, p, i64, i64, i64, p, p, i64, c_int]
    lib.gemm_int4.restype = ctypes.c_int
    return lib


def int4_kernel_supported() -> bool:
    """An int4 kernel builds here (AVX512-BF16 or AVX2 + FMA, like the bf16 GEMM)."""
    from backplane.platforms.cpu.linear import gemm_isa

    if gemm_isa() is None:
        return False
    try:
        _int4_lib(gemm_isa())
    except KernelBuildError:
        return False
    return True


def pack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (0..15) -> the kernel's ``[ceil(N/16), K/4, 32]`` uint8 blocks: byte
    ``2r + e`` of quad ``t`` holds ``q[r, 4t + e]`` (low nibble) and ``q[r, 4t + 2 + e]``."""
    n, k = qweight.shape
    blocks = -(-n // 16)
    q = torch.zeros(blocks * 16, k, dtype=torch.uint8)
    q[:n] = qweight
    q = q.view(blocks, 16, k // 4, 4).permute(0, 2, 1, 3)  # [B, K/4, 16, 4]
    low = q[..., 0:2].reshape(blocks, k // 4, 32)
    high = q[..., 2:4].reshape(blocks, k // 4, 32)
    return weights_on_huge_pages(low | (high << 4))


def _block_table(values: torch.Tensor, blocks: int) -> torch.Tensor:
    """``[N, G]`` -> ``[blocks, G, 16]`` float32 (rows past N zero)."""
    n, g = values.shape
    table = torch.zeros(blocks * 16, g, dtype=torch.float32)
    table[:n] = values
    return table.view(blocks, 16, g).permute(0, 2, 1).contiguous()


class Int4Linear(nn.Module):
    """``x @ W.T + bias`` with 4-bit weights (one scale and zero per row and group).

    bf16 input -> bf16 output (bf16 dot products); float32 input -> float32 output
    (weights dequantised exactly in float32); other dtypes go through float32.
    """

    def __init__(self, weights: Int4Weights, float_output: bool = False,
                 isa: str | None = None) -> None:
        """``float_output``: always return float32 (an output projection's logits).
        ``isa``: "amx", "avx512_bf16" or "avx2" (default: this CPU's, `linear.gemm_isa`)."""
        from backplane.platforms.cpu.linear import gemm_isa

        super().__init__()
        self.isa = isa or gemm_isa()
        self.float_output = float_output
        n, k = weights.qweight.shape
        group = weights.group_size
        if k % 4 or group % 4 or k % group:
            raise ValueError(f"int4 kernel needs in_features ({k}) and group_size ({group}) "
                             "multiples of 4, in_features a multiple of group_size")
        self.in_features, self.out_features, self.group_size = k, n, group
        self.method = weights.method
        blocks = -(-n // 16)
        self.register_buffer("packed_weight", pack_int4(weights.qweight.cpu()), persistent=False)
        scales, zeros = weights.scales.float().cpu(), weights.zeros.float().cpu()
        self.register_buffer("scale_table", _block_table(scales, blocks), persistent=False)
        self.register_buffer("zero_table", _block_table(zeros, blocks), persistent=False)
        self.register_buffer("offset_table", _block_table(scales * (128.0 + zeros), blocks),
                             persistent=False)
        self.register_buffer("perm", None if weights.perm is None else weights.perm.cpu().long(),
                             persistent=False)
        self.register_buffer("bias", None if weights.bias is None
                             else weights.bias.float().contiguous().cpu(), persistent=False)
        self._kernel = _int4_lib(self.isa).gemm_int4
        # The buffers never move (CPU only): their addresses are taken once (per-call
        # Python overhead matters at batch 1, ~100 calls per decode step).
        self._args = (self.packed_weight.data_ptr(), self.scale_table.data_ptr(),
                      self.zero_table.data_ptr(), self.offset_table.data_ptr(),
                      self.out_features, self.in_features, self.group_size,
                      None if self.bias is None else self.bias.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        f32 = x.dtype != torch.bfloat16
        if f32 and x.dtype != torch.float32:
            rows = rows.float()
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        rows = rows.contiguous()
        m = rows.shape[0]
        out_f32 = f32 or self.float_output
        out = torch.empty(m, self.out_features,
                          dtype=torch.float32 if out_f32 else torch.bfloat16)
        if m:
            packed, scales, zeros, offsets, n, k, group, bias = self._args
            check_status(self._kernel(rows.data_ptr(), k, m, f32, packed, scales, zeros, offsets,
                                      n, k, group, bias, out.data_ptr(), n, out_f32), "int4 GEMM")
        out = out.reshape(*lead, self.out_features)
        return out if out.dtype == x.dtype or self.float_output else out.to(x.dtype)

    def native_gemm(self):
        """This layer as C code calls it (`linear.NativeGemm`, decoder_layer.py); None
        for logits and act-order layers (their activations are gathered first)."""
        from backplane.platforms.cpu.linear import NativeGemm, function_address

        if self.float_output or self.perm is not None:
            return None
        packed, scales, zeros, offsets, n, k, group, bias = self._args
        return NativeGemm("int4", function_address(self._kernel), packed, bias, n, k,
                          scales=scales, zeros=zeros, offsets=offsets, group=group)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.method} int4, group_size={self.group_size}"
                + (", act-order" if self.perm is not None else "") + f" ({self.isa})")


def _symmetric_int4(weight: torch.Tensor, group: int) -> Int4Weights:
    """Round-to-nearest symmetric 4-bit (GPTQ's convention: zero 8, scale 2 max|w| / 15,
    stored as float16) per row and group of columns."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    scales = (2 * w.abs().amax(dim=-1) / 15)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).half().float()
    q = (torch.round(w / scales[..., None]) + 8).clamp(0, 15).to(torch.uint8).view(n, k)
    return Int4Weights(q, scales, torch.full_like(scales, 8.0), group)


def quantize_output_head(model: nn.Module, method: str) -> int:
    """Replace the output projection (a module exposing ``logits_weight``) with an int4
    (``method`` "int4": symmetric round-to-nearest, groups of 128 columns, this
    kernel) or int8 (W8A8, linear.py) copy; returns how many were replaced (0 or 1).

    Opt-in (``BACKPLANE_CPU_HEAD_QUANTIZATION``): quantized checkpoints keep their
    head in float, and at batch 1 a bf16 head is as many bytes as a 0.5B model's
    whole int4 decoder."""
    from backplane.platforms.cpu.linear import Int8Linear, replace_children

    def swap(child: nn.Module) -> nn.Module | None:
        weight = getattr(child, "logits_weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(child, nn.Linear):
            return None
        k = weight.shape[1]
        if method == "int8":
            return Int8Linear(weight, None, float_output=True,
                              activations="int8" if k % 32 == 0 else "bf16")
        group = 128 if k % 128 == 0 else k
        if k % 4 or group % 4:
            return None
        return Int4Linear(_symmetric_int4(weight.detach(), group), float_output=True)

    if method not in ("int4", "int8"):
        raise ValueError(f"BACKPLANE_CPU_HEAD_QUANTIZATION={method!r}: use int4 or int8")
    return replace_children(model, swap)
