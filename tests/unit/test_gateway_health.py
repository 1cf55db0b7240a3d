"""Passive and active health bookkeeping on replica states."""

from __future__ import annotations

from gateway.health import ReplicaMonitor
from pools.routing import RoutingState
from pools.types import ClusterView, PoolConfig


def monitor() -> tuple[ReplicaMonitor, ClusterView, RoutingState]:
    view = ClusterView.from_configs([PoolConfig("p", 1000, ("m",), ("http://a", "http://b"))])
    state = RoutingState()
    m = ReplicaMonitor(view, state, None, interval_s=0.5, timeout_s=0.5, unhealthy_after=2, scrape_interval_s=1.0)
    return m, view, state


def test_refused_connection_takes_a_replica_out_at_once() -> None:
    m, view, _ = monitor()
    a = view.pools[0].replicas[0]
    m.record_failure(a, conclusive=True, why="refused")
    assert not a.healthy


def test_soft_failures_need_a_streak_and_success_resets_it() -> None:
    m, view, _ = monitor()
    a = view.pools[0].replicas[0]
    m.record_failure(a, conclusive=False, why="timeout")
    assert a.healthy
    m.record_success(a)
    m.record_failure(a, conclusive=False, why="timeout")
    assert a.healthy
    m.record_failure(a, conclusive=False, why="timeout")
    assert not a.healthy


def test_a_replica_that_comes_back_starts_with_an_empty_prefix_cache() -> None:
    m, view, state = monitor()
    a = view.pools[0].replicas[0]
    state.prefix_index.insert(a.url, [1, 2, 3])
    m.record_failure(a, conclusive=True, why="refused")
    m.record_success(a)
    assert a.healthy and a.consecutive_failures == 0
    assert state.prefix_index.size(a.url) == 0
