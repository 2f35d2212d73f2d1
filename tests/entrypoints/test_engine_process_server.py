"""The OpenAI server with --engine-process: serving, engine-process death, no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import (
    API_KEY,
    metric,
    serve_process,
    start_server,
    tiny_engine_args,
    wait_until_idle,
)

# Key tests of the shared-server suites, run again here against an engine-process
# server (the `server` / `client` fixtures below replace the package's for them).
from tests.entrypoints.test_completions import (  # noqa: F401 - collected here too
    reference_llm,
    test_greedy_completion_equals_llm_generate,
    test_logprobs_and_echo,
    test_n2_and_prompt_list_and_token_ids,
    test_stop_string_and_stop_token_ids,
    test_streaming_with_usage_matches_whole,
)
from tests.entrypoints.test_concurrency import (  # noqa: F401
    test_32_concurrent_streams_complete_and_free_everything,
)


@pytest.fixture(scope="module")
def server(llama_model_dir):
    """The shared server's twin (same model, limits and key) with --engine-process."""
    engine = AsyncEngine.from_engine_args(
        tiny_engine_args(llama_model_dir, served_model_name=SERVED_NAME, engine_process=True)
    )
    running = start_server(engine, api_key=API_KEY)
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def assert_sigterm_leaves_no_process(proc, children: list[int], logs) -> None:
    """SIGTERM `proc` (a `backplane serve`): it exits 0 and none of ``children`` survive."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, logs()
    deadline = time.time() + 10
    while any(_running(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in children if _running(pid)]
    assert not alive, f"left behind: {alive}\n" + logs()


@pytest.fixture
def mp_server(llama_model_dir):
    engine = AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir, engine_process=True))
    server = start_server(engine, api_key=None)
    yield server
    server.stop()
    engine.shutdown()
    pid = engine.engine.engine_pid
    assert not _running(pid)


def test_completions_streaming_abort_and_prefix_reset(server):
    engine = server.engine
    assert engine.config.parallel_config.engine_process is True
    assert engine.engine.engine_pid is not None
    with server.client() as c:
        body = {"prompt": "hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        plain = c.post("/v1/completions", json=body)
        assert plain.status_code == 200, plain.text
        choice = plain.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        assert text == choice["text"]  # streamed pieces add up to the same greedy text
        # A client that leaves mid-stream aborts its request: its KV blocks come back.
        long = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as resp:
            next(line for line in resp.iter_lines() if line)
        text = wait_until_idle(server)
        assert metric(text, "backplane:kv_cache_usage_perc") == 0
        stats = engine.get_stats()
        assert (stats.num_running, stats.num_waiting) == (0, 0)
        assert stats.num_free_blocks == stats.num_total_blocks
    # A request/reply call into the engine process, between two steps.
    assert asyncio.run(engine.reset_prefix_cache()) is True


def test_killed_engine_process_fails_requests_and_health_within_seconds(mp_server):
    engine = mp_server.engine
    pid = engine.engine.engine_pid
    results: list = []

    def in_flight() -> None:
        with mp_server.client() as c:
            results.append(c.post("/v1/completions", json={
                "prompt": "hello", "max_tokens": 120, "ignore_eos": True}))

    with mp_server.client() as c:
        assert c.get("/health").status_code == 200
        # Stopped first, so that the tiny model cannot finish the request before the kill.
        os.kill(pid, signal.SIGSTOP)
        thread = threading.Thread(target=in_flight)
        thread.start()
        deadline = time.time() + 10
        while engine.num_unfinished_requests == 0 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert not results, "the request finished although the engine process was stopped"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(10)
        assert results and results[0].status_code == 503, results
        assert "engine core process" in results[0].json()["error"]["message"]
        while c.get("/health").status_code == 200:
            assert time.monotonic() - killed < 5
            time.sleep(0.05)
        assert time.monotonic() - killed < 5
        health = c.get("/health")
        assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        later = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert later.status_code == 503
    assert engine.errored


def test_idle_engine_process_death_turns_health_non_200(mp_server):
    pid = mp_server.engine.engine.engine_pid
    with mp_server.client() as c:
        assert c.get("/health").status_code == 200
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        while c.get("/health").status_code == 200:
            assert time.monotonic() - start < 5, "health still 200 after the engine died"
            time.sleep(0.05)


def test_sigterm_of_serve_leaves_no_engine_process(llama_model_dir, tmp_path):
    with serve_process(llama_model_dir, tmp_path / "serve.log", "--max-model-len", "64",
                       "--num-kv-blocks", "16", "--engine-process") as (url, proc, logs):
        children = _descendants(proc.pid)
        assert children, "no engine process under `backplane serve --engine-process`"
        ok = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert_sigterm_leaves_no_process(proc, children, logs)
