"""llm-d / Gateway API Inference Extension `prefix-cache-scorer` (estimate mode).

Follows kubernetes-sigs/gateway-api-inference-extension
pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go: the prompt is cut into chained
hashed blocks, an LRU indexer per server remembers which blocks were *sent* there
(`PreRequest` adds the request's hashes to the picked server), and the score is
matched leading blocks / request blocks. Defaults there: 64-character blocks, 256 blocks
matched at most, 31250 entries per server. Our hashes are 256-character blocks
(pools.prefix_hash), so the same character budget per server is 31250 * 64 / 256 blocks.
"""

from __future__ import annotations

from pools.prefix_hash import DEFAULT_BLOCK_CHARS
from pools.routing.base import RoutingContext
from pools.types import ReplicaState

GIE_HASH_BLOCK_CHARS = 64
GIE_MAX_PREFIX_BLOCKS = 256
GIE_LRU_CAPACITY_PER_SERVER = 31250
INDEX_NAME = "gie-prefix-cache"


class GiePrefixCacheScorer:
    """Score = leading blocks the server was sent before / blocks of this prompt; records the pick."""

    name = "prefix-cache-scorer"

    def __init__(self) -> None:
        self.capacity_blocks = GIE_LRU_CAPACITY_PER_SERVER * GIE_HASH_BLOCK_CHARS // DEFAULT_BLOCK_CHARS
        self.max_blocks = GIE_MAX_PREFIX_BLOCKS * GIE_HASH_BLOCK_CHARS // DEFAULT_BLOCK_CHARS

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        hashes = ctx.features.prefix_hashes[: self.max_blocks]
        if not hashes:
            return [0.0] * len(candidates)
        matched = ctx.state.index(INDEX_NAME, self.capacity_blocks).match(hashes)
        total = len(hashes)
        return [matched.get(r.url, 0) / total for r in candidates]

    def record(self, ctx: RoutingContext, chosen: ReplicaState) -> None:
        """GIE's PreRequest: the picked server now (probably) caches this prompt's blocks."""
        hashes = ctx.features.prefix_hashes[: self.max_blocks]
        if hashes:
            ctx.state.index(INDEX_NAME, self.capacity_blocks).insert(chosen.url, hashes)
