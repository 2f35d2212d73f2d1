"""SIGTERM to a real `backplane serve` process while streams run.

Short streams finish normally within the grace period; long ones get an SSE
error event and ``data: [DONE]`` when it ends; the process exits 0 soon after,
with no traceback on stderr. The engine steps are slowed down (see
slow_serve.py) so that the long streams reliably outlast the grace period.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.entrypoints.server_utils import wait_healthy
from tests.reliability.slow_serve import DELAY_ENV
from tests.reliability.support import stream_events

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 2
STEP_DELAY_S = 0.02
NUM_LONG, NUM_SHORT = 6, 2
# At >= 20 ms a step, 220 tokens take >= 4.4 s: well past the grace period.
LONG_TOKENS = 220
# >= 0.8 s: still running when the signal comes, done well within the grace period.
SHORT_TOKENS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream(
    client: httpx.AsyncClient, i: int, started: asyncio.Event, signalled: asyncio.Event
) -> dict:
    """Stream ``i`` (the first NUM_LONG are long); sets ``started`` at its first event."""
    max_tokens = LONG_TOKENS if i < NUM_LONG else SHORT_TOKENS
    body = {
        "prompt": f"Stream {i} begins",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    done_before_signal = False

    def seen(event: str) -> None:
        nonlocal done_before_signal
        started.set()
        done_before_signal |= event == "[DONE]" and not signalled.is_set()

    events = await stream_events(client, "/v1/completions", body, on_event=seen)
    return {"events": events, "done_before_signal": done_before_signal}


async def _load_then_sigterm(url: str, proc: subprocess.Popen) -> tuple[list[dict], float]:
    signalled = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=10)) as client:
        started = [asyncio.Event() for _ in range(NUM_LONG + NUM_SHORT)]
        tasks = [
            asyncio.ensure_future(_stream(client, i, started[i], signalled))
            for i in range(NUM_LONG + NUM_SHORT)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
        proc.send_signal(signal.SIGTERM)
        signalled.set()
        signalled_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=GRACE_S + 20)
    return results, signalled_at


def test_sigterm_under_load_finishes_short_streams_errors_long_ones_and_exits_0(
    llama_model_dir, tmp_path
):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = dict(os.environ, BACKPLANE_LOGGING_LEVEL="INFO", **{DELAY_ENV: str(STEP_DELAY_S)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "tests.reliability.slow_serve",
        "serve",
        llama_model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "256",
        "--num-kv-blocks",
        "160",
        "--block-size",
        "16",
        "--graceful-shutdown-timeout",
        str(GRACE_S),
        "--disable-log-stats",
    ]

    def logs() -> str:
        return f"--- stdout\n{out_path.read_text()}\n--- stderr\n{err_path.read_text()}"

    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
    try:
        wait_healthy(url, proc, logs)
        results, signalled_at = asyncio.run(_load_then_sigterm(url, proc))
        try:
            code = proc.wait(timeout=max(0.1, signalled_at + GRACE_S + 10 - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within {GRACE_S + 10} s of SIGTERM:\n{logs()}") from None
        exit_s = time.monotonic() - signalled_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    print(f"exit status {code} {exit_s:.1f} s after SIGTERM (grace {GRACE_S} s)")
    assert code == 0, logs()

    for i, r in enumerate(results):
        events = r["events"]
        assert events and events[-1] == "[DONE]", (i, events[-3:])
        last = json.loads(events[-2])
        if i < NUM_LONG:  # cut off at the end of the grace period
            assert set(last) == {"error"}, (i, events[-3:])
            assert set(last["error"]) == {"message", "type", "param", "code"}
            assert "grace period" in last["error"]["message"], last
            texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
            assert 0 < len(texts) < LONG_TOKENS
        else:  # in flight at the signal, finished normally
            assert not r["done_before_signal"], f"short stream {i} ended before the signal"
            assert last["choices"][0]["finish_reason"] == "length", (i, events[-3:])
            assert not any('"error"' in e for e in events), (i, events)
    stderr = err_path.read_text()
    assert "Traceback" not in stderr, stderr
    assert "shutting down" in stderr, logs()
