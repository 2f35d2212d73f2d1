"""Many streams at once, client disconnects, and what /metrics says afterwards."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import API_KEY, metric, wait_until_idle


def test_32_concurrent_streams_complete_and_free_everything(server):
    async def main():
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120
        )

        async def one(i: int):
            stream = await client.completions.create(
                model=SERVED_NAME,
                prompt=f"Request number {i} says",
                max_tokens=16 + i % 5,
                temperature=0.7,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, usage, finish = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage
            return "".join(text), usage, finish

        try:
            return await asyncio.gather(*[one(i) for i in range(32)])
        finally:
            await client.close()

    with server.client() as c:
        before = c.get("/metrics").text
    results = asyncio.run(main())
    assert len(results) == 32
    for i, (_text, usage, finish) in enumerate(results):
        assert finish == "length"
        assert usage.completion_tokens == 16 + i % 5
    text = wait_until_idle(server)
    assert metric(text, "backplane:num_requests_running") == 0
    assert metric(text, "backplane:num_requests_waiting") == 0
    assert metric(text, "backplane:kv_cache_usage_perc") == 0
    stats = server.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    done = metric(text, "backplane:request_success_total", finished_reason="length")
    assert done - _maybe(before, "backplane:request_success_total", finished_reason="length") == 32
    generated = sum(16 + i % 5 for i in range(32))
    assert (
        metric(text, "backplane:generation_tokens_total")
        - _maybe(before, "backplane:generation_tokens_total")
        == generated
    )
    assert metric(text, "backplane:time_to_first_token_seconds_count") >= 32
    assert metric(text, "backplane:e2e_request_latency_seconds_count") >= 32
    assert metric(text, "backplane:inter_token_latency_seconds_count") > 0


def _maybe(text: str, name: str, **labels) -> float:
    try:
        return metric(text, name, **labels)
    except KeyError:
        return 0.0


@pytest.fixture
def slow_engine(server, monkeypatch):
    """Slow every engine step down so that a disconnect lands mid-generation."""
    inner = server.engine.engine
    real_step = inner.step

    def slow_step():
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(inner, "step", slow_step)
    yield server


def _aborts(server) -> float:
    with server.client() as c:
        return _maybe(
            c.get("/metrics").text, "backplane:request_success_total", finished_reason="abort"
        )


def test_streaming_client_disconnect_aborts_and_frees_blocks(slow_engine):
    server = slow_engine
    aborts = _aborts(server)
    with server.client() as c:
        with c.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": "Tell me a long story",
                "max_tokens": 100,
                "stream": True,
                "ignore_eos": True,
            },
        ) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: {") for line in got)
            running = server.engine.get_stats()
            assert running.num_running == 1 and running.num_free_blocks < running.num_total_blocks
        # leaving the block closes the connection mid-stream
    text = wait_until_idle(server)
    assert metric(text, "backplane:num_requests_running") == 0
    assert metric(text, "backplane:kv_cache_usage_perc") == 0
    assert _aborts(server) == aborts + 1
    assert server.engine.num_unfinished_requests == 0


def test_non_streaming_client_disconnect_aborts(slow_engine):
    server = slow_engine
    aborts = _aborts(server)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(
                "/v1/completions",
                json={
                    "prompt": "Tell me a long story",
                    "max_tokens": 100,
                    "ignore_eos": True,
                },
            )
    text = wait_until_idle(server)
    assert metric(text, "backplane:num_requests_running") == 0
    assert metric(text, "backplane:kv_cache_usage_perc") == 0
    assert _aborts(server) == aborts + 1
