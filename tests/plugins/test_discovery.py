"""Discovery and selection of platform plugins from real (throwaway) distributions."""

from __future__ import annotations

import pytest

from backplane.platforms import (
    PlatformSelectionError,
    discover_platforms,
    explain_selection,
    resolve_platform,
    selection_report,
)
from backplane.plugins_sdk import SDK_VERSION


def _plugin(name):
    return next(p for p in discover_platforms() if p.display_name == name)


def test_cpu_is_discovered_with_its_distribution(clean_plugin_env):
    cpu = _plugin("cpu")
    assert cpu.status == "available"
    assert cpu.distribution == "backplane-llm" and cpu.dist_version
    assert cpu.priority == 0 and cpu.sdk_version == SDK_VERSION


def test_fake_plugin_reports_distribution_and_descriptor(fake_site):
    fake_site.platform("alpha", priority=1010)
    alpha = _plugin("alpha")
    assert (alpha.distribution, alpha.dist_version) == ("fake-alpha", "1.2.3")
    assert (alpha.device_type, alpha.priority, alpha.status) == ("cpu", 1010, "available")
    assert alpha.reason == "alpha device found"
    assert alpha.to_dict()["target"].endswith("_alpha:descriptor")


def test_highest_priority_available_wins(fake_site):
    fake_site.platform("alpha", priority=1010)
    fake_site.platform("beta", priority=1020)
    report = explain_selection()
    assert report.chosen == "beta"
    assert report.reason == "auto-detected: highest-priority available (priority 1020)"
    also = [p.display_name for p in report.also_available]
    assert also[0] == "alpha" and also[-1] == "cpu"
    assert resolve_platform().name == "beta"
    assert ("platform beta chosen: auto-detected: highest-priority available (priority 1020)"
            in report.summary())


def test_explicit_device_overrides_priority(fake_site):
    fake_site.platform("alpha", priority=1010)
    fake_site.platform("beta", priority=1020)
    report = explain_selection("alpha")
    assert report.chosen == "alpha" and report.source == "device argument"
    assert report.reason == "requested by device argument (alpha device found)"
    assert resolve_platform("alpha").name == "alpha"
    assert resolve_platform("cpu").name == "cpu"


def test_env_var_selects_and_device_argument_beats_it(fake_site, monkeypatch):
    fake_site.platform("alpha", priority=1010)
    fake_site.platform("beta", priority=1020)
    monkeypatch.setenv("BACKPLANE_PLATFORM", "alpha")
    report = explain_selection()
    assert report.chosen == "alpha" and report.source == "BACKPLANE_PLATFORM"
    assert report.reason == "requested by BACKPLANE_PLATFORM (alpha device found)"
    assert explain_selection("beta").chosen == "beta"
    monkeypatch.setenv("BACKPLANE_PLATFORM", "auto")
    assert explain_selection().chosen == "beta"


def test_explicit_missing_platform_fails_listing_installed(fake_site):
    fake_site.platform("alpha", priority=1010)
    with pytest.raises(PlatformSelectionError) as info:
        resolve_platform("nope")
    text = str(info.value)
    assert text.startswith("platform 'nope' was requested (device argument) but is not installed.")
    assert "alpha [available: alpha device found]" in text
    assert "cpu [available: the CPU is always available]" in text
    assert info.value.report.chosen is None


def test_explicit_unavailable_platform_fails_with_probe_reason(fake_site):
    fake_site.platform("gamma", priority=1050, available=False, reason="no gamma device on bus 0")
    with pytest.raises(PlatformSelectionError,
                       match=r"platform 'gamma' was requested \(device argument\) but cannot be "
                             r"used: unavailable: no gamma device on bus 0\. Installed platforms"):
        resolve_platform("gamma")
    # Automatic selection skips it and says why.
    report = explain_selection()
    assert report.chosen != "gamma"
    assert "gamma (unavailable: no gamma device on bus 0)" in report.summary()


