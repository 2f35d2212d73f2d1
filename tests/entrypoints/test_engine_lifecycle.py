"""The engine loop dying (injected failure) and graceful shutdown with requests in flight."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from backplane.core.engine.async_engine import (
    MAX_CONSECUTIVE_STEP_FAILURES,
    AsyncEngine,
    EngineDeadError,
    RequestAbortedError,
)
from backplane.sampling_params import SamplingParams
from tests.entrypoints.server_utils import metric, start_server, tiny_engine_args


@pytest.fixture(scope="module")
def engine_args(llama_model_dir):
    return tiny_engine_args(llama_model_dir, num_kv_blocks=32)


def test_failed_step_fails_the_requests_in_flight_and_the_engine_serves_on(engine_args):
    engine = AsyncEngine.from_engine_args(engine_args)
    server = start_server(engine, api_key=None)
    real_step = engine.engine.step
    failures = []

    def fail_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("injected failure")
        return real_step()

    try:
        with server.client() as c:
            engine.engine.step = fail_once
            failed = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
            assert failed.status_code == 500
            err = failed.json()["error"]
            assert "injected failure" in err["message"] and err["code"] == "engine_step_failed"
            assert c.get("/health").status_code == 200
            ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
            stats = engine.engine.get_stats()
            assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        server.stop()


def test_dead_engine_loop_fails_requests_fast_and_health_says_so(engine_args):
    engine = AsyncEngine.from_engine_args(engine_args)
    deaths = []
    engine.add_dead_callback(deaths.append)
    server = start_server(engine, api_key=None)
    try:
        with server.client() as c:
            assert c.get("/health").status_code == 200
            assert (
                c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
            )

            def broken_step():
                raise RuntimeError("injected failure")

            engine.engine.step = broken_step  # the loop thread calls it on the next request
            # Each failed step fails its requests; the engine is declared dead only
            # when steps keep failing.
            for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
                assert c.post(
                    "/v1/completions", json={"prompt": "hi", "max_tokens": 5}
                ).status_code == 500
            t0 = time.time()
            pending = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
            assert time.time() - t0 < 5
            assert pending.status_code == 503
            err = pending.json()["error"]
            assert "injected failure" in err["message"] and err["type"] == "server_error"
            health = c.get("/health")
            assert (
                health.status_code == 503
                and "injected failure" in health.json()["error"]["message"]
            )
            assert engine.errored and isinstance(engine.dead_error, RuntimeError)
            assert len(deaths) == 1 and isinstance(deaths[0], RuntimeError)
            later = c.post(
                "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}
            )
            assert later.status_code == 503
            assert metric(c.get("/metrics").text, "backplane:engine_healthy") == 0
    finally:
        server.stop()


def test_shutdown_aborts_in_flight_requests_and_joins_thread(engine_args):
    engine = AsyncEngine.from_engine_args(engine_args)
    real_step = engine.engine.step

    def slow_step():
        time.sleep(0.02)
        return real_step()

    engine.engine.step = slow_step

    async def main():
        params = SamplingParams(max_tokens=100, ignore_eos=True, temperature=0)
        outputs = []

        async def consume():
            async for out in engine.generate("r1", "Once upon a time", params):
                outputs.append(out)

        task = asyncio.ensure_future(consume())
        while not outputs:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.shutdown)
        await asyncio.wait_for(task, 5)
        return outputs

    outputs = asyncio.run(main())
    final = outputs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) < 100
    assert not engine._thread.is_alive()
    stats = engine.get_stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(engine.add_request("r2", "hi", SamplingParams(max_tokens=2)))


def test_fail_all_reaches_every_request_while_the_loop_is_stuck_in_a_long_step(engine_args):
    """A drain at shutdown must not wait for a step that takes long (a first compile)."""
    engine = AsyncEngine.from_engine_args(engine_args)
    real_step = engine.engine.step
    stuck = {"on": False}

    def step():
        if stuck["on"]:
            time.sleep(3)
        return real_step()

    engine.engine.step = step
    params = SamplingParams(max_tokens=50, ignore_eos=True, temperature=0)

    async def main():
        first = await engine.add_request("running", "Once upon a time", params)
        stuck["on"] = True
        await asyncio.sleep(0.2)  # the loop thread is now inside the long step
        pending = asyncio.ensure_future(engine.add_request("pending", "hi", params))
        await asyncio.sleep(0.1)
        t0 = time.time()
        engine.fail_all("draining")
        with pytest.raises(RequestAbortedError, match="draining"):
            async for _ in first:
                pass
        with pytest.raises(RequestAbortedError, match="draining"):
            await pending
        return time.time() - t0

    try:
        assert asyncio.run(main()) < 1.0
        stuck["on"] = False
        deadline = time.time() + 10
        while time.time() < deadline:
            stats = engine.get_stats()
            if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                break
            time.sleep(0.05)
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()


def test_cancelled_consumer_aborts_request(engine_args):
    engine = AsyncEngine.from_engine_args(engine_args)
    try:

        async def main():
            params = SamplingParams(max_tokens=100, ignore_eos=True)
            gen = engine.generate("c1", "Hello there", params)
            first = await gen.__anext__()
            assert not first.finished
            await gen.aclose()  # what a cancelled HTTP handler does
            for _ in range(200):
                stats = engine.get_stats()
                if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                    return stats
                await asyncio.sleep(0.01)
            return engine.get_stats()

        stats = asyncio.run(main())
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
        assert engine.num_unfinished_requests == 0

        # the same id can be used again once the first request is gone
        async def again():
            return [o async for o in engine.generate("c1", "Hi", SamplingParams(max_tokens=2))]

        assert asyncio.run(again())[-1].finished
    finally:
        engine.shutdown()


def test_engine_refuses_bad_request_without_disturbing_others(engine_args):
    engine = AsyncEngine.from_engine_args(engine_args)
    try:

        async def main():
            good = engine.generate("g", "Hello", SamplingParams(max_tokens=8, temperature=0))
            task = asyncio.ensure_future(_last(good))
            with pytest.raises(ValueError, match="max_model_len"):
                await engine.add_request("b", [5] * 200, SamplingParams(max_tokens=2))
            return await task

        final = asyncio.run(main())
        assert final.finished and len(final.outputs[0].token_ids) == 8
    finally:
        engine.shutdown()


async def _last(gen):
    last = None
    async for out in gen:
        last = out
    return last


def test_health_open_and_server_info_in_dev_mode(engine_args, monkeypatch):
    monkeypatch.setenv("BACKPLANE_SERVER_DEV_MODE", "1")
    engine = AsyncEngine.from_engine_args(engine_args)
    server = start_server(engine, api_key="k")
    try:
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        info = httpx.get(server.url + "/server_info", headers={"Authorization": "Bearer k"})
        assert info.status_code == 200
        data = info.json()
        assert data["platform"]["name"] == "cpu"
        assert data["config"]["model_config"]["max_model_len"] == engine_args.max_model_len
        assert data["config"]["cache_config"]["num_kv_blocks"] == 32
        assert data["stats"]["num_total_blocks"] == 32
    finally:
        server.stop()
    assert not engine._thread.is_alive()  # the app's lifespan shut the engine down
