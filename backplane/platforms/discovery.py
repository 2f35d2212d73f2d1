"""Finding platform plugins: entry points -> validated descriptors -> probe results.

Discovery never lets one plugin break another: every failure (import error,
malformed descriptor, incompatible SDK version, probe that raises) is caught
and recorded on that plugin's `DiscoveredPlatform` with a status and a reason
that `backplane platforms` and the selection report show to the user.

Only descriptors are imported here (they must stay light); ``load()`` is called
later, by selection, for the platform actually chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from backplane.plugins_sdk.version import SDK_VERSION, check_sdk_compatibility

if TYPE_CHECKING:
    from backplane.plugins_sdk.platform import Platform

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "backplane.platforms"

# Statuses a discovered plugin can have; only AVAILABLE ones are candidates.
AVAILABLE = "available"  # probe() said it can run here
UNAVAILABLE = "unavailable"  # probe() said it cannot (reason from the plugin)
IMPORT_ERROR = "import_error"  # importing the entry point raised
INVALID = "invalid"  # the entry point names something that is not a usable descriptor
INCOMPATIBLE = "incompatible"  # written for an SDK version this Backplane cannot serve
PROBE_ERROR = "probe_error"  # probe() raised or returned something other than a ProbeResult
CONFLICT = "conflict"  # two distributions provide a platform of the same name
LOAD_ERROR = "load_error"  # load() raised or did not return a Platform (set by selection)

STATUSES = (AVAILABLE, UNAVAILABLE, IMPORT_ERROR, INVALID, INCOMPATIBLE, PROBE_ERROR, CONFLICT,
            LOAD_ERROR)

_REQUIRED_FIELDS = ("name", "device_type", "priority", "sdk_version", "probe", "load")
# Names with a meaning of their own on the command line.
_RESERVED_NAMES = ("auto",)


@dataclass
class DiscoveredPlatform:
    """Everything known about one `backplane.platforms` entry point.

    Attributes:
        entry_point: the entry point's name (normally the platform name).
        target: what it points at, ``"module:attribute"``.
        distribution, dist_version: the installed distribution that declares it.
        name, device_type, priority, sdk_version: the descriptor's fields
            (None when the descriptor could not be read).
        status: one of `STATUSES`.
        reason: why (the probe's reason, or the error).
        descriptor: the descriptor object (not serialised).
        platform: the loaded Platform, once selection or the CLI loaded it.
        attention_backends: names of the loaded platform's backends, best first (its own,
            then those general plugins registered: `Platform.all_attention_backends`).
    """

    entry_point: str
    target: str
    distribution: str | None = None
    dist_version: str | None = None
    name: str | None = None
    device_type: str | None = None
    priority: int | None = None
    sdk_version: str | None = None
    status: str = INVALID
    reason: str = ""
    descriptor: Any = field(default=None, repr=False)
    platform: Platform | None = field(default=None, repr=False)
    attention_backends: list[str] | None = None

    @property
    def display_name(self) -> str:
        """The platform name, or the entry point name when the descriptor is unreadable."""
        return self.name or self.entry_point

    @property
    def is_candidate(self) -> bool:
        """Whether selection may pick this plugin."""
        return self.status == AVAILABLE

    def describe(self) -> str:
        """One-line ``name [status: reason]`` used in reports and error messages."""
        return f"{self.display_name} [{self.status}: {self.reason}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (what ``backplane platforms --json`` prints per plugin)."""
        return {
            "name": self.display_name,
            "entry_point": self.entry_point,
            "target": self.target,
            "distribution": self.distribution,
            "version": self.dist_version,
            "device_type": self.device_type,
            "priority": self.priority,
            "sdk_version": self.sdk_version,
            "status": self.status,
            "available": self.status == AVAILABLE,
            "reason": self.reason,
            "loaded": self.platform is not None,
            "attention_backends": self.attention_backends,
        }


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _read_descriptor(found: DiscoveredPlatform, desc: Any) -> bool:
    """Copy and validate the descriptor's fields; False (status set) when unusable."""
    missing = [f for f in _REQUIRED_FIELDS if not hasattr(desc, f)]
    if missing:
        found.status = INVALID
        found.reason = (
            f"{found.target} is not a platform descriptor: missing {', '.join(missing)} "
            f"(expected a backplane.plugins_sdk.PlatformDescriptor)"
        )
        return False
    found.descriptor = desc
    found.name, found.device_type = desc.name, desc.device_type
    found.priority, found.sdk_version = desc.priority, desc.sdk_version
    problems = []
    if not isinstance(desc.name, str) or not desc.name or desc.name in _RESERVED_NAMES:
        problems.append(f"name {desc.name!r} must be a non-empty string other than 'auto'")
    elif desc.name != found.entry_point:
        problems.append(
            f"descriptor name {desc.name!r} differs from its entry point name "
            f"{found.entry_point!r}; they must match so --device finds it"
        )
    if not isinstance(desc.priority, int) or isinstance(desc.priority, bool):
        problems.append(f"priority {desc.priority!r} must be an int")
    if not isinstance(desc.device_type, str) or not desc.device_type:
        problems.append(f"device_type {desc.device_type!r} must be a non-empty string")
    if not callable(desc.probe) or not callable(desc.load):
        problems.append("probe and load must be callables")
    if problems:
        found.status, found.reason = INVALID, "; ".join(problems)
        return False
    incompatible = check_sdk_compatibility(str(desc.sdk_version))
    if incompatible:
        found.status = INCOMPATIBLE
        found.reason = f"refused: {incompatible}"
        return False
    return True


