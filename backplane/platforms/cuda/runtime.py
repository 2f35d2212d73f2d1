"""Device runtime of the cuda (and rocm) platform, on torch.cuda.

Nothing here initialises CUDA at construction: the platform object is created
in the parent process before workers start, and a CUDA context made there
would be unusable in forked children. Calls that need the device touch it on
first use.
"""

from __future__ import annotations

import functools

import torch

from backplane.plugins_sdk import DeviceRuntime


class CudaRuntime(DeviceRuntime):
    """GPUs visible through ``torch.cuda`` (NVIDIA via CUDA, AMD via HIP)."""

    device_type = "cuda"

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def total_memory(self, index: int = 0) -> int:
        return torch.cuda.get_device_properties(index).total_memory

    def available_memory(self, index: int = 0) -> int:
        # What the driver reports free now, so memory taken by other processes
        # (and by this one's weights) is already subtracted.
        free, _total = torch.cuda.mem_get_info(index)
        return free

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def pin_memory_available(self) -> bool:
        return True

    @functools.cached_property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:  # type: ignore[override]
        """float32 and float16 always; bfloat16 only where the GPU computes it natively."""
        dtypes = (torch.float32, torch.float16)
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            dtypes += (torch.bfloat16,)
        return dtypes

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.bfloat16 in self.supported_dtypes else torch.float16
