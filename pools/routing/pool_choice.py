"""Which context-length pool a call goes to."""

from __future__ import annotations

import math

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


def predicted_peak_pool(
    ctx: RoutingContext, view: ClusterView, spill_margin: float = math.inf, short_penalty: float = 0.05,
    likely_peak: bool = True,
) -> PoolState | RouteError:
    """Pythia mechanism 1: one pool for the workflow's whole life, sized by its *predicted peak* context.

    The first call of a workflow chooses among the pools that hold this call, preferring the smallest
    whose limit holds the workflow's likely peak (`Prediction.peak_context_likely_tokens`, the median of
    the learned growth; `likely_peak=False` uses the p95 bound `peak_context_tokens`: that sent every
    coding workflow that *might* outgrow 16k to the two long replicas, 4x the long-pool calls, and made
    the bottleneck pool slower, +5% mean JCT at 30% load), and the workflow is pinned there in
    `RoutingState.workflow_pool`: its cache stays in one pool, and a workflow predicted to grow long
    does not start in a short pool only to migrate (and prefill its whole context again) later.
    Pools are weighed by load (`pool_pressure`): a pool too small for the predicted peak costs
    `short_penalty` (the migration it will likely need), each class above the smallest that fits costs
    `spill_margin` (default: infinite, no spill); the lowest total wins. So a predicted-long workflow
    still starts in the short pool while the long pool is much busier (a mispredicted peak must not
    pile work on the few long replicas). With a finite `spill_margin`, short workflows also spill up
    to a less loaded long pool: off by default because in the mixed sweeps at 60% load it slowed the
    long pool's own prefill-heavy work (+25% mean JCT) while KV-based pressure still looked low.
    Later calls go to the pinned pool while it can hold them; a call that outgrows it moves the
    workflow (the prediction was wrong).
    Cold predictions size by the current call.
    """
    f = ctx.features
    now_need = f.prompt_tokens + (f.max_tokens or 1)
    wf = ctx.prediction.workflow or ctx.tags.workflow  # workflow_id(ctx), inline: every call asks
    state = ctx.state
    pinned = state.workflow_pool.get(wf) if wf else None
    if pinned is not None:
        # the common case, a later call of a pinned workflow: its pool if it serves the model and holds the call
        model = f.model
        for p in view.pools:
            if p.name == pinned and p.max_context_tokens >= now_need and (not model or model in p.models):
                return p
    pools = serving_pools(ctx, view)
    if isinstance(pools, RouteError):
        return pools
    fitting = [p for p in pools if p.max_context_tokens >= now_need]
    if not fitting:
        return smallest_fitting_pool(ctx, view)
    pred = ctx.prediction
    if pred.cold:
        peak = now_need
    else:
        peak = max(now_need, (pred.peak_context_likely_tokens or pred.peak_context_tokens) if likely_peak
                   else pred.peak_context_tokens)
    chosen = fitting[0]
    if len(fitting) > 1:
        best = float("inf")
        rank = 0
        for p in fitting:
            score = pool_pressure(p)
            if p.max_context_tokens < peak:
                score += short_penalty
            else:
                if rank:
                    score += spill_margin * rank
                rank += 1
            if score < best - 1e-12:
                best, chosen = score, p
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
