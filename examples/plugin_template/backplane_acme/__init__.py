"""Backplane platform plugin for Acme, a made-up accelerator simulated on the CPU.

This module is what the ``backplane.platforms`` entry point names, so it must
stay light: Backplane imports it just to list plugins. Only the descriptor
lives here; ``load()`` imports the platform itself.

The "device" is visible when ``ACME_VISIBLE_DEVICES`` lists device indices
(``ACME_VISIBLE_DEVICES=0`` or ``0,1``), the way a real driver exposes devices.
Unset, the probe reports the plugin unavailable, so installing this package
never changes which platform Backplane picks on a machine without "Acme devices".
"""

from __future__ import annotations

import os

from backplane.plugins_sdk.descriptor import GRAPH_CAPTURE, PlatformDescriptor, ProbeResult

__version__ = "0.1.0"

VISIBLE_DEVICES_ENV = "ACME_VISIBLE_DEVICES"
# The plugin SDK version this plugin was written against (not Backplane's version).
SDK_VERSION_WRITTEN_FOR = "1.1"


def visible_devices() -> list[int]:
    """Device indices listed in ``ACME_VISIBLE_DEVICES``; raises ValueError if malformed."""
    value = os.environ.get(VISIBLE_DEVICES_ENV, "").strip()
    if not value:
        return []
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"{VISIBLE_DEVICES_ENV}={value!r} is not a comma-separated list of device indices"
        ) from None


def _probe() -> ProbeResult:
    # Cheap and never raising: no imports of torch or of the platform here.
    try:
        devices = visible_devices()
    except ValueError as exc:
        return ProbeResult(False, str(exc))
    if not devices:
        return ProbeResult(
            False,
            f"no Acme device visible ({VISIBLE_DEVICES_ENV} is not set; the simulated device "
            f"is enabled with {VISIBLE_DEVICES_ENV}=0)",
        )
    return ProbeResult(True, f"{len(devices)} Acme device(s) visible (simulated on the CPU)")


def _load():
    from backplane_acme.platform import AcmePlatform

    return AcmePlatform()


descriptor = PlatformDescriptor(
    name="acme",
    device_type="cpu",  # compute is delegated to torch's CPU kernels
    priority=50,  # above cpu (0): chosen automatically whenever an Acme device is visible
    sdk_version=SDK_VERSION_WRITTEN_FOR,
    probe=_probe,
    load=_load,
    features=frozenset({GRAPH_CAPTURE}),  # decode steps recorded and replayed (graph.py)
)
