"""Keep replicas whose KV cache can take this call without a likely overflow (Pythia mechanism 2)."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.routing.kv import call_kv_bound, call_kv_expected, overflow_probability
from pools.types import ReplicaState


class KvCapacityFilter:
    """Drops replicas where the KV their running calls still need plus this call would overflow.

    Demand is `ReplicaState.reserved_kv_tokens` (running calls at their predicted output bound) and
    `reserved_kv_expected_tokens` (at their expected output), or the scraped usage if higher. A replica
    is eligible while P(overflow) < `max_overflow_probability`. An idle replica is always eligible, so a
    call larger than any cache still runs (the engine then handles it). When every replica is dropped,
    `route()` answers `Decision.queue=True`: the call waits in the gateway's admission queue.
    """

    name = "kv-capacity"

    def __init__(self, max_overflow_probability: float = 0.05) -> None:
        self.max_overflow_probability = max_overflow_probability

    def filter(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[ReplicaState]:
        exp, bound, limit = call_kv_expected(ctx), call_kv_bound(ctx), self.max_overflow_probability
        return [
            r
            for r in candidates
            if r.inflight == 0 or r.kv_capacity_tokens <= 0 or overflow_probability(r, exp, bound) < limit
        ]
