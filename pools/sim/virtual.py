"""A discrete-event driver for one or more engines in virtual time (no sockets, no clock)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from pools.sim.engine import SimEngine
from pools.sim.request import RequestEvent, RequestResult, SimRequest


@dataclass(slots=True)
class Arrival:
    """A request arriving at virtual time `time` (seconds), optionally for a given engine."""

    time: float
    request: SimRequest
    engine: int = 0


def run_trace(
    engines: SimEngine | list[SimEngine], arrivals: Iterable[Arrival], until: float | None = None
) -> dict[str, RequestResult]:
    """Feed the arrivals to their engines in time order and run until all work is done (or `until`)."""
    engs = engines if isinstance(engines, list) else [engines]
    queue = sorted(arrivals, key=lambda a: a.time)
    i = 0
    heap: list[tuple[float, int]] = []
    events: list[RequestEvent] = []

    def push(k: int) -> None:
        t = engs[k].next_event_time()
        if t is not None:
            heapq.heappush(heap, (t, k))

    while i < len(queue) or heap:
        next_arrival = queue[i].time if i < len(queue) else float("inf")
        if heap and heap[0][0] <= next_arrival:
            t, k = heapq.heappop(heap)
            if engs[k].next_event_time() != t:
                continue  # stale entry: the engine's step changed since it was pushed
            if until is not None and t > until:
                break
            events.extend(engs[k].advance(t))
            push(k)
        else:
            a = queue[i]
            i += 1
            if until is not None and a.time > until:
                break
            eng = engs[a.engine]
            before = eng.next_event_time()
            eng.add_request(a.request, a.time)
            if eng.next_event_time() != before:
                push(a.engine)
    out: dict[str, RequestResult] = {}
    for e in engs:
        out.update(e._results)
    return out
