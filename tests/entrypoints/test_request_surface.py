"""The OpenAI server's request fields and server options, end to end (vLLM spelling).

Each test asserts the observable effect of one feature, so that it fails if the
feature were silently ignored. Request fields run against the package's shared
server (default options); the server options run against one more server,
``opts_server``, started once with every non-default option this file checks
(and an engine under the priority scheduling policy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid

import httpx
import pytest
from transformers import AutoTokenizer

from backplane.config.server_options import ServerOptions
from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import (
    MAX_MODEL_LEN,
    metric,
    start_server,
    tiny_engine_args,
    wait_until_idle,
)

OPTS_NAME = "tiny-llama-opts"
PROMPT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MARKER_HEADER = "X-Test-Marker"
SERVING_LOGGER = "backplane.entrypoints.openai.serving_common"
PROTOCOL_LOGGER = "backplane.entrypoints.openai.protocol"


async def add_marker_header(request, call_next):
    """The HTTP middleware function loaded by ``--middleware`` in ``opts_server``."""
    response = await call_next(request)
    response.headers[MARKER_HEADER] = "seen"
    return response


# ----- servers and helpers -----


@pytest.fixture(scope="module")
def opts_server(llama_model_dir):
    """A second server with every server option of this file set to a non-default value."""
    engine = AsyncEngine.from_engine_args(
        tiny_engine_args(
            llama_model_dir, served_model_name=OPTS_NAME, scheduling_policy="priority"
        )
    )
    options = ServerOptions(
        enable_request_id_headers=True,
        allowed_origins=["http://a.example"],
        disable_fastapi_docs=True,
        middleware=[f"{__name__}.add_marker_header"],
        response_role="bot",
        stream_interval=4,
        max_n=2,
        max_sequences_per_request=4,
        expose_model_path=True,
        enable_log_requests=True,
        max_request_body_bytes=2000,
        disable_log_stats=True,
    )
    running = start_server(engine, options=options)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    """httpx client of the shared (default options) server."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def opts_http(opts_server):
    """httpx client of ``opts_server``."""
    with opts_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(llama_model_dir):
    return AutoTokenizer.from_pretrained(llama_model_dir)


