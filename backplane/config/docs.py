"""The option tables of the docs, generated from the option declarations.

docs/configuration.md (engine options, from `EngineArgs`) and docs/serving.md
(server options, from `ServerOptions`) hold generated tables between marker
comments. ``python -m backplane.config.docs`` rewrites them; a test fails when
a declaration changed and the docs were not regenerated, so the docs cannot
drift from the code.
"""

from __future__ import annotations

import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"


def _shown(value: Any) -> str:
    """A default as the docs show it."""
    if value is None:
        return "none"
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) if value else "none"
    return f"`{value}`" if value != "" else '`""`'


def _default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def engine_options_table() -> str:
    """The engine options table of docs/configuration.md."""
    from backplane.config.engine_args import EngineArgs
    from backplane.config.options import ENV_PREFIX

    rows = [
        "| option | flags | environment | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in fields(EngineArgs):
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-"), *meta["flags"]]
        if f.name == "optimization_level":
            flags = ["-O", "--optimization-level"]
        flags_doc = meta["flags_doc"] or ", ".join(f"`{x}`" for x in flags)
        default = _default_of(f)
        default_doc = meta["default_doc"] or (
            "required" if default is MISSING else f"`{default}`"
        )
        rows.append(
            f"| `{f.name}` | {flags_doc} | `{ENV_PREFIX}{f.name.upper()}` | {default_doc} | "
            f"{meta['help']} |"
        )
    return "\n".join(rows)


def server_options_table() -> str:
    """The server options rows of docs/serving.md."""
    from backplane.config.server_options import ServerOptions

    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in fields(ServerOptions):
        meta = f.metadata
        flag = f"`--{f.name.replace('_', '-')}`"
        for negative in meta.get("negative", ()):
            flag += f" (`{negative}` turns it off)"
        default = meta.get("default_doc") or _shown(_default_of(f))
        rows.append(f"| {flag} | {default} | {meta['help']} |")
    return "\n".join(rows)


# (file, block name) -> the function that renders that block.
GENERATED = {
    ("configuration.md", "engine-options"): engine_options_table,
    ("serving.md", "server-options"): server_options_table,
}


def render(text: str, name: str, table: str) -> str:
    """``text`` with the generated block ``name`` replaced by ``table``."""
    pattern = re.compile(
        rf"(<!-- generated: {re.escape(name)} .*?-->\n).*?(\n<!-- end: {re.escape(name)} -->)",
        re.S,
    )
    if not pattern.search(text):
        raise ValueError(f"no generated block {name!r} (marker comments) found")
    return pattern.sub(lambda m: m.group(1) + table + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite every generated block; ``--check`` only reports stale ones (exit 1)."""
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for (filename, name), table in GENERATED.items():
        path = DOCS_DIR / filename
        text = path.read_text()
        new = render(text, name, table())
        if new != text:
            stale.append(f"{filename}: {name}")
            if not check:
                path.write_text(new)
    for item in stale:
        print(("stale: " if check else "updated: ") + item)
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
