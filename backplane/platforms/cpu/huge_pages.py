"""Host tensors backed by 2 MiB pages where the kernel allows it: the KV cache and
packed weights.

The KV cache is read a block at a time at scattered places (a request's
blocks are wherever the pool had room), so with 4 KiB pages nearly every
block read misses the TLB. Measured with cpu_paged on one layer (64 decode
requests x 448 tokens, bf16, one thread, a 188 MiB cache with a shuffled
block table): 6.9-7.6 ms per call on 4 KiB pages, 4.6-5.7 ms on 2 MiB pages.

Packed linear weights go there too (`weight_buffer`). A decode step streams
every weight once, crossing a 4 KiB page every 64 cache lines (a TLB miss each,
and the hardware prefetchers do not cross page boundaries): the qwen2-0.5b
shape's 97 GEMVs over 988 MB, the same weights on 2 MiB pages and on 4 KiB
pages alternated in one process (2-core Zen 4), ran at 33.6 / 32.3 / 31.7 GB/s
against 31.1 / 27.7 / 28.0. Weights smaller than four huge pages share 8 MiB
chunks, so that a 1.6 MiB projection does not hold a 2 MiB page of its own.

Linux's default transparent-huge-page mode ("madvise") only gives huge pages
to memory that asks before it is first touched, so the cache is a fresh
anonymous mapping, advised MADV_HUGEPAGE, aligned to 2 MiB. Anonymous memory
starts zeroed, and pages that are never written are never made resident.
Elsewhere (no madvise, THP off) this is an ordinary zeroed tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import threading

import torch

from backplane.plugins_sdk import AttentionBackend

HUGE_PAGE = 2 << 20
# Below this a tensor spans too few pages for huge pages to matter.
_MIN_BYTES = 4 * HUGE_PAGE
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)`` on the CPU, in 2 MiB pages when possible."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MIN_BYTES or _ADVICE is None:
        return torch.zeros(shape, dtype=dtype)
    return _huge_mapping(nbytes)[:nbytes].view(dtype).view(shape)


# Smaller weights are cut from chunks of this size. A chunk's untouched pages are never
# made resident, so a part-used chunk costs at most the huge page it stops in; the
# current chunk outlives the weights in it (at most 8 MiB, for the process).
_CHUNK_BYTES = _MIN_BYTES
_WEIGHT_ALIGN = 4096
_chunk: torch.Tensor | None = None  # the current chunk (uint8), None before the first
_chunk_used = 0
_chunk_lock = threading.Lock()


def _huge_mapping(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of at least ``nbytes``, starting on a 2 MiB boundary of an
    anonymous mapping advised MADV_HUGEPAGE."""
    # One spare huge page so that an aligned start fits inside the mapping.
    # Private: a shared anonymous mapping is shmem, which THP leaves alone by default.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(_ADVICE)
    except OSError:  # THP compiled out or refused: ordinary pages, still zeroed
        pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps ``mapping`` alive
    offset = -raw.data_ptr() % HUGE_PAGE
    return raw[offset:]


def weight_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor for packed weights, on 2 MiB pages where the
    kernel allows it: four huge pages or more in a mapping of its own, smaller ones
    cut from shared chunks (4 KiB aligned). Elsewhere, and with
    BACKPLANE_CPU_WEIGHT_HUGE_PAGES=0, ``torch.zeros``."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _ADVICE is None or os.environ.get("BACKPLANE_CPU_WEIGHT_HUGE_PAGES", "1") == "0":
        return torch.zeros(shape, dtype=dtype)
    if nbytes >= _MIN_BYTES:
        return _huge_mapping(nbytes)[:nbytes].view(dtype).view(shape)
    global _chunk, _chunk_used
    with _chunk_lock:
        start = -(-_chunk_used // _WEIGHT_ALIGN) * _WEIGHT_ALIGN
        if _chunk is None or start + nbytes > _CHUNK_BYTES:
            _chunk, start = _huge_mapping(_CHUNK_BYTES)[:_CHUNK_BYTES], 0
        _chunk_used = start + nbytes
        return _chunk[start:start + nbytes].view(dtype).view(shape)


def weights_on_huge_pages(weights: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``weights`` (a CPU tensor) in a `weight_buffer`."""
    out = weight_buffer(tuple(weights.shape), weights.dtype)
    out.copy_(weights)
    return out


class HeadMajorCpuCache(AttentionBackend):
    """Cache shape and memory shared by the CPU backends (each fixes its own block layout).

    ``[2, kv_heads, num_blocks, block_size, head_size]``: one request's blocks of
    one KV head are in one plane, which both backends read a block at a time;
    the memory is on 2 MiB pages (see the module docstring).
    """

    @classmethod
    def kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_kv_heads, num_blocks, block_size, head_size)

    @classmethod
    def allocate_kv_cache(cls, shape, dtype, device):
        return zeros_on_huge_pages(shape, dtype)
