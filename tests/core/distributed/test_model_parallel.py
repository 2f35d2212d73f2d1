"""Tensor and pipeline parallelism on the cpu platform (gloo): a split model gives TP=1's output.

Each case starts the ``mp`` executor (rank 0 in this process, the other ranks
spawned), generates greedily in float32 with logprobs and prompt logprobs, and
compares with the unsplit engine: identical tokens, logprobs within float32
rounding of the different summation order. The fixtures cover the shapes
that need care: grouped-query attention, q/k/v biases (Qwen2), tied
embeddings, a vocabulary tensor parallelism does not divide, fewer KV heads
than ranks (replicated KV heads) and a layer count the stages split unevenly.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.core.distributed.parallel_state import get_world_group
from backplane.core.distributed.pipeline import head_cost_in_layers, stage_layers
from backplane.core.engine.async_engine import EngineDeadError
from tests.entrypoints.test_engine_process_server import _descendants
from tests.fixtures.tiny_models import make_tiny_model

PROMPTS = [[1, 5, 9, 13, 200, 17], [1, 44, 45, 46], [1, 99] * 10, [1, 7, 300, 301, 302, 7]]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, prompt_logprobs=1)
ARGS = dict(dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64,
            max_num_seqs=8)
# float32 sums in another order (per-rank partial sums, then the all-reduce).
LOGPROB_TOL = 1e-4

MODELS = {
    "llama_gqa": ("llama", {}),
    "qwen2_bias_tied": ("qwen2", {}),
    "llama_tied_odd_vocab": ("llama", {"tie_word_embeddings": True, "vocab_size": 509}),
    "one_kv_head": ("llama", {"num_key_value_heads": 1}),
    "uneven_layers": ("qwen2", {"num_hidden_layers": 3, "vocab_size": 511}),
}
CASES = [
    ("llama_gqa", 2, 1), ("llama_gqa", 1, 2), ("llama_gqa", 2, 2),
    ("qwen2_bias_tied", 2, 1), ("llama_tied_odd_vocab", 2, 1),
    ("one_kv_head", 2, 1), ("uneven_layers", 2, 2),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_models")
    dirs = {}
    for name, (arch, overrides) in MODELS.items():
        dirs[name] = make_tiny_model(root / name, arch, **overrides)
    return dirs


@pytest.fixture(scope="module")
def references(model_dirs):
    """Unsplit outputs of every fixture model."""
    out = {}
    for name, path in model_dirs.items():
        llm = LLM(path, **ARGS)
        out[name] = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        llm.llm_engine.shutdown()
    return out


def assert_same_outputs(expected, got) -> None:
    for a, b in zip(expected, got, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids
        for pa, pb, token in zip(x.logprobs, y.logprobs, x.token_ids, strict=True):
            assert abs(pa[token].logprob - pb[token].logprob) < LOGPROB_TOL
            assert set(pa) == set(pb)
        for pa, pb, token in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:],
                                 a.prompt_token_ids[1:], strict=True):
            assert abs(pa[token].logprob - pb[token].logprob) < LOGPROB_TOL


@pytest.mark.parametrize(("model", "tp", "pp"), CASES,
                         ids=[f"{m}-tp{t}-pp{p}" for m, t, p in CASES])
def test_split_model_matches_unsplit(model_dirs, references, model, tp, pp):
    affinity = os.sched_getaffinity(0)
    llm = LLM(model_dirs[model], tensor_parallel_size=tp, pipeline_parallel_size=pp, **ARGS)
    try:
        executor = llm.llm_engine.engine_core.executor
        assert llm.llm_engine.config.parallel_config.distributed_executor_backend == "mp"
        assert len(executor.workers) == tp * pp - 1
        assert get_world_group().size == tp * pp
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        assert_same_outputs(references[model], got)
        # Every block is back in the pool once the requests are done.
        stats = llm.llm_engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    finally:
        workers = list(llm.llm_engine.engine_core.executor.workers)
        llm.llm_engine.shutdown()
    assert all(not w.is_alive() for w in workers)
    assert get_world_group().size == 1
    assert os.sched_getaffinity(0) == affinity  # rank 0's pinning is undone


def test_rank_reads_only_its_slices(model_dirs):
    """A rank's parameters are its slices: half the heads, half the MLP, half the vocab."""
    llm = LLM(model_dirs["llama_tied_odd_vocab"], tensor_parallel_size=2, **ARGS)
    try:
        model = llm.llm_engine.engine_core.model_runner.base_model
        layer = model.model.layers[0]
        assert layer.self_attn.qkv_proj.weight.shape == (32 + 16 + 16, 64)
        assert layer.self_attn.o_proj.weight.shape == (64, 32)
        assert layer.mlp.gate_up_proj.weight.shape == (128, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 64)
        # 509 rows over two ranks: 255 each, the last one zero padding on rank 1.
        assert model.model.embed_tokens.weight.shape == (255, 64)
    finally:
        llm.llm_engine.shutdown()


