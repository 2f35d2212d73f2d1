"""resolve(): one pure step from options + platform to a frozen ResolvedConfig."""

from __future__ import annotations

import pytest
import torch

from backplane import LLM
from backplane.config import EngineArgs
from backplane.config.resolve import ResolvedConfig, problems, resolve
from backplane.platforms import resolve_platform


@pytest.fixture(scope="module")
def cpu():
    return resolve_platform("cpu")


def test_resolve_returns_a_frozen_config_with_the_model_spec(llama_model_dir, cpu):
    resolved = resolve(EngineArgs(model=llama_model_dir, max_model_len=64, block_size=8), cpu)
    assert isinstance(resolved, ResolvedConfig)
    spec = resolved.model_spec
    hf = resolved.model_config.hf_config
    assert spec.num_layers == hf.num_hidden_layers and spec.vocab_size == hf.vocab_size
    assert spec.num_heads == hf.num_attention_heads
    assert spec.num_kv_heads_per_rank == hf.num_key_value_heads
    assert spec.head_size == hf.hidden_size // hf.num_attention_heads
    assert spec.dtype == torch.float32 and spec.block_size == 8
    assert spec.kv_bytes_per_block == 2 * spec.num_layers * 8 * spec.num_kv_heads * spec.head_size * 4
    assert resolved.attention_spec().num_kv_heads == spec.num_kv_heads_per_rank
    assert resolved.platform_name == "cpu" and resolved.attention_backend_name
    assert any("optimization level" in d for d in resolved.decisions)
    with pytest.raises(AttributeError, match="cannot change: the configuration is resolved"):
        resolved.cache_config.block_size = 16
    with pytest.raises(AttributeError):
        resolved.platform_name = "cuda"  # the object itself is a frozen dataclass


def test_problems_lists_everything_and_builds_nothing(llama_model_dir, cpu):
    found = problems(
        EngineArgs(model=llama_model_dir, block_size=0, tensor_parallel_size=3, revision="v1"),
        cpu,
    )
    assert any("block_size (0)" in p for p in found)
    assert any("tensor_parallel_size (3) must divide num_attention_heads" in p for p in found)
    assert any("revision ('v1')" in p for p in found)
    with pytest.raises(ValueError, match="invalid engine configuration"):
        resolve(EngineArgs(model=llama_model_dir, tensor_parallel_size=3), cpu)


def test_the_engine_runs_on_the_resolved_config(llama_model_dir):
    llm = LLM(model=llama_model_dir, max_model_len=64, num_kv_blocks=16)
    config = llm.llm_engine.config
    assert isinstance(config, ResolvedConfig)
    assert llm.llm_engine.vocab_size == config.model_spec.vocab_size
    runner = llm.llm_engine.engine_core.model_runner
    assert runner.attn_backend.spec == config.attention_spec()


def test_a_feature_another_platform_has_is_refused_naming_it(llama_model_dir, cpu):
    found = problems(
        EngineArgs(model=llama_model_dir, compilation_config={"use_graphs": True}), cpu
    )
    # The installed platforms that declare the feature are named (the plugin template's
    # acme records graphs too, when it is installed).
    assert any("graph capture" in p and "runs on the" in p and "cuda, rocm" in p for p in found)


def test_descriptor_features_are_checked():
    from backplane.plugins_sdk.descriptor import PlatformDescriptor, ProbeResult

    with pytest.raises(ValueError, match="unknown feature"):
        PlatformDescriptor("x", "cpu", 0, "1.1", lambda: ProbeResult(True, ""), lambda: None,
                           features=frozenset({"teleport"}))
