"""Conformance: the config policy accepts defaults and refuses with reasons."""

from __future__ import annotations

import pytest
import torch

from backplane.plugins_sdk.attention import AttentionSpec

pytestmark = pytest.mark.backplane_conformance


def _config(platform):
    """An engine config for a small Llama-shaped model, as the core hands it to the policy."""
    from transformers import LlamaConfig

    from backplane.config import EngineConfig
    from backplane.config.configs import ModelConfig

    hf = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                     max_position_embeddings=256)
    model = ModelConfig(model="conformance-tiny-llama", max_model_len=256)
    model.hf_config = hf
    model.torch_dtype = platform.runtime.default_dtype()
    config = EngineConfig(model_config=model)
    config.scheduler_config.max_num_batched_tokens = 256
    return config


def _check_decision(decision) -> None:
    assert isinstance(decision.changes, list) and isinstance(decision.refusals, list)
    for text in decision.changes + decision.refusals:
        assert isinstance(text, str) and text.strip(), f"empty reason in {decision}"


def test_config_policy_accepts_defaults(backplane_platform):
    decision = backplane_platform.config_policy.check_and_update_config(_config(backplane_platform))
    _check_decision(decision)
    assert not decision.refusals, f"default config refused: {decision.refusals}"


def test_config_policy_refuses_graphs_without_runner(backplane_platform):
    if backplane_platform.supports_graph_capture:
        pytest.skip("platform captures graphs; nothing to refuse")
    config = _config(backplane_platform)
    config.compilation_config.use_graphs = True
    decision = backplane_platform.config_policy.check_and_update_config(config)
    _check_decision(decision)
    assert any("graph" in r.lower() for r in decision.refusals), (
        f"use_graphs=True on a platform without a GraphRunner must be refused with a reason "
        f"mentioning graphs; refusals: {decision.refusals}")


def test_config_refuses_unknown_kv_cache_dtype_with_reason(backplane_platform):
    config = _config(backplane_platform)
    config.cache_config.kv_cache_dtype = "no_such_kv_dtype"
    decision = backplane_platform.config_policy.check_and_update_config(config)
    _check_decision(decision)
    if any("kv_cache_dtype" in r for r in decision.refusals):
        return
    # Not refused by the policy: backend selection must then refuse it, with a reason.
    spec = AttentionSpec(4, 2, 32, backplane_platform.runtime.default_dtype(), 16,
                         kv_cache_dtype="no_such_kv_dtype")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        backplane_platform.select_attention_backend(spec)


def test_config_forced_unknown_backend_is_refused_with_choices(backplane_platform):
    spec = AttentionSpec(4, 2, 32, torch.float32, 16)
    with pytest.raises(ValueError) as info:
        backplane_platform.select_attention_backend(spec, forced="no_such_backend")
    text = str(info.value)
    assert "no_such_backend" in text
    for backend in backplane_platform.all_attention_backends():
        assert backend.name in text, f"refusal should list available backend {backend.name!r}"


def test_config_unservable_spec_lists_every_backend_reason(backplane_platform):
    spec = AttentionSpec(4, 2, 32, torch.int32, 16)
    with pytest.raises(ValueError) as info:
        backplane_platform.select_attention_backend(spec)
    text = str(info.value)
    for backend in backplane_platform.all_attention_backends():
        assert backend.name in text
    assert "dtype" in text
