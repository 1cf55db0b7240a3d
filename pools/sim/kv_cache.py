"""KV blocks, prefix caching and LRU eviction, after vLLM V1's BlockPool and KVCacheManager.

Blocks hold `block_size` tokens. A full block gets a hash chained over the request's tokens and
stays in the cache after its request frees it, until the allocator needs a free block: free
blocks form a queue, freed blocks go to its tail (a request's last blocks first, so they are
evicted first), allocation takes from its head (least recently used) and evicts its hash.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class PrefixCacheStats:
    """Token counts of prefix-cache lookups (vLLM's prefix_cache_queries / _hits)."""

    queries: int = 0
    hits: int = 0


class BlockPool:
    """A fixed number of KV blocks with ref counts, a hash -> block map and an LRU free queue."""

    __slots__ = ("_free", "block_hash", "cached", "num_blocks", "ref_cnt")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}
        # OrderedDict as a doubly linked list: O(1) popleft, append and removal from the middle
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks with no user (cached or empty): what an allocation may take."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use by requests (vllm:kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0

    def lookup(self, h: int) -> int | None:
        """The cached block holding hash `h`, if any."""
        return self.cached.get(h)

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the eviction queue."""
        free = self._free
        ref = self.ref_cnt
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the head of the free queue, evicting whatever they cached."""
        free = self._free
        ref = self.ref_cnt
        bh = self.block_hash
        out: list[int] = []
        for _ in range(n):
            b, _none = free.popitem(last=False)
            h = bh[b]
            if h is not None:
                bh[b] = None
                if self.cached.get(h) == b:
                    del self.cached[h]
            ref[b] = 1
            out.append(b)
        return out

    def cache_block(self, b: int, h: int) -> None:
        """Record that block b holds the tokens whose chained hash is h."""
        if self.block_hash[b] is None and h not in self.cached:
            self.block_hash[b] = h
            self.cached[h] = b

    def free(self, blocks: list[int]) -> None:
        """Drop one reference on each block, last block first; unused ones join the free queue tail."""
        free = self._free
        ref = self.ref_cnt
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
