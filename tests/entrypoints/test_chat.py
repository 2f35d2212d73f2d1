"""/v1/chat/completions through the official openai client, against LLM.chat."""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import tiny_engine_args

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def reference_llm(llama_model_dir) -> LLM:
    args = tiny_engine_args(llama_model_dir)
    return LLM(model=args.model, max_model_len=args.max_model_len, num_kv_blocks=32, seed=0)


def test_chat_equals_llm_chat(client, reference_llm):
    resp = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=8, temperature=0
    )
    ref = reference_llm.chat(MESSAGES, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    msg = resp.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == ref[0].outputs[0].text
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == len(ref[0].prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref[0].outputs[0].token_ids)


def test_max_completion_tokens_and_n(client):
    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_completion_tokens=4,
        n=2,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 8


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)  # greedy
        assert item.bytes == list(item.token.encode("utf-8"))


def test_chat_streaming_role_first_and_usage(client):
    whole = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=6, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=SERVED_NAME,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.object == "chat.completion.chunk" for c in chunks)
