"""Granite and OLMo 2 match transformers (float32): greedy tokens and logprobs.

The fixtures (tests/fixtures/tiny_granite_olmo.py) set every Granite multiplier
away from its default and randomise the norm weights, so an ignored
multiplier, a wrong softmax scale or a misplaced norm shows up here. Prefill is
forced into chunks (7 tokens a step) and the long prompt spans many 4-token KV
blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from backplane import LLM, SamplingParams
from tests.core.engine.conftest import PROMPTS
from tests.core.engine.hf_reference import hf_model, hf_prompt_logprobs
from tests.fixtures.tiny_granite_olmo import (
    GRANITE_MULTIPLIERS,
    GRANITE_OLMO_ARCHS,
    make_granite_olmo_config,
    make_tiny_granite_olmo,
)

MAX_TOKENS = 10
TOP_K = 3
BLOCK_SIZE = 4
MAX_BATCHED_TOKENS = 7
ATOL = 1e-4


@pytest.fixture(scope="module", params=GRANITE_OLMO_ARCHS)
def arch_llm(request, tmp_path_factory):
    arch = request.param
    model_dir = make_tiny_granite_olmo(tmp_path_factory.mktemp(arch), arch)
    llm = LLM(model=model_dir, max_model_len=256, num_kv_blocks=96, block_size=BLOCK_SIZE,
              max_num_batched_tokens=MAX_BATCHED_TOKENS)
    return arch, model_dir, llm


@torch.inference_mode()
def hf_generate(model_dir: str, prompt_ids: list[int], max_new_tokens: int):
    """transformers' own greedy `generate` (EOS suppressed) and each step's raw log_softmax."""
    out = hf_model(model_dir).generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    rows = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    return tokens, rows


def test_greedy_tokens_and_logprobs_match_generate(arch_llm):
    arch, model_dir, llm = arch_llm
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=TOP_K)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    longest = max(len(o.prompt_token_ids) for o in outputs)
    assert longest > 4 * MAX_BATCHED_TOKENS and longest > 8 * BLOCK_SIZE
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        completion = out.outputs[0]
        expected, rows = hf_generate(model_dir, out.prompt_token_ids, MAX_TOKENS)
        assert completion.token_ids == expected, (arch, prompt)
        assert len(completion.logprobs) == MAX_TOKENS
        for token, entry, row in zip(completion.token_ids, completion.logprobs, rows,
                                     strict=True):
            assert entry[token].rank == 1
            top_values, top_ids = row.topk(TOP_K)
            for tid, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
                assert math.isclose(entry[tid].logprob, value, abs_tol=ATOL), (arch, prompt)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"


def test_chunked_prompt_logprobs_match_transformers(arch_llm):
    arch, model_dir, llm = arch_llm
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    (out,) = llm.generate([PROMPTS[2]], params, use_tqdm=False)
    ids = out.prompt_token_ids
    got = torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:],
                                                      strict=True)])
    want = hf_prompt_logprobs(model_dir, ids).gather(1, torch.tensor(ids[1:])[:, None])
    assert torch.allclose(got, want.flatten(), atol=ATOL), arch


def test_granite_multipliers_reach_the_model():
    from backplane.core.models.granite import GraniteForCausalLM

    model = GraniteForCausalLM(make_granite_olmo_config("granite"))
    assert model.logits_scaling == GRANITE_MULTIPLIERS["logits_scaling"]
    assert model.model.embedding_multiplier == GRANITE_MULTIPLIERS["embedding_multiplier"]
    for layer in model.model.layers:
        # The softmax scale reaches the attention backend through Attention.scale.
        assert layer.self_attn.attn.scale == GRANITE_MULTIPLIERS["attention_multiplier"]
        assert layer.residual_multiplier == GRANITE_MULTIPLIERS["residual_multiplier"]


def test_olmo2_norm_layout_matches_checkpoint_names():
    from backplane.core.models.olmo2 import Olmo2ForCausalLM

    model = Olmo2ForCausalLM(make_granite_olmo_config("olmo2"))
    names = model.expected_weight_names()
    assert not any("input_layernorm" in n for n in names)
    assert "model.layers.0.post_feedforward_layernorm.weight" in names
    attn = model.model.layers[0].self_attn
    # q/k norms span the whole projection (all heads), not one head.
    assert attn.q_norm.weight.shape == (attn.q_size,)
    assert attn.k_norm.weight.shape == (attn.kv_size,)
