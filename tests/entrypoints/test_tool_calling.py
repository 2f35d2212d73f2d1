"""Tool calling (tool_choice "auto") and reasoning output of /v1/chat/completions.

The tiny test models never write tool calls, so the response shapes are checked
through a real HTTP server whose engine replays scripted text
(`ScriptedEngine`: the real engine's tokenizer and config, scripted outputs);
the request surface (flags, refusals, history with tool calls, /tokenize) is
checked on the real engine.
"""

from __future__ import annotations

import json

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from backplane.config.server_options import ServerOptions
from backplane.entrypoints.cli.main import build_parser
from backplane.entrypoints.cli.serve import run as serve_run
from backplane.outputs import CompletionOutput, RequestOutput
from tests.entrypoints.server_utils import API_KEY, start_server

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
CALL_PIECES = [
    "Let me check. ",
    "<tool_call>",
    '{"name": "get_weather", ',
    '"arguments": {"city": ',
    '"Paris"}}',
    "</tool_call>",
]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
# Renders tools and the history's tool calls (arguments as an object, as real
# templates use them).
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
    "{% for m in messages %}[{{ m.role }}]"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }}({{ c.function.arguments.city }})"
    "{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}RESULT {{ m.tool_call_id }}:{% endif %}{{ m.content }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


# ---------------------------------------------------------------- scripted engine


class _ScriptedStream:
    """Cumulative RequestOutputs: choice i gets one more piece of script[i] per step."""

    def __init__(self, request_id, prompt_ids, script, n, finish_reason) -> None:
        self.request_id = request_id
        self.finished = False
        pieces = [script[i % len(script)] for i in range(n)]
        steps = max(len(p) for p in pieces)
        self._outputs = []
        for step in range(1, steps + 1):
            outs = []
            for i, p in enumerate(pieces):
                done = step >= len(p)
                outs.append(CompletionOutput(
                    index=i,
                    text="".join(p[:step]),
                    token_ids=list(range(min(step, len(p)))),
                    finish_reason=finish_reason if done else None,
                ))
            self._outputs.append(RequestOutput(
                request_id=request_id, prompt=None, prompt_token_ids=prompt_ids,
                prompt_logprobs=None, outputs=outs, finished=step == steps,
            ))

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._outputs:
            self.finished = True
            raise StopAsyncIteration
        out = self._outputs.pop(0)
        self.finished = out.finished
        return out


class ScriptedEngine:
    """The real engine's tokenizer, config and stats; outputs replay ``script``
    (one list of text pieces per choice)."""

    def __init__(self, real) -> None:
        self._real = real
        self.script: list[list[str]] = [["hello"]]
        self.finish_reason = "stop"
        self.last_params = None

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def add_request(self, request_id, prompt, params, priority=0, arrival_time=None):
        self.last_params = params
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        return _ScriptedStream(request_id, ids, self.script, params.n, self.finish_reason)

    def abort_nowait(self, request_id: str) -> None:
        pass


def _scripted_server(real_engine, **options):
    engine = ScriptedEngine(real_engine)
    running = start_server(
        engine,
        options=ServerOptions(disable_log_stats=True, **options),
        chat_template=TOOL_TEMPLATE,
        shutdown_engine_on_exit=False,
    )
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0)
    return running, engine, client


@pytest.fixture(scope="module")
def hermes(server):
    """Scripted server: --enable-auto-tool-choice --tool-call-parser hermes
    --reasoning-parser qwen3 (qwen3: reasoning only inside an explicit <think>)."""
    running, engine, client = _scripted_server(
        server.engine, enable_auto_tool_choice=True, tool_call_parser="hermes",
        reasoning_parser="qwen3",
    )
    engine.running = running
    yield engine, client
    running.stop()


@pytest.fixture(scope="module")
def deepseek(server):
    """Scripted server: --reasoning-parser deepseek_r1 and no tool parser."""
    running, engine, client = _scripted_server(server.engine, reasoning_parser="deepseek_r1")
    yield engine, client
    running.stop()


def _stream(client, **kwargs) -> list:
    return list(client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, stream=True, **kwargs))


def _args(call) -> dict:
    return json.loads(call.function.arguments)


def test_tool_calls_non_streaming(hermes):
    engine, client = hermes
    engine.script = [CALL_PIECES]
    resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and _args(call) == {"city": "Paris"}
    # The parser needs special tokens in the text; the request did not choose.
    assert engine.last_params.skip_special_tokens is False


def test_explicit_skip_special_tokens_is_kept(hermes):
    engine, client = hermes
    engine.script = [CALL_PIECES]
    resp = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=TOOLS,
        extra_body={"skip_special_tokens": True},
    )
    assert resp.choices[0].message.tool_calls
    assert engine.last_params.skip_special_tokens is True


