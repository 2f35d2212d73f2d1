"""`backplane collect-env`: what a bug report needs, in one paste.

Versions (Backplane, Python, torch, transformers, tokenizers, every
distribution that declares a Backplane plugin), every platform plugin with its
probe result and reason and the one that would be chosen, CPU facts (model,
cores, affinity, memory), accelerator facts of the chosen platform, and the
environment variables that change Backplane's behaviour. ``--json`` prints the
same as one JSON object. Each probe is guarded: a failure is reported as text,
never raised, so the command works on a broken install too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import sys
from importlib import metadata
from typing import Any

PLUGIN_GROUPS = ("backplane.platforms", "backplane.plugins")
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "triton", "numpy",
             "fastapi", "pydantic")
ENV_PREFIXES = ("BACKPLANE_", "OMP_", "MKL_", "KMP_", "CUDA_", "HIP_", "ROCR_", "NCCL_",
                "TORCH_", "PYTORCH_", "XLA_", "TPU_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
# Values of these may be secrets; report that they are set, not what they are.
_SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``collect-env`` subcommand."""
    parser = subparsers.add_parser(
        "collect-env", help="print versions, platforms and hardware facts for a bug report",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--device", default=None, metavar="NAME",
        help="explain the platform choice for this name (default: BACKPLANE_PLATFORM or auto)",
    )
    parser.set_defaults(func=run)


