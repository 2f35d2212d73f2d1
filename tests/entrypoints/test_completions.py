"""/v1/completions and /v1/models through the official openai client, against LLM.generate."""

from __future__ import annotations

import re

import pytest

from backplane import LLM, SamplingParams
from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import MAX_MODEL_LEN, tiny_engine_args

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def reference_llm(llama_model_dir) -> LLM:
    """The offline API on the same model and limits: the server must match it."""
    args = tiny_engine_args(llama_model_dir)
    return LLM(
        model=args.model,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        seed=args.seed,
    )


def test_models_lists_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].max_model_len == MAX_MODEL_LEN


def test_greedy_completion_equals_llm_generate(client, reference_llm):
    resp = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = reference_llm.generate(
        PROMPT, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False
    )
    choice = resp.choices[0]
    assert choice.text == ref[0].outputs[0].text
    assert choice.finish_reason == ref[0].outputs[0].finish_reason
    assert resp.model == SERVED_NAME and resp.object == "text_completion"
    assert resp.id.startswith("cmpl-") and resp.created > 0
    n_prompt = len(ref[0].prompt_token_ids)
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == len(ref[0].outputs[0].token_ids)
    assert resp.usage.total_tokens == n_prompt + resp.usage.completion_tokens


def test_seeded_sampling_is_reproducible_and_matches_llm(client, reference_llm):
    kwargs = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, extra_body={"top_k": 50})
    a = client.completions.create(model=SERVED_NAME, prompt=PROMPT, **kwargs)
    b = client.completions.create(model=SERVED_NAME, prompt=PROMPT, **kwargs)
    assert a.choices[0].text == b.choices[0].text
    ref = reference_llm.generate(
        PROMPT,
        SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234),
        use_tqdm=False,
    )
    assert a.choices[0].text == ref[0].outputs[0].text


def test_n2_and_prompt_list_and_token_ids(client, reference_llm):
    ids = reference_llm.get_tokenizer()("Once upon a time").input_ids
    resp = client.completions.create(
        model=SERVED_NAME, prompt=[PROMPT, "Hello"], n=2, max_tokens=6, temperature=0.8, seed=7
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    ref = reference_llm.generate(
        [PROMPT, "Hello"],
        SamplingParams(n=2, max_tokens=6, temperature=0.8, seed=7),
        use_tqdm=False,
    )
    expected = [c.text for r in ref for c in r.outputs]
    assert [c.text for c in resp.choices] == expected
    assert resp.usage.completion_tokens == sum(len(c.token_ids) for r in ref for c in r.outputs)
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(
        model=SERVED_NAME, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_logprobs_and_echo(client, reference_llm):
    resp = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    lp = resp.choices[0].logprobs
    ref = reference_llm.generate(
        PROMPT, SamplingParams(max_tokens=5, temperature=0, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    for pos, tid in enumerate(ref.token_ids):
        assert lp.token_logprobs[pos] == pytest.approx(ref.logprobs[pos][tid].logprob, abs=1e-5)
        # top-3 plus the chosen token if not among them (fewer if two decode to the same text)
        assert 1 <= len(lp.top_logprobs[pos]) <= 4
        assert lp.tokens[pos] in lp.top_logprobs[pos]
        # greedy: the chosen token is the most likely one
        assert lp.token_logprobs[pos] == pytest.approx(max(lp.top_logprobs[pos].values()), abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    echo = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True
    )
    ch = echo.choices[0]
    assert ch.text.startswith(PROMPT)
    n_prompt = echo.usage.prompt_tokens
    assert len(ch.logprobs.tokens) == n_prompt + 3
    assert ch.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    assert all(v is not None for v in ch.logprobs.token_logprobs[1:])


def test_stop_string_and_stop_token_ids(client, server):
    base = (
        client.completions.create(
            model=SERVED_NAME,
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    # stop at a word of the greedy continuation: the text ends just before it
    stop = re.findall(r"[A-Za-z]{2,}", base)[1]
    cut = base[: base.index(stop)]
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].text == cut
    assert resp.choices[0].finish_reason == "stop"

    with server.client() as c:
        prompt_ids = c.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        full = c.post(
            "/v1/completions",
            json={"prompt": prompt_ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        ).json()["choices"][0]["text"]
        generated = c.post("/tokenize", json={"prompt": PROMPT + full}).json()["tokens"]
        third = generated[len(prompt_ids) + 2]
        # the third generated token as a stop token id: generation stops there
        cut = c.post(
            "/v1/completions",
            json={
                "prompt": prompt_ids,
                "max_tokens": 6,
                "temperature": 0,
                "stop_token_ids": [third],
                "ignore_eos": True,
            },
        ).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == third
    assert len(cut["text"]) < len(full)


def test_streaming_with_usage_matches_whole(client):
    whole = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=10, temperature=0
    )
    chunks = list(
        client.completions.create(
            model=SERVED_NAME,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(server):
    with server.client() as c:
        with c.stream(
            "POST",
            "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 3, "stream": True, "temperature": 0},
        ) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_tokenize_detokenize_version(server, reference_llm):
    tok = reference_llm.get_tokenizer()
    with server.client() as c:
        t = c.post("/tokenize", json={"prompt": PROMPT}).json()
        assert t["tokens"] == tok(PROMPT).input_ids
        assert t["count"] == len(t["tokens"]) and t["max_model_len"] == MAX_MODEL_LEN
        d = c.post("/detokenize", json={"tokens": t["tokens"][1:]}).json()
        assert d["prompt"] == tok.decode(t["tokens"][1:])
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert chat["tokens"] == tok(rendered, add_special_tokens=False).input_ids
        assert c.get("/version").json()["version"]
        assert c.get("/server_info").status_code == 404  # dev mode is off


def test_prefix_cache_metrics_count_a_repeated_prompt(server):
    from tests.entrypoints.server_utils import metric

    prompt = list(range(20, 60))  # 40 tokens: two full 16-token blocks can be reused
    with server.client() as c:
        before = c.get("/metrics").text
        for _ in range(2):
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200
        after = c.get("/metrics").text
    queries = metric(after, "backplane:prefix_cache_queries_total") - metric(
        before, "backplane:prefix_cache_queries_total"
    )
    hits = metric(after, "backplane:prefix_cache_hits_total") - metric(
        before, "backplane:prefix_cache_hits_total"
    )
    assert queries >= 80
    assert hits >= 32
    prompt_tokens = metric(after, "backplane:prompt_tokens_total") - metric(
        before, "backplane:prompt_tokens_total"
    )
    assert prompt_tokens == 80
