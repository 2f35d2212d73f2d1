"""Packaging of the plugin system: extras, entry points, and plugins written against the SDK only."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IN_TREE = ("cpu", "cuda", "rocm", "tpu")
# Distributions that belong to one platform and must never be in the base install.
PLATFORM_DEPENDENCIES = ("triton", "torch_xla", "torch-xla", "pytorch-triton", "torch_npu",
                         "pynvml", "nvidia-", "amdsmi", "libtpu", "jax")


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements]


def test_base_install_pulls_no_platform_dependencies():
    base = _names(PYPROJECT["project"]["dependencies"])
    assert not [n for n in base if n.startswith(PLATFORM_DEPENDENCIES)], base


def test_platform_extras_pull_their_own_dependencies():
    extras = {k: _names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert set(IN_TREE) <= set(extras)
    assert extras["cpu"] == []
    assert "triton" in extras["cuda"] and "triton" in extras["rocm"]
    assert "torch_xla" in extras["tpu"]


@pytest.mark.parametrize("name", IN_TREE)
def test_in_tree_platform_entry_points(name):
    target = PYPROJECT["project"]["entry-points"]["backplane.platforms"][name]
    assert target == f"backplane.platforms.{name}:descriptor"
    module, _, attr = target.partition(":")
    descriptor = getattr(importlib.import_module(module), attr)
    assert descriptor.name == name


def test_conformance_kit_is_a_pytest_plugin():
    assert PYPROJECT["project"]["entry-points"]["pytest11"] == {
        "backplane_conformance": "backplane.plugins_sdk.testing.plugin"}


def _backplane_imports(root: Path) -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            found += [(str(path.relative_to(REPO)), node.lineno, n) for n in names
                      if n == "backplane" or n.startswith("backplane.")]
    return found


@pytest.mark.parametrize("name", IN_TREE)
def test_in_tree_platforms_use_only_the_sdk(name):
    # A platform may build on plugins_sdk and on platform packages (rocm reuses cuda's
    # parts), never on the core, the configs or discovery.
    allowed = ("backplane.plugins_sdk",) + tuple(f"backplane.platforms.{p}" for p in IN_TREE)
    bad = [f"{f}:{line}: {mod}" for f, line, mod in
           _backplane_imports(REPO / "backplane" / "platforms" / name)
           if not mod.startswith(allowed)]
    assert not bad, bad


def test_template_plugin_uses_only_the_sdk():
    template = REPO / "examples" / "plugin_template" / "backplane_acme"
    imports = _backplane_imports(template)
    assert imports, "the template imports the SDK"
    bad = [f"{f}:{line}: {mod}" for f, line, mod in imports
           if not mod.startswith("backplane.plugins_sdk")]
    assert not bad, bad
    toml = tomllib.loads((template.parent / "pyproject.toml").read_text())
    assert toml["project"]["entry-points"]["backplane.platforms"] == {
        "acme": "backplane_acme:descriptor"}
