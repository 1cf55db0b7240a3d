"""Proactive pre-warm (Pythia mechanism 5): which prefix to warm on which replica, and when.

When the predictor knows with high confidence what the *next* call of a workflow will start with
(`Prediction.next_prefix_messages`), and that prefix is not yet cached anywhere in the workflow's
pool, a `max_tokens=1` prefill of it is sent to the replica the next call will most likely be routed
to, provided that replica has spare capacity now. The prefix index records the warm, so the next
call's routing finds it there. `PrewarmLedger` counts warms that no call used (wasted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pools.prefix_hash import DEFAULT_BLOCK_CHARS, block_hashes, common_prefix_blocks, flatten_messages
from pools.routing.base import PrewarmAction, RoutingContext
from pools.routing.pool_choice import workflow_id
from pools.routing.sampling import blocks_for, sampled
from pools.types import ClusterView, ReplicaState


@dataclass(slots=True, frozen=True)
class PrewarmConfig:
    """Thresholds of the pre-warm choice."""

    min_confidence: float = 0.6  # Prediction.next_prefix_confidence needed
    min_new_blocks: int = 4  # blocks (of 256 chars, ~64 tokens) not cached yet, else not worth a prefill
    max_kv_usage: float = 0.7  # the target must have at least this much KV free ...
    max_waiting: int = 0  # ... and no queue
    already_cached: float = 0.8  # a replica holding this fraction of the prefix needs no warm


def choose_prewarm(
    ctx: RoutingContext, view: ClusterView, chosen: ReplicaState, cfg: PrewarmConfig = PrewarmConfig()
) -> tuple[PrewarmAction, ...]:
    """At most one warm for the next call of this workflow; () when unsure, cached, or no spare replica."""
    p = ctx.prediction
    if p.cold or not p.next_prefix_messages or p.next_prefix_confidence < cfg.min_confidence:
        return ()
    pool = ctx.pool
    if pool is None:
        return ()
    # cheap checks before hashing the predicted prefix: long enough, and somewhere to warm it
    chars = sum(len(m.get("content") or "") for m in p.next_prefix_messages)
    if chars < cfg.min_new_blocks * DEFAULT_BLOCK_CHARS:
        return ()
    target = _spare_replica(pool.replicas, chosen, cfg)
    if target is None:
        return ()
    hashes = block_hashes(flatten_messages(p.next_prefix_messages))
    if len(hashes) < cfg.min_new_blocks:
        return ()
    # the next call continues this one: this call's own prefill warms the chosen replica already
    if len(hashes) - common_prefix_blocks(hashes, ctx.features.prefix_hashes) < cfg.min_new_blocks:
        return ()
    index = ctx.state.prefix_index
    samples = sampled(hashes)
    matched = index.match(samples)
    urls = {r.url for r in pool.replicas}
    best_match = blocks_for(max((n for u, n in matched.items() if u in urls), default=0))
    if best_match >= cfg.already_cached * len(hashes) or len(hashes) - best_match < cfg.min_new_blocks:
        return ()
    index.insert(target.url, samples)
    model = ctx.features.model or (pool.models[0] if pool.models else "")
    return (PrewarmAction(target.url, p.next_prefix_messages, model, hashes, workflow_id(ctx)),)


def _spare_replica(replicas: Sequence[ReplicaState], chosen: ReplicaState, cfg: PrewarmConfig) -> ReplicaState | None:
    """The healthy replica with most KV free and no queue; the one just chosen only if nothing else is."""
    best: ReplicaState | None = None
    best_key = (2.0, 0)
    for r in replicas:
        if not r.healthy or r.kv_usage > cfg.max_kv_usage or r.num_waiting > cfg.max_waiting:
            continue
        key = (r.kv_usage + (0.5 if r.url == chosen.url else 0.0), r.inflight)
        if key < best_key:
            best, best_key = r, key
    return best


@dataclass(slots=True)
class _Warm:
    replica: str
    hashes: tuple[int, ...]
    at: float


@dataclass(slots=True)
class PrewarmLedger:
    """Warms sent and whether a later call on that replica used them; feed it calls as they dispatch."""

    ttl_s: float = 120.0  # a warm not used within this long counts as wasted
    min_used_fraction: float = 0.5  # a call must share this much of the warmed prefix to use it
    sent: int = 0
    used: int = 0
    wasted: int = 0
    _open: OrderedDict[int, _Warm] = field(default_factory=OrderedDict)
    _seq: int = 0

    def record(self, action: PrewarmAction, now: float) -> None:
        """A warm was sent."""
        self.expire(now)
        self._seq += 1
        self._open[self._seq] = _Warm(action.replica, action.prefix_hashes, now)
        self.sent += 1

    def observe_call(self, replica: str, prefix_hashes: Sequence[int], now: float) -> bool:
        """A call was dispatched; True when it used an open warm on that replica (the warm counts as used)."""
        self.expire(now)
        for k, w in self._open.items():
            if w.replica == replica and w.hashes:
                shared = common_prefix_blocks(w.hashes, prefix_hashes)
                if shared >= self.min_used_fraction * len(w.hashes):
                    del self._open[k]
                    self.used += 1
                    return True
        return False

    def expire(self, now: float) -> int:
        """Close warms older than the TTL as wasted; returns how many were closed now."""
        n = 0
        while self._open:
            k, w = next(iter(self._open.items()))
            if now - w.at <= self.ttl_s:
                break
            del self._open[k]
            n += 1
        self.wasted += n
        return n

    def finish(self) -> None:
        """End of a run: every warm still open is wasted."""
        self.wasted += len(self._open)
        self._open.clear()


def count_wasted_warms(
    warms: Sequence[tuple[float, str, Sequence[int]]],
    calls: Sequence[tuple[float, str, Sequence[int]]],
    ttl_s: float = 120.0,
) -> int:
    """Warms (time, replica, hashes) that no call (time, replica, hashes) within `ttl_s` used."""
    ledger = PrewarmLedger(ttl_s=ttl_s)
    events = sorted([(t, 0, r, tuple(h)) for t, r, h in warms] + [(t, 1, r, tuple(h)) for t, r, h in calls])
    for t, kind, r, h in events:
        if kind == 0:
            ledger.record(PrewarmAction(r, (), "", h), t)
        else:
            ledger.observe_call(r, h, t)
    ledger.finish()
    return ledger.wasted
