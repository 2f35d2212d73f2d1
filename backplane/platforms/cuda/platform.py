"""The cuda Platform: Triton paged attention, NCCL collectives, CUDA graphs, inductor.

Attention falls back to the plugin SDK's portable ``torch_sdpa_paged`` backend.
"""

from __future__ import annotations

import functools
import importlib.util

from backplane.platforms.cuda.graph_runner import CudaGraphRunner
from backplane.platforms.cuda.policy import CudaConfigPolicy
from backplane.platforms.cuda.runtime import CudaRuntime
from backplane.platforms.cuda.triton_attention import TritonPagedAttentionBackend
from backplane.plugins_sdk import (
    AttentionBackend,
    GraphRunner,
    Platform,
    TorchSdpaPagedAttentionBackend,
)


class CudaPlatform(Platform):
    """NVIDIA GPUs through torch.cuda."""

    name = "cuda"
    device_control_env_var = "CUDA_VISIBLE_DEVICES"
    ray_device_resource = "GPU"
    dist_backend = "nccl"
    compile_backend = "inductor"
    supports_graph_capture = True

    @property
    def supported_quantization(self) -> tuple[str, ...]:
        """GPTQ / AWQ 4-bit checkpoints on the Triton int4 kernel (triton_int4.py)."""
        return ("gptq", "awq") if _triton_installed() else ()

    def make_quantized_linear(self, method, weights):
        """4-bit layers on the Triton dequantising matmul; None (the core's reference)
        where triton is missing, the weights are not on a GPU or the group size does
        not fit the kernel (a multiple of 16)."""
        if method not in ("gptq", "awq") or weights.qweight.device.type != "cuda" or not (
                _triton_installed()):
            return None
        from backplane.platforms.cuda.triton_int4 import TritonInt4Linear

        try:
            return TritonInt4Linear(weights)
        except ValueError:
            return None

    def __init__(self) -> None:
        runtime = CudaRuntime()
        super().__init__(runtime, CudaConfigPolicy(runtime, platform_name=self.name))

    def attention_backends(self) -> list[type[AttentionBackend]]:
        # Triton first; the torch SDPA backend serves whatever Triton refuses
        # (including a missing triton install).
        return [TritonPagedAttentionBackend, TorchSdpaPagedAttentionBackend]

    def make_graph_runner(self) -> GraphRunner:
        return CudaGraphRunner()

    def fused_moe(self, hidden, w13, w2, topk_weights, topk_ids, activation="silu"):
        """MoE experts with the Triton grouped-GEMM kernels (triton_moe.py); the SDK's
        torch implementation where triton is missing or the tensors are not on a GPU."""
        if hidden.device.type == "cuda" and _triton_installed():
            from backplane.platforms.cuda.triton_moe import fused_moe

            return fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
        return super().fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)

    def add_lora(self, out, x, lora_a, lora_b, mapping, output_slices=None):
        """Multi-LoRA with the Triton shrink/expand kernels (lora_kernels.py), which read
        only ``mapping.token_slots``; the SDK's torch implementation where triton is
        missing or the tensors are not on a GPU."""
        if x.device.type == "cuda" and _triton_installed():
            from backplane.platforms.cuda.lora_kernels import add_lora

            return add_lora(out, x, lora_a, lora_b, mapping.token_slots, output_slices)
        return super().add_lora(out, x, lora_a, lora_b, mapping, output_slices)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
