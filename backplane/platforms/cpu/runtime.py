"""Device runtime of the CPU platform: memory from the OS, threads from the affinity mask."""

from __future__ import annotations

import ctypes
import os
import platform as pyplatform

import torch

from backplane.plugins_sdk import DeviceRuntime


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim); no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class CpuRuntime(DeviceRuntime):
    """The host CPU seen as one device."""

    device_type = "cpu"
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return pyplatform.processor() or pyplatform.machine() or "cpu"

    def total_memory(self, index: int = 0) -> int:
        total = _meminfo_bytes("MemTotal")
        if total is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total

    def available_memory(self, index: int = 0) -> int:
        avail = _meminfo_bytes("MemAvailable")
        return avail if avail is not None else self.total_memory() // 2

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16
