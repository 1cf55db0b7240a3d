"""Pythia's replica score (mechanisms 2 and 3): prefix affinity, expected KV headroom, queue depth.

The KV-capacity filter runs first and is the hard constraint (no replica is pushed into overflow);
among the eligible replicas the cached prefix weighs most (default 8 vs 1 + 1): in the simulator's
sweeps a prefix hit (a prefill not done) shortened jobs more than balancing headroom did, so headroom
and queue depth decide between replicas with equal matches, e.g. for a workflow's first call.
The prefix bonus is load-aware (like SGLang's balance threshold, but per match): it fades to 0 as a
replica's load exceeds the least-loaded candidate's by `prefix_slack` calls plus one call per
`prefix_slack_tokens` matched tokens. Without it a popular system prompt (every searcher of every
deep-research workflow) pulled all fan-out siblings onto the one replica that cached it.

One pass over the candidates computes all three, already weighted, because a decision over a
64-replica cluster must cost under 50 us (see docs/benchmarks.md); each part can be switched off
for ablation.

* headroom: fraction of the KV cache still free once the calls running there *and this one* reach
  their expected lengths (`reserved_kv_expected_tokens`, or the scraped usage if higher). Unlike
  llm-d's kv-cache-utilization scorer (the last scrape, i.e. the past) it counts what admitted calls
  will still need, from the predictor's output lengths. Unknown capacity: 1 - scraped usage.
* queue: 1 for the emptiest candidate, 0 for the fullest (gateway in-flight vs engine running, plus waiting).
* prefix: matched leading blocks / prompt blocks in the gateway's prefix index
  (`RoutingState.prefix_index`, sized from scraped KV capacity and reconciled from the scraped
  `vllm:prefix_cache_*` hit rate, see pools.routing.reconcile).
"""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.routing.kv import TOKENS_PER_BLOCK, call_kv
from pools.types import ReplicaState


class PythiaPlacementScorer:
    """queue_weight * queue + headroom_weight * headroom + prefix_weight * prefix match, per candidate."""

    name = "pythia-placement"

    def __init__(
        self,
        queue_weight: float = 1.0,
        headroom_weight: float = 1.0,
        prefix_weight: float = 8.0,
        prefix_slack: float = 0.0,
        prefix_slack_tokens: float = 0.0,
    ) -> None:
        self.queue_weight = queue_weight
        self.headroom_weight = headroom_weight
        self.prefix_weight = prefix_weight
        # load-aware affinity: a replica's prefix bonus fades linearly to 0 as its load exceeds the
        # least-loaded candidate's by `prefix_slack` calls (0 = the bonus ignores load)
        self.prefix_slack = prefix_slack
        # or, scaled by what the match saves: the bonus fades to 0 once the extra load reaches one call
        # per `prefix_slack_tokens` matched prompt tokens (a long cached conversation is worth waiting
        # behind a few calls, a shared system prompt is not; fan-out siblings spread)
        self.prefix_slack_tokens = prefix_slack_tokens

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        # One loop over the parallel lists per shape of the formula, indexing them: for a small pool a
        # comprehension costs more than its work (zip(..., strict=True) is a keyword call, and the
        # closure over the weights makes them cells), and for 32 replicas the loop costs the same.
        stash = ctx.kv_free if ctx.kv_free is not None and ctx.kv_free[0] is candidates else None
        blocks: list[int] | None = None
        if stash is not None:
            free, loads, blocks = stash[1], stash[2], stash[3]
        else:
            loads = [max(r.inflight, r.num_running) + r.num_waiting for r in candidates]
            free = self._free(ctx, candidates) if self.headroom_weight else []
        lo, hi = min(loads), max(loads)
        qw, hw, pw = self.queue_weight, self.headroom_weight, self.prefix_weight
        # queue score (top - x) * k: qw for the emptiest candidate, 0 for the fullest; when every load is
        # equal, top = hi + 1 and k = qw give every candidate the full qw
        top, k = (hi, qw / (hi - lo)) if hi > lo else (hi + 1, qw)
        total = len(ctx.features.prefix_hashes)
        matched = (ctx.prefix_match if ctx.prefix_match is not None else ctx.matched_blocks()) if pw and total else None
        out: list[float] = []
        i = 0
        if not matched:
            if not hw:
                return [(top - x) * k for x in loads]
            for x in loads:
                f = free[i]
                i += 1
                out.append((top - x) * k + hw * (f if f < 1.0 else 1.0))
            return out
        if blocks is None:
            get = matched.get
            blocks = [get(r.url, 0) for r in candidates]
        if not hw:
            free = [0.0] * len(loads)  # headroom ablated: adds hw * f = 0.0 below
        kp = pw / total
        slack = self.prefix_slack
        per_call = self.prefix_slack_tokens / TOKENS_PER_BLOCK  # matched blocks worth one call
        # queue + headroom, plus the prefix bonus where the replica holds a match
        if per_call > 0.0:
            # load-aware: the bonus fades over `prefix_slack` calls plus one per `prefix_slack_tokens` matched
            for x in loads:
                f = free[i]
                m = blocks[i]
                i += 1
                s = (top - x) * k + hw * (f if f < 1.0 else 1.0)
                if m:  # (no match adds 0.0: leaves the score as it is)
                    g = 1.0 - (x - lo) / (slack + m / per_call)
                    s += m * kp * (g if g > 0.0 else 0.0)
                out.append(s)
        elif slack > 0.0:
            for x in loads:
                f = free[i]
                m = blocks[i]
                i += 1
                g = 1.0 - (x - lo) / slack
                out.append((top - x) * k + hw * (f if f < 1.0 else 1.0) + m * kp * (g if g > 0.0 else 0.0))
        else:
            for x in loads:
                f = free[i]
                m = blocks[i]
                i += 1
                out.append((top - x) * k + hw * (f if f < 1.0 else 1.0) + m * kp)
        return out

    @staticmethod
    def _free(ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]:
        """Expected free KV fraction after this call (what the KV-capacity filter stashes when it runs)."""
        need = call_kv(ctx)[1]  # call_kv_expected(ctx), worked out once per context
        out: list[float] = []
        for r in candidates:
            cap = r.kv_capacity_tokens
            if cap <= 0:
                out.append(1.0 - r.kv_usage)
                continue
            scraped = r.kv_usage * cap
            used = r.reserved_kv_expected_tokens or r.reserved_kv_tokens
            f = (cap - (scraped if scraped > used else used) - need) / cap
            out.append(f if f > 0.0 else 0.0)
        return out
