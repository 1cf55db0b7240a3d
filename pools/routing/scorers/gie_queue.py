"""llm-d / Gateway API Inference Extension `queue-scorer`.

Follows kubernetes-sigs/gateway-api-inference-extension pkg/epp/scheduling/framework/plugins/scorer/queue.go:
min-max normalised *waiting* queue (`vllm:num_requests_waiting`): (max - q) / (max - min), and 1.0
for every endpoint when all queues are equal.
"""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class GieQueueScorer:
    """Shorter scraped waiting queue scores higher, min-max normalised over the candidates."""

    name = "queue-scorer"

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        qs = [r.num_waiting for r in candidates]
        lo, hi = min(qs), max(qs)
        if hi == lo:
            return [1.0] * len(candidates)
        span = hi - lo
        return [(hi - q) / span for q in qs]
