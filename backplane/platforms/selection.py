"""Choosing one platform among the discovered plugins, and explaining the choice.

Rules (docs/plugins.md, "Selection"):

1. An explicit request (the ``device`` argument / ``--device NAME``, else the
   ``BACKPLANE_PLATFORM`` environment variable; ``"auto"`` or empty means no
   request) wins. If that plugin is missing, unusable (import error, invalid,
   incompatible SDK, probe error, name conflict), unavailable, or its ``load()``
   fails, selection fails with `PlatformSelectionError` listing every installed
   plugin and its state. There is no silent fallback to another platform.
2. Otherwise the available plugins are tried from the highest ``priority`` down;
   equal priorities are tried in name order (alphabetical), and the tie is
   reported. A plugin whose ``load()`` raises is recorded as ``load_error`` and
   skipped; the next one is tried. cpu has priority 0, the lowest in-tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backplane.platforms.discovery import (
    AVAILABLE,
    LOAD_ERROR,
    DiscoveredPlatform,
    sort_key,
)
from backplane.plugins_sdk.version import SDK_VERSION

if TYPE_CHECKING:
    from backplane.plugins_sdk.platform import Platform

ENV_VAR = "BACKPLANE_PLATFORM"

# Where an explicit request came from (used in messages).
SOURCE_ARGUMENT = "device argument"
SOURCE_ENV = ENV_VAR
SOURCE_AUTO = "auto"


class PlatformSelectionError(RuntimeError):
    """No platform could be selected; the message says why and what is installed."""

    def __init__(self, message: str, report: PlatformReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class PlatformReport:
    """Which platform was chosen, why, and what happened to every other plugin.

    Attributes:
        requested: the explicitly requested name, or None for automatic selection.
        source: where the request came from (`SOURCE_ARGUMENT`, `SOURCE_ENV`, `SOURCE_AUTO`).
        chosen: name of the selected platform, None when selection failed.
        reason: why it was chosen (or why selection failed).
        plugins: every discovered plugin, sorted by (-priority, name).
        tie: names of available plugins that shared the top priority (when more than one).
        error: the failure message when nothing could be selected.
    """

    requested: str | None
    source: str
    chosen: str | None = None
    reason: str = ""
    plugins: list[DiscoveredPlatform] = field(default_factory=list)
    tie: list[str] = field(default_factory=list)
    error: str | None = None
    sdk_version: str = SDK_VERSION

    def plugin(self, name: str) -> DiscoveredPlatform | None:
        """The discovered plugin called ``name``, if any."""
        return next((p for p in self.plugins if p.display_name == name), None)

    @property
    def skipped(self) -> list[DiscoveredPlatform]:
        """Plugins that could not be used, with their reasons (unavailable or broken)."""
        return [p for p in self.plugins if p.status != AVAILABLE]

    @property
    def also_available(self) -> list[DiscoveredPlatform]:
        """Usable plugins that were not chosen."""
        return [p for p in self.plugins if p.status == AVAILABLE and p.name != self.chosen]

    def summary(self) -> str:
        """One line for logs, e.g. ``platform cuda chosen: auto-detected: highest-priority
        available (priority 100); skipped: foo (unavailable: no device)``.

        The reason names where the choice came from: ``requested by device argument``,
        ``requested by BACKPLANE_PLATFORM`` (the environment variable) or ``auto-detected``.
        """
        if self.chosen is None:
            return f"no platform selected: {self.error}"
        text = f"platform {self.chosen} chosen: {self.reason}"
        if self.also_available:
            text += "; also available: " + ", ".join(
                f"{p.display_name} (priority {p.priority})" for p in self.also_available
            )
        if self.skipped:
            text += "; skipped: " + ", ".join(
                f"{p.display_name} ({p.status}: {p.reason})" for p in self.skipped
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``backplane platforms --json``)."""
        return {
            "sdk_version": self.sdk_version,
            "requested": self.requested,
            "source": self.source,
            "chosen": self.chosen,
            "reason": self.reason,
            "tie": self.tie,
            "error": self.error,
            "summary": self.summary(),
            "plugins": [p.to_dict() for p in self.plugins],
        }


