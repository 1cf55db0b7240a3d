"""`route()`: the one entry point of the routing core, called by the live gateway and the simulator."""

from __future__ import annotations

from pools.routing.base import Decision, Policy, RouteError, RoutingContext
from pools.routing.kv import cached_prompt_tokens, call_kv
from pools.types import ClusterView

NO_REPLICA_RETRY_AFTER_S = 1.0


def route(ctx: RoutingContext, view: ClusterView, policy: Policy) -> Decision:
    """Choose pool, replica and priority for one call. Pure apart from `ctx.state` bookkeeping."""
    pool = policy.pool_chooser(ctx, view)
    if isinstance(pool, RouteError):
        return Decision(error=pool, reason=pool.code)
    ctx.pool = pool
    candidates = pool.replicas
    for f in policy.filters:
        candidates = f.filter(ctx, candidates)
        if not candidates:
            if any(r.healthy for r in pool.replicas if r.url not in ctx.exclude):
                # healthy replicas exist but none may take more now: wait at the gateway, in priority order
                priority = policy.priority(ctx) if policy.priority is not None else ctx.features.priority
                return Decision(pool=pool.name, queue=True, priority=priority, reason=f"saturated:{f.name}")
            return Decision(
                pool=pool.name,
                error=RouteError(
                    503,
                    "no_healthy_replica",
                    f"No healthy replica in pool '{pool.name}' can take the request; retry shortly",
                    NO_REPLICA_RETRY_AFTER_S,
                ),
                reason="no-healthy-replica",
            )
    if len(candidates) == 1 or not policy.scorers:
        totals = [0.0] * len(candidates)
    else:
        scorers = policy.scorers
        scorer, weight = scorers[0]
        # 0.0 + weight * s is weight * s: the first scorer's list is the running total (no zeros list to add
        # to); a weight of 1.0 leaves it as the scorer returned it
        totals = scorer.score(ctx, candidates)
        if weight != 1.0:
            totals = [weight * s for s in totals]
        for scorer, weight in scorers[1:]:
            totals = [t + weight * s for t, s in zip(totals, scorer.score(ctx, candidates), strict=True)]
    chosen = candidates[0] if len(candidates) == 1 else policy.picker.pick(ctx, candidates, totals)
    if policy.uses_prefix_index and ctx.features.prefix_hashes:
        sampled = ctx.sampled  # usually worked out already, for the prefix match
        ctx.state.prefix_index.insert(chosen.url, ctx.sampled_hashes() if sampled is None else sampled)
    for hook in policy.after_pick:
        hook(ctx, chosen)
    priority = policy.priority(ctx) if policy.priority is not None else ctx.features.priority
    prewarm = policy.actions(ctx, view, chosen) if policy.actions is not None else ()
    cached = cached_prompt_tokens(ctx, chosen.url) if policy.reserve_uncached else 0
    kv_bound, kv_expected = call_kv(ctx)
    # positional (pool, replica, priority, error, queue, prewarm, reason, kv_reserve_tokens,
    # kv_expected_tokens): a keyword call to the dataclass's __init__ costs about twice as much, every call
    return Decision(
        pool.name, chosen.url, priority, None, False, prewarm, policy.picker.name, kv_bound - cached, kv_expected - cached
    )
