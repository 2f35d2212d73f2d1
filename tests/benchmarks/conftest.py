"""A tiny bench model (`bench make-model --shape tiny`) built once for these tests."""

from __future__ import annotations

import pytest

from backplane.benchmarks.make_model import make_model


@pytest.fixture(scope="session")
def bench_tiny_model(tmp_path_factory) -> str:
    """Directory of the tiny Qwen2-shaped random model with its local tokenizer (float32)."""
    path = tmp_path_factory.mktemp("bench") / "tiny"
    make_model(str(path), shape="tiny", dtype="float32", seed=0)
    return str(path)
