"""Tool-call parsers: handwritten model outputs, and streaming in many
chunkings reassembling to the non-streaming result."""

from __future__ import annotations

import json
import random
import re

import pytest

from backplane.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
    ToolParser,
    get_tool_parser,
)

# ---------------------------------------------------------------- helpers


def chunkings(text: str, seeds: int = 12):
    """Split points everywhere for short texts, random sizes for long ones."""
    yield [text]
    yield list(text)
    if len(text) <= 200:
        for i in range(1, len(text)):
            yield [text[:i], text[i:]]
    rng = random.Random(1234)
    for _ in range(seeds):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 12)
            pieces.append(text[i : i + n])
            i += n
        yield pieces


def run_stream(cls: type[ToolParser], chunks: list[str]):
    """Feed ``chunks``; return (content or None, [(name, arguments)], ids),
    checking the delta protocol on the way."""
    parser, previous = cls(), ""
    content: list[str] = []
    calls: dict[int, dict] = {}
    deltas = []
    for chunk in chunks:
        deltas.append(parser.extract_streaming(previous, chunk))
        previous += chunk
    deltas.append(parser.finish())
    for delta in deltas:
        if delta is None:
            continue
        assert delta.content or delta.tool_calls, "empty deltas are returned as None"
        if delta.content:
            content.append(delta.content)
        for tc in delta.tool_calls:
            if tc.id is not None:  # first delta of a call
                assert tc.index == len(calls), "calls are numbered in order"
                assert tc.type == "function" and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "args": ""}
            else:
                assert tc.index in calls and tc.function.name is None
            calls[tc.index]["args"] += tc.function.arguments or ""
    ordered = [calls[i] for i in range(len(calls))]
    return (
        "".join(content) or None,
        [(c["name"], c["args"]) for c in ordered],
        [c["id"] for c in ordered],
    )


def assert_stream_matches(cls: type[ToolParser], text: str) -> None:
    expected = cls().extract(text)
    want_calls = [(c.function.name, json.loads(c.function.arguments)) for c in expected.tool_calls]
    for chunks in chunkings(text):
        content, calls, _ = run_stream(cls, chunks)
        got_calls = [(name, json.loads(args)) for name, args in calls]
        assert (content, got_calls) == (expected.content, want_calls), chunks


def calls_of(result) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls]


TRICKY = {
    "q": 'braces } { ] [ and "quotes" \\ back\\slash, émoji 🌍, tab\t',
    "nested": {"list": [1, {"x": None}, []], "t": True, "n": -1.5e3, "empty": {}},
}
TRICKY_JSON = json.dumps(TRICKY, ensure_ascii=False)


# ---------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    assert TOOL_PARSERS == ("hermes", "llama3_json", "mistral", "pythonic")
    for name in TOOL_PARSERS:
        assert get_tool_parser(name).name == name
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("nope")


# ---------------------------------------------------------------- hermes

HERMES_VALID = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "Let me check both.\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    'A <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> middle '
    '<tool_call>{"name": "b", "arguments": {"y": [2]}}</tool_call>\n done.  ',
    f'<tool_call>{{"name": "search", "arguments": {TRICKY_JSON}}}</tool_call>',
    '<tool_call>{"arguments": {"a": 1}, "name": "args_first"}</tool_call>',
    '<tool_call>{"name": "f", "arguments": "{\\"a\\": \\"b\\"}"}</tool_call>',
    "x < y and <tool is not a tag, nor is </tool_call> alone",
    "ends with a partial tag <tool_",
    "",
]


def test_hermes_single_call():
    result = HermesToolParser().extract(HERMES_VALID[0])
    assert result.tools_called and result.content is None
    (call,) = result.tool_calls
    assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_hermes_several_calls_and_text():
    result = HermesToolParser().extract(HERMES_VALID[1])
    assert result.content == "Let me check both."
    assert calls_of(result) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in result.tool_calls}) == 2
    result = HermesToolParser().extract(HERMES_VALID[2])
    # Whitespace next to a call goes; text between calls is kept.
    assert result.content == "Amiddledone.  "


def test_hermes_tricky_arguments():
    assert calls_of(HermesToolParser().extract(HERMES_VALID[3])) == [("search", TRICKY)]
    assert calls_of(HermesToolParser().extract(HERMES_VALID[4])) == [("args_first", {"a": 1})]
    # Arguments written as a string holding JSON.
    assert calls_of(HermesToolParser().extract(HERMES_VALID[5])) == [("f", {"a": "b"})]


def test_hermes_no_calls():
    for text in HERMES_VALID[6:]:
        result = HermesToolParser().extract(text)
        assert not result.tools_called and result.tool_calls == []
        assert result.content == (text or None)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>',  # invalid JSON
        '<tool_call>{"name": "f", "arguments": {"a": 1}}',  # unclosed tag
        '<tool_call>{"name": "f", "arguments": {}}</tool_call> <tool_call>{"name": "g"',
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f"}</tool_call>',  # no arguments
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # not an object
        "<tool_call>[1, 2]</tool_call>",
    ],
)
def test_hermes_malformed_is_content(text):
    result = HermesToolParser().extract(text)
    assert (result.tools_called, result.tool_calls, result.content) == (False, [], text)


