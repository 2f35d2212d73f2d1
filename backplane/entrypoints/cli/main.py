"""`backplane` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from backplane.logging_utils import configure_logging
from backplane.version import __version__

# Each module defines register(subparsers) and sets a `func(args) -> int` default.
SUBCOMMAND_MODULES = [
    "platforms",
    "serve",
    "generate",
    "chat",
    "config_cmd",
    "collect_env",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backplane", description="Backplane LLM inference and serving engine"
    )
    parser.add_argument("--version", action="version", version=f"backplane {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(f"backplane.entrypoints.cli.{module}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
