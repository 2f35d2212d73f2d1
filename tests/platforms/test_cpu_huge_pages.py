"""KV cache memory of the CPU backends: zeroed, on 2 MiB pages where the kernel allows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend
from backplane.platforms.cpu.huge_pages import HUGE_PAGE, zeros_on_huge_pages
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
