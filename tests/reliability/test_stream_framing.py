"""Streamed text with Unicode line separators keeps every SSE event on one line.

SSE breaks lines only at CR and LF, but many readers split like
``str.splitlines()``, which also breaks at U+0085, U+2028 and U+2029: httpx's
``iter_lines``/``aiter_lines`` among them. Generated text can hold those
characters (the soak found one in a chat delta), so the server escapes them in
the JSON it streams; the JSON still decodes to the same text. Echoed text
(completions' ``echo``, the Responses API's ``instructions`` and ``metadata``)
puts them in a stream deterministically.
"""

from __future__ import annotations

import json

TEXT = "one\u2028two\u2029three\x85four"


def _lines(server, path: str, body: dict) -> list[str]:
    """The stream's non-empty lines as httpx's iter_lines splits them (like str.splitlines)."""
    with server.client() as c, c.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        return [line for line in resp.iter_lines() if line]


def test_line_separators_in_a_completion_stream_do_not_split_events(server):
    body = {"prompt": TEXT, "echo": True, "max_tokens": 2, "stream": True}
    lines = _lines(server, "/v1/completions", body)
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks).startswith(TEXT)


def test_line_separators_in_a_responses_stream_do_not_split_events(server):
    body = {
        "input": "hi",
        "instructions": TEXT,
        "metadata": {"note": TEXT},
        "max_output_tokens": 2,
        "stream": True,
    }
    lines = _lines(server, "/v1/responses", body)
    assert all(line.startswith(("event: ", "data: ")) for line in lines), lines
    events = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert events[0]["type"] == "response.created"
    assert events[0]["response"]["instructions"] == TEXT
    assert events[-1]["response"]["metadata"] == {"note": TEXT}
