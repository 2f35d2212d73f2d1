"""The tpu Platform: torch_xla device, XLA collectives, portable paged SDPA attention.

Attention uses the device-agnostic ``torch_sdpa_paged`` backend of the plugin
SDK (`backplane.plugins_sdk.TorchSdpaPagedAttentionBackend`: plain torch ops
that XLA lowers). Its per-step shapes follow the batch, so XLA compiles once
per distinct shape; a Pallas paged-attention backend with bucketed shapes
would be the faster successor.
"""

from __future__ import annotations

from backplane.platforms.tpu.policy import TpuConfigPolicy
from backplane.platforms.tpu.runtime import TpuRuntime
from backplane.plugins_sdk import AttentionBackend, Platform, TorchSdpaPagedAttentionBackend


class TpuPlatform(Platform):
    """Google TPUs through PyTorch/XLA."""

    name = "tpu"
    device_control_env_var = "TPU_VISIBLE_CHIPS"
    ray_device_resource = "TPU"
    dist_backend = "xla"
    compile_backend = "openxla"
    supports_graph_capture = False

    def __init__(self) -> None:
        super().__init__(TpuRuntime(), TpuConfigPolicy())

    def attention_backends(self) -> list[type[AttentionBackend]]:
        return [TorchSdpaPagedAttentionBackend]
