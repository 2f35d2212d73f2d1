"""Phi-3 and the length-dependent rope scalings (yarn, dynamic, longrope) against transformers.

Greedy tokens must equal transformers' ``generate`` token for token in
float32. longrope runs with a tiny ``original_max_position_embeddings`` (32)
and prompts past it, so the long factors are what both sides use (transformers
switches on the whole sequence's length); with ``max_model_len`` within it the
short factors are used. The rope tables themselves are compared exactly with
transformers' ``ROPE_INIT_FUNCTIONS``.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from backplane import LLM, SamplingParams
from backplane.core.layers.rotary import (
    RotaryEmbedding,
    attention_factor,
    compute_inv_freq,
    rope_parameters,
)
from tests.core.engine.conftest import PROMPTS
from tests.fixtures.tiny_models import PAD_ID, make_tiny_model
from tests.fixtures.tiny_phi3 import PHI3_ORIGINAL_MAX, longrope_scaling, make_tiny_phi3

# Both longer than 32 tokens: past the fixtures' original_max_position_embeddings.
LONG_PROMPTS = [PROMPTS[2], PROMPTS[0] + " and " + PROMPTS[0] + ", then " + PROMPTS[3] * 3]
SHORT_PROMPTS = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
LONGROPE = longrope_scaling(16, PHI3_ORIGINAL_MAX)


@functools.cache
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_generate(model_dir: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` (with its KV cache), EOS ignored."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=PAD_ID)
    ids = torch.tensor([prompt_ids])
    out = _hf_model(model_dir).generate(ids, attention_mask=torch.ones_like(ids),
                                        generation_config=config)
    return out[0, len(prompt_ids):].tolist()


def check_parity(model_dir: str, prompts: list[str], max_tokens: int = 10, **llm_kw) -> LLM:
    llm = LLM(model=model_dir, num_kv_blocks=96, **llm_kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        expected = hf_generate(model_dir, out.prompt_token_ids, max_tokens)
        assert len(expected) == max_tokens
        assert out.outputs[0].token_ids == expected, prompt
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"
    return llm


def _rotary(llm: LLM) -> RotaryEmbedding:
    return llm.llm_engine.engine_core.model_runner.model.model.rotary_emb


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3_rope")
    return {
        "phi3": make_tiny_phi3(root / "phi3"),
        "phi3_partial_sw": make_tiny_phi3(root / "phi3-partial-sw", partial_rotary_factor=0.5,
                                          sliding_window=8, seed=1),
        "yarn": make_tiny_model(root / "yarn", "llama", max_position_embeddings=256,
                                rope_scaling=dict(YARN)),
        "dynamic": make_tiny_model(root / "dynamic", "llama", max_position_embeddings=256,
                                   rope_scaling=dict(DYNAMIC)),
        "longrope": make_tiny_model(root / "longrope", "llama", max_position_embeddings=256,
                                    rope_scaling=dict(LONGROPE)),
    }


def test_prompts_are_past_the_original_length(model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["phi3"])
    assert all(len(tokenizer.encode(p)) > PHI3_ORIGINAL_MAX for p in LONG_PROMPTS)


def test_phi3_longrope_long_factors(model_dirs):
    llm = check_parity(model_dirs["phi3"], LONG_PROMPTS, max_model_len=256)
    assert type(llm.llm_engine.engine_core.model_runner.model).__name__ == "Phi3ForCausalLM"
    assert _rotary(llm).uses_long_factors


def test_phi3_longrope_short_factors_within_original_length(model_dirs):
    llm = check_parity(model_dirs["phi3"], SHORT_PROMPTS, max_tokens=4,
                       max_model_len=PHI3_ORIGINAL_MAX)
    assert not _rotary(llm).uses_long_factors


def test_phi3_partial_rotary_and_sliding_window_chunked(model_dirs):
    llm = check_parity(model_dirs["phi3_partial_sw"], LONG_PROMPTS, max_model_len=256,
                       block_size=4, max_num_batched_tokens=16)
    assert _rotary(llm).rotary_dim == 8
    assert llm.llm_engine.config.attention_spec().sliding_window == 8


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_llama_rope_scaling(model_dirs, kind):
    prompts = LONG_PROMPTS if kind == "longrope" else PROMPTS
    llm = check_parity(model_dirs[kind], prompts, max_model_len=256)
    assert _rotary(llm).rope_type == kind


def test_dynamic_past_max_position_embeddings_uses_vllms_static_base(model_dirs, caplog):
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from backplane.core.layers.rotary import compute_inv_freq, rope_parameters

    config = json.loads((Path(model_dirs["dynamic"]) / "config.json").read_text())
    max_pos = config["max_position_embeddings"]
    with caplog.at_level(logging.WARNING, logger="backplane.core.layers.rotary"):
        llm = LLM(model=model_dirs["dynamic"], max_model_len=max_pos + 44, dtype="float32",
                  num_kv_blocks=64)
    assert "dynamic rope: max_model_len" in caplog.text
    rotary = _rotary(llm)
    params = rope_parameters(AutoConfig.from_pretrained(model_dirs["dynamic"]))
    head_dim = rotary.head_dim
    # One base for every position, scaled for max_position_embeddings * factor (vLLM).
    expected = compute_inv_freq(head_dim, params, seq_len=int(max_pos * params["factor"]),
                                max_position_embeddings=max_pos)
    unscaled = compute_inv_freq(head_dim, params, max_position_embeddings=max_pos)
    positions = torch.arange(rotary.max_positions, dtype=torch.float32)
    assert torch.allclose(rotary.cos_cache, torch.outer(positions, expected).cos(), atol=1e-6)
    assert not torch.allclose(expected, unscaled)
    out = llm.generate(["a long enough prompt"], SamplingParams(max_tokens=4, temperature=0.0),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("scaling", [
    YARN,
    {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    {**YARN, "truncate": False, "attention_factor": 1.3},
    DYNAMIC,
    LONGROPE,
    {**LONGROPE, "factor": 3.0},
])
def test_tables_equal_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=10000.0,
                         max_position_embeddings=256, rope_scaling=dict(scaling))
    params = rope_parameters(config)
    for seq_len in (None, 100, 300, 1000):
        want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
        got = compute_inv_freq(16, params, seq_len=seq_len, max_position_embeddings=256)
        assert torch.equal(got, want), seq_len
        if scaling["rope_type"] != "dynamic":  # dynamic's scale is 1.0 at every length
            assert attention_factor(params, 256) == want_scale


def test_phi3_su_alias_and_top_level_original():
    class OldPhi3Config:  # transformers 4.x style
        rope_theta = 10000.0
        max_position_embeddings = 256
        original_max_position_embeddings = 32
        partial_rotary_factor = 0.5
        rope_scaling = {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}

    params = rope_parameters(OldPhi3Config())
    assert params["rope_type"] == "longrope"
    assert params["original_max_position_embeddings"] == 32
    assert RotaryEmbedding(16, 256, params).rotary_dim == 8


def test_longrope_factor_set_follows_max_model_len(caplog):
    params = {"rope_theta": 10000.0, **LONGROPE}
    rotary = RotaryEmbedding(16, 256, params)
    with caplog.at_level(logging.WARNING, logger="backplane.core.layers.rotary"):
        rotary.ensure_positions(PHI3_ORIGINAL_MAX)
        assert not rotary.uses_long_factors and not caplog.text
        rotary.ensure_positions(PHI3_ORIGINAL_MAX + 1)
    assert rotary.uses_long_factors
    assert "long factors" in caplog.text
    long_inv_freq = compute_inv_freq(16, params, seq_len=PHI3_ORIGINAL_MAX + 1)
    scale = attention_factor(params, 256)
    torch.testing.assert_close(rotary.cos_cache[5], (5 * long_inv_freq).cos() * scale)


def test_unknown_rope_type_lists_supported():
    with pytest.raises(ValueError, match="'yarn', 'dynamic', 'longrope'"):
        compute_inv_freq(16, {"rope_type": "mrope", "rope_theta": 10000.0})
