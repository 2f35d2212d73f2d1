"""Device runtime of the tpu platform, on torch_xla (PJRT).

torch_xla has renamed several entry points across releases (``xm.xla_device``
-> ``torch_xla.device``, ``xm.mark_step`` -> ``torch_xla.sync``, memory-info
keys); each method prefers the current name and falls back to the older one.
"""

from __future__ import annotations

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.runtime as xr

from backplane.plugins_sdk import DeviceRuntime


def _memory_info(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of ``device`` from whichever keys this torch_xla reports."""
    info = xm.get_memory_info(device)
    if "bytes_limit" in info:
        total = int(info["bytes_limit"])
        return total, total - int(info.get("bytes_used", 0))
    return int(info["kb_total"]) * 1024, int(info["kb_free"]) * 1024


class TpuRuntime(DeviceRuntime):
    """TPU chips addressable by this process."""

    device_type = "xla"
    # TPUs compute in bfloat16 natively; float16 is emulated and slower than bf16.
    supported_dtypes = (torch.bfloat16, torch.float32)

    def device(self, index: int = 0) -> torch.device:
        if hasattr(torch_xla, "device"):
            return torch_xla.device(index)
        return xm.xla_device(index)

    def device_count(self) -> int:
        return xr.addressable_runtime_device_count()

    def device_name(self, index: int = 0) -> str:
        return f"{xr.device_type()} {self.device(index)}"

    def total_memory(self, index: int = 0) -> int:
        return _memory_info(self.device(index))[0]

    def available_memory(self, index: int = 0) -> int:
        return _memory_info(self.device(index))[1]

    def synchronize(self) -> None:
        # Cut the pending lazy graph, run it, and wait for the device to finish.
        if hasattr(torch_xla, "sync"):
            torch_xla.sync()
        else:
            xm.mark_step()
        xm.wait_device_ops()

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        xm.set_rng_state(seed)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16
