"""`backplane bench serve` against the real OpenAI server and against a minimal SSE mock.

No timing assertions: the runs prove requests stream, metrics are computed and
every documented JSON field is present.
"""

from __future__ import annotations

import json
import threading

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from backplane.entrypoints.cli.main import main
from tests.entrypoints.server_utils import serve_in_thread

SERVE_KEYS = {
    "completed", "failed", "duration_s", "request_throughput", "output_throughput",
    "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms",
}


def _start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server, thread, port = serve_in_thread(config)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def real_server(bench_tiny_model):
    from backplane.config import EngineArgs
    from backplane.core.engine.async_engine import AsyncEngine
    from backplane.entrypoints.openai.api_server import build_app

    engine = AsyncEngine.from_engine_args(EngineArgs(
        model=bench_tiny_model, served_model_name="tiny-bench", max_model_len=256,
        num_kv_blocks=128, max_num_seqs=16,
    ))
    server, thread, url = _start(build_app(engine, api_key=None))
    yield url
    server.should_exit = True
    thread.join(30)


def test_serve_against_backplane_server(real_server, bench_tiny_model, tmp_path):
    path = tmp_path / "serve.json"
    code = main([
        "bench", "serve", "--base-url", real_server, "--model", "tiny-bench",
        "--tokenizer", bench_tiny_model, "--num-prompts", "6", "--request-rate", "50",
        "--input-len", "16", "--output-len", "8", "--goodput", "ttft:60000", "tpot:60000",
        "--no-progress", "--json", str(path),
    ])
    assert code == 0
    result = json.loads(path.read_text())
    assert SERVE_KEYS <= set(result)
    assert result["completed"] == 6 and result["failed"] == 0
    # ignore_eos + usage reporting: exactly 8 output tokens per request.
    assert result["total_output_tokens"] == 48
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(result[metric]) >= {"mean", "median", "p90", "p99"}
        assert result[metric]["p99"] >= result[metric]["median"] >= 0
    assert result["goodput"] == pytest.approx(result["request_throughput"])


def test_serve_structured_json_constrains_every_request(real_server, bench_tiny_model,
                                                        tmp_path):
    """--structured-json sends response_format json_schema; output lengths stay exact."""
    path = tmp_path / "serve.json"
    code = main([
        "bench", "serve", "--base-url", real_server, "--model", "tiny-bench",
        "--tokenizer", bench_tiny_model, "--num-prompts", "4", "--burst",
        "--input-len", "16", "--output-len", "12", "--structured-json",
        "--no-progress", "--json", str(path),
    ])
    assert code == 0
    result = json.loads(path.read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 48


def test_structured_payload_carries_the_schema():
    from backplane.benchmarks.serve import ServeRequest, _payload
    from backplane.benchmarks.throughput import structured_json_schema

    schema = structured_json_schema(8)
    body = _payload(ServeRequest("hi", 1, 8), "/v1/chat/completions", "m", True, 0.0, schema)
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "records", "schema": schema}}
    assert "response_format" not in _payload(ServeRequest("hi", 1, 8), "/v1/completions", "m",
                                             True, 0.0)


def _mock_app():
    """An OpenAI-style chat server that streams 5 words per request and reports no usage."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        assert body["stream"] is True and body["messages"][0]["role"] == "user"

        async def events():
            yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
            for i in range(5):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_serve_chat_against_mock_with_dataset(tmp_path, capsys):
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hello there"},
                           {"from": "gpt", "value": "one two three four five"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "how are you"},
                           {"from": "gpt", "value": "fine thanks"}]},
    ]))
    server, thread, url = _start(_mock_app())
    try:
        code = main([
            "bench", "serve", "--base-url", url, "--model", "mock",
            "--endpoint", "/v1/chat/completions", "--dataset", str(dataset),
            "--num-prompts", "10", "--burst", "--goodput", "e2el:0.000001", "--no-progress",
            "--json",
        ])
    finally:
        server.should_exit = True
        thread.join(30)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert SERVE_KEYS <= set(result)
    # The one-turn conversation is skipped; no usage, so tokens are counted from chunks.
    assert result["completed"] == 2 and result["total_output_tokens"] == 10
    assert result["request_rate"] == "inf"
    assert result["good_requests"] == 0  # nothing finishes within a 1 ns E2E SLO


def test_serve_reports_failures(capsys):
    code = main([
        "bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "x",
        "--num-prompts", "2", "--no-progress", "--json",
    ])
    captured = capsys.readouterr()
    assert code == 1
    result = json.loads(captured.out)
    assert result["failed"] == 2 and result["completed"] == 0
    assert result["errors"] and "requests failed" in captured.err
