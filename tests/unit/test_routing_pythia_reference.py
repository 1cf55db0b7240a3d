"""Pythia's replica choice equals a plain, unoptimised statement of its rules on random cluster states.

The routing core's filter, scorer and picker are written for speed (one pass, stashed values, bitmask
prefix index); this test restates the same rules the obvious way and checks, over many hand-built
random states (loads, reservations, scraped usage, unknown capacities, cached prefixes, excluded and
unhealthy replicas), that `route()` picks the same replica, priority and KV reservation.
"""

from __future__ import annotations

import math
import random

import pytest

from pools.routing import RoutingContext, RoutingState, make_policy, route
from pools.routing.kv import BOUND_Z, TOKENS_PER_BLOCK, call_kv, call_kv_bound, call_kv_expected
from pools.routing.priority import lookahead_priority
from pools.routing.sampling import BLOCKS_FOR
from pools.types import ReplicaState
from predictor.types import Tags
from tests.unit.test_routing_helpers import call, cluster, warm


def overflow(r: ReplicaState, need_exp: int, need_bound: int, cap: float) -> float:
    mean = max(float(r.reserved_kv_expected_tokens or r.reserved_kv_tokens), r.kv_usage * r.kv_capacity_tokens) + need_exp
    slack = max(0, r.reserved_kv_tokens - (r.reserved_kv_expected_tokens or r.reserved_kv_tokens))
    slack += max(0, need_bound - need_exp)
    if slack <= 0:
        return 1.0 if mean > cap else 0.0
    sd = slack / BOUND_Z / math.sqrt(max(1, r.inflight + 1))
    return 0.5 * math.erfc((cap - mean) / sd / math.sqrt(2.0))


def reference_choice(ctx: RoutingContext, replicas: list[ReplicaState]) -> str:
    """Healthy + KV-capacity filter, placement score (queue + headroom + load-aware prefix), max-score pick."""
    matched = {u: BLOCKS_FOR[k] for u, k in ctx.state.prefix_index.match(ctx.sampled_hashes()).items()}
    prompt = ctx.features.prompt_tokens
    kept: list[tuple[ReplicaState, float, int, int]] = []  # replica, free fraction, load, matched blocks
    for r in replicas:
        if not r.healthy or r.url in ctx.exclude:
            continue
        blocks = matched.get(r.url, 0)
        load = max(r.inflight, r.num_running) + r.num_waiting
        cap = r.kv_capacity_tokens
        if cap <= 0:
            kept.append((r, 1.0 - r.kv_usage, load, blocks))
            continue
        cached = min(blocks * TOKENS_PER_BLOCK, prompt - 1) if blocks else 0
        exp, bound = call_kv_expected(ctx) - cached, call_kv_bound(ctx) - cached
        scraped = r.kv_usage * cap
        used = max(scraped, r.reserved_kv_expected_tokens or r.reserved_kv_tokens)
        fits = (
            r.inflight == 0
            or max(scraped, r.reserved_kv_tokens) + bound <= cap
            or (used + exp <= cap and overflow(r, exp, bound, cap) < 0.05)
        )
        if fits:
            kept.append((r, max(0.0, (cap - used - exp) / cap), load, blocks))
    assert kept, "the scenarios keep at least one replica"
    loads = [x for _, _, x, _ in kept]
    lo, hi = min(loads), max(loads)
    total = len(ctx.features.prefix_hashes)
    scores = []
    for _, f, x, m in kept:
        s = (1.0 - (x - lo) / (hi - lo) if hi > lo else 1.0) + min(f, 1.0)
        if m:
            s += 8.0 * m / total * max(0.0, 1.0 - (x - lo) / (8.0 + m / (1024.0 / TOKENS_PER_BLOCK)))
        scores.append(s)
    best = max(scores)
    tied = [r for (r, _, _, _), s in zip(kept, scores, strict=True) if s >= best - 1e-6]
    assert len(tied) == 1, "scenarios with near-ties are skipped by the caller"
    return tied[0].url


def random_scenario(rng: random.Random) -> tuple[RoutingContext, list[ReplicaState], object]:
    v = cluster(kv_capacity=0)
    short = v.pools[0].replicas
    for r in short:
        r.kv_capacity_tokens = rng.choice((0, 8_000, 12_000, 60_000))
        r.inflight = rng.choice((0, 1, 3, 8, 20))
        r.num_running, r.num_waiting = rng.randint(0, 20), rng.choice((0, 0, 2))
        r.reserved_kv_tokens = rng.randint(0, max(1, r.kv_capacity_tokens))
        r.reserved_kv_expected_tokens = rng.choice((0, int(r.reserved_kv_tokens * rng.random())))
        r.kv_usage = rng.random() * 0.9
        r.healthy = rng.random() > 0.15
    short[rng.randrange(len(short))].healthy = True
    st = RoutingState(workflow_pool={"wf": "short"})
    texts = ["system prompt of a researcher " * 60, "coding session history " * 600, "short question"]
    for r in short:
        if rng.random() < 0.6:
            st.prefix_index.insert(r.url, call(st, rng.choice(texts)[: rng.randint(300, 5000)]).sampled_hashes())
    text = rng.choice(texts) + " next " * rng.randint(0, 300)
    ctx = call(st, text, max_tokens=rng.choice((None, 64, 2000)),
               prediction=warm("wf", remaining_steps=float(rng.randint(0, 9)), output_tokens_expected=rng.choice((0.0, 120.0)),
                               output_tokens_bound=rng.choice((0, 300, 4000))),
               tags=Tags(workflow="wf"), now=rng.random() * 300)
    return ctx, short, v


@pytest.mark.parametrize("seed", range(8))
def test_pythia_picks_what_its_rules_say_on_random_states(seed: int) -> None:
    rng = random.Random(seed)
    policy = make_policy("pythia")
    checked = 0
    for _ in range(400):
        ctx, short, v = random_scenario(rng)
        try:
            want = reference_choice(ctx, short)
        except AssertionError:
            continue  # nothing eligible (the call queues) or a near-tie (round-robin among equals)
        d = route(ctx, v, policy)  # type: ignore[arg-type]
        assert d.pool == "short" and d.replica == want
        assert d.priority == lookahead_priority(ctx)
        cached = min(ctx.features.prompt_tokens - 1, (ctx.prefix_match or {}).get(want, 0) * TOKENS_PER_BLOCK)
        bound, expected = call_kv(ctx)
        assert (bound, expected) == (call_kv_bound(ctx), call_kv_expected(ctx))
        assert d.kv_reserve_tokens == bound - cached and d.kv_expected_tokens == expected - cached
        checked += 1
    assert checked > 200