def test_two_available_accelerators_tie_broken_by_name(fake_site):
    fake_site.platform("acc_b", priority=1030)
    fake_site.platform("acc_a", priority=1030)
    report = explain_selection()
    assert report.chosen == "acc_a"
    assert report.tie == ["acc_a", "acc_b"]
    assert report.reason == (
        "auto-detected: highest-priority available (priority 1030); tie at priority 1030 "
        "between acc_a, acc_b broken by name (alphabetical order)")
    assert [p.display_name for p in report.also_available][0] == "acc_b"


def test_plugin_whose_import_raises_is_reported_and_skipped(fake_site):
    fake_site.platform("broken", priority=1099, import_error="driver library libbroken.so missing")
    fake_site.platform("alpha", priority=1010)
    broken = _plugin("broken")
    assert broken.status == "import_error"
    assert broken.reason == "import failed: RuntimeError: driver library libbroken.so missing"
    assert broken.distribution == "fake-broken" and broken.priority is None
    report = explain_selection()
    assert report.chosen == "alpha"
    assert "broken (import_error: import failed: RuntimeError: driver library" in report.summary()
    with pytest.raises(PlatformSelectionError, match="cannot be used: import_error: import failed"):
        resolve_platform("broken")


def test_plugin_whose_probe_raises_is_reported_and_skipped(fake_site):
    baseline = explain_selection().chosen  # what this machine picks without the fakes
    fake_site.platform("flaky", priority=1099, probe_error="ioctl failed")
    report = explain_selection()
    flaky = report.plugin("flaky")
    assert flaky.status == "probe_error" and flaky.reason == "probe() raised ValueError: ioctl failed"
    assert report.chosen == baseline
    with pytest.raises(PlatformSelectionError, match="probe_error: probe\\(\\) raised ValueError"):
        resolve_platform("flaky")


def test_incompatible_sdk_major_is_refused_with_needed_versions(fake_site):
    baseline = explain_selection().chosen
    fake_site.platform("future", priority=1099, sdk_version="2.0")
    future = _plugin("future")
    assert future.status == "incompatible"
    assert future.reason == (
        f"refused: written for plugin SDK 2.0 (needs >=2.0,<3); this Backplane provides SDK "
        f"{SDK_VERSION}: upgrade backplane-llm")
    assert explain_selection().chosen == baseline
    with pytest.raises(PlatformSelectionError, match="incompatible: refused: written for plugin SDK 2.0"):
        resolve_platform("future")


def test_newer_minor_and_old_major_are_refused(fake_site):
    fake_site.platform("newer", sdk_version="1.99")
    fake_site.platform("ancient", sdk_version="0.3")
    assert _plugin("newer").status == "incompatible"
    assert "needs >=1.99,<2" in _plugin("newer").reason
    ancient = _plugin("ancient")
    assert ancient.status == "incompatible"
    assert "install a release of the plugin written for SDK 1.x" in ancient.reason


def test_plugin_whose_load_raises_falls_back_when_automatic(fake_site):
    fake_site.platform("heavy", priority=1099, load_error="firmware not loaded")
    fake_site.platform("alpha", priority=1010)
    report = explain_selection()
    assert report.chosen == "alpha"
    assert report.reason.endswith("; higher-priority heavy failed to load")
    heavy = report.plugin("heavy")
    assert heavy.status == "load_error"
    assert heavy.reason == "load() failed: OSError: firmware not loaded"
    with pytest.raises(PlatformSelectionError,
                       match=r"'heavy' was requested \(device argument\) but load\(\) failed: "
                             r"OSError: firmware not loaded"):
        resolve_platform("heavy")


