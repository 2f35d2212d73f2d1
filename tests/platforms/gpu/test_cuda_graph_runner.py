"""The model runner's decode graphs on a real NVIDIA GPU (CUDA graphs over triton_paged).

Run on a GPU machine with ``python -m pytest -q tests/platforms/gpu -m gpu``.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points

import pytest
import torch

from tests.platforms.gpu.test_cuda_device import assert_same_greedy_up_to_ties

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
]


@pytest.fixture(autouse=True)
def _installed():
    if "cuda" not in {ep.name for ep in entry_points(group="backplane.platforms")}:
        pytest.skip("backplane is not pip-installed here: no 'cuda' platform entry point")


def _run(model_dir, **kwargs):
    from backplane import LLM, SamplingParams

    shared = "the same long shared system prompt that many requests start with " * 2
    prompts = [shared + f"and then question {i} asks" for i in range(6)]
    prompts += [f"short prompt {i}" for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    llm = LLM(model=model_dir, device="cuda", dtype="float32", max_model_len=256,
              max_num_seqs=16, num_kv_blocks=24, block_size=16, max_num_batched_tokens=64,
              enable_prefix_caching=True, engine_process=False, **kwargs)
    return llm, [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("compile_model", [False, True], ids=["graphs", "compiled+graphs"])
def test_decode_graphs_equal_eager_on_cuda(llama_model_dir, compile_model):
    eager_llm, eager = _run(llama_model_dir, optimization_level=0)
    assert eager_llm.llm_engine.engine_core.model_runner.decode_graphs is None
    llm, graphed = _run(llama_model_dir, optimization_level=2,
                        compilation_config={"compile": compile_model})
    runner = llm.llm_engine.engine_core.model_runner
    graphs = runner.decode_graphs
    assert graphs.graph_runner.captured_sizes() == [1, 2, 4, 8, 16]
    assert sum(graphs.replays.values()) > 0
    # Decode batches shrink as requests finish: several captured sizes are used.
    assert len({size for _, size in graphs.replays}) >= 3
    # Padded batches may take other GEMM kernels than eager ones: equal up to near-ties.
    assert_same_greedy_up_to_ties(graphed, eager)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
