"""Requests end cleanly however they end; bad input fails clearly and harms nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from backplane import LLM, SamplingParams
from tests.core.engine.conftest import PROMPTS


def _assert_no_leak(llm):
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert not llm.llm_engine.has_unfinished_requests()


def test_abort_mid_generation_frees_blocks(llama_llm):
    engine = llama_llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", prompt, params)
    for _ in range(3):
        engine.step()
    assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    finals = engine.abort_request([f"abort-{i}" for i in range(len(PROMPTS))])
    assert len(finals) == len(PROMPTS)
    assert all(f.finished and f.outputs[0].finish_reason == "abort" for f in finals)
    assert all(len(f.outputs[0].token_ids) >= 1 for f in finals)
    _assert_no_leak(llama_llm)
    # Aborting again (or an unknown id) is harmless.
    assert engine.abort_request(["abort-0", "never-existed"]) == []


def test_abort_waiting_request(llama_model_dir):
    llm = LLM(model=llama_model_dir, max_model_len=256, num_kv_blocks=64, max_num_seqs=1)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("first", PROMPTS[0], params)
    engine.add_request("second", PROMPTS[1], params)
    engine.step()
    assert engine.get_stats().num_waiting == 1
    engine.abort_request(["second"])
    while engine.has_unfinished_requests():
        engine.step()
    _assert_no_leak(llm)


def test_fcfs_order_with_one_slot_and_priority_order(llama_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for policy, priorities, expected in (
        ("fcfs", [0, 0, 0], ["a", "b", "c"]),
        ("priority", [5, 1, 3], ["b", "c", "a"]),
    ):
        llm = LLM(model=llama_model_dir, max_model_len=128, num_kv_blocks=32, max_num_seqs=1,
                  scheduling_policy=policy)
        engine = llm.llm_engine
        for rid, prio in zip("abc", priorities, strict=True):
            engine.add_request(rid, PROMPTS[0], params, priority=prio)
        order = []
        while engine.has_unfinished_requests():
            order += [o.request_id for o in engine.step() if o.finished]
        assert order == expected, policy


def test_bad_requests_raise_and_engine_keeps_serving(llama_llm):
    too_long = "word " * 400
    with pytest.raises(ValueError, match=r"max_model_len \(256\)"):
        llama_llm.generate([too_long], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match=r"max_tokens \(300\).*exceeds max_model_len \(256\)"):
        llama_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=300), use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llama_llm.generate([[1, 2, 10**7]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llama_llm.generate([[]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llama_llm.generate([PROMPTS[0]], SamplingParams(logprobs=50), use_tqdm=False)
    # A batch where one prompt is bad adds nothing.
    with pytest.raises(ValueError):
        llama_llm.generate([PROMPTS[0], too_long], SamplingParams(max_tokens=4), use_tqdm=False)
    _assert_no_leak(llama_llm)
    outs = llama_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4),
                              use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 for o in outs)
    _assert_no_leak(llama_llm)


def test_chat_applies_template(llama_llm):
    tokenizer = llama_llm.get_tokenizer()
    messages = [{"role": "user", "content": "hello there"}]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (out,) = llama_llm.chat(messages, params, use_tqdm=False)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    (direct,) = llama_llm.generate([list(expected)], params, use_tqdm=False)
    assert direct.outputs[0].token_ids == out.outputs[0].token_ids


def test_unknown_architecture_fails_at_load(llama_model_dir, tmp_path):
    bad = tmp_path / "bad-arch"
    shutil.copytree(llama_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["TotallyNewForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="TotallyNewForCausalLM"):
        LLM(model=str(bad), num_kv_blocks=16, max_model_len=128)


def test_missing_weights_and_files_fail_at_load(llama_model_dir, tmp_path):
    missing = tmp_path / "no-weights"
    shutil.copytree(llama_model_dir, missing)
    for name in os.listdir(missing):
        if name.endswith(".safetensors"):
            os.remove(missing / name)
    with pytest.raises(Exception, match="safetensors"):
        LLM(model=str(missing), num_kv_blocks=16, max_model_len=128)
    with pytest.raises(Exception, match="config.json|does not exist"):
        LLM(model=str(tmp_path / "nowhere"), num_kv_blocks=16, max_model_len=128)


def test_kv_cache_too_small_is_a_clear_start_error(llama_model_dir):
    with pytest.raises(ValueError, match=r"KV cache too small.*max_model_len \(256\) needs 16"):
        LLM(model=llama_model_dir, max_model_len=256, num_kv_blocks=4)


def test_unknown_engine_argument_is_rejected(llama_model_dir):
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        LLM(model=llama_model_dir, no_such_option=3)
