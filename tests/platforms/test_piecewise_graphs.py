"""Piecewise graphs (O3) in the model runner, through the public API, on a platform that
records (the plugin template's acme platform records operator graphs with make_fx).

The forward is recorded in pieces between the attention calls; prefill chunks and
mixed batches replay them, attention running eagerly in between. These tests fail
if the runner stops replaying the pieces, pads wrongly (padding reaching the KV
cache or a real token) or reads stale buffers.
"""

from __future__ import annotations

import logging

import pytest

from tests.platforms.test_graph_capture import HAVE_ACME, _llm, _runner

pytestmark = pytest.mark.skipif(
    not HAVE_ACME, reason="backplane-acme is not installed: pip install -e examples/plugin_template")

SIZES = [4, 8, 16, 32]


def _workload():
    from backplane import SamplingParams

    shared = "the same long shared system prompt that many requests start with " * 2
    prompts = [shared + f"and then question {i} asks" for i in range(6)]
    prompts += ["short one", "another short prompt here"]
    return prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


# Few blocks force preemption; a budget of 32 tokens splits prefills into chunks
# and mixes them with decodes.
SETTINGS = dict(num_kv_blocks=24, block_size=8, max_num_batched_tokens=32,
                enable_prefix_caching=True, enable_chunked_prefill=True)


def _run(llm):
    prompts, params = _workload()
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outs], stats


def test_o3_replays_pieces_for_mixed_batches_and_equals_eager(acme, llama_model_dir):
    eager, _ = _run(_llm(llama_model_dir, optimization_level=0, **SETTINGS))
    llm = _llm(llama_model_dir, optimization_level=3, **SETTINGS,
               compilation_config={"piecewise_capture_sizes": SIZES})
    runner = _runner(llm)
    pieces = runner.piecewise
    assert pieces is not None and runner.decode_graphs is not None
    assert llm.llm_engine.config.compilation_config.piecewise_capture_sizes == SIZES
    # Two layers: three recorded pieces around two attention calls, each at every size.
    assert pieces.num_pieces == 3
    assert all(r.captured_sizes() == SIZES for r in pieces._runners)
    got, stats = _run(llm)
    assert got == eager
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    # Steps with prefill chunks replayed the pieces, padded to the next size.
    assert any(n > 8 for n, _ in pieces.replays), pieces.replays
    assert all(size == next(s for s in SIZES if s >= n) for n, size in pieces.replays)
    # The platform's runners really replayed, once per piece per step (and once per
    # size at capture, which feeds the next piece's recording).
    for r in pieces._runners:
        assert sum(r.replay_counts.values()) == sum(pieces.replays.values()) + len(SIZES)
    # Uniform decode batches still replay the whole-step decode graphs.
    assert sum(runner.decode_graphs.replays.values()) > 0


def test_pieces_need_nothing_of_the_attention_backend(acme, llama_model_dir, caplog):
    """A backend that cannot be recorded whole still gets piecewise graphs, for every
    step, decode included."""
    from backplane_acme.attention import AcmeAttentionBackend

    acme.setattr(AcmeAttentionBackend, "supports_graph_capture", False)
    eager, _ = _run(_llm(llama_model_dir, optimization_level=0, **SETTINGS))
    with caplog.at_level(logging.INFO):
        llm = _llm(llama_model_dir, optimization_level=3, **SETTINGS,
                   compilation_config={"piecewise_capture_sizes": SIZES})
    runner = _runner(llm)
    assert runner.decode_graphs is None and runner.piecewise is not None
    assert "captured piecewise graphs: 3 recorded pieces x 4 token counts" in caplog.text
    got, _ = _run(llm)
    assert got == eager
    assert {n for n, _ in runner.piecewise.replays} >= {1, 32}


def test_steps_above_the_largest_size_run_eagerly(acme, llama_model_dir):
    llm = _llm(llama_model_dir, optimization_level=3, **dict(SETTINGS, num_kv_blocks=64),
               compilation_config={"piecewise_capture_sizes": [2, 4], "use_graphs": False})
    got, _ = _run(llm)
    eager, _ = _run(_llm(llama_model_dir, optimization_level=0,
                         **dict(SETTINGS, num_kv_blocks=64)))
    assert got == eager
    assert {size for _, size in _runner(llm).piecewise.replays} <= {2, 4}


def test_o3_defaults_and_refusals(acme, llama_model_dir, caplog):
    from backplane.config.levels import default_piecewise_capture_sizes

    assert default_piecewise_capture_sizes(2048)[:8] == [1, 2, 4, 8, 12, 16, 24, 32]
    assert default_piecewise_capture_sizes(2048)[-1] == 512
    assert default_piecewise_capture_sizes(100)[-1] == 100
    # Memory held back from the KV cache: each piece's pool holds the activations of
    # the largest size (8 hidden-sized and 4 intermediate-sized values a token) and
    # the outputs of every size (4 hidden-sized values a token).
    import torch

    from backplane.core.model_runner.graph_capture import estimate_graph_memory

    one_pool = estimate_graph_memory([8, 16], 64, 128, torch.float32)
    assert estimate_graph_memory([8, 16], 64, 128, torch.float32, pools=3) - one_pool == (
        2 * 16 * (8 * 64 + 4 * 128) * 4 + 3 * (8 + 16) * 4 * 64 * 4)
    llm = _llm(llama_model_dir, optimization_level=2)
    assert _runner(llm).piecewise is None  # O2: decode graphs only
    with caplog.at_level(logging.WARNING):
        llm = _llm(llama_model_dir, optimization_level=3, max_num_batched_tokens=16,
                   compilation_config={"piecewise_capture_sizes": [64]})
    assert _runner(llm).piecewise is None
    assert "no piecewise capture size is <= max_num_batched_tokens (16)" in caplog.text


def test_o3_is_refused_where_nothing_records(llama_model_dir):
    from backplane import LLM

    with pytest.raises(ValueError, match="piecewise graphs"):
        LLM(model=llama_model_dir, device="cpu", dtype="float32", max_model_len=64,
            compilation_config={"piecewise_graphs": True})


def test_piecewise_sizes_without_piecewise_graphs_are_refused(acme, llama_model_dir):
    from backplane import LLM

    with pytest.raises(ValueError, match=r"piecewise_capture_sizes \(\[8\]\) has no effect"):
        LLM(model=llama_model_dir, device="acme", dtype="float32", max_model_len=64,
            optimization_level=2, compilation_config={"piecewise_capture_sizes": [8]})
