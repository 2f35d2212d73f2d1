"""Fixtures shared by the platform tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def acme(monkeypatch):
    """The plugin template's acme platform selected (it records graphs on the CPU);
    yields the monkeypatch, for tests that change the platform's classes."""
    from backplane.platforms import reset_platform_cache

    monkeypatch.delenv("BACKPLANE_PLATFORM", raising=False)
    monkeypatch.setenv("ACME_VISIBLE_DEVICES", "0")
    reset_platform_cache()
    yield monkeypatch
    reset_platform_cache()