def body_of(path: str, model: str = SERVED_NAME, **fields) -> dict:
    """A small greedy request body for ``path`` (completions or chat) plus ``fields``."""
    base = {"model": model, "max_tokens": 4, "temperature": 0}
    base.update({"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES})
    base.update(fields)
    return base


def ok(c: httpx.Client, path: str, body: dict, **kwargs) -> dict:
    resp = c.post(path, json=body, **kwargs)
    assert resp.status_code == 200, resp.text
    return resp.json()


def refused(c: httpx.Client, path: str, body: dict, param: str, status: int = 400) -> dict:
    """Assert an OpenAI error body naming ``param``; return the error."""
    resp = c.post(path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert param in err["message"], err
    return err


def stream_chunks(c: httpx.Client, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed response (``[DONE]`` checked and dropped)."""
    with c.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@contextlib.contextmanager
def captured(caplog, logger_name: str, level: int):
    """Capture ``logger_name`` directly (the CLI tests may turn off propagation to root)."""
    target = logging.getLogger(logger_name)
    old_level = target.level
    target.addHandler(caplog.handler)
    target.setLevel(level)
    try:
        yield caplog
    finally:
        target.removeHandler(caplog.handler)
        target.setLevel(old_level)


def prefix_cache_hits(server) -> float:
    return metric(wait_until_idle(server), "backplane:prefix_cache_hits_total")


# ----- request fields -----


def test_prompt_logprobs_completions(http, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    out = ok(http, COMPLETIONS, body_of(COMPLETIONS, prompt_logprobs=2))
    entries = out["choices"][0]["prompt_logprobs"]
    assert isinstance(entries, list) and len(entries) == len(ids)
    assert entries[0] is None
    for tid, entry in zip(ids[1:], entries[1:], strict=True):
        assert str(tid) in entry  # the prompt's own token, plus up to 2 others
        assert len(entry) <= 3
        for value in entry.values():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["logprob"] <= 0 and value["rank"] >= 1
    assert ok(http, COMPLETIONS, body_of(COMPLETIONS))["choices"][0]["prompt_logprobs"] is None


def test_prompt_logprobs_chat(http):
    out = ok(http, CHAT, body_of(CHAT, prompt_logprobs=1))
    entries = out["prompt_logprobs"]
    assert len(entries) == out["usage"]["prompt_tokens"]
    assert entries[0] is None and all(isinstance(e, dict) and e for e in entries[1:])
    assert ok(http, CHAT, body_of(CHAT)).get("prompt_logprobs") is None


def test_echo_with_max_tokens_zero_scores_the_prompt(http):
    out = ok(http, COMPLETIONS, body_of(COMPLETIONS, echo=True, max_tokens=0, logprobs=1))
    choice, usage = out["choices"][0], out["usage"]
    assert choice["text"] == PROMPT
    assert usage["completion_tokens"] == 0
    assert usage["total_tokens"] == usage["prompt_tokens"]
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == len(lps["token_logprobs"]) == usage["prompt_tokens"]
    assert lps["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lps["token_logprobs"][1:])


def test_max_tokens_zero_without_echo_is_400(http):
    refused(http, COMPLETIONS, body_of(COMPLETIONS, max_tokens=0), "max_tokens")


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_truncate_prompt_tokens(http, path):
    long_prompt = " ".join(["the quick brown fox jumps"] * 60)  # far over max_model_len
    long = {"prompt": long_prompt} if path == COMPLETIONS else {
        "messages": [{"role": "user", "content": long_prompt}]
    }
    assert http.post(path, json=body_of(path, **long)).status_code == 400  # too long
    out = ok(http, path, body_of(path, truncate_prompt_tokens=5, **long))
    assert out["usage"]["prompt_tokens"] == 5
    out = ok(http, path, body_of(path, truncate_prompt_tokens=-1, max_tokens=8, **long))
    assert out["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 8
    if path == CHAT:  # -1 leaves room for max_completion_tokens too
        body = body_of(path, truncate_prompt_tokens=-1, max_completion_tokens=6, **long)
        body.pop("max_tokens")
        assert ok(http, path, body)["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 6


def test_add_special_tokens(http, tokenizer):
    bos = tokenizer.bos_token_id
    assert tokenizer(PROMPT).input_ids[0] == bos  # the tiny Llama tokenizer adds BOS
    plain = len(tokenizer(PROMPT, add_special_tokens=False).input_ids)

    def prompt_tokens(path, **fields):
        return ok(http, path, body_of(path, **fields))["usage"]["prompt_tokens"]

    assert prompt_tokens(COMPLETIONS) == plain + 1  # default true: BOS added
    assert prompt_tokens(COMPLETIONS, add_special_tokens=False) == plain
    chat_default = prompt_tokens(CHAT)  # default false: the template alone
    assert prompt_tokens(CHAT, add_special_tokens=True) == chat_default + 1


def _as_ids(tokens) -> list[int]:
    assert tokens and all(re.fullmatch(r"token_id:\d+", t) for t in tokens), tokens
    return [int(t.split(":")[1]) for t in tokens]


def test_return_tokens_as_token_ids(http, tokenizer):
    body = body_of(COMPLETIONS, logprobs=2, return_tokens_as_token_ids=True)
    choice = ok(http, COMPLETIONS, body)["choices"][0]
    ids = _as_ids(choice["logprobs"]["tokens"])
    assert tokenizer.decode(ids) == choice["text"]
    for top in choice["logprobs"]["top_logprobs"]:
        _as_ids(list(top))
    plain = ok(http, COMPLETIONS, body_of(COMPLETIONS, logprobs=2))["choices"][0]
    assert not any(t.startswith("token_id:") for t in plain["logprobs"]["tokens"])

    body = body_of(CHAT, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    choice = ok(http, CHAT, body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert tokenizer.decode(_as_ids([e["token"] for e in content])) == choice["message"]["content"]
    for e in content:
        _as_ids([t["token"] for t in e["top_logprobs"]])


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_continuous_usage_stats(http, path):
    body = body_of(
        path, max_tokens=5, ignore_eos=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = stream_chunks(http, path, body)
    assert len(chunks) >= 3
    assert all(c["usage"] is not None for c in chunks), chunks
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion == sorted(completion)
    # include_usage alone: only the last chunk has usage
    only_last = stream_chunks(http, path, body_of(path, stream_options={"include_usage": True}))
    assert [c["usage"] is not None for c in only_last] == [False] * (len(only_last) - 1) + [True]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_stream_options_without_stream_is_400(http, path):
    body = body_of(path, stream_options={"include_usage": True})
    refused(http, path, body, "stream_options")


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_priority_needs_the_priority_policy(http, opts_http, path):
    err = refused(http, path, body_of(path, priority=5), "priority")
    assert "fcfs" in err["message"]
    ok(http, path, body_of(path, priority=0))
    ok(opts_http, path, body_of(path, model=OPTS_NAME, priority=5))


def test_cache_salt_isolates_the_prefix_cache(server, http):
    # A prompt no other test sends, long enough for several full 16-token blocks.
    sentence = "The quick brown fox jumps over the lazy dog while the farmer watches."
    prompt = f"{uuid.uuid4().hex[:8]} {sentence} {sentence}"  # about 80 tokens
    salt_a, salt_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"

    def hits_after(salt: str) -> float:
        before = prefix_cache_hits(server)
        ok(http, COMPLETIONS, body_of(COMPLETIONS, prompt=prompt, max_tokens=1, cache_salt=salt))
        return prefix_cache_hits(server) - before

    assert hits_after(salt_a) == 0  # first time: nothing cached
    assert hits_after(salt_a) >= 32  # same salt: the full blocks are reused
    assert hits_after(salt_b) == 0  # another salt: not shared


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "functions", [{"name": "f", "parameters": {}}]),
        (COMPLETIONS, "best_of", 2),
        (COMPLETIONS, "prompt_embeds", "abc"),
    ],
)
def test_unsupported_fields_are_400(http, path, field, value):
    err = refused(http, path, body_of(path, **{field: value}), field)
    assert "not supported" in err["message"]


def test_neutral_values_and_unknown_fields_are_accepted(http, caplog):
    ok(http, CHAT, body_of(CHAT, response_format={"type": "text"}, tools=[], tool_choice="none"))
    ok(http, COMPLETIONS, body_of(COMPLETIONS, best_of=1, use_beam_search=False, bad_words=[]))
    with captured(caplog, PROTOCOL_LOGGER, logging.WARNING):
        ok(http, COMPLETIONS, body_of(COMPLETIONS, foo=1))
    assert any("ignoring unknown field" in r.getMessage() and "foo" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_request_id_is_the_response_id(http, path):
    rid = f"client-{uuid.uuid4().hex}"
    assert ok(http, path, body_of(path, request_id=rid))["id"] == rid
    chunks = stream_chunks(http, path, body_of(path, request_id=rid))
    assert {c["id"] for c in chunks} == {rid}
    # Without a request_id in the body, the X-Request-Id header is the id shown.
    header_id = f"hdr-{uuid.uuid4().hex}"
    assert ok(http, path, body_of(path), headers={"X-Request-Id": header_id})["id"] == header_id


def test_same_request_id_twice_concurrently_both_complete(server, http):
    rid = f"dup-{uuid.uuid4().hex}"
    first = body_of(COMPLETIONS, prompt="Hello", request_id=rid, max_tokens=100, ignore_eos=True,
                    stream_options={"include_usage": True})
    with http.stream("POST", COMPLETIONS, json={**first, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert server.engine.num_unfinished_requests >= 1  # the first is still generating
        second = ok(http, COMPLETIONS, body_of(COMPLETIONS, request_id=rid, max_tokens=3))
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert second["id"] == rid and second["usage"]["completion_tokens"] == 3
    assert "error" not in rest[-1], rest[-1]
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert rest[-1]["usage"]["completion_tokens"] == 100


# ----- server options -----


def test_request_id_headers(http, opts_http):
    resp = opts_http.post(COMPLETIONS, json=body_of(COMPLETIONS, model=OPTS_NAME),
                          headers={"X-Request-Id": "mine-42"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "mine-42"
    generated = opts_http.get("/v1/models").headers.get("x-request-id")
    assert generated and generated != "mine-42"
    assert "x-request-id" not in http.get("/v1/models").headers  # off by default


def test_cors(http, opts_http):
    preflight = {"Access-Control-Request-Method": "POST"}
    resp = opts_http.options(CHAT, headers={"Origin": "http://a.example", **preflight})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "http://a.example"
    other = opts_http.options(CHAT, headers={"Origin": "http://b.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    resp = http.options(CHAT, headers={"Origin": "http://a.example", **preflight})
    assert not any(k.startswith("access-control-") for k in resp.headers)  # off by default
    resp = http.get("/v1/models", headers={"Origin": "http://a.example"})
    assert not any(k.startswith("access-control-") for k in resp.headers)


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_disable_fastapi_docs(http, opts_http, path):
    assert http.get(path).status_code == 200
    assert opts_http.get(path).status_code == 404


def test_middleware_option(http, opts_http):
    assert opts_http.get("/v1/models").headers[MARKER_HEADER] == "seen"
    assert MARKER_HEADER not in http.get("/v1/models").headers


def test_response_role(http, opts_http):
    body = body_of(CHAT, model=OPTS_NAME)
    assert ok(opts_http, CHAT, body)["choices"][0]["message"]["role"] == "bot"
    assert stream_chunks(opts_http, CHAT, body)[0]["choices"][0]["delta"]["role"] == "bot"
    assert ok(http, CHAT, body_of(CHAT))["choices"][0]["message"]["role"] == "assistant"


def test_stream_interval(opts_http):
    body = body_of(COMPLETIONS, model=OPTS_NAME, max_tokens=12, ignore_eos=True)
    whole = ok(opts_http, COMPLETIONS, body)
    assert whole["usage"]["completion_tokens"] == 12
    chunks = [c for c in stream_chunks(opts_http, COMPLETIONS, body) if c["choices"]]
    assert 1 <= len(chunks) <= 4, [c["choices"][0]["text"] for c in chunks]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_max_n_and_max_sequences_per_request(http, opts_http):
    refused(opts_http, COMPLETIONS, body_of(COMPLETIONS, model=OPTS_NAME, n=3), "n")
    refused(opts_http, CHAT, body_of(CHAT, model=OPTS_NAME, n=3), "n")
    three = body_of(COMPLETIONS, model=OPTS_NAME, prompt=[PROMPT, "Hello", "Good"], n=2)
    err = refused(opts_http, COMPLETIONS, three, "prompt")
    assert "max-sequences-per-request" in err["message"]
    two = body_of(COMPLETIONS, model=OPTS_NAME, prompt=[PROMPT, "Hello"], n=2, max_tokens=1)
    assert len(ok(opts_http, COMPLETIONS, two)["choices"]) == 4  # 4 sequences: at the limit
    ok(http, COMPLETIONS, body_of(COMPLETIONS, n=3, max_tokens=1))  # default limits


def test_expose_model_path(http, opts_http, llama_model_dir):
    assert http.get("/v1/models").json()["data"][0]["root"] == SERVED_NAME
    assert http.get(f"/v1/models/{SERVED_NAME}").json()["root"] == SERVED_NAME
    assert opts_http.get("/v1/models").json()["data"][0]["root"] == llama_model_dir


def test_enable_log_requests(http, opts_http, caplog):
    with captured(caplog, SERVING_LOGGER, logging.INFO):
        usage = ok(http, COMPLETIONS, body_of(COMPLETIONS))["usage"]
        assert not any("prompt tokens" in r.getMessage() for r in caplog.records)  # default off
        rid = f"logged-{uuid.uuid4().hex}"
        usage = ok(opts_http, COMPLETIONS,
                   body_of(COMPLETIONS, model=OPTS_NAME, request_id=rid))["usage"]
    lines = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
    assert lines and f"{usage['prompt_tokens']} prompt tokens" in lines[0], caplog.text


def test_max_request_body_bytes(opts_http):
    big = body_of(COMPLETIONS, model=OPTS_NAME, prompt="x" * 5000)
    resp = opts_http.post(COMPLETIONS, json=big)
    assert resp.status_code == 413
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "2000" in err["message"]
    ok(opts_http, COMPLETIONS, body_of(COMPLETIONS, model=OPTS_NAME))



def test_engine_stats_are_logged_periodically_and_quiet_when_idle(llama_model_dir):
    import asyncio
    import threading

    from backplane.entrypoints.openai.api_server import log_stats
    from backplane.sampling_params import SamplingParams

    # An engine of its own: on the shared server a late request of an earlier test
    # would be a (correct) second line.
    engine = AsyncEngine.from_engine_args(tiny_engine_args(llama_model_dir))
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    # The shared test server's own stats task (another thread) logs to the same logger:
    # keep only this thread's lines.
    this_thread = threading.get_ident()
    handler.emit = lambda record: (lines.append(record.getMessage())
                                   if record.thread == this_thread else None)
    logger = logging.getLogger("backplane.entrypoints.openai.api_server")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    interval = 0.05

    async def run() -> tuple[int, int]:
        task = asyncio.create_task(log_stats(engine, interval=interval))
        await asyncio.sleep(10 * interval)
        idle_lines = len(lines)
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        async for _ in engine.generate("stats-work", "Hello there", params):
            pass
        await asyncio.sleep(10 * interval)
        task.cancel()
        return idle_lines, len(lines)

    try:
        idle_lines, all_lines = asyncio.run(run())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        engine.shutdown()
    stats = [line for line in lines if line.startswith("engine:")]
    assert len(stats) == all_lines
    assert idle_lines == 1, stats  # idle: logged once, not every interval
    assert "KV cache" in stats[0] and "tokens/s" in stats[0]
    # The work is logged with its rate, then one line as the engine goes idle again.
    rates = [float(re.search(r"generation ([0-9.]+) tokens/s", line).group(1))
             for line in stats[1:]]
    assert len(rates) >= 2 and max(rates) > 0 and rates[-1] == 0, stats


def test_allowed_token_ids_and_bad_words_shape_the_output(http):
    allowed = [40, 41, 42]
    body = body_of(COMPLETIONS, max_tokens=8, allowed_token_ids=allowed, ignore_eos=True,
                   logprobs=0, return_tokens_as_token_ids=True)
    tokens = ok(http, COMPLETIONS, body)["choices"][0]["logprobs"]["tokens"]
    assert {int(t.split(":")[1]) for t in tokens} <= set(allowed)
    free = ok(http, COMPLETIONS, body_of(COMPLETIONS, max_tokens=8, temperature=0))
    text = free["choices"][0]["text"]
    word = text.split()[0] if text.split() else text
    banned = ok(http, COMPLETIONS, body_of(COMPLETIONS, max_tokens=8, temperature=0,
                                            bad_words=[word]))
    assert word not in banned["choices"][0]["text"].split()
    refused(http, COMPLETIONS, body_of(COMPLETIONS, allowed_token_ids=[10**6]),
            "allowed_token_ids")
