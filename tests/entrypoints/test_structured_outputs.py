"""Structured outputs through the OpenAI server: response_format, structured_outputs,
the legacy guided_* fields, and tool_choice "required" / a named function.

The bundled demo model never writes JSON by itself, so every valid output here is the
constraint's work. Free-whitespace JSON of the demo model takes 20-100 tokens for the
small objects below (the backends cap whitespace runs at 8 characters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from backplane.config import EngineArgs
from backplane.config.deprecation import reset_warnings
from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.server_utils import API_KEY, start_server, wait_until_idle

MODEL = "demo"
MESSAGES = [{"role": "user", "content": "Answer:"}]
DEPRECATION_LOGGER = "backplane.config.deprecation"


def _s(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _i(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": _s(8), "age": _i(0, 120)},
             "required": ["name", "age"]},
    "boolean": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"]},
    "string_enum": {"type": "string", "enum": ["yes", "no", "maybe"]},
    "const": {"type": "object", "properties": {"v": {"const": "fixed"}}, "required": ["v"]},
    "nested": {"type": "object", "properties": {"user": {
        "type": "object", "properties": {"id": _i(1, 999), "tag": _s(5)},
        "required": ["id", "tag"]}}, "required": ["user"]},
    "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": _i(0, 9)}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    "array_bounds": {"type": "object", "properties": {"xs": {
        "type": "array", "items": _i(0, 99), "minItems": 2, "maxItems": 3}}, "required": ["xs"]},
    "top_array": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
    "array_of_objects": {"type": "array", "items": {
        "type": "object", "properties": {"k": _s(3)}, "required": ["k"]},
        "minItems": 1, "maxItems": 2},
    "integer_bounds": {"type": "object", "properties": {"n": _i(-5, 5)}, "required": ["n"]},
    "number_bounds": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"]},
    "anyof": {"type": "object", "properties": {"v": {"anyOf": [_i(0, 9), {"type": "boolean"}]}},
              "required": ["v"]},
    "anyof_objects": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "n": _i(0, 9)},
         "required": ["kind", "n"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "ok": {"type": "boolean"}},
         "required": ["kind", "ok"]}]},
    "max_length": {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["s"]},
    "nullable": {"type": "object", "properties": {
        "v": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}, "required": ["v"]},
    "optional": {"type": "object", "properties": {"a": _i(0, 9), "b": {"type": "boolean"}},
                 "required": ["a"], "additionalProperties": False},
    "many_required": {"type": "object", "properties": {
        "a": {"type": "boolean"}, "b": {"type": "null"}, "c": _i(0, 3), "d": {"enum": [1, 2]}},
        "required": ["a", "b", "c", "d"]},
    "refs": {"type": "object", "$defs": {"pt": {
        "type": "object", "properties": {"x": _i(0, 9), "y": _i(0, 9)}, "required": ["x", "y"]}},
        "properties": {"p": {"$ref": "#/$defs/pt"}}, "required": ["p"]},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]},
    "enum_array": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3, "maxItems": 3},
    "tuple": {"type": "array", "prefixItems": [_i(0, 9), {"type": "boolean"}], "items": False,
              "minItems": 2},
    "format_date": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}},
                    "required": ["d"]},
}
# guidance follows JSON Schema literally (unlisted properties are allowed unless
# additionalProperties is false), so its schemas close their objects.
CLOSED = {"type": "object", "properties": {"n": _i(0, 9), "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}
REGEXES = {
    "iso_date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "email": r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    "identifier": r"[A-Za-z_][A-Za-z0-9_]{0,11}",
}
WEATHER = {
    "type": "object",
    "properties": {"city": _s(10), "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
ADD = {"type": "object", "properties": {"x": _i(0, 99), "y": _i(0, 99)}, "required": ["x", "y"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
TOOL_SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def _engine(**overrides) -> AsyncEngine:
    kwargs = dict(model="backplane/demo_model", device="cpu", served_model_name=MODEL, seed=0,
                  max_num_seqs=32)
    kwargs.update(overrides)
    return AsyncEngine.from_engine_args(EngineArgs(**kwargs))


@pytest.fixture(scope="module")
def so_server():
    running = start_server(_engine())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(so_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=so_server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


def _chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, **kwargs)


def _json_schema(schema: dict, name: str = "out") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _valid(text: str, schema: dict):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def _post(so_server, path: str, body: dict):
    with so_server.client() as c:
        return c.post(path, json={"model": MODEL, **body})


def _refused(so_server, body: dict, param: str, path: str = "/v1/chat/completions") -> str:
    if path.endswith("chat/completions"):
        body = {"messages": MESSAGES, **body}
    else:
        body = {"prompt": "Answer:", **body}
    r = _post(so_server, path, {"max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err["message"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _deprecations():
    """The deprecation logger's messages (captured directly: propagation may be off)."""
    target = logging.getLogger(DEPRECATION_LOGGER)
    handler = _Records()
    target.addHandler(handler)
    old = target.level
    target.setLevel(logging.WARNING)
    reset_warnings()
    try:
        yield handler.messages
    finally:
        target.removeHandler(handler)
        target.setLevel(old)


