"""The cache-aware baselines on hand-built states: SGLang's `prefix` and llm-d's `llmd`."""

from __future__ import annotations

from pools.routing import RoutingState, make_policy, route
from tests.unit.test_routing_helpers import call, cluster


def test_sglang_prefix_follows_the_tree_when_balanced() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("prefix")
    doc = "system prompt of the searcher " * 100
    first = route(call(st, doc + "q1"), v, p).replica
    # matched share above cache_threshold (0.3): same worker
    assert all(route(call(st, doc + f"q{i}"), v, p).replica == first for i in range(2, 8))


def test_sglang_prefix_low_match_goes_to_the_least_loaded_worker() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("prefix")
    s1, s2, s3 = v.pools[0].replicas
    s1.inflight, s2.inflight, s3.inflight = 5, 3, 4
    route(call(st, "a" * 8000), v, p)  # s2's tree holds 'a...'
    # an unrelated prompt matches nothing: the least loaded worker, whatever the trees hold
    s2.inflight = 6
    assert route(call(st, "b" * 3000), v, p).replica == s3.url
    # a prompt that matches s2's tree above the threshold still goes there, busier or not
    assert route(call(st, "a" * 9000), v, p).replica == s2.url


def test_sglang_prefix_spreads_prompts_sharing_only_a_system_prompt_by_their_text() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("prefix")
    system = "you are a careful research agent " * 60  # ~2,000 characters, > 30% of each prompt
    for i, r in enumerate(v.pools[0].replicas):  # every worker has served this app before
        r.inflight = 0
        st.index("sglang-approx-tree", 1 << 18).insert(
            r.url, call(st, system + f"old task {i} " * 40).features.prefix_hashes
        )
    seen = {route(call(st, system + f"new task {i} " * 40), v, p).replica for i in range(12)}
    # the same matched prefix everywhere: which worker wins depends on each request's text
    assert len(seen) > 1


def test_sglang_prefix_switches_to_shortest_queue_when_imbalanced() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("prefix")
    doc = "shared " * 500
    first = route(call(st, doc), v, p).replica
    r = v.replica(first)
    assert r is not None
    # abs gap 100 > 64 and 100 > 1.5 * min: shortest queue wins despite the cached prefix
    r.inflight = 100
    others = [x for x in v.pools[0].replicas if x.url != first]
    others[0].inflight, others[1].inflight = 0, 5
    assert route(call(st, doc + "next"), v, p).replica == others[0].url
    # a gap of 50 is under the absolute threshold: the tree decides again
    r.inflight = 50
    assert route(call(st, doc + "again"), v, p).replica == first


def test_llmd_weighs_prefix_kv_utilization_and_waiting_queue() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("llmd")
    doc = "tool instructions " * 300
    first = route(call(st, doc + "1"), v, p).replica
    assert route(call(st, doc + "2"), v, p).replica == first  # prefix-cache-scorer x3
    r = v.replica(first)
    assert r is not None
    # a busy KV (x2) and the longest waiting queue (x2) outweigh a full prefix match (x3)
    r.kv_usage, r.num_waiting = 0.95, 12
    for x in v.pools[0].replicas:
        if x is not r:
            x.kv_usage, x.num_waiting = 0.1, 0
    assert route(call(st, doc + "3"), v, p).replica != first
    # with no prefix, the emptiest KV wins
    for x, u in zip(v.pools[0].replicas, (0.5, 0.2, 0.9), strict=True):
        x.kv_usage, x.num_waiting = u, 0
    assert route(call(st, "unrelated"), v, p).replica == v.pools[0].replicas[1].url


def test_baselines_size_the_pool_by_the_current_prompt() -> None:
    v = cluster()
    for name in ("prefix", "llmd", "least_loaded", "session"):
        assert route(call(RoutingState(), "x" * 4 * 20_000), v, make_policy(name)).pool == "long"
        assert route(call(RoutingState(), "x"), v, make_policy(name)).pool == "short"
