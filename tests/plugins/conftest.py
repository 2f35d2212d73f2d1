"""Fixtures for plugin tests: a private site directory on sys.path and clean caches."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from backplane.platforms import reset_platform_cache
from backplane.plugins import reset_general_plugins

_counter = itertools.count()


class FakeSite:
    """A directory on sys.path where tests install throwaway plugin distributions."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix  # unique module-name prefix: no clash in sys.modules

    def platform(self, name: str, **behaviour) -> str:
        from tests.plugins.fakes import install_fake_platform

        return install_fake_platform(self.path, name, self.prefix, **behaviour)

    def dist(self, dist_name: str, version: str, modules: dict[str, str],
             entry_points: dict[str, dict[str, str]]) -> None:
        from tests.plugins.fakes import install_fake_dist

        install_fake_dist(self.path, dist_name, version, modules, entry_points)


@pytest.fixture
def clean_plugin_env(monkeypatch):
    """No platform request, no simulated Acme device, no general-plugin allow-list."""
    for var in ("BACKPLANE_PLATFORM", "ACME_VISIBLE_DEVICES", "BACKPLANE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_platform_cache()
    reset_general_plugins()
    yield monkeypatch
    reset_platform_cache()
    reset_general_plugins()


@pytest.fixture
def fake_site(tmp_path, clean_plugin_env) -> FakeSite:
    """A fresh site directory prepended to sys.path (removed, with its modules, after)."""
    site = FakeSite(tmp_path / "site", f"bpfake{next(_counter)}")
    site.path.mkdir()
    clean_plugin_env.syspath_prepend(str(site.path))
    yield site
    for name in [m for m in sys.modules if m.startswith(site.prefix)]:
        del sys.modules[name]
