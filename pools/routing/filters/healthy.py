"""Keep replicas that pass health checks and were not already tried for this call."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class HealthyFilter:
    """Drops unhealthy replicas and those in `ctx.exclude` (a retry must go elsewhere)."""

    name = "healthy"

    def filter(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[ReplicaState]:
        exclude = ctx.exclude
        if not exclude:  # the usual first try: no URL to look up per replica
            return [r for r in candidates if r.healthy]
        return [r for r in candidates if r.healthy and r.url not in exclude]