def test_same_platform_name_from_two_distributions_is_a_conflict(fake_site):
    baseline = explain_selection().chosen
    source = fake_site.platform("dup", priority=1040)
    fake_site.dist("other-dup", "0.9", {}, {"backplane.platforms": {"dup": f"{source}:descriptor"}})
    dups = [p for p in discover_platforms() if p.display_name == "dup"]
    assert len(dups) == 2 and {p.status for p in dups} == {"conflict"}
    assert "provided by 2 distributions" in dups[0].reason
    assert explain_selection().chosen == baseline


def test_malformed_descriptors_are_invalid(fake_site):
    fake_site.dist("bad-plugins", "0.1", {f"{fake_site.prefix}_bad": (
        "descriptor = object()\n"
        "from backplane.plugins_sdk.descriptor import PlatformDescriptor, ProbeResult\n"
        "renamed = PlatformDescriptor(name='other', device_type='cpu', priority=1,\n"
        "    sdk_version='1.0', probe=lambda: ProbeResult(True, 'ok'), load=lambda: None)\n"
        "weird_probe = PlatformDescriptor(name='weird', device_type='cpu', priority=1,\n"
        "    sdk_version='1.0', probe=lambda: True, load=lambda: None)\n"
        "not_platform = PlatformDescriptor(name='notplat', device_type='cpu', priority=1,\n"
        "    sdk_version='1.0', probe=lambda: ProbeResult(True, 'ok'), load=lambda: 42)\n"
    )}, {"backplane.platforms": {
        "bad": f"{fake_site.prefix}_bad:descriptor",
        "renamed": f"{fake_site.prefix}_bad:renamed",
        "weird": f"{fake_site.prefix}_bad:weird_probe",
        "notplat": f"{fake_site.prefix}_bad:not_platform",
    }})
    assert _plugin("bad").status == "invalid"
    assert "missing name, device_type, priority, sdk_version, probe, load" in _plugin("bad").reason
    renamed = next(p for p in discover_platforms() if p.entry_point == "renamed")
    assert renamed.status == "invalid" and "differs from its entry point name" in renamed.reason
    weird = _plugin("weird")
    assert weird.status == "probe_error" and "expected ProbeResult" in weird.reason
    with pytest.raises(PlatformSelectionError, match="expected a backplane.plugins_sdk.Platform"):
        resolve_platform("notplat")


def test_resolution_is_cached_per_process_and_shared_between_requests(fake_site):
    fake_site.platform("alpha", priority=1010)
    first = resolve_platform()
    assert resolve_platform() is first
    assert resolve_platform("alpha") is first  # same platform, same instance
    assert resolve_platform("auto") is first
    assert selection_report().chosen == "alpha"
    import backplane.platforms as platforms

    assert platforms.current_platform is first


def test_cached_report_names_the_source_of_each_request(fake_site, monkeypatch):
    fake_site.platform("alpha", priority=1010)
    monkeypatch.setenv("BACKPLANE_PLATFORM", "alpha")
    env_platform = resolve_platform()
    assert selection_report().source == "BACKPLANE_PLATFORM"
    assert selection_report().reason == "requested by BACKPLANE_PLATFORM (alpha device found)"
    # The same platform asked for by the device argument: same instance, its own report.
    assert resolve_platform("alpha") is env_platform
    assert selection_report("alpha").reason == "requested by device argument (alpha device found)"
    assert selection_report().source == "BACKPLANE_PLATFORM"
    monkeypatch.delenv("BACKPLANE_PLATFORM")
    assert selection_report() is None  # automatic selection was not made yet
    assert resolve_platform() is env_platform
    assert selection_report().reason.startswith("auto-detected: ")


def test_no_platform_available_is_an_error(fake_site, monkeypatch):
    from backplane.platforms import selection

    def nothing(plugins, requested, source, loader):
        for plugin in plugins:
            plugin.status, plugin.reason = "unavailable", "disabled for the test"
        return original(plugins, requested, source, loader)

    original = selection.select_platform
    monkeypatch.setattr("backplane.platforms.select_platform", nothing)
    with pytest.raises(PlatformSelectionError, match="no platform plugin is available"):
        resolve_platform()
