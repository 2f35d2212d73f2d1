"""Per-request KV block bookkeeping on top of the BlockPool, with prefix caching."""

from __future__ import annotations

from dataclasses import dataclass

from backplane.core.kv.block_hash import extend_block_hashes
from backplane.core.kv.block_pool import BlockPool, KVBlock
from backplane.core.scheduler.request import Request


@dataclass
class PrefixCacheStats:
    """Counters in tokens: how many prompt tokens were looked up, how many were hits."""

    queries: int = 0
    hits: int = 0


class KVCacheManager:
    """Hands out KV slots to requests step by step and takes them back when they end.

    Every block a request holds is listed in ``req_blocks[request_id]`` in
    position order; ``free`` returns them all, so a request that ends in any way
    (finish, abort, preemption) leaves nothing behind.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a request that has no KV yet: (blocks, num_tokens).

        At least the last token is always left to compute, since its logits are
        needed to sample. Requests asking for prompt logprobs skip the cache:
        their every prompt position must go through the model.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return [], 0
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size,
            cache_salt=request.prefix_salt,
        )
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_computed_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        Args:
            num_computed_tokens: tokens already in the cache, including the prefix
                hit in ``new_computed_blocks``.
            new_computed_blocks: cached blocks found by `get_computed_blocks`, taken now.
            num_lookahead_tokens: slots reserved beyond those tokens (a draft model's
                proposals); they never count towards the prefix cache.

        Returns:
            Ids of the blocks newly added to the request (prefix hits first), or
            None when the pool has too few free blocks (nothing is changed then).
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        total_tokens = num_computed_tokens + num_new_tokens
        if not new_computed_blocks and total_tokens + num_lookahead_tokens <= (
                len(blocks) * self.block_size):
            # The common decode step: the request's last block still has room.
            if self.enable_prefix_caching:
                self._cache_full_blocks(request, blocks, total_tokens)
            return []
        new_computed_blocks = new_computed_blocks or []
        num_new_blocks = (
            self.blocks_needed(total_tokens + num_lookahead_tokens) - len(blocks)
            - len(new_computed_blocks)
        )
        # Prefix hits that are currently free leave the free queue when taken.
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - reclaimed:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        added = new_computed_blocks + self.pool.allocate(max(num_new_blocks, 0))
        blocks.extend(added)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, total_tokens)
        return [b.block_id for b in added]

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], total: int) -> None:
        # Only blocks whose tokens are all known get a hash: with async scheduling
        # ``total`` may count a token that is still being sampled.
        num_full = min(total, request.num_tokens) // self.block_size
        done = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size,
            cache_salt=request.prefix_salt,
        )
        for index in range(done, num_full):
            self.pool.cache_full_block(blocks[index], hashes[index])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Return every block of ``request`` to the pool (cached ones stay findable)."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
