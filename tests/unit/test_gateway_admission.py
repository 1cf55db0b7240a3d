"""The gateway's admission queue on a Gateway object with hand-set replica states (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import AdmissionController, ConcurrencyBoundFilter, admission_enabled
from gateway.prediction import ColdPredictor
from gateway.proxy import Gateway
from gateway.settings import Settings
from pools.request_features import extract_features
from pools.routing import Decision, RoutingContext, make_policy, route
from pools.types import PoolConfig
from predictor.types import Prediction, Tags

URL = "http://127.0.0.1:1"


def gateway(**settings: object) -> tuple[Gateway, AdmissionController]:
    s = Settings(policy="pythia", **settings)  # type: ignore[arg-type]
    gw = Gateway(s, [PoolConfig("short", 16384, ("m",), (URL,))], ColdPredictor())
    adm = AdmissionController(gw)
    adm.install()
    r = gw.replicas[URL]
    r.kv_capacity_tokens, r.max_num_seqs = 10_000, 256
    return gw, adm


def saturate(gw: Gateway) -> None:
    r = gw.replicas[URL]
    r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 1, 9_900, 9_900


def room_for_one(gw: Gateway) -> None:
    r = gw.replicas[URL]
    r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 1, 9_600, 9_600


def free(gw: Gateway) -> None:
    r = gw.replicas[URL]
    r.inflight, r.reserved_kv_tokens, r.reserved_kv_expected_tokens = 0, 0, 0


def ctx(gw: Gateway, name: str, remaining: float) -> RoutingContext:
    f = extract_features({"model": "m", "prompt": name * 400, "max_tokens": 200}, False, 0.0)
    p = Prediction(cold=False, workflow=name, remaining_steps=remaining, output_tokens_bound=200,
                   output_tokens_expected=100)
    return RoutingContext(f, Tags(workflow=name), p, 0.0, gw.routing_state)


async def queued(gw: Gateway, adm: AdmissionController, c: RoutingContext) -> asyncio.Task[Decision]:
    d = route(c, gw.view, gw.policy)
    assert d.queue, d
    task = asyncio.create_task(adm.admit(c, d))
    await asyncio.sleep(0)
    return task


async def test_saturated_calls_wait_and_leave_in_lookahead_priority_order() -> None:
    gw, adm = gateway()
    saturate(gw)
    tasks = {name: await queued(gw, adm, ctx(gw, name, rem)) for name, rem in (("a", 9), ("b", 0), ("c", 4))}
    assert adm.depth() == {"short": 3}
    order = []
    for _ in range(3):
        room_for_one(gw)
        adm.on_release(gw.replicas[URL])  # a call left the replica: the head is placed
        await asyncio.sleep(0.01)
        done = [n for n, t in tasks.items() if t.done() and n not in order]
        assert len(done) == 1  # the placed call holds its room, so the next one still waits
        order += done
        d = tasks[done[0]].result()
        assert d.error is None and d.replica == URL
        saturate(gw)  # the admitted call now runs there (the proxy's own counts)
    assert order == ["b", "c", "a"]  # fewest remaining steps first
    assert adm.depth() == {"short": 0}


async def test_a_placed_call_holds_its_room_until_it_resumes() -> None:
    gw, adm = gateway()
    saturate(gw)
    task = await queued(gw, adm, ctx(gw, "x", 1))
    free(gw)
    assert adm.drain("short") == 1
    r = gw.replicas[URL]
    assert r.inflight == 1 and r.reserved_kv_tokens > 0  # provisional, so a newcomer cannot take it too
    d = await task
    assert d.replica == URL and r.inflight == 0 and r.reserved_kv_tokens == 0  # handed to the proxy


async def test_a_call_that_waits_too_long_goes_to_the_engines_queue_instead_of_failing() -> None:
    gw, adm = gateway(admission_timeout_s=0.05)
    saturate(gw)
    task = await queued(gw, adm, ctx(gw, "slow", 3))
    d = await task
    # still no room on the replica, but the call is placed there (the engine queues it), not refused
    assert d.error is None and not d.queue and d.replica == URL
    assert adm.depth() == {"short": 0}
    r = gw.replicas[URL]
    assert r.inflight == 1 and r.reserved_kv_tokens == 9_900  # no provisional hold left behind
    # and the queue still works for the next call: it waits, and gets room once the replica frees it
    task = await queued(gw, adm, ctx(gw, "next", 1))
    free(gw)
    assert adm.drain("short") == 1
    assert (await task).replica == URL


async def test_a_client_that_goes_away_leaves_the_queue() -> None:
    gw, adm = gateway()
    saturate(gw)
    task = await queued(gw, adm, ctx(gw, "gone", 3))
    other = await queued(gw, adm, ctx(gw, "stays", 5))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adm.depth() == {"short": 1}
    free(gw)
    adm.on_release(gw.replicas[URL])
    assert (await other).replica == URL


async def test_a_full_queue_answers_429() -> None:
    gw, adm = gateway(admission_max_queue=1)
    saturate(gw)
    await queued(gw, adm, ctx(gw, "first", 1))
    c = ctx(gw, "second", 1)
    d = await adm.admit(c, route(c, gw.view, gw.policy))
    assert d.error is not None and d.error.status == 429
    await adm.stop()


def test_concurrency_bound_from_kv_capacity_holds_calls_beyond_it() -> None:
    gw, adm = gateway()
    r = gw.replicas[URL]
    r.kv_capacity_tokens = 1_000_000  # KV is no limit: the bound comes from the typical call size
    f = ConcurrencyBoundFilter(adm.typical)  # kv-aware, as for a policy without its own KV filter
    adm.typical.by_pool["short"] = 100_000.0  # 10 typical calls fit
    c = ctx(gw, "q", 2)
    r.inflight = 9
    assert f.filter(c, [r]) == [r]
    r.inflight = 10
    assert f.filter(c, [r]) == []
    r.inflight = 0
    assert f.filter(c, [r]) == [r]  # idle: always
    # Pythia's own KV filter sizes each call: the bound is then the engine's batch limit alone
    batch = ConcurrencyBoundFilter(adm.typical, kv_aware=False)
    r.inflight, r.max_num_seqs = 10, 16
    assert batch.filter(c, [r]) == [r]
    r.inflight = 16
    assert batch.filter(c, [r]) == []
    assert any(isinstance(x, ConcurrencyBoundFilter) and not x.kv_aware for x in gw.policy.filters)


def test_concurrency_bound_keeps_exactly_the_replicas_below_concurrency_limit() -> None:
    """The filter works the limit out inline: it must keep what `concurrency_limit` says, for random
    in-flight counts, batch limits (0 = unknown), KV capacities and typical call sizes."""
    import random

    from pools.admission import concurrency_limit
    from pools.types import ReplicaState

    gw, adm = gateway()
    rng = random.Random(4)
    c = ctx(gw, "q", 2)
    for kv_aware in (True, False):
        f = ConcurrencyBoundFilter(adm.typical, kv_aware=kv_aware)
        for _ in range(3000):
            adm.typical.by_pool["short"] = rng.choice((0.0, 0.4, 1.0, 700.0, 4096.0, 90_000.0, 2e6))
            typical = adm.typical.tokens("short") if kv_aware else 0
            reps = []
            for i in range(rng.randint(1, 6)):
                r = ReplicaState(f"http://r{i}", "short")
                r.inflight = rng.choice((-1, 0, 1, 2, 5, 16, 255, 256, 300))
                r.max_num_seqs = rng.choice((0, 1, 4, 16, 256))
                r.kv_capacity_tokens = rng.choice((-1, 0, 100, 5000, 450_000))
                reps.append(r)
            want = [r for r in reps if r.inflight == 0 or r.inflight < concurrency_limit(r, typical)]
            assert f.filter(c, reps) == want


def test_auto_mode_queues_only_for_policies_with_priorities() -> None:
    assert admission_enabled("auto", make_policy("pythia"))
    assert not admission_enabled("auto", make_policy("round_robin"))
    assert admission_enabled("on", make_policy("round_robin"))
    assert not admission_enabled("off", make_policy("pythia"))
