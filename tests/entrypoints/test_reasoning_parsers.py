"""Reasoning parsers: whole outputs, and streaming in every chunking."""

from __future__ import annotations

import random

import pytest

from backplane.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    get_reasoning_parser,
)

R1_CASES = [
    ("<think>abc</think>answer", ("abc", "answer")),
    ("abc</think>answer", ("abc", "answer")),  # <think> was in the prompt
    (
        "\n<think>\nstep 1\nstep 2\n</think>\n\nThe answer.",
        ("\nstep 1\nstep 2\n", "\n\nThe answer."),
    ),
    ("still thinking <thi", ("still thinking <thi", None)),  # cut off: all reasoning
    ("</think>hi", (None, "hi")),
    ("<think>x</think>", ("x", None)),
    ("a < b </ c </think>d </think> e", ("a < b </ c ", "d </think> e")),
    ("思考 🌍</think>答え", ("思考 🌍", "答え")),
    ("", (None, None)),
]

QWEN3_CASES = [
    ("<think>abc</think>answer", ("abc", "answer")),
    ("<think>\nreason\n</think>\n\nAnswer", ("\nreason\n", "\n\nAnswer")),
    ("answer only", (None, "answer only")),
    ("abc</think>answer", (None, "abc</think>answer")),  # no explicit <think>
    ("  <think>abc", ("abc", None)),  # cut off while thinking
    ("Hi <think>x</think>", (None, "Hi <think>x</think>")),
    ("<thin", (None, "<thin")),
    ("<think></think>Direct", (None, "Direct")),
    ("", (None, None)),
]


def chunkings(text: str):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(99)
    for _ in range(10):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            pieces.append(text[i : i + n])
            i += n
        yield pieces


def stream(cls: type[ReasoningParser], chunks: list[str]) -> tuple[str | None, str | None]:
    parser, previous = cls(), ""
    reasoning, content = [], []
    results = []
    for chunk in chunks:
        results.append(parser.extract_streaming(previous, chunk))
        previous += chunk
    results.append(parser.finish())
    for r, c in results:
        assert r != "" and c != "", "empty deltas are None"
        reasoning.append(r or "")
        content.append(c or "")
    return "".join(reasoning) or None, "".join(content) or None


def test_registry():
    assert REASONING_PARSERS == ("deepseek_r1", "qwen3")
    assert get_reasoning_parser("deepseek_r1") is DeepSeekR1ReasoningParser
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("o1")


@pytest.mark.parametrize(("text", "expected"), R1_CASES)
def test_deepseek_r1(text, expected):
    assert DeepSeekR1ReasoningParser().extract(text) == expected
    for chunks in chunkings(text):
        assert stream(DeepSeekR1ReasoningParser, chunks) == expected, chunks


@pytest.mark.parametrize(("text", "expected"), QWEN3_CASES)
def test_qwen3(text, expected):
    assert Qwen3ReasoningParser().extract(text) == expected
    for chunks in chunkings(text):
        assert stream(Qwen3ReasoningParser, chunks) == expected, chunks


def test_streaming_sends_reasoning_before_the_end_tag():
    parser = DeepSeekR1ReasoningParser()
    assert parser.extract_streaming("", "<th") == (None, None)
    assert parser.extract_streaming("<th", "ink>Let me") == ("Let me", None)
    assert parser.extract_streaming("<think>Let me", " see</th") == (" see", None)
    assert parser.extract_streaming("<think>Let me see</th", "ink>\n\nOK") == (None, "\n\nOK")
    assert parser.extract_streaming("...", " more") == (None, " more")
    assert parser.finish() == (None, None)
