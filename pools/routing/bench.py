"""Cost of one routing decision: `python -m pools.routing.bench [--replicas 64] [--decisions 20000]`.

Builds a cluster of N replicas in two pools with a warm prefix index (agent-like prompts sharing
system prompts and growing histories), then times `route()` per decision for each policy with
`time.perf_counter_ns`, updating the replicas' load between decisions as a gateway would. Prints
p50/p99/max in microseconds of wall time, and of the thread's CPU time (`time.thread_time_ns`, which
leaves out time the OS scheduler gave other processes: on a shared, overloaded box that is the
decision's own cost), and optionally writes them as JSON. A benchmark, not a test.
The garbage collector stays on (after `gc.freeze()` of the set-up, as a long-running server does).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import replace

import numpy as np

from pools.build_info import loaded_build
from pools.request_features import extract_features
from pools.routing import RouteError, RoutingContext, RoutingState, make_policy, route
from pools.types import ClusterView, PoolConfig
from predictor.types import NextRole, Prediction, RequestFeatures, Tags


def build_cluster(n: int) -> ClusterView:
    """N replicas: half in a 16k pool, the rest in a 128k pool, 8B/A100-like KV sizes."""
    short = max(1, n // 2)
    view = ClusterView.from_configs(
        [
            PoolConfig("short", 16384, ("m",), tuple(f"http://10.0.0.{i}:8000" for i in range(short))),
            PoolConfig("long", 131072, ("m",), tuple(f"http://10.0.1.{i}:8000" for i in range(n - short))),
        ]
    )
    rng = random.Random(1)
    for p in view.pools:
        for r in p.replicas:
            r.kv_capacity_tokens, r.max_num_seqs = 450_000, 256
            r.inflight = rng.randint(0, 40)
            r.num_running, r.num_waiting = r.inflight, rng.randint(0, 3)
            r.reserved_kv_tokens = rng.randint(0, 300_000)
            r.reserved_kv_expected_tokens = int(r.reserved_kv_tokens * 0.7)
            r.kv_usage = r.reserved_kv_expected_tokens / r.kv_capacity_tokens
    return view


def build_calls(k: int, rng: random.Random) -> list[tuple[RequestFeatures, Prediction, Tags]]:
    """Agent-like calls: 20 roles' system prompts, 300 workflows' histories of 1k-40k characters."""
    systems = [f"You are agent role {j}. " * 40 for j in range(20)]
    out = []
    for i in range(k):
        wf = f"wf{rng.randrange(300)}"
        history = (f"{wf} context " * rng.randint(80, 3000))[: rng.randint(1000, 40000)]
        body = {"model": "m", "messages": [{"role": "system", "content": systems[rng.randrange(20)]},
                                           {"role": "user", "content": history}], "max_tokens": 512}
        f = extract_features(body, True, float(i))
        pred = Prediction(cold=False, role="r", workflow=wf, output_tokens_expected=300.0, output_tokens_bound=700,
                          next_roles=(NextRole("searcher", 0.8, 3.0),), remaining_steps=float(rng.randint(0, 12)),
                          peak_context_tokens=rng.choice((6000, 12000, 60000)),
                          next_prefix_messages=({"role": "system", "content": systems[rng.randrange(20)]},),
                          next_prefix_confidence=rng.random(), confidence=0.9)
        out.append((f, pred, Tags(app="bench", workflow=wf)))
    return out


def time_policy(name: str, replicas: int, decisions: int, seed: int = 0) -> dict[str, float]:
    """Per-decision latency percentiles (us) of one policy after a warm-up of as many decisions."""
    rng = random.Random(seed)
    view, state, policy = build_cluster(replicas), RoutingState(), make_policy(name)
    calls = build_calls(2000, rng)
    samples = np.empty(decisions, dtype=np.int64)
    cpu = np.empty(decisions, dtype=np.int64)
    clock = time.perf_counter_ns
    thread = time.thread_time_ns
    by_url = {r.url: r for p in view.pools for r in p.replicas}
    for phase in (0, 1):  # warm-up fills the prefix indexes, then measure
        if phase:
            gc.collect()
            gc.freeze()  # as a server does after start-up: long-lived objects leave the GC's young scans
        for i in range(decisions):
            f, pred, tags = calls[i % len(calls)]
            ctx = RoutingContext(replace(f, arrival_s=float(i)), tags, pred, float(i), state)
            c0, t0 = thread(), clock()
            d = route(ctx, view, policy)
            t1, c1 = clock(), thread()
            if phase:
                samples[i] = t1 - t0
                cpu[i] = c1 - c0
            r = by_url.get(d.replica)
            if r is not None:  # the load moves as dispatches and completions would move it
                r.inflight = max(0, r.inflight + rng.choice((-1, 1)))
                r.reserved_kv_tokens = max(0, r.reserved_kv_tokens + rng.randint(-3000, 3000))
    gc.unfreeze()
    us, cus = samples / 1000.0, cpu / 1000.0
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "cpu_p50_us": float(np.percentile(cus, 50)),
            "cpu_p99_us": float(np.percentile(cus, 99)), "decisions": decisions, "replicas": replicas}


def decision_digest(name: str, replicas: int, decisions: int, seed: int = 0) -> str:
    """SHA-256 over every field of every decision of `time_policy`'s call sequence (untimed): equal
    digests from two builds (compiled and interpreted) mean they made the same decisions."""
    rng = random.Random(seed)
    view, state, policy = build_cluster(replicas), RoutingState(), make_policy(name)
    calls = build_calls(min(decisions, 2000), rng)
    by_url = {r.url: r for p in view.pools for r in p.replicas}
    digest = hashlib.sha256()
    for i in range(decisions):
        f, pred, tags = calls[i % len(calls)]
        d = route(RoutingContext(replace(f, arrival_s=float(i)), tags, pred, float(i), state), view, policy)
        e = d.error
        fields = (d.pool, d.replica, d.priority, d.queue, d.reason, d.kv_reserve_tokens, d.kv_expected_tokens,
                  None if e is None else (e.status, e.code, e.message, e.retry_after_s),
                  [(a.replica, a.messages, a.model, a.prefix_hashes, a.workflow) for a in d.prewarm])
        digest.update(repr(fields).encode())
        r = by_url.get(d.replica)
        if r is not None:
            r.inflight = max(0, r.inflight + rng.choice((-1, 1)))
            r.reserved_kv_tokens = max(0, r.reserved_kv_tokens + rng.randint(-3000, 3000))
    return digest.hexdigest()


def stage_breakdown(name: str, replicas: int, decisions: int, seed: int = 0) -> dict[str, float]:
    """Median wall microseconds of each stage of `route()` (pool, each filter, scorers, picker, index
    insert, after-pick hooks, priority, actions), timed one stage at a time (`perf_counter_ns`: a
    thread-CPU clock read costs a system call, more than some stages) on the same run as `time_policy`
    (the stages repeat `route()`'s steps; the decisions are the same)."""
    from pools.routing.kv import cached_prompt_tokens, call_kv

    rng = random.Random(seed)
    view, state, policy = build_cluster(replicas), RoutingState(), make_policy(name)
    calls = build_calls(2000, rng)
    by_url = {r.url: r for p in view.pools for r in p.replicas}
    thread = time.perf_counter_ns
    stages: dict[str, list[int]] = {}

    def lap(key: str, t0: int) -> int:
        t1 = thread()
        stages.setdefault(key, []).append(t1 - t0)
        return t1

    for phase in (0, 1):
        for i in range(decisions):
            f, pred, tags = calls[i % len(calls)]
            ctx = RoutingContext(replace(f, arrival_s=float(i)), tags, pred, float(i), state)
            if not phase:
                d = route(ctx, view, policy)
                chosen = by_url.get(d.replica)
            else:
                t = thread()
                pool = policy.pool_chooser(ctx, view)
                t = lap("pool", t)
                assert not isinstance(pool, RouteError)
                ctx.pool = pool
                cands = pool.replicas
                if policy.uses_prefix_index and ctx.features.prefix_hashes:
                    ctx.matched_blocks()
                    t = lap("prefix match", t)
                for flt in policy.filters:
                    cands = flt.filter(ctx, cands)
                    t = lap(f"filter {flt.name}", t)
                chosen = None
                if cands:
                    totals = [0.0] * len(cands)
                    for j, (scorer, weight) in enumerate(policy.scorers):
                        got = scorer.score(ctx, cands)
                        if j == 0:  # as route(): the first scorer's list is the running total
                            totals = got if weight == 1.0 else [weight * b for b in got]
                        else:
                            totals = [a + weight * b for a, b in zip(totals, got, strict=True)]
                        t = lap(f"score {scorer.name}", t)
                    chosen = cands[0] if len(cands) == 1 else policy.picker.pick(ctx, cands, totals)
                    t = lap(f"pick {policy.picker.name}", t)
                    if policy.uses_prefix_index and ctx.features.prefix_hashes:
                        state.prefix_index.insert(chosen.url, ctx.sampled_hashes())
                        t = lap("index insert", t)
                    for hook in policy.after_pick:
                        hook(ctx, chosen)
                    t = lap("after-pick hooks", t)
                    if policy.priority is not None:
                        policy.priority(ctx)
                        t = lap("priority", t)
                    if policy.actions is not None:
                        policy.actions(ctx, view, chosen)
                        t = lap("actions (pre-warm)", t)
                    cached_prompt_tokens(ctx, chosen.url)
                    call_kv(ctx)
                    lap("KV reservation", t)
            if chosen is not None:
                chosen.inflight = max(0, chosen.inflight + rng.choice((-1, 1)))
                chosen.reserved_kv_tokens = max(0, chosen.reserved_kv_tokens + rng.randint(-3000, 3000))
    return {k: float(np.percentile(np.array(v) / 1000.0, 50)) for k, v in stages.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--policies", default="round_robin,least_loaded,session,prefix,llmd,pythia")
    ap.add_argument("--out", default="")
    ap.add_argument("--breakdown", action="store_true", help="also print each stage's median thread CPU (us)")
    ap.add_argument("--digest", action="store_true",
                    help="print a digest of each policy's decisions instead of timing (compare builds)")
    a = ap.parse_args(argv)
    build = loaded_build()
    if a.digest:
        for name in a.policies.split(","):
            print(name, decision_digest(name, a.replicas, a.decisions), flush=True)
        return 0
    print(f"build: {build}", flush=True)
    results: dict[str, dict] = {}
    for name in a.policies.split(","):
        results[name] = time_policy(name, a.replicas, a.decisions)
        r = results[name]
        print(f"{name:14s} wall p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:8.1f} us | "
              f"thread CPU p50 {r['cpu_p50_us']:7.1f} us  p99 {r['cpu_p99_us']:7.1f} us", flush=True)
        if a.breakdown:
            r["stages_p50_us"] = stage_breakdown(name, a.replicas, a.decisions)
            print("    median us: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_p50_us"].items()), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"config": {"replicas": a.replicas, "decisions": a.decisions, "python": sys.version.split()[0],
                                  "loadavg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
                                  "build": build},
                       "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
