"""Platform discovery through the `backplane.platforms` entry point group.

`resolve_platform()` is the core's only way to a Platform: it reads the entry
points, probes each plugin, and loads the chosen one, once per process.
"""

from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import entry_points

from backplane.plugins_sdk import Platform, PlatformDescriptor

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "backplane.platforms"


def _descriptors() -> dict[str, PlatformDescriptor]:
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            desc = ep.load()
        except Exception as exc:  # a broken plugin must not take down the others
            logger.warning("platform plugin %r failed to import: %s", ep.name, exc)
            continue
        found[desc.name] = desc
    return found


@functools.cache
def resolve_platform(device: str | None = None) -> Platform:
    """The platform named by ``device`` / ``BACKPLANE_PLATFORM``, else the best available."""
    wanted = device if device not in (None, "auto") else os.environ.get("BACKPLANE_PLATFORM")
    descriptors = _descriptors()
    if wanted:
        if wanted not in descriptors:
            raise RuntimeError(
                f"platform {wanted!r} is not installed; installed: {sorted(descriptors)}"
            )
        probe = descriptors[wanted].probe()
        if not probe.available:
            raise RuntimeError(f"platform {wanted!r} is not available: {probe.reason}")
        return descriptors[wanted].load()
    for desc in sorted(descriptors.values(), key=lambda d: -d.priority):
        if desc.probe().available:
            return desc.load()
    raise RuntimeError(f"no available platform among {sorted(descriptors)}")