# ---------------------------------------------------------------- JSON


def test_json_schemas_via_response_format(client):
    assert len(SCHEMAS) >= 20

    def run(name):
        resp = _chat(client, max_tokens=250, response_format=_json_schema(SCHEMAS[name], name))
        return name, resp.choices[0]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(run, SCHEMAS))
    for name, choice in results:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        _valid(choice.message.content, SCHEMAS[name])


def test_json_object_and_completions_endpoint(client, so_server):
    # Free-form objects of the demo model never end (its keys are prose), so "}" is
    # favoured with logit_bias: the grammar still forces "{" first.
    with so_server.client() as c:
        close = c.post("/tokenize", json={"prompt": "}", "add_special_tokens": False})
    (close_id,) = close.json()["tokens"]
    resp = _chat(client, max_tokens=50, response_format={"type": "json_object"},
                 logit_bias={str(close_id): 100})
    assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
    assert json.loads(resp.choices[0].message.content) == {}
    cut = _chat(client, max_tokens=30, response_format={"type": "json_object"})
    assert cut.choices[0].message.content.startswith("{")
    schema = SCHEMAS["nested"]
    comp = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=250,
                                      temperature=0, extra_body={"response_format":
                                                                 _json_schema(schema)})
    assert comp.choices[0].finish_reason == "stop"
    _valid(comp.choices[0].text, schema)
    compact = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    value = _valid(compact.choices[0].text, schema)
    assert compact.choices[0].text == json.dumps(value)  # no free whitespace


def test_streamed_json_schema_reassembles(client):
    schema = SCHEMAS["array_of_objects"]
    stream = _chat(client, max_tokens=250, response_format=_json_schema(schema), stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"
    _valid(text, schema)


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


def test_openai_parse_with_a_pydantic_model(client):
    resp = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Pet,
                                         max_tokens=250, temperature=0)
    pet = resp.choices[0].message.parsed
    assert isinstance(pet, Pet), resp.choices[0].message.content
    resp = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Pet,
                                         max_tokens=250, temperature=1.0, seed=3, n=3)
    assert len(resp.choices) == 3
    assert all(isinstance(c.message.parsed, Pet) for c in resp.choices)


# ---------------------------------------------------------------- regex, choice, grammar


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_regexes_structured_outputs_and_legacy(client, name):
    pattern = REGEXES[name]
    resp = _chat(client, max_tokens=40, extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, resp.choices[0].message.content), resp.choices[0].message
    comp = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, n=2,
                                      seed=7, temperature=1.0,
                                      extra_body={"guided_regex": pattern})
    for choice in comp.choices:
        assert re.fullmatch(pattern, choice.text), choice.text
        assert choice.finish_reason == "stop"


def test_choice_is_always_in_the_set(client):
    options = ["alpha", "beta", "gamma delta"]
    # Room for the longest option spelled one character per token (plus EOS): a
    # hot sample may take that path, and a cut-off choice is not a choice.
    resp = _chat(client, max_tokens=20, n=4, seed=5, temperature=1.5,
                 extra_body={"structured_outputs": {"choice": options}})
    assert {c.message.content for c in resp.choices} <= set(options)
    comp = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, n=4, seed=9,
                                      temperature=1.5, extra_body={"guided_choice": options})
    assert {c.text for c in comp.choices} <= set(options)


def test_ebnf_grammar(client):
    grammar = 'root ::= greeting " " name\ngreeting ::= "hi" | "hello"\nname ::= [a-z] [a-z]? [a-z]?'
    for extra in ({"structured_outputs": {"grammar": grammar}}, {"guided_grammar": grammar}):
        resp = _chat(client, max_tokens=10, n=2, seed=2, temperature=1.0, extra_body=extra)
        for c in resp.choices:
            assert re.fullmatch(r"(hi|hello) [a-z]{1,3}", c.message.content), c.message.content


@pytest.mark.parametrize("backend", ["xgrammar", "guidance", "llguidance", "auto"])
def test_both_backends_per_request(client, backend):
    resp = _chat(client, max_tokens=150, extra_body={"structured_outputs": {
        "json": CLOSED, "backend": backend}})
    assert resp.choices[0].finish_reason == "stop"
    _valid(resp.choices[0].message.content, CLOSED)
    pattern = REGEXES["email"]
    resp = _chat(client, max_tokens=30, extra_body={"guided_regex": pattern,
                                                    "guided_decoding_backend": backend})
    assert re.fullmatch(pattern, resp.choices[0].message.content)


# xgrammar's regex syntax has no inline flags; guidance's has.
CASELESS = "(?i)(yes|no)"


