"""What the reliability tests share: the greedy "still serving as before" check, the
OpenAI error shape, SSE parsing and memory figures.

Each test that disturbs the server (fuzzing, bad inputs, disconnects, soak)
ends with `assert_serving_as_before`: the same greedy request returns the same
text, /health is 200, and nothing is left running, waiting or holding KV
blocks. Loads are sized so that the whole directory runs in about a minute on
two cores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import httpx

from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.server_utils import (
    API_KEY,
    RunningServer,
    metric,
    start_server,
    wait_until_idle,
)

SERVED_NAME = "tiny-llama"
# The request whose greedy text must not change after a test disturbed the server.
# Its prompt is shorter than one KV block, so no prefix-cache hit can change how
# it is computed.
GREEDY_REQUEST = {"prompt": "In the beginning", "max_tokens": 12, "temperature": 0}


def serve(engine: AsyncEngine, api_key: str | None = API_KEY, **kwargs) -> RunningServer:
    """Another server on the shared engine; stopping it leaves the engine running."""
    return start_server(engine, api_key=api_key, shutdown_engine_on_exit=False, **kwargs)


def greedy_text(server: RunningServer) -> str:
    with server.client() as c:
        resp = c.post("/v1/completions", json=GREEDY_REQUEST)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def assert_serving_as_before(server: RunningServer, reference: str) -> None:
    """Idle (no request running or waiting, KV usage 0), healthy, and greedy text unchanged."""
    text = wait_until_idle(server, timeout=20)
    for name in (
        "backplane:num_requests_running",
        "backplane:num_requests_waiting",
        "backplane:kv_cache_usage_perc",
    ):
        assert metric(text, name) == 0, f"{name} = {metric(text, name)} after the test"
    assert server.engine.num_unfinished_requests == 0
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/health").status_code == 200
    assert greedy_text(server) == reference
    wait_until_idle(server, timeout=20)


def finished_counts(server: RunningServer) -> dict[str, float]:
    """backplane:request_success_total by finished_reason (every engine request ends once)."""
    with server.client() as c:
        text = c.get("/metrics").text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("backplane:request_success_total{"):
            reason = line.split('finished_reason="', 1)[1].split('"', 1)[0]
            counts[reason] = counts.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def assert_openai_error(resp: httpx.Response, low: int = 400, high: int = 499) -> dict:
    """``resp`` is a ``low``..``high`` status with OpenAI's error body; the error dict."""
    assert low <= resp.status_code <= high, f"{resp.status_code}: {resp.text[:500]}"
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


async def stream_events(
    client: httpx.AsyncClient,
    path: str,
    body: dict,
    *,
    keep: int | None = None,
    on_event: Callable[[str], None] | None = None,
) -> list[str]:
    """POST ``body`` (a streaming request) to ``path``; the SSE ``data:`` payloads in order.

    With ``keep``, the connection is dropped after that many payloads, mid-stream
    as far as the server knows; ``on_event`` is called with each payload.
    """
    events: list[str] = []
    async with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, (await resp.aread())[:500]
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if on_event is not None:
                    on_event(events[-1])
                if keep is not None and len(events) >= keep:
                    break  # leaving the block closes the connection
    return events


def last_finish_reason(events: list[str]) -> str | None:
    """The finish_reason of the last chunk that has one (completions or chat)."""
    reason = None
    for data in events:
        if data.startswith("{"):
            for choice in json.loads(data).get("choices", []):
                reason = choice.get("finish_reason") or reason
    return reason


# ----- memory -----


def rss_bytes() -> int:
    """This process's resident set size (psutil if installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        return _proc_status_kib("VmRSS") * 1024
    return psutil.Process().memory_info().rss


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def smaps_rollup_kib() -> dict[str, int]:
    """Rss, Anonymous, AnonHugePages... of this process in KiB ({} where unavailable)."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        return {}
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
