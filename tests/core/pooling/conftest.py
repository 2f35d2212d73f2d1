"""Pooling-model fixtures: the real all-MiniLM-L6-v2 (when installed) and tiny encoders."""

from __future__ import annotations

import pytest

from tests.fixtures.pooling import SENTENCES, minilm_path, minilm_reference

__all__ = ["SENTENCES"]


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return minilm_path()


@pytest.fixture(name="minilm_reference", scope="session")
def _minilm_reference(minilm_dir):
    """sentence-transformers' embeddings of SENTENCES (float32 tensor [8, 384])."""
    return minilm_reference()


@pytest.fixture(scope="session")
def tiny_bert_factory(tmp_path_factory):
    """``factory(pooling="MEAN", normalize=False, **config) -> dir``, cached per arguments."""
    from tests.fixtures.tiny_bert import make_tiny_bert

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny_bert")

    def factory(pooling: str | None = "MEAN", normalize: bool = False, **overrides) -> str:
        key = (pooling, normalize, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_bert(str(root / f"bert{len(cache)}"), pooling, normalize,
                                        **overrides)
        return cache[key]

    return factory
