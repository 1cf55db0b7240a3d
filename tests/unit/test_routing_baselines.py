"""Baseline policies on hand-built cluster states: which replica gets the call."""

from __future__ import annotations

from collections import Counter

from pools.request_features import extract_features
from pools.routing import RoutingContext, RoutingState, make_policy, route
from pools.types import ClusterView, PoolConfig
from predictor.types import Prediction, Tags


def view() -> ClusterView:
    return ClusterView.from_configs(
        [
            PoolConfig("long", 131072, ("m",), ("http://c",)),
            PoolConfig("short", 16384, ("m",), ("http://a", "http://b", "http://d")),
        ]
    )


def ctx(state: RoutingState, text: str = "hello", max_tokens: int = 16, tags: Tags | None = None, exclude=frozenset()):
    f = extract_features({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}, True)
    return RoutingContext(f, tags or Tags(), Prediction(), 0.0, state, exclude=exclude)


def test_round_robin_spreads_evenly_in_smallest_fitting_pool() -> None:
    v, st, p = view(), RoutingState(), make_policy("round_robin")
    got = Counter(route(ctx(st), v, p).replica for _ in range(30))
    assert got == {"http://a": 10, "http://b": 10, "http://d": 10}


def test_long_prompt_goes_to_long_pool_and_too_long_is_400() -> None:
    v, st, p = view(), RoutingState(), make_policy("round_robin")
    d = route(ctx(st, text="x" * 4 * 20000), v, p)
    assert (d.pool, d.replica) == ("long", "http://c")
    d = route(ctx(st, text="x" * 4 * 140000), v, p)
    assert d.error is not None and d.error.status == 400 and d.error.code == "context_length_exceeded"


def test_unknown_model_is_404() -> None:
    st = RoutingState()
    f = extract_features({"model": "nope", "prompt": "hi"}, False)
    d = route(RoutingContext(f, Tags(), Prediction(), 0.0, st), view(), make_policy("round_robin"))
    assert d.error is not None and d.error.status == 404


def test_unhealthy_replicas_are_skipped_and_none_left_is_503() -> None:
    v, st, p = view(), RoutingState(), make_policy("round_robin")
    short = v.pool("short")
    assert short is not None
    short.replicas[0].healthy = False
    assert {route(ctx(st), v, p).replica for _ in range(10)} == {"http://b", "http://d"}
    for r in short.replicas:
        r.healthy = False
    d = route(ctx(st), v, p)
    assert d.error is not None and d.error.status == 503 and d.error.retry_after_s


def test_least_loaded_picks_emptiest() -> None:
    v, st, p = view(), RoutingState(), make_policy("least_loaded")
    short = v.pool("short")
    assert short is not None
    short.replicas[0].inflight = 5
    short.replicas[1].num_waiting = 3
    short.replicas[2].inflight = 1
    assert route(ctx(st), v, p).replica == "http://d"


def test_session_sticks_and_falls_back_when_unhealthy() -> None:
    v, st, p = view(), RoutingState(), make_policy("session")
    tags = Tags(app="a", workflow="wf-42")
    first = route(ctx(st, tags=tags), v, p).replica
    assert all(route(ctx(st, tags=tags), v, p).replica == first for _ in range(20))
    replica = v.replica(first)
    assert replica is not None
    replica.healthy = False
    moved = route(ctx(st, tags=tags), v, p).replica
    assert moved != first
    replica.healthy = True
    assert route(ctx(st, tags=tags), v, p).replica == first
    # different sessions spread over the pool
    assert len({route(ctx(st, tags=Tags(session=f"s{i}")), v, p).replica for i in range(40)}) == 3


def test_retry_excludes_failed_replica() -> None:
    v, st, p = view(), RoutingState(), make_policy("round_robin")
    for _ in range(6):
        assert route(ctx(st, exclude=frozenset({"http://a"})), v, p).replica != "http://a"
