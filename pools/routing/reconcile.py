"""Keep the gateway's prefix index honest (Pythia mechanism 3): size it from KV capacity, correct it
from the hit rate each replica reports (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`)."""

from __future__ import annotations

from pools.prefix_hash import DEFAULT_BLOCK_CHARS, MAX_BLOCKS
from pools.request_features import BYTES_PER_TOKEN
from pools.routing.base import RoutingContext, RoutingState
from pools.routing.sampling import ENTRIES_PER_BLOCK, FULL_MATCH_BLOCKS
from pools.types import ReplicaState

TOKENS_PER_BLOCK = DEFAULT_BLOCK_CHARS // BYTES_PER_TOKEN
MIN_QUERY_TOKENS = 4096.0  # fewer prompt tokens since the last reconcile: too little evidence


def kv_sized_share(replica: ReplicaState) -> int:
    """Index entries matching the replica's KV cache (0 while its capacity is unknown)."""
    if replica.kv_capacity_tokens <= 0:
        return 0
    return max(1, int(replica.kv_capacity_tokens // TOKENS_PER_BLOCK * ENTRIES_PER_BLOCK))


def index_share_ratio(state: RoutingState, replica: ReplicaState) -> float | None:
    """The replica's current index share over its KV-sized share (None until both are known)."""
    base = kv_sized_share(replica)
    share = state.index_capacity.get(replica.url)
    return share / base if base and share else None


def size_from_capacity(state: RoutingState, replica: ReplicaState) -> None:
    """Give the replica an index share matching its KV cache (in sampled entries), once its capacity is known."""
    if replica.kv_capacity_tokens > 0 and replica.url not in state.sized_replicas:
        state.sized_replicas.add(replica.url)
        entries = kv_sized_share(replica)
        state.index_capacity[replica.url] = entries
        state.prefix_index.set_capacity(replica.url, entries)


def record_prediction(ctx: RoutingContext, chosen: ReplicaState) -> None:
    """After a pick: remember how many prompt tokens the index expected to hit on the chosen replica."""
    state = ctx.state
    url = chosen.url
    if chosen.kv_capacity_tokens > 0 and url not in state.sized_replicas:  # size_from_capacity's own test
        size_from_capacity(state, chosen)
    f = ctx.features
    prompt = f.prompt_tokens
    matched = ctx.prefix_match  # ctx.matched_blocks(), usually already worked out by the filter or scorer
    hit_blocks = (ctx.matched_blocks() if matched is None else matched).get(url, 0)
    hit = hit_blocks * TOKENS_PER_BLOCK
    if hit > prompt:
        hit = prompt
    wf = ctx.prediction.workflow or ctx.tags.workflow  # workflow_id(ctx), inline: every call asks
    hashes = f.prefix_hashes
    if wf and hashes:
        tip = state.workflow_tip.get(wf)
        # The index holds prompts only, but an engine also caches the tokens it generated: a call that
        # continues its workflow's previous call on the same replica (its prompt extends that call's
        # prompt, which the index still holds) hits the previous answer too, up to where it ends here.
        # Without this credit the hit rate the replicas report exceeds the prediction for every
        # conversation, and reconciliation would grow the index past what the engines hold.
        if tip is not None and tip[0] == url:
            n = tip[1]
            if (
                n <= len(hashes)
                and hashes[n - 1] == tip[2]
                and hit_blocks >= FULL_MATCH_BLOCKS[n if n < MAX_BLOCKS else MAX_BLOCKS]  # full_match_blocks(n)
            ):
                # and the index, which samples block positions, under-reports that previous prompt:
                # hit = min(prompt, max(hit, n * TOKENS_PER_BLOCK, f.reply_end_tokens)), without the calls
                prev = n * TOKENS_PER_BLOCK
                if prev > hit:
                    hit = prev
                if f.reply_end_tokens > hit:
                    hit = f.reply_end_tokens
                if hit > prompt:
                    hit = prompt
        state.workflow_tip[wf] = (url, len(hashes), hashes[-1])
    predicted, routed = state.predicted_hit_tokens, state.routed_prompt_tokens
    predicted[url] = predicted.get(url, 0.0) + hit
    routed[url] = routed.get(url, 0.0) + prompt


def reconcile_prefix_index(
    state: RoutingState, replica: ReplicaState, query_tokens: float, hit_tokens: float
) -> int | None:
    """Correct one replica's index share from the scraped counters' increase since the last call.

    `query_tokens`/`hit_tokens`: increase of `vllm:prefix_cache_queries`/`_hits` since the previous
    reconcile. Once the engine's cache has filled (it evicts), when the replica hits much less than the
    index predicted, the index remembers blocks vLLM already evicted: shrink its share (at most halve
    it); when it hits more and the share is full, grow it (up to twice the KV capacity). Returns the
    share in index entries, or None when there was too little traffic.
    """
    url = replica.url
    routed = state.routed_prompt_tokens.get(url, 0.0)
    if query_tokens < MIN_QUERY_TOKENS or routed < MIN_QUERY_TOKENS:
        return None
    predicted = state.predicted_hit_tokens.get(url, 0.0) / routed
    observed = hit_tokens / query_tokens
    state.predicted_hit_tokens[url] = 0.0
    state.routed_prompt_tokens[url] = 0.0
    base = kv_sized_share(replica)
    current = state.index_capacity.get(url) or base or 16384
    # Until the engine has computed a KV cache's worth of prompt tokens it has evicted nothing, so a
    # gap between predicted and observed hits says nothing about the index's size (block alignment,
    # prompts the index never saw): leave the share as sized.
    computed = replica.prefix_cache_queries - replica.prefix_cache_hits
    if replica.kv_capacity_tokens > 0 and computed < replica.kv_capacity_tokens:
        return current
    ratio = (observed + 0.02) / (predicted + 0.02)
    # growing a share the index has not filled changes nothing now and keeps stale blocks later
    if 0.8 <= ratio <= 1.25 or (ratio > 1.25 and state.prefix_index.size(url) < 0.9 * current):
        return current
    new = int(current * min(1.5, max(0.5, ratio)))
    # within a factor of 2 above and 4 below the share sized from KV capacity: the range of what the
    # sizing's average can get wrong (never a fixed floor, which for a small cache would be a multiple of it)
    lower, upper = (max(1, base // 4), 2 * base) if base else (64, 4 * current)
    new = max(lower, min(new, upper))
    state.index_capacity[url] = new
    state.prefix_index.set_capacity(url, new)
    return new


def after_scrape(state: RoutingState, replica: ReplicaState, capacity_changed: bool, reconcile: bool) -> None:
    """What one scrape of a replica's engine metrics means for the prefix index.

    Shared by the live gateway's scraper and the virtual-time harness: re-size the replica's
    index share when its KV capacity changed, forget it when its prefix counters went back (the
    engine restarted with an empty cache), and, with `reconcile`, correct the share from the
    scraped hit counters.
    """
    url = replica.url
    if capacity_changed:
        state.sized_replicas.discard(url)
        size_from_capacity(state, replica)
    last = state.scraped_queries.get(url, 0.0)
    state.scraped_queries[url] = replica.prefix_cache_queries
    if replica.prefix_cache_queries < last:
        state.prefix_index.forget(url)
        state.reconciled_counters[url] = (replica.prefix_cache_queries, replica.prefix_cache_hits)
        return
    if not reconcile:
        return
    q0, h0 = state.reconciled_counters.get(url, (0.0, 0.0))
    if reconcile_prefix_index(state, replica, replica.prefix_cache_queries - q0, replica.prefix_cache_hits - h0) is not None:
        state.reconciled_counters[url] = (replica.prefix_cache_queries, replica.prefix_cache_hits)
