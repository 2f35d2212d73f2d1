"""A short soak: mixed traffic for a while, with this process's RSS sampled as it goes.

20 s in CI; ``BACKPLANE_SOAK_SECONDS=180`` runs the long version by hand. The
second half's RSS growth must be small (memory flattens out rather than growing
with the number of requests served). The server runs in this process, so the
figures include the clients; each sample is printed, with /proc/self/smaps_rollup
(Rss, Anonymous, AnonHugePages) at both ends and the KV cache's size, which
bounds how much of the growth can be KV pages touched for the first time (the
cpu platform's cache is zero-filled memory whose pages become resident only
when first written).
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx

from tests.reliability.support import (
    assert_serving_as_before,
    last_finish_reason,
    mib,
    rss_bytes,
    smaps_rollup_kib,
    stream_events,
)

SOAK_S = float(os.environ.get("BACKPLANE_SOAK_SECONDS", "20"))
WORKERS = 4
NUM_SAMPLES = 10
# Most the RSS may still grow over the second half of the soak.
MAX_SECOND_HALF_GROWTH_MIB = 32

MESSAGES = [{"role": "user", "content": "Tell me about the river."}]


async def _mixed_request(client: httpx.AsyncClient, i: int) -> None:
    """Request ``i`` of the mix; asserts that it was answered as it should be."""
    kind = i % 8
    if kind == 0:
        r = await client.post("/v1/completions", json={"prompt": f"Soak {i}", "max_tokens": 16})
        assert r.status_code == 200, r.text
    elif kind == 1:
        events = await stream_events(
            client,
            "/v1/chat/completions",
            {
                "messages": MESSAGES,
                "max_tokens": 16,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert events[-1] == "[DONE]" and last_finish_reason(events) == "length", events[-3:]
    elif kind == 2:
        r = await client.post("/v1/responses", json={"input": f"Soak {i}", "max_output_tokens": 12})
        assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete"), r.text
    elif kind == 3:
        r = await client.post("/tokenize", json={"prompt": f"Soak request {i}"})
        assert r.status_code == 200, r.text
        r = await client.post("/detokenize", json={"tokens": r.json()["tokens"]})
        assert r.status_code == 200, r.text
    elif kind == 4:
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert r.status_code == 400, r.text
    elif kind == 5:  # dropped mid-stream
        await stream_events(
            client,
            "/v1/completions",
            {"prompt": f"Soak {i}", "max_tokens": 64, "stream": True, "ignore_eos": True},
            keep=2,
        )
    elif kind == 6:
        r = await client.post(
            "/v1/completions",
            json={
                "prompt": f"Soak {i}",
                "max_tokens": 8,
                "n": 2,
                "logprobs": 2,
                "temperature": 0.7,
                "seed": i,
            },
        )
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    else:
        events = await stream_events(
            client, "/v1/responses", {"input": MESSAGES, "max_output_tokens": 12, "stream": True}
        )
        assert '"response.completed"' in events[-1] or '"response.incomplete"' in events[-1]


async def _soak(server, seconds: float) -> tuple[list[tuple[float, int]], int]:
    samples: list[tuple[float, int]] = []
    served = 0
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers, timeout=httpx.Timeout(30, connect=10)
    ) as client:
        for i in range(8):  # warm-up: each kind once, not measured
            await _mixed_request(client, i)
        start = time.monotonic()
        deadline = start + seconds

        async def worker(w: int) -> None:
            nonlocal served
            i = w
            while time.monotonic() < deadline:
                await _mixed_request(client, i)
                served += 1
                i += WORKERS

        async def sampler() -> None:
            for k in range(NUM_SAMPLES + 1):
                await asyncio.sleep(max(0.0, start + k * seconds / NUM_SAMPLES - time.monotonic()))
                samples.append((time.monotonic() - start, rss_bytes()))

        await asyncio.wait_for(
            asyncio.gather(sampler(), *[worker(w) for w in range(WORKERS)]), timeout=seconds + 60
        )
    return samples, served


def test_soak_mixed_traffic_rss_flattens(server, engine, greedy_reference):
    rollup_before = smaps_rollup_kib()
    samples, served = asyncio.run(_soak(server, SOAK_S))
    rollup_after = smaps_rollup_kib()
    kv_bytes = engine.engine.engine_core.model_runner.kv_cache_bytes

    base = samples[0][1]
    print(
        f"\nsoak {SOAK_S:g} s, {WORKERS} workers: {served} requests "
        f"({served / SOAK_S:.0f}/s); RSS samples (s, MiB, growth since start):"
    )
    for t, rss in samples:
        print(f"  {t:6.1f} s  {mib(rss):8.1f}  {mib(rss - base):+7.1f}")
    for key in ("Rss", "Anonymous", "AnonHugePages"):
        if key in rollup_before and key in rollup_after:
            print(
                f"  smaps_rollup {key}: {rollup_before[key] / 1024:.1f} -> "
                f"{rollup_after[key] / 1024:.1f} MiB"
            )
    print(f"  KV cache: {mib(kv_bytes):.1f} MiB, the most first-touched KV pages can add")
    mid = samples[len(samples) // 2][1]
    first_half, second_half = mib(mid - base), mib(samples[-1][1] - mid)
    print(f"  growth: first half {first_half:+.1f} MiB, second half {second_half:+.1f} MiB")

    assert served >= SOAK_S, "the soak served less than one request a second"
    assert second_half < MAX_SECOND_HALF_GROWTH_MIB
    assert_serving_as_before(server, greedy_reference)
