"""docs/plugins.md and docs/architecture.md stay true to the tree and inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "docs" / "plugins.md", REPO / "docs" / "architecture.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Repository paths named in backquotes (`backplane/core/engine/async_engine.py`).
PATH = re.compile(r"`((?:backplane|tests|examples|docs)/[\w./-]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository_and_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        assert "://" not in target, f"{doc.name} links outside the repository: {target}"
        path = target.split("#")[0]
        if path:
            resolved = (doc.parent / path).resolve()
            assert resolved.is_relative_to(REPO), f"{doc.name}: {target} leaves the repository"
            assert resolved.exists(), f"{doc.name}: {target} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_paths_exist(doc):
    missing = [p for p in PATH.findall(doc.read_text()) if not (REPO / p.rstrip("/")).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_readme_links_the_architecture_document():
    readme = (REPO / "README.md").read_text()
    assert "(docs/architecture.md)" in readme
    assert "../" not in "".join(LINK.findall(readme)), "README must not link outside the repo"


def test_architecture_names_real_sdk_members():
    import backplane.plugins_sdk as sdk
    from backplane.plugins_sdk import Platform

    text = (REPO / "docs" / "architecture.md").read_text()
    for name in ("TorchSdpaPagedAttentionBackend", "ReferenceAttentionBackend", "Communicator",
                 "DeviceRuntime", "ConfigPolicy", "GraphRunner"):
        assert name in text and hasattr(sdk, name)
    for member in ("attention_backends", "all_attention_backends", "register_attention_backend",
                   "make_communicator", "make_graph_runner", "prepare_model", "compile_backend"):
        assert f"{member}" in text and hasattr(Platform, member)
