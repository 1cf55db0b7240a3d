"""Prefer the replica with the most KV headroom expected after this call (Pythia mechanism 2)."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.routing.kv import call_kv_expected, expected_used
from pools.types import ReplicaState


class KvHeadroomScorer:
    """Fraction of the KV cache still free once running calls and this one reach their expected length.

    Unlike llm-d's kv-cache-utilization scorer (the scrape, i.e. the past), this counts what calls
    already admitted *will* need, from the predictor's output lengths. Unknown capacity: 1 - usage.
    """

    name = "kv-headroom"

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        need = call_kv_expected(ctx)
        out: list[float] = []
        for r in candidates:
            cap = r.kv_capacity_tokens
            if cap <= 0:
                out.append(1.0 - r.kv_usage)
                continue
            free = (cap - expected_used(r) - need) / cap
            out.append(0.0 if free < 0.0 else (1.0 if free > 1.0 else free))
        return out
