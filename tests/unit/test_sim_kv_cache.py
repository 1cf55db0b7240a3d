"""Block pool: ref counts, prefix-cache lookups and LRU eviction order, like vLLM V1's BlockPool."""

from __future__ import annotations

from pools.sim.kv_cache import BlockPool


def test_allocate_free_and_usage() -> None:
    pool = BlockPool(10)
    blocks = pool.allocate(4)
    assert pool.num_free == 6 and pool.usage() == 0.4
    pool.free(blocks)
    assert pool.num_free == 10 and pool.usage() == 0.0


def test_cached_free_blocks_survive_until_reused_tail_first() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache_block(a[0], 111)
    pool.cache_block(a[1], 222)
    pool.free(a)  # freed last-block-first: a[1] is evicted before a[0]
    assert pool.lookup(111) == a[0] and pool.lookup(222) == a[1]
    pool.allocate(2)  # the two never-used blocks
    pool.allocate(1)
    assert pool.lookup(222) is None and pool.lookup(111) == a[0]


def test_touch_takes_a_cached_block_out_of_the_eviction_queue() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache_block(b, 7)
    pool.free([b])
    pool.touch([b])
    assert pool.ref_cnt[b] == 1 and pool.num_free == 1
    pool.touch([b])  # a second request shares it
    pool.free([b])
    assert pool.num_free == 1  # still held by one request
    pool.free([b])
    assert pool.num_free == 2 and pool.lookup(7) == b


def test_a_hash_is_cached_once() -> None:
    pool = BlockPool(3)
    x, y = pool.allocate(2)
    pool.cache_block(x, 5)
    pool.cache_block(y, 5)  # same content computed twice: the first copy stays the cached one
    assert pool.lookup(5) == x and pool.block_hash[y] is None
