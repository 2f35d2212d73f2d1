"""Block pool and KV cache manager: reference counts, LRU eviction, chained prefix hashes."""

from __future__ import annotations

from backplane.core.kv.block_hash import ROOT_HASH, extend_block_hashes, hash_block
from backplane.core.kv.block_pool import BlockPool
from backplane.core.kv.kv_cache_manager import KVCacheManager
from backplane.core.scheduler.request import Request
from backplane.sampling_params import SamplingParams


def _request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8, **params), max_model_len=1024)


def test_hashes_are_chained_over_the_whole_prefix():
    a = extend_block_hashes([], list(range(8)), 4)
    b = extend_block_hashes([], [99, 1, 2, 3] + list(range(4, 8)), 4)
    assert len(a) == 2 and a[0] == hash_block(ROOT_HASH, [0, 1, 2, 3])
    # Same second block, different first block: the second hashes must differ.
    assert a[1] != b[1]
    assert extend_block_hashes(list(a), list(range(10)), 4) == a  # partial block: no new hash


def test_pool_refcounts_and_lru_eviction_order():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1 and all(b.ref_cnt == 1 for b in blocks)
    for i, block in enumerate(blocks):
        pool.cache_full_block(block, 1000 + i)
    pool.touch([blocks[0]])
    assert blocks[0].ref_cnt == 2
    pool.free(list(reversed(blocks)))  # blocks[0] still referenced once
    assert pool.num_free_blocks == 3 and blocks[0].ref_cnt == 1
    # Free order: untouched block 3, then blocks[2], blocks[1]; cached ones stay findable.
    assert pool.lookup(1001) is blocks[1]
    first = pool.allocate(1)[0]
    assert first.block_id == 3
    evicted = pool.allocate(1)[0]
    assert evicted is blocks[2] and pool.lookup(1002) is None  # evicted only when reused
    assert pool.lookup(1001) is blocks[1]


def test_prefix_hit_shares_blocks_and_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    tokens = list(range(12))
    first = _request("a", tokens)
    hits, n = kv.get_computed_blocks(first)
    assert hits == [] and n == 0
    assert kv.allocate_slots(first, 12, 0) is not None
    second = _request("b", tokens)
    hits, n = kv.get_computed_blocks(second)
    # 12 tokens = 3 full blocks, but the last token must be recomputed: 2 blocks hit.
    assert n == 8 and [b.block_id for b in hits] == [b.block_id for b in kv.req_blocks["a"][:2]]
    new_ids = kv.allocate_slots(second, 4, 8, hits)
    assert new_ids[:2] == [b.block_id for b in hits] and len(new_ids) == 3
    assert hits[0].ref_cnt == 2
    kv.free(first)
    kv.free(second)
    assert kv.num_free_blocks == 10
    assert kv.prefix_stats.hits == 8 and kv.prefix_stats.queries == 24


def test_prompt_logprob_requests_skip_the_cache_and_disabled_cache_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    req = _request("a", list(range(9)))
    kv.allocate_slots(req, 9, 0)
    assert kv.get_computed_blocks(_request("b", list(range(9)), prompt_logprobs=1)) == ([], 0)
    off = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    off.allocate_slots(_request("c", list(range(9))), 9, 0)
    assert off.get_computed_blocks(_request("d", list(range(9)))) == ([], 0)
    assert not off.pool.cached


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    big = _request("big", list(range(20)))
    assert kv.allocate_slots(big, 20, 0) is None
    assert kv.num_free_blocks == 3 and "big" not in kv.req_blocks
