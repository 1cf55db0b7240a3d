"""SGLang router's `cache_aware` policy as a picker (the whole decision, scores unused).

Follows the router the `sglang-router` package ships (SGLang Model Gateway, `smg`; code in
lightseekorg/smg model_gateway/src/policies/cache_aware.rs, `select_worker` and
`select_worker_with_text`, and crates/kv_index/src/string_tree.rs, `match_prefix_with_counts`):

* load = the router's own count of outstanding requests per worker; the system is *imbalanced* when
  `max - min > balance_abs_threshold` and `max > min * balance_rel_threshold`: then the least loaded
  worker wins (and the tree still records the request there);
* otherwise the approximate radix tree of past requests (characters of the messages) gives the
  longest prefix match: when matched/prompt characters > `cache_threshold` the matching worker wins,
  else the least loaded worker (older sgl-router releases took the worker with the smallest tree
  here; measured live against the package, that variant was 3-7% slower than the real router on the
  same work, this one within 1%: docs/benchmarks.md, "Live, against the real routers");
* which worker "the matching worker" is when several share the matched prefix (a system prompt every
  workflow of an app starts with): the tree's walk goes one node further on a partial match, into the
  child picked by the request's next character, and takes the tenant cached on that node, so the pick
  among workers sharing the prefix depends on the request's own text, not on worker order;
* the chosen worker's tree takes the request text; trees are LRU-trimmed to `max_tree_size`.

Defaults are the router's launch defaults (`python -m sglang_router.launch_router --help`, 0.3.2):
cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5, max_tree_size 2**26
characters. The tree is approximated here by chained 256-character block hashes (pools.prefix_hash)
in an LRU index per worker: a match is counted in whole blocks, not characters.
"""

from __future__ import annotations

from pools.prefix_hash import DEFAULT_BLOCK_CHARS
from pools.request_features import BYTES_PER_TOKEN
from pools.routing.base import RoutingContext
from pools.types import ReplicaState

INDEX_NAME = "sglang-approx-tree"


class CacheAwarePicker:
    """SGLang's cache-aware load balancing: prefix tree when balanced and matching, else least loaded."""

    name = "cache-aware"

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        max_tree_size_chars: int = 2**26,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.capacity_blocks = max(1, max_tree_size_chars // DEFAULT_BLOCK_CHARS)

    def pick(self, ctx: RoutingContext, candidates: list[ReplicaState], scores: list[float]) -> ReplicaState:
        tree = ctx.state.index(INDEX_NAME, self.capacity_blocks)
        hashes = ctx.features.prefix_hashes
        loads = [r.inflight for r in candidates]
        hi, lo = max(loads), min(loads)
        least_loaded = candidates[loads.index(lo)]
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            chosen = least_loaded
        else:
            chosen = self._cache_choice(ctx, candidates, tree.match(hashes) if hashes else {}) or least_loaded
        if hashes:
            tree.insert(chosen.url, hashes)
        return chosen

    def _cache_choice(
        self, ctx: RoutingContext, candidates: list[ReplicaState], matched: dict[str, int]
    ) -> ReplicaState | None:
        """The worker holding the longest match, when it covers more than `cache_threshold` of the prompt."""
        text_chars = ctx.features.prompt_tokens * BYTES_PER_TOKEN
        if matched and text_chars > 0:
            longest = max(matched.get(r.url, 0) for r in candidates)
            if longest * DEFAULT_BLOCK_CHARS / text_chars > self.cache_threshold:
                tied = [r for r in candidates if matched.get(r.url, 0) == longest]
                hashes = ctx.features.prefix_hashes
                # the block after the shared prefix stands for the request's next characters
                return tied[hashes[min(longest, len(hashes) - 1)] % len(tied)] if len(tied) > 1 else tied[0]
        return None
