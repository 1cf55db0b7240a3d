"""Prefer replicas that already hold the prompt's leading blocks (Pythia mechanism 3)."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


class PrefixAffinityScorer:
    """Matched leading blocks / prompt blocks, from the gateway's prefix index (`RoutingState.prefix_index`).

    The index's share per replica is sized from the scraped KV capacity and corrected from the scraped
    `vllm:prefix_cache_*` hit rate (`pools.routing.reconcile`), so it forgets roughly when vLLM evicts.
    """

    name = "prefix-affinity"

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        total = len(ctx.features.prefix_hashes)
        if total == 0:
            return [0.0] * len(candidates)
        matched = ctx.matched_blocks()
        if not matched:
            return [0.0] * len(candidates)
        return [matched.get(r.url, 0) / total for r in candidates]