def test_stage_layers_split_evenly_with_the_remainder_last():
    assert [list(stage_layers(3, 2, s)) for s in range(2)] == [[0], [1, 2]]
    assert [list(stage_layers(24, 5, s)) for s in range(5)] == [
        list(range(0, 4)), list(range(4, 9)), list(range(9, 14)), list(range(14, 19)),
        list(range(19, 24))]
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        stage_layers(2, 3, 0)


def test_stage_zero_takes_fewer_layers_for_the_output_head():
    # qwen2-0.5b: the head reads about 9 layers' worth of weights each decode step.
    extra = head_cost_in_layers(151936, 896, 4864, 14, 2, 64)
    assert 9.0 < extra < 9.3
    assert [len(stage_layers(24, 2, s, extra)) for s in range(2)] == [7, 17]
    assert [len(stage_layers(24, 3, s, extra)) for s in range(3)] == [2, 11, 11]
    # Every layer in exactly one stage, in order; stage 0 keeps at least one.
    for layers, stages, head in ((24, 4, 9.1), (5, 2, 30.0), (7, 3, 0.5)):
        split = [list(stage_layers(layers, stages, s, head)) for s in range(stages)]
        assert sum(split, []) == list(range(layers))
        assert len(split[0]) >= 1


def test_split_model_in_an_engine_process_with_async_scheduling(model_dirs, references):
    """The engine-core child spawns the workers; the overlapped loop feeds them in order."""
    llm = LLM(model_dirs["llama_gqa"], tensor_parallel_size=2, engine_process=True,
              async_scheduling=True, **ARGS)
    try:
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        assert_same_outputs(references["llama_gqa"], got)
        # A worker dying while the engine idles ends the engine process (FATAL), and
        # the front-end says which rank and why.
        (worker,) = [p for p in _descendants(llm.llm_engine.engine_pid) if _is_worker(p)]
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(EngineDeadError, match="worker rank 1"):
            while time.monotonic() < deadline:
                llm.llm_engine.check_engine_alive()
                time.sleep(0.1)
    finally:
        llm.llm_engine.shutdown()


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        return False
    return "multiprocessing" in cmdline and "resource_tracker" not in cmdline


