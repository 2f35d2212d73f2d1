"""The OpenAI server with --data-parallel-size 2: same outputs as one core, per-rank
metrics, a dead rank's effect on /health and in-flight requests, no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from backplane import LLM
from backplane.core.engine.async_engine import AsyncEngine
from backplane.sampling_params import SamplingParams
from tests.entrypoints.server_utils import (
    metric,
    serve_process,
    start_server,
    tiny_engine_args,
    wait_until_idle,
)
from tests.entrypoints.test_engine_process_server import (
    _descendants,
    _running,
    assert_sigterm_leaves_no_process,
)


def _dp_server(model_dir):
    engine = AsyncEngine.from_engine_args(tiny_engine_args(model_dir, data_parallel_size=2))
    return start_server(engine, api_key=None)


@pytest.fixture(scope="module")
def dp_server(llama_model_dir):
    server = _dp_server(llama_model_dir)
    yield server
    server.stop()
    server.engine.shutdown()
    assert not any(_running(pid) for pid in server.engine.engine.core.engine_pids)


def test_64_concurrent_requests_equal_one_core_on_both_ranks(dp_server, llama_model_dir):
    args = tiny_engine_args(llama_model_dir)
    reference = LLM(model=args.model, max_model_len=args.max_model_len,
                    num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
                    max_num_seqs=args.max_num_seqs, seed=args.seed)
    prompts = [f"Request number {i} says" for i in range(64)]
    lengths = [8 + i % 9 for i in range(64)]
    expected = [
        out.outputs[0].text for out in reference.generate(
            prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                      for n in lengths], use_tqdm=False)
    ]

    async def main():
        async with httpx.AsyncClient(base_url=dp_server.url, timeout=120) as client:
            async def one(i: int):
                r = await client.post("/v1/completions", json={
                    "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0,
                    "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            return await asyncio.gather(*[one(i) for i in range(64)])

    with dp_server.client() as c:
        before = c.get("/metrics").text
    assert asyncio.run(main()) == expected
    text = wait_until_idle(dp_server)
    generated = 0.0
    for rank in ("0", "1"):
        delta = (metric(text, "backplane:dp_rank_generation_tokens_total", engine=rank)
                 - metric(before, "backplane:dp_rank_generation_tokens_total", engine=rank))
        assert delta > 0, f"rank {rank} generated nothing"
        generated += delta
        assert metric(text, "backplane:dp_rank_num_requests_running", engine=rank) == 0
        assert metric(text, "backplane:dp_rank_num_requests_waiting", engine=rank) == 0
        assert metric(text, "backplane:dp_rank_kv_cache_usage_perc", engine=rank) == 0
        assert (metric(text, "backplane:dp_rank_num_free_kv_blocks", engine=rank)
                == metric(text, "backplane:dp_rank_num_kv_blocks", engine=rank) == 160)
    assert generated == sum(lengths)
    # The unlabelled series are the totals; the vllm: names mirror them.
    assert metric(text, "backplane:num_kv_blocks") == 320
    assert metric(text, "backplane:num_free_kv_blocks") == 320
    assert metric(text, "vllm:num_requests_running") == 0
    assert "vllm:dp_rank" not in text
    stats = dp_server.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks == 320
    assert [r["num_free_blocks"] for r in stats.dp_ranks] == [160, 160]
    assert asyncio.run(dp_server.engine.reset_prefix_cache()) is True


def test_killed_rank_fails_requests_and_health_within_seconds(llama_model_dir):
    server = _dp_server(llama_model_dir)
    engine = server.engine
    pids = engine.engine.core.engine_pids
    results: list = []

    def in_flight(prompt: str) -> None:
        with server.client() as c:
            results.append(c.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 100, "ignore_eos": True}))

    try:
        with server.client() as c:
            assert c.get("/health").status_code == 200
            # Both stopped, so that neither request can finish before the kill.
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            threads = [threading.Thread(target=in_flight, args=(p,)) for p in ("hi", "yo")]
            for t in threads:
                t.start()
            deadline = time.time() + 10
            # One request on each rank (read from here while the loop thread adds).
            while engine.engine.core.loads() != [1, 1]:
                assert time.time() < deadline, engine.engine.core.loads()
                time.sleep(0.01)
            time.sleep(0.2)
            assert not results, "a request finished although both engine cores were stopped"
            os.kill(pids[1], signal.SIGKILL)
            killed = time.monotonic()
            while c.get("/health").status_code == 200:
                assert time.monotonic() - killed < 5, "health still 200 after a rank died"
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGCONT)
            for t in threads:
                t.join(10)
            assert len(results) == 2 and all(r.status_code == 503 for r in results), results
            health = c.get("/health")
            assert health.status_code == 503
            message = health.json()["error"]["message"]
            assert "data-parallel rank 1" in message and "SIGKILL" in message
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}
                          ).status_code == 503
        assert engine.errored
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGCONT)
        server.stop()
        engine.shutdown()
    assert not any(_running(pid) for pid in pids)


def test_sigterm_of_serve_dp2_leaves_no_process(llama_model_dir, tmp_path):
    with serve_process(llama_model_dir, tmp_path / "serve.log", "--max-model-len", "64",
                       "--num-kv-blocks", "16", "-dp", "2") as (url, proc, logs):
        children = _descendants(proc.pid)
        assert len(children) >= 2, "no engine processes under `backplane serve -dp 2`"
        ok = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        text = httpx.get(url + "/metrics").text
        assert metric(text, "backplane:dp_rank_num_kv_blocks", engine="1") == 16
        assert_sigterm_leaves_no_process(proc, children, logs)
