"""How much KV cache one call needs, from its prompt and the predicted length of its output."""

from __future__ import annotations

import math

from pools.prefix_hash import DEFAULT_BLOCK_CHARS
from pools.request_features import BYTES_PER_TOKEN
from pools.routing.base import RoutingContext
from pools.types import ReplicaState

# output length assumed when neither the predictor nor the client bounds it (a cold call)
DEFAULT_OUTPUT_BOUND = 1024
# prompt tokens per prefix-index block (as pools.routing.reconcile counts them)
TOKENS_PER_BLOCK = DEFAULT_BLOCK_CHARS // BYTES_PER_TOKEN
# z-score of the predictor's output *bound* (its high quantile, about p95): turns bound-expected into a sd
BOUND_Z = 1.645


def output_bound(ctx: RoutingContext) -> int:
    """Predicted high quantile of this call's output tokens, capped by the client's max_tokens."""
    b = ctx.prediction.output_tokens_bound
    mt = ctx.features.max_tokens
    if b <= 0:
        return mt if mt is not None else DEFAULT_OUTPUT_BOUND
    return min(b, mt) if mt is not None else b


def output_expected(ctx: RoutingContext) -> int:
    """Expected output tokens of this call (the bound when nothing better is known)."""
    e = ctx.prediction.output_tokens_expected
    bound = output_bound(ctx)
    return min(bound, math.ceil(e)) if e > 0 else bound


def call_kv(ctx: RoutingContext) -> tuple[int, int]:
    """(`call_kv_bound`, `call_kv_expected`) in one go: the output bound is worked out once, and the pair
    once per context (kept in `ctx.kv_need`)."""
    need = ctx.kv_need
    if need is not None:
        return need
    f, p = ctx.features, ctx.prediction
    mt = f.max_tokens
    b = p.output_tokens_bound
    if b <= 0:
        b = mt if mt is not None else DEFAULT_OUTPUT_BOUND
    elif mt is not None and mt < b:
        b = mt
    e = p.output_tokens_expected
    prompt = f.prompt_tokens
    need = ctx.kv_need = (prompt + b, prompt + (min(b, math.ceil(e)) if e > 0 else b))
    return need


def call_kv_bound(ctx: RoutingContext) -> int:
    """KV tokens this call may occupy at its output bound."""
    return ctx.features.prompt_tokens + output_bound(ctx)


def call_kv_expected(ctx: RoutingContext) -> int:
    """KV tokens this call is expected to occupy."""
    return ctx.features.prompt_tokens + output_expected(ctx)


def cached_prompt_tokens(ctx: RoutingContext, url: str) -> int:
    """Prompt tokens the replica already holds, from the routing prefix index's match (always leaves one
    token to compute, as vLLM does); 0 when the policy did not match the prompt against the index."""
    m = ctx.prefix_match
    if not m:
        return 0
    blocks = m.get(url, 0)
    if not blocks:
        return 0
    # max(0, min(prompt - 1, blocks * TOKENS_PER_BLOCK)) without the two builtin calls (once per call)
    cached = blocks * TOKENS_PER_BLOCK
    top = ctx.features.prompt_tokens - 1
    if top < cached:
        cached = top
    return cached if cached > 0 else 0


def expected_used(r: ReplicaState) -> float:
    """KV tokens the replica's running calls are expected to need (reservations, or the scrape if larger)."""
    exp = r.reserved_kv_expected_tokens or r.reserved_kv_tokens
    return max(float(exp), r.kv_usage * r.kv_capacity_tokens)


def overflow_probability(r: ReplicaState, need_expected: int, need_bound: int, limit: float | None = None) -> float:
    """P(the replica's KV demand, with this call added, exceeds `limit` tokens (default: its capacity));
    0 when capacity is unknown.

    Each call's output is uncertain between its expected value and its bound (a high quantile):
    the sum over the calls is treated as normal with sd = sum of (bound - expected) / z / sqrt(n)
    (independent calls), so many small uncertain calls overflow less often than their bounds add up.
    """
    if r.kv_capacity_tokens <= 0:
        return 0.0
    cap = r.kv_capacity_tokens if limit is None else limit
    mean = expected_used(r) + need_expected
    slack = max(0, r.reserved_kv_tokens - (r.reserved_kv_expected_tokens or r.reserved_kv_tokens))
    slack += max(0, need_bound - need_expected)
    if slack <= 0:
        return 1.0 if mean > cap else 0.0
    n = max(1, r.inflight + 1)
    sd = slack / BOUND_Z / math.sqrt(n)
    z = (cap - mean) / sd
    return 0.5 * math.erfc(z / math.sqrt(2.0))
