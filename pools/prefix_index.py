"""Gateway-side approximation of each replica's prefix cache: block hashes with LRU eviction.

Each replica holds at most `capacity_blocks` block hashes (about its KV cache size in
prompt blocks); the oldest are forgotten first, as vLLM evicts free cached blocks LRU.

Which replicas hold a hash is one integer bitmask (a bit per replica), not a set of names: a
match intersects them with `&` and an insert or eviction sets or clears one bit, so a routing
decision does no set allocation or string hashing per block and the index stays compact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

_NAMES_MEMO_MAX = 8192  # bitmask -> replica names cache entries (cleared when full)


class PrefixIndex:
    """Which replicas probably hold which prompt-prefix blocks in their KV cache."""

    __slots__ = ("_bit", "_capacity", "_default_capacity", "_free_bits", "_lru", "_names", "_owners", "_replica_of_bit")

    def __init__(self, default_capacity_blocks: int = 16384) -> None:
        self._default_capacity = default_capacity_blocks
        self._capacity: dict[str, int] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._owners: dict[int, int] = {}  # block hash -> bitmask of the replicas holding it
        self._bit: dict[str, int] = {}  # replica -> its bit (a power of two)
        self._replica_of_bit: list[str] = []  # bit position -> replica ("" when free)
        self._free_bits: list[int] = []  # positions of forgotten replicas, reused first
        self._names: dict[int, tuple[str, ...]] = {}  # bitmask -> replicas (memo)

    def set_capacity(self, replica: str, blocks: int) -> None:
        """Size a replica's share of the index (e.g. from its scraped KV capacity)."""
        self._capacity[replica] = max(1, blocks)
        self._evict(replica)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each replica, how many leading blocks of `hashes` it holds (replicas with 0 left out)."""
        return self._match(hashes, None)

    def match_mapped(self, hashes: Sequence[int], value_of: Sequence[int]) -> dict[str, int]:
        """As `match`, but each count k is reported as `value_of[k]` (e.g. blocks covered by k samples)."""
        return self._match(hashes, value_of)

    def _match(self, hashes: Sequence[int], value_of: Sequence[int] | None) -> dict[str, int]:
        # a replica drops out of the running intersection at the first position it does not hold;
        # it is recorded once, there (with every replica dropping out at that position at once)
        owners_of = self._owners
        result: dict[str, int] = {}
        n = len(hashes)
        alive = owners_of.get(hashes[0], 0) if n else 0
        if not alive:
            return result
        # (names are stored one by one: for the few replicas that drop out at a position that costs half
        # of building a dict with fromkeys and merging it)
        for i in range(1, n):
            kept = alive & owners_of.get(hashes[i], 0)
            if kept != alive:
                v = i if value_of is None else value_of[i]
                for name in self._names_of(alive ^ kept):
                    result[name] = v
                if not kept:
                    return result
                alive = kept
        v = n if value_of is None else value_of[n]
        for name in self._names_of(alive):
            result[name] = v
        return result

    def insert(self, replica: str, hashes: Iterable[int]) -> None:
        """Record that `replica` now caches these blocks (most recently used)."""
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._lru[replica] = OrderedDict()
        bit = self._bit.get(replica) or self._assign_bit(replica)
        owners_of = self._owners
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                owners_of[h] = owners_of.get(h, 0) | bit
        if len(lru) > self._capacity.get(replica, self._default_capacity):
            self._evict(replica)

    def forget(self, replica: str) -> None:
        """Drop everything a replica held (it restarted or left the pool)."""
        lru = self._lru.pop(replica, None)
        bit = self._bit.pop(replica, 0)
        if not bit:
            return
        clear = ~bit
        owners_of = self._owners
        for h in lru or ():
            m = owners_of.get(h)
            if m is not None:
                m &= clear
                if m:
                    owners_of[h] = m
                else:
                    del owners_of[h]
        pos = bit.bit_length() - 1
        self._replica_of_bit[pos] = ""
        self._free_bits.append(pos)
        self._names.clear()  # memoised names may include the freed bit

    def size(self, replica: str) -> int:
        lru = self._lru.get(replica)
        return len(lru) if lru else 0

    def _evict(self, replica: str) -> None:
        lru = self._lru.get(replica)
        if not lru:
            return
        cap = self._capacity.get(replica, self._default_capacity)
        if len(lru) <= cap:
            return
        clear = ~self._bit[replica]
        owners_of = self._owners
        pop = lru.popitem
        for _ in range(len(lru) - cap):
            h = pop(False)[0]
            m = owners_of[h] & clear  # every hash in a replica's LRU has that replica's bit set
            if m:
                owners_of[h] = m
            else:
                del owners_of[h]

    def _assign_bit(self, replica: str) -> int:
        if self._free_bits:
            pos = self._free_bits.pop()
            self._replica_of_bit[pos] = replica
        else:
            pos = len(self._replica_of_bit)
            self._replica_of_bit.append(replica)
        bit = self._bit[replica] = 1 << pos
        return bit

    def _names_of(self, mask: int) -> tuple[str, ...]:
        """The replicas whose bits are set in `mask`."""
        names = self._names.get(mask)
        if names is None:
            of_bit = self._replica_of_bit
            out = []
            m = mask
            while m:
                low = m & -m
                out.append(of_bit[low.bit_length() - 1])
                m ^= low
            names = tuple(out)
            if len(self._names) >= _NAMES_MEMO_MAX:
                self._names.clear()
            self._names[mask] = names
        return names
