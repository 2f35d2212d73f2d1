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
from typing import NamedTuple

import torch
from torch import nn

from backplane.platforms.cpu.huge_pages import weight_buffer, weights_on_huge_pages
from backplane.platforms.cpu.native import (
    KernelBuildError,
    check_status,
    load_gemm_kernel,
)
from backplane.platforms.cpu.runtime import release_free_heap

logger = logging.getLogger(__name__)

class NativeGemm(NamedTuple):
    """A linear layer's GEMM as C code calls it (decoder_layer.py), bf16 activations in
    and bf16 out; addresses as ints (None: none). ``kind``: "bf16" ``function(x, xs, m,
    packed, n, k, bias, out, os, out_f32)``; "scaled" (8-bit weights) the same with
    ``scales`` after ``packed``; "int4" ``function(x, xs, m, x_f32, packed, scales,
    zeros, offsets, n, k, group, bias, out, os, out_f32)`` (int4.py's tables).
    ``silu_function``: for a gate/up projection ``[gate | up]``, the same GEMM with
    SiLU-and-mul fused into its store, ``function(x, xs, m, packed, n / 2, k, bias, act,
    act_stride)`` (gemm_bf16.c's gemm_bf16_silu); None where the kernel has none."""

    kind: str
    function: int
    packed: int
    bias: int | None
    out_features: int
    in_features: int
    scales: int | None = None
    zeros: int | None = None
    offsets: int | None = None
    group: int = 0
    silu_function: int | None = None


def function_address(function: ctypes._CFuncPtr) -> int:
    """The address of a loaded C function (its library must stay loaded)."""
    return ctypes.cast(function, ctypes.c_void_p).value


def optional_data_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    """This CPU runs one of the platform's GEMM kernels (AVX512-BF16: gemm_bf16.c, else
    AVX2 + FMA: gemm_avx2.c) and it builds (BACKPLANE_CPU_BF16_GEMM=0: off, oneDNN
    packing or torch's matmul instead)."""
    if os.environ.get("BACKPLANE_CPU_BF16_GEMM", "1") == "0" or gemm_isa() is None:
        return False
    try:
        gemm_kernels(gemm_isa())
    except KernelBuildError as exc:
        logger.warning("cpu platform: bf16 GEMM kernel unavailable (%s); using oneDNN", exc)
        return False
    return True


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def runnable_gemm_isas() -> list[str]:
    """Every GEMM kernel this CPU can run, best first (an AMX CPU runs all three)."""
    order = ["amx", "avx512_bf16", "avx2"]
    best = gemm_isa()
    return [] if best is None else order[order.index(best):]


def gemm_isa() -> str | None:
    """Which GEMM kernel this CPU runs: "amx" (gemm_bf16.c built with its AMX tile
    GEMM, gemm_amx.h, for the bf16 layers; everything else as "avx512_bf16"),
    "avx512_bf16" (bf16 and VNNI dot products, gemm_bf16.c), "avx2" (AVX2 + FMA +
    F16C: float32 FMAs, gemm_avx2.c), or None. BACKPLANE_CPU_AMX=0 skips AMX."""
    if "avx512_bf16" in cpu_flags():
        return "amx" if _amx_usable() else "avx512_bf16"
    if {"avx2", "fma", "f16c"} <= cpu_flags():  # F16C: the fp8 weights' widening
        return "avx2"
    return None


@functools.lru_cache(maxsize=1)
def _amx_usable() -> bool:
    """The CPU has AMX tiles with bf16, the kernel builds, and Linux granted this
    process the tile state (it must be asked for; kernels before 5.16 refuse)."""
    if (os.environ.get("BACKPLANE_CPU_AMX", "1") == "0"
            or not {"amx_tile", "amx_bf16"} <= cpu_flags()):
        return False
    try:
        gemm_kernels("amx")
    except KernelBuildError as exc:
        logger.warning("cpu platform: AMX GEMM unavailable (%s); using AVX512-BF16", exc)
        return False
    return True


