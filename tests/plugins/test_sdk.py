"""Plugin SDK: version compatibility, deprecation helpers, lazy imports, platform parts."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from backplane.plugins_sdk import (
    SDK_VERSION,
    AttentionSpec,
    Platform,
    ReferenceAttentionBackend,
    SdkVersion,
    check_sdk_compatibility,
)
from backplane.plugins_sdk import deprecation as dep
from backplane.plugins_sdk.testing import PagedAttentionHarness, tolerance


@pytest.fixture
def isolated_deprecations(monkeypatch):
    monkeypatch.setattr(dep, "DEPRECATIONS", list(dep.DEPRECATIONS))
    return dep


@pytest.mark.parametrize(("plugin", "current", "problem"), [
    ("1.0", "1.1", None),
    ("1.1", "1.1", None),
    ("1.1.7", "1.1", None),
    ("1.2", "1.1", "written for plugin SDK 1.2 (needs >=1.2,<2); this Backplane provides SDK "
                   "1.1: upgrade backplane-llm"),
    ("2.0", "1.1", "written for plugin SDK 2.0 (needs >=2.0,<3); this Backplane provides SDK "
                   "1.1: upgrade backplane-llm"),
    ("0.9", "1.1", "written for plugin SDK 0.9 (needs >=0.9,<1); this Backplane provides SDK "
                   "1.1: install a release of the plugin written for SDK 1.x"),
    ("one", "1.1", "sdk_version 'one' is not of the form MAJOR.MINOR (for example '1.1')"),
])
def test_sdk_compatibility_rule(plugin, current, problem):
    assert check_sdk_compatibility(plugin, current) == problem


def test_sdk_version_parses():
    assert SdkVersion.parse(SDK_VERSION) >= SdkVersion(1, 0)
    assert str(SdkVersion.parse("3.14.1")) == "3.14"


def test_deprecated_function_warns_with_replacement_and_removal(isolated_deprecations):
    @dep.deprecated(since="1.1", replacement="new_helper()")
    def old_helper(x):
        return x * 2

    with pytest.warns(DeprecationWarning) as record:
        assert old_helper(21) == 42
    message = str(record[0].message)
    assert message == (
        "test_deprecated_function_warns_with_replacement_and_removal.<locals>.old_helper is "
        "deprecated since plugin SDK 1.1 and will be removed in SDK 1.2; use new_helper() instead")
    assert record[0].filename == __file__  # points at the caller, not the helper


def test_deprecated_class_warns_on_use_and_subclassing(isolated_deprecations):
    @dep.deprecated(since="1.1", replacement="NewRuntime", removed_in="1.3", name="OldRuntime")
    class OldRuntime:
        def __init__(self, value):
            self.value = value

    with pytest.warns(DeprecationWarning, match="OldRuntime is deprecated since plugin SDK 1.1 "
                                                "and will be removed in SDK 1.3; use NewRuntime"):
        assert OldRuntime(3).value == 3
    with pytest.warns(DeprecationWarning, match="OldRuntime is deprecated"):
        class Sub(OldRuntime):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sub(4).value == 4  # warned once, at class creation


def test_deprecated_module_alias(isolated_deprecations):
    getattr_ = dep.module_getattr("fake.module", {
        "OldName": dep.deprecated_alias("OldName", Platform, since="1.1", replacement="Platform"),
    })
    with pytest.warns(DeprecationWarning, match="OldName is deprecated .* use Platform instead"):
        assert getattr_("OldName") is Platform
    with pytest.raises(AttributeError, match="module 'fake.module' has no attribute 'Other'"):
        getattr_("Other")


def test_deprecation_overdue_check(isolated_deprecations):
    entry = dep.Deprecation("x", since="1.0", removed_in="1.1", replacement=None)
    assert entry.is_overdue("1.1") and not entry.is_overdue("1.0")


def test_no_sdk_deprecation_outlives_its_removal_version():
    # The promise in docs/plugins.md: a deprecated member is gone by its removal version.
    overdue = [d.name for d in dep.DEPRECATIONS if d.is_overdue()]
    assert not overdue, f"remove these deprecated SDK members (SDK {SDK_VERSION}): {overdue}"


def test_descriptor_imports_do_not_pull_torch():
    code = ("import sys; from backplane.plugins_sdk.descriptor import PlatformDescriptor; "
            "import backplane.platforms.cpu; import backplane.plugins_sdk.testing.plugin; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _NoBackendPlatform(Platform):
    name = "bare"


class _OwnBackendPlatform(Platform):
    name = "own"

    def attention_backends(self):
        return [ReferenceAttentionBackend]


class _PluginBackend(ReferenceAttentionBackend):
    name = "from_plugin"


def test_registered_backends_follow_the_platform_own():
    from backplane.platforms.cpu.runtime import CpuRuntime

    own = _OwnBackendPlatform(CpuRuntime())
    own.register_attention_backend(_PluginBackend)
    own.register_attention_backend(_PluginBackend)  # idempotent
    assert own.attention_backends() == [ReferenceAttentionBackend]  # the subclass's own, as is
    assert own.registered_attention_backends() == [_PluginBackend]
    assert own.all_attention_backends() == [ReferenceAttentionBackend, _PluginBackend]
    spec = AttentionSpec(4, 2, 32, torch.float32, 16)
    assert own.select_attention_backend(spec, forced="from_plugin") is _PluginBackend
    bare = _NoBackendPlatform(CpuRuntime())
    assert bare.attention_backends() == bare.all_attention_backends() == []
    bare.register_attention_backend(_PluginBackend)
    assert bare.attention_backends() == []
    assert bare.all_attention_backends() == [_PluginBackend]
    assert bare.select_attention_backend(spec) is _PluginBackend
    other = _OwnBackendPlatform(CpuRuntime())
    assert other.all_attention_backends() == [ReferenceAttentionBackend]  # per instance


class _SameNameBackend(ReferenceAttentionBackend):
    name = "reference"  # the name _OwnBackendPlatform already offers


def test_platform_own_backend_wins_a_name_clash():
    from backplane.platforms.cpu.runtime import CpuRuntime

    platform = _OwnBackendPlatform(CpuRuntime())
    platform.register_attention_backend(_SameNameBackend)
    assert platform.all_attention_backends() == [ReferenceAttentionBackend]
    spec = AttentionSpec(4, 2, 32, torch.float32, 16)
    assert platform.select_attention_backend(spec, forced="reference") is ReferenceAttentionBackend


def test_subclass_attention_backends_is_not_rewritten():
    # Registration is explicit (all_attention_backends); the class keeps the method it defines.
    method = vars(_OwnBackendPlatform)["attention_backends"]
    assert method.__qualname__ == "_OwnBackendPlatform.attention_backends"
    assert "attention_backends" not in vars(_NoBackendPlatform)


def test_registration_works_without_platform_init():
    class NoInit(_OwnBackendPlatform):
        def __init__(self):  # a plugin that forgot super().__init__()
            pass

    platform = NoInit()
    assert platform.all_attention_backends() == [ReferenceAttentionBackend]
    platform.register_attention_backend(_PluginBackend)
    assert platform.all_attention_backends() == [ReferenceAttentionBackend, _PluginBackend]


def test_register_attention_backend_rejects_non_backends():
    from backplane.platforms.cpu.runtime import CpuRuntime

    platform = _OwnBackendPlatform(CpuRuntime())
    with pytest.raises(TypeError, match="expects an AttentionBackend subclass, got 42"):
        platform.register_attention_backend(42)


@pytest.mark.parametrize(("heads", "kv_heads", "block_size", "requests", "padding"), [
    (4, 2, 16, ((0, 9), (20, 6), (12, 1)), 3),
    (4, 1, 8, ((17, 1), (3, 1)), 0),
])
def test_reference_backend_matches_reference_math(heads, kv_heads, block_size, requests, padding):
    spec = AttentionSpec(heads, kv_heads, 16, torch.float32, block_size)
    harness = PagedAttentionHarness(ReferenceAttentionBackend, spec, torch.device("cpu"),
                                    [c + q + 1 for c, q in requests])
    prefixes = {i: c for i, (c, _) in enumerate(requests) if c}
    steps = [(prefixes, 0)] if prefixes else []
    steps += [({i: q for i, (_, q) in enumerate(requests)}, padding),
              ({i: 1 for i in range(len(requests))}, 0)]
    for query_lens, pad in steps:
        result = harness.step(query_lens, num_padding=pad)
        assert torch.allclose(result.output, result.expected, **tolerance(torch.float32))
