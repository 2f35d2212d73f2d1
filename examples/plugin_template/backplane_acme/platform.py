"""The Acme Platform: device runtime, config policy and attention backend.

Written only against `backplane.plugins_sdk`, like every Backplane platform.
"""

from __future__ import annotations

import torch
from backplane.plugins_sdk import (
    ConfigDecision,
    ConfigPolicy,
    DeviceRuntime,
    Platform,
    PlatformConfigView,
)

from backplane_acme import visible_devices
from backplane_acme.attention import AcmeAttentionBackend
from backplane_acme.graph import RecordingGraphRunner

# Simulated memory per Acme device.
ACME_DEVICE_MEMORY_BYTES = 8 * 1024**3
# KV cache budget used when the user sets none (the "device" is really host RAM).
DEFAULT_KV_CACHE_BYTES = 512 * 1024**2


class AcmeRuntime(DeviceRuntime):
    """The visible Acme devices; tensors live in host memory (torch device "cpu")."""

    device_type = "cpu"
    supported_dtypes = (torch.float32, torch.bfloat16)

    def device_count(self) -> int:
        return len(visible_devices())

    def device_name(self, index: int = 0) -> str:
        return f"Acme Simulated Accelerator #{index}"

    def total_memory(self, index: int = 0) -> int:
        return ACME_DEVICE_MEMORY_BYTES

    def available_memory(self, index: int = 0) -> int:
        return ACME_DEVICE_MEMORY_BYTES

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16


class AcmeConfigPolicy(ConfigPolicy):
    """Acme's defaults and refusals, each with its reason.

    The view lists every field a policy may read and the few it may change
    (``PlatformConfigView``'s docstring has the table); assigning any other
    field raises AttributeError.
    """

    def check_and_update(self, view: PlatformConfigView) -> ConfigDecision:
        decision = ConfigDecision()
        # Acme's memory is host RAM: a fixed KV budget, not a share of "available" memory.
        if view.kv_cache_memory_bytes is None and view.num_kv_blocks is None:
            view.kv_cache_memory_bytes = DEFAULT_KV_CACHE_BYTES
            decision.changes.append(
                "kv_cache_memory_bytes defaults to 512 MiB on acme (set kv_cache_memory_bytes "
                "or num_kv_blocks to change it)")
        if view.kv_cache_dtype != "auto":
            decision.refusals.append(
                f"kv_cache_dtype {view.kv_cache_dtype!r} is not supported on acme; use 'auto'")
        if view.dtype is not None and view.dtype not in AcmeRuntime.supported_dtypes:
            decision.refusals.append(
                f"dtype {str(view.dtype).removeprefix('torch.')} is not supported on acme; use "
                "dtype='float32' or 'bfloat16'")
        if view.block_size not in AcmeAttentionBackend.supported_block_sizes:
            decision.refusals.append(
                f"block_size {view.block_size} is not supported on acme; use one of "
                f"{AcmeAttentionBackend.supported_block_sizes}")
        return decision


class AcmePlatform(Platform):
    """Acme as Backplane sees it."""

    name = "acme"
    dist_backend = "gloo"
    compile_backend = None
    # Decode steps are recorded and replayed (graph.py); with no compile backend,
    # O2 means graphs over the eager model.
    supports_graph_capture = True

    def __init__(self) -> None:
        super().__init__(AcmeRuntime(), AcmeConfigPolicy())

    def attention_backends(self):
        return [AcmeAttentionBackend]

    def make_graph_runner(self) -> RecordingGraphRunner:
        return RecordingGraphRunner()
