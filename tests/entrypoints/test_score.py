"""``/score`` and ``/rerank`` (vLLM's) on a real server with a tiny random cross-encoder
(BertForSequenceClassification), against transformers' logits + sigmoid; refusals."""

from __future__ import annotations

import pytest
import torch

from backplane.config import EngineArgs
from backplane.core.engine.async_engine import AsyncEngine
from tests.core.pooling.test_cross_encoder import DOCS, QUERY, hf_logits
from tests.entrypoints.server_utils import API_KEY, start_server

NAME = "tiny-reranker"


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> str:
    from tests.fixtures.tiny_bert import make_tiny_cross_encoder

    return make_tiny_cross_encoder(str(tmp_path_factory.mktemp("reranker")))


@pytest.fixture(scope="module")
def reranker_server(reranker_dir):
    engine = AsyncEngine.from_engine_args(
        EngineArgs(model=reranker_dir, served_model_name=[NAME], seed=0))
    running = start_server(engine, api_key=API_KEY)
    yield running
    running.stop()


def test_score_and_rerank_match_transformers(reranker_server, reranker_dir):
    expected = torch.sigmoid(hf_logits(reranker_dir, [(QUERY, d) for d in DOCS]))[:, 0]
    tok = reranker_server.engine.tokenizer
    tokens = sum(len(tok(QUERY, d)["input_ids"]) for d in DOCS)
    with reranker_server.client() as c:
        score = c.post("/score", json={"model": NAME, "text_1": QUERY, "text_2": DOCS})
        one = c.post("/score", json={"text_1": QUERY, "text_2": DOCS[0]})
        pairwise = c.post("/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS[:2]})
        rerank = c.post("/rerank", json={"model": NAME, "query": QUERY, "documents": DOCS})
        top = c.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2})
    assert score.status_code == 200, score.text
    body = score.json()
    assert body["object"] == "list" and body["model"] == NAME
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    assert all(d["object"] == "score" for d in body["data"])
    ours = torch.tensor([d["score"] for d in body["data"]])
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens
    assert abs(one.json()["data"][0]["score"] - expected[0].item()) < 1e-5
    assert torch.allclose(torch.tensor([d["score"] for d in pairwise.json()["data"]]),
                          expected[:2], atol=1e-5)
    # /rerank: every document, best first, with its text and index.
    assert rerank.status_code == 200, rerank.text
    results = rerank.json()["results"]
    order = torch.argsort(expected, descending=True).tolist()
    assert [r["index"] for r in results] == order
    assert [r["document"]["text"] for r in results] == [DOCS[i] for i in order]
    assert torch.allclose(torch.tensor([r["relevance_score"] for r in results]),
                          expected[order], atol=1e-5)
    assert rerank.json()["usage"]["total_tokens"] == tokens
    assert rerank.json()["model"] == NAME
    assert [r["index"] for r in top.json()["results"]] == order[:2]


def test_score_rerank_refusals(reranker_server):
    with reranker_server.client() as c:
        for body in ({"text_1": [], "text_2": "b"}, {"text_1": ["a", "b"], "text_2": ["c"] * 3},
                     {"text_1": "a", "text_2": ""}):
            r = c.post("/score", json=body)
            assert r.status_code == 400, (body, r.text)
        for body in ({"query": "a", "documents": []}, {"query": "", "documents": ["b"]},
                     {"query": "a", "documents": ["b"], "top_n": -1}):
            r = c.post("/rerank", json=body)
            assert r.status_code == 400, (body, r.text)
        assert c.post("/score", json={"text_1": "a", "text_2": "b",
                                      "model": "nope"}).status_code == 404
        # A cross-encoder has no embeddings.
        r = c.post("/v1/embeddings", json={"input": "hello"})
        assert r.status_code == 400 and "cross-encoder" in r.json()["error"]["message"]


def test_generation_server_refuses_score_and_rerank(server):
    with server.client() as c:
        score = c.post("/score", json={"text_1": "a", "text_2": "b"})
        rerank = c.post("/rerank", json={"query": "a", "documents": ["b"]})
    assert score.status_code == 400 and "/score needs a pooling" in score.json()["error"]["message"]
    assert rerank.status_code == 400 and "/rerank" in rerank.json()["error"]["message"]
