"""Pick the best-scored replica; ties go round-robin so equal replicas share the load."""

from __future__ import annotations

import math

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class MaxScorePicker:
    """Highest total score wins; among equals, rotate using the pool's round-robin counter."""

    name = "max-score"

    def pick(self, ctx: RoutingContext, candidates: list[ReplicaState], scores: list[float]) -> ReplicaState:
        if len(scores) == 2:
            # two replicas (a small pool): the same test as below without the list work. max() keeps the
            # first of equals, so the second wins only when strictly higher, and alone when the first is
            # below its score by more than the tie margin; otherwise the tie rotation below decides
            a, b = scores
            if b > a:
                if a < b - 1e-9:
                    return candidates[1]
            elif b < a - 1e-9:
                return candidates[0]
        best = max(scores)
        floor = best - 1e-9
        # usually one clear winner: the runner-up (the best of the rest, in C) is below the tie margin
        i = scores.index(best)
        rest = scores.copy()
        rest[i] = -math.inf
        if max(rest) < floor:
            return candidates[i]
        tied = [c for c, s in zip(candidates, scores, strict=True) if s >= floor]
        if len(tied) == 1:
            return tied[0]
        key = tied[0].pool
        n = ctx.state.round_robin.get(key, 0)
        ctx.state.round_robin[key] = n + 1
        return tied[n % len(tied)]
