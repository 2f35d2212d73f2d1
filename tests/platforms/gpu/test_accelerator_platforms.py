"""cuda and rocm Platform objects on a machine without a GPU: parts, backends, config policy.

Loading a platform must not touch the device (only probing decides availability),
so all of this runs on the CPU; device calls are exercised in test_cuda_device.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from backplane.platforms.cuda import descriptor as cuda_descriptor
from backplane.platforms.cuda.graph_runner import CudaGraphRunner
from backplane.platforms.cuda.triton_attention import TritonPagedAttentionBackend
from backplane.platforms.rocm import descriptor as rocm_descriptor
from backplane.plugins_sdk import (
    AttentionSpec,
    PlatformConfigView,
    TorchSdpaPagedAttentionBackend,
)
from tests.platforms.gpu.paged_cases import CASES, check_backend_on_case, make_case

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(params=["cuda", "rocm"])
def platform(request, monkeypatch):
    loaded = {"cuda": cuda_descriptor, "rocm": rocm_descriptor}[request.param].load()
    # Pretend one GPU is visible so the policy's device-count check stays quiet
    # unless a test wants it.
    monkeypatch.setattr(loaded.runtime, "device_count", lambda: 1)
    return loaded


def test_platform_parts(platform):
    assert platform.dist_backend == "nccl"
    assert platform.compile_backend == "inductor"
    assert platform.supports_graph_capture
    assert platform.device_type == "cuda"
    assert platform.runtime.pin_memory_available()
    assert isinstance(platform.make_graph_runner(), CudaGraphRunner)
    names = [b.name for b in platform.attention_backends()]
    assert names[:2] == ["triton_paged", "torch_sdpa_paged"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_is_selected_first(platform):
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16,
                         block_size=16)
    assert platform.select_attention_backend(spec) is TritonPagedAttentionBackend


def test_sdpa_serves_what_triton_refuses(platform):
    spec = AttentionSpec(num_heads=2, num_kv_heads=2, head_size=512, dtype=torch.float16,
                         block_size=16)
    assert "head_size 512 exceeds 256" in TritonPagedAttentionBackend.unsupported_reasons(spec)
    assert platform.select_attention_backend(spec) is TorchSdpaPagedAttentionBackend
    forced = platform.select_attention_backend(spec, forced="torch_sdpa_paged")
    assert forced is TorchSdpaPagedAttentionBackend


def test_triton_refusal_names_missing_triton(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "triton" else real_find_spec(name, *a),
    )
    spec = AttentionSpec(num_heads=2, num_kv_heads=2, head_size=64, dtype=torch.float16,
                         block_size=16)
    reasons = TritonPagedAttentionBackend.unsupported_reasons(spec)
    assert any("triton is not installed" in r for r in reasons)


def test_policy_refuses_kv_cache_dtypes_without_kernels(platform):
    view = PlatformConfigView.for_testing(kv_cache_dtype="float16")
    decision = platform.config_policy.check_and_update(view)
    assert decision.refusals == [
        f"kv_cache_dtype 'float16' is not supported on the {platform.name} platform; "
        "use one of ['auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2']"
    ]
    # fp8 is the attention backend's to serve (triton_paged declares it).
    for name in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        view = PlatformConfigView.for_testing(kv_cache_dtype=name)
        assert platform.config_policy.check_and_update(view).refusals == []


def test_policy_accepts_graphs_and_defaults(platform):
    view = PlatformConfigView.for_testing(
        optimization_level=2, compile=True, compile_backend="inductor", use_graphs=True,
        graph_capture_sizes=(1, 2, 4, 8))
    decision = platform.config_policy.check_and_update(view)
    assert decision.refusals == [] and decision.changes == []


def test_policy_refuses_more_ranks_than_gpus(platform, monkeypatch):
    monkeypatch.setattr(platform.runtime, "device_count", lambda: 2)
    view = PlatformConfigView.for_testing(tensor_parallel_size=4)
    decision = platform.config_policy.check_and_update(view)
    assert decision.refusals == [
        "tensor_parallel_size (4) x pipeline_parallel_size (1) = 4 exceeds the 2 GPU(s) "
        f"visible to the {platform.name} platform on this host"
    ]
    # A multi-host executor may place ranks elsewhere: no local count check.
    view = PlatformConfigView.for_testing(tensor_parallel_size=4,
                                          distributed_executor_backend="ray")
    assert not platform.config_policy.check_and_update(view).refusals


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", CASES, ids=lambda s: s.name)
def test_torch_sdpa_paged_matches_reference_on_cpu(spec, dtype):
    check_backend_on_case(TorchSdpaPagedAttentionBackend, make_case(dataclasses.replace(
        spec, dtype=dtype)))
