"""Pythia's mechanisms on hand-built cluster states: pool, capacity, prefix affinity, priority."""

from __future__ import annotations

from pools.routing import RoutingState, make_policy, route
from pools.routing.policies import pythia
from pools.routing.priority import COLD_PRIORITY, lookahead_priority
from pools.routing.reconcile import TOKENS_PER_BLOCK, reconcile_prefix_index
from pools.routing.sampling import ENTRIES_PER_BLOCK
from predictor.types import Tags
from tests.unit.test_routing_helpers import LONG, SHORT, call, cluster, warm


def test_workflow_is_placed_by_predicted_peak_and_stays_there() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("pythia")
    # a small first call of a workflow predicted to grow to 60k tokens goes to the long pool at once
    d = route(call(st, "plan", prediction=warm("wf1", peak_context_tokens=60_000)), v, p)
    assert d.pool == "long" and d.replica in LONG
    # a later call, still small, stays in the long pool (its cache is there)
    d = route(call(st, "plan more", prediction=warm("wf1", peak_context_tokens=60_000)), v, p)
    assert d.pool == "long"
    # round robin sizes by the current prompt: it would have used the short pool
    assert route(call(RoutingState(), "plan"), v, make_policy("round_robin")).pool == "short"
    # without the pool mechanism, Pythia also sizes by the current prompt
    assert route(call(RoutingState(), "plan", prediction=warm("wf1", peak_context_tokens=60_000)), v,
                 make_policy("pythia-no-pool")).pool == "short"


def test_new_workflows_spill_to_a_larger_idle_class_when_enabled_and_stay_there() -> None:
    v, st, p = cluster(), RoutingState(), pythia(spill_margin=0.02)
    for r in v.pools[0].replicas:  # the short pool is busy, the long pool idle
        r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 30, 60_000, 50_000
    d = route(call(st, "small", prediction=warm("wf-a", peak_context_tokens=3000)), v, p)
    assert d.pool == "long" and st.workflow_pool["wf-a"] == "long"
    # once pinned, it stays even when the short pool frees up
    for r in v.pools[0].replicas:
        r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 0, 0, 0
    assert route(call(st, "small 2", prediction=warm("wf-a", peak_context_tokens=3000)), v, p).pool == "long"
    # baselines size by the prompt only and keep loading the short pool
    for r in v.pools[0].replicas:
        r.inflight, r.reserved_kv_tokens = 30, 60_000
    assert route(call(RoutingState(), "small"), v, make_policy("llmd")).pool == "short"
    # so do Pythia by default (no spill) and with the pool mechanism ablated
    for name in ("pythia", "pythia-no-pool"):
        assert route(call(RoutingState(), "small", prediction=warm("wf-b", peak_context_tokens=3000)), v,
                     make_policy(name)).pool == "short"


def test_predicted_long_workflow_starts_short_while_the_long_pool_is_much_busier() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("pythia")
    for r in v.pools[1].replicas:  # the long pool is busy with long documents
        r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 5, 90_000, 80_000
    d = route(call(st, "start", prediction=warm("wf-c", peak_context_tokens=30_000)), v, p)
    assert d.pool == "short"


def test_workflow_migrates_only_when_it_outgrows_its_pool() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("pythia")
    d = route(call(st, "x", prediction=warm("wf2", peak_context_tokens=4000)), v, p)
    assert d.pool == "short" and st.workflow_pool["wf2"] == "short"
    # the prediction was wrong: this prompt (~20k tokens) no longer fits the short pool
    d = route(call(st, "y" * 4 * 20_000, prediction=warm("wf2", peak_context_tokens=4000)), v, p)
    assert d.pool == "long" and st.workflow_pool["wf2"] == "long"
    # and it stays in the long pool afterwards even for small calls
    assert route(call(st, "z", prediction=warm("wf2", peak_context_tokens=4000)), v, p).pool == "long"


def test_capacity_filter_avoids_replicas_that_would_overflow() -> None:
    v, st, p = cluster(kv_capacity=10_000), RoutingState(), make_policy("pythia")
    s1, s2, s3 = v.pools[0].replicas
    # s1 and s2 hold calls that will need almost all their KV; s3 is half full
    for r, reserved in ((s1, 9_800), (s2, 9_500), (s3, 5_000)):
        r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 3, reserved, reserved
    st.workflow_pool["wf3"] = "short"  # a later call of a workflow living in the short pool
    c = call(st, "q" * 4 * 1000, max_tokens=None, prediction=warm("wf3", peak_context_tokens=2000))
    d = route(c, v, p)
    assert d.replica == "http://s3"
    # the gateway adds these to the replica's reservations while the call runs
    prompt = c.features.prompt_tokens
    assert (d.kv_reserve_tokens, d.kv_expected_tokens) == (prompt + 400, prompt + 200)