@pytest.mark.parametrize("text", HERMES_VALID)
def test_hermes_streaming_matches(text):
    assert_stream_matches(HermesToolParser, text)


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call> then text",
        'Before <tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"nam',
        "<tool_call>",
    ],
)
def test_hermes_streaming_invalid_block_is_text(text):
    # A block that never becomes a call is replayed as text, as extract() does.
    assert HermesToolParser().extract(text).content == text
    assert_stream_matches(HermesToolParser, text)


def test_hermes_streaming_delta_shapes():
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": "b"}}</tool_call>'
    parser = HermesToolParser()
    pieces = [
        "Hi <tool_",
        "call>",
        '{"name"',
        ': "f", "arg',
        'uments": {"a"',
        ': "b"}}</tool',
        "_call>",
    ]
    deltas = [parser.extract_streaming("", piece) for piece in pieces]
    assert deltas[0].content == "Hi" and not deltas[0].tool_calls
    assert deltas[1] is None  # nothing to say before the name is complete
    assert deltas[2] is None
    assert deltas[3] is None
    first = deltas[4].tool_calls[0]
    assert (first.index, first.type, first.function.name) == (0, "function", "f")
    assert first.function.arguments == '{"a"'
    assert deltas[5].tool_calls[0].function.arguments == ': "b"}'
    assert deltas[5].tool_calls[0].id is None
    assert deltas[6] is None and parser.finish() is None
    assert run_stream(HermesToolParser, [text])[1] == [("f", '{"a": "b"}')]


# ---------------------------------------------------------------- llama3_json

LLAMA_VALID = [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "z;{}"}}',
    f' \n{{"name": "search", "arguments": {TRICKY_JSON}}}\n',
    '{"name": "t", "parameters": {}};{"name": "u", "parameters": {"k": [true, null]}}  ',
    "The answer is {x}.",
    '{"answer": 42}',
    '<|python_tag|>brave_search.call(query="x")',
    "<|python",
    "Hello",
]


def test_llama3_json_calls():
    parser = Llama3JsonToolParser
    assert calls_of(parser().extract(LLAMA_VALID[0])) == [("get_weather", {"city": "Paris"})]
    result = parser().extract(LLAMA_VALID[1])
    assert result.content is None
    assert calls_of(result) == [("a", {"x": 1}), ("b", {"y": "z;{}"})]
    assert calls_of(parser().extract(LLAMA_VALID[2])) == [("search", TRICKY)]
    assert calls_of(parser().extract(LLAMA_VALID[3])) == [("t", {}), ("u", {"k": [True, None]})]


@pytest.mark.parametrize(
    "text",
    LLAMA_VALID[4:]
    + [
        '{"name": "f", "parameters": {"a": 1}} and then text',
        '{"name": "f", "parameters": {"a": }}',
        '{"name": "f", "parameters": {"a": 1}',
        '{"name": "f"}',
        'Sure: {"name": "f", "parameters": {}}',
    ],
)
def test_llama3_json_not_calls(text):
    result = Llama3JsonToolParser().extract(text)
    assert (result.tools_called, result.content) == (False, text)


@pytest.mark.parametrize("text", LLAMA_VALID + ['{"name": "f"}', '<|python_tag|>{"nam'])
def test_llama3_json_streaming_matches(text):
    assert_stream_matches(Llama3JsonToolParser, text)


# ---------------------------------------------------------------- mistral

MISTRAL_VALID = [
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": [1, 2]}}, {"name": "b", "arguments": {}}]',
    f'[TOOL_CALLS][{{"name": "search", "arguments": {TRICKY_JSON}}}]\n',
    '[TOOL_CALLS][{"name": "a", "arguments": {}}] done [TOOL_CALLS][{"name": "b", "arguments": {"z": 0}}]',
    "see [1] and [TOOL",
    "plain",
]


def test_mistral_calls_and_ids():
    result = MistralToolParser().extract(MISTRAL_VALID[1])
    assert result.content == "Sure."
    assert calls_of(result) == [("a", {"x": [1, 2]}), ("b", {})]
    for call in result.tool_calls:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
    assert calls_of(MistralToolParser().extract(MISTRAL_VALID[2])) == [("search", TRICKY)]
    result = MistralToolParser().extract(MISTRAL_VALID[3])
    assert result.content == "done"
    assert calls_of(result) == [("a", {}), ("b", {"z": 0})]
    _, _, ids = run_stream(MistralToolParser, [MISTRAL_VALID[1]])
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)


@pytest.mark.parametrize(
    "text",
    MISTRAL_VALID[4:]
    + [
        "[TOOL_CALLS] not json",
        "[TOOL_CALLS][]",
        '[TOOL_CALLS][{"name": "f"}]',
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}',
        '[TOOL_CALLS]{"name": "f", "arguments": {}}',
    ],
)
def test_mistral_not_calls(text):
    result = MistralToolParser().extract(text)
    assert (result.tools_called, result.content) == (False, text)


