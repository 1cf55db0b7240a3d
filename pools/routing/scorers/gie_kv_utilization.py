"""llm-d / Gateway API Inference Extension `kv-cache-utilization-scorer`.

Follows kubernetes-sigs/gateway-api-inference-extension
pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go: score = 1 - KVCacheUsagePercent
(scraped `vllm:kv_cache_usage_perc`).
"""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class GieKvUtilizationScorer:
    """Less KV cache in use (as last scraped) scores higher."""

    name = "kv-cache-utilization-scorer"

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        return [1.0 - min(1.0, max(0.0, r.kv_usage)) for r in candidates]
