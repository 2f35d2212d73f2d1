"""Cross-encoders (BertForSequenceClassification) through `LLM.score`: the scores of text
pairs against transformers' logits + the model's activation (vLLM's choice), and refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from backplane import LLM
from backplane.core.models.bert import _cross_encoder_activation
from backplane.pooling_params import PoolingParams

QUERY = "what did the king say"
DOCS = ["The king said to his servants, go", "x", "In the beginning",
        "a much longer sentence with many more tokens in it than that"]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory) -> str:
    from tests.fixtures.tiny_bert import make_tiny_cross_encoder

    return make_tiny_cross_encoder(str(tmp_path_factory.mktemp("cross_encoder")))


def hf_logits(model_dir: str, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """transformers' logits for each pair ([CLS] a [SEP] b [SEP] with token type ids)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                               dtype=torch.float32).eval()
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True,
              return_token_type_ids=True, return_tensors="pt")
    assert enc["token_type_ids"].max() == 1  # the second text is segment 1
    with torch.inference_mode():
        return model(**enc).logits


def test_cross_encoder_scores_match_transformers(cross_encoder_dir):
    llm = LLM(model=cross_encoder_dir)  # auto: an encoder -> pooling
    engine = llm.llm_engine
    assert engine.runner_type == "pooling" and engine.is_cross_encoder
    out = llm.score(QUERY, DOCS, use_tqdm=False)
    expected = torch.sigmoid(hf_logits(cross_encoder_dir, [(QUERY, d) for d in DOCS]))[:, 0]
    ours = torch.tensor([o.outputs.score for o in out])
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert len(set(ours.tolist())) == len(DOCS)
    # Pairwise (as many text_1 as text_2), and one pair alone gives the same score.
    pairwise = llm.score(DOCS, DOCS[::-1], use_tqdm=False)
    expected = torch.sigmoid(hf_logits(cross_encoder_dir, list(zip(DOCS, DOCS[::-1], strict=True))))[:, 0]
    assert torch.allclose(torch.tensor([o.outputs.score for o in pairwise]), expected, atol=1e-5)
    alone = llm.score(QUERY, DOCS[1], use_tqdm=False)[0].outputs.score
    assert abs(alone - ours[1].item()) < 1e-5
    # The prompt is the pair: [CLS] a [SEP] b [SEP].
    tok = engine.tokenizer
    assert out[0].prompt_token_ids == tok(QUERY, DOCS[0])["input_ids"]
    # A cross-encoder has no embeddings.
    with pytest.raises(ValueError, match="cross-encoder"):
        llm.embed("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="text_1 has 2 texts"):
        llm.score(DOCS[:2], DOCS[:3], use_tqdm=False)


def test_activation_follows_vllm():
    ns = SimpleNamespace
    x = torch.tensor([0.5, -1.0])
    assert torch.equal(_cross_encoder_activation(ns(num_labels=1))(x), torch.sigmoid(x))
    assert torch.equal(_cross_encoder_activation(ns(num_labels=2))(x), torch.softmax(x, -1))
    assert torch.equal(_cross_encoder_activation(ns(num_labels=1, problem_type="regression"))(x),
                       x)
    identity = "torch.nn.modules.linear.Identity"
    assert torch.equal(_cross_encoder_activation(
        ns(num_labels=1, sbert_ce_default_activation_function=identity))(x), x)
    assert torch.equal(_cross_encoder_activation(
        ns(num_labels=1, sentence_transformers={"activation_fn": identity}))(x), x)
    with pytest.raises(ValueError, match="not supported"):
        _cross_encoder_activation(ns(num_labels=1, sbert_ce_default_activation_function="os.system"))


def test_embedding_models_refuse_the_score_task(tiny_bert_factory):
    llm = LLM(model=tiny_bert_factory(pooling=None))
    assert not llm.llm_engine.is_cross_encoder
    with pytest.raises(ValueError, match="cross-encoder"):
        llm.encode("hello", PoolingParams(task="score"), use_tqdm=False)
