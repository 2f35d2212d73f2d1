"""General plugins: model architectures, extra attention backends, logits processors.

Distributions declare an entry point in the group ``backplane.plugins`` naming a
module (or object) with `backplane.plugins_sdk.hookimpl` functions for the hooks
in `backplane.plugins.hookspecs`. `load_general_plugins()` loads them with
pluggy once per process (the engine calls it at start-up, in the main process
and in every worker) and runs ``register_models``; ``register_attention_backends``
runs when a platform is loaded (`backplane.platforms`), and the engine asks
`get_logits_processors()` for the processors.

``BACKPLANE_PLUGINS=a,b`` loads only the named entry points (empty: none);
unset loads all. A plugin that fails to import, is written for an incompatible
SDK (optional module attribute ``sdk_version``), or raises in a hook is logged
and recorded (`general_plugin_report()`), never fatal to the others.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from backplane.plugins.manager import GENERAL_PLUGIN_GROUP, GeneralPluginInfo, GeneralPluginManager

if TYPE_CHECKING:
    from backplane.plugins_sdk.platform import Platform

logger = logging.getLogger(__name__)

ENV_ALLOWLIST = "BACKPLANE_PLUGINS"

__all__ = [
    "ENV_ALLOWLIST",
    "GENERAL_PLUGIN_GROUP",
    "GeneralPluginInfo",
    "GeneralPluginManager",
    "ModelRegistrar",
    "general_plugin_report",
    "get_logits_processors",
    "get_plugin_manager",
    "load_general_plugins",
    "register_platform_attention_backends",
]

_lock = threading.RLock()
_manager: GeneralPluginManager | None = None
_loaded = False


class ModelRegistrar:
    """What the ``register_models`` hook receives: a narrow view of the model registry.

    Plugins call `register_model`; they never import core modules directly, so
    the registry can move without breaking them.
    """

    def __init__(self, plugin_name: str | None = None) -> None:
        self.plugin_name = plugin_name

    def register_model(self, architecture: str, model_cls: Any) -> None:
        """Serve checkpoints whose config.json ``architectures`` has ``architecture``
        with ``model_cls`` (a class, or a lazy ``"package.module:Class"`` string)."""
        from backplane.core.models.registry import register_model

        register_model(architecture, model_cls)
        logger.info("model architecture %s registered by general plugin %s", architecture,
                    self.plugin_name or "?")

    def supported_architectures(self) -> list[str]:
        """Architectures registered so far (built-in and from plugins)."""
        from backplane.core.models.registry import supported_architectures

        return supported_architectures()


def get_plugin_manager() -> GeneralPluginManager:
    """The process-wide manager (created empty; `load_general_plugins` fills it)."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = GeneralPluginManager()
        return _manager


def _allowlist() -> list[str] | None:
    value = os.environ.get(ENV_ALLOWLIST)
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def load_general_plugins() -> GeneralPluginManager:
    """Load every ``backplane.plugins`` entry point and register their models.

    Idempotent: the work happens once per process; later calls return the same
    manager. Safe to call from worker processes (each loads its own).
    """
    global _loaded
    with _lock:
        manager = get_plugin_manager()
        if _loaded:
            return manager
        _loaded = True
        manager.load_entry_points(GENERAL_PLUGIN_GROUP, _allowlist())
        _register_models(manager)
        loaded = [p.name for p in manager.plugins.values() if p.status == "loaded"]
        if loaded:
            logger.info("general plugins loaded: %s", ", ".join(loaded))
        return manager


def _register_models(manager: GeneralPluginManager) -> None:
    for impl in manager.pm.hook.register_models.get_hookimpls()[::-1]:
        registrar = ModelRegistrar(impl.plugin_name)
        try:
            impl.function(**({"registry": registrar} if "registry" in impl.argnames else {}))
        except Exception as exc:  # recorded against the plugin; others still register
            manager.record_error(impl.plugin_name,
                                 f"register_models raised {type(exc).__name__}: {exc}")


def register_platform_attention_backends(platform: Platform, platform_name: str) -> None:
    """Register on ``platform`` the backends general plugins offer for ``platform_name``.

    They then follow the platform's own in ``platform.all_attention_backends()``.
    """
    manager = load_general_plugins()
    for plugin_name, backends in manager.call_each(
        "register_attention_backends", platform_name=platform_name
    ):
        for backend in backends or ():
            try:
                platform.register_attention_backend(backend)
            except (TypeError, ValueError) as exc:
                manager.record_error(plugin_name, f"register_attention_backends: {exc}")
            else:
                logger.info("attention backend %s added to platform %s by general plugin %s",
                            backend.name, platform_name, plugin_name)


def get_logits_processors() -> list[Any]:
    """Every logits processor general plugins register, in hook call order."""
    manager = load_general_plugins()
    processors: list[Any] = []
    for plugin_name, result in manager.call_each("register_logits_processors"):
        for processor in result or ():
            if callable(processor):
                processors.append(processor)
            else:
                manager.record_error(
                    plugin_name, f"register_logits_processors returned {processor!r}, "
                    "which is not callable (expected processor(logits, output_token_ids))")
    return processors


def general_plugin_report() -> list[GeneralPluginInfo]:
    """What happened to every general plugin (after `load_general_plugins`)."""
    return list(load_general_plugins().plugins.values())


def reset_general_plugins() -> None:
    """Forget loaded general plugins (for tests that install plugins on the fly).

    Models already registered stay registered (the model registry is append-only).
    """
    global _manager, _loaded
    with _lock:
        _manager, _loaded = None, False
