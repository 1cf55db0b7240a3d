"""Which context-length pool a call goes to."""

from __future__ import annotations

from pools.routing.base import RouteError, RoutingContext
from pools.types import ClusterView, PoolState


def serving_pools(ctx: RoutingContext, view: ClusterView) -> list[PoolState] | RouteError:
    """Pools that serve the requested model, smallest class first; 404 when none does."""
    pools = [p for p in view.pools if p.serves(ctx.features.model)]
    if not pools:
        return RouteError(404, "model_not_found", f"The model '{ctx.features.model}' does not exist")
    return pools


def smallest_fitting_pool(ctx: RoutingContext, view: ClusterView, need_tokens: int | None = None) -> PoolState | RouteError:
    """The smallest class whose context limit holds the prompt plus requested output.

    A call that no pool can hold is a 400 `context_length_exceeded`, as vLLM itself answers.
    """
    pools = serving_pools(ctx, view)
    if isinstance(pools, RouteError):
        return pools
    need = ctx.features.prompt_tokens + (ctx.features.max_tokens or 1) if need_tokens is None else need_tokens
    for p in pools:
        if p.max_context_tokens >= need:
            return p
    largest = pools[-1].max_context_tokens
    return RouteError(
        400,
        "context_length_exceeded",
        f"This model's maximum context length is {largest} tokens. However, you requested about {need} tokens "
        f"({ctx.features.prompt_tokens} in the messages, {ctx.features.max_tokens or 0} in the completion).",
    )


def workflow_id(ctx: RoutingContext) -> str:
    """The workflow this call belongs to: the predictor's (tagged or linked), else the tag, else ''."""
    return ctx.prediction.workflow or ctx.tags.workflow


def predicted_peak_pool(ctx: RoutingContext, view: ClusterView, spill_margin: float = 0.1) -> PoolState | RouteError:
    """Pythia mechanism 1: one pool for the workflow's whole life, sized by its *predicted peak* context.

    The first call of a workflow picks the smallest pool whose limit holds
    `Prediction.peak_context_tokens` (and this call), and the workflow is pinned there in
    `RoutingState.workflow_pool`, so its cache stays in one pool and long workflows never start in a
    short pool only to migrate (and re-prefill) later. Later calls go to the pinned pool while it can
    hold them; a call that outgrows it (the prediction was wrong) moves the workflow to the smallest
    pool that fits its new peak. Cold predictions fall back to the current call's size. A new workflow
    spills to a larger class when that class is less loaded by more than `spill_margin` (see
    `least_pressed`), so a pool class that the traffic does not need does not sit idle.
    """
    pools = serving_pools(ctx, view)
    if isinstance(pools, RouteError):
        return pools
    now_need = ctx.features.prompt_tokens + (ctx.features.max_tokens or 1)
    wf = workflow_id(ctx)
    state = ctx.state
    if wf:
        pinned = state.workflow_pool.get(wf)
        if pinned is not None:
            for p in pools:
                if p.name == pinned and p.max_context_tokens >= now_need:
                    return p
    peak = now_need if ctx.prediction.cold else max(now_need, ctx.prediction.peak_context_tokens)
    fitting = [p for p in pools if p.max_context_tokens >= peak]
    if not fitting:  # the predicted peak exceeds every pool: the largest that holds this call
        fitting = [p for p in pools if p.max_context_tokens >= now_need][-1:]
        if not fitting:
            return smallest_fitting_pool(ctx, view)
    chosen = fitting[0] if len(fitting) == 1 else least_pressed(fitting, spill_margin)
    if wf:
        state.remember_workflow(wf, chosen.name, ctx.now)
    return chosen


def pool_pressure(pool: PoolState) -> float:
    """How loaded a pool is: mean over healthy replicas of expected KV use and in-flight calls (0..~1+)."""
    total = 0.0
    n = 0
    for r in pool.replicas:
        if not r.healthy:
            continue
        n += 1
        cap = r.kv_capacity_tokens
        kv = max(r.reserved_kv_expected_tokens or r.reserved_kv_tokens, r.kv_usage * cap) / cap if cap > 0 else r.kv_usage
        busy = max(r.inflight, r.num_running + r.num_waiting) / (r.max_num_seqs or 256)
        total += kv if kv > busy else busy
    return total / n if n else float("inf")


def least_pressed(fitting: list[PoolState], margin: float) -> PoolState:
    """The smallest fitting pool, unless a larger one is less loaded by more than `margin`.

    Spilling a workflow up a class uses capacity that would otherwise sit idle (a long pool when
    traffic is short); the margin keeps the larger pool's headroom for the workflows only it can hold.
    """
    best = fitting[0]
    best_p = pool_pressure(best)
    for p in fitting[1:]:
        pp = pool_pressure(p)
        if pp + margin < best_p:
            best, best_p = p, pp
    return best