def test_no_eligible_replica_queues_at_the_gateway_with_priority() -> None:
    v, st, p = cluster(kv_capacity=10_000), RoutingState(), make_policy("pythia")
    for r in v.pools[0].replicas:
        r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 4, 9_900, 9_900
    st.workflow_pool["wf4"] = "short"
    d = route(call(st, "q" * 4 * 1000, prediction=warm("wf4", remaining_steps=2.0)), v, p)
    assert d.queue and not d.replica and d.error is None and d.pool == "short"
    assert d.priority == 2
    # without the capacity mechanism the call is placed anyway (and would push a replica into preemption)
    assert route(call(st, "q" * 4 * 1000, prediction=warm("wf4")), v,
                 make_policy("pythia-no-capacity")).replica in SHORT


def test_uncertain_outputs_overflow_less_than_their_bounds_add_up() -> None:
    v, p = cluster(kv_capacity=10_000), make_policy("pythia")
    s1, s2, s3 = v.pools[0].replicas
    for r in (s2, s3):
        r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 20, 10_000, 10_000
    # many calls whose bounds sum past capacity but whose expected need is far below it
    s1.inflight, s1.reserved_kv_tokens, s1.reserved_kv_expected_tokens = 20, 11_000, 6_000
    st = RoutingState(workflow_pool={"wf5": "short"})
    d = route(call(st, "q" * 400, prediction=warm("wf5")), v, p)
    assert d.replica == "http://s1"


def test_prefix_wins_among_eligible_replicas_and_headroom_breaks_ties() -> None:
    v, p = cluster(kv_capacity=100_000), make_policy("pythia")
    st = RoutingState(workflow_pool={"wf6": "short"})
    s1, s2, s3 = v.pools[0].replicas
    s1.inflight, s1.reserved_kv_expected_tokens, s1.reserved_kv_tokens = 1, 60_000, 60_000
    s2.inflight, s2.reserved_kv_expected_tokens, s2.reserved_kv_tokens = 1, 10_000, 10_000
    s3.inflight, s3.reserved_kv_expected_tokens, s3.reserved_kv_tokens = 1, 30_000, 30_000
    text = "shared system prompt " * 200
    # no replica holds the prefix: the most expected headroom wins
    assert route(call(st, text + "question", prediction=warm("wf6")), v, p).replica == "http://s2"
    # s1 holds the prompt's prefix and can take the call: the cached prefix saves a prefill, it wins
    st2 = RoutingState(workflow_pool={"wf6": "short"})
    st2.prefix_index.insert("http://s1", call(st2, text).sampled_hashes())
    assert route(call(st2, text + "question", prediction=warm("wf6")), v, p).replica == "http://s1"
    # the cached prefix is already resident on s1: only the uncached rest needs new KV, so a nearly
    # full s1 still takes the call (a whole-prompt reservation would have sent it away)
    s1.reserved_kv_expected_tokens = s1.reserved_kv_tokens = 99_500
    d = route(call(st2, text + "question", prediction=warm("wf6")), v, p)
    assert d.replica == "http://s1"
    assert d.kv_reserve_tokens < call(st2, text + "question").features.prompt_tokens
    # ... but not when even that would likely overflow s1's KV cache: capacity is a hard constraint
    s1.reserved_kv_expected_tokens = s1.reserved_kv_tokens = 99_950
    assert route(call(st2, text + "question", prediction=warm("wf6")), v, p).replica == "http://s2"


def test_reservation_counts_the_whole_prompt_where_nothing_is_cached() -> None:
    v, p = cluster(), make_policy("pythia")
    st = RoutingState(workflow_pool={"wf9": "short"})
    ctx = call(st, "fresh prompt " * 300, prediction=warm("wf9"))
    d = route(ctx, v, p)
    assert d.kv_reserve_tokens == ctx.features.prompt_tokens + 64  # max_tokens bounds the output


