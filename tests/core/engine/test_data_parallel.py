"""--data-parallel-size: K engine cores in their own processes behind one LLM.

The offline API must give the same greedy outputs as one core, spread the
requests over both cores by load, return every KV block, and turn a dead core
into EngineDeadError naming its rank. Refusals name the field, value and reason.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from backplane import LLM
from backplane.config import EngineArgs
from backplane.config.resolve import problems
from backplane.core.engine.async_engine import EngineDeadError
from backplane.core.engine.dp_client import DPClient, dp_hints
from backplane.platforms.cpu.runtime import CpuRuntime
from backplane.sampling_params import SamplingParams
from tests.config.helpers import GraphPlatform, cpu_platform
from tests.core.engine.conftest import PROMPTS

_ARGS = dict(max_model_len=256, num_kv_blocks=64, max_num_seqs=8, seed=0)


@pytest.fixture(scope="module")
def dp_llm(llama_model_dir):
    llm = LLM(model=llama_model_dir, data_parallel_size=2, **_ARGS)
    yield llm
    procs = [core._proc for core in llm.llm_engine.core.cores]
    llm.llm_engine.shutdown()
    assert all(not p.is_alive() and p.exitcode == 0 for p in procs)
    llm.llm_engine.shutdown()  # idempotent


@pytest.fixture(scope="module")
def one_core(llama_model_dir):
    return LLM(model=llama_model_dir, **_ARGS)


def _tokens(outputs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outputs]


def test_config_and_processes(dp_llm):
    engine = dp_llm.llm_engine
    pc = engine.config.parallel_config
    assert pc.data_parallel_size == 2 and pc.engine_process is True
    assert isinstance(engine.core, DPClient) and engine.engine_core is None
    pids = engine.core.engine_pids
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert engine.engine_pid == pids[0]
    # Each child runs on its own block of the cores this process may use.
    mine = os.sched_getaffinity(0)
    shares = [os.sched_getaffinity(pid) for pid in pids]
    assert all(s <= mine and s for s in shares)
    if len(mine) >= 2:
        assert not shares[0] & shares[1]


def test_greedy_outputs_equal_one_core_and_both_cores_work(dp_llm, one_core):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    before = dp_llm.llm_engine.get_stats().dp_ranks
    got = dp_llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(got) == _tokens(one_core.generate(prompts, params, use_tqdm=False))
    # n=2 (both sequences on one core) and stop strings too.
    n2 = SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True)
    assert _tokens(dp_llm.generate(PROMPTS, n2, use_tqdm=False)) == _tokens(
        one_core.generate(PROMPTS, n2, use_tqdm=False))
    stats = dp_llm.llm_engine.get_stats()
    assert len(stats.dp_ranks) == 2
    for rank, (old, new) in enumerate(zip(before, stats.dp_ranks, strict=True)):
        assert new["num_generated_tokens"] > old["num_generated_tokens"], rank
        assert new["num_free_blocks"] == new["num_total_blocks"] == 64
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_total_blocks == stats.num_free_blocks == 128
    assert stats.num_generated_tokens == sum(r["num_generated_tokens"] for r in stats.dp_ranks)


def test_requests_go_to_the_least_loaded_core_and_aborts_free_blocks(dp_llm):
    engine = dp_llm.llm_engine
    client = engine.core
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    assert client.loads() == [0, 0]
    engine.add_request("a", "hello", params)  # tie: rank 0
    engine.add_request("b", "hello", params)
    engine.add_request("c", "hello", SamplingParams(temperature=0, max_tokens=60, n=2))
    # n=2: both sequences on one core (rank 0 and 1 held one each: rank 0 wins the tie).
    assert client.loads() == [3, 1]
    engine.add_request("d", "hello", params)
    assert client.loads() == [3, 2]
    assert {client._owner[i] for i in ("c#0", "c#1")} == {0}
    for _ in range(3):
        engine.step()
    engine.abort_request(["a", "b", "c", "d"])
    assert client.loads() == [0, 0]
    deadline = time.time() + 10
    while True:
        engine.step()  # picks up the snapshots sent after the aborts
        ranks = engine.get_stats().dp_ranks
        if all(r["num_free_blocks"] == r["num_total_blocks"] for r in ranks):
            break
        assert time.time() < deadline, ranks
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.reset_prefix_cache() is True  # asked of every core


def test_a_dead_core_makes_the_engine_dead_naming_its_rank(llama_model_dir):
    llm = LLM(model=llama_model_dir, data_parallel_size=2, **_ARGS)
    engine = llm.llm_engine
    try:
        os.kill(engine.core.engine_pids[1], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="data-parallel rank 1"):
            llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=60,
                                                 ignore_eos=True), use_tqdm=False)
        with pytest.raises(EngineDeadError, match="rank 1.*SIGKILL"):
            engine.check_engine_alive()
    finally:
        procs = [core._proc for core in engine.core.cores]
        engine.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_hints_give_each_rank_its_devices_or_cores(monkeypatch):
    def config(dp, tp):
        return SimpleNamespace(parallel_config=SimpleNamespace(
            data_parallel_size=dp, tensor_parallel_size=tp, pipeline_parallel_size=1))

    gpu = SimpleNamespace(name="cuda", device_control_env_var="CUDA_VISIBLE_DEVICES",
                          runtime=SimpleNamespace(device_type="cuda", device_count=lambda: 4))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hints = dp_hints(config(2, 2), gpu)
    assert [h["env"] for h in hints] == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                         {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert [h["memory_share"] for h in hints] == [1, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [h["env"]["CUDA_VISIBLE_DEVICES"] for h in dp_hints(config(4, 1), gpu)] == [
        "4", "5", "6", "7"]
    cpu = dp_hints(config(2, 1), cpu_platform())
    assert [(h["rank"], h["size"], h["env"], h["cpu_share"], h["memory_share"])
            for h in cpu] == [(0, 2, {}, True, 2), (1, 2, {}, True, 2)]


class _TwoDevices(CpuRuntime):
    device_type = "fakegpu"

    def device_count(self) -> int:
        return 2


def test_refusals_name_the_field_value_and_reason(llama_model_dir, tiny_model_factory):
    cpu = cpu_platform()

    def found(**kwargs):
        return problems(EngineArgs(model=kwargs.pop("model", llama_model_dir), **kwargs), cpu)

    assert any("data_parallel_size (0) must be an integer >= 1" in p
               for p in found(data_parallel_size=0))
    assert any("data_parallel_size (2)" in p and "'external_launcher'" in p
               for p in found(data_parallel_size=2,
                              distributed_executor_backend="external_launcher"))
    assert any("data_parallel_size (2)" in p and "engine_process is False" in p
               for p in found(data_parallel_size=2, engine_process=False))
    pooling = found(model=tiny_model_factory("qwen3"), runner="pooling", data_parallel_size=2)
    assert any("data_parallel_size (2) is not supported with the pooling runner" in p
               for p in pooling), pooling
    assert found(data_parallel_size=2) == []
    # A platform with devices needs one per rank of every core.
    gpu = GraphPlatform()
    gpu.runtime = _TwoDevices()
    over = problems(EngineArgs(model=llama_model_dir, data_parallel_size=3), gpu)
    assert any("data_parallel_size (3)" in p and "exceeds the 2 device(s)" in p
               for p in over), over


def test_each_rank_may_itself_be_tensor_parallel(llama_model_dir, one_core):
    """DP 2 x TP 2: every core's executor spawns its own worker, inside the core's share."""
    llm = LLM(model=llama_model_dir, data_parallel_size=2, tensor_parallel_size=2, **_ARGS)
    engine = llm.llm_engine
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]
        assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(
            one_core.generate(prompts, params, use_tqdm=False))
        assert all(r["num_generated_tokens"] for r in engine.get_stats().dp_ranks)
        for pid in engine.core.engine_pids:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                workers = [int(w) for w in f.read().split()]
            assert workers, f"no tensor-parallel worker under engine core {pid}"
            assert all(os.sched_getaffinity(w) <= os.sched_getaffinity(pid) for w in workers)
    finally:
        engine.shutdown()