def requested_platform(device: str | None, environ: dict[str, str]) -> tuple[str | None, str]:
    """(requested name or None, source) from the ``device`` argument and the environment."""
    if device not in (None, "", "auto"):
        return device, SOURCE_ARGUMENT
    env = environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return env, SOURCE_ENV
    return None, SOURCE_AUTO


def _installed_list(plugins: list[DiscoveredPlatform]) -> str:
    if not plugins:
        return "none (no distribution declares a 'backplane.platforms' entry point)"
    return "; ".join(p.describe() for p in plugins)


def _try_load(plugin: DiscoveredPlatform, loader: Callable[[DiscoveredPlatform], Platform]) -> str | None:
    """Load ``plugin`` through ``loader``; returns the error text (status set) on failure."""
    try:
        loader(plugin)
    except Exception as exc:  # load() of one plugin must not stop the others
        plugin.status = LOAD_ERROR
        plugin.reason = f"load() failed: {type(exc).__name__}: {exc}"
        return plugin.reason
    return None


def select_platform(
    plugins: list[DiscoveredPlatform],
    requested: str | None,
    source: str,
    loader: Callable[[DiscoveredPlatform], Platform],
) -> PlatformReport:
    """Apply the selection rules; ``loader(plugin)`` loads and stores ``plugin.platform``.

    Never raises: on failure the report's ``error`` says why (callers raise
    `PlatformSelectionError` with it).
    """
    plugins = sorted(plugins, key=sort_key)
    report = PlatformReport(requested=requested, source=source, plugins=plugins)
    if requested is not None:
        return _select_explicit(report, requested, loader)
    return _select_auto(report, loader)


def _select_explicit(report: PlatformReport, name: str,
                     loader: Callable[[DiscoveredPlatform], Platform]) -> PlatformReport:
    plugin = report.plugin(name)
    where = f"platform {name!r} was requested ({report.source})"
    if plugin is None:
        report.error = (
            f"{where} but is not installed. Installed platforms: "
            f"{_installed_list(report.plugins)}. Install the distribution that provides "
            f"{name!r}, or choose an available platform (run `backplane platforms`)."
        )
    elif plugin.status != AVAILABLE:
        report.error = (
            f"{where} but cannot be used: {plugin.status}: {plugin.reason}. Installed platforms: "
            f"{_installed_list(report.plugins)}"
        )
    else:
        failure = _try_load(plugin, loader)
        if failure:
            report.error = f"{where} but {failure}"
        else:
            report.chosen = name
            report.reason = f"requested by {report.source} ({plugin.reason})"
    if report.error:
        report.reason = report.error
    return report


def _select_auto(report: PlatformReport,
                 loader: Callable[[DiscoveredPlatform], Platform]) -> PlatformReport:
    candidates = [p for p in report.plugins if p.status == AVAILABLE]
    if candidates:
        top = candidates[0].priority
        tied = [p.display_name for p in candidates if p.priority == top]
        if len(tied) > 1:
            report.tie = tied
    load_failures = []
    for plugin in candidates:
        failure = _try_load(plugin, loader)
        if failure:
            load_failures.append(plugin.display_name)
            continue
        report.chosen = plugin.display_name
        reason = f"auto-detected: highest-priority available (priority {plugin.priority})"
        if report.tie and plugin.display_name in report.tie:
            reason += (
                f"; tie at priority {plugin.priority} between {', '.join(report.tie)} "
                "broken by name (alphabetical order)"
            )
        if load_failures:
            reason += f"; higher-priority {', '.join(load_failures)} failed to load"
        report.reason = reason
        return report
    report.error = (
        "no platform plugin is available. Installed platforms: "
        f"{_installed_list(report.plugins)}"
    )
    report.reason = report.error
    return report
