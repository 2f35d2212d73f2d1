"""pytest plugin of the platform conformance kit (entry point ``pytest11``: ``backplane_conformance``).

Nothing happens unless a platform is requested, so installing Backplane does
not add tests to anyone's pytest run. Request one with, in order of precedence:

- ``pytest --backplane-platform NAME`` (an installed platform plugin's name, or
  ``package.module:attribute`` naming a descriptor / Platform / factory);
- the ini option ``backplane_platform = NAME`` (pytest.ini, or
  ``[tool.pytest.ini_options]`` in pyproject.toml);
- the environment variable ``BACKPLANE_CONFORMANCE_PLATFORM=NAME``.

The suite's modules (``backplane/plugins_sdk/testing/suite/conformance_*.py``)
are then added to the collected paths; select parts with ``-k`` (``-k attention``,
``-k communicator``, ``-k graph``, ``-k config``, ``-k runtime``).
``--backplane-dist-backend`` picks the torch.distributed backend of the
two-process communicator test (default gloo, on CPU tensors).

This module imports only pytest and the standard library at import time: it
is loaded in every pytest session of an environment where Backplane is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ENV_VAR = "BACKPLANE_CONFORMANCE_PLATFORM"
SUITE_DIR = Path(__file__).with_name("suite")
_PLATFORM_KEY = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("backplane", "Backplane platform conformance kit")
    group.addoption(
        "--backplane-platform", dest="backplane_platform", default=None, metavar="NAME",
        help="run the Backplane platform conformance suite against this platform "
        f"(installed plugin name or module:attribute; default: ini backplane_platform, "
        f"then ${ENV_VAR})",
    )
    group.addoption(
        "--backplane-dist-backend", dest="backplane_dist_backend", default="gloo",
        metavar="BACKEND",
        help="torch.distributed backend for the two-process communicator test (default gloo)",
    )
    parser.addini("backplane_platform", "platform for the Backplane conformance suite",
                  default="")


def requested_platform(config: pytest.Config) -> str | None:
    """The platform spec requested for this session, or None (suite not collected)."""
    value = (
        config.getoption("backplane_platform", default=None)
        or config.getini("backplane_platform")
        or os.environ.get(ENV_VAR, "")
    )
    return value.strip() or None


def suite_files() -> list[Path]:
    """The conformance modules, in a stable order."""
    return sorted(SUITE_DIR.glob("conformance_*.py"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backplane_conformance: a test of the Backplane platform conformance suite")
    if requested_platform(config) is None:
        return
    # Explicit file arguments are collected whatever python_files says, and only then:
    # the suite never runs by accident in a session that did not ask for it.
    present = {str(Path(a).resolve()) for a in config.args if not a.startswith("-")}
    for path in suite_files():
        if str(path.resolve()) not in present:
            config.args.append(str(path))


def pytest_report_header(config: pytest.Config) -> str | None:
    spec = requested_platform(config)
    return f"backplane conformance: platform {spec}" if spec else None


def platform_for(config: pytest.Config) -> Any:
    """The Platform under test, loaded once per session (also used at collection time)."""
    if _PLATFORM_KEY not in config.stash:
        spec = requested_platform(config)
        if spec is None:
            raise pytest.UsageError(
                "the Backplane conformance suite needs a platform: pass --backplane-platform NAME")
        from backplane.plugins_sdk.testing.loading import load_platform

        config.stash[_PLATFORM_KEY] = load_platform(spec)
    return config.stash[_PLATFORM_KEY]


@pytest.fixture(scope="session")
def backplane_platform_spec(pytestconfig: pytest.Config) -> str:
    """The requested platform spec (name or module:attribute)."""
    spec = requested_platform(pytestconfig)
    if spec is None:
        pytest.skip("no platform requested: pass --backplane-platform NAME")
    return spec


@pytest.fixture(scope="session")
def backplane_platform(pytestconfig: pytest.Config, backplane_platform_spec: str) -> Any:
    """The Platform under test."""
    return platform_for(pytestconfig)


@pytest.fixture(scope="session")
def backplane_device(backplane_platform: Any) -> Any:
    """The torch device of the platform's first device."""
    return backplane_platform.runtime.device(0)


@pytest.fixture(scope="session")
def backplane_collectives(pytestconfig: pytest.Config, backplane_platform_spec: str):
    """Each rank's results of the two-process collective run (spawned once per session)."""
    from backplane.plugins_sdk.testing.collectives import run_collectives

    backend = pytestconfig.getoption("backplane_dist_backend", default="gloo") or "gloo"
    return run_collectives(backplane_platform_spec, backend=backend)
