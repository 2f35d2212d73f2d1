"""Turning the ``--backplane-platform`` value into a Platform.

The value is either an installed platform's name (``acme``), resolved through
Backplane's real discovery so that the entry point, descriptor and probe are
exercised too, or ``package.module:attribute`` naming a descriptor, a Platform,
or a zero-argument callable returning a Platform (for a platform under
development that is not installed yet).
"""

from __future__ import annotations

import importlib
from typing import Any

from backplane.plugins_sdk.platform import Platform


def is_import_path(spec: str) -> bool:
    """``module:attribute`` rather than a platform name."""
    return ":" in spec


def load_platform(spec: str) -> Platform:
    """The Platform under test for ``spec`` (a name or ``module:attribute``)."""
    if not is_import_path(spec):
        from backplane.platforms import resolve_platform

        return resolve_platform(spec)
    module_name, _, attr = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if hasattr(target, "load") and hasattr(target, "probe"):
        target = target.load()
    elif callable(target) and not isinstance(target, Platform):
        target = target()
    if not isinstance(target, Platform):
        raise TypeError(f"{spec} gave {target!r}, expected a backplane.plugins_sdk.Platform")
    return target
