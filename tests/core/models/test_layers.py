"""Layers against their transformers counterparts, and the fused-weight bookkeeping."""

from __future__ import annotations

import pytest
import torch

from backplane.core.layers import MergedLinear, RMSNorm, RotaryEmbedding, SiluAndMul
from backplane.core.layers.rotary import apply_rotary, compute_inv_freq, rope_parameters
from backplane.core.models.qwen import Qwen2ForCausalLM
from tests.fixtures.tiny_models import make_config


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)
def test_rotary_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                         max_position_embeddings=512, rope_theta=500000.0, rope_scaling=rope)
    ours = RotaryEmbedding(16, 512, rope_parameters(config))
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 511])
    x = torch.randn(7, 6, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = ours.cos_sin(positions, torch.float32)
    got = apply_rotary(x, cos, sin)

    ref_rope = LlamaRotaryEmbedding(config)
    ref_cos, ref_sin = ref_rope(x, positions[None])  # [1, n, head_dim]
    want, _ = apply_rotary_pos_emb(
        x.transpose(0, 1)[None], x.transpose(0, 1)[None], ref_cos, ref_sin
    )
    torch.testing.assert_close(got, want[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_rotary_rejects_unsupported_scaling():
    with pytest.raises(ValueError, match="'proportional' is not supported; supported: .*'yarn'"):
        compute_inv_freq(16, {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0})


def test_rope_parameters_reads_transformers4_style_configs():
    class OldConfig:  # transformers 4.x: rope_theta + rope_scaling with "type"
        rope_theta = 1234.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    params = rope_parameters(OldConfig())
    assert params["rope_type"] == "linear" and params["rope_theta"] == 1234.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 64, generator=g) * 3).to(dtype)
    weight = torch.randn(64, generator=g).to(dtype)
    ours, ref = RMSNorm(64, 1e-6, dtype=dtype), LlamaRMSNorm(64, eps=1e-6).to(dtype)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_silu_and_mul():
    x = torch.randn(3, 8)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])


def test_merged_linear_shards_equal_separate_projections():
    layer = MergedLinear(8, {"q": 4, "k": 2, "v": 2}, bias=True)
    pieces = {name: (torch.randn(size, 8), torch.randn(size)) for name, size in
              layer.output_sizes.items()}
    for name, (w, b) in pieces.items():
        layer.shard_view("weight", name).copy_(w)
        layer.shard_view("bias", name).copy_(b)
    x = torch.randn(3, 8)
    want = torch.cat([x @ w.T + b for w, b in pieces.values()], dim=-1)
    torch.testing.assert_close(layer(x), want)


def test_expected_weight_names_use_checkpoint_spelling():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(make_config("qwen2"), torch.float32)
    names = model.expected_weight_names()
    for piece in ("q_proj.weight", "k_proj.bias", "v_proj.bias", "o_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        assert any(n.endswith(piece) for n in names), piece
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    assert "lm_head.weight" not in names  # tied
    assert not any("o_proj.bias" in n for n in names)  # qwen2: no output bias
    shape = model.kv_cache_shape()
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_size) == (2, 4, 2, 16)
    spec = model.attention_spec(block_size=16, dtype=torch.bfloat16)
    assert spec.sliding_window is None and spec.dtype == torch.bfloat16


def test_sliding_window_reported_only_when_it_matters():
    from backplane.core.models.llama import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(make_config("mistral", sliding_window=128), torch.float32)
    assert model.attention_spec(16, torch.float32).sliding_window == 128
    assert model.attention_spec(16, torch.float32, max_model_len=128).sliding_window is None


def test_rotary_tables_grow_for_longer_max_model_len(tiny_model_factory):
    from backplane.config.configs import ModelConfig
    from backplane.core.loader import load_model

    config = ModelConfig(model=tiny_model_factory("llama"), max_model_len=700)
    rotary = load_model(config, "cpu").model.rotary_emb
    assert rotary.max_positions == 700 and rotary.cos_cache.shape[0] == 700
    short = RotaryEmbedding(16, 512, rotary.params)
    torch.testing.assert_close(rotary.cos_cache[:512], short.cos_cache)
