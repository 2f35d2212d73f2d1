"""MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) equal transformers token for token (float32)."""

from __future__ import annotations

import math

import pytest
import torch

from backplane import LLM, SamplingParams
from tests.core.engine.conftest import PROMPTS
from tests.core.engine.hf_reference import hf_greedy
from tests.fixtures.tiny_moe import MOE_ARCHS, NUM_EXPERTS, make_tiny_moe_model

MAX_TOKENS = 8


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_model_dir(request, tmp_path_factory) -> str:
    return make_tiny_moe_model(tmp_path_factory.mktemp("moe") / request.param, request.param)


def _record_routing(llm: LLM) -> list[set[int]]:
    """Wrap every MoE layer's op to collect the expert ids it is asked to run."""
    model = llm.llm_engine.engine_core.model_runner.model
    layers = [m for m in model.modules() if getattr(m, "layer_kind", None) == "fused_moe"]
    assert layers, "the model has no fused-MoE layer"
    used: list[set[int]] = []
    for layer in layers:
        seen: set[int] = set()
        used.append(seen)
        op = layer.moe_op

        def recording(hidden, w13, w2, weights, ids, activation, _op=op, _seen=seen):
            _seen.update(ids.flatten().tolist())
            return _op(hidden, w13, w2, weights, ids, activation)

        layer.moe_op = recording
    return used


def test_moe_greedy_and_logprobs_match_transformers(moe_model_dir):
    llm = LLM(model=moe_model_dir, max_model_len=256, num_kv_blocks=96, block_size=4,
              max_num_batched_tokens=32)
    used = _record_routing(llm)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        expected, rows = hf_greedy(moe_model_dir, ids, MAX_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == expected, prompt
        for token, entry, row in zip(completion.token_ids, completion.logprobs, rows, strict=True):
            assert math.isclose(entry[token].logprob, float(row[token]), abs_tol=1e-4)
            top_values, top_ids = row.topk(2)
            for tid, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
                assert math.isclose(entry[tid].logprob, value, abs_tol=1e-4)
    # Different tokens went to different experts in every MoE layer.
    for seen in used:
        assert len(seen) >= NUM_EXPERTS // 2, seen
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"


def test_moe_layers_follow_the_config():
    """Qwen2-MoE: ``mlp_only_layers`` stay dense; experts stacked as [E, 2I, H] / [E, H, I]."""
    from backplane.core.layers.fused_moe import FusedMoE
    from backplane.core.models.moe import Qwen2MoeForCausalLM
    from tests.fixtures.tiny_moe import make_moe_config

    config = make_moe_config("qwen2_moe")
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    kinds = [isinstance(getattr(layer.mlp, "experts", None), FusedMoE)
             for layer in model.model.layers]
    assert kinds == [True, False, True]
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.w13.shape) == (NUM_EXPERTS, 64, 64)
    assert tuple(experts.w2.shape) == (NUM_EXPERTS, 64, 32)
    names = model.expected_weight_names()
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names
