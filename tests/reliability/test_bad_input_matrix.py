"""Every endpoint against a matrix of bad inputs: each is a 4xx with OpenAI's error body.

Bodies are sent as raw bytes (``json.dumps`` with its defaults), so that NaN and
Infinity go out as the bare tokens Python's JSON reader accepts, and lone
surrogates as ``\\ud800`` escapes that decode to invalid text. After each
endpoint's matrix the same greedy request must return the same text and
/health must be 200. The oversized numbers of the original report have a test
of their own at the end.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.reliability.support import (
    GREEDY_REQUEST,
    SERVED_NAME,
    assert_openai_error,
    assert_serving_as_before,
    greedy_text,
)

HUGE_INTS = [2**63, 2**64, -(2**63) - 1]
MALFORMED = [
    b'{"prompt": "hi", ',
    b"{",
    b"not json",
    b"",
    b"[1, 2]",
    b"null",
    b'"text"',
    b"\xff\xfe",
]
LONE = "\ud800"
OUT_OF_VOCAB = 999999

COMPLETION = {"prompt": "hi", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
RESPONSES = {"input": "hi", "max_output_tokens": 4}
TOKENIZE = {"prompt": "hi"}
DETOKENIZE = {"tokens": [5, 6]}


def _with(base: dict, **fields) -> dict:
    return {**base, **fields}


def _sampling_cases(base: dict, int_fields: list[str]) -> list[tuple[str, object]]:
    """Huge integers, NaN/Infinity, wrong types and bad ids for the sampling fields."""
    cases: list[tuple[str, object]] = []
    for name in int_fields:
        for value in HUGE_INTS:
            cases.append((f"{name}={value}", _with(base, **{name: value})))
    for value in HUGE_INTS:
        cases.append((f"stop_token_ids=[{value}]", _with(base, stop_token_ids=[value])))
        cases.append((f"logit_bias key {value}", _with(base, logit_bias={str(value): 1})))
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        for value in (float("nan"), float("inf"), float("-inf")):
            cases.append((f"{name}={value}", _with(base, **{name: value})))
    for value in (float("nan"), float("inf")):
        cases.append((f"logit_bias value {value}", _with(base, logit_bias={"5": value})))
    cases += [
        (
            "stop_token_ids out of vocab with min_tokens",
            _with(base, max_tokens=8, min_tokens=2, stop_token_ids=[OUT_OF_VOCAB]),
        ),
        ("logit_bias key out of vocab", _with(base, logit_bias={str(OUT_OF_VOCAB): 1})),
        ("logit_bias key not a number", _with(base, logit_bias={"abc": 1})),
        ("lone surrogate in stop", _with(base, stop=[LONE])),
        ("lone surrogate in stop string", _with(base, stop="a" + LONE)),
        ("n as text", _with(base, n="two")),
        ("n fractional", _with(base, n=1.5)),
        ("n list", _with(base, n=[1])),
        ("max_tokens as text", _with(base, max_tokens="many")),
        ("max_tokens negative", _with(base, max_tokens=-1)),
        ("temperature as text", _with(base, temperature="hot")),
        ("stream not a bool", _with(base, stream="maybe")),
        ("stop a number", _with(base, stop=5)),
        ("stop_token_ids a string", _with(base, stop_token_ids="2")),
        ("logit_bias a list", _with(base, logit_bias=[1, 2])),
        ("seed fractional", _with(base, seed=0.5)),
        ("unknown model", _with(base, model="no-such-model")),
        ("model a number", _with(base, model=7)),
        ("model lone surrogate", _with(base, model=LONE)),
    ]
    return cases


def completion_cases() -> list[tuple[str, object]]:
    fields = [
        "n",
        "top_k",
        "seed",
        "max_tokens",
        "min_tokens",
        "priority",
        "logprobs",
        "truncate_prompt_tokens",
        "prompt_logprobs",
    ]
    return _sampling_cases(COMPLETION, fields) + [
        ("missing prompt", {"max_tokens": 4}),
        ("empty body object", {}),
        ("empty prompt list", _with(COMPLETION, prompt=[])),
        ("empty token list", _with(COMPLETION, prompt=[[]])),
        # "" alone is one token (BOS) and valid, as in vLLM; without BOS it is empty.
        ("empty prompt text", _with(COMPLETION, prompt="", add_special_tokens=False)),
        ("empty prompt in a list", _with(COMPLETION, prompt=["hi", ""], add_special_tokens=False)),
        ("prompt a number", _with(COMPLETION, prompt=123)),
        ("prompt an object", _with(COMPLETION, prompt={"text": "hi"})),
        ("prompt mixed list", _with(COMPLETION, prompt=["hi", 5])),
        ("prompt token out of vocab", _with(COMPLETION, prompt=[5, OUT_OF_VOCAB])),
        ("prompt token huge", _with(COMPLETION, prompt=[2**64])),
        ("prompt token negative", _with(COMPLETION, prompt=[-1])),
        ("lone surrogate in prompt", _with(COMPLETION, prompt="In the " + LONE)),
        ("lone surrogate in prompt list", _with(COMPLETION, prompt=["ok", LONE])),
        ("echo with max_tokens 0 and no echo", _with(COMPLETION, max_tokens=0)),
    ]


def chat_cases() -> list[tuple[str, object]]:
    fields = [
        "n",
        "top_k",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "priority",
        "top_logprobs",
        "truncate_prompt_tokens",
    ]
    return _sampling_cases(CHAT, fields) + [
        ("missing messages", {"max_tokens": 4}),
        ("empty body object", {}),
        ("empty messages", _with(CHAT, messages=[])),
        ("messages a string", _with(CHAT, messages="hi")),
        ("message a number", _with(CHAT, messages=[5])),
        ("message without role", _with(CHAT, messages=[{"content": "hi"}])),
        ("content a number", _with(CHAT, messages=[{"role": "user", "content": 5}])),
        (
            "lone surrogate in content",
            _with(CHAT, messages=[{"role": "user", "content": "hi " + LONE}]),
        ),
        (
            "lone surrogate in content part",
            _with(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
        ),
        ("lone surrogate in role", _with(CHAT, messages=[{"role": LONE, "content": "hi"}])),
        ("logprobs not a bool", _with(CHAT, logprobs="perhaps")),
    ]


def responses_cases() -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = []
    for name in ("max_output_tokens", "priority"):
        for value in HUGE_INTS:
            cases.append((f"{name}={value}", _with(RESPONSES, **{name: value})))
    for name in ("temperature", "top_p"):
        for value in (float("nan"), float("inf"), float("-inf")):
            cases.append((f"{name}={value}", _with(RESPONSES, **{name: value})))
    return cases + [
        ("missing input", {"max_output_tokens": 4}),
        ("empty body object", {}),
        ("empty input", _with(RESPONSES, input=[])),
        ("input a number", _with(RESPONSES, input=5)),
        ("input item a string", _with(RESPONSES, input=["hi"])),
        ("input item without role", _with(RESPONSES, input=[{"content": "hi"}])),
        ("lone surrogate in input", _with(RESPONSES, input="hi " + LONE)),
        ("lone surrogate in message", _with(RESPONSES, input=[{"role": "user", "content": LONE}])),
        ("lone surrogate in instructions", _with(RESPONSES, instructions=LONE)),
        ("max_output_tokens as text", _with(RESPONSES, max_output_tokens="many")),
        ("max_output_tokens zero", _with(RESPONSES, max_output_tokens=0)),
        ("stream not a bool", _with(RESPONSES, stream="maybe")),
        ("metadata value a number", _with(RESPONSES, metadata={"k": 1})),
        ("unknown field", _with(RESPONSES, frobnicate=True)),
        ("unknown model", _with(RESPONSES, model="no-such-model")),
    ]


def tokenize_cases() -> list[tuple[str, object]]:
    return [
        ("neither prompt nor messages", {}),
        ("both prompt and messages", _with(TOKENIZE, messages=[{"role": "user", "content": "hi"}])),
        ("prompt a number", {"prompt": 5}),
        ("prompt huge number", {"prompt": 2**64}),
        ("prompt NaN", {"prompt": float("nan")}),
        ("prompt a list", {"prompt": ["hi"]}),
        ("messages a string", {"messages": "hi"}),
        ("empty messages list item", {"messages": [{}]}),
        ("lone surrogate in prompt", {"prompt": LONE}),
        ("lone surrogate in messages", {"messages": [{"role": "user", "content": LONE}]}),
        ("add_special_tokens not a bool", _with(TOKENIZE, add_special_tokens="maybe")),
        (
            "chat_template from an untrusted request",
            {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"},
        ),
        ("unknown model", _with(TOKENIZE, model="no-such-model")),
    ]


def detokenize_cases() -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = [
        (f"token {value}", {"tokens": [5, value]}) for value in HUGE_INTS
    ]
    return cases + [
        ("missing tokens", {}),
        ("tokens a string", {"tokens": "5 6"}),
        ("token a string", {"tokens": ["five"]}),
        ("token NaN", {"tokens": [float("nan")]}),
        ("token Infinity", {"tokens": [float("inf")]}),
        ("token fractional", {"tokens": [1.5]}),
        ("token negative", {"tokens": [-1]}),
        ("token out of vocab", {"tokens": [OUT_OF_VOCAB]}),
        ("tokens nested", {"tokens": [[5]]}),
        ("lone surrogate in model", _with(DETOKENIZE, model=LONE)),
        ("unknown model", _with(DETOKENIZE, model="no-such-model")),
    ]


def _encode(body: object) -> bytes:
    """JSON as Python writes it by default: NaN/Infinity bare, non-ASCII (lone
    surrogates included) as \\u escapes."""
    return json.dumps(body).encode("ascii")


MATRIX = {
    "/v1/completions": completion_cases,
    "/v1/chat/completions": chat_cases,
    "/v1/responses": responses_cases,
    "/tokenize": tokenize_cases,
    "/detokenize": detokenize_cases,
}


@pytest.mark.parametrize("path", list(MATRIX))
def test_bad_inputs_get_4xx_openai_errors(server, greedy_reference, path):
    cases = [(f"malformed {raw[:20]!r}", raw) for raw in MALFORMED] + [
        (name, _encode(body)) for name, body in MATRIX[path]()
    ]
    failures = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for name, raw in cases:
            headers = {**server.headers, "content-type": "application/json"}
            resp = c.post(path, content=raw, headers=headers)
            try:
                assert_openai_error(resp)
            except (AssertionError, ValueError) as exc:
                failures.append(f"{path} [{name}] {raw[:120]!r}: {exc}")
    print(f"{path}: {len(cases)} bad inputs")
    assert not failures, "\n".join(failures)
    assert_serving_as_before(server, greedy_reference)


def test_model_card_bad_inputs_get_4xx_openai_errors(server, greedy_reference):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as c:
        assert c.get(f"/v1/models/{SERVED_NAME}").status_code == 200
        requests = [
            ("GET", "/v1/models/no-such-model"),
            ("GET", "/v1/models/" + "x" * 5000),
            ("GET", "/v1/models/%ED%A0%80"),  # a UTF-8-encoded lone surrogate
            ("GET", "/v1/models/%FF%FE"),  # not UTF-8 at all
            ("GET", "/v1/models/%00"),
            ("GET", "/v1/models/" + "%F0%9F%98%80" * 50),
            ("GET", "/v1/models/../../etc/passwd"),
            ("POST", f"/v1/models/{SERVED_NAME}"),
            ("DELETE", f"/v1/models/{SERVED_NAME}"),
        ]
        failures = []
        for method, url in requests:
            resp = c.request(method, url)
            try:
                assert_openai_error(resp)
            except (AssertionError, ValueError) as exc:
                failures.append(f"{method} {url[:80]}: {exc}")
    assert not failures, "\n".join(failures)
    assert_serving_as_before(server, greedy_reference)


# The report: each of these oversized fields must be a 400 naming it, while the
# engine keeps serving (the greedy request between them still answers the same).
ISSUE_BASE = {"prompt": "In the beginning", "max_tokens": 4, "temperature": 1}
ISSUE_CASES = [
    ("top_k", _with(ISSUE_BASE, top_k=9223372036854775808)),
    ("seed", _with(ISSUE_BASE, seed=18446744073709551616)),
    ("n", _with(ISSUE_BASE, n=9223372036854775808)),
    ("stop_token_ids", _with(ISSUE_BASE, max_tokens=8, min_tokens=2, stop_token_ids=[999999])),
]


def test_oversized_numeric_fields_from_the_report_are_400(server, greedy_reference):
    with server.client() as c:
        for param, body in ISSUE_CASES:
            for path, request in (
                ("/v1/completions", body),
                ("/v1/chat/completions", _as_chat(body)),
            ):
                resp = c.post(
                    path, content=_encode(request), headers={"content-type": "application/json"}
                )
                err = assert_openai_error(resp, 400, 400)
                assert err["param"] == param, (path, request, err)
                assert err["type"] == "invalid_request_error"
                assert greedy_text(server) == greedy_reference, (path, request)
    assert_serving_as_before(server, greedy_reference)


def _as_chat(body: dict) -> dict:
    chat = {k: v for k, v in body.items() if k != "prompt"}
    chat["messages"] = [{"role": "user", "content": body["prompt"]}]
    return chat


def test_greedy_request_is_what_the_matrix_compares(server):
    """The reference request itself is valid and deterministic (guards the checks above)."""
    with server.client() as c:
        first = c.post("/v1/completions", json=GREEDY_REQUEST).json()["choices"][0]["text"]
        again = c.post("/v1/completions", json=GREEDY_REQUEST).json()["choices"][0]["text"]
    assert first == again and first
