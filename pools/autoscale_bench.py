"""Predictive vs reactive autoscaling in virtual time: `python -m pools.autoscale_bench [--out F.json]`.

One pool of simulated vLLM engines (pools.sim) behind the routing core (least_loaded). Agent
workflows (a chain of calls whose prompts grow with the history, think time between calls)
arrive at a low rate, then the rate steps up several-fold. Every `--interval` seconds an
autoscaler reads its signal and asks for replicas; a new replica serves only after
`--cold-start` seconds (pools.autoscale.Autoscaler). Signals compared:

* predictive: `predictive_desired_replicas` over the in-flight workflows projected along their
  automaton (expected remaining calls, output and prefill tokens of each, from the workflow
  model's means, not the sampled truth) plus the recent arrival rate times a mean workflow;
* reactive: `reactive_desired_replicas` (Kubernetes HPA rule) on the pool's utilisation
  (batch occupancy or KV use, whichever is higher).

Reported per signal: time to capacity (from the step until the ready replicas first reach the
count the offered load needs), TTFT/JCT SLO violations, mean/p95 JCT and replica-seconds used.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pools.autoscale import (
    Autoscaler,
    PredictiveConfig,
    ReactiveConfig,
    ReplicaCapacity,
    WorkflowLoad,
    pool_utilization,
    predictive_desired_replicas,
    reactive_desired_replicas,
)
from pools.request_features import extract_features
from pools.routing import RoutingContext, RoutingState, make_policy, route
from pools.sim import EventKind, SimEngine, SimRequest
from pools.types import ClusterView, PoolState, ReplicaState
from predictor.types import Prediction, Tags

POOL = "main"
MODEL = "llama-3.1-8b"
ARRIVAL_WINDOW_S = 20.0  # workflow arrivals are counted over this window for the rate estimate
BATCH_REF = 32  # running sequences counted as a fully busy replica (the batch `_capacity` measures at)


@dataclass(slots=True)
class Shape:
    """The workflow model both the generator and the predictive projection use (means)."""

    steps_mean: float = 6.0
    system_tokens: int = 800
    new_tokens: int = 600  # new user content per call
    output_tokens: int = 250
    think_s: float = 2.0


@dataclass(slots=True)
class Wf:
    wid: str
    arrival: float
    steps: int
    done: int = 0
    history: str = ""
    end: float = -1.0


@dataclass(slots=True)
class Run:
    """Mutable state of one simulation."""

    engines: dict[str, SimEngine] = field(default_factory=dict)
    view: ClusterView = field(default_factory=lambda: ClusterView([PoolState(POOL, 131072, (MODEL,))]))
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (sent, ttft)
    ready_log: list[tuple[float, int]] = field(default_factory=list)
    replica_seconds: float = 0.0


def _text(seed: str, tokens: int) -> str:
    rng = random.Random(seed)
    return "".join(f"w{rng.randrange(1000):03d}" for _ in range(tokens))  # 4 bytes a token


def simulate(signal: str, a: argparse.Namespace) -> dict[str, float]:
    """Run the step scenario under one autoscaling signal ('predictive' or 'reactive')."""
    shape = Shape()
    rng = random.Random(a.seed)
    arrivals: list[float] = []
    t = 0.0
    while t < a.duration:
        rate = a.low_rate if t < a.step_at else a.high_rate
        t += rng.expovariate(rate)
        arrivals.append(t)
    wfs = [Wf(f"wf{i}", at, max(1, round(rng.gauss(shape.steps_mean, 1.5)))) for i, at in enumerate(arrivals)]
    system = _text("system", shape.system_tokens)
    run = Run()
    state, policy = RoutingState(), make_policy("least_loaded")
    scaler = Autoscaler(cold_start_s=a.cold_start, scale_down_delay_s=120.0, ready={POOL: a.initial})
    seq = itertools.count()
    heap: list[tuple[float, int, str, object]] = []
    for w in wfs:
        heapq.heappush(heap, (w.arrival, next(seq), "call", w))
    for i in range(a.initial):
        _add_replica(run, f"r{i}", 0.0)
    heapq.heappush(heap, (a.interval, next(seq), "scale", None))
    cap = _capacity(a)
    inflight: dict[str, tuple[Wf, float, ReplicaState, int]] = {}
    recent: deque[float] = deque()
    nxt: dict[str, float] = {}
    live: set[str] = set()
    n_replicas = a.initial

    def push_engine(url: str) -> None:
        te = run.engines[url].next_event_time()
        if te is not None and nxt.get(url) != te:
            nxt[url] = te
            heapq.heappush(heap, (te, next(seq), "eng", url))

    last = 0.0
    while heap:
        now, _, kind, obj = heapq.heappop(heap)
        run.replica_seconds += (now - last) * (len(run.engines))
        last = now
        if kind == "call":
            assert isinstance(obj, Wf)
            w = obj
            if w.done == 0:
                live.add(w.wid)
                recent.append(now)
            text = system + w.history + _text(f"{w.wid}:{w.done}", shape.new_tokens)
            body = {"model": MODEL, "prompt": text, "max_tokens": shape.output_tokens}
            f = extract_features(body, False, now)
            d = route(RoutingContext(f, Tags(workflow=w.wid), Prediction(), now, state), run.view, policy)
            r = run.view.replica(d.replica)
            assert r is not None
            rid = f"{w.wid}:{w.done}"
            run.engines[r.url].add_request(
                SimRequest.from_text(rid, text, max_tokens=shape.output_tokens, ignore_eos=True), now)
            r.inflight += 1
            inflight[rid] = (w, now, r, len(text))
            push_engine(r.url)
        elif kind == "eng":
            url = str(obj)
            if nxt.get(url) != now or url not in run.engines:
                continue
            del nxt[url]
            eng = run.engines[url]
            for ev in eng.advance(now):
                if ev.kind is not EventKind.FINISHED or ev.request_id not in inflight:
                    continue
                w, sent, r, _ = inflight.pop(ev.request_id)
                res = eng.pop_result(ev.request_id)
                r.inflight -= 1
                if res is not None and res.first_token_time is not None:
                    run.ttft.append((sent, res.first_token_time - sent))
                w.history += _text(f"{w.wid}:{w.done}", shape.new_tokens) + _text(f"{w.wid}:{w.done}:out", shape.output_tokens)
                w.done += 1
                if w.done >= w.steps:
                    w.end = now
                    live.discard(w.wid)
                else:
                    heapq.heappush(heap, (now + shape.think_s, next(seq), "call", w))
            r = run.view.replica(url)
            if r is not None:
                r.num_running, r.num_waiting, r.kv_usage = eng.num_running, eng.num_waiting, eng.kv_usage
            push_engine(url)
        else:  # autoscaler tick
            for _ in scaler.advance(now):
                _add_replica(run, f"r{n_replicas}", now)
                n_replicas += 1
            while recent and recent[0] < now - ARRIVAL_WINDOW_S:
                recent.popleft()
            desired = _signal(signal, now, run, wfs, live, len(recent) / ARRIVAL_WINDOW_S, shape, cap)
            for change in scaler.step(now, {POOL: desired}):
                if change.delta < 0:
                    _remove_idle_replica(run)
            scaler.ready[POOL] = len(run.engines)  # a busy replica is not removed: keep the count true
            run.ready_log.append((now, len(run.engines)))
            if now < a.duration + 600 and (any(w.end < 0 for w in wfs) or now < a.duration):
                heapq.heappush(heap, (now + a.interval, next(seq), "scale", None))
    return _report(signal, a, run, wfs, cap, shape)


def _add_replica(run: Run, url: str, now: float) -> None:
    run.engines[url] = SimEngine.from_preset("llama-3.1-8b-a100", seed=len(run.engines), model_name=MODEL)
    e = run.engines[url]
    r = ReplicaState(url, POOL, kv_capacity_tokens=e.kv_capacity_tokens, max_num_seqs=e.max_num_seqs)
    run.view.pools[0].replicas.append(r)


def _remove_idle_replica(run: Run) -> None:
    """Scale-down drains: only a replica with nothing in flight goes (the newest such one)."""
    for r in reversed(run.view.pools[0].replicas):
        if r.inflight == 0 and not run.engines[r.url].has_work and len(run.engines) > 1:
            run.view.pools[0].replicas.remove(r)
            del run.engines[r.url]
            return


def _capacity(a: argparse.Namespace) -> ReplicaCapacity:
    """One replica's sustained rates at a busy but healthy batch, from the preset's step model."""
    shape = Shape()
    e = SimEngine.from_preset("llama-3.1-8b-a100", seed=0, model_name=MODEL)
    ctx = shape.system_tokens + shape.steps_mean / 2 * (shape.new_tokens + shape.output_tokens)
    n = 32
    for i in range(n):
        e.add_request(SimRequest.from_text(f"c{i}", _text(f"cal{i}", int(ctx)), max_tokens=shape.output_tokens,
                                           ignore_eos=True), 0.0)
    end = 0.0
    while e.has_work:
        te = e.next_event_time()
        assert te is not None
        e.advance(te)
        end = te
    out_rate = n * shape.output_tokens / end
    prefill_rate = out_rate * ctx / shape.output_tokens
    return ReplicaCapacity(out_rate, prefill_rate * 4, e.kv_capacity_tokens)


def _signal(signal: str, now: float, run: Run, wfs: list[Wf], live: set[str], arrivals_per_s: float,
            shape: Shape, cap: ReplicaCapacity) -> int:
    if signal == "reactive":
        reps = run.view.pools[0].replicas
        util = pool_utilization([r.kv_usage for r in reps], [r.num_running / BATCH_REF for r in reps])
        return reactive_desired_replicas(len(reps), util, ReactiveConfig(target_utilization=0.6, max_replicas=32))
    by_id = {w.wid: w for w in wfs if w.wid in live}
    loads = []
    for w in by_id.values():
        # the automaton's expectation given the calls seen so far (not the sampled length)
        rem = max(0.5, shape.steps_mean - w.done)
        loads.append(WorkflowLoad(POOL, rem, rem * shape.output_tokens, rem * shape.new_tokens,
                                  shape.system_tokens + (w.done + 1) * (shape.new_tokens + shape.output_tokens)))
    mean = WorkflowLoad(POOL, shape.steps_mean, shape.steps_mean * shape.output_tokens,
                        shape.steps_mean * (shape.new_tokens + shape.system_tokens / 4),
                        shape.system_tokens + shape.steps_mean / 2 * (shape.new_tokens + shape.output_tokens))
    step_s = shape.think_s + shape.output_tokens * 0.02
    cfg = PredictiveConfig(horizon_s=120.0, step_s=step_s, target_utilization=0.6, max_replicas=32)
    return predictive_desired_replicas(loads, {POOL: cap}, {POOL: arrivals_per_s}, {POOL: mean}, cfg)[POOL]


def _report(signal: str, a: argparse.Namespace, run: Run, wfs: list[Wf], cap: ReplicaCapacity,
            shape: Shape) -> dict[str, float]:
    # replicas the high rate needs at 60% utilisation of the same per-replica capacity (same for both)
    work = shape.steps_mean * shape.output_tokens / cap.output_tokens_per_s
    needed = math.ceil(a.high_rate * work / 0.6)
    reached = next((t for t, n in run.ready_log if t >= a.step_at and n >= needed), math.inf)
    done = [w for w in wfs if w.end >= 0]
    jct = np.array([w.end - w.arrival for w in done]) if done else np.array([math.nan])
    after = [x for s, x in run.ttft if s >= a.step_at]
    return {
        "signal": signal,
        "replicas_needed": needed,
        "time_to_capacity_s": round(reached - a.step_at, 1) if math.isfinite(reached) else -1.0,
        "ttft_slo_violations": round(sum(1 for x in after if x > a.slo_ttft) / max(1, len(after)), 4),
        "jct_slo_violations": round(float(np.mean(jct > a.slo_jct)), 4),
        "jct_mean_s": round(float(jct.mean()), 2),
        "jct_p95_s": round(float(np.percentile(jct, 95)), 2),
        "max_replicas": max(n for _, n in run.ready_log),
        "replica_hours": round(run.replica_seconds / 3600, 3),
        "workflows": len(wfs),
        "unfinished": len(wfs) - len(done),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cold-start", type=float, default=60.0, help="seconds before a new replica serves")
    ap.add_argument("--interval", type=float, default=5.0, help="autoscaler period, s")
    ap.add_argument("--initial", type=int, default=2, help="replicas at start")
    ap.add_argument("--low-rate", type=float, default=0.3, help="workflows/s before the step")
    ap.add_argument("--high-rate", type=float, default=1.5, help="workflows/s after the step")
    ap.add_argument("--step-at", type=float, default=180.0)
    ap.add_argument("--duration", type=float, default=600.0, help="arrivals stop here")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-jct", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    results = {s: simulate(s, a) for s in ("predictive", "reactive")}
    for r in results.values():
        print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"config": vars(a), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
