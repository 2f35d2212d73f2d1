"""Conformance: the descriptor as discovered, and the device runtime part."""

from __future__ import annotations

import pytest
import torch

from backplane.plugins_sdk.testing.loading import is_import_path

pytestmark = pytest.mark.backplane_conformance


def test_runtime_descriptor_is_discovered_available_and_compatible(backplane_platform_spec,
                                                                   backplane_platform):
    if is_import_path(backplane_platform_spec):
        pytest.skip("platform given as module:attribute, not through an entry point")
    from backplane.platforms import discover_platforms

    found = [p for p in discover_platforms() if p.display_name == backplane_platform_spec]
    assert len(found) == 1, f"expected one entry point named {backplane_platform_spec!r}"
    plugin = found[0]
    assert plugin.status == "available", plugin.describe()
    assert plugin.reason, "probe() must give a reason even when available"
    assert plugin.device_type == backplane_platform.device_type
    assert backplane_platform.name == plugin.name


def test_runtime_probe_is_repeatable(backplane_platform_spec):
    if is_import_path(backplane_platform_spec):
        pytest.skip("platform given as module:attribute, not through an entry point")
    from backplane.platforms import discover_platforms

    first = {p.display_name: (p.status, p.reason) for p in discover_platforms()}
    second = {p.display_name: (p.status, p.reason) for p in discover_platforms()}
    assert first[backplane_platform_spec] == second[backplane_platform_spec]


def test_runtime_reports_devices_and_memory(backplane_platform):
    runtime = backplane_platform.runtime
    count = runtime.device_count()
    assert isinstance(count, int) and count >= 1
    assert isinstance(runtime.device_name(0), str) and runtime.device_name(0)
    total, free = runtime.total_memory(0), runtime.available_memory(0)
    assert isinstance(total, int) and total > 0
    assert isinstance(free, int) and 0 < free <= total


def test_runtime_tensors_land_on_its_device(backplane_platform, backplane_device):
    x = torch.ones(4, device=backplane_device) * 2
    backplane_platform.runtime.synchronize()
    backplane_platform.runtime.empty_cache()
    assert x.device.type == backplane_platform.device_type
    assert float(x.sum().cpu()) == 8.0


def test_runtime_seeding_is_reproducible(backplane_platform, backplane_device):
    runtime = backplane_platform.runtime
    runtime.seed_everything(1234)
    a = torch.randn(8, device=backplane_device).cpu()
    runtime.seed_everything(1234)
    b = torch.randn(8, device=backplane_device).cpu()
    assert torch.equal(a, b)


def test_runtime_dtypes_are_consistent(backplane_platform):
    runtime = backplane_platform.runtime
    assert runtime.supported_dtypes, "supported_dtypes must not be empty"
    assert all(isinstance(d, torch.dtype) for d in runtime.supported_dtypes)
    assert runtime.default_dtype() in runtime.supported_dtypes
    assert isinstance(runtime.pin_memory_available(), bool)


def test_runtime_platform_declares_backends_and_names(backplane_platform):
    assert isinstance(backplane_platform.dist_backend, str) and backplane_platform.dist_backend
    assert backplane_platform.compile_backend is None or isinstance(
        backplane_platform.compile_backend, str)
    backends = backplane_platform.all_attention_backends()
    assert backends, "a platform must offer at least one attention backend"
    names = [b.name for b in backends]
    assert len(set(names)) == len(names), f"duplicate attention backend names: {names}"
    own = list(backplane_platform.attention_backends())
    assert backends[: len(own)] == own, (
        "all_attention_backends() must list the platform's own attention_backends() first, "
        f"unchanged: own {[b.name for b in own]}, all {names}")
