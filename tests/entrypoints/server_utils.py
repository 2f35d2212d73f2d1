"""Run the real OpenAI server (uvicorn) in a background thread on a free loopback port."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from backplane.config import EngineArgs
from backplane.core.engine.async_engine import AsyncEngine
from backplane.entrypoints.openai.api_server import build_app

API_KEY = "test-key"
MAX_MODEL_LEN = 128


def tiny_engine_args(model_dir: str, **overrides) -> EngineArgs:
    """Small limits so that tests run fast and exercise the length checks."""
    kwargs = dict(
        model=model_dir,
        max_model_len=MAX_MODEL_LEN,
        num_kv_blocks=160,
        block_size=16,
        max_num_seqs=64,
        seed=0,
    )
    kwargs.update(overrides)
    return EngineArgs(**kwargs)


@dataclass
class RunningServer:
    """A live server: its base URL, its AsyncEngine, and the uvicorn server."""

    url: str
    engine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(
    engine: AsyncEngine,
    api_key: str | None = API_KEY,
    *,
    uvicorn_options: dict | None = None,
    **app_kwargs,
) -> RunningServer:
    """Start uvicorn in a thread (port 0: the OS picks a free port) and wait until it serves.

    ``uvicorn_options`` go to ``uvicorn.Config`` (e.g. ``http=`` a protocol class);
    ``app_kwargs`` to ``build_app``.
    """
    app = build_app(engine, api_key=api_key, **app_kwargs)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", **(uvicorn_options or {})
    )
    server, thread, port = serve_in_thread(config)
    return RunningServer(f"http://127.0.0.1:{port}", engine, server, thread, api_key)


def serve_in_thread(config: uvicorn.Config) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Run uvicorn with ``config`` (port 0 picks a free one) in a thread; wait until it serves."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (labels given must match)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name}{labels} not in metrics")


def wait_until_idle(server: RunningServer, timeout: float = 10.0) -> str:
    """Poll /metrics until nothing runs or waits and no KV block is held; return the text."""
    deadline = time.time() + timeout
    with server.client() as c:
        while True:
            text = c.get("/metrics").text
            idle = (
                metric(text, "backplane:num_requests_running") == 0
                and metric(text, "backplane:num_requests_waiting") == 0
                and metric(text, "backplane:kv_cache_usage_perc") == 0
            )
            if idle or time.time() > deadline:
                return text
            time.sleep(0.05)


def wait_healthy(url: str, proc, logs, timeout: float = 90.0) -> None:
    """Wait until a `backplane serve` subprocess answers /health with 200.

    ``logs()`` returns its output so far, for the failure message; a process
    that exits first fails at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "server exited at start-up:\n" + logs()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up:\n" + logs()
        time.sleep(0.2)


@contextlib.contextmanager
def serve_process(model_dir: str, log: Path, *flags: str, timeout: float = 90.0):
    """A `backplane serve MODEL --port P *flags` subprocess on a free loopback port, its
    output in ``log``; yields ``(url, process, log reader)`` once /health answers 200,
    and kills it on exit if it still runs (a test may have ended it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backplane.entrypoints.cli.main", "serve", model_dir,
             "--port", str(port), *flags],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log.read_text, timeout=timeout)
        yield url, proc, log.read_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
