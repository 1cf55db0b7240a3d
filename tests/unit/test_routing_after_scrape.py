"""What a scrape of engine metrics does to the prefix index (shared by the live gateway and the simulator)."""

from __future__ import annotations

from pools.routing import RoutingState, make_policy, route
from pools.routing.reconcile import TOKENS_PER_BLOCK, after_scrape
from pools.routing.sampling import ENTRIES_PER_BLOCK
from tests.unit.test_routing_helpers import call, cluster, warm


def test_capacity_change_resizes_the_replicas_index_share() -> None:
    v, st = cluster(kv_capacity=64_000), RoutingState()
    r = v.pools[0].replicas[0]
    after_scrape(st, r, capacity_changed=True, reconcile=True)
    assert st.index_capacity[r.url] == int(64_000 // TOKENS_PER_BLOCK * ENTRIES_PER_BLOCK)
    r.kv_capacity_tokens = 128_000
    after_scrape(st, r, capacity_changed=True, reconcile=True)
    assert st.index_capacity[r.url] == int(128_000 // TOKENS_PER_BLOCK * ENTRIES_PER_BLOCK)


def test_counters_going_back_mean_a_restarted_engine_whose_cache_is_gone() -> None:
    v, st, p = cluster(kv_capacity=64_000), RoutingState(), make_policy("pythia")
    text = "doc " * 3000
    replica = route(call(st, text, prediction=warm("wf1")), v, p).replica
    r = v.replica(replica)
    assert r is not None
    r.prefix_cache_queries, r.prefix_cache_hits = 50_000.0, 20_000.0
    after_scrape(st, r, capacity_changed=False, reconcile=True)
    assert st.prefix_index.match(call(st, text).features.prefix_hashes).get(replica, 0) > 0
    r.prefix_cache_queries, r.prefix_cache_hits = 100.0, 0.0  # the engine restarted
    after_scrape(st, r, capacity_changed=False, reconcile=True)
    assert replica not in st.prefix_index.match(call(st, text).features.prefix_hashes)
    assert st.reconciled_counters[replica] == (100.0, 0.0)


def test_without_reconcile_the_hit_counters_only_detect_restarts() -> None:
    v, st = cluster(kv_capacity=64_000), RoutingState()
    r = v.pools[0].replicas[0]
    r.prefix_cache_queries = 90_000.0
    after_scrape(st, r, capacity_changed=False, reconcile=False)
    assert st.reconciled_counters == {}