def _probe(found: DiscoveredPlatform) -> None:
    try:
        result = found.descriptor.probe()
    except Exception as exc:  # probe() must not raise; if it does, only this plugin pays
        found.status, found.reason = PROBE_ERROR, f"probe() raised {_error_text(exc)}"
        return
    available = getattr(result, "available", None)
    reason = getattr(result, "reason", None)
    if not isinstance(available, bool) or not isinstance(reason, str):
        found.status = PROBE_ERROR
        found.reason = f"probe() returned {result!r}, expected ProbeResult(available, reason)"
        return
    found.status = AVAILABLE if available else UNAVAILABLE
    found.reason = reason


def inspect_entry_point(ep: EntryPoint) -> DiscoveredPlatform:
    """Import, validate and probe one entry point; never raises."""
    dist = getattr(ep, "dist", None)
    found = DiscoveredPlatform(
        entry_point=ep.name,
        target=ep.value,
        distribution=dist.name if dist is not None else None,
        dist_version=dist.version if dist is not None else None,
    )
    try:
        desc = ep.load()
    except Exception as exc:  # a broken plugin must not take down the others
        found.status, found.reason = IMPORT_ERROR, f"import failed: {_error_text(exc)}"
        logger.warning("platform plugin %r (%s) failed to import: %s", ep.name, ep.value, exc)
        return found
    if _read_descriptor(found, desc):
        _probe(found)
    return found


def _mark_conflicts(plugins: list[DiscoveredPlatform]) -> None:
    by_name: dict[str, list[DiscoveredPlatform]] = {}
    for plugin in plugins:
        if plugin.name:
            by_name.setdefault(plugin.name, []).append(plugin)
    for name, same in by_name.items():
        if len(same) < 2:
            continue
        providers = ", ".join(f"{p.distribution or '?'} {p.dist_version or ''}".strip()
                              for p in same)
        for plugin in same:
            plugin.status = CONFLICT
            plugin.reason = (
                f"platform {name!r} is provided by {len(same)} distributions ({providers}); "
                "uninstall all but one"
            )


def discover_platforms(group: str = ENTRY_POINT_GROUP) -> list[DiscoveredPlatform]:
    """Every installed platform plugin, inspected, sorted by (-priority, name).

    Reads the entry points afresh on each call (cheap: descriptors only); use
    `backplane.platforms.resolve_platform` for the cached, once-per-process choice.
    """
    plugins = [inspect_entry_point(ep) for ep in entry_points(group=group)]
    _mark_conflicts(plugins)
    return sorted(plugins, key=sort_key)


def sort_key(plugin: DiscoveredPlatform) -> tuple[int, str]:
    """Highest priority first; equal priorities in name order (the documented tie-break)."""
    priority = plugin.priority if isinstance(plugin.priority, int) else -(2**31)
    return (-priority, plugin.display_name)


__all__ = [
    "ENTRY_POINT_GROUP",
    "SDK_VERSION",
    "STATUSES",
    "DiscoveredPlatform",
    "discover_platforms",
    "inspect_entry_point",
    "sort_key",
]
