"""Async scheduling (step N+1 planned while step N runs) gives the synchronous loop's outputs."""

from __future__ import annotations

import pytest

from backplane import LLM, SamplingParams
from backplane.config import EngineArgs
from backplane.core.engine.llm_engine import LLMEngine

# Few blocks (preemption), a small token budget (chunked prefill), prefix sharing.
TIGHT = dict(max_model_len=128, num_kv_blocks=20, block_size=8, max_num_batched_tokens=32,
             max_num_seqs=8, enable_prefix_caching=True, dtype="float32", device="cpu")
SHARED = "a long shared prefix that several requests repeat word for word "


def _prompts_and_params():
    prompts = [SHARED + f"request {i}" if i % 3 == 0 else f"prompt {i} " * (1 + i % 4)
               for i in range(12)]
    params = []
    for i in range(12):
        kwargs = dict(max_tokens=4 + 3 * i, ignore_eos=True)
        if i % 2:
            kwargs.update(temperature=0.9, top_p=0.9, seed=100 + i)  # seeded sampling
        else:
            kwargs.update(temperature=0.0)
        if i == 4:
            kwargs.update(stop=[" "], include_stop_str_in_output=False)  # stop string
        if i == 6:
            kwargs.update(n=2, temperature=0.7, seed=7)
        params.append(SamplingParams(**kwargs))
    return prompts, params


def _generate(model_dir, async_scheduling):
    llm = LLM(model=model_dir, async_scheduling=async_scheduling, **TIGHT)
    assert llm.llm_engine.config.scheduler_config.async_scheduling is async_scheduling
    prompts, params = _prompts_and_params()
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs], stats


def test_greedy_seeded_stops_and_preemption_equal_the_synchronous_loop(llama_model_dir):
    sync, sync_stats = _generate(llama_model_dir, False)
    overlapped, stats = _generate(llama_model_dir, True)
    assert overlapped == sync
    assert stats.num_preemptions > 0 and sync_stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    # Length limits hold exactly: no request gets the extra token planned past its end.
    _, params = _prompts_and_params()
    for outs, p in zip(overlapped, params, strict=True):
        for token_ids, _, reason in outs:
            assert len(token_ids) <= p.max_tokens
            if reason == "length":
                assert len(token_ids) == p.max_tokens


def _run_with_aborts(model_dir, async_scheduling):
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model_dir, async_scheduling=async_scheduling, **TIGHT))
    prompts, _ = _prompts_and_params()
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i, prompt in enumerate(prompts[:6]):
        engine.add_request(f"r{i}", prompt, params)
    finals, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        steps += 1
        if steps == 4:
            for final in engine.abort_request(["r1", "r4"]):
                finals[final.request_id] = final
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    assert stats.num_running == stats.num_waiting == 0
    return {rid: (out.outputs[0].token_ids, out.outputs[0].finish_reason)
            for rid, out in finals.items()}


def test_aborts_mid_flight(llama_model_dir):
    sync = _run_with_aborts(llama_model_dir, False)
    overlapped = _run_with_aborts(llama_model_dir, True)
    assert set(sync) == set(overlapped) == {f"r{i}" for i in range(6)}
    for rid in sync:
        if rid in ("r1", "r4"):
            # Aborted at the same call; the overlapped loop may be a step ahead, never
            # on a different path.
            assert overlapped[rid][1] == sync[rid][1] == "abort"
            shorter, longer = sorted((overlapped[rid][0], sync[rid][0]), key=len)
            assert longer[: len(shorter)] == shorter
        else:
            assert overlapped[rid] == sync[rid]


@pytest.mark.parametrize("value", ["maybe", 2])
def test_async_scheduling_must_be_a_bool(llama_model_dir, value):
    with pytest.raises(ValueError, match=f"async_scheduling: {value!r} is not a valid bool"):
        LLM(model=llama_model_dir, async_scheduling=value, **TIGHT)

