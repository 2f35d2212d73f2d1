"""BACKPLANE_LOGGING_LEVEL controls the verbosity of the `backplane` logger."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = (
    "import logging; from backplane.logging_utils import configure_logging; "
    "configure_logging(); log = logging.getLogger('backplane.test'); "
    "log.debug('dbg-line'); log.info('info-line'); log.warning('warn-line')"
)


def _stderr(level: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if level is not None:
        env["BACKPLANE_LOGGING_LEVEL"] = level
    return subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          env=env).stderr


def test_default_is_info():
    out = _stderr(None)
    assert "info-line" in out and "dbg-line" not in out


def test_debug_and_warning_levels():
    assert "dbg-line" in _stderr("debug")
    out = _stderr("WARNING")
    assert "warn-line" in out and "info-line" not in out


def test_bad_level_is_a_clear_error():
    out = _stderr("LOUD")
    assert "BACKPLANE_LOGGING_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR" in out
