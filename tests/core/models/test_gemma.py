"""Gemma config handling that the parity fixtures (transformers 5 configs) do not reach."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from backplane.config.attention_spec import logits_soft_cap_of
from backplane.core.models.gemma import FULL, SLIDING, GemmaRMSNorm, _layer_types, _rope_params


def test_layer_types_without_the_field_follow_each_generation():
    old = SimpleNamespace(num_hidden_layers=5, layer_types=None)
    assert _layer_types(old, gemma3=False) == [SLIDING, FULL, SLIDING, FULL, SLIDING]
    old.sliding_window_pattern = 3
    assert _layer_types(old, gemma3=True) == [SLIDING, SLIDING, FULL, SLIDING, SLIDING]
    given = SimpleNamespace(num_hidden_layers=2, layer_types=[FULL, SLIDING])
    assert _layer_types(given, gemma3=True) == [FULL, SLIDING]


def test_gemma3_legacy_rope_fields_give_two_bases():
    legacy = SimpleNamespace(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                             rope_local_base_freq=1e4)
    params = _rope_params(legacy, gemma3=True)
    assert params[SLIDING] == {"rope_type": "default", "rope_theta": 1e4}
    assert params[FULL]["rope_type"] == "linear" and params[FULL]["rope_theta"] == 1e6


def test_rms_norm_scales_by_one_plus_weight_and_is_not_the_fused_kind():
    norm = GemmaRMSNorm(4)
    with torch.no_grad():
        norm.weight.fill_(0.5)
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert torch.allclose(norm(x), 1.5 * x, atol=1e-5)
    assert GemmaRMSNorm.layer_kind != "rms_norm"


def test_only_gemma2_reports_an_attention_soft_cap():
    assert logits_soft_cap_of(SimpleNamespace(model_type="gemma2", attn_logit_softcapping=50.0)) \
        == 50.0
    # transformers' Gemma 3 never applies the field, so neither does Backplane.
    assert logits_soft_cap_of(
        SimpleNamespace(model_type="gemma3_text", attn_logit_softcapping=50.0)) is None
    assert logits_soft_cap_of(SimpleNamespace(model_type="llama")) is None
