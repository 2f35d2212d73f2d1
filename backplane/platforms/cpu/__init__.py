"""The x86/ARM CPU platform plugin: always available, lowest priority.

Only this descriptor is imported at discovery; `load()` pulls in torch.
"""

from backplane.plugins_sdk.descriptor import (
    TORCH_COMPILE,
    PlatformDescriptor,
    ProbeResult,
)
from backplane.plugins_sdk.version import SDK_VERSION


def _probe() -> ProbeResult:
    return ProbeResult(True, "the CPU is always available")


def _load():
    from backplane.platforms.cpu.platform import CpuPlatform

    return CpuPlatform()


descriptor = PlatformDescriptor(
    name="cpu",
    device_type="cpu",
    priority=0,
    sdk_version=SDK_VERSION,
    probe=_probe,
    load=_load,
    features=frozenset({TORCH_COMPILE}),
)
