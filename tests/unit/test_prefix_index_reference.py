"""The bitmask prefix index answers exactly as a plain set-per-hash LRU index would."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

import pytest

from pools.prefix_index import PrefixIndex
from pools.routing.routing_index import RoutingPrefixIndex
from pools.routing.sampling import BLOCKS_FOR


class ReferenceIndex:
    """The straightforward model: per replica an LRU of hashes, per hash a set of replicas."""

    def __init__(self, default_capacity: int) -> None:
        self.default = default_capacity
        self.capacity: dict[str, int] = {}
        self.lru: dict[str, OrderedDict[int, None]] = {}

    def set_capacity(self, replica: str, blocks: int) -> None:
        self.capacity[replica] = max(1, blocks)
        self._evict(replica)

    def insert(self, replica: str, hashes: Sequence[int]) -> None:
        lru = self.lru.setdefault(replica, OrderedDict())
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        self._evict(replica)

    def forget(self, replica: str) -> None:
        self.lru.pop(replica, None)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for r, lru in self.lru.items():
            n = 0
            while n < len(hashes) and hashes[n] in lru:
                n += 1
            if n:
                out[r] = n
        return out

    def _evict(self, replica: str) -> None:
        lru = self.lru.get(replica)
        cap = self.capacity.get(replica, self.default)
        while lru is not None and len(lru) > cap:
            lru.popitem(last=False)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cls", [PrefixIndex, RoutingPrefixIndex])
def test_bitmask_index_matches_the_reference_through_inserts_evictions_and_forgets(seed: int, cls: type) -> None:
    rng = random.Random(seed)
    ref, idx = ReferenceIndex(40), cls(40)
    replicas = [f"http://r{i}" for i in range(rng.choice((3, 9, 70)))]  # 70: masks wider than 64 bits
    # chained prompts share leading hashes, as block hashes of prompts sharing a prefix do
    chains = [tuple(range(k * 1000, k * 1000 + rng.randint(1, 30))) for k in range(12)]
    for step in range(600):
        op = rng.random()
        r = rng.choice(replicas)
        if op < 0.6:
            chain = rng.choice(chains)
            cut = chain[: rng.randint(1, len(chain))]
            ref.insert(r, cut)
            idx.insert(r, cut)
        elif op < 0.65:
            ref.forget(r)
            idx.forget(r)
        elif op < 0.7:
            cap = rng.randint(1, 60)
            ref.set_capacity(r, cap)
            idx.set_capacity(r, cap)
        probe = rng.choice(chains)[: rng.randint(1, 30)] + (rng.randrange(10**6),) * rng.randint(0, 1)
        assert idx.match(probe) == ref.match(probe), step
        assert all(idx.size(x) == len(ref.lru.get(x, ())) for x in replicas)
        # match_mapped reports each count through the mapping (the routing core's blocks-per-sample)
        assert idx.match_mapped(probe[:10], BLOCKS_FOR) == {u: BLOCKS_FOR[k] for u, k in ref.match(probe[:10]).items()}


def test_a_forgotten_replicas_bit_is_reused_without_leaking_its_old_name() -> None:
    idx = PrefixIndex()
    idx.insert("http://a", (1, 2, 3))
    idx.insert("http://b", (1, 2))
    assert idx.match((1, 2, 3)) == {"http://a": 3, "http://b": 2}
    idx.forget("http://a")
    idx.insert("http://c", (1, 2, 3, 4))  # takes the freed bit
    assert idx.match((1, 2, 3, 4)) == {"http://b": 2, "http://c": 4}
    assert idx.match(()) == {}