def test_a_rank_reads_its_slices_and_never_a_whole_sharded_tensor(model_dirs, monkeypatch):
    """Rank 1 of 2, built in this process (loading needs no collective): each sharded
    tensor is read as a slice, and the slices are the right rows and columns."""
    from safetensors.torch import load_file

    from backplane.config.configs import ModelConfig
    from backplane.core.distributed import parallel_state
    from backplane.core.loader.model_loader import load_model
    from backplane.core.loader.weights import CheckpointTensor

    group = parallel_state.GroupCoordinator(ranks=[0, 1], rank=1)
    monkeypatch.setattr(parallel_state, "_STATE", parallel_state.ParallelState(tp=group))
    whole, sliced = [], []
    read, read_slice = CheckpointTensor.read, CheckpointTensor.read_slice
    monkeypatch.setattr(CheckpointTensor, "read",
                        lambda self: whole.append(self.name) or read(self))
    monkeypatch.setattr(CheckpointTensor, "read_slice",
                        lambda self, *a: sliced.append(self.name) or read_slice(self, *a))
    path = model_dirs["qwen2_bias_tied"]
    model = load_model(ModelConfig(model=path), "cpu")
    assert whole and all(name.endswith("norm.weight") for name in whole)  # replicated
    assert any("q_proj.bias" in name for name in sliced)
    ref = load_file(f"{path}/model.safetensors")
    attn = model.model.layers[1].self_attn
    q, k = ref["model.layers.1.self_attn.q_proj.weight"], ref["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(attn.qkv_proj.shard_view("weight", "q"), q[32:64])
    assert torch.equal(attn.qkv_proj.shard_view("weight", "k"), k[16:32])
    assert torch.equal(attn.qkv_proj.shard_view("bias", "v"),
                       ref["model.layers.1.self_attn.v_proj.bias"][16:32])
    o = ref["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(attn.o_proj.weight, o[:, 32:64])
    down = ref["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, down[:, 64:128])
    embed = ref["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, embed[256:512])


def test_one_rank_engine_beside_a_live_split_engine(model_dirs, references):
    """Models read their groups when built: a one-rank engine next to a split one is
    unaffected; a second split engine in the same process is refused, saying why."""
    split = LLM(model_dirs["llama_gqa"], tensor_parallel_size=2, **ARGS)
    try:
        with pytest.raises(RuntimeError, match="already initialised in this process"):
            LLM(model_dirs["qwen2_bias_tied"], tensor_parallel_size=2, **ARGS)
        single = LLM(model_dirs["qwen2_bias_tied"], **ARGS)
        got = single.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        assert_same_outputs(references["qwen2_bias_tied"], got)
        single.llm_engine.shutdown()
        again = split.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        assert_same_outputs(references["llama_gqa"], again)
    finally:
        split.llm_engine.shutdown()


def test_pipeline_keeps_batches_in_flight_through_preemption_and_aborts(model_dirs,
                                                                       monkeypatch):
    """PP=2 runs two batches of different requests at once. With a KV pool small
    enough to preempt and a request aborted while its batch is in flight, the other
    requests still match the unsplit engine token for token and no block leaks."""
    from backplane.core.model_runner.runner import ModelRunner

    refound = []
    find_rows = ModelRunner._rows_after_removals

    def counting(self, step):
        refound.append(len(step.rows))
        return find_rows(self, step)

    monkeypatch.setattr(ModelRunner, "_rows_after_removals", counting)
    prompts = [[1, 3 + i, 40 + 2 * i, 7, 90 + i, 11] for i in range(10)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    small = dict(ARGS, num_kv_blocks=14, block_size=8, max_num_seqs=10, max_model_len=48)
    reference = LLM(model_dirs["llama_gqa"], **small)
    try:
        expected = reference.generate([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        reference.llm_engine.shutdown()
    llm = LLM(model_dirs["llama_gqa"], pipeline_parallel_size=2, **small)
    engine = llm.llm_engine
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        aborted = "3"
        core = engine.engine_core
        finished: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = list(out.outputs[0].token_ids)
            planned = [rid for plan, _ in core._pipeline for rid in plan.num_scheduled_tokens]
            if aborted in planned and aborted not in finished:
                engine.abort_request([aborted])
                finished[aborted] = []
        assert core.peak_batches_in_flight == 2
        # Rows removed (the abort, preemptions) while a batch was in flight were found
        # again by request id when that batch was collected.
        assert refound
        assert core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
        for i, want in enumerate(expected):
            if str(i) != aborted:
                assert finished[str(i)] == list(want.outputs[0].token_ids), f"request {i}"
        stats = engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    finally:
        engine.shutdown()


def test_async_scheduling_is_refused_with_a_pipeline(model_dirs):
    """The pipeline overlaps steps itself; an explicit --async-scheduling says so."""
    with pytest.raises(ValueError, match=r"async_scheduling \(True\) cannot be combined with "
                                         r"pipeline_parallel_size \(2\)"):
        LLM(model_dirs["llama_gqa"], pipeline_parallel_size=2, async_scheduling=True, **ARGS)
