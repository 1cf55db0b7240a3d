"""Gateway-side approximation of each replica's prefix cache: block hashes with LRU eviction.

Each replica holds at most `capacity_blocks` block hashes (about its KV cache size in
prompt blocks); the oldest are forgotten first, as vLLM evicts free cached blocks LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    """Which replicas probably hold which prompt-prefix blocks in their KV cache."""

    __slots__ = ("_capacity", "_default_capacity", "_lru", "_owners")

    def __init__(self, default_capacity_blocks: int = 16384) -> None:
        self._default_capacity = default_capacity_blocks
        self._capacity: dict[str, int] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._owners: dict[int, set[str]] = {}

    def set_capacity(self, replica: str, blocks: int) -> None:
        """Size a replica's share of the index (e.g. from its scraped KV capacity)."""
        self._capacity[replica] = max(1, blocks)
        self._evict(replica)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each replica, how many leading blocks of `hashes` it holds (replicas with 0 left out)."""
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            owners = self._owners.get(h)
            if not owners:
                break
            alive = set(owners) if alive is None else alive & owners
            if not alive:
                break
            for r in alive:
                result[r] = i + 1
        return result

    def insert(self, replica: str, hashes: Sequence[int]) -> None:
        """Record that `replica` now caches these blocks (most recently used)."""
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._lru[replica] = OrderedDict()
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                owners = self._owners.get(h)
                if owners is None:
                    self._owners[h] = {replica}
                else:
                    owners.add(replica)
        self._evict(replica)

    def forget(self, replica: str) -> None:
        """Drop everything a replica held (it restarted or left the pool)."""
        for h in self._lru.pop(replica, OrderedDict()):
            self._discard(h, replica)

    def size(self, replica: str) -> int:
        lru = self._lru.get(replica)
        return len(lru) if lru else 0

    def _evict(self, replica: str) -> None:
        lru = self._lru.get(replica)
        if not lru:
            return
        cap = self._capacity.get(replica, self._default_capacity)
        while len(lru) > cap:
            h, _ = lru.popitem(last=False)
            self._discard(h, replica)

    def _discard(self, h: int, replica: str) -> None:
        owners = self._owners.get(h)
        if owners is not None:
            owners.discard(replica)
            if not owners:
                del self._owners[h]
