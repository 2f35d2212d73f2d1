"""How many KV blocks an engine gets, from explicit settings or the platform's memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVBlockLayout:
    """What one KV block holds across all layers, for sizing the pool in bytes."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_size * element


def determine_num_blocks(
    shape: KVBlockLayout,
    *,
    num_kv_blocks: int | None,
    kv_cache_memory_bytes: int | None,
    memory_utilization: float,
    available_memory: int,
    max_model_len: int,
    max_num_seqs: int,
) -> int:
    """Number of KV blocks; raises ValueError when one max_model_len request cannot fit.

    Precedence: ``num_kv_blocks`` > ``kv_cache_memory_bytes`` >
    ``memory_utilization * available_memory``. Memory-derived counts are capped at
    what ``max_num_seqs`` full-length requests can use, since more blocks would
    only sit idle.
    """
    per_seq = -(-max_model_len // shape.block_size)
    if num_kv_blocks is not None:
        num_blocks, source = num_kv_blocks, f"num_kv_blocks={num_kv_blocks}"
    else:
        if kv_cache_memory_bytes is not None:
            budget, source = kv_cache_memory_bytes, f"kv_cache_memory_bytes={kv_cache_memory_bytes}"
        else:
            budget = int(available_memory * memory_utilization)
            source = (
                f"memory_utilization={memory_utilization} of {available_memory / 2**30:.2f} GiB "
                "available"
            )
        num_blocks = min(budget // shape.bytes_per_block, per_seq * max_num_seqs)
    if num_blocks < per_seq:
        raise ValueError(
            f"KV cache too small: {source} gives {num_blocks} blocks of {shape.block_size} tokens "
            f"({shape.bytes_per_block} bytes each), but one request of max_model_len "
            f"({max_model_len}) needs {per_seq} blocks; increase the KV cache size "
            "(num_kv_blocks, kv_cache_memory_bytes or memory_utilization) or lower max_model_len"
        )
    return num_blocks
