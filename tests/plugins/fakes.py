"""Throwaway plugin distributions for discovery tests.

`install_fake_dist` writes a real ``<name>-<version>.dist-info`` (METADATA and
entry_points.txt) plus the plugin's modules into a directory; putting that
directory on sys.path (in-process with monkeypatch, or PYTHONPATH for a
subprocess) makes importlib.metadata, and so Backplane, discover it exactly
like a pip-installed plugin.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

# A platform descriptor module; the Platform itself is built only in load().
PLATFORM_MODULE = '''
from backplane.plugins_sdk.descriptor import PlatformDescriptor, ProbeResult

{prelude}


def _make_platform():
    from backplane.plugins_sdk import DeviceRuntime, Platform, ReferenceAttentionBackend

    class Runtime(DeviceRuntime):
        device_type = "cpu"

        def device_count(self):
            return 1

        def device_name(self, index=0):
            return "{name} simulated device"

        def total_memory(self, index=0):
            return 1 << 30

        def available_memory(self, index=0):
            return 1 << 30

    class Backend(ReferenceAttentionBackend):
        name = "{name}_attention"

    class FakePlatform(Platform):
        name = "{name}"

        def __init__(self):
            super().__init__(Runtime())

        def attention_backends(self):
            return [Backend]

    return FakePlatform()


def _probe():
{probe_body}


def _load():
{load_body}


descriptor = PlatformDescriptor(
    name="{name}", device_type="cpu", priority={priority}, sdk_version="{sdk_version}",
    probe=_probe, load=_load,
)
'''


def platform_module(
    name: str,
    priority: int = 10,
    available: bool = True,
    reason: str | None = None,
    sdk_version: str | None = None,
    import_error: str | None = None,
    probe_error: str | None = None,
    load_error: str | None = None,
) -> str:
    """Source of a fake platform descriptor module with the given behaviour."""
    from backplane.plugins_sdk.version import SDK_VERSION

    reason = reason or (f"{name} device found" if available else f"no {name} device")
    prelude = f"raise RuntimeError({import_error!r})" if import_error else ""
    probe_body = (
        f"raise ValueError({probe_error!r})" if probe_error
        else f"return ProbeResult({available!r}, {reason!r})"
    )
    load_body = f"raise OSError({load_error!r})" if load_error else "return _make_platform()"
    return PLATFORM_MODULE.format(
        name=name, priority=priority, sdk_version=sdk_version or SDK_VERSION, prelude=prelude,
        probe_body=textwrap.indent(probe_body, "    "),
        load_body=textwrap.indent(load_body, "    "),
    )


def install_fake_dist(
    site: Path,
    dist_name: str,
    version: str,
    modules: dict[str, str],
    entry_points: dict[str, dict[str, str]],
) -> Path:
    """Write modules and a dist-info for ``dist_name`` into ``site``; returns ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    dist_info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in entries.items())
        lines.append("")
    (dist_info / "entry_points.txt").write_text("\n".join(lines))
    return site


def install_fake_platform(site: Path, name: str, module_prefix: str, **behaviour) -> str:
    """One distribution ``fake-<name>`` 1.2.3 providing platform ``name``; returns its module."""
    module = f"{module_prefix}_{name}"
    install_fake_dist(
        site, f"fake-{name}", "1.2.3", {module: platform_module(name, **behaviour)},
        {"backplane.platforms": {name: f"{module}:descriptor"}},
    )
    return module
