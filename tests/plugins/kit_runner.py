"""Running pytest (with the conformance kit) in a subprocess and reading per-test outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_pytest(report_dir: Path, args: list[str], cwd: Path,
               env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """``python -m pytest ARGS`` in ``cwd``; {test name: passed|failed|skipped|error}."""
    report = report_dir / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("BACKPLANE_CONFORMANCE_PLATFORM", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kit_plugin_args(),
           f"--junitxml={report}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert report.exists(), f"pytest did not run:\n{proc.stdout}\n{proc.stderr}"
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "skipped" if "skipped" in kinds else "passed")
        outcomes[case.get("name")] = outcome
    if not outcomes or proc.returncode not in (0, 1):
        raise AssertionError(f"pytest exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return outcomes


def run_kit(tmp_path: Path, platform: str, *extra: str) -> dict[str, str]:
    """The conformance suite against ``platform`` (a name or ``module:attribute``)."""
    return run_pytest(tmp_path, ["--rootdir", str(tmp_path), "--backplane-platform", platform,
                                 *extra], cwd=tmp_path)


def failures(outcomes: dict[str, str]) -> dict[str, str]:
    """The failed or errored tests of `run_pytest`'s result."""
    return {name: o for name, o in outcomes.items() if o in ("failed", "error")}


def kit_plugin_args() -> list[str]:
    """``-p <kit>`` when the pytest11 entry point is not installed (running from source)."""
    return [] if _kit_autoloads() else ["-p", "backplane.plugins_sdk.testing.plugin"]


def _kit_autoloads() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "backplane.plugins_sdk.testing.plugin"
               for ep in entry_points(group="pytest11"))
