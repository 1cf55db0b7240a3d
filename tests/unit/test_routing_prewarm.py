"""Pre-warm choice and the wasted-warm count."""

from __future__ import annotations

from pools.prefix_hash import block_hashes, flatten_messages
from pools.prewarm import PrewarmLedger, count_wasted_warms
from pools.routing import RoutingState, make_policy, route
from tests.unit.test_routing_helpers import SHORT, call, cluster, warm

NEXT = ({"role": "system", "content": "You are the searcher. " * 100}, {"role": "user", "content": "task"})


def test_confident_next_prefix_is_warmed_on_a_spare_replica_once() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("pythia")
    pred = warm("wf", next_prefix_messages=NEXT, next_prefix_confidence=0.9)
    d = route(call(st, "plan the research", prediction=pred), v, p)
    assert len(d.prewarm) == 1
    a = d.prewarm[0]
    assert a.replica in SHORT and a.replica != d.replica and a.messages == NEXT and a.model == "m"
    # the next call with that prefix is routed to the warmed replica
    nxt = call(st, "You are the searcher. " * 100 + "task and more", prediction=warm("wf"))
    assert route(nxt, v, p).replica == a.replica
    # the prefix is cached now: no second warm
    assert route(call(st, "plan again", prediction=pred), v, p).prewarm == ()


def test_no_warm_when_unsure_busy_or_ablated() -> None:
    v, p = cluster(), make_policy("pythia")
    unsure = warm("wf", next_prefix_messages=NEXT, next_prefix_confidence=0.3)
    assert route(call(RoutingState(), "plan", prediction=unsure), v, p).prewarm == ()
    sure = warm("wf", next_prefix_messages=NEXT, next_prefix_confidence=0.9)
    for pool in v.pools:
        for r in pool.replicas:
            r.kv_usage, r.num_waiting = 0.9, 3
    assert route(call(RoutingState(), "plan", prediction=sure), v, p).prewarm == ()
    assert route(call(RoutingState(), "plan", prediction=sure), cluster(), make_policy("pythia-no-prewarm")).prewarm == ()


def test_ledger_counts_used_and_wasted_warms() -> None:
    h = block_hashes(flatten_messages(NEXT))
    other = block_hashes("unrelated " * 300)
    ledger = PrewarmLedger(ttl_s=60.0)
    from pools.routing.base import PrewarmAction

    ledger.record(PrewarmAction("r1", NEXT, "m", h), 0.0)
    ledger.record(PrewarmAction("r2", NEXT, "m", h), 0.0)
    assert ledger.observe_call("r1", h + other, 5.0)
    assert not ledger.observe_call("r1", other, 6.0)
    ledger.expire(100.0)
    assert (ledger.sent, ledger.used, ledger.wasted) == (2, 1, 1)
    assert count_wasted_warms([(0.0, "r1", h), (0.0, "r2", h)], [(3.0, "r2", h), (500.0, "r1", h)], ttl_s=60.0) == 1