def test_prefix_affinity_yields_to_load_for_a_shared_system_prompt_but_not_a_long_conversation() -> None:
    v, p = cluster(), make_policy("pythia")
    s1 = v.pools[0].replicas[0]
    system = "You are a web researcher. " * 40  # ~1k chars: a few blocks every fan-out sibling shares
    st = RoutingState(workflow_pool={"wf10": "short", "wf11": "short"})
    st.prefix_index.insert("http://s1", call(st, system).sampled_hashes())
    # s1 holds the system prompt and is as idle as the others: the cached prefix wins
    assert route(call(st, system + "search A", prediction=warm("wf10")), v, p).replica == "http://s1"
    # s1 now runs 12 more calls than the others: a few shared blocks are not worth that queue
    s1.inflight, s1.num_running = 12, 12
    assert route(call(st, system + "search B", prediction=warm("wf10")), v, p).replica != "http://s1"
    # a long conversation cached on s1 (thousands of tokens) is worth the same extra load
    history = "turn of a long coding session " * 1200
    st.prefix_index.insert("http://s1", call(st, history).sampled_hashes())
    assert route(call(st, history + "next", prediction=warm("wf11")), v, p).replica == "http://s1"
    # the old load-blind affinity (no slack) followed the system prompt whatever the load
    blind = pythia(prefix_slack=0.0, prefix_slack_tokens=0.0)
    st2 = RoutingState(workflow_pool={"wf10": "short"})
    st2.prefix_index.insert("http://s1", call(st2, system).sampled_hashes())
    assert route(call(st2, system + "search C", prediction=warm("wf10")), v, blind).replica == "http://s1"


def test_prefix_affinity_keeps_a_workflow_on_the_replica_with_its_context() -> None:
    v, st, p = cluster(), RoutingState(), make_policy("pythia")
    history = "turn " * 2000
    first = route(call(st, history, prediction=warm("wf7")), v, p).replica
    for i in range(5):
        history += f" reply {i} " * 50
        assert route(call(st, history, prediction=warm("wf7")), v, p).replica == first
    # without prefix affinity the same calls spread over the pool
    st2, p2 = RoutingState(), make_policy("pythia-no-prefix")
    history = "turn " * 2000
    seen = {route(call(st2, history + str(i) * 50, prediction=warm("wf7")), v, p2).replica for i in range(6)}
    assert len(seen) > 1


