"""The light object a platform plugin exposes through its entry point.

Discovery imports only this object, never torch extensions or device runtimes, so
that listing plugins is cheap and a broken plugin cannot take the others down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backplane.plugins_sdk.platform import Platform


@dataclass(frozen=True)
class ProbeResult:
    """Whether a platform can run in this process, and why (or why not)."""

    available: bool
    reason: str


@dataclass(frozen=True)
class PlatformDescriptor:
    """What a `backplane.platforms` entry point names.

    Attributes:
        name: short platform name used by ``--device`` (``"cpu"``, ``"cuda"``).
        device_type: the torch device string the platform runs on.
        priority: higher wins when several platforms are available; cpu is 0.
        sdk_version: the plugins_sdk version the plugin was written against.
        probe: cheap check, must not raise (discovery guards it anyway).
        load: imports the heavy parts and returns the Platform instance.
    """

    name: str
    device_type: str
    priority: int
    sdk_version: str
    probe: Callable[[], ProbeResult]
    load: Callable[[], Platform]
