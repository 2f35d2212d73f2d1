"""AttentionSpec.logits_soft_cap: torch backends implement it, the others refuse it by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from backplane.platforms.cpu.paged_attention import CpuPagedAttentionBackend
from backplane.platforms.cuda.triton_attention import TritonPagedAttentionBackend
from backplane.plugins_sdk import (
    AttentionSpec,
    ReferenceAttentionBackend,
    TorchSdpaPagedAttentionBackend,
)
from backplane.plugins_sdk.testing.paged import PagedAttentionHarness, tolerance

IMPLEMENTING = [CpuPagedAttentionBackend, CpuSdpaAttentionBackend, TorchSdpaPagedAttentionBackend,
                ReferenceAttentionBackend]


def _spec(cap, window=None, **kw) -> AttentionSpec:
    return AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, dtype=torch.float32,
                         block_size=kw.pop("block_size", 8), sliding_window=window,
                         logits_soft_cap=cap, **kw)


def _outputs(backend_cls, spec, scale=1.0):
    """Prefill (one request with a cached prefix), then a mixed step and a decode."""
    harness = PagedAttentionHarness(backend_cls, spec, "cpu", [40, 30, 12], seed=3, scale=scale)
    steps = [{0: 20, 1: 9}, {0: 1, 1: 7, 2: 11}, {0: 1, 1: 1, 2: 1}]
    return [harness.step(s, num_padding=2) for s in steps]


@pytest.mark.parametrize("backend_cls", IMPLEMENTING, ids=lambda b: b.name)
@pytest.mark.parametrize("window", [None, 6])
def test_soft_cap_matches_reference(backend_cls, window):
    if window is not None and not backend_cls.supports_sliding_window:
        pytest.skip(f"{backend_cls.name} has no sliding window")
    spec = _spec(2.5, window)
    assert backend_cls.supports_logits_soft_cap and not backend_cls.unsupported_reasons(spec)
    for result in _outputs(backend_cls, spec, scale=0.8):
        assert torch.allclose(result.output, result.expected, **tolerance(torch.float32))


def test_soft_cap_changes_the_result():
    """The cases above are not vacuous: with these inputs the cap moves the output."""
    capped = _outputs(CpuSdpaAttentionBackend, _spec(2.5), scale=0.8)
    plain = _outputs(CpuSdpaAttentionBackend, _spec(None), scale=0.8)
    assert (capped[0].output - plain[0].output).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_kernel_soft_caps_in_each_dtype(dtype):
    spec = dataclasses.replace(_spec(2.5, 6, block_size=16), dtype=dtype)
    for result in _outputs(CpuPagedAttentionBackend, spec, scale=0.8):
        assert torch.allclose(result.output, result.expected, **tolerance(dtype))


def test_backends_without_soft_cap_say_so():
    """The Triton kernels do not soft-cap: declared, so cuda/rocm fall back to torch_sdpa_paged."""
    assert not TritonPagedAttentionBackend.supports_logits_soft_cap
    reasons = TritonPagedAttentionBackend.unsupported_reasons(_spec(30.0, block_size=16))
    assert "attention logit soft-capping (logits_soft_cap) is not supported" in reasons


def test_cpu_platform_selects_its_compiled_kernel_for_soft_caps():
    from backplane.platforms.cpu.platform import CpuPlatform

    platform = CpuPlatform()
    assert platform.select_attention_backend(_spec(30.0, block_size=16)).name == "cpu_paged"