def test_no_call_found_and_tool_choice_none(hermes):
    engine, client = hermes
    engine.script = [["Sunny, ", "probably."]]
    resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)
    choice = resp.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (
        "Sunny, probably.", None, "stop")
    # tool_choice "none": the text is not parsed, special tokens are skipped as usual.
    engine.script = [CALL_PIECES]
    resp = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=TOOLS, tool_choice="none")
    choice = resp.choices[0]
    assert choice.message.content == "".join(CALL_PIECES) and not choice.message.tool_calls
    assert choice.finish_reason == "stop" and engine.last_params.skip_special_tokens is True


def test_cut_off_call_keeps_length(hermes):
    engine, client = hermes
    engine.script = [CALL_PIECES]
    engine.finish_reason = "length"
    try:
        resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)
        chunks = _stream(client, tools=TOOLS)
    finally:
        engine.finish_reason = "stop"
    assert resp.choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tool_calls_streaming_with_the_openai_client(hermes):
    engine, client = hermes
    engine.script = [CALL_PIECES]
    chunks = _stream(client, tools=TOOLS)
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    args = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(args) == {"city": "Paris"}
    content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert content == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    # The client's own accumulator rebuilds the same message.
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(c)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Let me check."
    (call,) = final.message.tool_calls
    assert call.function.name == "get_weather" and _args(call) == {"city": "Paris"}
    assert call.id == first.id


def test_two_choices_have_their_own_parsers(hermes):
    engine, client = hermes
    engine.script = [["Just ", "text."], CALL_PIECES]
    resp = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=TOOLS, n=2)
    by_index = {c.index: c for c in resp.choices}
    assert by_index[0].message.content == "Just text." and by_index[0].finish_reason == "stop"
    assert by_index[0].message.tool_calls is None
    assert by_index[1].finish_reason == "tool_calls"
    assert _args(by_index[1].message.tool_calls[0]) == {"city": "Paris"}

    chunks = _stream(client, tools=TOOLS, n=2)
    per = {0: [], 1: []}
    for c in chunks:
        for ch in c.choices:
            per[ch.index].append(ch)
    assert "".join(ch.delta.content or "" for ch in per[0]) == "Just text."
    assert not any(ch.delta.tool_calls for ch in per[0])
    assert per[0][-1].finish_reason == "stop" and per[1][-1].finish_reason == "tool_calls"
    args = "".join(tc.function.arguments or "" for ch in per[1] for tc in ch.delta.tool_calls or [])
    assert json.loads(args) == {"city": "Paris"}


def test_reasoning_then_tool_calls_non_streaming(hermes):
    engine, client = hermes
    engine.script = [["<think>", "The user wants ", "weather.", "</think>", "\n\n", *CALL_PIECES[1:]]]
    resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)
    msg = resp.choices[0].message
    assert msg.reasoning_content == "The user wants weather."
    assert msg.content is None and _args(msg.tool_calls[0]) == {"city": "Paris"}
    assert resp.choices[0].finish_reason == "tool_calls"
    # Without <think>, qwen3 leaves the reply as content; without tools nothing is parsed.
    engine.script = [["<tool_call>", "is just text here"]]
    resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES)
    msg = resp.choices[0].message
    assert (msg.reasoning_content, msg.content, msg.tool_calls) == (
        None, "<tool_call>is just text here", None)


def test_reasoning_then_tool_calls_streaming(hermes):
    engine, client = hermes
    engine.script = [["<think>The user", " wants weather.</th", "ink>\n\n", *CALL_PIECES]]
    chunks = _stream(client, tools=TOOLS)
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "The user wants weather."
    kinds = [("r" if getattr(d, "reasoning_content", None) else "")
             + ("c" if d.content else "") + ("t" if d.tool_calls else "") for d in deltas]
    last_reasoning = max(i for i, k in enumerate(kinds) if "r" in k)
    first_other = min(i for i, k in enumerate(kinds) if "c" in k or "t" in k)
    assert last_reasoning < first_other, kinds
    # The text after </think> is content as it is (the "\n\n" too), as without streaming.
    assert "".join(d.content or "" for d in deltas) == "\n\nLet me check."
    whole = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)
    assert whole.choices[0].message.content == "\n\nLet me check."
    args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_deepseek_reasoning_without_tools(deepseek):
    engine, client = deepseek
    engine.script = [["Think", "ing hard", "</think>", "\n\nThe answer", " is 4."]]
    resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES)
    msg = resp.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("Thinking hard", "\n\nThe answer is 4.")
    assert resp.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].delta for c in _stream(client)]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Thinking hard"
    assert "".join(d.content or "" for d in deltas) == "\n\nThe answer is 4."
    # Tools without the flag on this server: "auto" is refused.
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)


