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


def predicted_peak_pool(ctx: RoutingContext, view: ClusterView) -> PoolState | RouteError:
    """Pythia mechanism 1: one pool for the workflow's whole life, sized by its *predicted peak* context.

    The first call of a workflow picks the smallest pool whose limit holds
    `Prediction.peak_context_tokens` (and this call), and the workflow is pinned there in
    `RoutingState.workflow_pool`, so its cache stays in one pool and long workflows never start in a
    short pool only to migrate (and re-prefill) later. Later calls go to the pinned pool while it can
    hold them; a call that outgrows it (the prediction was wrong) moves the workflow to the smallest
    pool that fits its new peak. Cold predictions fall back to the current call's size.
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
    chosen: PoolState | None = None
    for p in pools:
        if p.max_context_tokens >= peak:
            chosen = p
            break
    if chosen is None:  # the predicted peak exceeds every pool: the largest that holds this call
        fitting = [p for p in pools if p.max_context_tokens >= now_need]
        if not fitting:
            return smallest_fitting_pool(ctx, view)
        chosen = fitting[-1]
    if wf:
        state.remember_workflow(wf, chosen.name, ctx.now)
    return chosen
