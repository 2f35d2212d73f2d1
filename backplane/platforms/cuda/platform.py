"""The cuda Platform: Triton paged attention, NCCL collectives, CUDA graphs, inductor.

Attention falls back to the plugin SDK's portable ``torch_sdpa_paged`` backend.
"""

from __future__ import annotations

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
    dist_backend = "nccl"
    compile_backend = "inductor"
    supports_graph_capture = True

    def __init__(self) -> None:
        runtime = CudaRuntime()
        super().__init__(runtime, CudaConfigPolicy(runtime, platform_name=self.name))

    def attention_backends(self) -> list[type[AttentionBackend]]:
        # Triton first; the torch SDPA backend serves whatever Triton refuses
        # (including a missing triton install).
        return [TritonPagedAttentionBackend, TorchSdpaPagedAttentionBackend]

    def make_graph_runner(self) -> GraphRunner:
        return CudaGraphRunner()