def test_structured_outputs_config_sets_the_default_backend(so_server):
    """--structured-outputs-config '{"backend": "xgrammar"}': no fallback to guidance, so a
    schema only guidance enforces is refused; the default ("auto") server falls back."""
    body = {"messages": MESSAGES, "max_tokens": 8, "structured_outputs": {"regex": CASELESS}}
    r = _post(so_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert re.fullmatch(CASELESS, r.json()["choices"][0]["message"]["content"])
    running = start_server(_engine(structured_outputs_config={"backend": "xgrammar"}))
    try:
        msg = _refused(running, {"structured_outputs": {"regex": CASELESS}},
                       "structured_outputs")
        assert "xgrammar" in msg
        # The request's own backend still wins.
        body["structured_outputs"] = {"regex": CASELESS, "backend": "guidance"}
        r = _post(running, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert re.fullmatch(CASELESS, r.json()["choices"][0]["message"]["content"])
    finally:
        running.stop()


# ---------------------------------------------------------------- tool_choice


def _check_calls(calls, names=("get_weather", "add")):
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_tool_choice_required(client):
    resp = _chat(client, max_tokens=300, tools=TOOLS, tool_choice="required",
                 parallel_tool_calls=False)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)
    chunks = list(_chat(client, max_tokens=300, tools=TOOLS, tool_choice="required",
                        parallel_tool_calls=False, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call streams as it is generated: id and name first, then argument fragments.
    assert pieces[0].id.startswith("call_")
    assert [p.function.name for p in pieces if p.function.name] == [
        choice.message.tool_calls[0].function.name]
    assert len(pieces) > 3 and all(p.index == 0 for p in pieces)
    # Same greedy output, streamed: the same call (ids differ; the streamed arguments are
    # the model's own text, which decodes to the same value).
    args = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(args) == json.loads(choice.message.tool_calls[0].function.arguments)


def test_tool_choice_named(client):
    named = {"type": "function", "function": {"name": "add"}}
    resp = _chat(client, max_tokens=200, tools=TOOLS, tool_choice=named)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    _check_calls(choice.message.tool_calls, names=("add",))
    chunks = list(_chat(client, max_tokens=200, tools=TOOLS, tool_choice=named, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "add"
    assert all(p.id is None and p.function.name is None for p in pieces[1:])
    assert len(pieces) > 3  # the arguments stream token by token
    args = "".join(p.function.arguments or "" for p in pieces)
    assert args == choice.message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(args), ADD)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_calls_in_a_multi_turn_conversation(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = _chat(client, max_tokens=200, tools=TOOLS, tool_choice=named)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    again = _chat(client, messages=messages, max_tokens=300, tools=TOOLS, tool_choice="required",
                  parallel_tool_calls=False)
    _check_calls(again.choices[0].message.tool_calls)
    plain = _chat(client, messages=messages, max_tokens=5, tools=TOOLS, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None


def test_tool_choice_refusals(so_server):
    named = {"type": "function", "function": {"name": "nope"}}
    msg = _refused(so_server, {"tools": TOOLS, "tool_choice": named}, "tool_choice")
    assert "nope" in msg and "get_weather" in msg
    _refused(so_server, {"tool_choice": "required"}, "tool_choice")
    msg = _refused(so_server, {"tools": TOOLS, "tool_choice": "required",
                               "response_format": {"type": "json_object"}}, "tool_choice")
    assert "response_format" in msg
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]
    _refused(so_server, {"tools": bad_tool, "tool_choice": "required"}, "tools")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"guided_regex": "[z-a]"}, "guided_regex"),
        ({"response_format": _json_schema({"type": "foo"})}, "response_format"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": 3}}}}, "guided_json"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "colour": 1}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "backend": "outlines"}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": r"\s*"},
         "guided_whitespace_pattern"),
        ({"structured_outputs": {"regex": "a"}, "use_beam_search": True, "n": 2},
         "structured_outputs"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_specs_are_400_naming_the_field(so_server, body, param, path):
    _refused(so_server, body, param, path)


def test_neutral_response_format_is_no_constraint(so_server):
    r = _post(so_server, "/v1/chat/completions",
              {"messages": MESSAGES, "max_tokens": 4, "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text


def test_constrained_and_free_requests_together(client, so_server):
    schema = SCHEMAS["many_required"]
    results = {}

    def constrained():
        results["json"] = _chat(client, max_tokens=250, response_format=_json_schema(schema))

    def free():
        results["free"] = client.completions.create(model=MODEL, prompt="Once", max_tokens=60,
                                                    temperature=0, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=constrained), threading.Thread(target=free)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _valid(results["json"].choices[0].message.content, schema)
    assert results["free"].choices[0].finish_reason == "length"
    assert results["free"].usage.completion_tokens == 60
    wait_until_idle(so_server)


def test_legacy_fields_log_a_deprecation_once(so_server):
    with _deprecations() as messages:
        for _ in range(2):
            r = _post(so_server, "/v1/completions", {
                "prompt": "Answer:", "max_tokens": 10, "guided_choice": ["a", "b"],
                "guided_decoding_backend": "xgrammar"})
            assert r.status_code == 200, r.text
    for field, new in (("guided_choice", "structured_outputs.choice"),
                       ("guided_decoding_backend", "structured_outputs.backend")):
        found = [m for m in messages if repr(field) in m]
        assert len(found) == 1, messages
        assert new in found[0] and "0.3.0" in found[0]
