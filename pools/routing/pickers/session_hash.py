"""Sticky placement: the same workflow or session always lands on the same healthy replica."""

from __future__ import annotations

import xxhash

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


def session_key(ctx: RoutingContext) -> str:
    """Session id, else workflow id (tagged or linked by the predictor), else '' (no affinity)."""
    return ctx.tags.session or ctx.tags.workflow or ctx.prediction.workflow


class SessionHashPicker:
    """Rendezvous (highest-random-weight) hashing on the session key.

    Like production-stack's session router it keeps a key on one replica; unlike a
    modulo ring, removing an unhealthy replica only moves the keys that lived on it,
    and they come back when it returns. Calls without a key fall back to the best score.
    """

    name = "session-hash"

    def pick(self, ctx: RoutingContext, candidates: list[ReplicaState], scores: list[float]) -> ReplicaState:
        key = session_key(ctx)
        if not key:
            best = max(scores)
            return candidates[scores.index(best)]
        kb = key.encode()
        return max(candidates, key=lambda r: xxhash.xxh3_64_intdigest(kb, seed=_url_seed(r.url)))


_SEEDS: dict[str, int] = {}


def _url_seed(url: str) -> int:
    seed = _SEEDS.get(url)
    if seed is None:
        seed = _SEEDS[url] = xxhash.xxh3_64_intdigest(url.encode())
    return seed
