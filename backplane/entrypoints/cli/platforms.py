"""`backplane platforms`: every discovered platform plugin and which one would be chosen.

Prints, per plugin: name, status (available, unavailable, import_error, ...),
priority, the SDK version it was written for, its distribution and version, the
probe's reason, and the attention backends of each available (loaded) plugin;
then the choice and why, and the general plugins. ``--json`` prints the same as
one JSON object (`PlatformReport.to_dict()` plus ``general_plugins``).
Exit status: 0 when a platform would be chosen, 1 when none can be.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``platforms`` subcommand."""
    parser = subparsers.add_parser(
        "platforms",
        help="list platform plugins, their probe results, and which one would be chosen",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "--device", default=None, metavar="NAME",
        help="explain the choice for this explicit platform (default: BACKPLANE_PLATFORM or auto)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def _general_plugins() -> list[dict[str, Any]]:
    from backplane.plugins import general_plugin_report

    return [info.to_dict() for info in general_plugin_report()]


def collect(device: str | None) -> dict[str, Any]:
    """The report as a JSON-ready dict (also what ``--json`` prints)."""
    from backplane.platforms import explain_selection

    report = explain_selection(device, load_all=True)
    data = report.to_dict()
    data["general_plugins"] = _general_plugins()
    return data


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_text(data: dict[str, Any]) -> str:
    """Human-readable rendering of `collect`'s result."""
    lines = [f"Backplane plugin SDK {data['sdk_version']}", ""]
    rows = [["PLATFORM", "STATUS", "PRIORITY", "SDK", "DISTRIBUTION", "REASON"]]
    for p in data["plugins"]:
        marker = "*" if p["name"] == data["chosen"] else " "
        dist = " ".join(x for x in (p["distribution"], p["version"]) if x) or "?"
        rows.append([
            f"{marker}{p['name']}", p["status"],
            "" if p["priority"] is None else str(p["priority"]),
            p["sdk_version"] or "?", dist, p["reason"],
        ])
    if data["plugins"]:
        lines.append(_table(rows))
    else:
        lines.append("no platform plugins installed (entry point group 'backplane.platforms')")
    backends = [p for p in data["plugins"] if p["attention_backends"] is not None]
    if backends:
        lines.append("")
        lines.append("Attention backends (best first):")
        for p in backends:
            lines.append(f"  {p['name']}: {', '.join(p['attention_backends']) or '(none)'}")
    lines.append("")
    if data["chosen"]:
        lines.append(f"Chosen: {data['chosen']} ({data['reason']})")
    else:
        lines.append(f"No platform can be chosen: {data['error']}")
    general = data.get("general_plugins") or []
    lines.append("")
    if general:
        lines.append("General plugins:")
        for g in general:
            hooks = ", ".join(g["hooks"]) or "no hooks"
            detail = g["reason"] or hooks
            lines.append(f"  {g['name']} [{g['status']}] {detail}")
            lines.extend(f"    error: {e}" for e in g["errors"])
    else:
        lines.append("General plugins: none installed (entry point group 'backplane.plugins')")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report; 1 when no platform can be chosen."""
    data = collect(args.device)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_text(data))
    return 0 if data["chosen"] else 1
