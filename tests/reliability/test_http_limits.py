"""The HTTP layer's own limits: request body size (413) and the request-header timeout."""

from __future__ import annotations

import json
import socket
import time

import pytest

from backplane.config.server_options import ServerOptions
from backplane.entrypoints.openai.http_server import HeaderTimeoutH11Protocol
from tests.entrypoints.server_utils import metric
from tests.reliability.support import (
    assert_openai_error,
    assert_serving_as_before,
    finished_counts,
    serve,
)

BODY_LIMIT = 2048
HEADER_TIMEOUT_S = 1.0
SMALL_REQUEST = {"prompt": "hi", "max_tokens": 3}


@pytest.fixture(scope="module")
def limited_server(engine):
    """No API key; bodies over BODY_LIMIT bytes refused; headers due within 1 s."""
    running = serve(
        engine,
        api_key=None,
        options=ServerOptions(max_request_body_bytes=BODY_LIMIT),
        uvicorn_options={"http": HeaderTimeoutH11Protocol.with_timeout(HEADER_TIMEOUT_S)},
    )
    yield running
    running.stop()


def _body(prompt_len: int) -> bytes:
    return json.dumps({"prompt": "x" * prompt_len, "max_tokens": 3}).encode()


def _chunks(data: bytes, size: int = 512):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_body_over_the_limit_gets_413_with_content_length_or_chunked(
    limited_server, greedy_reference
):
    big, small = _body(3 * BODY_LIMIT), _body(64)
    headers = {"content-type": "application/json"}
    with limited_server.client() as c:
        declared = c.post("/v1/completions", content=big, headers=headers)
        chunked = c.post("/v1/completions", content=_chunks(big), headers=headers)
        chunked_small = c.post("/v1/completions", content=_chunks(small, 16), headers=headers)
    for resp in (declared, chunked):
        err = assert_openai_error(resp, 413, 413)
        assert err["code"] == "request_too_large" and str(BODY_LIMIT) in err["message"], err
    assert declared.request.headers["content-length"] == str(len(big))
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    # a chunked body under the limit is read and served as usual
    assert chunked_small.status_code == 200, chunked_small.text
    assert_serving_as_before(limited_server, greedy_reference)


def _closed_by_server(sock: socket.socket, deadline: float, trickle: bool) -> float | None:
    """When the server closed ``sock`` (monotonic time), or None if it did not by ``deadline``.

    With ``trickle`` one more header byte is sent every 0.2 s meanwhile.
    """
    pending = b"X-Slow-Header: still-coming\r\n"
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            if trickle and pending:
                try:
                    sock.sendall(pending[:1])
                except OSError:
                    return time.monotonic()
                pending = pending[1:]
            continue
        except ConnectionResetError:
            return time.monotonic()
        assert data == b"", f"the server answered a request it never fully got: {data!r}"
        return time.monotonic()
    return None


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
def test_partial_request_head_is_closed_after_header_timeout(limited_server, trickle):
    host, port = limited_server.url.removeprefix("http://").split(":")
    counts_before = finished_counts(limited_server)
    with socket.create_connection((host, int(port)), timeout=5) as slow:
        opened = time.monotonic()
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
        )
        # meanwhile, another connection is served as usual, and nothing runs for the slow one
        with limited_server.client() as c:
            assert metric(c.get("/metrics").text, "backplane:num_requests_running") == 0
            ok = c.post("/v1/completions", json=SMALL_REQUEST)
            assert ok.status_code == 200, ok.text
            assert metric(c.get("/metrics").text, "backplane:num_requests_running") == 0
        closed = _closed_by_server(slow, opened + 6, trickle)
    assert closed is not None, "the server kept a connection with a partial request head open"
    waited = closed - opened
    print(
        f"partial request head ({'trickling' if trickle else 'stalled'}) closed after "
        f"{waited:.2f} s (header timeout {HEADER_TIMEOUT_S:g} s)"
    )
    assert HEADER_TIMEOUT_S - 0.2 <= waited <= 3 * HEADER_TIMEOUT_S
    # exactly one engine request ran: the normal one
    counts = finished_counts(limited_server)
    assert sum(counts.values()) - sum(counts_before.values()) == 1
