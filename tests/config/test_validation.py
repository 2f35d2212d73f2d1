"""Each validation message of EngineConfig.finalize, and all problems reported at once."""

from __future__ import annotations

import pytest
import torch

from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from tests.config.helpers import GraphPlatform, cpu_platform, engine_config, llama_hf_config


def _problems(platform=None, hf=None, **args) -> list[str]:
    return engine_config(hf=hf, **args).check(platform or cpu_platform())


def test_valid_config_finalizes_and_selects_backend():
    cfg = engine_config(max_model_len=256).finalize(cpu_platform())
    assert cfg.attention_backend_name == "cpu_paged"
    assert cfg.model_config.torch_dtype == torch.float32
    assert cfg.scheduler_config.max_num_batched_tokens == 2048
    assert cfg.attention_spec().head_size == 16


def test_batched_tokens_below_max_model_len_without_chunked_prefill():
    (msg,) = _problems(max_model_len=512, max_num_batched_tokens=100,
                       enable_chunked_prefill=False)
    assert "max_num_batched_tokens (100) is smaller than max_model_len (512)" in msg
    assert "enable chunked prefill or raise max_num_batched_tokens" in msg
    # the model's own limit counts too when max_model_len is not set
    (msg,) = _problems(max_num_batched_tokens=100, enable_chunked_prefill=False)
    assert "max_model_len (512)" in msg


def test_block_size_refused_by_backend(monkeypatch):
    from backplane.platforms.cpu.paged_attention import CpuPagedAttentionBackend

    for backend in (CpuPagedAttentionBackend, CpuSdpaAttentionBackend):
        monkeypatch.setattr(backend, "supported_block_sizes", (16, 32))
    (msg,) = _problems(block_size=8)
    assert msg.startswith("attention: no attention backend of platform 'cpu'")
    assert "block_size 8 not in (16, 32)" in msg and "--block-size" in msg


def test_dtype_unsupported_by_platform(monkeypatch):
    from backplane.platforms.cpu.runtime import CpuRuntime

    monkeypatch.setattr(CpuRuntime, "supported_dtypes", (torch.float32,))
    (msg,) = _problems(dtype="float16")
    assert msg == ("dtype 'float16' is not supported by platform 'cpu'; "
                   "supported: ['float32'] (or 'auto')")


def test_graph_capture_on_platform_without_it():
    (msg,) = _problems(compilation_config={"use_graphs": True})
    assert "graph capture (compilation_config.use_graphs=True) is not available on platform " \
           "'cpu'" in msg
    assert not _problems(GraphPlatform(), compilation_config={"use_graphs": True})


def test_tensor_parallel_must_divide_heads():
    problems = _problems(hf=llama_hf_config(num_attention_heads=4, num_key_value_heads=4),
                         tensor_parallel_size=3)
    assert "tensor_parallel_size (3) must divide num_attention_heads (4); use one of [1, 2, 4]" \
        in problems


def test_executor_defaults_by_world_size_and_split_features_are_refused():
    cfg = engine_config(tensor_parallel_size=2)
    assert not cfg.check(cpu_platform())
    assert cfg.parallel_config.distributed_executor_backend == "mp"
    cfg = engine_config()
    cfg.check(cpu_platform())
    assert cfg.parallel_config.distributed_executor_backend == "uni"
    (msg,) = _problems(tensor_parallel_size=2, distributed_executor_backend="uni")
    assert "distributed_executor_backend 'uni' runs one rank" in msg and "= 2" in msg
    (msg,) = _problems(distributed_executor_backend="slurm")
    assert "distributed_executor_backend ('slurm') must be one of" in msg
    problems = _problems(pipeline_parallel_size=2, quantization="int8")
    assert any("quantization ('int8') is not supported with tensor_parallel_size 1 x "
               "pipeline_parallel_size 2" in p for p in problems)
    problems = _problems(tensor_parallel_size=2, enable_lora=True)
    assert any("enable_lora is not supported with tensor_parallel_size 2" in p
               for p in problems)


def test_unsupported_vllm_options_are_refused_with_a_reason():
    problems = _problems(revision="main", download_dir="/tmp/x", max_seq_len_to_capture=8192)
    assert any("revision ('main') is not supported" in p for p in problems)
    assert any("download_dir ('/tmp/x') is not supported" in p for p in problems)
    assert any("max_seq_len_to_capture (8192) is not supported" in p for p in problems)


def test_kv_cache_dtype_unknown_and_unsupported():
    problems = _problems(kv_cache_dtype="int3")
    assert any("kv_cache_dtype ('int3') is not one of" in p for p in problems)
    # A known name without a cpu kernel (a cache in another float dtype than the model's).
    problems = _problems(kv_cache_dtype="float16")
    assert any("kv_cache_dtype 'float16' is not supported on the cpu platform" in p
               for p in problems)
    # fp8 has one (cpu_paged); tests/core/test_fp8_kv_cache.py runs it.
    for name in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        assert not any("kv_cache_dtype" in p for p in _problems(kv_cache_dtype=name))


def test_max_model_len_above_model_limit():
    (msg,) = _problems(max_model_len=4096)
    assert "max_model_len (4096) exceeds the model's max_position_embeddings (512)" in msg


def test_unknown_forced_attention_backend():
    (msg,) = _problems(attention_backend="flash")
    assert "attention_backend 'flash' is not offered by platform 'cpu'" in msg


def test_every_problem_in_one_error():
    cfg = engine_config(
        hf=llama_hf_config(num_attention_heads=4, num_key_value_heads=4),
        max_num_seqs=0, memory_utilization=1.5, tensor_parallel_size=3,
        kv_cache_dtype="float16", compilation_config={"use_graphs": True},
    )
    with pytest.raises(ValueError) as err:
        cfg.finalize(cpu_platform())
    text = str(err.value)
    for needle in ("max_num_seqs (0) must be >= 1", "memory_utilization (1.5)",
                   "tensor_parallel_size (3)", "kv_cache_dtype 'float16'", "graph capture"):
        assert needle in text
    assert text.count("\n  - ") >= 5


def test_unreadable_model_is_a_problem(tmp_path):
    from backplane.config import EngineArgs

    cfg = EngineArgs(model=str(tmp_path / "missing")).create_engine_config()
    problems = cfg.check(cpu_platform())
    assert any("cannot read its config" in p and "missing" in p for p in problems)
    assert cfg.check(cpu_platform(), load_model=False) == []
