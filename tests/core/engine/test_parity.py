"""Greedy output equals transformers token for token (float32), however it is scheduled."""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams
from tests.conftest import ARCHS
from tests.core.engine.conftest import PROMPTS
from tests.core.engine.hf_reference import hf_greedy

MAX_TOKENS = 12


def _check_parity(llm: LLM, model_dir: str, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert [o.prompt for o in outputs] == prompts
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        expected, _ = hf_greedy(model_dir, ids, max_tokens)
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].finish_reason == "length"
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    return outputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_transformers(tiny_model_factory, arch, prefix_caching):
    model_dir = tiny_model_factory(arch)
    llm = LLM(model=model_dir, max_model_len=256, num_kv_blocks=96,
              enable_prefix_caching=prefix_caching)
    _check_parity(llm, model_dir)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_forced(tiny_model_factory, arch):
    model_dir = tiny_model_factory(arch)
    llm = LLM(model=model_dir, max_model_len=256, num_kv_blocks=96, max_num_batched_tokens=7,
              block_size=4)
    _check_parity(llm, model_dir)


def test_preemption_forced_every_request_finishes(llama_model_dir):
    # 8 blocks of 16 tokens; 4 prompts (up to 74 tokens) + 24 new tokens each need 14:
    # the batch cannot fit, so requests are preempted and recomputed.
    llm = LLM(model=llama_model_dir, max_model_len=112, num_kv_blocks=8, block_size=16)
    _check_parity(llm, llama_model_dir, max_tokens=24)
    assert llm.llm_engine.get_stats().num_preemptions > 0


def test_preemption_with_priority_policy(llama_model_dir):
    llm = LLM(model=llama_model_dir, max_model_len=112, num_kv_blocks=8,
              scheduling_policy="priority")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False, priority=[3, 2, 1, 0])
    tokenizer = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        expected, _ = hf_greedy(llama_model_dir, tokenizer.encode(prompt), 24)
        assert out.outputs[0].token_ids == expected
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_token_id_and_text_prompts_mixed(llama_llm, llama_model_dir):
    tokenizer = llama_llm.get_tokenizer()
    ids = tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    text_out, ids_out = llama_llm.generate([PROMPTS[0], ids], params, use_tqdm=False)
    assert ids_out.prompt is None and ids_out.prompt_token_ids == ids
    assert text_out.outputs[0].token_ids == ids_out.outputs[0].token_ids
    assert text_out.outputs[0].text == tokenizer.decode(text_out.outputs[0].token_ids)


def test_prefix_cache_hits_and_same_output(llama_model_dir):
    shared = "the lighthouse keeper wrote in his journal every night about the sea " * 3
    prompts = [shared + "and the ships", shared + "and the storm", shared + "and the birds"]
    llm = LLM(model=llama_model_dir, max_model_len=256, num_kv_blocks=64)
    first = _check_parity(llm, llama_model_dir, prompts=prompts[:1])
    rest = _check_parity(llm, llama_model_dir, prompts=prompts[1:])
    stats = llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits >= 2 * 16, stats
    assert rest[0].num_cached_tokens >= 16
    assert first[0].num_cached_tokens == 0


def test_sliding_window_matches_transformers(tmp_path):
    from tests.fixtures.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "mistral-sw", "mistral", sliding_window=8)
    llm = LLM(model=model_dir, max_model_len=128, num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=16)
    assert llm.llm_engine.config.attention_spec().sliding_window == 8
    _check_parity(llm, model_dir, max_tokens=16)


def test_optimization_level_o1_compiles_and_matches(llama_model_dir):
    """O1 = torch.compile with the platform's backend; greedy tokens stay identical."""
    llm = LLM(model=llama_model_dir, max_model_len=128, num_kv_blocks=48, optimization_level=1)
    runner = llm.llm_engine.engine_core.model_runner
    assert llm.llm_engine.config.compilation_config.compile
    assert hasattr(runner.model, "_orig_mod"), "model was not compiled at O1"
    _check_parity(llm, llama_model_dir, prompts=PROMPTS[:2], max_tokens=6)


@pytest.mark.parametrize("backend", ["cpu_paged", "cpu_sdpa"])
def test_each_cpu_attention_backend_matches_transformers(tiny_model_factory, backend):
    """The compiled kernel is the default; the torch backend is the no-compiler fallback."""
    model_dir = tiny_model_factory("qwen2")
    llm = LLM(model=model_dir, max_model_len=256, num_kv_blocks=96, block_size=4,
              max_num_batched_tokens=9, attention_backend=backend)
    assert llm.llm_engine.config.attention_backend_name == backend
    _check_parity(llm, model_dir)
