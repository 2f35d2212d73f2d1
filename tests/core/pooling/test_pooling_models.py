"""Pooling models end to end through `LLM.embed` / `encode` / `score`, against references:
sentence-transformers for the real all-MiniLM-L6-v2, transformers for tiny random models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from backplane import LLM
from backplane.config.runner import runner_problems
from backplane.pooling_params import PoolingParams
from tests.fixtures.pooling import SENTENCES

TEXTS = ["In the beginning", "a much longer sentence with many more tokens in it than that",
         "x", "The king said to his servants, go"]


def _matrix(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


def test_minilm_embed_matches_sentence_transformers(minilm_dir, minilm_reference):
    llm = LLM(model=minilm_dir)  # runner auto: modules.json -> pooling
    assert llm.llm_engine.runner_type == "pooling"
    out = llm.embed(SENTENCES, use_tqdm=False)
    ours = _matrix(out)
    assert ours.shape == minilm_reference.shape == (8, 384)
    cos = F.cosine_similarity(ours, minilm_reference)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(ours.norm(dim=-1), torch.ones(8), atol=1e-5)
    # Batching does not change a result: one at a time gives the same vectors.
    single = _matrix([llm.embed(s, use_tqdm=False)[0] for s in SENTENCES[:3]])
    assert torch.allclose(single, ours[:3], atol=1e-5)
    # Bi-encoder scoring is the cosine of the normalised embeddings.
    scores = llm.score(SENTENCES[0], [SENTENCES[4], SENTENCES[2]], use_tqdm=False)
    expected = minilm_reference[0] @ minilm_reference[[4, 2]].T
    assert torch.allclose(torch.tensor([s.outputs.score for s in scores]), expected, atol=1e-4)
    assert scores[0].outputs.score > scores[1].outputs.score
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="matryoshka"):
        llm.embed("hello", PoolingParams(dimensions=128), use_tqdm=False)


def _hf_hidden(model_dir: str, token_lists: list[list[int]], causal_lm: bool) -> list[torch.Tensor]:
    """transformers' last hidden states per prompt, run as one right-padded batch."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    longest = max(map(len, token_lists))
    ids = torch.zeros(len(token_lists), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    with torch.inference_mode():
        if causal_lm:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
        else:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [hidden[i, : len(t)] for i, t in enumerate(token_lists)]


@pytest.mark.parametrize("pooling", ["MEAN", "CLS", "LAST"])
def test_tiny_bert_matches_transformers(tiny_bert_factory, pooling):
    model_dir = tiny_bert_factory(pooling=pooling, normalize=False)
    llm = LLM(model=model_dir, runner="pooling", max_num_batched_tokens=512)
    outs = llm.embed(TEXTS, use_tqdm=False)
    hidden = _hf_hidden(model_dir, [o.prompt_token_ids for o in outs], causal_lm=False)
    pick = {"MEAN": lambda h: h.mean(0), "CLS": lambda h: h[0], "LAST": lambda h: h[-1]}[pooling]
    expected = torch.stack([pick(h) for h in hidden])
    assert torch.allclose(_matrix(outs), expected, atol=1e-4), (_matrix(outs) - expected).abs().max()


def test_tiny_bert_defaults_cls_normalized_and_encode_is_raw(tiny_bert_factory):
    model_dir = tiny_bert_factory(pooling=None)  # no modules.json: CLS + normalise (vLLM)
    llm = LLM(model=model_dir)  # auto: BertModel is an encoder -> pooling
    assert llm.llm_engine.runner_type == "pooling"
    embedded = _matrix(llm.embed(TEXTS, use_tqdm=False))
    encoded = llm.encode(TEXTS, use_tqdm=False)
    raw = torch.stack([o.outputs.data for o in encoded])
    hidden = _hf_hidden(model_dir, [o.prompt_token_ids for o in encoded], causal_lm=False)
    expected = torch.stack([h[0] for h in hidden])
    assert torch.allclose(raw, expected, atol=1e-4)
    assert torch.allclose(embedded, F.normalize(expected, dim=-1), atol=1e-5)


def test_dimensions_truncate_and_renormalise_on_matryoshka_models(tiny_bert_factory):
    model_dir = tiny_bert_factory(pooling="MEAN", normalize=True, is_matryoshka=True)
    llm = LLM(model=model_dir)
    full = llm.encode(TEXTS, use_tqdm=False)
    short = llm.embed(TEXTS, PoolingParams(dimensions=16), use_tqdm=False)
    for f, s in zip(full, short, strict=True):
        assert len(s.outputs.embedding) == 16
        expected = F.normalize(f.outputs.data[:16], dim=-1)
        assert torch.allclose(torch.tensor(s.outputs.embedding), expected, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        llm.embed("x", PoolingParams(dimensions=65), use_tqdm=False)


def test_qwen3_last_token_embeddings_match_transformers(tiny_model_factory):
    model_dir = tiny_model_factory("qwen3")
    llm = LLM(model=model_dir, runner="pooling")
    assert llm.llm_engine.runner_type == "pooling"
    encoded = llm.encode(TEXTS, use_tqdm=False)
    embedded = _matrix(llm.embed(TEXTS, use_tqdm=False))
    hidden = _hf_hidden(model_dir, [o.prompt_token_ids for o in encoded], causal_lm=True)
    expected = torch.stack([h[-1] for h in hidden])
    raw = torch.stack([o.outputs.data for o in encoded])
    assert torch.allclose(raw, expected, atol=1e-4), (raw - expected).abs().max()
    assert torch.allclose(embedded, F.normalize(expected, dim=-1), atol=1e-5)


def test_runner_refusals(tiny_model_factory, tiny_bert_factory):
    gen = LLM(model=tiny_model_factory("qwen3"))  # auto: a decoder without modules.json
    assert gen.llm_engine.runner_type == "generate"
    with pytest.raises(ValueError, match="--runner pooling"):
        gen.embed("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="encoder with no LM head"):
        LLM(model=tiny_bert_factory(pooling=None), runner="generate")
    with pytest.raises(ValueError, match="runner"):
        LLM(model=tiny_bert_factory(pooling=None), runner="embed")
    # Pooling is only offered for the architectures it is implemented and tested for.
    other = SimpleNamespace(architectures=["GPT2LMHeadModel"])
    assert "cannot run as a pooling model" in runner_problems("pooling", "/nonexistent", other)[0]
    assert runner_problems("pooling", "/nonexistent", SimpleNamespace(
        architectures=["Qwen3ForCausalLM"])) == []


def test_async_scheduling_is_refused_for_pooling_models(tiny_bert_factory):
    """A pooling model runs one prefill-only pass per request: nothing to overlap."""
    from backplane.config import EngineArgs
    from backplane.config.resolve import resolve
    from backplane.platforms import resolve_platform

    model = tiny_bert_factory()
    with pytest.raises(ValueError, match=r"async_scheduling \(True\) is not supported with the "
                                         "pooling runner"):
        LLM(model=model, async_scheduling=True, device="cpu")
    resolved = resolve(EngineArgs(model=model, device="cpu"), resolve_platform("cpu"))
    assert resolved.scheduler_config.async_scheduling is False
