"""Multi-LoRA through `LLM`: parity with PEFT, mixed batches, slots, caches and errors.

The reference is transformers with the adapter applied by PEFT (not merged by
us), greedy, float32, on the fixture Llama; adapters are made by PEFT with
random non-zero weights (tests/fixtures/tiny_lora.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.lora import LoRARequest
from tests.fixtures.tiny_lora import make_tiny_lora
from tests.fixtures.tiny_models import make_tiny_model

PROMPT = list(range(10, 30))
STEPS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(llama_model_dir, tmp_path_factory):
    """Three adapters: rank 4; rank 8; rank 8 rsLoRA on attention projections only."""
    root = tmp_path_factory.mktemp("loras")
    return [
        LoRARequest("r4", 1, make_tiny_lora(root / "r4", llama_model_dir, rank=4, seed=1)),
        LoRARequest("r8", 2, make_tiny_lora(root / "r8", llama_model_dir, rank=8, seed=2)),
        LoRARequest("attn", 3, make_tiny_lora(root / "attn", llama_model_dir, rank=8, seed=3,
                                              use_rslora=True,
                                              targets=("q_proj", "v_proj", "o_proj"))),
    ]


@functools.cache
def _peft_greedy(base: str, adapter: str | None) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(STEPS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


def _llm(base: str, **overrides) -> LLM:
    kwargs = dict(model=base, enable_lora=True, max_loras=2, max_lora_rank=8,
                  max_model_len=128, num_kv_blocks=128)
    kwargs.update(overrides)
    return LLM(**kwargs)


def test_each_adapter_and_a_mixed_batch_match_peft(llama_model_dir, adapters):
    """Three adapters and the base, alone and in one batch. max_loras=2 < 3 adapters:
    the third waits for a slot, and slots are reused."""
    requests = [None, *adapters]
    want = [_peft_greedy(llama_model_dir, r and r.lora_path) for r in requests]
    assert len({tuple(w) for w in want}) == 4  # the adapters change the output
    llm = _llm(llama_model_dir)
    for request, expected in zip(requests, want, strict=True):
        (out,) = llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, lora_request=request,
                              use_tqdm=False)
        assert out.outputs[0].token_ids == expected, request
    mixed = llm.generate([{"prompt_token_ids": PROMPT}] * 8, GREEDY,
                         lora_request=requests * 2, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed] == want * 2
    runner = llm.llm_engine.engine_core.model_runner
    assert len(runner.lora.resident) == 2  # max_loras slots
    # Finished rows leave the runner's batch at the next step: then every slot is free.
    llm.generate("x", SamplingParams(max_tokens=1), use_tqdm=False)
    assert runner.lora._users == [0, 0]
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_prefix_cache_is_never_shared_across_adapters(llama_model_dir, adapters):
    llm = _llm(llama_model_dir, enable_prefix_caching=True, block_size=4)
    prompt = [{"prompt_token_ids": list(range(40, 80))}]

    def hits_after(request) -> int:
        before = llm.llm_engine.get_stats().prefix_cache_hits
        llm.generate(prompt, GREEDY, lora_request=request, use_tqdm=False)
        return llm.llm_engine.get_stats().prefix_cache_hits - before

    assert hits_after(adapters[0]) == 0
    assert hits_after(adapters[1]) == 0  # same tokens, another adapter: no hit
    assert hits_after(None) == 0  # nor the base model
    assert hits_after(adapters[0]) > 0  # the same adapter again: hits


def test_engine_process_and_speculation_keep_adapters_exact(llama_model_dir, adapters):
    want = _peft_greedy(llama_model_dir, adapters[1].lora_path)
    llm = _llm(llama_model_dir, engine_process=True)
    try:
        (out,) = llm.generate([{"prompt_token_ids": PROMPT}], GREEDY,
                              lora_request=adapters[1], use_tqdm=False)
        assert out.outputs[0].token_ids == want
    finally:
        llm.llm_engine.shutdown()
    spec = _llm(llama_model_dir, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    (out,) = spec.generate([{"prompt_token_ids": PROMPT}], GREEDY, lora_request=adapters[1],
                           use_tqdm=False)
    assert out.outputs[0].token_ids == want


def test_host_cache_holds_max_cpu_loras(llama_model_dir, adapters):
    llm = _llm(llama_model_dir, max_loras=1, max_cpu_loras=2)
    for request in adapters:
        llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, lora_request=request,
                     use_tqdm=False)
    cache = llm.llm_engine.engine_core.lora_adapters
    assert len(cache._loaded) == 2 and "r4" not in "".join(cache._loaded)  # LRU dropped


def test_bad_requests_and_settings_are_refused_and_the_engine_keeps_serving(
        llama_model_dir, adapters, tmp_path):
    llm = _llm(llama_model_dir, max_lora_rank=4)
    with pytest.raises(ValueError, match="max_lora_rank|rank"):  # rank 8 > 4
        llm.generate("hi", GREEDY, lora_request=adapters[1], use_tqdm=False)
    with pytest.raises(ValueError, match="does not exist|not a directory|missing"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("gone", 9, str(tmp_path / "nope")),
                     use_tqdm=False)
    # Valid config, weights for another hidden size: refused when the engine core loads
    # it; that request ends as aborted, the others are served.
    other = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96)
    wrong = LoRARequest("wrong", 5, make_tiny_lora(tmp_path / "wrong", other, rank=4))
    outs = llm.generate(["hello there", "hello there"], GREEDY,
                        lora_request=[wrong, adapters[0]], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[1].outputs[0].token_ids == llm.generate(
        "hello there", GREEDY, lora_request=adapters[0], use_tqdm=False)[0].outputs[0].token_ids
    plain = LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=32)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate("hi", GREEDY, lora_request=adapters[0], use_tqdm=False)
    for kwargs, message in [
        (dict(max_loras=2), "only apply with enable_lora"),
        (dict(enable_lora=True, max_loras=0), "max_loras (0)"),
        (dict(enable_lora=True, max_lora_rank=1024), "max_lora_rank (1024)"),
        (dict(enable_lora=True, max_loras=3, max_cpu_loras=2), "max_cpu_loras (2)"),
    ]:
        with pytest.raises(ValueError) as info:
            LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=32, **kwargs)
        assert message in str(info.value)