def _guard(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a report must survive any failure
        return {"error": f"{type(exc).__name__}: {exc}"}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Backplane, Python and library versions (None when not installed)."""
    from backplane.version import __version__

    out: dict[str, Any] = {
        "backplane": __version__,
        "backplane_distribution": _dist_version("backplane-llm"),
        "python": sys.version.split()[0],
        "python_implementation": pyplatform.python_implementation(),
        "os": pyplatform.platform(),
    }
    for lib in LIBRARIES:
        out[lib] = _dist_version(lib)
    try:
        import torch

        out["torch_cuda_build"] = torch.version.cuda
        out["torch_hip_build"] = getattr(torch.version, "hip", None)
    except Exception as exc:  # noqa: BLE001
        out["torch_import_error"] = str(exc)
    return out


def plugin_distributions() -> list[dict[str, Any]]:
    """Every installed entry point of Backplane's plugin groups, with its distribution."""
    out = []
    for group in PLUGIN_GROUPS:
        for ep in metadata.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            out.append({
                "group": group, "name": ep.name, "target": ep.value,
                "distribution": dist.metadata["Name"] if dist else None,
                "version": dist.version if dist else None,
            })
    return out


def platforms(device: str | None) -> dict[str, Any]:
    """Every platform plugin's probe result and reason, and the choice.

    Uses the platform registry's report; falls back to probing entry points
    directly if that machinery itself fails, so the report still says something.
    """
    try:
        from backplane.platforms import explain_selection

        return explain_selection(device, load_all=True).to_dict()
    except Exception as exc:  # noqa: BLE001
        plugins = []
        for ep in metadata.entry_points(group="backplane.platforms"):
            entry: dict[str, Any] = {"entry_point": ep.name, "target": ep.value}
            try:
                probe = ep.load().probe()
                entry.update(available=probe.available, reason=probe.reason)
            except Exception as err:  # noqa: BLE001
                entry.update(available=False, reason=f"{type(err).__name__}: {err}")
            plugins.append(entry)
        return {"error": f"platform report failed: {exc}", "plugins": plugins, "chosen": None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or pyplatform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "neon", "asimd")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu() -> dict[str, Any]:
    """CPU model, logical cores, affinity, NUMA nodes, memory and torch threading."""
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    mem = _meminfo()
    out: dict[str, Any] = {
        "model": _cpu_model(),
        "architecture": pyplatform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else None,
        "affinity": _ranges(affinity) if affinity is not None else None,
        "isa_flags": _cpu_flags(),
        "numa_nodes": _numa_nodes(),
        "memory_total_bytes": mem.get("MemTotal"),
        "memory_available_bytes": mem.get("MemAvailable"),
    }
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_parallel_info"] = torch.__config__.parallel_info().splitlines()[:6]
    except Exception as exc:  # noqa: BLE001
        out["torch_threads"] = f"unknown ({exc})"
    return out


def _numa_nodes() -> int | None:
    try:
        return len([d for d in os.listdir("/sys/devices/system/node") if d.startswith("node")])
    except OSError:
        return None


def _ranges(cores: list[int]) -> str:
    """[0,1,2,5] -> "0-2,5"."""
    parts, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(parts)


def accelerators(report: dict[str, Any]) -> dict[str, Any] | None:
    """Device facts from the chosen platform's runtime (None when none was chosen)."""
    chosen = report.get("chosen")
    if not chosen:
        return None
    from backplane.platforms import resolve_platform

    platform = resolve_platform(chosen)
    runtime = platform.runtime
    devices = []
    for index in range(runtime.device_count()):
        devices.append({
            "index": index,
            "name": _guard(runtime.device_name, index),
            "total_memory_bytes": _guard(runtime.total_memory, index),
            "available_memory_bytes": _guard(runtime.available_memory, index),
        })
    return {
        "platform": platform.name,
        "device_type": platform.device_type,
        "dist_backend": platform.dist_backend,
        "compile_backend": platform.compile_backend,
        "supports_graph_capture": platform.supports_graph_capture,
        "attention_backends": [b.name for b in platform.all_attention_backends()],
        "supported_dtypes": [str(d).removeprefix("torch.") for d in runtime.supported_dtypes],
        "devices": devices,
    }


def environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables that affect Backplane or its libraries; secret-looking values are masked."""
    environ = dict(os.environ if environ is None else environ)
    out = {}
    for key in sorted(environ):
        if key.startswith(ENV_PREFIXES) or key in ("LD_PRELOAD", "PYTHONHASHSEED"):
            secret = any(m in key for m in _SECRET_MARKERS)
            out[key] = "<set>" if secret else environ[key]
    return out


def collect(device: str | None = None) -> dict[str, Any]:
    """The whole report as a JSON-ready dict."""
    report = _guard(platforms, device)
    return {
        "versions": _guard(versions),
        "plugin_distributions": _guard(plugin_distributions),
        "platforms": report,
        "cpu": _guard(cpu),
        "accelerator": _guard(accelerators, report) if isinstance(report, dict) else None,
        "environment": _guard(environment),
    }


def format_text(data: dict[str, Any]) -> str:
    """Human-readable rendering of `collect`'s result."""
    lines: list[str] = []

    def section(title: str, mapping: Any) -> None:
        lines.append(f"== {title} ==")
        if isinstance(mapping, dict):
            for key, value in mapping.items():
                lines.append(f"{key}: {value}")
        elif isinstance(mapping, list):
            lines.extend([f"- {item}" for item in mapping] or ["(none)"])
        else:
            lines.append(str(mapping))
        lines.append("")

    section("Versions", data["versions"])
    section("Plugin distributions", [
        f"{p['group']}: {p['name']} -> {p['target']} ({p['distribution']} {p['version']})"
        for p in data["plugin_distributions"]
    ] if isinstance(data["plugin_distributions"], list) else data["plugin_distributions"])
    plat = data["platforms"]
    lines.append("== Platforms ==")
    for plugin in plat.get("plugins", []):
        name = plugin.get("name") or plugin.get("entry_point")
        status = plugin.get("status", "available" if plugin.get("available") else "unavailable")
        lines.append(f"{name}: {status} - {plugin.get('reason', '')}")
    lines.append(f"chosen: {plat.get('chosen')} ({plat.get('reason') or plat.get('error') or ''})")
    lines.append("")
    section("CPU", data["cpu"])
    section("Accelerator", data["accelerator"])
    section("Environment", data["environment"] or "(no relevant variables set)")
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace) -> int:
    data = collect(args.device)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        sys.stdout.write(format_text(data))
    return 0
