"""200 concurrent streams, 30% of them dropped mid-stream: none lost, nothing leaked."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.reliability.support import (
    assert_serving_as_before,
    finished_counts,
    last_finish_reason,
    mib,
    rss_bytes,
    stream_events,
)

NUM_STREAMS = 200
# Bound on this process's RSS growth over the run (server and clients share it).
MAX_RSS_GROWTH_MIB = 200


def _request(i: int) -> tuple[str, dict, bool, int]:
    """(path, body, disconnect?, data events to read before dropping) of stream ``i``.

    Three in ten drop the connection after 1-3 chunks; they ask for many tokens
    so that they are still generating when dropped. Completions and chat alternate.
    """
    disconnect = i % 10 in (1, 4, 7)
    common = {
        "max_tokens": 96 if disconnect else 12 + i % 9,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": i,
    }
    if i % 2:
        body = {"messages": [{"role": "user", "content": f"Stream number {i}"}], **common}
        return "/v1/chat/completions", body, disconnect, 1 + i % 3
    return "/v1/completions", {"prompt": f"Stream number {i} says", **common}, disconnect, 1 + i % 3


async def _one(client: httpx.AsyncClient, i: int) -> dict:
    path, body, disconnect, keep = _request(i)
    events = await stream_events(client, path, body, keep=keep if disconnect else None)
    return {"i": i, "disconnect": disconnect, "events": events}


async def _run_all(server) -> list[dict]:
    limits = httpx.Limits(max_connections=NUM_STREAMS + 10, max_keepalive_connections=20)
    async with httpx.AsyncClient(
        base_url=server.url,
        headers=server.headers,
        limits=limits,
        timeout=httpx.Timeout(120, connect=30),
    ) as client:
        return await asyncio.wait_for(
            asyncio.gather(*[_one(client, i) for i in range(NUM_STREAMS)]), timeout=180
        )


def test_200_streams_with_30pct_disconnects_lose_nothing_and_free_everything(
    server, greedy_reference
):
    # one small round first, so that lazily built state is not counted as growth
    asyncio.run(asyncio.wait_for(_one_round(server), timeout=60))
    before, counts_before = rss_bytes(), finished_counts(server)
    results = asyncio.run(_run_all(server))
    after = rss_bytes()

    dropped = [r for r in results if r["disconnect"]]
    kept = [r for r in results if not r["disconnect"]]
    assert len(dropped) == 60 and len(kept) == 140
    lost = []
    for r in kept:
        events = r["events"]
        if not events or events[-1] != "[DONE]" or last_finish_reason(events) != "length":
            lost.append((r["i"], events[-3:]))
        errors = [e for e in events if e.startswith("{") and "error" in json.loads(e)]
        assert not errors, (r["i"], errors)
    assert not lost, f"{len(lost)} streams ended without finish_reason and [DONE]: {lost[:5]}"
    growth = mib(after - before)
    print(f"RSS before {mib(before):.1f} MiB, after {mib(after):.1f} MiB, growth {growth:+.1f} MiB")
    # the server records an abort when it notices the disconnect, which may be a moment
    # after the client left
    deadline = time.monotonic() + 20
    while True:
        counts = finished_counts(server)
        delta = {k: counts[k] - counts_before.get(k, 0) for k in counts}
        if sum(delta.values()) >= NUM_STREAMS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(f"engine requests finished during the run, by reason: {delta}")
    # every engine request ended exactly once; a dropped one either finished first or
    # was aborted when its client went away
    assert sum(delta.values()) == NUM_STREAMS
    assert delta.get("length", 0) >= len(kept) and delta.get("abort", 0) > 0
    assert_serving_as_before(server, greedy_reference)  # running/waiting/KV usage all 0
    assert growth < MAX_RSS_GROWTH_MIB


async def _one_round(server) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as c:
        await asyncio.gather(*[_one(c, i) for i in range(10)])
