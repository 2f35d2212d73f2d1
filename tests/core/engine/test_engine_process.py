"""--engine-process: the engine core in a child process gives the in-process engine's results.

The child is spawned, fed over ZMQ and killed here; the front-end must see
the same tokens, logprobs, stop strings and stats, and a dead child must turn
into EngineDeadError at once instead of a hang.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from backplane import LLM
from backplane.config import EngineArgs
from backplane.config.resolve import problems
from backplane.core.engine import serial
from backplane.core.engine.async_engine import EngineDeadError
from backplane.core.engine.engine_core import EngineCoreOutput
from backplane.core.model_runner.runner import TokenLogprobs
from backplane.core.scheduler.request import Request, RequestStatus
from backplane.plugins_sdk import ConfigPolicy
from backplane.sampling_params import SamplingParams
from tests.config.helpers import GraphPlatform, cpu_platform, engine_config
from tests.core.engine.conftest import PROMPTS

_ARGS = dict(max_model_len=256, num_kv_blocks=128, max_num_seqs=8)


@pytest.fixture(scope="module")
def pair(llama_model_dir):
    """(in-process LLM, engine-process LLM) over the same tiny Llama."""
    inproc = LLM(model=llama_model_dir, engine_process=False, **_ARGS)
    mp = LLM(model=llama_model_dir, engine_process=True, **_ARGS)
    yield inproc, mp
    # Shutdown: the child leaves on the shutdown message, with status 0; a second
    # call does nothing.
    proc = mp.llm_engine.core._proc
    mp.llm_engine.shutdown()
    assert not proc.is_alive() and proc.exitcode == 0
    mp.llm_engine.shutdown()


def _same(a, b) -> None:
    assert [o.prompt_token_ids for o in a] == [o.prompt_token_ids for o in b]
    for x, y in zip(a, b, strict=True):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        assert [c.text for c in x.outputs] == [c.text for c in y.outputs]
        assert [c.finish_reason for c in x.outputs] == [c.finish_reason for c in y.outputs]
        assert [c.stop_reason for c in x.outputs] == [c.stop_reason for c in y.outputs]


def test_child_runs_the_core_and_the_config_says_so(pair):
    inproc, mp = pair
    assert inproc.llm_engine.config.parallel_config.engine_process is False
    assert inproc.llm_engine.engine_pid is None
    engine = mp.llm_engine
    assert engine.config.parallel_config.engine_process is True
    assert engine.engine_core is None  # nothing of the model in the front-end
    assert engine.engine_pid not in (None, os.getpid())
    assert os.path.exists(f"/proc/{engine.engine_pid}")


def test_greedy_outputs_match_token_for_token(pair):
    inproc, mp = pair
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    _same(inproc.generate(PROMPTS, params, use_tqdm=False),
          mp.generate(PROMPTS, params, use_tqdm=False))


def test_n_seeded_sampling_stop_strings_and_logprobs_match(pair):
    inproc, mp = pair
    # Stop on a piece of what greedy decoding produces, so that the stop string fires.
    greedy = inproc.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16),
                             use_tqdm=False)[0].outputs[0].text
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    assert stop.strip()
    cases = [
        SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=8, logprobs=3, prompt_logprobs=2),
    ]
    for params in cases:
        a = inproc.generate(PROMPTS, params, use_tqdm=False)
        b = mp.generate(PROMPTS, params, use_tqdm=False)
        _same(a, b)
    assert b[0].outputs[0].finish_reason == "length"  # the logprobs case
    stopped = mp.generate(PROMPTS[0], cases[1], use_tqdm=False)[0].outputs[0]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    for x, y in zip(a, b, strict=True):
        assert y.prompt_logprobs == x.prompt_logprobs
        assert y.outputs[0].logprobs == x.outputs[0].logprobs


def test_stats_timing_and_prefix_cache_reset_come_from_the_child(pair):
    _, mp = pair
    engine = mp.llm_engine
    mp.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_total_blocks == 128 and stats.num_free_blocks == 128
    assert stats.prefix_cache_queries > 0
    assert engine.last_step_timing.num_reqs >= 1
    assert engine.last_step_timing.total_seconds > 0
    # The same prompt again hits the cached prefix blocks; after a reset it cannot.
    mp.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert engine.get_stats().prefix_cache_hits > stats.prefix_cache_hits
    assert engine.reset_prefix_cache() is True
    hits = engine.get_stats().prefix_cache_hits
    mp.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert engine.get_stats().prefix_cache_hits == hits


def test_abort_frees_every_block_in_the_child(pair):
    _, mp = pair
    engine = mp.llm_engine
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(n=2, max_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    finals = engine.abort_request(["a", "b"])
    assert {f.request_id for f in finals} == {"a", "b"}
    assert all(c.finish_reason == "abort" for f in finals for c in f.outputs)
    assert not engine.has_unfinished_requests()
    deadline = time.time() + 5
    while engine.get_stats().num_free_blocks != 128 and time.time() < deadline:
        engine.step()  # the stats snapshot after the abort arrives with the next message
    stats = engine.get_stats()
    assert (stats.num_free_blocks, stats.num_running, stats.num_waiting) == (128, 0, 0)


def test_killed_engine_process_fails_requests_at_once(llama_model_dir):
    llm = LLM(model=llama_model_dir, engine_process=True, **_ARGS)
    engine = llm.llm_engine
    pid = engine.engine_pid
    try:
        engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=f"pid {pid}.*SIGKILL"):
            while True:
                engine.step()
        assert time.monotonic() - start < 5
        with pytest.raises(EngineDeadError):
            engine.check_engine_alive()
    finally:
        engine.shutdown()


def test_a_crash_in_the_engine_process_is_reported_with_its_reason(llama_model_dir):
    engine = LLM(model=llama_model_dir, engine_process=True, **_ARGS).llm_engine
    try:
        engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.core._send(["bogus"])  # a message the child cannot handle: it exits
        with pytest.raises(EngineDeadError, match="failed: ValueError: unknown message kind"):
            for _ in range(1000):
                engine.step()
        assert engine.core._proc.exitcode in (None, 1)
    finally:
        engine.shutdown()
    assert engine.core._proc.exitcode == 1


def test_pooling_runner_refuses_an_engine_process_and_drops_a_platform_default():
    config = engine_config(runner="pooling", engine_process=True)
    found = config.check(cpu_platform())
    assert any("engine_process (True) is not supported with the pooling runner" in p
               for p in found), found

    class PreferProcess(ConfigPolicy):
        default_engine_process = True

    config = engine_config(runner="pooling")
    config.check(GraphPlatform(PreferProcess()))
    assert config.parallel_config.engine_process is False
    assert any("pooling models run in-process" in n for n in config.notes)


def test_platform_default_applies_when_unset_and_explicit_wins(llama_model_dir):
    from backplane.platforms.cpu.policy import CpuConfigPolicy
    from backplane.platforms.cuda.policy import CudaConfigPolicy

    assert CudaConfigPolicy.default_engine_process is True  # rocm shares this policy
    assert ConfigPolicy.default_engine_process is None

    class PreferProcess(ConfigPolicy):
        default_engine_process = True

    config = engine_config()
    assert not config.check(GraphPlatform(PreferProcess()))
    assert config.parallel_config.engine_process is True
    assert any("engine_process defaults to on (platform fakegpu's default)" in n
               for n in config.notes)
    config = engine_config(engine_process=False)
    config.check(GraphPlatform(PreferProcess()))
    assert config.parallel_config.engine_process is False
    cpu = engine_config()
    cpu.check(cpu_platform())
    assert cpu.parallel_config.engine_process is bool(CpuConfigPolicy.default_engine_process)
    assert not problems(EngineArgs(model=llama_model_dir, engine_process=True), cpu_platform())


def test_messages_round_trip_exactly():
    # A nested params record travels as its fields (structured outputs, where present).
    nested = ({"structured_outputs": {"choice": ["yes", "no"]}}
              if "structured_outputs" in SamplingParams.__dataclass_fields__ else {})
    params = SamplingParams(
        n=1, temperature=0.5, top_k=3, seed=-5, stop=["x"], stop_token_ids=[4],
        logit_bias={7: 1.5}, allowed_token_ids=[1, 2, 7], bad_words=["no"], logprobs=2,
        **nested,
    )
    params.eos_token_ids = frozenset({2, 3})
    params.all_stop_token_ids = {4}
    params.bad_words_token_ids = [[9], [10, 11]]
    request = Request("r#1", [1, 2, 3], params, 64, eos_token_ids=frozenset({2}), priority=-3,
                      arrival_time=12.5, cache_salt="salt")
    back = serial.decode_request(serial.unpack(serial.pack(
        [serial.ADD, [serial.encode_request(request, 64)]]))[1][0])
    for name in ("request_id", "prompt_token_ids", "eos_token_ids", "priority",
                 "arrival_time", "cache_salt", "max_total_tokens"):
        assert getattr(back, name) == getattr(request, name), name
    assert back.params == params
    assert (back.params.eos_token_ids, back.params.all_stop_token_ids,
            back.params.bad_words_token_ids) == ({2, 3}, {4}, [[9], [10, 11]])

    lp = TokenLogprobs(np.array([[5, 6, 7]], dtype=np.int64),
                       np.array([[-0.5, -0.25, -3.0]], dtype=np.float32),
                       np.array([2], dtype=np.int64))
    out = EngineCoreOutput("r#1", [5], logprobs=lp, prompt_logprobs=lp,
                           finish_status=RequestStatus.FINISHED_STOPPED, stop_reason="x",
                           num_cached_tokens=16)
    back = serial.decode_output(serial.unpack(serial.pack(serial.encode_output(out))))
    assert (back.request_id, back.new_token_ids, back.finish_status, back.stop_reason,
            back.num_cached_tokens) == ("r#1", [5], RequestStatus.FINISHED_STOPPED, "x", 16)
    for got in (back.logprobs, back.prompt_logprobs):
        for name in ("ids", "logprobs", "ranks"):
            a, b = getattr(got, name), getattr(lp, name)
            assert a.dtype == b.dtype and np.array_equal(a, b)
            a.flags.writeable = True  # consumers may write: not a view of the message
