"""Server options that act at the HTTP layer, through the same uvicorn configuration
`backplane serve` builds (`uvicorn_config`): TLS, connection limit, keep-alive,
uvicorn's log level, CORS details and the periodic stats log."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from backplane.config.server_options import ServerOptions
from backplane.core.engine.async_engine import AsyncEngine
from backplane.entrypoints.cli.serve import uvicorn_config
from backplane.entrypoints.openai import api_server
from backplane.entrypoints.openai.api_server import build_app
from tests.entrypoints.server_utils import serve_in_thread, tiny_engine_args


@pytest.fixture(scope="module")
def engine(llama_model_dir):
    engine = AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir))
    yield engine
    engine.shutdown()


def _serve(engine, **options) -> tuple[uvicorn.Server, threading.Thread, int]:
    opts = ServerOptions(host="127.0.0.1", port=0, **options)
    app = build_app(engine, options=opts, shutdown_engine_on_exit=False)
    return serve_in_thread(uvicorn_config(app, opts))


def _stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_ssl_keyfile_and_certfile_serve_https(engine, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server, thread, port = _serve(engine, ssl_keyfile=str(key), ssl_certfile=str(cert))
    try:
        with httpx.Client(verify=False, timeout=10) as c:
            assert c.get(f"https://127.0.0.1:{port}/health").status_code == 200
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=5) as c:
            c.get(f"http://127.0.0.1:{port}/health")
    finally:
        _stop(server, thread)


def test_limit_concurrency_reaches_uvicorn(engine):
    # uvicorn counts the connection being served itself: at limit 1 every request is
    # past the limit, which shows the option is applied (503 "Exceeded concurrency limit").
    for limit, status in ((1, 503), (8, 200)):
        server, thread, port = _serve(engine, limit_concurrency=limit)
        try:
            with httpx.Client(timeout=10) as c:
                assert c.get(f"http://127.0.0.1:{port}/health").status_code == status
        finally:
            _stop(server, thread)


def test_timeout_keep_alive_closes_idle_connections(engine):
    server, thread, port = _serve(engine, timeout_keep_alive=0.5)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            t0 = time.time()
            assert sock.recv(4096) == b""  # closed by the server when the timeout ran out
            assert 0.3 < time.time() - t0 < 4
    finally:
        _stop(server, thread)


def test_uvicorn_log_level_is_applied(engine):
    logger = logging.getLogger("uvicorn.error")
    before = logger.level
    try:
        uvicorn_config(build_app(engine), ServerOptions(uvicorn_log_level="error"))
        assert logger.level == logging.ERROR
        uvicorn_config(build_app(engine), ServerOptions(uvicorn_log_level="debug"))
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


def test_cors_methods_headers_and_credentials(engine):
    app = build_app(engine, shutdown_engine_on_exit=False, options=ServerOptions(
        allowed_origins=["http://a.example"], allowed_methods=["GET"],
        allowed_headers=["X-Custom"], allow_credentials=True,
    ))
    client = TestClient(app)
    preflight = client.options("/v1/models", headers={
        "Origin": "http://a.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "X-Custom",
    })
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-methods"] == "GET"
    assert preflight.headers["access-control-allow-headers"].lower().endswith("x-custom")
    assert preflight.headers["access-control-allow-credentials"] == "true"
    refused = client.options("/v1/models", headers={
        "Origin": "http://a.example", "Access-Control-Request-Method": "DELETE",
    })
    assert refused.status_code == 400


@pytest.mark.parametrize("disabled", [False, True])
def test_disable_log_stats_turns_the_stats_task_off(engine, monkeypatch, disabled):
    started = []

    async def fake_log_stats(_engine, interval=10.0):
        started.append(interval)

    monkeypatch.setattr(api_server, "log_stats", fake_log_stats)
    app = build_app(engine, shutdown_engine_on_exit=False,
                    options=ServerOptions(disable_log_stats=disabled))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
    assert bool(started) is not disabled
