"""The CPU Platform: compiled (or torch) paged attention, gloo collectives, no graphs."""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from backplane.platforms.cpu import linear as cpu_linear
from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from backplane.platforms.cpu.communicator import SharedMemoryCommunicator
from backplane.platforms.cpu.decoder_layer import set_decoder_layer_runners
from backplane.platforms.cpu.fp8 import (
    Fp8Linear,
    fp8_kernel_supported,
    quantize_linear_weights_fp8,
)
from backplane.platforms.cpu.fused_layers import cpu_ops, fuse_layers
from backplane.platforms.cpu.gated_mlp import set_gate_up_activations
from backplane.platforms.cpu.int4 import (
    Int4Linear,
    int4_kernel_supported,
    quantize_output_head,
)
from backplane.platforms.cpu.linear import (
    Int8Linear,
    bf16_gemm_supported,
    prepack_linear_weights,
    prepacking_supported,
    quantize_linear_weights_int8,
)
from backplane.platforms.cpu.native import KernelBuildError
from backplane.platforms.cpu.paged_attention import CpuPagedAttentionBackend
from backplane.platforms.cpu.policy import CpuConfigPolicy
from backplane.platforms.cpu.runtime import CpuRuntime, release_free_heap, usable_cores
from backplane.plugins_sdk import Platform

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep freed large buffers in the heap instead of returning them to the OS.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and
    unmaps it on free, so each step's logits and activations page-fault anew:
    measured here, converting [64, 151936] bf16 logits to float32 took 22.8 ms
    that way and 3.3 ms with reuse. (vLLM's CPU backend gets the same effect by
    preloading tcmalloc.) Set BACKPLANE_CPU_MALLOC_TUNING=0 to leave malloc alone.
    Returns whether the setting was applied.
    """
    if os.environ.get("BACKPLANE_CPU_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    return bool(ok)


class CpuPlatform(Platform):
    """Runs everything on the host CPU with PyTorch kernels."""

    name = "cpu"
    dist_backend = "gloo"
    compile_backend = "inductor"
    supports_graph_capture = False

    @property
    def supported_quantization(self) -> tuple[str, ...]:
        """``int8`` (W8A8), ``int8_weight_only`` (W8A16), ``fp8`` (e4m3 weights) and
        ``compressed-tensors`` checkpoints where one of the GEMM kernels runs (AVX512-BF16
        or AVX2), ``gptq`` / ``awq`` 4-bit checkpoints where an int4 kernel
        (kernels/gemm_int4.c or gemm_int4_avx2.c, the same two instruction sets) builds
        (checked when asked: the first check builds them)."""
        methods = (("int8", "int8_weight_only", "compressed-tensors")
                   if bf16_gemm_supported() else ())
        methods += ("fp8",) if fp8_kernel_supported() else ()
        return methods + (("gptq", "awq") if int4_kernel_supported() else ())

    def quantization_unsupported_reason(self, method: str) -> str | None:
        """The instruction sets a missing method's kernel needs, which this CPU lacks."""
        if cpu_linear.gemm_isa() is None:
            return ("its cpu kernels need AVX512-BF16 or AVX2 + FMA + F16C, which this CPU "
                    "lacks")
        return None

    def make_quantized_linear(self, method, weights):
        """GPTQ / AWQ 4-bit layers on the int4 kernel (int4.py), compressed-tensors fp8
        layers on the fp8 kernel (fp8.py), compressed-tensors int8 layers on the int8
        kernels (linear.py: W8A8 or W8A16, as the checkpoint says); None (the core's
        dequantizing reference) where they do not build or take the shape."""
        if method == "compressed-tensors":
            return self._compressed_tensors_linear(weights)
        if method not in ("gptq", "awq") or weights.qweight.device.type != "cpu" or not (
                int4_kernel_supported()):
            return None
        try:
            return Int4Linear(weights)
        except ValueError as exc:  # a shape the kernel does not take
            logger.warning("cpu platform: %s layer on the reference path: %s", method, exc)
            return None

    @staticmethod
    def _compressed_tensors_linear(weights):
        """`Fp8Linear` for fp8 weights, `Int8Linear` for int8 ones: both pack the
        checkpoint's 8-bit values and scales as they are (no dequantize-requantize)."""
        int8 = weights.weight.dtype == torch.int8
        if weights.weight.device.type != "cpu" or not (
                bf16_gemm_supported() if int8 else fp8_kernel_supported()):
            return None
        try:
            if int8:
                return Int8Linear(weights.weight, weights.bias, float_output=False,
                                  activations=getattr(weights, "activations", "bf16"),
                                  scales=weights.scales)
            return Fp8Linear(weights.weight, weights.bias, scales=weights.scales)
        except ValueError as exc:  # a shape the kernel does not take (e.g. W8A8's blocks)
            logger.warning("cpu platform: %s layer on the reference path: %s",
                           "int8" if int8 else "fp8", exc)
            return None

    def __init__(self) -> None:
        super().__init__(CpuRuntime(), CpuConfigPolicy())
        # torch picks physical cores by default; respect an explicit OMP setting,
        # otherwise use every core the affinity mask grants this process.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(usable_cores())
        self.malloc_tuned = tune_allocator()
        logger.debug("cpu platform: %d torch threads, malloc tuned: %s",
                     torch.get_num_threads(), self.malloc_tuned)

    def make_communicator(self, group=None):
        """Shared-memory collectives among ranks of this host (communicator.py); gloo
        between hosts and for point-to-point."""
        return SharedMemoryCommunicator.for_group(group)

    def init_worker(self, local_rank: int, local_world_size: int) -> None:
        """Pin this rank to its own block of the cores it may use and size torch's thread
        pool to it (cores / local ranks, at least one). Ranks outnumbering the cores
        share them round robin. An explicit OMP_NUM_THREADS still sets the pool size."""
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // max(1, local_world_size))
        if local_world_size <= len(cores):
            mine = cores[local_rank * share:(local_rank + 1) * share]
        else:
            mine = [cores[local_rank % len(cores)]]
        os.sched_setaffinity(0, mine)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(len(mine))
        logger.info("cpu platform: rank %d of %d on this host pinned to cores %s, %d threads",
                    local_rank, local_world_size, mine, torch.get_num_threads())

    def attention_backends(self):
        # The compiled kernel first; the torch one serves where no C compiler is.
        return [CpuPagedAttentionBackend, CpuSdpaAttentionBackend]

    def prepare_model(self, model, config):
        """Repack GPTQ/AWQ 4-bit layers for the int4 kernel (int4.py), pack bf16 linear
        weights for the platform's GEMM kernel (AVX512-BF16 or AVX2; oneDNN
        on CPUs with neither; linear.py) and swap bf16 RMSNorm
        and SiLU-and-mul for compiled loops (fused_layers.py).

        Skipped at O1+ (inductor can neither lower the packed-weight op nor trace
        ctypes calls; compiled code brings its own kernels). BACKPLANE_CPU_PREPACK=0
        and BACKPLANE_CPU_FUSED_LAYERS=0 turn each off.
        """
        quantized = self.prepare_quantized_layers(model)
        if quantized:
            logger.info("cpu platform: %d quantized checkpoint layers repacked for the "
                        "platform's kernels", quantized)
            release_free_heap()
        head = os.environ.get("BACKPLANE_CPU_HEAD_QUANTIZATION", "")
        if head and not config.compilation_config.compile and int4_kernel_supported():
            if quantize_output_head(model, head):
                logger.info("cpu platform: output head quantized to %s "
                            "(BACKPLANE_CPU_HEAD_QUANTIZATION)", head)
                release_free_heap()
        method = config.model_config.quantization
        if method in ("int8", "int8_weight_only"):
            activations = "int8" if method == "int8" else "bf16"
            count = quantize_linear_weights_int8(model, activations)
            logger.info("cpu platform: %d linear layers quantized to int8 (%s, one scale per "
                        "output row)", count,
                        "W8A8 with per-block dynamic activation scales" if activations == "int8"
                        else "W8A16, weight-only")
            release_free_heap()
        elif method == "fp8":
            count = quantize_linear_weights_fp8(model)
            logger.info("cpu platform: %d linear layers quantized to fp8 (e4m3, one scale per "
                        "output row, bf16 activations)", count)
            release_free_heap()
        if config.compilation_config.compile:
            logger.info("cpu platform: weights not prepacked, layers not fused "
                        "(torch.compile is on)")
            return model
        if config.model_config.torch_dtype == torch.bfloat16 and os.environ.get(
                "BACKPLANE_CPU_FUSED_LAYERS", "1") != "0":
            try:
                cpu_ops()  # build now, so that a compiler problem is reported here
                count = fuse_layers(model)
            except KernelBuildError as exc:
                logger.warning("cpu platform: layers not fused: %s", exc)
            else:
                logger.info("cpu platform: %d RMSNorm/SiLU/rotary layers use compiled kernels", count)
        own_gemm = bf16_gemm_supported()
        if os.environ.get("BACKPLANE_CPU_PREPACK", "1") != "0" and (
                own_gemm or prepacking_supported()):
            count = prepack_linear_weights(model, own_gemm=own_gemm)
            if count:
                logger.info("cpu platform: %d bf16 linear layers packed for %s", count,
                            f"the {cpu_linear.gemm_isa()} GEMM kernel" if own_gemm
                            else "oneDNN")
                # The plain weights just freed would otherwise stay in malloc's heap
                # (tune_allocator keeps freed buffers): hand them back to the OS.
                release_free_heap()
        # Last, over the modules as they now are; not with LoRA, whose adapters wrap
        # the linear layers afterwards (a runner would bypass them).
        if getattr(config, "lora_config", None) is None:
            count = set_decoder_layer_runners(model)
            if count:
                logger.info("cpu platform: %d decoder layers run decode steps in one C call",
                            count)
            count = set_gate_up_activations(model)
            if count:
                logger.info("cpu platform: %d MLPs run gate/up and SiLU-and-mul in one GEMM",
                            count)
        return model
