"""Regression tests for requests that used to take the server down, hang others or
slip past the key (one test per defect)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn

from backplane.config.server_options import ServerOptions
from backplane.core.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine
from backplane.entrypoints.cli.serve import EXIT_ENGINE_DEAD, _exit_code
from backplane.entrypoints.openai.api_server import build_app
from backplane.entrypoints.openai.http_server import DrainingServer
from backplane.sampling_params import SamplingParams
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import API_KEY, start_server, tiny_engine_args, wait_until_idle

GREEDY = {"model": SERVED_NAME, "prompt": "In the beginning", "max_tokens": 6, "temperature": 0}


def _greedy_text(c: httpx.Client) -> str:
    r = c.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 9223372036854775808, "temperature": 1}, "top_k"),
        ({"seed": 18446744073709551616}, "seed"),
        ({"n": 9223372036854775808}, "n"),
        ({"min_tokens": 2, "stop_token_ids": [999999]}, "stop_token_ids"),
        ({"priority": -(2**63) - 1}, "priority"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"n": 100000}, "n"),
    ],
)
def test_oversized_numbers_are_400_and_the_engine_keeps_serving(server, extra, param):
    with server.client() as c:
        before = _greedy_text(c)
        r = c.post("/v1/completions", json={**GREEDY, "max_tokens": 8, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        assert c.get("/health").status_code == 200
        assert _greedy_text(c) == before


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_lone_surrogate_is_400_not_500(server, endpoint):
    body = (
        {"prompt": "\ud800abc"}
        if endpoint != "/v1/chat/completions"
        else {"messages": [{"role": "user", "content": "x\udfffy"}]}
    )
    # json.dumps escapes the surrogate as \ud800, as a client's JSON encoder would
    raw = json.dumps({"model": SERVED_NAME, **body})
    with server.client() as c:
        r = c.post(endpoint, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone surrogate" in r.json()["error"]["message"]


def test_huge_prompt_is_refused_cheaply_and_health_stays_responsive(server):
    huge = "abc " * 2_500_000  # 10 MB
    with server.client() as c:
        result = {}

        def send():
            result["r"] = c.post("/v1/completions", json={**GREEDY, "prompt": huge})

        t = threading.Thread(target=send)
        t.start()
        worst = 0.0
        while t.is_alive():
            t0 = time.time()
            with server.client() as probe:
                assert probe.get("/health").status_code == 200
            worst = max(worst, time.time() - t0)
        t.join()
    assert result["r"].status_code == 400
    assert "too long" in result["r"].json()["error"]["message"]
    assert worst < 1.0, f"/health took {worst:.2f} s while the prompt was processed"


SLOW_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi"
)


def test_request_chat_template_needs_opt_in(server):
    with server.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": SERVED_NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template": "{{ messages[0].content }}",
            },
        )
        assert r.status_code == 400
        assert "--trust-request-chat-template" in r.json()["error"]["message"]
        r = c.post(
            "/tokenize",
            json={"messages": [{"role": "user", "content": "hi"}],
                  "chat_template_kwargs": {"chat_template": "x"}},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"


@pytest.fixture(scope="module")
def trusting_server(llama_model_dir):
    engine = AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir))
    running = start_server(
        engine,
        api_key=None,
        options=ServerOptions(trust_request_chat_template=True, chat_template_timeout=0.5),
    )
    yield running
    running.stop()


def test_trusted_request_template_is_rendered_and_bounded_in_time(trusting_server):
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}|{{ flavour }}"
    with trusting_server.client() as c:
        r = c.post(
            "/tokenize",
            json={"messages": messages, "chat_template": template, "tools": tools,
                  "chat_template_kwargs": {"flavour": "mint"}, "add_generation_prompt": False},
        )
        assert r.status_code == 200, r.text
        ids = r.json()["tokens"]
        expected = c.post("/tokenize", json={"prompt": "lookup|mint", "add_special_tokens": False})
        assert ids == expected.json()["tokens"]
        t0 = time.time()
        r = c.post("/v1/chat/completions",
                   json={"messages": messages, "chat_template": SLOW_TEMPLATE})
        assert r.status_code == 400 and "longer than 0.5 s" in r.json()["error"]["message"]
        assert time.time() - t0 < 5
        assert c.get("/health").status_code == 200


def test_duplicate_client_request_id_never_ends_another_request(server):
    body = {**GREEDY, "max_tokens": 40, "ignore_eos": True, "request_id": "dup-3", "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                     timeout=30) as c:
            async def one():
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
                return r.status_code, lines

            return await asyncio.gather(one(), one(), one())

    for status, lines in asyncio.run(run()):
        assert status == 200
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in lines[-2]
        assert '"id": "dup-3"' in lines[0]
    wait_until_idle(server)


def test_abort_while_iterating_ends_the_stream_with_abort(server):
    engine = server.engine

    async def run():
        params = SamplingParams(max_tokens=100, ignore_eos=True, temperature=0)
        outputs = []
        t0 = None
        async for out in engine.generate("abort-me", [5, 6, 7], params):
            outputs.append(out)
            if len(outputs) == 2:
                t0 = time.time()
                await engine.abort("abort-me")
        return outputs, time.time() - t0

    outputs, waited = asyncio.run(run())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert waited < 2
    wait_until_idle(server)


def test_open_paths_stay_open_under_a_root_path(llama_model_dir):
    engine = AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir))
    app = build_app(engine, api_key=API_KEY)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", root_path="/api")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        # As behind a proxy that strips the /api prefix: uvicorn puts it back in
        # front of the ASGI path, and the key check must look past it.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for path in ("/health", "/metrics", "/version", "/ping"):
                assert c.get(path).status_code == 200, path
            assert c.get("/v1/models").status_code == 401
            ok = c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
            assert ok.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_several_served_model_names(llama_model_dir):
    from backplane.entrypoints.cli.main import build_parser
    from backplane.entrypoints.cli.serve import build_engine_args

    args = build_parser().parse_args(
        ["serve", llama_model_dir, "--served-model-name", "foo", "bar", "--max-model-len", "64"]
    )
    engine_args = build_engine_args(args)
    assert engine_args.served_model_name == ["foo", "bar"]
    engine = AsyncEngine.from_engine_args(engine_args)
    running = start_server(engine, api_key=None)
    try:
        with running.client() as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["foo", "bar"]
            for name in ("foo", "bar"):
                r = c.post("/v1/completions", json={**GREEDY, "model": name})
                assert r.status_code == 200 and r.json()["model"] == "foo"
    finally:
        running.stop()


def test_engine_death_stops_the_server_with_a_failing_exit_status(llama_model_dir):
    engine = AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir))
    config = uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning")
    server = DrainingServer(config, engine, grace_s=1.0)
    engine.add_dead_callback(server.engine_died)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def broken_step():
        raise RuntimeError("device lost")

    engine.engine.step = broken_step
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
            assert c.post("/v1/completions", json={**GREEDY, "model": None}).status_code >= 500
    thread.join(15)
    assert not thread.is_alive(), "the server kept running on a dead engine"
    assert _exit_code([engine], 0) == EXIT_ENGINE_DEAD
