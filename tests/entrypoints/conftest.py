"""One real server (API key ``test-key``) shared by the tests of this directory."""

from __future__ import annotations

import openai
import pytest

from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.server_utils import API_KEY, start_server, tiny_engine_args

SERVED_NAME = "tiny-llama"


@pytest.fixture(scope="package")
def server(llama_model_dir):
    """The shared server: tiny Llama, max_model_len 128, 160 KV blocks of 16 tokens."""
    engine = AsyncEngine.from_engine_args(
        tiny_engine_args(llama_model_dir, served_model_name=SERVED_NAME)
    )
    running = start_server(engine, api_key=API_KEY)
    yield running
    running.stop()
    assert not engine._thread.is_alive(), "engine loop thread still running after shutdown"


@pytest.fixture(scope="package")
def client(server) -> openai.OpenAI:
    """The official OpenAI client pointed at the shared server."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
