"""docs/configuration.md documents every option, spelling and deprecated name."""

from __future__ import annotations

from pathlib import Path

from backplane.config.deprecation import DEPRECATION_TABLE
from backplane.config.options import NON_OPTION_ENV_VARS, OPTIONS

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def test_every_option_flag_and_env_var_is_documented():
    for spec in OPTIONS:
        flags = ["-O"] if spec.name == "optimization_level" else [spec.flag, *spec.flags]
        for text in (f"`{spec.name}`", f"`{spec.env_var}`", *(f"`{f}`" for f in flags)):
            assert text in DOC, f"{text} missing from docs/configuration.md"


def test_every_deprecated_option_is_documented_with_its_versions():
    for entry in DEPRECATION_TABLE:
        row = next((line for line in DOC.splitlines() if line.startswith(f"| `{entry.old}`")),
                   None)
        assert row is not None, f"{entry.old} missing from the deprecation table"
        assert entry.deprecated_in in row and entry.removed_in in row
        assert entry.new is None or f"`{entry.new}`" in row


def test_non_option_env_vars_are_documented():
    for var in NON_OPTION_ENV_VARS - {"BACKPLANE_CONFORMANCE_PLATFORM"}:
        assert f"`{var}`" in DOC, var


def test_every_server_option_is_documented_in_serving_md():
    from dataclasses import fields

    from backplane.config.server_options import ServerOptions

    serving = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    for f in fields(ServerOptions):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in serving, f"{flag} missing from docs/serving.md"


def test_generated_option_tables_are_current():
    """docs tables are generated from the declarations: regenerate with
    `python -m backplane.config.docs` after changing an option."""
    from backplane.config.docs import main

    assert main(["--check"]) == 0
