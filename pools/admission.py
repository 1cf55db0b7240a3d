"""Admission order at the gateway (Pythia mechanism 4) and how many calls a replica may hold at once.

When the routing core answers `Decision.queue=True` (no replica of the pool can take the call without
risking KV overflow), the call waits here, one queue per pool, ordered by its lookahead priority
(lower first) with aging: waiting `aging_s` seconds is worth one priority level. Because every waiting
call ages at the same rate, the order is fixed at enqueue time (key = priority * aging_s + enqueue time),
so a heap gives it without rescans. Each time a call of the pool completes, the gateway pops the head
and routes it again; if it must still wait, `requeue` puts it back at its old place.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from pools.routing.base import Policy
from pools.routing.filters import kv_capacity
from pools.types import ReplicaState

T = TypeVar("T")

DEFAULT_CONCURRENCY = 256  # vLLM's default max_num_seqs, when nothing better is known
# PYTHIA_ADMISSION_TIMEOUT_S default, the longest wait for room at the gateway. Waiting there in priority
# order beats the engine's queue while KV is short (mixed at 90% with 12 GB of KV, virtual time: 30 s sent
# 40 calls on, 49 preemptions, 62.8 s mean JCT; 120 s, as unbounded, 3 and 57.5 s; no call waited 91 s)
DEFAULT_TIMEOUT_S = 120.0


def overflow_policy(policy: Policy, room_filters: Collection[str] = (kv_capacity.NAME,)) -> Policy:
    """The policy for a call that waited the admission timeout: the same without the filters that wait
    for room, so it is placed now and waits in the engine's own queue (as behind a router without one)."""
    return replace(policy, filters=tuple(f for f in policy.filters if f.name not in room_filters))


@dataclass(slots=True, order=True)
class Waiting(Generic[T]):
    """One queued call: its order key, then insertion sequence (FIFO among equals)."""

    key: float
    seq: int
    item: T = field(compare=False)
    priority: int = field(compare=False, default=0)
    enqueued_s: float = field(compare=False, default=0.0)


class AdmissionQueue(Generic[T]):
    """Priority queue with linear aging; `None` priority counts as `default_priority`."""

    def __init__(self, aging_s: float = 10.0, default_priority: int = 4, max_len: int = 100_000) -> None:
        self.aging_s = aging_s
        self.default_priority = default_priority
        self.max_len = max_len
        self._heap: list[Waiting[T]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, priority: int | None, now: float) -> Waiting[T] | None:
        """Queue a call; None when the queue is full (the gateway answers 429)."""
        if len(self._heap) >= self.max_len:
            return None
        p = self.default_priority if priority is None else priority
        self._seq += 1
        w = Waiting(p * self.aging_s + now, self._seq, item, p, now)
        heapq.heappush(self._heap, w)
        return w

    def requeue(self, w: Waiting[T]) -> None:
        """Put a popped call back at its old place (it still could not be placed)."""
        heapq.heappush(self._heap, w)

    def peek(self) -> Waiting[T] | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Waiting[T] | None:
        """The call that goes next: lowest aged priority, oldest first among equals."""
        return heapq.heappop(self._heap) if self._heap else None

    def remove(self, item: T) -> bool:
        """Drop a call whose client went away."""
        for i, w in enumerate(self._heap):
            if w.item is item:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False

    def effective_priority(self, w: Waiting[T], now: float) -> float:
        """The aged priority of a waiting call now (for logs and metrics)."""
        return w.priority - (now - w.enqueued_s) / self.aging_s


def concurrency_limit(replica: ReplicaState, typical_call_kv_tokens: int) -> int:
    """Calls a replica may run at once: as many typical calls as fit its KV cache, within max_num_seqs."""
    limit = replica.max_num_seqs or DEFAULT_CONCURRENCY
    if replica.kv_capacity_tokens > 0 and typical_call_kv_tokens > 0:
        limit = min(limit, replica.kv_capacity_tokens // typical_call_kv_tokens)
    return max(1, limit)


def has_room(replica: ReplicaState, call_kv_tokens: int, typical_call_kv_tokens: int) -> bool:
    """True when the replica is under its concurrency bound and its reservations leave room for the call.

    An idle replica always has room (a call larger than the cache still has to run somewhere).
    """
    if not replica.healthy:
        return False
    if replica.inflight == 0:
        return True
    if replica.inflight >= concurrency_limit(replica, typical_call_kv_tokens):
        return False
    cap = replica.kv_capacity_tokens
    return cap <= 0 or replica.reserved_kv_tokens + call_kv_tokens <= cap
