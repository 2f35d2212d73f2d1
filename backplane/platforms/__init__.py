"""Platform discovery and selection through the ``backplane.platforms`` entry points.

`resolve_platform()` is the core's only way to a Platform: it discovers the
installed plugins (`discovery`), applies the selection rules (`selection`), loads
the chosen plugin and lets general plugins add attention backends to it, once
per process and per requested name. Worker processes resolve again on first use
(the cache is per process), from the same ``device`` setting and environment.

`explain_selection()` returns the `PlatformReport` behind a choice; the CLI
(`backplane platforms`) and the server's start-up log print it.
`log_platform_choice()` logs the cached choice (which platform, why, and whether
the ``device`` argument, ``BACKPLANE_PLATFORM`` or auto-detection asked for it)
at INFO on the library logger; every LLMEngine calls it once when it is built.
``backplane.platforms.current_platform`` is `resolve_platform()` with no argument.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from backplane.platforms.discovery import (
    AVAILABLE,
    ENTRY_POINT_GROUP,
    LOAD_ERROR,
    DiscoveredPlatform,
    discover_platforms,
)
from backplane.platforms.selection import (
    ENV_VAR,
    PlatformReport,
    PlatformSelectionError,
    requested_platform,
    select_platform,
)

if TYPE_CHECKING:
    from backplane.plugins_sdk.platform import Platform

logger = logging.getLogger(__name__)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "DiscoveredPlatform",
    "PlatformReport",
    "PlatformSelectionError",
    "discover_platforms",
    "explain_selection",
    "log_platform_choice",
    "resolve_platform",
    "selection_report",
]

_lock = threading.RLock()
# platform name -> loaded Platform (one instance per process, whatever the request path).
_loaded: dict[str, Platform] = {}
# (requested name or None = automatic, source of the request) -> the report that chose
# for it. The source is part of the key so that each report names the request it answered.
_reports: dict[tuple[str | None, str], PlatformReport] = {}


def _load(plugin: DiscoveredPlatform) -> Platform:
    """Load ``plugin`` (once per process), check it, and apply general plugins' backends."""
    name = plugin.display_name
    platform = _loaded.get(name)
    if platform is None:
        from backplane.plugins_sdk.platform import Platform

        platform = plugin.descriptor.load()
        if not isinstance(platform, Platform):
            raise TypeError(
                f"load() returned {type(platform).__name__}, expected a "
                "backplane.plugins_sdk.Platform instance"
            )
        if platform.name != name:
            logger.warning("platform plugin %r loaded a Platform named %r", name, platform.name)
        _add_general_plugin_backends(platform, name)
        _loaded[name] = platform
    plugin.platform = platform
    plugin.attention_backends = [b.name for b in platform.all_attention_backends()]
    return platform


def _add_general_plugin_backends(platform: Platform, name: str) -> None:
    # Imported here: the general-plugin machinery is not needed for discovery itself.
    from backplane.plugins import register_platform_attention_backends

    register_platform_attention_backends(platform, name)


def explain_selection(device: str | None = None, *, load_all: bool = False) -> PlatformReport:
    """The `PlatformReport` for ``device`` (None/"auto": ``BACKPLANE_PLATFORM`` or automatic).

    Loads the chosen platform (through the same per-process cache as
    `resolve_platform`) so that the report is truthful about load failures.
    With ``load_all``, every other available plugin is loaded too so that its
    attention backends can be listed (what ``backplane platforms`` does); their
    load failures are recorded on the plugins, never raised.
    Never raises for selection failures: see ``report.error``.
    """
    requested, source = requested_platform(device, dict(os.environ))
    with _lock:
        report = select_platform(discover_platforms(), requested, source, _load)
        if load_all:
            for plugin in report.plugins:
                if plugin.status == AVAILABLE and plugin.platform is None:
                    try:
                        _load(plugin)
                    except Exception as exc:  # reported, like any other load failure
                        plugin.status = LOAD_ERROR
                        plugin.reason = f"load() failed: {type(exc).__name__}: {exc}"
        return report


def resolve_platform(device: str | None = None) -> Platform:
    """The platform named by ``device`` / ``BACKPLANE_PLATFORM``, else the best available.

    Cached per process and per request (name and source); the choice is logged
    at DEBUG when it is made (`log_platform_choice` logs it at INFO). Raises
    `PlatformSelectionError` (a RuntimeError) listing every installed plugin
    when an explicit request cannot be met or nothing is available.
    """
    key = requested_platform(device, dict(os.environ))
    with _lock:
        report = _reports.get(key)
        if report is None:
            report = explain_selection(device)
            if report.chosen is None:
                raise PlatformSelectionError(report.error or "no platform selected", report)
            _reports[key] = report
            logger.debug("%s", report.summary())
        return _loaded[report.chosen]


def selection_report(device: str | None = None) -> PlatformReport | None:
    """The report behind the cached `resolve_platform(device)` choice, if it was made."""
    return _reports.get(requested_platform(device, dict(os.environ)))


def log_platform_choice(device: str | None = None) -> PlatformReport | None:
    """Log the `resolve_platform(device)` choice at INFO: the platform, why, what was skipped.

    The line is the report's summary, e.g. ``platform cpu chosen: requested by
    BACKPLANE_PLATFORM (...)``; its reason names the source of the choice (the
    ``device`` argument, the ``BACKPLANE_PLATFORM`` environment variable, or
    auto-detection). Returns the report, None (and logs nothing) when no
    choice has been made for ``device`` yet.
    """
    report = selection_report(device)
    if report is not None:
        logger.info("%s", report.summary())
    return report


def reset_platform_cache() -> None:
    """Forget loaded platforms and choices (for tests that install plugins on the fly)."""
    with _lock:
        _loaded.clear()
        _reports.clear()


def __getattr__(name: str):
    # `backplane.platforms.current_platform`, resolved lazily on first access.
    if name == "current_platform":
        return resolve_platform()
    raise AttributeError(f"module 'backplane.platforms' has no attribute {name!r}")
