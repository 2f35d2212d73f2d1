"""`backplane config validate FILE` and `backplane config migrate FILE [-o OUT]`.

validate: checks a YAML config against the current schema and the platform,
reports every problem at once (plus deprecation warnings and the decisions the
config implies), exit status 1 when there is any problem.

migrate: rewrites an older Backplane config or a vLLM ``serve`` YAML config to
the current schema, prints what changed and what could not be mapped to
stderr, and writes the result to OUT (or stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``config`` subcommand group."""
    parser = subparsers.add_parser(
        "config", help="validate or migrate YAML config files",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    validate = actions.add_parser("validate", help="report every problem of a config file")
    validate.add_argument("file", metavar="FILE", help="YAML config file")
    validate.add_argument(
        "--no-model", action="store_true",
        help="skip the checks that read the model directory",
    )
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(func=run_validate)

    migrate = actions.add_parser(
        "migrate", help="rewrite an old Backplane or vLLM serve config to the current schema"
    )
    migrate.add_argument("file", metavar="FILE", help="YAML config file to read")
    migrate.add_argument(
        "-o", "--output", metavar="OUT", default=None,
        help="where to write the migrated config (default: stdout); may equal FILE",
    )
    migrate.set_defaults(func=run_migrate)


def run_validate(args: argparse.Namespace) -> int:
    from backplane.config.validate import validate_config_file

    report = validate_config_file(args.file, check_model=not args.no_model)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    for warning in report.warnings:
        print(f"warning: {warning}")
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        where = f" on platform {report.platform}" if report.platform else ""
        print(f"{args.file}: OK{where}")
        if report.config_hash:
            print(f"config hash: {report.config_hash}")
        return 0
    print(f"{args.file}: {len(report.errors)} problem(s)")
    for error in report.errors:
        print(f"error: {error}")
    return 1


def run_migrate(args: argparse.Namespace) -> int:
    from backplane.config.migrate import migrate_options, render_yaml
    from backplane.config.sources import read_yaml_file

    try:
        raw = read_yaml_file(args.file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = migrate_options(raw)
    text = render_yaml(result, os.path.basename(args.file))
    for change in result.changes:
        print(f"changed: {change}", file=sys.stderr)
    for item in result.unmapped:
        print(f"not mapped: {item}", file=sys.stderr)
    if not result.changed:
        print("nothing to change: the file already uses the current schema", file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}; check it with `backplane config validate {args.output}`",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