def test_prefix_index_is_sized_from_kv_capacity_and_reconciled_from_hit_rate() -> None:
    v, st, p = cluster(kv_capacity=64_000), RoutingState(), make_policy("pythia")
    text = "doc " * 3000
    replica = route(call(st, text, prediction=warm("wf8")), v, p).replica
    assert st.index_capacity[replica] == int(64_000 // TOKENS_PER_BLOCK * ENTRIES_PER_BLOCK)
    for _ in range(3):
        route(call(st, text, prediction=warm("wf8")), v, p)
    r = v.replica(replica)
    assert r is not None
    base = int(64_000 // TOKENS_PER_BLOCK * ENTRIES_PER_BLOCK)

    def reconcile(queries: float, hits: float, total_computed: float) -> int | None:
        for _ in range(3):
            route(call(st, text, prediction=warm("wf8")), v, p)
        r.prefix_cache_queries, r.prefix_cache_hits = total_computed, 0.0
        return reconcile_prefix_index(st, r, query_tokens=queries, hit_tokens=hits)

    # the index expected mostly hits and the replica reports almost none, but it has not computed a KV
    # cache's worth of tokens yet, so it cannot have evicted anything: the share stays
    assert reconcile(12_000.0, 100.0, total_computed=30_000.0) == base
    # once it has, it evicted what the index still remembers: the share shrinks
    new = reconcile(12_000.0, 100.0, total_computed=70_000.0)
    assert new is not None and new < base

    # hitting more than predicted grows only a share the index has filled; this one holds one prompt
    def hits_more_than_predicted() -> int | None:
        st.predicted_hit_tokens[replica], st.routed_prompt_tokens[replica] = 3_000.0, 12_000.0
        return reconcile_prefix_index(st, r, query_tokens=12_000.0, hit_tokens=9_000.0)

    assert st.prefix_index.size(replica) < 0.9 * new
    assert hits_more_than_predicted() == new
    full = st.index_capacity[replica] = st.prefix_index.size(replica)
    st.prefix_index.set_capacity(replica, full)
    grown = hits_more_than_predicted()
    assert grown is not None and grown > full


def test_predicted_hits_count_the_answer_an_engine_cached_for_the_previous_call() -> None:
    v, st, p = cluster(kv_capacity=1_000_000), RoutingState(), make_policy("pythia")
    convo = [{"role": "system", "content": "be brief " * 100}, {"role": "user", "content": "question " * 300}]
    first = route(call(st, messages=convo, prediction=warm("wf9")), v, p).replica
    answer = {"role": "assistant", "content": "an answer " * 400}  # ~1,000 tokens the engine generated
    convo += [answer, {"role": "user", "content": "and then? " * 20}]
    ctx = call(st, messages=convo, prediction=warm("wf9"))
    f = ctx.features
    assert f.reply_end_tokens == f.prompt_tokens - (len("<|user|>") + 200 + 3) // 4
    before = st.predicted_hit_tokens[first]
    assert route(ctx, v, p).replica == first
    predicted = st.predicted_hit_tokens[first] - before
    # the index only ever saw the first prompt (~1,250 tokens); the engine holds the answer as well
    assert ctx.matched_blocks()[first] * TOKENS_PER_BLOCK < 1_300
    assert predicted == f.reply_end_tokens

    # the same conversation continued by another workflow's call, or after a different system prompt:
    # no engine generated that answer behind this prefix, so only what the index holds counts
    for wf, system in (("other", "be brief "), ("wf9", "be thorough ")):
        st2 = RoutingState()
        route(call(st2, messages=convo[:2], prediction=warm("wf9")), v, p)
        ctx = call(st2, messages=[{"role": "system", "content": system * 100}, *convo[1:]], prediction=warm(wf))
        replica = route(ctx, v, p).replica
        assert ctx.features.reply_end_tokens > 0
        assert st2.predicted_hit_tokens[replica] == min(
            ctx.features.prompt_tokens, ctx.matched_blocks().get(replica, 0) * TOKENS_PER_BLOCK
        ) < ctx.features.reply_end_tokens


def test_lookahead_priority_prefers_workflows_near_their_end_and_ages() -> None:
    st = RoutingState()
    near = call(st, prediction=warm("a", remaining_steps=1.0), now=100.0)
    far = call(st, prediction=warm("b", remaining_steps=12.0), now=100.0)
    assert lookahead_priority(near) < lookahead_priority(far)
    assert lookahead_priority(call(st, now=100.0)) == COLD_PRIORITY
    # a long workflow that has been running for 10 minutes has aged to the front
    st.workflow_started["b"] = 0.0
    old_far = call(st, prediction=warm("b", remaining_steps=12.0), now=600.0)
    assert lookahead_priority(old_far, aging_s=60.0) == 2
    # the decision carries it; the no-priority ablation passes the client's own value through
    v = cluster()
    assert route(call(RoutingState(), prediction=warm("a", remaining_steps=1.0)), v, make_policy("pythia")).priority == 1
    assert route(call(RoutingState(), prediction=warm("a", remaining_steps=1.0)), v,
                 make_policy("pythia-no-priority")).priority is None


def test_cold_calls_still_route_and_unknown_capacity_is_not_a_blocker() -> None:
    v, st = cluster(kv_capacity=0), RoutingState()
    got = {route(call(st, f"hi {i}", tags=Tags(session=str(i))), v, pythia()).replica for i in range(9)}
    assert got <= set(SHORT) and len(got) == 3


def test_routing_index_matches_like_the_plain_index() -> None:
    import random

    from pools.prefix_index import PrefixIndex
    from pools.routing.routing_index import RoutingPrefixIndex

    rng = random.Random(3)
    plain, fast = PrefixIndex(50), RoutingPrefixIndex(50)
    chains = [tuple(range(k * 100, k * 100 + rng.randint(1, 30))) for k in range(8)]
    for _ in range(300):
        chain = rng.choice(chains)[: rng.randint(1, 30)]
        r = f"r{rng.randrange(6)}"
        plain.insert(r, chain)
        fast.insert(r, chain)
        probe = rng.choice(chains)
        assert fast.match(probe) == plain.match(probe)


def test_pool_follows_the_likely_peak_not_the_rare_bound() -> None:
    # a workflow that *might* reach 60k (its p95) but most likely stays at 3k starts in the short pool:
    # placing every such workflow in the few long replicas made the long pool the bottleneck
    v, st = cluster(), RoutingState()
    pred = warm("wf-r", peak_context_tokens=60_000, peak_context_likely_tokens=3000)
    assert route(call(st, "plan", prediction=pred), v, make_policy("pythia")).pool == "short"
    assert route(call(RoutingState(), "plan", prediction=pred), v, pythia(likely_peak=False)).pool == "long"
    likely_long = warm("wf-s", peak_context_tokens=60_000, peak_context_likely_tokens=40_000)
    assert route(call(RoutingState(), "plan", prediction=likely_long), v, make_policy("pythia")).pool == "long"
