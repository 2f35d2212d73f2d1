"""fp8 KV cache end to end on the cpu platform (kv_cache_dtype fp8 / fp8_e5m2).

Kernel-level accuracy is the conformance kit's (test_cpu_conformance.py runs its
fp8 cases); here: capacity, generation with prefix caching and preemption,
the logprob deviation from the unquantized cache (the bound docs/configuration.md
states), the scales' sources, and the refusals.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backplane import LLM, SamplingParams
from backplane.config import EngineArgs
from backplane.config.resolve import problems
from backplane.platforms import resolve_platform
from backplane.plugins_sdk.attention import quantize_kv_fp8

PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches",
    "Once upon a time there lived a king who had three daughters and a horse",
    "Scientists measure the speed of light with careful experiments and clocks",
    "Memory is a strange thing: we forget what we want to keep and keep what",
    "The committee will meet on Tuesday to discuss the budget for the year",
    "Rivers carry water from the mountains to the sea, shaping valleys along",
    "Please write a short story about a robot who learns to paint the ocean",
    "He opened the window, took a deep breath, and decided to walk to the office",
]
# |Δlogprob| of fp8 e4m3 (scales 1.0) vs the float32 cache on the tiny llama over
# PROMPTS (teacher-forced prompt logprobs, 329 positions): measured mean 0.028,
# max 0.12. Bounds with headroom, quoted in docs/configuration.md.
E4M3_MEAN_BOUND, E4M3_MAX_BOUND = 0.05, 0.25


def _runner(llm):
    return llm.llm_engine.engine_core.model_runner


def _prompt_logprobs(llm) -> np.ndarray:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return np.array([entry[out.prompt_token_ids[i]].logprob
                     for out in outs for i, entry in enumerate(out.prompt_logprobs)
                     if entry is not None])


def test_fp8_holds_twice_the_blocks_of_bf16_in_the_same_memory(llama_model_dir):
    blocks = {}
    for kv in ("auto", "fp8", "fp8_e5m2"):
        llm = LLM(model=llama_model_dir, dtype="bfloat16", kv_cache_dtype=kv, max_model_len=64,
                  kv_cache_memory_bytes=2**20, max_num_seqs=256)
        runner = _runner(llm)
        blocks[kv] = runner.num_blocks
        expected_dtype = {"auto": torch.bfloat16, "fp8": torch.float8_e4m3fn,
                          "fp8_e5m2": torch.float8_e5m2}[kv]
        assert all(c.dtype == expected_dtype for c in runner.kv_caches)
        assert llm.llm_engine.get_stats().num_total_blocks == runner.num_blocks
    assert blocks["fp8"] == blocks["fp8_e5m2"] == 2 * blocks["auto"], blocks


def test_fp8_generation_with_prefix_caching_and_preemption_returns_every_block(
        llama_model_dir):
    shared = "the lighthouse keeper wrote in his journal every night about the sea "
    prompts = [shared + p for p in PROMPTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # 9 blocks of 16 tokens cannot hold four 74..87-token prompts plus 24 tokens each:
    # requests are preempted and recomputed, and the shared prefix is a cache hit.
    tight = LLM(model=llama_model_dir, kv_cache_dtype="fp8", max_model_len=128,
                num_kv_blocks=9, enable_prefix_caching=True)
    outs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    # The same fp8 run with room for everything and no prefix cache: recomputation and
    # cache hits read the same quantised K/V, so greedy decoding agrees.
    roomy = LLM(model=llama_model_dir, kv_cache_dtype="fp8", max_model_len=128,
                num_kv_blocks=64, enable_prefix_caching=False)
    expected = roomy.generate(prompts, params, use_tqdm=False)
    agree = np.mean([np.mean(np.array(a.outputs[0].token_ids) == b.outputs[0].token_ids)
                     for a, b in zip(outs, expected, strict=True)])
    assert agree >= 0.9, f"greedy tokens agree on {agree:.0%} only"


def test_fp8_logprobs_stay_within_the_documented_bound(llama_model_dir):
    reference = _prompt_logprobs(LLM(model=llama_model_dir, max_model_len=128, num_kv_blocks=64))
    fp8 = _prompt_logprobs(LLM(model=llama_model_dir, kv_cache_dtype="fp8", max_model_len=128,
                               num_kv_blocks=64))
    delta = np.abs(fp8 - reference)
    assert delta.size >= 100
    assert 0 < delta.mean() < E4M3_MEAN_BOUND, delta.mean()
    assert delta.max() < E4M3_MAX_BOUND, delta.max()


def test_calculate_kv_scales_sets_scales_from_the_first_step(llama_model_dir):
    llm = LLM(model=llama_model_dir, kv_cache_dtype="fp8", calculate_kv_scales=True,
              max_model_len=128, num_kv_blocks=32)
    scales = _runner(llm).kv_scales
    assert torch.equal(scales.values, torch.ones_like(scales.values))
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    values = scales.values.clone()
    assert (values != 1.0).all() and (values > 0).all()
    # amax / 448 of the first step's keys: the tiny model's keys reach a few units.
    assert (values < 0.1).all(), values
    # Set once: a later step does not move them.
    llm.generate(PROMPTS[2:4], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert torch.equal(scales.values, values)
    assert "calculate_kv_scales" in scales.describe()


def test_checkpoint_kv_scales_are_read(llama_model_dir, tmp_path):
    model_dir = tmp_path / "with_scales"
    shutil.copytree(llama_model_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    # vLLM / compressed-tensors names on layer 0; AutoFP8's output_scale on layer 1.
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.02)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.03)
    weights["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor([0.04])
    save_file(weights, str(model_dir / "model.safetensors"))
    llm = LLM(model=str(model_dir), kv_cache_dtype="fp8", max_model_len=64, num_kv_blocks=16)
    values = _runner(llm).kv_scales.values
    assert values[0].tolist() == pytest.approx([0.02, 0.03])
    assert values[1].tolist() == pytest.approx([0.04, 1.0])
    assert "checkpoint" in _runner(llm).kv_scales.describe()
    # The scales are in use: what layer 0's cache holds is key / 0.02 in fp8.
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_checkpoint_scales_of_unknown_layers_are_refused(llama_model_dir, tmp_path):
    model_dir = tmp_path / "bad_scales"
    shutil.copytree(llama_model_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.layers.99.self_attn.k_scale"] = torch.tensor(0.02)
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layer\(s\) \[99\]"):
        LLM(model=str(model_dir), kv_cache_dtype="fp8", max_model_len=64, num_kv_blocks=16)


def test_fp8_refusals_name_the_field(llama_model_dir):
    cpu = resolve_platform("cpu")
    # The torch backend declares no fp8: selection refuses it with the reason.
    found = problems(EngineArgs(model=llama_model_dir, kv_cache_dtype="fp8",
                                attention_backend="cpu_sdpa"), cpu)
    assert any("kv_cache_dtype 'fp8' not in" in p for p in found), found
    found = problems(EngineArgs(model=llama_model_dir, calculate_kv_scales=True), cpu)
    assert any("calculate_kv_scales (True) needs an fp8 kv_cache_dtype" in p for p in found)
    assert not problems(EngineArgs(model=llama_model_dir, kv_cache_dtype="fp8_e5m2",
                                   calculate_kv_scales=True), cpu)


def test_quantizer_saturates_instead_of_overflowing():
    x = torch.tensor([1000.0, -1e6, 447.0, 0.001])
    q = quantize_kv_fp8(x, 1.0, torch.float8_e4m3fn).float()
    assert q.tolist() == [448.0, -448.0, 448.0, pytest.approx(0.001, abs=2**-10)]
    assert torch.isfinite(quantize_kv_fp8(torch.tensor([1e9]), 1.0, torch.float8_e5m2).float())