@functools.lru_cache(maxsize=None)
def gemm_kernels(isa: str | None) -> ctypes.CDLL:
    """The GEMM kernel library for ``isa`` (see `gemm_isa`; a CPU runs the kernels of
    the instruction sets below its best too, which is how tests check them there)."""
    if isa not in ("amx", "avx512_bf16", "avx2"):
        raise KernelBuildError(f"no GEMM kernel for this CPU (instruction set {isa!r})")
    lib = load_gemm_kernel("gemm_avx2.c" if isa == "avx2" else "gemm_bf16.c", isa)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    # The GEMMs return -1 when scratch memory cannot be allocated (the AVX2 ones widen
    # the activations to float32, the AMX ones copy a batch's last rows and widen int8
    # weights to bf16).
    lib.pack_bf16.argtypes = [p, i64, i64, p]
    lib.pack_bf16.restype = None
    lib.gemm_bf16.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, ctypes.c_int]
    lib.gemm_bf16.restype = ctypes.c_int
    lib.pack_w8_from_bf16.argtypes = [p, i64, i64, p, p]
    lib.pack_w8_from_bf16.restype = None
    lib.gemm_w8.argtypes = [p, i64, i64, p, p, i64, i64, p, p, i64, ctypes.c_int]
    lib.gemm_w8.restype = ctypes.c_int
    lib.pack_w8a8_from_bf16.argtypes = [p, i64, i64, p, p]
    lib.pack_w8a8_from_bf16.restype = None
    lib.gemm_w8a8_bf16.argtypes = [p, i64, i64, p, p, i64, i64, p, p, i64, ctypes.c_int]
    lib.gemm_w8a8_bf16.restype = ctypes.c_int
    if isa != "avx2":
        lib.gemm_bf16_silu.argtypes = [p, i64, i64, p, i64, i64, p, p, i64]
        lib.gemm_bf16_silu.restype = ctypes.c_int
    lib.w8a8_weight_offset.argtypes = []
    lib.w8a8_weight_offset.restype = ctypes.c_int
    return lib


