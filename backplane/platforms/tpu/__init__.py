"""The Google TPU platform plugin (PyTorch/XLA).

Only this light descriptor is imported at discovery. The probe checks that
torch_xla is installed and that PJRT targets TPU chips on this host, counting
chips from the host's device files; it does not start the XLA runtime, which
would claim the TPU for the probing process.
"""

from __future__ import annotations

import importlib.util

from backplane.plugins_sdk.descriptor import (
    TORCH_COMPILE,
    PlatformDescriptor,
    ProbeResult,
)
from backplane.plugins_sdk.version import SDK_VERSION

INSTALL_HINT = "install backplane-llm[tpu] on a TPU VM"


def _probe() -> ProbeResult:
    try:
        if importlib.util.find_spec("torch_xla") is None:
            return ProbeResult(False, f"torch_xla is not installed ({INSTALL_HINT})")
        import torch_xla
        import torch_xla.runtime as xr

        device_type = xr.device_type()
        if device_type != "TPU":
            return ProbeResult(
                False,
                f"torch_xla {torch_xla.__version__} found but PJRT device is {device_type!r}, "
                "not 'TPU' (no TPU chips detected; PJRT_DEVICE selects the device)",
            )
        chips = _local_chip_count()
        if chips == 0:
            return ProbeResult(False, "PJRT_DEVICE is TPU but no TPU chips are visible")
        found = f"{chips} TPU chip(s)" if chips is not None else "TPU"
        return ProbeResult(True, f"{found} via torch_xla {torch_xla.__version__}")
    except Exception as exc:  # the contract: a probe reports, it never raises
        return ProbeResult(False, f"tpu probe failed: {type(exc).__name__}: {exc}")


def _local_chip_count() -> int | None:
    """TPU chips on this host from device files, or None when torch_xla cannot tell."""
    try:
        from torch_xla._internal import tpu

        return int(tpu.num_available_chips())
    except Exception:
        return None


def _load():
    if importlib.util.find_spec("torch_xla") is None:
        raise RuntimeError(f"the tpu platform needs torch_xla ({INSTALL_HINT})")
    from backplane.platforms.tpu.platform import TpuPlatform

    return TpuPlatform()


descriptor = PlatformDescriptor(
    name="tpu",
    device_type="xla",
    priority=90,
    sdk_version=SDK_VERSION,
    probe=_probe,
    load=_load,
    features=frozenset({TORCH_COMPILE}),
)
