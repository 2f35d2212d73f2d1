"""The AMD GPU platform plugin (ROCm/HIP, which PyTorch exposes as torch.cuda).

Only this light descriptor is imported at discovery; torch is imported inside
the probe, which never initialises the device.
"""

from __future__ import annotations

import importlib.util

from backplane.plugins_sdk.descriptor import (
    GRAPH_CAPTURE,
    TORCH_COMPILE,
    PlatformDescriptor,
    ProbeResult,
)
from backplane.plugins_sdk.version import SDK_VERSION


def _probe() -> ProbeResult:
    try:
        if importlib.util.find_spec("torch") is None:
            return ProbeResult(False, "torch is not installed")
        import torch

        if torch.version.hip is None:
            return ProbeResult(False, f"torch {torch.__version__} has no ROCm (HIP) support")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return ProbeResult(
                False,
                f"no AMD GPU visible (torch {torch.__version__}, HIP {torch.version.hip}; "
                "check the amdgpu driver and HIP_VISIBLE_DEVICES)",
            )
        return ProbeResult(
            True,
            f"{torch.cuda.device_count()} AMD GPU(s) visible (torch {torch.__version__}, "
            f"HIP {torch.version.hip})",
        )
    except Exception as exc:  # the contract: a probe reports, it never raises
        return ProbeResult(False, f"rocm probe failed: {type(exc).__name__}: {exc}")


def _load():
    from backplane.platforms.rocm.platform import RocmPlatform

    return RocmPlatform()


descriptor = PlatformDescriptor(
    name="rocm",
    device_type="cuda",  # HIP devices are "cuda" devices in PyTorch
    priority=100,
    sdk_version=SDK_VERSION,
    probe=_probe,
    load=_load,
    features=frozenset({GRAPH_CAPTURE, TORCH_COMPILE}),
)
