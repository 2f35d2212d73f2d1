"""The platform policy sees the EngineConfig through PlatformConfigView; changes come back."""

from __future__ import annotations

import warnings

import pytest
import torch

from backplane.config.policy_view import WRITE_BACK, platform_config_view
from backplane.plugins_sdk import ConfigDecision, ConfigPolicy, PlatformConfigView
from tests.config.helpers import GraphPlatform, cpu_platform, engine_config, llama_hf_config


class _Recorder(ConfigPolicy):
    """Keeps the view it got and applies ``changes`` to it."""

    def __init__(self, **changes) -> None:
        self.changes = changes
        self.view: PlatformConfigView | None = None

    def check_and_update(self, view):
        self.view = view
        for name, value in self.changes.items():
            setattr(view, name, value)
        return ConfigDecision(changes=[f"set {sorted(self.changes)}"] if self.changes else [])


def test_every_writable_field_is_copied_back_somewhere():
    assert set(WRITE_BACK) == set(PlatformConfigView.WRITABLE_FIELDS)


def test_view_holds_the_model_geometry_and_resolved_settings():
    hf = llama_hf_config(sliding_window=64, vocab_size=300, architectures=["LlamaForCausalLM"])
    config = engine_config(hf, max_model_len=256, block_size=32, max_num_seqs=8,
                           num_kv_blocks=40, attention_backend="cpu_sdpa", dtype="float32")
    policy = _Recorder()
    assert not config.check(GraphPlatform(policy))
    view = policy.view
    assert (view.architecture, view.num_layers, view.num_heads, view.num_kv_heads,
            view.head_size, view.sliding_window, view.max_model_len, view.vocab_size) == (
        "LlamaForCausalLM", 2, 4, 2, 16, 64, 256, 300)
    assert (view.tensor_parallel_size, view.max_num_seqs, view.block_size,
            view.num_kv_blocks, view.kv_cache_dtype, view.attention_backend) == (
        1, 8, 32, 40, "auto", "cpu_sdpa")
    assert view.dtype == torch.float32
    # The optimization level is applied before the policy runs (O2 on a graph platform).
    assert (view.optimization_level, view.compile, view.compile_backend, view.use_graphs) == (
        2, True, "fake_backend", True)
    assert view.graph_capture_sizes == (1, 2, 4, 8)


def test_view_without_the_model_config_has_no_geometry():
    config = engine_config(max_model_len=128)
    config.model_config.hf_config = None
    view = platform_config_view(config)
    assert view.architecture is view.num_heads is view.head_size is view.dtype is None
    assert view.max_model_len == 128


def test_policy_changes_are_copied_back_into_the_config():
    policy = _Recorder(block_size=32, kv_cache_memory_bytes=1 << 24, use_graphs=False,
                       dtype=torch.bfloat16, attention_backend="cpu_sdpa")
    config = engine_config(dtype="float32")
    assert not config.check(GraphPlatform(policy))
    assert config.cache_config.block_size == 32
    assert config.cache_config.kv_cache_memory_bytes == 1 << 24
    assert config.compilation_config.use_graphs is False
    assert config.model_config.torch_dtype == torch.bfloat16
    assert config.device_config.attention_backend == "cpu_sdpa"
    assert config.attention_spec().block_size == 32  # backend selection saw the change
    assert "platform fakegpu: set ['attention_backend', 'block_size', 'dtype', " \
           "'kv_cache_memory_bytes', 'use_graphs']" in config.notes


def test_turning_graphs_on_fills_the_default_ladder():
    config = engine_config(optimization_level=1, max_num_seqs=16)
    assert not config.check(GraphPlatform(_Recorder(use_graphs=True)))
    assert config.compilation_config.graph_capture_sizes == [1, 2, 4, 8, 16]


@pytest.mark.parametrize(("changes", "message"), [
    ({"kv_cache_dtype": "fp8"}, "PlatformConfigView.kv_cache_dtype is read-only; a "
                                "ConfigPolicy may change only dtype, block_size"),
    ({"max_num_seqs": 1}, "PlatformConfigView.max_num_seqs is read-only"),
    ({"block_size": 0}, "PlatformConfigView.block_size must be an integer >= 1, got 0"),
])
def test_policy_bug_is_one_problem_among_the_others(changes, message):
    config = engine_config(block_size=16, max_model_len=100_000)  # also too long for the model
    problems = config.check(GraphPlatform(_Recorder(**changes)))
    policy_problems = [p for p in problems if "config policy failed" in p]
    assert len(policy_problems) == 1 and message in policy_problems[0]
    assert any("max_position_embeddings" in p for p in problems)
    assert config.cache_config.kv_cache_dtype == "auto" and config.cache_config.block_size == 16


class _LegacyPolicy(ConfigPolicy):
    """SDK 1.0 style: mutates the engine config itself."""

    def check_and_update_config(self, config):
        config.cache_config.num_kv_blocks = 77
        return ConfigDecision(changes=["num_kv_blocks 77"])


def test_legacy_policy_still_runs_with_a_deprecation_warning():
    config = engine_config()
    with pytest.warns(DeprecationWarning) as record:
        assert not config.check(GraphPlatform(_LegacyPolicy()))
    assert str(record[0].message).endswith(
        "test_policy_view._LegacyPolicy: ConfigPolicy.check_and_update_config is deprecated "
        "since plugin SDK 1.1 and will be removed in SDK 1.2; use "
        "ConfigPolicy.check_and_update(view: PlatformConfigView) instead")
    assert config.cache_config.num_kv_blocks == 77
    assert "platform fakegpu: num_kv_blocks 77" in config.notes


def test_in_tree_cpu_policy_uses_the_view_without_warnings():
    config = engine_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert not config.check(cpu_platform())
    assert config.cache_config.kv_cache_memory_bytes == 4 * 1024**3
