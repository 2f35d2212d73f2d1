"""The pool of KV blocks: reference counts, an LRU free queue, and the prefix-cache index."""

from __future__ import annotations

from collections import OrderedDict


class KVBlock:
    """One block of KV slots. ``block_hash`` is set once the block is full and cached."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Owns every KV block.

    Free blocks (ref_cnt == 0) sit in an LRU queue; a free block may still hold
    a cached prefix and be found through ``cached``. Allocation takes the least
    recently freed block and, if it was cached, evicts it from the index then, so
    a cached block is evicted only when nothing references it and it is the
    oldest free one.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks ({num_blocks}) must be >= 1")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block; insertion order is the eviction order (oldest first).
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[KVBlock]:
        """Take ``count`` free blocks (caller checked there are enough)."""
        if count > len(self._free):
            raise RuntimeError(f"cannot allocate {count} blocks: only {len(self._free)} free")
        out = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference to cached blocks found by a prefix hit."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; unreferenced ones join the free queue tail.

        Callers pass a request's blocks in reverse so that its last blocks (the
        least shareable) are evicted before its prefix.
        """
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_block(self, block: KVBlock, block_hash: int) -> None:
        """Register a filled block under its chained hash (first writer wins)."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self.cached.get(block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
