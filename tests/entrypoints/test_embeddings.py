"""``/v1/embeddings`` and ``/pooling`` on a real server: the real all-MiniLM-L6-v2 through
the official ``openai`` client against sentence-transformers, base64 and float formats,
token-id inputs, usage, ``dimensions``, /score and /rerank by cosine similarity, and the
refusals between model kinds."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from backplane.config import EngineArgs
from backplane.core.engine.async_engine import AsyncEngine
from tests.entrypoints.server_utils import API_KEY, start_server
from tests.fixtures.pooling import SENTENCES, minilm_path, minilm_reference

NAME = "minilm"


@pytest.fixture(scope="module")
def minilm_server():
    engine = AsyncEngine.from_engine_args(
        EngineArgs(model=minilm_path(), served_model_name=[NAME], seed=0))
    running = start_server(engine, api_key=API_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def minilm_client(minilm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=minilm_server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


def test_openai_client_embeddings_match_sentence_transformers(minilm_server, minilm_client):
    reference = minilm_reference()
    # The client asks for base64 by default and decodes it; float is asked explicitly.
    for fmt in (openai.NOT_GIVEN, "float"):
        reply = minilm_client.embeddings.create(model=NAME, input=SENTENCES, encoding_format=fmt)
        assert [d.index for d in reply.data] == list(range(8))
        ours = torch.tensor([d.embedding for d in reply.data])
        cos = F.cosine_similarity(ours, reference)
        assert cos.min() >= 0.9999, cos
    tok = minilm_server.engine.tokenizer
    tokens = sum(len(tok.encode(s)) for s in SENTENCES)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    assert reply.model == NAME and reply.object == "list"


def test_base64_round_trip_token_inputs_and_pooling(minilm_server):
    ids = minilm_server.engine.tokenizer.encode(SENTENCES[0])
    with minilm_server.client() as c:
        floats = c.post("/v1/embeddings", json={"input": SENTENCES[0]}).json()
        b64 = c.post("/v1/embeddings",
                     json={"input": SENTENCES[0], "encoding_format": "base64"}).json()
        by_ids = c.post("/v1/embeddings", json={"input": ids}).json()
        batch_ids = c.post("/v1/embeddings", json={"input": [ids, ids[:3]]}).json()
        pooled = c.post("/pooling", json={"input": SENTENCES[0]}).json()
    vec = np.array(floats["data"][0]["embedding"], dtype=np.float32)
    assert floats["data"][0]["object"] == "embedding"
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, vec)
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], vec, atol=1e-6)
    assert len(batch_ids["data"]) == 2 and batch_ids["usage"]["prompt_tokens"] == len(ids) + 3
    # /pooling returns the raw pooled vector (mean of the tokens, not normalised).
    raw = np.array(pooled["data"][0]["data"], dtype=np.float32)
    assert pooled["data"][0]["object"] == "pooling"
    assert abs(np.linalg.norm(raw) - 1) > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw), vec, atol=1e-5)


def test_pooling_server_refusals(minilm_server, minilm_client):
    with pytest.raises(openai.BadRequestError, match="matryoshka"):
        minilm_client.embeddings.create(model=NAME, input="hi", dimensions=128)
    with pytest.raises(openai.BadRequestError, match="/v1/completions needs a generation"):
        minilm_client.completions.create(model=NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="pooling"):
        minilm_client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with minilm_server.client() as c:
        for body in ({"input": []}, {"input": ""}, {"input": [[]]}, {"input": [10**6]},
                     {"input": "x", "encoding_format": "hex"}):
            r = c.post("/v1/embeddings", json=body)
            assert r.status_code == 400, (body, r.text)
        r = c.post("/v1/embeddings", json={"input": "x", "model": "nope"})
        assert r.status_code == 404


def test_embedding_model_scores_by_cosine(minilm_server):
    """/score and /rerank on an embedding model: the cosine of the embeddings (vLLM's)."""
    reference = minilm_reference()
    expected = (reference[0] @ reference[[4, 2, 1]].T).tolist()
    docs = [SENTENCES[4], SENTENCES[2], SENTENCES[1]]
    with minilm_server.client() as c:
        score = c.post("/score", json={"text_1": SENTENCES[0], "text_2": docs}).json()
        rerank = c.post("/rerank", json={"query": SENTENCES[0], "documents": docs,
                                         "top_n": 2}).json()
    assert [d["object"] for d in score["data"]] == ["score"] * 3
    np.testing.assert_allclose([d["score"] for d in score["data"]], expected, atol=1e-4)
    order = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in rerank["results"]] == order
    assert [r["document"]["text"] for r in rerank["results"]] == [docs[i] for i in order]
    np.testing.assert_allclose([r["relevance_score"] for r in rerank["results"]],
                               [expected[i] for i in order], atol=1e-4)
    assert rerank["usage"]["total_tokens"] == score["usage"]["total_tokens"] > 0


def test_generation_server_refuses_embeddings(server, client):
    with pytest.raises(openai.BadRequestError, match="needs a pooling"):
        client.embeddings.create(model="tiny-llama", input="hello")
    with server.client() as c:
        r = c.post("/pooling", json={"input": "hello"})
    assert r.status_code == 400 and "/pooling" in r.json()["error"]["message"]
