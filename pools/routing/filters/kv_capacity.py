"""Keep replicas whose KV cache can take this call without a likely overflow (Pythia mechanism 2)."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.routing.kv import TOKENS_PER_BLOCK, call_kv, overflow_probability
from pools.types import ReplicaState

# the filter's name, for code that names it without an instance: compiled (mypyc), a class attribute
# read on the class is a slot descriptor, not this string
NAME = "kv-capacity"


class KvCapacityFilter:
    """Drops replicas where the KV their running calls still need plus this call would overflow.

    Demand is `ReplicaState.reserved_kv_tokens` (running calls at their predicted output bound) and
    `reserved_kv_expected_tokens` (at their expected output), or the scraped usage if higher. A replica
    is eligible while P(overflow) < `max_overflow_probability`. An idle replica is always eligible, so a
    call larger than any cache still runs (the engine then handles it). When every replica is dropped,
    `route()` answers `Decision.queue=True`: the call waits in the gateway's admission queue.
    """

    name = NAME

    def __init__(
        self, max_overflow_probability: float = 0.05, kv_budget: float = 1.0, max_inflight: int = 0, uncached: bool = False
    ) -> None:
        self.max_overflow_probability = max_overflow_probability
        # count only the prompt tokens a replica does not already hold (its prefix-index match) as new
        # demand: a cached prefix's blocks are shared, not allocated again
        self.uncached = uncached
        # share of the KV cache admitted calls may fill: below 1, calls beyond it wait at the gateway in
        # priority order instead of slowing every running call down (decode reads all resident KV)
        self.kv_budget = kv_budget
        self.max_inflight = max_inflight or 1 << 30  # calls per replica at most (0 = no bound but the KV's)

    def filter(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[ReplicaState]:
        # One pass, every replica field read once into a local: this loop runs for every candidate of
        # every decision (see docs/benchmarks.md, decision cost). Appends and dict lookups are called
        # directly, not through bound-method locals: the same speed in CPython, and mypyc turns only
        # direct calls into C calls (a bound method in a local stays a generic Python call).
        bound0, exp0 = call_kv(ctx)
        limit = self.max_overflow_probability
        # leading blocks each replica already holds (only replicas with a match), turned into tokens per
        # candidate below; `top` keeps one prompt token to compute, as vLLM does
        matched = ctx.matched_blocks() if self.uncached and ctx.features.prefix_hashes else None
        held_by = matched or _NONE
        top = ctx.features.prompt_tokens - 1
        out: list[ReplicaState] = []
        free: list[float] = []  # expected free fraction after this call, for the headroom score
        loads: list[int] = []  # and the queue depth, for the queue score
        held: list[int] = []  # and the leading blocks it holds (its prefix match)
        budget, most = self.kv_budget, self.max_inflight
        whole = budget == 1.0  # cap * 1.0 compares and subtracts exactly as cap does
        for r in candidates:
            cap = r.kv_capacity_tokens
            inflight = r.inflight
            load = r.num_running
            if load < inflight:
                load = inflight
            blocks = held_by.get(r.url, 0)
            if cap <= 0:
                out.append(r)
                free.append(1.0 - r.kv_usage)
                loads.append(load + r.num_waiting)
                held.append(blocks)
                continue
            if inflight >= most:
                continue
            if blocks:
                cached = blocks * TOKENS_PER_BLOCK
                if cached > top:
                    cached = top
                exp, bound = exp0 - cached, bound0 - cached
            else:
                exp, bound = exp0, bound0
            scraped = r.kv_usage * cap
            reserved = r.reserved_kv_tokens
            expected = r.reserved_kv_expected_tokens or reserved
            used = scraped if scraped > expected else expected
            allowed = cap if whole else cap * budget
            # fast paths: idle / fits even at every bound; else it must fit at expected lengths and
            # overflow only rarely at the bounds
            if (
                inflight == 0
                or (scraped if scraped > reserved else reserved) + bound <= allowed
                or (used + exp <= allowed and overflow_probability(r, exp, bound, allowed) < limit)
            ):
                out.append(r)
                f = (cap - used - exp) / cap
                free.append(f if f > 0.0 else 0.0)
                loads.append(load + r.num_waiting)
                held.append(blocks)
        ctx.kv_free = (out, free, loads, held if matched else None)
        return out


_NONE: dict[str, int] = {}  # no prefix match to look up