@pytest.mark.parametrize(
    "text",
    MISTRAL_VALID + ["[TOOL_CALLS] not json", "[TOOL_CALLS][]", 'x [TOOL_CALLS][{"name": "f"}] y'],
)
def test_mistral_streaming_matches(text):
    assert_stream_matches(MistralToolParser, text)


# ---------------------------------------------------------------- pythonic

PYTHONIC_VALID = [
    "[get_weather(city='Paris', unit=\"celsius\")]",
    "[a(x=1, y=[1, 2.5, None, True]), b(), c(s='it\\'s \"q\" ) ] }')]",
    "[f(text='''multi\nline ) ''', d={'k': ('t', 1)}, e='é🌍', n=-3)]",
    "\n [f(a=1,), g(b={'x': [{}]},)]\n",
    "[math.sqrt(x=2)]",
    "I think [1] is right",
    "[Note](http://example.com)",
    "Hello",
    "[",
]


def test_pythonic_calls():
    parser = PythonicToolParser
    assert calls_of(parser().extract(PYTHONIC_VALID[0])) == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    assert calls_of(parser().extract(PYTHONIC_VALID[1])) == [
        ("a", {"x": 1, "y": [1, 2.5, None, True]}),
        ("b", {}),
        ("c", {"s": 'it\'s "q" ) ] }'}),
    ]
    assert calls_of(parser().extract(PYTHONIC_VALID[2])) == [
        ("f", {"text": "multi\nline ) ", "d": {"k": ["t", 1]}, "e": "é🌍", "n": -3})
    ]
    assert calls_of(parser().extract(PYTHONIC_VALID[4])) == [("math.sqrt", {"x": 2})]
    # Exactly what json.dumps writes, streamed or not.
    args = parser().extract(PYTHONIC_VALID[0]).tool_calls[0].function.arguments
    assert args == '{"city": "Paris", "unit": "celsius"}'
    assert run_stream(parser, list(PYTHONIC_VALID[0]))[1] == [("get_weather", args)]


@pytest.mark.parametrize(
    "text",
    PYTHONIC_VALID[5:]
    + [
        "[f(1)]",  # positional argument
        "[f(a=b)]",  # not a literal
        "[f(a=__import__('os').system('true'))]",
        "[f(**kw)]",
        "[f(a=1)",  # unclosed
        "[f(a=1)] and more",
        "[f(a={1, 2})]",  # a set is not JSON
        "[f(a=float('nan'))]",
    ],
)
def test_pythonic_not_calls(text):
    result = PythonicToolParser().extract(text)
    assert (result.tools_called, result.content) == (False, text)


@pytest.mark.parametrize(
    "text", PYTHONIC_VALID + ["[f(1)]", "[f(a=b)]", "[f(**kw)]", "[f(a={1, 2})]", "[g(x='''"]
)
def test_pythonic_streaming_matches(text):
    assert_stream_matches(PythonicToolParser, text)


# ---------------------------------------------------------------- all parsers


def test_fresh_ids_per_call():
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    ids = {HermesToolParser().extract(text).tool_calls[0].id for _ in range(50)}
    assert len(ids) == 50


def test_garbage_never_raises():
    pieces = [
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "[TOOL_CALLS]",
        "<|python_tag|>",
        "{",
        "}",
        "[",
        "]",
        "(",
        ")",
        '"name"',
        '"arguments"',
        '"parameters"',
        ":",
        ",",
        ";",
        "=",
        '"f"',
        "f",
        "'",
        '"',
        "\\",
        " ",
        "\n",
        "1",
        "é",
        "'''",
        "x=",
        "null",
    ]
    rng = random.Random(7)
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        for name in TOOL_PARSERS:
            cls = get_tool_parser(name)
            result = cls().extract(text)
            assert result.tools_called == bool(result.tool_calls)
            if not result.tools_called:
                assert result.content == (text or None)
            cut = rng.randint(0, len(text))
            run_stream(cls, [text[:cut], text[cut:]])


def test_forced_call_array_streams_every_split_point():
    """tool_choice "required" output ([{"name", "parameters"}, ...]) streams call by call."""
    from backplane.entrypoints.openai.tool_parsers.forced_array import ForcedCallArrayStream

    text = ' [{"name": "a", "parameters": {"x": 1, "s": "{]"}},\n {"name": "b", "parameters": {}}]'
    expected = [("a", {"x": 1, "s": "{]"}), ("b", {})]
    for cut in range(1, len(text)):
        stream = ForcedCallArrayStream()
        deltas = [stream.extract_streaming("", text[:cut]), stream.extract_streaming("", text[cut:]),
                  stream.finish()]
        calls: dict[int, list] = {}
        for delta in deltas:
            for piece in (delta.tool_calls if delta else []):
                entry = calls.setdefault(piece.index, [None, ""])
                if piece.function.name:
                    assert entry[0] is None and piece.id
                    entry[0] = piece.function.name
                entry[1] += piece.function.arguments or ""
            assert delta is None or delta.content is None
        got = [(calls[i][0], json.loads(calls[i][1])) for i in sorted(calls)]
        assert got == expected, cut
        assert stream.calls_started == 2
