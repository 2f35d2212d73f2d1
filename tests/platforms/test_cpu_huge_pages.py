"""KV cache and packed weight memory of the CPU platform: zeroed, on 2 MiB pages where
the kernel allows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from backplane.platforms.cpu.huge_pages import (
    HUGE_PAGE,
    weight_buffer,
    weights_on_huge_pages,
    zeros_on_huge_pages,
)
from backplane.platforms.cpu.paged_attention import CpuPagedAttentionBackend

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_are_zeroed_aligned_and_writable(dtype):
    t = zeros_on_huge_pages((2, 3, 700, 16, 64), dtype)
    assert t.shape == (2, 3, 700, 16, 64) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    assert not t.any()
    t[1, 2, 699] = 3.0
    assert t.sum().item() == 3.0 * 16 * 64


def test_small_tensors_are_ordinary_zeros():
    t = zeros_on_huge_pages((4, 8), torch.float32)
    assert torch.equal(t, torch.zeros(4, 8))


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                    reason="transparent huge pages are off on this kernel")
def test_written_memory_is_backed_by_huge_pages():
    before = _anon_huge_kib()
    t = zeros_on_huge_pages((16 * HUGE_PAGE // 4,), torch.float32)
    t.fill_(1.0)  # first touch, after the madvise
    assert _anon_huge_kib() - before >= 2048, "no 2 MiB page was used"


@pytest.mark.parametrize("backend", [CpuPagedAttentionBackend, CpuSdpaAttentionBackend])
def test_cpu_backends_allocate_their_caches_there(backend):
    shape = backend.kv_cache_shape(3000, 16, 2, 64)  # 23 MiB: past the small-tensor cut-off
    cache = backend.allocate_kv_cache(shape, torch.bfloat16, torch.device("cpu"))
    assert cache.shape == shape and cache.data_ptr() % HUGE_PAGE == 0 and not cache.any()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def test_weight_buffers_are_zeroed_and_small_ones_share_chunks_without_overlap():
    small = [weight_buffer((1000 + i, 3), dtype) for i, dtype in
             enumerate([torch.bfloat16, torch.int8, torch.uint8, torch.bfloat16])]
    large = weight_buffer((5 * HUGE_PAGE // 2,), torch.bfloat16)  # 5 huge pages: its own
    for t in [*small, large]:
        assert t.is_contiguous() and not t.any()
        assert t.data_ptr() % 4096 == 0
    assert large.data_ptr() % HUGE_PAGE == 0
    for i, a in enumerate(small):
        a.fill_(i + 1)
        assert all(not _overlaps(a, b) for b in small[i + 1:] + [large])
    # each still holds what was written into it
    assert all((t == i + 1).all() for i, t in enumerate(small))
    # they are cut from 8 MiB chunks: at most one neighbour pair straddles two chunks
    starts = [t.data_ptr() for t in small]
    near = [abs(starts[i + 1] - starts[i]) < 4 * HUGE_PAGE for i in range(len(starts) - 1)]
    assert sum(near) >= len(near) - 1


def test_weights_on_huge_pages_copies_values_and_layout():
    source = torch.randn(64, 48).to(torch.bfloat16).t()  # not contiguous
    copy = weights_on_huge_pages(source)
    assert copy.is_contiguous() and copy.shape == source.shape and torch.equal(copy, source)


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                    reason="transparent huge pages are off on this kernel")
def test_packed_linear_weights_are_on_huge_pages(monkeypatch):
    from backplane.platforms.cpu.linear import BlockedBf16Linear, Int8Linear, bf16_gemm_supported
    if not bf16_gemm_supported():
        pytest.skip("no GEMM kernel here")
    weight = torch.randn(4096, 1024, dtype=torch.bfloat16)  # 8 MiB bf16, 4 MiB int8
    before = _anon_huge_kib()
    bf16 = BlockedBf16Linear(weight, None, float_output=False)
    int8 = Int8Linear(weight, None, float_output=False, activations="int8")
    assert bf16.packed_weight.data_ptr() % HUGE_PAGE == 0
    assert int8.packed_weight.data_ptr() % 4096 == 0
    assert _anon_huge_kib() - before >= 8 * 1024, "the packed weights are not on 2 MiB pages"
    monkeypatch.setenv("BACKPLANE_CPU_WEIGHT_HUGE_PAGES", "0")
    plain = BlockedBf16Linear(weight, None, float_output=False)
    assert torch.equal(plain.packed_weight, bf16.packed_weight)
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    assert torch.equal(plain(x), bf16(x))
