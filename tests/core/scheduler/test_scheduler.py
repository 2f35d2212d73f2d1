"""The token-budget scheduler on its own: budgets, chunking, policies, preemption."""

from __future__ import annotations

from backplane.config import CacheConfig, SchedulerConfig
from backplane.core.scheduler.request import Request, RequestStatus
from backplane.core.scheduler.scheduler import Scheduler
from backplane.sampling_params import SamplingParams


def _scheduler(blocks=64, budget=32, seqs=8, policy="fcfs", chunked=True, block_size=4):
    return Scheduler(
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget,
                        enable_chunked_prefill=chunked, scheduling_policy=policy),
        CacheConfig(block_size=block_size, enable_prefix_caching=True),
        num_kv_blocks=blocks, max_model_len=128,
    )


def _req(rid, n_prompt, priority=0, arrival=0.0, max_tokens=4):
    # Distinct tokens per request, so prefix caching does not blur the budgets.
    base = 1 + 100 * (sum(map(ord, rid)) % 50)
    return Request(rid, list(range(base, base + n_prompt)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), 128,
                   priority=priority, arrival_time=arrival)


def _run_step(s: Scheduler, token=7):
    out = s.schedule()
    sampled = {
        rid: token for rid in out.num_scheduled_tokens
        if s.requests[rid].num_computed_tokens == s.requests[rid].num_tokens
    }
    s.update_from_output(out, sampled)
    return out


def test_budget_and_chunked_prefill():
    s = _scheduler(budget=10)
    s.add_request(_req("a", 25))
    s.add_request(_req("b", 3, arrival=1.0))
    plans = [dict(_run_step(s).num_scheduled_tokens) for _ in range(3)]
    assert plans[0] == {"a": 10}
    assert plans[1] == {"a": 10}
    assert plans[2] == {"a": 5, "b": 3}
    assert s.requests["a"].num_output_tokens == 1 and s.requests["b"].num_output_tokens == 1
    assert dict(_run_step(s).num_scheduled_tokens) == {"a": 1, "b": 1}  # decode: 1 token each


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = _scheduler(budget=10, chunked=False)
    s.add_request(_req("a", 6))
    s.add_request(_req("b", 6, arrival=1.0))
    assert dict(_run_step(s).num_scheduled_tokens) == {"a": 6}


def test_max_num_seqs_caps_running():
    s = _scheduler(seqs=2)
    for i in range(4):
        s.add_request(_req(f"r{i}", 2, arrival=float(i)))
    assert set(_run_step(s).num_scheduled_tokens) == {"r0", "r1"}
    assert s.num_waiting == 2


def test_priority_policy_orders_waiting_and_preempts_lowest():
    s = _scheduler(policy="priority", seqs=1)
    s.add_request(_req("low", 2, priority=9, arrival=0.0))
    s.add_request(_req("high", 2, priority=1, arrival=1.0))
    s.add_request(_req("high-later", 2, priority=1, arrival=2.0))
    assert list(_run_step(s).num_scheduled_tokens) == ["high"]


def test_preemption_by_recompute_when_blocks_run_out():
    # 4 blocks of 4 tokens; two requests of 7 prompt tokens each need 2 blocks, then grow.
    s = _scheduler(blocks=4, budget=64)
    s.add_request(_req("old", 7, arrival=0.0, max_tokens=8))
    s.add_request(_req("new", 7, arrival=1.0, max_tokens=8))
    _run_step(s)  # prefill 7 each (2 blocks each), sample the 8th token
    _run_step(s)  # compute the 8th token: still 2 blocks each
    assert s.num_running == 2
    out = _run_step(s)  # the 9th token needs a 3rd block each: 'new' is preempted
    assert out.preempted_request_ids == {"new"}
    assert s.requests["new"].status == RequestStatus.PREEMPTED
    assert s.requests["new"].num_computed_tokens == 0
    steps = 0
    while s.has_unfinished_requests():
        _run_step(s)
        steps += 1
        assert steps < 100, "scheduler stalled"
    assert s.kv.num_free_blocks == 4 and s.num_preemptions >= 1


def test_finish_requests_frees_and_reports_removal():
    s = _scheduler()
    s.add_request(_req("a", 5))
    s.add_request(_req("b", 5))
    _run_step(s)
    s.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 64
    assert s.schedule().removed_request_ids == {"a", "b"}
