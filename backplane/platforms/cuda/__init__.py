"""The NVIDIA GPU platform plugin (CUDA through torch.cuda).

Only this light descriptor is imported at discovery; the probe imports torch
inside the call and never initialises a CUDA context (``is_available`` and
``device_count`` do not), so probing in a parent process leaves forked workers
free to use the GPU.
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

        if torch.version.cuda is None:
            if torch.version.hip is not None:
                return ProbeResult(
                    False, f"torch {torch.__version__} is a ROCm build; use the rocm platform"
                )
            return ProbeResult(False, f"torch {torch.__version__} has no CUDA support")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return ProbeResult(
                False,
                f"no NVIDIA device visible (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}; check the driver and CUDA_VISIBLE_DEVICES)",
            )
        count = torch.cuda.device_count()
        triton = (
            "triton installed" if importlib.util.find_spec("triton") is not None
            else "triton missing: attention falls back to torch_sdpa_paged"
        )
        return ProbeResult(
            True,
            f"{count} NVIDIA device(s) visible (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, {triton})",
        )
    except Exception as exc:  # the contract: a probe reports, it never raises
        return ProbeResult(False, f"cuda probe failed: {type(exc).__name__}: {exc}")


def _load():
    from backplane.platforms.cuda.platform import CudaPlatform

    return CudaPlatform()


descriptor = PlatformDescriptor(
    name="cuda",
    device_type="cuda",
    priority=100,
    sdk_version=SDK_VERSION,
    probe=_probe,
    load=_load,
    features=frozenset({GRAPH_CAPTURE, TORCH_COMPILE}),
)
