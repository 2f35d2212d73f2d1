"""The pluggy manager behind general plugins, with per-plugin error isolation.

Every hook is called implementation by implementation (not through pluggy's
all-at-once call) so that one plugin raising is recorded against that plugin,
logged, and does not stop the others, the same rule as for platform plugins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from backplane.plugins import hookspecs
from backplane.plugins_sdk.hooks import PROJECT_NAME
from backplane.plugins_sdk.version import check_sdk_compatibility

logger = logging.getLogger(__name__)

GENERAL_PLUGIN_GROUP = "backplane.plugins"


@dataclass
class GeneralPluginInfo:
    """What happened to one ``backplane.plugins`` entry point.

    ``status`` is ``loaded``, ``disabled`` (not in ``BACKPLANE_PLUGINS``),
    ``import_error``, ``incompatible`` or ``invalid``; ``errors`` collects hook
    calls that raised after loading.
    """

    name: str
    target: str
    distribution: str | None
    dist_version: str | None
    status: str
    reason: str = ""
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``backplane platforms --json``, key ``general_plugins``)."""
        return {
            "name": self.name,
            "target": self.target,
            "distribution": self.distribution,
            "version": self.dist_version,
            "status": self.status,
            "reason": self.reason,
            "hooks": self.hooks,
            "errors": self.errors,
        }


class GeneralPluginManager:
    """Loads general plugins from entry points and calls their hooks safely."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, GeneralPluginInfo] = {}

    def load_entry_points(
        self, group: str = GENERAL_PLUGIN_GROUP, allowed: Iterable[str] | None = None
    ) -> None:
        """Import and register every entry point of ``group`` (those in ``allowed`` if given)."""
        allow = set(allowed) if allowed is not None else None
        for ep in entry_points(group=group):
            if ep.name in self.plugins:
                continue
            self._load_one(ep, allow)

    def _load_one(self, ep: EntryPoint, allow: set[str] | None) -> None:
        dist = getattr(ep, "dist", None)
        info = GeneralPluginInfo(
            ep.name, ep.value, dist.name if dist else None, dist.version if dist else None,
            status="loaded",
        )
        self.plugins[ep.name] = info
        if allow is not None and ep.name not in allow:
            info.status = "disabled"
            info.reason = f"not listed in BACKPLANE_PLUGINS ({', '.join(sorted(allow)) or 'empty'})"
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take down the others
            info.status, info.reason = "import_error", f"import failed: {type(exc).__name__}: {exc}"
            logger.warning("general plugin %r failed to import: %s", ep.name, exc)
            return
        self.register(plugin, ep.name, info)

    def register(self, plugin: Any, name: str, info: GeneralPluginInfo | None = None) -> None:
        """Register a plugin object (module or instance with hookimpls) under ``name``."""
        info = info or self.plugins.setdefault(
            name, GeneralPluginInfo(name, repr(plugin), None, None, status="loaded"))
        sdk_version = getattr(plugin, "sdk_version", None)
        if sdk_version is not None:
            problem = check_sdk_compatibility(str(sdk_version))
            if problem:
                info.status, info.reason = "incompatible", f"refused: {problem}"
                logger.warning("general plugin %r refused: %s", name, problem)
                return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validates hookimpl signatures here
            info.status, info.reason = "invalid", f"{type(exc).__name__}: {exc}"
            logger.warning("general plugin %r is invalid: %s", name, exc)
            return
        info.hooks = sorted(
            caller.name for caller in self.pm.get_hookcallers(plugin) or ()
        )
        if not info.hooks:
            info.reason = "implements no backplane hook"
            logger.warning("general plugin %r implements no backplane hook", name)

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook_name``; [(plugin name, result)] of those
        that returned without raising (pluggy's order: last registered first)."""
        results = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls()[::-1]:
            args = {k: v for k, v in kwargs.items() if k in impl.argnames}
            try:
                results.append((impl.plugin_name, impl.function(**args)))
            except Exception as exc:  # recorded against the plugin, others still run
                text = f"{hook_name} raised {type(exc).__name__}: {exc}"
                info = self.plugins.get(impl.plugin_name)
                if info is not None:
                    info.errors.append(text)
                logger.warning("general plugin %r: %s", impl.plugin_name, text)
        return results

    def record_error(self, plugin_name: str, text: str) -> None:
        """Attach an error found while using a plugin's hook result."""
        info = self.plugins.get(plugin_name)
        if info is not None:
            info.errors.append(text)
        logger.warning("general plugin %r: %s", plugin_name, text)
