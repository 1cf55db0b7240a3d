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
