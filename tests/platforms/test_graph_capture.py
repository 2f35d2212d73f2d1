"""Graph capture in the model runner, through the public API, on a platform that records.

The plugin template's acme platform records decode steps as ATen operator
graphs (``make_fx``): shapes and host decisions are frozen at capture and
replay runs over the runner's static buffers, so these tests fail if the
runner stops replaying, pads wrongly, lets padding write the KV cache or
reads stale buffers.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, distribution

import pytest

try:
    distribution("backplane-acme")
    HAVE_ACME = True
except PackageNotFoundError:
    HAVE_ACME = False

pytestmark = pytest.mark.skipif(
    not HAVE_ACME, reason="backplane-acme is not installed: pip install -e examples/plugin_template")

MAX_NUM_SEQS = 8


def _llm(model_dir, **kwargs):
    from backplane import LLM

    common = dict(device="acme", max_model_len=128, dtype="float32",
                  max_num_seqs=MAX_NUM_SEQS)
    return LLM(model=model_dir, **{**common, **kwargs})


def _runner(llm):
    return llm.llm_engine.engine_core.model_runner


def _shrinking_batch(llm):
    """MAX_NUM_SEQS requests with 2..9 new tokens: decode batches of 8, 7, ..., 1."""
    from backplane import SamplingParams

    prompts = [f"prompt number {i} says" for i in range(MAX_NUM_SEQS)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + i, ignore_eos=True)
              for i in range(MAX_NUM_SEQS)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_every_decode_batch_size_replays_the_next_captured_size(acme, llama_model_dir):
    llm = _llm(llama_model_dir, optimization_level=2)
    runner = _runner(llm)
    graphs = runner.decode_graphs
    assert graphs is not None
    assert llm.llm_engine.config.compilation_config.graph_capture_sizes == [1, 2, 4, 8]
    assert graphs.graph_runner.captured_sizes() == [1, 2, 4, 8]

    outputs = _shrinking_batch(llm)
    assert [len(t) for t in outputs] == [2 + i for i in range(MAX_NUM_SEQS)]
    expected = {n: next(s for s in (1, 2, 4, 8) if s >= n) for n in range(1, MAX_NUM_SEQS + 1)}
    assert {n: size for n, size in graphs.replays} == expected
    # The platform's runner really replayed, as often as the model runner says.
    counts = graphs.graph_runner.replay_counts
    assert sum(counts.values()) == sum(graphs.replays.values()) > 0
    assert all(counts[size] > 0 for _, size in graphs.replays)


def test_explicit_capture_sizes_and_larger_batches_run_eagerly(acme, llama_model_dir):
    llm = _llm(llama_model_dir, optimization_level=2,
               compilation_config={"graph_capture_sizes": [2, 5]})
    graphs = _runner(llm).decode_graphs
    assert graphs.graph_runner.captured_sizes() == [2, 5]
    eager = _shrinking_batch(_llm(llama_model_dir, optimization_level=0))
    assert _shrinking_batch(llm) == eager
    # 8, 7 and 6 running requests do not fit any graph; 1..5 pad to 2 or 5.
    assert {n: size for n, size in graphs.replays} == {1: 2, 2: 2, 3: 5, 4: 5, 5: 5}


def test_graphs_equal_eager_with_prefix_caching_chunked_prefill_and_preemption(
        acme, llama_model_dir):
    from backplane import SamplingParams

    shared = "the same long shared system prompt that many requests start with " * 2
    prompts = [shared + f"and then question {i} asks" for i in range(6)]
    prompts += ["short one", "another short prompt here"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # Few blocks force preemption; a small token budget splits prefills into chunks.
    settings = dict(num_kv_blocks=24, block_size=8, max_num_batched_tokens=32,
                    enable_prefix_caching=True, enable_chunked_prefill=True)
    results, stats = {}, {}
    for level in (0, 2):
        llm = _llm(llama_model_dir, optimization_level=level, **settings)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[level] = [o.outputs[0].token_ids for o in outs]
        stats[level] = llm.llm_engine.get_stats()
        graphs = _runner(llm).decode_graphs
        if level == 0:
            assert graphs is None
        else:
            assert sum(graphs.replays.values()) > 0
        # Every KV block is back in the pool once the requests are done.
        assert stats[level].num_free_blocks == stats[level].num_total_blocks
    assert results[2] == results[0]
    assert all(len(t) == 24 for t in results[2])
    assert stats[2].num_preemptions > 0, "the workload must preempt to test it"
    assert stats[2].prefix_cache_hits > 0, "the workload must hit the prefix cache"


def test_enforce_eager_and_o1_capture_nothing(acme, llama_model_dir):
    assert _runner(_llm(llama_model_dir, enforce_eager=True)).decode_graphs is None
    assert _runner(_llm(llama_model_dir, optimization_level=1)).decode_graphs is None


def test_backend_that_cannot_be_recorded_says_why_and_runs_without_graphs(
        acme, llama_model_dir, caplog):
    from backplane_acme.attention import AcmeAttentionBackend

    acme.setattr(AcmeAttentionBackend, "supports_graph_capture", False)
    with caplog.at_level(logging.WARNING, logger="backplane.core.model_runner.runner"):
        llm = _llm(llama_model_dir, optimization_level=2)
    assert _runner(llm).decode_graphs is None
    assert ("decode graphs (optimization level O2) are off: attention backend 'acme_paged' "
            "does not declare supports_graph_capture") in caplog.text
    assert all(len(t) == 2 + i for i, t in enumerate(_shrinking_batch(llm)))


def test_capture_sizes_above_max_num_seqs_are_not_recorded(acme, llama_model_dir):
    llm = _llm(llama_model_dir, optimization_level=2, max_num_seqs=4,
               compilation_config={"graph_capture_sizes": [1, 3, 16]})
    assert _runner(llm).decode_graphs.graph_runner.captured_sizes() == [1, 3]


def test_graphs_async_scheduling_engine_process_and_grammars_together(acme, llama_model_dir):
    """The three ways of hiding the host at once, with a constrained request in the batch,
    give the plain in-process eager loop's tokens."""
    from backplane import SamplingParams

    prompts = [f"prompt number {i} says" for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True)
              for i in range(5)]
    params.append(SamplingParams(temperature=0.0, max_tokens=12,
                                 structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"}))
    results = {}
    for name, kwargs in {
        "eager": dict(optimization_level=0),
        "all": dict(optimization_level=2, async_scheduling=True, engine_process=True),
    }.items():
        llm = _llm(llama_model_dir, num_kv_blocks=64, **kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[name] = [o.outputs[0].token_ids for o in outs]
        stats = llm.llm_engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        if name == "all":
            assert llm.llm_engine.engine_pid is not None  # really in a child process
            import re

            assert re.fullmatch("[0-9]{3}-[a-z]{2}", outs[-1].outputs[0].text)
        llm.llm_engine.shutdown()
    assert results["all"] == results["eager"]
