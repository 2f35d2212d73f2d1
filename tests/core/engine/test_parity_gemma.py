"""Gemma 2 and Gemma 3 (text) equal transformers' greedy `generate`, token for token (float32).

The tiny fixtures (tests/fixtures/tiny_gemma.py) have a sliding window of 8 and
the long prompts are 40+ tokens, so local layers really drop keys; Gemma 2's
attention soft-cap (1.0) and both final soft-caps are small enough to change
scores. Small blocks and a small token budget add chunked prefill and decode
across block boundaries.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from backplane import LLM, SamplingParams
from tests.core.engine.conftest import PROMPTS
from tests.fixtures.tiny_gemma import GEMMA_ARCHS, SLIDING_WINDOW, make_tiny_gemma

MAX_TOKENS = 10
LONG_PROMPT = ("the lighthouse keeper wrote in his journal every night about the sea, the ships "
               "that passed and the storms that came")
GEMMA_PROMPTS = [LONG_PROMPT, PROMPTS[2], PROMPTS[3]]


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {arch: make_tiny_gemma(root / arch, arch) for arch in GEMMA_ARCHS}


@functools.cache
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    # Eager attention: the implementation that applies Gemma 2's soft-cap.
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_generate(model_dir: str, ids: list[int], max_new_tokens: int):
    """transformers greedy `generate`: tokens and the log_softmax row of each step."""
    model = _hf_model(model_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True,
                             pad_token_id=model.config.pad_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    rows = [torch.log_softmax(logits[0].float(), dim=-1) for logits in out.logits]
    return tokens, rows


def _check(llm: LLM, model_dir: str, prompts=GEMMA_PROMPTS):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert len(tokenizer.encode(prompts[0])) > 2 * SLIDING_WINDOW
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = tokenizer.encode(prompt)
        expected, rows = _hf_generate(model_dir, ids, MAX_TOKENS)
        got = out.outputs[0].token_ids
        assert got == expected, prompt
        for step, (token, entry, row) in enumerate(zip(got, out.outputs[0].logprobs, rows,
                                                       strict=True)):
            assert math.isclose(entry[token].logprob, float(row[token]), abs_tol=1e-4), step
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"


def _llm(model_dir: str, **kw) -> LLM:
    return LLM(model=model_dir, max_model_len=128, num_kv_blocks=64, block_size=4,
               max_num_batched_tokens=16, **kw)


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_gemma_greedy_and_logprobs_match_transformers(gemma_dirs, arch):
    llm = _llm(gemma_dirs[arch])
    config = llm.llm_engine.config
    spec = config.attention_spec()
    assert spec.sliding_window == SLIDING_WINDOW
    assert spec.logits_soft_cap == (1.0 if arch == "gemma2" else None)
    runner = llm.llm_engine.engine_core.model_runner
    # Local layers keep the window, global ones do not: one backend instance each.
    windows = [b.spec.sliding_window for b in runner.layer_backends]
    assert windows == ([8, None, 8, None] if arch == "gemma2" else [8, 8, None, 8])
    assert len(runner.distinct_layer_backends) == 2
    # The compiled kernel is the default; it soft-caps too.
    assert config.attention_backend_name == "cpu_paged"
    if arch == "gemma2":
        assert {b.spec.logits_soft_cap for b in runner.layer_backends} == {1.0}
    _check(llm, gemma_dirs[arch])


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_gemma_on_the_torch_cpu_backend(gemma_dirs, arch):
    llm = _llm(gemma_dirs[arch], attention_backend="cpu_sdpa")
    assert llm.llm_engine.config.attention_backend_name == "cpu_sdpa"
    _check(llm, gemma_dirs[arch], prompts=GEMMA_PROMPTS[:1])


def test_soft_capped_model_refused_by_a_backend_without_soft_cap(gemma_dirs, monkeypatch):
    from backplane.platforms.cpu.paged_attention import CpuPagedAttentionBackend

    monkeypatch.setattr(CpuPagedAttentionBackend, "supports_logits_soft_cap", False)
    with pytest.raises(ValueError, match="soft-capping"):
        _llm(gemma_dirs["gemma2"], attention_backend="cpu_paged")
    # Without forcing, selection moves on to a backend that soft-caps.
    assert _llm(gemma_dirs["gemma2"]).llm_engine.config.attention_backend_name == "cpu_sdpa"