def test_tools_and_history_reach_the_template(hermes):
    engine, _client = hermes
    # The scripted server renders with TOOL_TEMPLATE; /tokenize renders like chat does.
    expected_text = (
        "TOOLS:get_weather;[user]Weather in Paris?[assistant]CALL get_weather(Paris)"
        "[tool]RESULT call_1:{\"temp_c\": 21}[assistant]"
    )
    with engine.running.client() as c:
        expected = c.post("/tokenize", json={"prompt": expected_text,
                                             "add_special_tokens": False}).json()["tokens"]
        r = c.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == expected
        # The chat endpoint renders the same prompt (same number of prompt tokens).
        r = c.post("/v1/chat/completions", json={"messages": HISTORY, "tools": TOOLS})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(expected)


# ------------------------------------------------------------- the real engine

GREEDY = {"model": "tiny-llama", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def flagged(server):
    """A second server on the shared engine, started with --enable-auto-tool-choice
    --tool-call-parser hermes."""
    running = start_server(
        server.engine,
        options=ServerOptions(
            disable_log_stats=True, enable_auto_tool_choice=True, tool_call_parser="hermes"
        ),
        shutdown_engine_on_exit=False,
    )
    yield running
    running.stop()


def _post(running, body: dict):
    with running.client() as c:
        return c.post("/v1/chat/completions", json=body)


def _error(resp, param: str) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    return err["message"]


def test_auto_tool_choice_needs_the_flag(server, flagged):
    body = {**GREEDY, "messages": MESSAGES, "tools": TOOLS}
    # Without the flag: tools imply "auto", which is refused naming the flags.
    msg = _error(_post(server, body), "tool_choice")
    assert "--enable-auto-tool-choice" in msg and "--tool-call-parser" in msg
    msg = _error(_post(server, {**body, "tool_choice": "auto"}), "tool_choice")
    assert "--enable-auto-tool-choice" in msg
    # "none" shows the tools to the template only.
    assert _post(server, {**body, "tool_choice": "none"}).status_code == 200
    # With the flag: accepted, and the real model's reply comes back.
    for extra in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}, {"stream": True}):
        r = _post(flagged, {**body, **extra})
        assert r.status_code == 200, r.text
    reply = _post(flagged, body).json()["choices"][0]
    assert reply["finish_reason"] in ("stop", "length") and reply["message"]["tool_calls"] is None


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                  "function": {"name": "get_weather"}}])
def test_required_and_named_tool_choice_work_without_the_flag(server, flagged, choice):
    """Constrained decoding forces the call (tests/entrypoints/test_structured_outputs.py
    checks the calls); no --enable-auto-tool-choice needed, as in vLLM."""
    body = {**GREEDY, "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice}
    for running in (server, flagged):
        r = _post(running, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("tool_calls", "length")


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "retrieval"}],
        [{"type": "function", "function": {"description": "no name"}}],
        [{"type": "function", "function": {"name": ""}}],
        [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}],
        {"type": "function", "function": {"name": "f"}},
    ],
)
def test_malformed_tools_are_400(flagged, tools):
    r = _post(flagged, {**GREEDY, "messages": MESSAGES, "tools": tools})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools", r.text


def test_legacy_functions_stay_refused(flagged):
    body = {**GREEDY, "messages": MESSAGES, "functions": [{"name": "f", "parameters": {}}]}
    assert "use tools and tool_choice" in _error(_post(flagged, body), "functions")
    body = {**GREEDY, "messages": MESSAGES, "function_call": {"name": "f"}}
    assert _error(_post(flagged, body), "function_call")


@pytest.mark.parametrize("stream", [False, True])
def test_history_with_tool_calls_and_results_completes(server, flagged, stream):
    for running in (server, flagged):
        body = {**GREEDY, "messages": HISTORY, "tools": TOOLS, "tool_choice": "none",
                "stream": stream}
        r = _post(running, body)
        assert r.status_code == 200, r.text
    # Without tools in the request too (a conversation that used tools earlier).
    r = _post(server, {**GREEDY, "messages": HISTORY})
    assert r.status_code == 200, r.text


def test_tokenize_with_tools(server):
    with server.client() as c:
        with_tools = c.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS})
        assert with_tools.status_code == 200, with_tools.text
        chat = c.post("/v1/chat/completions",
                      json={**GREEDY, "messages": HISTORY, "tools": TOOLS, "tool_choice": "none"})
        assert chat.json()["usage"]["prompt_tokens"] == with_tools.json()["count"]


def test_start_up_refuses_auto_tool_choice_without_a_parser(capsys):
    with pytest.raises(ValueError, match="--enable-auto-tool-choice requires --tool-call-parser"):
        ServerOptions(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        ServerOptions(tool_call_parser="nope")
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        ServerOptions(reasoning_parser="nope")
    parser = build_parser()
    args = parser.parse_args(["serve", "--enable-auto-tool-choice"])
    assert serve_run(args) == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
    for flag in ("--tool-call-parser", "--reasoning-parser"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", flag, "nope"])
        assert "invalid choice" in capsys.readouterr().err
    args = parser.parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser",
                              "mistral", "--reasoning-parser", "deepseek_r1"])
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser) == (
        True, "mistral", "deepseek_r1")
