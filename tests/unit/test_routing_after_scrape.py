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


def test_reconciled_share_of_a_small_cache_stays_within_a_factor_of_its_kv_size() -> None:
    # 8k tokens of KV is 12 index entries: the share moves within 3-24 however far the hit rates disagree
    v, st = cluster(kv_capacity=8192), RoutingState()
    r = v.pools[0].replicas[0]
    after_scrape(st, r, capacity_changed=True, reconcile=True)
    base = st.index_capacity[r.url]
    assert base == 12
    seen = set()
    for step, observed in enumerate([1.0] * 6 + [0.0] * 8):
        st.prefix_index.set_capacity(r.url, 10**6)
        st.prefix_index.insert(r.url, range(step * 100, step * 100 + st.index_capacity[r.url]))  # a full share
        st.predicted_hit_tokens[r.url], st.routed_prompt_tokens[r.url] = 1_000.0, 10_000.0
        r.prefix_cache_queries += 10_000.0
        r.prefix_cache_hits += 10_000.0 * observed
        r.prefix_cache_queries += 20_000.0 if step == 0 else 0.0  # the engine has filled its cache
        after_scrape(st, r, capacity_changed=False, reconcile=True)
        seen.add(st.index_capacity[r.url])
    assert max(seen) == 2 * base and min(seen) == base // 4
