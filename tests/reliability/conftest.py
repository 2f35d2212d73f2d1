"""Fixtures of the reliability suite: one tiny-Llama engine shared by every in-process
server here (see support.py for what each test checks afterwards)."""

from __future__ import annotations

import pytest

from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.server_utils import tiny_engine_args
from tests.reliability.support import SERVED_NAME, greedy_text, serve


@pytest.fixture(scope="package")
def engine(llama_model_dir):
    """The engine behind every in-process server of this directory."""
    eng = AsyncEngine.from_engine_args(
        tiny_engine_args(llama_model_dir, served_model_name=SERVED_NAME)
    )
    yield eng
    eng.shutdown()
    assert not eng._thread.is_alive(), "engine loop thread still running after shutdown"


@pytest.fixture(scope="package")
def server(engine):
    """The default server (API key ``test-key``, default limits)."""
    running = serve(engine)
    yield running
    running.stop()


@pytest.fixture(scope="package")
def greedy_reference(server) -> str:
    """GREEDY_REQUEST's text, taken before the first test that asks for it disturbs anything."""
    return greedy_text(server)
