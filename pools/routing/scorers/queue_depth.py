"""Prefer the replica with the least work queued or running."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class QueueDepthScorer:
    """1 for the emptiest candidate, 0 for the fullest, linear between (min-max, as llm-d does).

    Load is the gateway's own in-flight count combined with the engine's scraped
    `vllm:num_requests_waiting` (production-stack's least-loaded uses engine stats the same way).
    """

    name = "queue-depth"

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        loads = [max(r.inflight, r.num_running) + r.num_waiting for r in candidates]
        lo, hi = min(loads), max(loads)
        if hi == lo:
            return [1.0] * len(candidates)
        span = hi - lo
        return [(hi - x) / span for x in loads]
