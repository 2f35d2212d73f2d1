"""``use_beam_search: true`` on the OpenAI server: the same sequences as `LLM.beam_search`."""

from __future__ import annotations

import pytest

from backplane import LLM, BeamSearchParams
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import MAX_MODEL_LEN, metric, wait_until_idle

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(llama_model_dir):
    """An offline LLM with the shared server's engine settings."""
    return LLM(model=llama_model_dir, max_model_len=MAX_MODEL_LEN, num_kv_blocks=160,
               block_size=16, seed=0)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def _post(http, path, **fields):
    body = {"model": SERVED_NAME, "use_beam_search": True, **fields}
    return http.post(path, json=body)


def _ok(http, path, **fields) -> dict:
    resp = _post(http, path, **fields)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _texts(outputs) -> list[str]:
    return [seq.text for seq in outputs.sequences]


def test_completions_return_the_beams_of_llm_beam_search(server, http, llm):
    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.8)
    expected = llm.beam_search([PROMPT, "hello world"], params)
    body = _ok(http, COMPLETIONS, prompt=[PROMPT], n=3, max_tokens=6, length_penalty=0.8)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == _texts(expected[0])
    assert [c["finish_reason"] for c in body["choices"]] == [
        s.finish_reason for s in expected[0].sequences
    ]
    prompt_len = len(llm.get_tokenizer().encode(PROMPT))
    generated = sum(len(s.tokens) - prompt_len for s in expected[0].sequences)
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": generated,
                             "total_tokens": prompt_len + generated}
    # several prompts: choice index is prompt_index * n + rank
    body = _ok(http, COMPLETIONS, prompt=[PROMPT, "hello world"], n=3, max_tokens=6,
               length_penalty=0.8, temperature=0)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == _texts(expected[0]) + _texts(expected[1])
    assert "backplane:num_requests_running" in wait_until_idle(server)


def test_chat_returns_the_beams_of_llm_beam_search(server, http, llm):
    tokens = http.post("/tokenize", json={"model": SERVED_NAME, "messages": MESSAGES}).json()
    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)
    (expected,) = llm.beam_search({"prompt_token_ids": tokens["tokens"]}, params)
    body = _ok(http, CHAT, messages=MESSAGES, n=2, max_completion_tokens=5, ignore_eos=True)
    assert [c["message"]["content"] for c in body["choices"]] == _texts(expected)
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": True}, "stream"),
        ({"temperature": 0.7}, "temperature"),
        ({"logprobs": 2}, "logprobs"),
        ({"stop": ["."]}, "stop"),
        ({"top_p": 0.5}, "top_p"),
        ({"n": 11}, "n"),
        ({"length_penalty": "x"}, "length_penalty"),
    ],
)
def test_unsupported_combinations_are_400_naming_the_field(http, path, fields, param):
    if path == CHAT and param == "logprobs":
        fields = {"logprobs": True}
    prompt = {"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES}
    resp = _post(http, path, max_tokens=4, **prompt, **fields)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert param in err["message"]


def test_length_penalty_without_beam_search_is_400(http):
    resp = http.post(COMPLETIONS, json={"model": SERVED_NAME, "prompt": PROMPT,
                                        "length_penalty": 0.5})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "length_penalty"
    resp = http.post(COMPLETIONS, json={"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 2,
                                        "use_beam_search": False, "length_penalty": 1.0})
    assert resp.status_code == 200, resp.text


def test_the_engine_is_idle_after_beam_search(server, http):
    before = metric(wait_until_idle(server), "backplane:request_success_total",
                    finished_reason="length")
    _ok(http, COMPLETIONS, prompt=PROMPT, n=4, max_tokens=8, ignore_eos=True)
    text = wait_until_idle(server)
    assert metric(text, "backplane:num_requests_running") == 0
    assert metric(text, "backplane:num_requests_waiting") == 0
    assert metric(text, "backplane:kv_cache_usage_perc") == 0
    assert server.engine.num_unfinished_requests == 0
    # the whole search counts as one request, not one per beam and step
    after = metric(text, "backplane:request_success_total", finished_reason="length")
    assert after - before == 1
