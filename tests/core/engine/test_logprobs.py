"""Logprobs come from the raw logits and agree with transformers' log_softmax."""

from __future__ import annotations

import math

import torch

from backplane import SamplingParams
from tests.core.engine.conftest import PROMPTS
from tests.core.engine.hf_reference import hf_greedy, hf_prompt_logprobs


def test_sample_logprobs_match_transformers(llama_llm, llama_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    outputs = llama_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    for out in outputs:
        expected_tokens, rows = hf_greedy(llama_model_dir, out.prompt_token_ids, 6)
        completion = out.outputs[0]
        assert completion.token_ids == expected_tokens
        assert len(completion.logprobs) == 6
        total = 0.0
        for token, entry, row in zip(completion.token_ids, completion.logprobs, rows, strict=True):
            assert token in entry
            assert math.isclose(entry[token].logprob, float(row[token]), abs_tol=1e-4)
            assert entry[token].rank == 1  # greedy picks the most likely token
            top_values, top_ids = row.topk(3)
            for tid, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
                assert math.isclose(entry[tid].logprob, value, abs_tol=1e-4)
            total += entry[token].logprob
        assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-6)


def test_prompt_logprobs_match_transformers(llama_llm, llama_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    (out,) = llama_llm.generate([PROMPTS[2]], params, use_tqdm=False)
    ids = out.prompt_token_ids
    reference = hf_prompt_logprobs(llama_model_dir, ids)
    assert len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert math.isclose(entry[ids[pos]].logprob, float(reference[pos - 1, ids[pos]]),
                            abs_tol=1e-4)
        expected_rank = int((reference[pos - 1] > reference[pos - 1, ids[pos]]).sum()) + 1
        assert entry[ids[pos]].rank == expected_rank


def test_prompt_logprobs_with_chunked_prefill(llama_model_dir):
    from backplane import LLM

    llm = LLM(model=llama_model_dir, max_model_len=256, num_kv_blocks=64,
              max_num_batched_tokens=8)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    (out,) = llm.generate([PROMPTS[2]], params, use_tqdm=False)
    reference = hf_prompt_logprobs(llama_model_dir, out.prompt_token_ids)
    got = torch.tensor([
        e[t].logprob for e, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:],
                                     strict=True)
    ])
    want = reference.gather(1, torch.tensor(out.prompt_token_ids[1:])[:, None]).flatten()
    assert torch.allclose(got, want, atol=1e-4)


def test_logprobs_are_from_raw_logits_not_processed(llama_llm):
    # A huge temperature changes sampling, not the reported logprobs.
    hot = SamplingParams(temperature=50.0, seed=1, max_tokens=4, ignore_eos=True, logprobs=0)
    cold = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=0)
    (hot_out,) = llama_llm.generate([PROMPTS[0]], hot, use_tqdm=False)
    first = hot_out.outputs[0].token_ids[0]
    (ref,) = llama_llm.generate([PROMPTS[0]], SamplingParams(
        temperature=0.0, max_tokens=1, logprobs=20, ignore_eos=True), use_tqdm=False)
    del cold
    raw = hot_out.outputs[0].logprobs[0][first].logprob
    if first in ref.outputs[0].logprobs[0]:
        assert math.isclose(raw, ref.outputs[0].logprobs[0][first].logprob, abs_tol=1e-5)
    assert raw <= max(e.logprob for e in ref.outputs[0].logprobs[0].values()) + 1e-6
