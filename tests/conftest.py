"""Shared pytest fixtures for the whole suite.

Tiny model directories are built once per test session and cached by their
parameters, so every test module can ask for them freely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from tests.fixtures.tiny_models import ARCHS, make_tiny_model

__all__ = ["ARCHS"]


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., str]:
    """``factory(arch, dtype="float32", tied=None, sharded=False) -> model dir``.

    Cached per (arch, dtype, tied, sharded) for the session. ``tied=None`` keeps
    the architecture's default (untied llama/mistral, tied qwen2/qwen3);
    ``sharded=True`` writes several safetensors files plus
    ``model.safetensors.index.json``.
    """
    cache: dict[tuple, str] = {}
    lock = threading.Lock()
    root = tmp_path_factory.mktemp("tiny_models")

    def factory(
        arch: str, dtype: str = "float32", tied: bool | None = None, sharded: bool = False
    ) -> str:
        key = (arch, dtype, tied, sharded)
        with lock:
            if key not in cache:
                name = f"{arch}-{dtype}-tied{tied}-{'sharded' if sharded else 'single'}"
                cache[key] = make_tiny_model(
                    root / name,
                    arch,
                    dtype=dtype,
                    tie_word_embeddings=tied,
                    max_shard_size=60_000 if sharded else None,
                )
            return cache[key]

    return factory


@pytest.fixture(scope="session")
def llama_model_dir(tiny_model_factory) -> str:
    """The default tiny Llama (float32, untied embeddings, single safetensors file)."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session", params=ARCHS)
def any_arch_model_dir(request, tiny_model_factory) -> str:
    """Each architecture of ARCHS in turn (float32, default tying)."""
    return tiny_model_factory(request.param)
