"""`backplane serve -tp 2` (mp executor): the openai client gets TP=1's answers, with prefix
caching, chunked prefill and preemption at work; a killed worker fails the server fast; no
process outlives it."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from backplane import LLM, SamplingParams
from tests.entrypoints.server_utils import metric, serve_process
from tests.entrypoints.test_engine_process_server import (
    _descendants,
    _running,
    assert_sigterm_leaves_no_process,
)

# Small cache and token budget: 8 concurrent requests of ~60 prompt + 48 output tokens
# need ~860 tokens of KV but 30 blocks hold 480, so requests are preempted, and prompts
# longer than 24 tokens are prefilled in chunks.
SERVE_FLAGS = ["--max-model-len", "128", "--num-kv-blocks", "30", "--block-size", "16",
               "--enable-prefix-caching", "--enable-chunked-prefill",
               "--max-num-batched-tokens", "24", "--max-num-seqs", "8", "--seed", "0"]
SHARED = [1] + list(range(20, 52))  # a 33-token prefix every prompt shares
PROMPTS = [SHARED + [100 + i, 7, 8 + i] * (3 + i % 3) for i in range(8)]


@pytest.fixture
def serve_tp2(llama_model_dir, tmp_path):
    """A `backplane serve -tp 2` process; yields (url, process, log reader, the shared-memory
    segments that existed before it)."""
    shm_before = _shm_segments()
    with serve_process(llama_model_dir, tmp_path / "serve.log", "--dtype", "float32", "-tp", "2",
                       *SERVE_FLAGS, timeout=120) as (url, proc, logs):
        yield url, proc, logs, shm_before


def _shm_segments() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("backplane")}


def _health(url: str) -> int | None:
    """/health's status; None once the server has exited (it does when its engine dies)."""
    try:
        return httpx.get(url + "/health").status_code
    except httpx.ConnectError:
        return None


def _workers(pid: int) -> list[int]:
    """The worker processes under ``pid`` (spawned interpreters, not helpers like the
    resource tracker)."""
    found = []
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            found.append(child)
    return found


def test_tp2_server_matches_tp1_and_sigterm_leaves_nothing(serve_tp2, llama_model_dir):
    url, proc, logs, shm_before = serve_tp2
    workers = _workers(proc.pid)
    assert len(workers) == 1, logs()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    answers: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        resp = client.completions.create(model=llama_model_dir, prompt=PROMPTS[i],
                                         max_tokens=48, temperature=0, logprobs=1,
                                         extra_body={"ignore_eos": True,
                                                     "return_tokens_as_token_ids": True})
        answers[i] = [int(t.removeprefix("token_id:"))
                      for t in resp.choices[0].logprobs.tokens]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(answers) == len(PROMPTS), logs()
    metrics = httpx.get(url + "/metrics").text
    assert metric(metrics, "backplane:num_preemptions_total") > 0
    assert metric(metrics, "backplane:prefix_cache_hits_total") > 0

    reference = LLM(llama_model_dir, dtype="float32", max_model_len=128, num_kv_blocks=64)
    expected = reference.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                  SamplingParams(max_tokens=48, temperature=0, ignore_eos=True),
                                  use_tqdm=False)
    reference.llm_engine.shutdown()
    assert [answers[i] for i in range(len(PROMPTS))] == [o.outputs[0].token_ids
                                                         for o in expected]

    assert_sigterm_leaves_no_process(proc, _descendants(proc.pid), logs)
    assert not _shm_segments() - shm_before  # the ranks removed their segments


def test_killed_worker_fails_requests_and_health_within_seconds(serve_tp2):
    url, proc, logs, _ = serve_tp2
    (worker,) = _workers(proc.pid)
    results: list = []

    def in_flight() -> None:
        results.append(httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": [1, 2, 3], "max_tokens": 120, "ignore_eos": True}))

    # Stopped first, so that the tiny model cannot finish the request before the kill.
    os.kill(worker, signal.SIGSTOP)
    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(1.0)
    assert not results, "the request finished although a worker was stopped"
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(30)
    assert results and results[0].status_code in (500, 503), results
    while _health(url) == 200:
        assert time.monotonic() - killed < 10, "health still 200 after a worker died"
        time.sleep(0.05)
    # The server gives up (the engine is dead) and leaves no process behind.
    assert proc.wait(30) != 0
    assert "worker rank 1" in logs() and "SIGKILL" in logs()
    time.sleep(0.5)
    assert not [pid for pid in _descendants(proc.pid) if _running(pid)]
