"""Rotate through the candidates, ignoring scores (production-stack's round-robin router)."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class RoundRobinPicker:
    """Next replica in URL order per pool; follows vllm-project/production-stack `RoundRobinRouter`."""

    name = "round-robin"

    def pick(self, ctx: RoutingContext, candidates: list[ReplicaState], scores: list[float]) -> ReplicaState:
        key = candidates[0].pool
        n = ctx.state.round_robin.get(key, 0)
        ctx.state.round_robin[key] = n + 1
        return candidates[n % len(candidates)]
