"""Admission order (priority with aging) and the per-replica concurrency bound."""

from __future__ import annotations

from pools.admission import AdmissionQueue, concurrency_limit, has_room
from pools.types import ReplicaState


def test_lower_priority_number_goes_first_and_ties_are_fifo() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(aging_s=10.0)
    q.push("far", 8, 0.0)
    q.push("near-a", 1, 1.0)
    q.push("near-b", 1, 2.0)
    q.push("cold", None, 3.0)
    assert [w.item for w in iter(q.pop, None)] == ["near-a", "near-b", "cold", "far"]


def test_aging_lets_an_old_call_overtake_newer_high_priority_ones() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(aging_s=10.0)
    q.push("old-long", 6, 0.0)  # waited 60 s by t=60: worth 6 levels
    q.push("new-short", 1, 55.0)
    q.push("newer-short", 1, 65.0)
    order = [w.item for w in iter(q.pop, None)]
    assert order == ["old-long", "new-short", "newer-short"]


def test_requeue_keeps_place_and_remove_drops() -> None:
    q: AdmissionQueue[str] = AdmissionQueue()
    q.push("a", 1, 0.0)
    q.push("b", 2, 0.0)
    w = q.pop()
    assert w is not None and w.item == "a"
    q.push("c", 2, 1.0)
    q.requeue(w)
    assert q.remove("c")
    assert [x.item for x in iter(q.pop, None)] == ["a", "b"]
    full: AdmissionQueue[int] = AdmissionQueue(max_len=1)
    assert full.push(1, 0, 0.0) is not None and full.push(2, 0, 0.0) is None


def test_concurrency_bound_from_kv_capacity() -> None:
    r = ReplicaState("u", "p", kv_capacity_tokens=100_000, max_num_seqs=256)
    assert concurrency_limit(r, 4_000) == 25
    assert concurrency_limit(ReplicaState("u", "p"), 4_000) == 256
    r.inflight, r.reserved_kv_tokens = 10, 90_000
    assert not has_room(r, 20_000, 4_000) and has_room(r, 5_000, 4_000)
    r.inflight = 25
    assert not has_room(r, 10, 4_000)
    assert has_room(ReplicaState("u", "p", kv_capacity_tokens=100), 1_000_000, 4_000)  # idle: always