# Activations are quantized in blocks of this many columns (one scale each).
W8A8_BLOCK = 32


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size | None]:
    """``x`` as a 2-D matrix whose rows the kernels address by a row stride, and the
    leading shape to give the output back (None: ``x`` was such a matrix already, the
    usual case, which then costs no reshapes: a decode step makes ~100 of these calls)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x, None
    return x.reshape(-1, x.shape[-1]).contiguous(), x.shape[:-1]


class BlockedBf16Linear(nn.Module):
    """A bf16 linear (or output projection) on the platform's own GEMM kernel
    (``kernels/gemm_bf16.c``): the weight is packed once into blocks of 16 rows
    whose column pairs interleave, the layout AVX512-BF16's dot-product streams
    without horizontal sums. It replaces the oneDNN packing (one packed copy
    either way): 1.4x faster weight streaming at batch 1, on par at batch 512.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 float_output: bool, isa: str | None = None) -> None:
        """``isa``: the kernel to run (`gemm_isa`; default: this CPU's best)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % 2:
            raise ValueError(f"in_features ({self.in_features}) must be even")
        self.float_output = float_output
        self.isa = isa or gemm_isa()
        weight = weight.detach().contiguous()
        blocks = -(-self.out_features // 16)
        packed = weight_buffer((blocks * 16 * self.in_features,), torch.bfloat16)
        gemm_kernels(self.isa).pack_bf16(weight.data_ptr(), self.out_features, self.in_features,
                              packed.data_ptr())
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        rows, lead = _as_rows(x)
        m = rows.shape[0]
        out = torch.empty(m, self.out_features,
                          dtype=torch.float32 if self.float_output else torch.bfloat16)
        if m:
            check_status(gemm_kernels(self.isa).gemm_bf16(
                rows.data_ptr(), rows.stride(0), m, self.packed_weight.data_ptr(),
                self.out_features, self.in_features,
                None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
                self.out_features, int(self.float_output)), "bf16 GEMM")
        return out if lead is None else out.reshape(*lead, self.out_features)

    def native_gemm(self) -> NativeGemm | None:
        """This layer as C code calls it (decoder_layer.py); None for logits."""
        if self.float_output:
            return None
        lib = gemm_kernels(self.isa)
        # The fused gate/up + SiLU-and-mul runs the AVX512-BF16 tiles; an AMX build's
        # gemm_bf16 sums on AMX tiles, which the fused form would not match bit for bit.
        fused = (function_address(lib.gemm_bf16_silu)
                 if self.isa == "avx512_bf16" and self.out_features % 32 == 0 else None)
        return NativeGemm("bf16", function_address(lib.gemm_bf16),
                          self.packed_weight.data_ptr(), optional_data_ptr(self.bias),
                          self.out_features, self.in_features, silu_function=fused)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packed=bf16-blocks ({self.isa})"
                f"{', float output' if self.float_output else ''}")


class Int8Linear(nn.Module):
    """A linear (or output projection) with int8 weights, one float32 scale per output
    row (symmetric, max |w| / 127), quantized from the bf16/float weight at load.

    Two kernels (``kernels/gemm_bf16.c``), half the weight bytes of bf16 either way:

    - ``activations="int8"`` (W8A8, dynamic): each token's activations are quantized
      in blocks of 32 columns (one scale per block, as llama.cpp's Q8_0) and
      multiplied with AVX512-VNNI's int8 dot product (``gemm_w8a8``). The fast one:
      about 2x bf16 at batch 1, 1.5x at batch 64, on this project's 2-core Zen 4.
      Needs in_features divisible by 32.
    - ``activations="bf16"`` (W8A16, weight-only): each int8 group is widened to
      bf16 in registers for the bf16 GEMM's dot product (``gemm_w8``). Activations
      keep their precision; on this CPU the widening costs what the halved bytes
      save, so it is about as fast as bf16.

    The output is bf16, or float32 for float32 inputs and for logits.

    A checkpoint's int8 weight (compressed-tensors ``int-quantized``) is packed as it
    is, with its own scales: ``weight`` int8 ``[N, K]`` and ``scales [N]``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 float_output: bool, activations: str = "bf16",
                 scales: torch.Tensor | None = None, isa: str | None = None) -> None:
        """``weight``: float (quantized here, per row) or, with ``scales [N]``, already
        int8 (a checkpoint's; its values and scales are used unchanged). ``isa``: the
        kernel to run (`gemm_isa`; default: this CPU's best)."""
        super().__init__()
        self.isa = isa or gemm_isa()
        self.out_features, self.in_features = weight.shape
        if self.in_features % 2:
            raise ValueError(f"in_features ({self.in_features}) must be even")
        if activations not in ("bf16", "int8"):
            raise ValueError(f"activations ({activations!r}) must be 'bf16' or 'int8'")
        if activations == "int8" and self.in_features % W8A8_BLOCK:
            raise ValueError(f"in_features ({self.in_features}) must be a multiple of "
                             f"{W8A8_BLOCK} for int8 activations")
        self.activations = activations
        self.float_output = float_output
        if scales is None:
            packed, scales = self._quantize_and_pack(weight)
        else:
            packed, scales = self._pack_int8(weight, scales)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(),
                             persistent=False)

    @property
    def _group(self) -> int:
        """Consecutive input columns per packed row entry: VNNI quads (W8A8) or bf16
        dot-product pairs (W8A16)."""
        return 4 if self.activations == "int8" else 2

    @property
    def _offset(self) -> int:
        """The VNNI kernel's W8A8 stores each weight + 128 (vpdpbusd multiplies unsigned
        by signed bytes); the AVX2 one and W8A16 store them signed."""
        return self._lib.w8a8_weight_offset() if self.activations == "int8" else 0

    @property
    def _lib(self) -> ctypes.CDLL:
        return gemm_kernels(self.isa)

    def _quantize_and_pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.detach().to(torch.bfloat16).contiguous()
        blocks = -(-self.out_features // 16)
        scales = torch.empty(self.out_features, dtype=torch.float32)
        if self.activations == "int8":
            packed = weight_buffer((blocks * 16 * self.in_features,),
                                   torch.uint8 if self._offset else torch.int8)
            pack = self._lib.pack_w8a8_from_bf16
        else:
            packed = weight_buffer((blocks * 16 * self.in_features,), torch.int8)
            pack = self._lib.pack_w8_from_bf16
        pack(weight.data_ptr(), self.out_features, self.in_features, packed.data_ptr(),
             scales.data_ptr())
        return packed, scales

    def _pack_int8(self, weight: torch.Tensor, scales: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The C packers' layout, from int8 values: 16-row blocks of ``_group``
        consecutive columns, rows past N zero (then offset, as the packers store them)."""
        if weight.dtype != torch.int8:
            raise ValueError(f"pre-quantized weight must be int8, not {weight.dtype}")
        scales = scales.detach().float().reshape(-1).cpu()
        if scales.numel() != self.out_features:
            raise ValueError(f"scales has {scales.numel()} values for {self.out_features} "
                             "output rows (one per row)")
        blocks = -(-self.out_features // 16)
        rows = torch.zeros(blocks * 16, self.in_features, dtype=torch.int16)
        rows[: self.out_features] = weight.detach().cpu()
        rows += self._offset
        tiles = rows.view(blocks, 16, self.in_features // self._group, self._group)
        packed = tiles.permute(0, 2, 1, 3).reshape(-1)
        dtype = torch.uint8 if self._offset else torch.int8
        return weights_on_huge_pages(packed.to(dtype)), scales.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_out = self.float_output or x.dtype == torch.float32
        rows, lead = _as_rows(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16))
        out = torch.empty(rows.shape[0], self.out_features,
                          dtype=torch.float32 if float_out else torch.bfloat16)
        m = rows.shape[0]
        bias = None if self.bias is None else self.bias.data_ptr()
        lib = self._lib
        if m and self.activations == "int8":
            # quantizes the activations per 32-column block, then the int8 GEMM
            check_status(lib.gemm_w8a8_bf16(rows.data_ptr(), rows.stride(0), m,
                                            self.packed_weight.data_ptr(),
                                            self.scales.data_ptr(), self.out_features,
                                            self.in_features, bias, out.data_ptr(),
                                            self.out_features, int(float_out)), "W8A8 GEMM")
        elif m:
            check_status(lib.gemm_w8(rows.data_ptr(), rows.stride(0), m,
                                     self.packed_weight.data_ptr(), self.scales.data_ptr(),
                                     self.out_features, self.in_features, bias,
                                     out.data_ptr(), self.out_features, int(float_out)),
                         "W8A16 GEMM")
        if lead is not None:
            out = out.reshape(*lead, self.out_features)
        # x's dtype (e.g. float16) unless logits are asked for: the layer contract
        return out if self.float_output or out.dtype == x.dtype else out.to(x.dtype)

    def native_gemm(self) -> NativeGemm | None:
        """This layer as C code calls it (decoder_layer.py); None for logits."""
        if self.float_output:
            return None
        lib = self._lib
        gemm = lib.gemm_w8a8_bf16 if self.activations == "int8" else lib.gemm_w8
        return NativeGemm("scaled", function_address(gemm), self.packed_weight.data_ptr(),
                          optional_data_ptr(self.bias), self.out_features, self.in_features,
                          scales=self.scales.data_ptr())

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the kernel computes with (scale x int8), for reference checks."""
        blocks = -(-self.out_features // 16)
        q = self.packed_weight.view(blocks, self.in_features // self._group, 16, self._group)
        q = q.permute(0, 2, 1, 3).reshape(blocks * 16, self.in_features)[: self.out_features]
        return (q.to(torch.int16) - self._offset).float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 weights{', float output' if self.float_output else ''}")


def _int8(child: nn.Module, activations: str) -> nn.Module | None:
    weight = getattr(child, "logits_weight", None)
    if isinstance(child, nn.Linear):
        weight, bias, float_output = child.weight, child.bias, False
    elif isinstance(weight, torch.Tensor):
        bias, float_output = None, True
    else:
        return None
    in_features = weight.shape[1]
    if in_features % 2:
        return None
    if activations == "int8" and in_features % W8A8_BLOCK:
        activations = "bf16"  # a layer too narrow for the activation blocks: weight-only
    return Int8Linear(weight, bias, float_output=float_output, activations=activations)


def quantize_linear_weights_int8(model: nn.Module, activations: str = "int8") -> int:
    """Replace every linear layer and the output head with `Int8Linear`; returns how many.

    ``activations``: "int8" (W8A8, dynamic per-block activation scales) or "bf16"
    (W8A16, weight-only)."""
    return replace_children(model, lambda child: _int8(child, activations))


def replace_children(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Swap every submodule for ``replacement(child)`` where that is not None; returns how many.

    Replaced layers are freed, and the heap trimmed, parent by parent: holding them
    to the end (or leaving their memory in malloc's cache) kept the old and the new
    weights resident together, a peak of twice the model.
    """
    replaced = 0
    # Only modules that have children: a list of every module would keep the
    # replaced layers alive until the loop ends.
    parents = [m for m in model.modules() if next(m.children(), None) is not None]
    for module in parents:
        swapped = 0
        for name in [name for name, _ in module.named_children()]:
            new = replacement(getattr(module, name))
            if new is not None:
                setattr(module, name, new)
                swapped += 1
        new = None
        if swapped:
            replaced += swapped
            release_free_heap()
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

    ``own_gemm`` (default: when the CPU runs one of the platform's GEMM kernels,
    AVX512-BF16 or AVX2, and it builds) packs for that kernel, otherwise for oneDNN."""
    if own_gemm is None:
        own_gemm = bf16_gemm_supported()
    if not (own_gemm or prepacking_supported()):
        return 0  # neither kernel runs here: torch's own linears stay
    return replace_children(model, lambda child: _packed(child, own_gemm))
