"""`backplane --version`, `backplane.__version__` and the version helpers agree."""

from __future__ import annotations

import subprocess
import sys

import backplane
from backplane.version import __version__, version_tuple


def test_version_attribute_and_cli_agree():
    assert backplane.__version__ == __version__
    out = subprocess.run(
        [sys.executable, "-m", "backplane.entrypoints.cli.main", "--version"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == f"backplane {__version__}"


def test_version_tuple():
    assert version_tuple("1.2.3.post1") == (1, 2, 3)
    assert version_tuple("0.5") == (0, 5, 0)
    assert version_tuple("0.4.1.dev0") == (0, 4, 1)
    assert len(version_tuple()) == 3
